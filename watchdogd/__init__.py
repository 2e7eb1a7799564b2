"""watchdogd: automated failover of a primary/standby application + database pair."""

__version__ = "0.1.0"
