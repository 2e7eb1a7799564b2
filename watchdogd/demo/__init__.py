"""The demo lab: tooling around the daemon, not the daemon.

``run`` is ``watchdogd demo`` (the lab on loopback, the daemon in-process, the live
view, the unattended scenarios; ``bench/failover.py`` reuses its ``Lab``); ``lab`` is a
throwaway PostgreSQL primary + streaming standby; ``app`` is a stand-in application
stack. Tests and benchmarks use ``lab`` and ``app`` too. The demo hears the daemon
through its event bus, like the log, the metrics and the webhooks.
"""
