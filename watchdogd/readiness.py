"""Readiness: would a failover started now work? Pure: no I/O, time is passed in.

Owns the checks' names, their evaluation from what the probe cycle already observed
(the cheap checks), and the aggregation of those with the results of the checks that
touch other systems (the step targets and the engines' settings advice, run about
once a minute by ``watchdogd.daemon.readiness``).

Check names are fixed by the config (they are metric labels): ``standby_database``,
``replication``, ``lag``, ``standby_app`` (when the standby has an app), ``armed``,
``step:NAME`` per failover step, ``fence_step:NAME`` per fence step,
``rejoin_step:NAME`` per rejoin step and
``settings:NODE`` per node. A failed ``error`` check makes the pair not ready; a failed
``warning`` (a step that is not ``required``, a setting that slows detection) is shown
but never does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from watchdogd.core.model import Config, NodeConfig, StepConfig
from watchdogd.core.units import format_bytes, format_duration
from watchdogd.policy import Policy, standby_facts
from watchdogd.probes import Observation

ERROR, WARNING = "error", "warning"

STANDBY_DATABASE = "standby_database"
REPLICATION = "replication"
LAG = "lag"
STANDBY_APP = "standby_app"
STANDBY_MAINTENANCE = "standby_app_maintenance"
ARMED = "armed"
NOT_CHECKED = "not checked yet"


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    severity: str = ERROR  # ERROR | WARNING

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail, "severity": self.severity}


@dataclass(frozen=True)
class Readiness:
    checks: tuple[Check, ...]
    checked_at: float

    @property
    def ready(self) -> bool:
        """Every error check passes; warnings never make the pair not ready."""
        return all(c.ok for c in self.checks if c.severity == ERROR)

    @property
    def problems(self) -> list[Check]:
        """The failed checks, errors before warnings, each kind in check order."""
        failed = [c for c in self.checks if not c.ok]
        return [c for c in failed if c.severity == ERROR] + [
            c for c in failed if c.severity != ERROR
        ]

    def as_dict(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "checks": [c.as_dict() for c in self.checks],
            "checked_at": self.checked_at,
        }


def combine(cheap: Sequence[Check], expensive: Sequence[Check], at: float) -> Readiness:
    return Readiness(tuple(cheap) + tuple(expensive), at)


# ---------------------------------------------------------------------- cheap checks


def cycle_checks(
    policy: Policy,
    standby: NodeConfig,
    standby_db: Observation | None,
    standby_app: Observation | None,
    last_primary_pos: int | None,
    now: float,
) -> list[Check]:
    """The checks one probe cycle's observations answer, as the lag guard sees them."""
    facts = standby_facts(standby_db, last_primary_pos)
    checks = [
        Check(
            STANDBY_DATABASE,
            facts.reachable and facts.is_standby,
            _standby_text(standby.name, facts.reachable, facts.is_standby, facts.detail),
        ),
        _replication(standby_db),
        _lag(policy, facts.reachable and facts.is_standby, standby_db, last_primary_pos),
    ]
    if standby.app is not None:
        if standby_app is None:
            checks.append(Check(STANDBY_APP, False, NOT_CHECKED))
        else:
            checks.append(Check(STANDBY_APP, standby_app.ok, f"health check: {standby_app.detail}"))
    checks.append(armed_check(policy, now))
    return checks


def _standby_text(name: str, reachable: bool, is_standby: bool, detail: str) -> str:
    if not reachable:
        return f"{name} does not answer: {detail}"
    if not is_standby:
        return f"{name} is not a standby (it is a primary): {detail}"
    return f"{name} answers and is a standby"


def _replication(obs: Observation | None) -> Check:
    st = obs.db if obs is not None and obs.ok else None
    if st is None:
        return Check(REPLICATION, False, "unknown: the standby database does not answer")
    if st.is_primary:
        return Check(REPLICATION, False, "the standby database is a primary: nothing to replicate")
    if not st.streaming:
        return Check(REPLICATION, False, f"not streaming from the primary ({st.detail})")
    return Check(REPLICATION, True, "streaming from the primary")


def _lag(
    policy: Policy, replicating: bool, obs: Observation | None, last_primary_pos: int | None
) -> Check:
    if not replicating:
        return Check(LAG, False, "unknown: no replicating standby")
    facts = standby_facts(obs, last_primary_pos)
    refusal = policy.refuse(facts)
    if refusal is not None:
        return Check(LAG, False, refusal)
    cfg = policy.cfg
    text = f"{format_bytes(facts.lag_bytes or 0)} behind (max_lag {format_bytes(cfg.max_lag)})"
    if cfg.max_lag_seconds is not None and facts.lag_seconds is not None:
        text += f", {facts.lag_seconds:.1f}s (max_lag_seconds {cfg.max_lag_seconds:g}s)"
    return Check(LAG, True, text)


