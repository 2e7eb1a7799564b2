"""Readiness without servers: the pure checks and their aggregation, the metric, and how
watchdogctl shows what is wrong."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.unit.builders import PRIMARY_UP, obs, standby_status
from tests.unit.test_commands import Rig
from watchdogd import readiness
from watchdogd.core.model import (
    AppConfig,
    Config,
    DatabaseConfig,
    FailoverConfig,
    NodeConfig,
    StepConfig,
)
from watchdogd.ctl import render_status
from watchdogd.metrics import Metrics
from watchdogd.policy import Policy, standby_facts
from watchdogd.readiness import ERROR, WARNING, Check, Readiness
from watchdogd.state.journal import JournalState, apply

DB = DatabaseConfig(engine="postgres", dsn="x")
APP = AppConfig(health_url="http://127.0.0.1:1/health")
STANDBY = NodeConfig(name="failover", database=DB, app=APP)
NO_APP = NodeConfig(name="failover", database=DB)
NOW = 10_000.0


def policy(**kw: Any) -> tuple[Policy, JournalState]:
    state = JournalState()
    cfg = FailoverConfig(max_lag=1000, cooldown=600, **kw)
    return Policy(cfg, state), state


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def evaluate(
    pol: Policy,
    standby_db: Any = "streaming",
    app_ok: bool | None = True,
    primary_pos: int | None = 1000,
    node: NodeConfig = STANDBY,
) -> dict[str, Check]:
    if standby_db == "streaming":
        standby_db = obs("failover", True, NOW, db=standby_status())
    app = None if app_ok is None else obs("failover", app_ok, NOW, probe="app")
    return by_name(readiness.cycle_checks(pol, node, standby_db, app, primary_pos, NOW))


# --------------------------------------------------------------------------- aggregation


def test_ready_only_when_every_error_check_passes_and_warnings_never_count() -> None:
    good = Check("replication", True, "streaming")
    slow = Check("settings:failover", False, "wal_receiver_timeout is 60s", WARNING)
    bad = Check("step:dns", False, "refused")
    assert Readiness((good, slow), 1.0).ready
    assert not Readiness((good, slow, bad), 1.0).ready
    assert Readiness((good, slow, bad), 1.0).problems == [bad, slow]
    assert Readiness((), 1.0).ready  # nothing failing


def test_the_status_shape_is_the_contract_the_page_renders() -> None:
    r = readiness.combine([Check("lag", False, "too far")], [Check("s", True, "x", WARNING)], 5.0)
    assert r.as_dict() == {
        "ready": False,
        "checks": [
            {"name": "lag", "ok": False, "detail": "too far", "severity": "error"},
            {"name": "s", "ok": True, "detail": "x", "severity": "warning"},
        ],
        "checked_at": 5.0,
    }


def test_pending_expensive_checks_are_not_ready_and_named_per_step() -> None:
    steps = (
        StepConfig(name="maint", action="http", required=False),
        StepConfig(name="promote", action="promote"),
    )
    cfg = Config(
        cluster="c",
        primary=NodeConfig(name="main", database=DB),
        standby=NO_APP,
        failover=FailoverConfig(steps=steps, fence_steps=(StepConfig("f", "fence"),)),
    )
    pending = by_name(readiness.pending(cfg))
    assert list(pending) == [
        "step:maint",
        "step:promote",
        "fence_step:f",
        "settings:main",
        "settings:failover",
    ]
    assert pending["step:maint"].severity == WARNING  # not required: cannot stop a failover
    assert pending["step:promote"].severity == ERROR
    assert not readiness.combine([], list(pending.values()), 0.0).ready


# --------------------------------------------------------------------------- cycle checks


def test_a_streaming_standby_within_the_guard_and_an_armed_daemon_are_ready() -> None:
    pol, _ = policy()
    checks = evaluate(pol)
    assert list(checks) == ["standby_database", "replication", "lag", "standby_app", "armed"]
    assert all(c.ok for c in checks.values()), checks
    assert checks["lag"].detail == "0 B behind (max_lag 1.0 kB)"


def test_no_standby_app_check_when_the_standby_has_no_app() -> None:
    pol, _ = policy()
    assert "standby_app" not in evaluate(pol, node=NO_APP, app_ok=None)
    assert evaluate(pol, app_ok=None)["standby_app"].detail == readiness.NOT_CHECKED


def test_an_unreachable_standby_fails_every_database_check() -> None:
    pol, _ = policy()
    checks = evaluate(pol, standby_db=obs("failover", False, NOW))
    assert not checks["standby_database"].ok
    assert "does not answer: connection refused" in checks["standby_database"].detail
    assert not checks["replication"].ok and not checks["lag"].ok
    assert checks["armed"].ok  # the daemon is armed; the standby is what is wrong


def test_a_standby_that_is_a_primary_is_not_ready() -> None:
    pol, _ = policy()
    checks = evaluate(pol, standby_db=obs("failover", True, NOW, db=PRIMARY_UP))
    assert not checks["standby_database"].ok and "is not a standby" in (
        checks["standby_database"].detail
    )
    assert not checks["replication"].ok


def test_stopped_replication_fails_only_the_replication_check() -> None:
    pol, _ = policy()
    checks = evaluate(pol, standby_db=obs("failover", True, NOW, db=standby_status(False)))
    assert not checks["replication"].ok
    assert checks["replication"].detail.startswith("not streaming")
    assert checks["standby_database"].ok and checks["lag"].ok


def test_the_lag_check_is_the_lag_guard() -> None:
    pol, _ = policy(max_lag_seconds=5.0)
    behind = obs("failover", True, NOW, db=standby_status(receive=500, replay=500))
    checks = evaluate(pol, standby_db=behind, primary_pos=5000)
    assert not checks["lag"].ok
    refused = pol.refuse(standby_facts(behind, 5000))  # the same facts the guard sees
    assert refused is not None and "max_lag 1.0 kB" in refused
    assert checks["lag"].detail == refused
    # the primary's position never seen: the guard refuses, and so does readiness
    unknown = evaluate(pol, primary_pos=None)["lag"]
    assert not unknown.ok and "lag unknown" in unknown.detail
    assert evaluate(pol, standby_db=behind, primary_pos=1400)["lag"].ok  # 900 B behind


def test_the_standby_app_check_follows_its_probe() -> None:
    pol, _ = policy()
    checks = evaluate(pol, app_ok=False)
    assert not checks["standby_app"].ok
    assert checks["standby_app"].detail == "health check: connection refused"


def paused(state: JournalState) -> None:
    state.paused, state.pause_reason = True, "db work"


def in_cooldown(state: JournalState) -> None:
    state.last_automatic_at = NOW - 60


def awaiting_ack(state: JournalState) -> None:
    started: dict[str, Any] = {"type": "failover_started", "id": "f1", "trigger": "manual"}
    started |= {"reason": "r", "from": "main", "to": "failover", "steps": ["promote"]}
    started["at"] = NOW - 5
    apply(state, started)
    apply(state, {"type": "failover_finished", "id": "f1", "outcome": "completed", "at": NOW})


@pytest.mark.parametrize(
    ("arrange", "words"),
    [
        (paused, "paused by an operator (db work)"),
        (in_cooldown, "cooldown: 540s left"),
        (awaiting_ack, "the last failover awaits an ack (watchdogctl ack)"),
    ],
)
def test_armed_is_the_policys_and_names_what_disarms_it(arrange: Any, words: str) -> None:
    pol, state = policy()
    arrange(state)
    check = evaluate(pol)["armed"]
    assert pol.armed(NOW) is False and check.ok is False
    assert words in check.detail, check.detail


def test_manual_mode_is_not_armed() -> None:
    pol, _ = policy(mode="manual")
    check = evaluate(pol)["armed"]
    assert not check.ok and "mode is manual" in check.detail


def test_settings_advice_is_a_warning_naming_the_setting() -> None:
    line = "wal_receiver_timeout is 60s on this standby: ..."
    check = readiness.settings_check("failover", [line])
    assert (check.ok, check.severity, check.detail) == (False, WARNING, line)
    assert readiness.settings_check("failover", []).ok
    failed = readiness.settings_check("failover", None, "connection refused")
    assert not failed.ok and "cannot read the settings of failover" in failed.detail


# --------------------------------------------------------------------------- shown


def test_metrics_follow_the_checks_and_forget_removed_ones() -> None:
    m = Metrics("c", process_metrics=False)
    ready = m.registry.get_sample_value
    assert ready("watchdogd_failover_ready", {"cluster": "c"}) == 0.0  # unknown yet
    m.set_readiness(False, {"replication": False, "step:dns": True})
    assert ready("watchdogd_failover_ready", {"cluster": "c"}) == 0.0
    labels = {"cluster": "c", "check": "replication"}
    assert ready("watchdogd_readiness_check_ok", labels) == 0.0
    m.set_readiness(True, {"replication": True})
    assert ready("watchdogd_failover_ready", {"cluster": "c"}) == 1.0
    assert ready("watchdogd_readiness_check_ok", labels) == 1.0
    gone = {"cluster": "c", "check": "step:dns"}
    assert ready("watchdogd_readiness_check_ok", gone) is None


def test_watchdogctl_status_lists_what_is_wrong_errors_first() -> None:
    r = Readiness(
        (
            Check("settings:failover", False, "wal_receiver_timeout is 60s", WARNING),
            Check("replication", False, "not streaming from the primary (no receiver)"),
            Check("lag", True, "0 B behind"),
        ),
        1.0,
    )
    text = render_status({"cluster": "c", "state": "watching", "readiness": r.as_dict()})
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("ready"))
    assert lines[at].split(None, 1)[1] == "NO (1 failing)"
    assert lines[at + 1].strip() == "replication: not streaming from the primary (no receiver)"
    assert lines[at + 2].strip() == "warning: settings:failover: wal_receiver_timeout is 60s"
    assert "lag" not in text
    ok = Readiness((Check("settings:failover", False, "slow", WARNING),), 1.0).as_dict()
    shown = render_status({"cluster": "c", "state": "watching", "readiness": ok})
    rows = [line.strip() for line in shown.splitlines()]
    assert "ready    yes" in rows and "warning: settings:failover: slow" in rows


async def test_a_pause_disarms_readiness_at_once_and_resume_rearms_it(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    d = rig.d
    sample = d.metrics.registry.get_sample_value
    armed = {"cluster": "orders", "check": "armed"}
    try:
        await rig.cmd("pause", reason="db upgrade")
        shown = {c["name"]: c for c in (await rig.cmd("status"))["readiness"]["checks"]}
        assert shown["armed"] == {
            "name": "armed",
            "ok": False,
            "detail": "automatic failover is not armed: paused by an operator (db upgrade)",
            "severity": "error",
        }
        assert sample("watchdogd_readiness_check_ok", armed) == 0.0
        await rig.cmd("resume")
        assert sample("watchdogd_readiness_check_ok", armed) == 1.0
        # nothing probed yet, nothing checked yet: not ready, and it says why
        status = await rig.cmd("status")
        assert status["readiness"]["ready"] is False
        assert sample("watchdogd_failover_ready", {"cluster": "orders"}) == 0.0
        assert {c["name"]: c["detail"] for c in status["readiness"]["checks"]}[
            "step:promote_standby"
        ] == readiness.NOT_CHECKED
    finally:
        d.journal.close()


def test_watchdogctl_status_keeps_the_list_short() -> None:
    many = tuple(Check(f"step:s{i}", False, "refused") for i in range(9))
    shown = render_status({"cluster": "c", "readiness": Readiness(many, 1.0).as_dict()})
    rows = [line.strip() for line in shown.splitlines()]
    assert "ready    NO (9 failing)" in rows
    assert [r for r in rows if r.startswith("step:")] == [f"step:s{i}: refused" for i in range(6)]
    assert rows[-1] == "... and 3 more (--json shows all)"


def test_a_maintenance_page_counts_by_its_text_and_its_url_is_shown_without_credentials() -> None:
    from watchdogd.core.model import MaintenanceCheck

    page = MaintenanceCheck("https://ops:s3cret@10.0.1.5:8443/maint?token=abc", "Down for maint")
    node = NodeConfig(
        name="failover",
        database=DB,
        app=AppConfig(health_url="http://10.0.1.5/health", maintenance=page),
    )
    # A maintenance page served as 503 is still in maintenance.
    assert readiness.maintenance_check(node, 503, "<h1>Down for maintenance</h1>").ok
    out = readiness.maintenance_check(node, 200, "<h1>Welcome</h1>")
    assert not out.ok and out.severity == readiness.WARNING
    assert "https://10.0.1.5:8443/maint answered 200 without 'Down for maint'" in out.detail
    gone = readiness.maintenance_check(node, None, None, "connection refused")
    assert gone.detail == "https://10.0.1.5:8443/maint does not answer: connection refused"
    assert "s3cret" not in out.detail + gone.detail and "abc" not in out.detail + gone.detail
