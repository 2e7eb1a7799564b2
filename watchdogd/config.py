"""Configuration: YAML in, the frozen ``core.model.Config`` out.

Owns loading and validating a config file: the YAML safety caps, the core keys, and
handing each ``database:`` section to its engine module, each step to its action module
and each provider section (``cloud66:``) to its owner. Every problem is reported as one
line naming its path, e.g. ``failover.steps[2].timeout: expected a duration like 5s, got
'soon'``, and all problems are collected before giving up, so one run shows them all.

This module is at the top of the import graph: it imports the registries
(``actions``, ``engines``, ``notify``) and nothing below imports it.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import yaml

from watchdogd import actions, engines, fleet
from watchdogd.core.errors import WatchdogdError
from watchdogd.core.model import (
    AppConfig,
    Config,
    ControlConfig,
    DatabaseConfig,
    EtcdConfig,
    FailoverConfig,
    GuardConfig,
    LogConfig,
    MaintenanceCheck,
    MetricsConfig,
    NodeConfig,
    ProbeConfig,
    StepConfig,
    StoreConfig,
    WebhookConfig,
    WitnessConfig,
)
from watchdogd.core.secrets import unresolve
from watchdogd.core.section import Section, kind_of
from watchdogd.core.units import format_duration
from watchdogd.notify import unknown_events
from watchdogd.policy import GUARD_STEP, VERIFY_STEP, guard_position

# A config is a few kilobytes. The caps stop a YAML alias bomb ("billion laughs"):
# aliases make shared references, and walking them would expand to billions of nodes.
MAX_CONFIG_BYTES = 1024 * 1024
MAX_CONFIG_NODES = 100_000
# failover.rejoin_steps when omitted: the engine's built-in rejoin of the old primary.
DEFAULT_REJOIN_STEPS = ({"name": "rejoin", "action": "rejoin"},)


class ConfigError(WatchdogdError):
    """The config is invalid; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate a config file; raises ConfigError with every problem."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config: {exc.strerror}"]) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError([f"{path}: config is larger than {MAX_CONFIG_BYTES // 1024} KiB"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: config is not valid UTF-8"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([f"{path}: not valid YAML{line}: {problem}"]) from None
    except RecursionError:
        raise ConfigError([f"{path}: not valid YAML: nested too deeply"]) from None
    if _too_many_nodes(data, MAX_CONFIG_NODES):
        raise ConfigError(
            [
                f"{path}: config expands to more than {MAX_CONFIG_NODES} values "
                "(YAML aliases repeating aliases?); write it out plainly"
            ]
        )
    return parse(data, source=str(path))


def _too_many_nodes(data: Any, limit: int) -> bool:
    """Whether ``data`` has more than ``limit`` values, counting each alias use again.

    Iterative and stopping at ``limit``, so a bomb costs ``limit`` steps, not billions."""
    stack = [data]
    seen = 0
    while stack:
        value = stack.pop()
        seen += 1
        if seen > limit:
            return True
        if isinstance(value, Mapping):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return False


def parse(data: Any, source: str | None = None) -> Config:
    errors: list[str] = []
    secrets: set[str] = set()
    env_refs: dict[str, str] = {}
    if not isinstance(data, Mapping):
        raise ConfigError([f"config: expected a mapping at the top level, got {kind_of(data)}"])
    root = Section(data, "", errors, secrets, env_refs)

    cluster = root.str("cluster")
    if isinstance(cluster, str) and not re.fullmatch(r"[A-Za-z0-9_.-]+", cluster):
        root.error("use letters, digits, '.', '_' or '-'", "cluster")

    nodes = [_node(root, role, engines.validate_database) for role in ("primary", "standby")]
    if nodes[0] and nodes[1] and nodes[0].name == nodes[1].name:
        root.error(f"must differ from primary.name ({nodes[0].name!r})", "standby")

    probe = ProbeConfig()
    if (p := root.section("probe")) is not None:
        probe = ProbeConfig(
            interval=p.duration("interval", 1.0, minimum=0.05),
            timeout=p.duration("timeout", 0.5, minimum=0.01),
            recovery_successes=p.int("recovery_successes", 3, minimum=1, maximum=100),
        )
        p.finish()
        if probe.timeout >= probe.interval:
            p.error(
                f"must be shorter than probe.interval ({format_duration(probe.interval)})",
                "timeout",
            )

    failover = _failover(root, actions.validate_step)
    if failover.outage_threshold < probe.interval:
        root.error("must be at least probe.interval", "failover.outage_threshold")

    witnesses: list[WitnessConfig] = []
    for w in root.sections("witnesses"):
        witnesses.append(
            WitnessConfig(
                name=w.str("name", f"witness{len(witnesses) + 1}"),
                url=_url(w, "url"),
                timeout=w.duration("timeout", None),
            )
        )
        w.finish()

    metrics = MetricsConfig()
    if (m := root.section("metrics")) is not None:
        enabled = m.bool("enabled", True)
        listen = m.str("listen", "127.0.0.1:9644")
        host, port = _host_port(m, "listen", listen)
        metrics = MetricsConfig(host=host, port=port, enabled=enabled)
        m.finish()

    control = ControlConfig()
    if (c := root.section("control")) is not None:
        mode_text = c.str("mode", "0660")
        mode = 0o660
        if isinstance(mode_text, str):
            if re.fullmatch(r"0?[0-7]{3}", mode_text):
                mode = int(mode_text, 8)
                if mode & 0o007:
                    c.error(f"must not give rights to others, got {mode_text!r}", "mode")
            else:
                c.error(f'expected an octal mode like "0660", got {mode_text!r}', "mode")
        group = c.str("group", None)
        if isinstance(group, str) and not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\$?", group):
            c.error(f"expected a group name, got {group!r}", "group")
        control = ControlConfig(
            socket=c.str("socket", ControlConfig.socket),
            mode=mode,
            group=group,
            allow_users=tuple(c.str_list("allow_users", [])),
            allow_groups=tuple(c.str_list("allow_groups", [])),
            read_groups=tuple(c.str_list("read_groups", [])),
        )
        c.finish()

    log = LogConfig()
    if (lg := root.section("log")) is not None:
        log = LogConfig(
            format=lg.choice("format", ("auto", "json", "console"), "auto"),
            level=lg.choice("level", ("debug", "info", "warning", "error"), "info"),
        )
        lg.finish()

    webhooks: list[WebhookConfig] = []
    if (n := root.section("notify")) is not None:
        for w in n.sections("webhooks"):
            webhooks.append(
                WebhookConfig(
                    url=_url(w, "url"),
                    headers=w.str_map("headers"),
                    events=frozenset(w.str_list("events", [])),
                    timeout=w.duration("timeout", 5.0, minimum=0.01),
                )
            )
            w.finish()
        errors.extend(unknown_events(webhooks))
        n.finish()

    state_dir = root.str("state_dir", "/var/lib/watchdogd")

    instance = root.str("instance", _hostname())
    if isinstance(instance, str) and not re.fullmatch(r"[A-Za-z0-9_.-]+", instance):
        root.error(f"use letters, digits, '.', '_' or '-', got {instance!r}", "instance")
        instance = "local"
    store = _store(root, instance)
    if store is not None and store.etcd.endpoints:
        _steps_fit(root, store, failover)
        _ballots_live(root, store, probe)
    guard = None
    if (g := root.section("guard")) is not None:
        guard = GuardConfig(
            isolation_timeout=g.duration("isolation_timeout", 20.0, minimum=1.0),
            watchers=_guard_watchers(g, store),
        )
        g.finish()
    _guard_fits(root, failover, guard is not None)

    providers: dict[str, Any] = {}
    for name, parser in actions.provider_sections().items():
        if (s := root.section(name)) is not None:
            providers[name] = parser(s)
            s.finish()

    root.finish()
    if errors:
        raise ConfigError(unresolve(errors, env_refs, secrets))
    assert cluster is not None and nodes[0] is not None and nodes[1] is not None
    config = Config(
        cluster=cluster,
        primary=nodes[0],
        standby=nodes[1],
        probe=probe,
        failover=failover,
        witnesses=tuple(witnesses),
        metrics=metrics,
        control=control,
        log=log,
        webhooks=tuple(webhooks),
        state_dir=state_dir,
        providers=providers,
        secrets=frozenset(secrets),
        source=source,
        instance=instance,
        store=store,
        guard=guard,
    )
    if problems := actions.check_config(config):
        raise ConfigError(unresolve(problems, env_refs, secrets))
    return config


@dataclass(frozen=True)
class FleetTiming:
    """The leader's clock, from ``store.etcd``: it renews its lease every ``renew``
    seconds; one store call takes at most ``budget`` (one attempt per endpoint, as
    ``EtcdClient.retry_budget``); its authority ends ``margin`` before the lease could
    (a safety for the scheduling delay between etcd's answer and our acting on it, and
    the rate difference of two clocks)."""

    ttl: float
    renew: float
    budget: float
    margin: float

    def problem(self) -> str | None:
        """The timing rule ``renew + 2 x budget + margin <= ttl``: one renewal may fail
        after a full budget and the next must still land before the lease ends."""
        return fleet.timing_problem(self.renew, self.budget, self.margin, self.ttl)


def step_room(etcd: EtcdConfig) -> float:
    """The longest step a fleet leader may start right after a renewal."""
    timing = fleet_timing(etcd)
    return timing.ttl - timing.margin - timing.budget - 1.0


def fleet_timing(etcd: EtcdConfig) -> FleetTiming:
    return FleetTiming(
        ttl=etcd.ttl,
        renew=etcd.ttl / 3,
        budget=etcd.timeout * max(1, len(etcd.endpoints)),
        margin=max(0.5, etcd.ttl / 10),
    )


def _hostname() -> str:
    name = socket.gethostname().split(".")[0]
    return name if re.fullmatch(r"[A-Za-z0-9_.-]+", name or "") else "local"


def _guard_watchers(g: Section, store: StoreConfig | None) -> tuple[tuple[str, str], ...]:
    """``guard.watchers``: voter name -> the base URL of its metrics port. The guard
    counts a strict majority of the voters vouching as a sign of life, so fewer listed
    than that could never count: refused rather than silently useless."""
    if not g.has("watchers"):
        return ()
    listed = g.str_map("watchers")
    voters = store.voters if store is not None else ()
    found: list[tuple[str, str]] = []
    for name, url in listed.items():
        where = f"watchers.{name}"
        if name not in voters:
            g.error(f"{name!r} is not one of store.voters ({', '.join(voters) or 'none'})", where)
            continue
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            parts, port = None, None
        if (
            parts is None
            or parts.scheme != "http"
            or not parts.hostname
            or port is None
            or parts.path not in ("", "/")
            or parts.query
            or parts.fragment
            or parts.username is not None
        ):
            g.error(
                f"expected the watcher's metrics address like http://10.0.0.5:9644 (plain "
                f"HTTP: the metrics port has no TLS), got {url!r}",
                where,
            )
            continue
        found.append((name, url.rstrip("/")))
    needed = len(voters) // 2 + 1
    if listed and voters and len(listed) < needed:
        g.error(
            f"lists {len(listed)} of {len(voters)} voters: a strict majority ({needed}) must "
            "vouch, so list at least that many",
            "watchers",
        )
    return tuple(found)


def _store(root: Section, instance: str) -> StoreConfig | None:
    """``store``: the fleet's etcd and its voters. Every problem names its path."""
    s = root.section("store")
    if s is None:
        return None
    e = s.section("etcd", required=True)
    voters = s.str_list("voters", None)
    if voters is None:
        s.error("is required: the fleet's instance names, e.g. [dc1, dc2, dc3]", "voters")
        voters = []
    seen: set[str] = set()
    for i, v in enumerate(voters):
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", v):
            s.error(f"use letters, digits, '.', '_' or '-', got {v!r}", f"voters[{i}]")
        if v in seen:
            s.error(f"{v!r} is listed twice", f"voters[{i}]")
        seen.add(v)
    if s.has("voters") and voters == []:
        s.error("must name at least one voter", "voters")
    elif voters and instance not in seen:
        s.error(f"must include this instance ({instance!r}; set instance: to its name)", "voters")
    s.finish()
    if e is None:
        return None
    endpoints: list[str] = []
    raw = e.str_list("endpoints", None)
    if raw is None:
        e.error('is required: a list like ["https://10.0.0.1:2379"]', "endpoints")
    elif not raw:
        e.error("must list at least one endpoint", "endpoints")
    for i, text in enumerate(raw or []):
        problem = _endpoint_problem(text)
        if problem is not None:
            e.error(problem, f"endpoints[{i}]")
        else:
            endpoints.append(text.rstrip("/"))
    prefix = e.str("prefix", "/watchdogd")
    if isinstance(prefix, str) and not re.fullmatch(r"(/[A-Za-z0-9_.-]+)+", prefix):
        e.error(f"expected a key path like /watchdogd, got {prefix!r}", "prefix")
    ttl = e.duration("ttl", 15.0, minimum=2.0)
    timeout = e.duration("timeout", 1.0, minimum=0.05)
    ca_file = cert_file = key_file = None
    if (t := e.section("tls")) is not None:
        ca_file = t.str("ca_file", None)
        cert_file = t.str("cert_file", None)
        key_file = t.str("key_file", None)
        if (cert_file is None) != (key_file is None):
            t.error("cert_file and key_file go together")
        for key, path in (("ca_file", ca_file), ("cert_file", cert_file), ("key_file", key_file)):
            if path is not None and not os.access(path, os.R_OK):
                t.error(f"cannot read {path}", key)
        t.finish()
    username = e.str("username", None)
    password = e.secret("password")
    if (username is None) != (password is None):
        e.error("username and password (or password_file) go together")
    e.finish()
    etcd = EtcdConfig(
        endpoints=tuple(endpoints),
        prefix=prefix if isinstance(prefix, str) else "/watchdogd",
        ttl=ttl,
        ca_file=ca_file,
        cert_file=cert_file,
        key_file=key_file,
        username=username,
        password=password,
        timeout=timeout,
    )
    if endpoints and (problem := fleet_timing(etcd).problem()) is not None:
        e.error(
            f"{problem} (store.etcd.timeout {format_duration(etcd.timeout)} per endpoint)", "ttl"
        )
    return StoreConfig(etcd=etcd, voters=tuple(voters))


def _guard_fits(root: Section, failover: FailoverConfig, guarded: bool) -> None:
    """``guard_fence`` (name and action) is the fleet's own step: a step of the config
    by that name would take its place. With ``guard:`` the fleet inserts it before the
    promotion (``policy.guard_position``); its expired path counts the guard's silence
    only from when replication was stopped (a standby streaming from the old primary
    keeps an isolated guard from fencing), so a ``stop_replication`` step must come
    before the promotion."""
    for key, steps in _sequences(failover):
        for i, step in enumerate(steps):
            if GUARD_STEP in (step.name, step.action):
                root.error(
                    f"{GUARD_STEP!r} is the fleet's own step (with guard:): pick another",
                    f"failover.{key}[{i}].{'name' if step.name == GUARD_STEP else 'action'}",
                )
    at = guard_position(failover.steps)
    if (
        guarded
        and failover.steps
        and not any(s.action == "stop_replication" for s in failover.steps[:at])
    ):
        root.error(
            "with guard: a stop_replication step must come before the promotion (the "
            "guard's silence counts only once the standby stopped streaming from the old "
            "primary)",
            "failover.steps",
        )


def _steps_fit(root: Section, store: StoreConfig, failover: FailoverConfig) -> None:
    """In a fleet every failover, fence and rejoin step (and the rejoin's verification,
    ``rejoin_timeout``) must fit in the leader's authority right after a renewal:
    ``timeout + 1s + retry budget <= ttl - margin``. (A switchover's own fence and
    catch-up steps are cut to it by ``policy.build_plan``.) A longer step would never start (it
    stays unfinished for a leader that cannot run it either)."""
    timing = fleet_timing(store.etcd)
    room = step_room(store.etcd)
    timed = [("failover.rejoin_timeout", failover.rejoin_timeout, "it")]  # the verification
    timed += [
        (f"failover.{key}[{i}].timeout", step.timeout, "the step")
        for key, steps in _sequences(failover)
        for i, step in enumerate(steps)
    ]
    for path, timeout, what in timed:
        if timeout > room:
            root.error(
                f"{format_duration(timeout)} does not fit in a fleet leader's "
                f"authority: at most {format_duration(max(0.0, room))} with store.etcd.ttl "
                f"{format_duration(timing.ttl)} (raise the ttl or shorten {what})",
                path,
            )


def _sequences(failover: FailoverConfig) -> tuple[tuple[str, tuple[StepConfig, ...]], ...]:
    """The configured step lists by key: failover, fence and rejoin steps."""
    return (
        ("steps", failover.steps),
        ("fence_steps", failover.fence_steps),
        ("rejoin_steps", failover.rejoin_steps),
    )


def _ballots_live(root: Section, store: StoreConfig, probe: ProbeConfig) -> None:
    """Each watcher's view lives on a lease of the ttl that its next publish renews: one
    probe interval, the probe's timeout and a publish's retry budget must fit in it, or
    views expire between publishes and the fleet never has a majority to fail over."""
    timing = fleet_timing(store.etcd)
    gap = probe.interval + probe.timeout + timing.budget
    if gap >= timing.ttl:
        root.error(
            f"{format_duration(probe.interval)} is too long for store.etcd.ttl "
            f"{format_duration(timing.ttl)}: a view must be republished (interval + "
            f"timeout + retry budget = {format_duration(gap)}) before its lease ends; "
            "shorten the interval or raise the ttl",
            "probe.interval",
        )


def _endpoint_problem(text: str) -> str | None:
    """Why ``text`` is not an etcd endpoint (``http(s)://host:port``), or None."""
    m = re.fullmatch(r"(https?)://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})/?", text)
    if m is None or not 0 < int(m.group(3)) <= 65535:
        return f"expected http(s)://host:port, e.g. https://10.0.0.1:2379, got {text!r}"
    return None


def _node(
    root: Section, role: str, validate_db: Callable[[Section, str], Mapping[str, Any]]
) -> NodeConfig | None:
    s = root.section(role, required=True)
    if s is None:
        return None
    name = s.str("name", role)
    app = None
    if (a := s.section("app")) is not None:
        statuses = a.raw("expect_status", [])
        if isinstance(statuses, int):
            statuses = [statuses]
        if not isinstance(statuses, list) or not all(
            isinstance(x, int) and 100 <= x <= 599 for x in statuses
        ):
            a.error(f"expected HTTP status codes, got {statuses!r}", "expect_status")
            statuses = []
        maintenance = None
        if (m := a.section("maintenance")) is not None:
            # contains: the text the page shows in maintenance (never empty: str() says)
            url, contains = _url(m, "url"), m.str("contains")
            maintenance = MaintenanceCheck(url=url, contains=contains or "")
            m.finish()
        app = AppConfig(
            health_url=_url(a, "health_url"),
            expect_status=tuple(statuses),
            headers=a.str_map("headers"),
            maintenance=maintenance,
        )
        a.finish()
    db = None
    if (d := s.section("database", required=True)) is not None:
        engine = d.str("engine")
        dsn = d.str("dsn")
        options: Mapping[str, Any] = {}
        if isinstance(engine, str) and isinstance(dsn, str):
            options = validate_db(d, engine)
        db = DatabaseConfig(engine=engine or "", dsn=dsn or "", options=options)
        d.finish()
    s.finish()
    if db is None:
        return None
    return NodeConfig(name=name, database=db, app=app)


def _failover(
    root: Section, validate_step: Callable[[Section], StepConfig | None]
) -> FailoverConfig:
    f = root.section("failover")
    if f is None:
        return FailoverConfig(
            steps=tuple(
                s
                for s in (
                    validate_step(Section(d, f"failover.steps[{i}]", root.errors, root.secrets))
                    for i, d in enumerate(actions.DEFAULT_STEPS)
                )
                if s
            ),
            rejoin_steps=_default_rejoin_steps(root, validate_step),
        )
    trigger_on = f.str_list("trigger_on", ["database", "app"])
    for i, t in enumerate(trigger_on or []):
        if t not in ("database", "app"):
            f.error(f"expected database or app, got {t!r}", f"trigger_on[{i}]")
    if trigger_on == []:
        f.error("must name at least one of database, app", "trigger_on")
    steps = _steps(f, "steps", validate_step)
    if not f.has("steps"):
        steps = tuple(
            s
            for s in (
                validate_step(Section(d, f"failover.steps[{i}]", f.errors, f.secrets))
                for i, d in enumerate(actions.DEFAULT_STEPS)
            )
            if s
        )
    elif not steps and not any(e.startswith("failover.steps") for e in f.errors):
        f.error("must list at least one step", "steps")
    fence_steps = _steps(f, "fence_steps", validate_step)
    rejoin_steps = _steps(f, "rejoin_steps", validate_step)
    if not f.has("rejoin_steps"):
        rejoin_steps = _default_rejoin_steps(f, validate_step)
    elif not rejoin_steps and not any(e.startswith("failover.rejoin_steps") for e in f.errors):
        f.error("must list at least one step", "rejoin_steps")
    for i, step in enumerate(rejoin_steps):
        if step.name == VERIFY_STEP:
            f.error(
                f"{VERIFY_STEP!r} is the rejoin's own last step: pick another name",
                f"rejoin_steps[{i}].name",
            )
        # In a rejoin, "primary" is the old primary and "standby" the new primary.
        wrong = REJOIN_WRONG_TARGET.get(step.action)
        if wrong is not None and step.params.get("target") == wrong[0]:
            f.error(wrong[1], f"rejoin_steps[{i}].target")
    cfg = FailoverConfig(
        mode=f.choice("mode", ("automatic", "manual"), "automatic"),
        outage_threshold=f.duration("outage_threshold", 30.0, minimum=0.1),
        max_lag=f.size("max_lag", 16 * 10**6),
        max_lag_seconds=f.duration("max_lag_seconds", None),
        cooldown=f.duration("cooldown", 3600.0),
        trigger_on=frozenset(trigger_on or ("database", "app")),
        catchup_timeout=f.duration("catchup_timeout", 30.0, minimum=0.1),
        steps=steps,
        fence_steps=fence_steps,
        rejoin_steps=rejoin_steps,
        rejoin_timeout=f.duration("rejoin_timeout", 120.0, minimum=0.1),
        auto_rejoin=f.bool("auto_rejoin", False),
    )
    f.finish()
    return cfg


def _default_rejoin_steps(
    s: Section, validate_step: Callable[[Section], StepConfig | None]
) -> tuple[StepConfig, ...]:
    built = (
        validate_step(Section(dict(d), f"failover.rejoin_steps[{i}]", s.errors, s.secrets))
        for i, d in enumerate(DEFAULT_REJOIN_STEPS)
    )
    return tuple(step for step in built if step)


# Targets that would turn a rejoin step against the new primary (in a rejoin, target
# "standby" is the new primary): the action, the target refused, and why.
REJOIN_WRONG_TARGET = {
    "rejoin": (
        "standby",
        "'standby' would rewind the new primary: a rejoin step rejoins the old primary "
        "(target: primary, the default)",
    ),
    "promote": (
        "primary",
        "'primary' would promote the old primary beside the new one (split brain): in "
        "rejoin_steps, promote only the standby (the new primary)",
    ),
}


def _steps(
    f: Section, key: str, validate_step: Callable[[Section], StepConfig | None]
) -> tuple[StepConfig, ...]:
    steps: list[StepConfig] = []
    names: set[str] = set()
    for s in f.sections(key):
        s.templates = True
        step = validate_step(s)
        if step is None:
            continue
        if step.name in names:
            s.error(f"duplicate step name {step.name!r}", "name")
        names.add(step.name)
        steps.append(step)
    return tuple(steps)


def _url(s: Section, key: str) -> str:
    url = s.str(key)
    if isinstance(url, str) and not re.match(r"^https?://[^/\s]+", url):
        s.error(f"expected an http(s) URL, got {url!r}", key)
    return url or ""  # missing: reported, and the config is refused


def _host_port(s: Section, key: str, text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        s.error(f"expected host:port, got {text!r}", key)
        return "127.0.0.1", 9644
    return host.strip("[]") or "0.0.0.0", int(port)