def armed_check(policy: Policy, now: float) -> Check:
    """``Policy.armed`` decides; the detail names every guard that disarms it."""
    if policy.armed(now):
        return Check(ARMED, True, "automatic failover is armed")
    j = policy.journal
    why = []
    if policy.cfg.mode != "automatic":
        why.append(f"mode is {policy.cfg.mode}")
    if j.paused:
        why.append("paused by an operator" + (f" ({j.pause_reason})" if j.pause_reason else ""))
    # (no ids here: status and the page show the failover itself beside this)
    if j.unfinished is not None:
        why.append("a failover is in progress")
    if j.awaiting_ack is not None:
        why.append("the last failover awaits an ack (watchdogctl ack)")
    if (left := policy.cooldown_left(now)) > 0:
        why.append(f"cooldown: {format_duration(left)} left")
    return Check(ARMED, False, "automatic failover is not armed: " + "; ".join(why))


# ---------------------------------------------------------------------- expensive checks


def step_check_name(kind: str, step: StepConfig) -> str:
    """``step:NAME`` for a failover step, ``fence_step:NAME`` for a fence step,
    ``rejoin_step:NAME`` for a rejoin step."""
    return f"{kind}:{step.name}"


def step_severity(step: StepConfig) -> str:
    """A step that is not required cannot stop a failover: its target is a warning."""
    return ERROR if step.required else WARNING


def configured_steps(config: Config) -> list[tuple[str, StepConfig]]:
    f = config.failover
    return [
        *(("step", s) for s in f.steps),
        *(("fence_step", s) for s in f.fence_steps),
        *(("rejoin_step", s) for s in f.rejoin_steps),
    ]


def settings_check_name(node: str) -> str:
    return f"settings:{node}"


def settings_check(node: str, advice: Sequence[str] | None, error: str | None = None) -> Check:
    """The engine's advice about ``node``'s settings (each line names the setting)."""
    name = settings_check_name(node)
    if error is not None:
        return Check(name, False, f"cannot read the settings of {node}: {error}", WARNING)
    if advice:
        return Check(name, False, "; ".join(advice), WARNING)
    return Check(name, True, "no setting slows detection", WARNING)


def maintenance_check(
    node: NodeConfig, status: int | None, body: str | None, error: str | None = None
) -> Check:
    """Whether the standby ``node``'s app is in maintenance, as its ``maintenance`` page
    said (``status`` and the start of ``body``; ``error``: it gave no answer). A
    warning: a failover works either way, but an app out of maintenance beside a
    read-only standby is serving users it cannot serve, and the runbook's step that
    takes it out of maintenance would not be what brings it up."""
    assert node.app is not None and node.app.maintenance is not None
    m = node.app.maintenance
    page = _shown_url(m.url)
    if error is not None:
        return Check(STANDBY_MAINTENANCE, False, f"{page} does not answer: {error}", WARNING)
    # Any status: a maintenance page is often served as 503.
    if body is not None and m.contains in body:
        return Check(STANDBY_MAINTENANCE, True, f"{node.name}'s app is in maintenance", WARNING)
    return Check(
        STANDBY_MAINTENANCE,
        False,
        f"{node.name}'s app is not in maintenance: {page} answered {status} without "
        f"{m.contains!r} (the failover runbook expects to take it out of maintenance)",
        WARNING,
    )


def _shown_url(url: str) -> str:
    """``url`` without userinfo or query (either may carry a credential)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    with contextlib.suppress(ValueError):  # a port that is not one: left out
        if parts.port is not None:
            netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def pending(config: Config) -> list[Check]:
    """The expensive checks before their first run: unknown is not ready."""
    checks = [
        Check(step_check_name(kind, s), False, NOT_CHECKED, step_severity(s))
        for kind, s in configured_steps(config)
    ]
    checks += [Check(settings_check_name(n.name), True, NOT_CHECKED, WARNING) for n in config.nodes]
    if any(n.app is not None and n.app.maintenance is not None for n in config.nodes):
        checks.append(Check(STANDBY_MAINTENANCE, True, NOT_CHECKED, WARNING))
    return checks


def summary(checks: Iterable[Check]) -> str:
    """One line for a log or a terminal: what is wrong, or that nothing is."""
    failed = [c for c in checks if not c.ok and c.severity == ERROR]
    if not failed:
        return "ready"
    return "not ready: " + ", ".join(c.name for c in failed)
