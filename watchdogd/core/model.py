"""The config model: frozen dataclasses, as ``watchdogd.config`` builds them from YAML.

Owns the config contract (the key names other issues, the docs and tests rely on) as
types; reading and validating them is ``watchdogd.config``'s job, and each action or
engine module validates its own keys (``StepConfig.params``, ``DatabaseConfig.options``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from watchdogd.core.secrets import mask


@dataclass(frozen=True)
class DatabaseConfig:
    engine: str
    dsn: str
    # Engine-specific keys, already validated by the engine module.
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MaintenanceCheck:
    """How to see that an app is in maintenance: ``url`` answers 2xx with ``contains``
    in its body (the way a string-matching HTTP health check reads a page)."""

    url: str
    contains: str


@dataclass(frozen=True)
class AppConfig:
    health_url: str
    expect_status: tuple[int, ...] = ()  # empty: any 2xx
    headers: Mapping[str, str] = field(default_factory=dict)
    # Set: while this node is the standby, readiness checks that its app is in
    # maintenance (the runbook takes it out at failover).
    maintenance: MaintenanceCheck | None = None


@dataclass(frozen=True)
class NodeConfig:
    name: str
    database: DatabaseConfig
    app: AppConfig | None = None


@dataclass(frozen=True)
class ProbeConfig:
    interval: float = 1.0
    timeout: float = 0.5
    recovery_successes: int = 3


@dataclass(frozen=True)
class StepConfig:
    name: str
    action: str
    timeout: float = 30.0
    retries: int = 0
    retry_delay: float = 1.0
    required: bool = True
    # None: the action's own default (see each action's ``idempotent``).
    idempotent: bool | None = None
    # Action-specific keys, validated by the action module (raw, placeholders unrendered).
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FailoverConfig:
    mode: str = "automatic"
    outage_threshold: float = 30.0
    max_lag: int = 16 * 10**6
    max_lag_seconds: float | None = None
    cooldown: float = 3600.0
    trigger_on: frozenset[str] = frozenset({"database", "app"})
    catchup_timeout: float = 30.0
    steps: tuple[StepConfig, ...] = ()
    fence_steps: tuple[StepConfig, ...] = ()
    # Rejoin the node failed away from as a standby (watchdogctl rejoin, auto_rejoin).
    rejoin_steps: tuple[StepConfig, ...] = ()
    rejoin_timeout: float = 120.0  # verification: the old primary streams, caught up
    auto_rejoin: bool = False  # only with a known zero divergence


@dataclass(frozen=True)
class WitnessConfig:
    name: str
    url: str
    timeout: float | None = None


@dataclass(frozen=True)
class MetricsConfig:
    host: str = "127.0.0.1"
    port: int = 9644
    enabled: bool = True


@dataclass(frozen=True)
class ControlConfig:
    socket: str = "/run/watchdogd/control.sock"
    mode: int = 0o660
    # The socket's group (None: the daemon's own). Operators join this group to use
    # watchdogctl without joining the daemon's group, which can read its secrets.
    group: str | None = None
    allow_users: tuple[str, ...] = ()
    allow_groups: tuple[str, ...] = ()
    read_groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class LogConfig:
    format: str = "auto"  # auto | json | console
    level: str = "info"


@dataclass(frozen=True)
class WebhookConfig:
    url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    events: frozenset[str] = frozenset()  # empty: every event
    timeout: float = 5.0


@dataclass(frozen=True)
class EtcdConfig:
    """``store.etcd``: where the fleet keeps its leader key, journal and views."""

    endpoints: tuple[str, ...]
    prefix: str = "/watchdogd"
    ttl: float = 15.0
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    username: str | None = None
    password: str | None = None
    # One request attempt on one endpoint; a call tries each endpoint once, so its
    # retry budget is timeout x endpoints (see ``watchdogd.state.etcd.EtcdClient``).
    timeout: float = 1.0


@dataclass(frozen=True)
class StoreConfig:
    """``store``: a fleet of watchers coordinated through etcd (issue 12)."""

    etcd: EtcdConfig
    voters: tuple[str, ...]


@dataclass(frozen=True)
class GuardConfig:
    """``guard``: the optional guard beside the primary. ``watchers``: (voter, base URL)
    pairs the guard asks whether they vouch for its primary (``/vouch`` on their metrics
    port); empty: the guard counts no watcher as a sign of life."""

    isolation_timeout: float = 20.0
    watchers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Config:
    cluster: str
    primary: NodeConfig
    standby: NodeConfig
    probe: ProbeConfig = ProbeConfig()
    failover: FailoverConfig = FailoverConfig()
    witnesses: tuple[WitnessConfig, ...] = ()
    metrics: MetricsConfig = MetricsConfig()
    control: ControlConfig = ControlConfig()
    log: LogConfig = LogConfig()
    webhooks: tuple[WebhookConfig, ...] = ()
    state_dir: str = "/var/lib/watchdogd"
    # Top-level sections owned by action modules (e.g. ``cloud66``), parsed by them.
    providers: Mapping[str, Any] = field(default_factory=dict)
    # Every resolved secret value: masked wherever text leaves the daemon.
    secrets: frozenset[str] = frozenset()
    source: str | None = None
    # This watcher's name in a fleet (default: the host name); ``store`` None: one
    # watcher with its local journal, exactly as without a fleet.
    instance: str = "local"
    store: StoreConfig | None = None
    guard: GuardConfig | None = None

    def node(self, name: str) -> NodeConfig:
        for node in (self.primary, self.standby):
            if node.name == name:
                return node
        raise KeyError(name)

    @property
    def nodes(self) -> tuple[NodeConfig, NodeConfig]:
        return (self.primary, self.standby)

    def mask(self, text: str) -> str:
        return mask(text, self.secrets)
