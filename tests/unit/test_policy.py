"""The state machine: every transition, with the journal state as its only memory."""

from __future__ import annotations

import pytest

from watchdogd.core.model import FailoverConfig, StepConfig
from watchdogd.detector import DOWN, HEALTHY, STALE, SUSPECT, Verdict
from watchdogd.policy import (
    BLOCKED,
    FAILED,
    FAILED_OVER,
    FAILING_OVER,
    PAUSED,
    WATCHING,
    Policy,
    StandbyFacts,
    State,
    build_plan,
)
from watchdogd.state.journal import JournalState, apply

GOOD = StandbyFacts(reachable=True, is_standby=True, lag_bytes=0, lag_seconds=0.0)
DOWN_DB = Verdict(DOWN, "primary database down", outage_seconds=6, trigger="database")
DOWN_APP = Verdict(DOWN, "primary application down", outage_seconds=6, trigger="app")
OK = Verdict(HEALTHY, "primary healthy")
SUS = Verdict(SUSPECT, "failing for 2s", outage_seconds=2, trigger="database")
STEPS = (
    StepConfig(name="maint_on", action="http"),
    StepConfig(name="stop", action="stop_replication"),
    StepConfig(name="promote", action="promote"),
    StepConfig(name="traffic", action="command"),
)


def make(**kw: object) -> tuple[Policy, JournalState]:
    cfg = FailoverConfig(steps=STEPS, max_lag=1000, cooldown=3600, **kw)  # type: ignore[arg-type]
    state = JournalState()
    return Policy(cfg, state), state


def started(
    state: JournalState, id: str = "f1", trigger: str = "automatic", at: float = 100.0, **kw: object
) -> None:
    apply(
        state,
        {
            "type": "failover_started",
            "id": id,
            "trigger": trigger,
            "reason": "r",
            "from": "main",
            "to": "failover",
            "steps": ["stop", "promote"],
            "at": at,
            **kw,
        },
    )


def finished(state: JournalState, outcome: str, id: str = "f1", at: float = 105.0) -> None:
    apply(state, {"type": "failover_finished", "id": id, "outcome": outcome, "at": at})


def test_watching_suspect_and_down_starts_failover() -> None:
    p, _ = make()
    assert p.evaluate(OK, GOOD, 0).state == WATCHING
    assert p.evaluate(SUS, GOOD, 0).state == State.SUSPECT
    d = p.evaluate(DOWN_DB, GOOD, 0)
    assert d.state == FAILING_OVER and d.start == "failover"


def test_app_trigger_starts_switchover() -> None:
    p, _ = make()
    assert p.evaluate(DOWN_APP, GOOD, 0).start == "switchover"


def test_stale_verdict_keeps_state_and_never_acts() -> None:
    p, _ = make()
    p.evaluate(SUS, GOOD, 0)
    d = p.evaluate(Verdict(STALE, "stalled"), GOOD, 1)
    assert d.state == State.SUSPECT and d.start is None


def test_manual_mode_never_acts() -> None:
    p, _ = make(mode="manual")
    d = p.evaluate(DOWN_DB, GOOD, 0)
    assert d.start is None and d.state == State.SUSPECT and "manual" in d.reason
    assert not p.armed(0)


def test_paused_never_acts_and_survives_as_state() -> None:
    p, state = make()
    apply(state, {"type": "pause", "reason": "maintenance window", "at": 1})
    d = p.evaluate(DOWN_DB, GOOD, 0)
    assert d.state == PAUSED and d.start is None and "maintenance window" in d.reason
    apply(state, {"type": "resume", "at": 2})
    assert p.evaluate(DOWN_DB, GOOD, 0).start == "failover"


@pytest.mark.parametrize(
    ("facts", "words"),
    [
        (StandbyFacts(False, False, None, None, "refused"), "unreachable"),
        (StandbyFacts(True, False, 0, 0.0, "primary"), "not replicating"),
        (StandbyFacts(True, True, None, None), "lag unknown"),
        (StandbyFacts(True, True, 5000, 0.0), "max_lag"),
    ],
)
def test_guards_block(facts: StandbyFacts, words: str) -> None:
    p, _ = make()
    d = p.evaluate(DOWN_DB, facts, 0)
    assert d.state == BLOCKED and d.start is None and words in d.reason


def test_lag_seconds_guard() -> None:
    p, _ = make(max_lag_seconds=5.0)
    d = p.evaluate(DOWN_DB, StandbyFacts(True, True, 0, 9.0), 0)
    assert d.state == BLOCKED and "max_lag_seconds" in d.reason


def test_blocked_clears_when_primary_recovers() -> None:
    p, _ = make()
    assert p.evaluate(DOWN_DB, StandbyFacts(True, True, 5000, 0.0), 0).state == BLOCKED
    assert p.evaluate(OK, GOOD, 1).state == WATCHING


def test_running_then_failed_over_needs_ack() -> None:
    p, state = make()
    started(state)
    assert p.evaluate(DOWN_DB, GOOD, 101).state == FAILING_OVER
    assert p.evaluate(DOWN_DB, GOOD, 101).start is None
    finished(state, "completed")
    d = p.evaluate(DOWN_DB, GOOD, 200)
    assert d.state == FAILED_OVER and d.start is None and not p.armed(200)
    assert p.ack_roles() == ("failover", "main")
    apply(state, {"type": "ack", "id": "f1", "primary": "failover", "standby": "main", "at": 300})
    # acked, but the cooldown (1 h from t=100) still holds
    d = p.evaluate(DOWN_DB, GOOD, 400)
    assert d.state == BLOCKED and "cooldown" in d.reason
    assert p.evaluate(DOWN_DB, GOOD, 100 + 3600 + 1).start == "failover"


def test_failed_failover_is_failed_until_ack_and_keeps_roles_without_promotion() -> None:
    p, state = make()
    started(state)
    apply(
        state,
        {
            "type": "step_finished",
            "id": "f1",
            "step": "stop",
            "action": "stop_replication",
            "outcome": "failed",
            "error": "boom",
            "at": 101,
        },
    )
    finished(state, "failed")
    assert p.evaluate(OK, GOOD, 200).state == FAILED
    assert p.ack_roles() == ("main", "failover")


def test_failed_after_promotion_swaps_roles_on_ack() -> None:
    p, state = make()
    started(state)
    apply(
        state,
        {
            "type": "step_finished",
            "id": "f1",
            "step": "promote",
            "action": "promote",
            "outcome": "ok",
            "at": 101,
        },
    )
    finished(state, "failed")
    assert p.ack_roles() == ("failover", "main")


def test_nothing_to_ack() -> None:
    p, _ = make()
    with pytest.raises(ValueError, match="nothing to acknowledge"):
        p.ack_roles()


def test_cancelled_pending_failover_does_not_start_cooldown() -> None:
    p, state = make()
    started(state, pending=True)
    finished(state, "aborted")
    assert state.last_automatic_at is None
    assert p.evaluate(OK, GOOD, 200).state == FAILED
    apply(state, {"type": "ack", "id": "f1", "primary": "main", "standby": "failover", "at": 201})
    assert p.evaluate(DOWN_DB, GOOD, 202).start == "failover"


def test_manual_failover_refusals() -> None:
    p, state = make()
    assert "healthy" in (p.refuse_manual_failover(OK, GOOD, force=False) or "")
    assert p.refuse_manual_failover(OK, GOOD, force=True) is None
    lagging = StandbyFacts(True, True, 5000, 0.0)
    assert "--force" in (p.refuse_manual_failover(DOWN_DB, lagging, force=False) or "")
    assert p.refuse_manual_failover(DOWN_DB, lagging, force=True) is None
    started(state)
    assert "in progress" in (p.refuse_manual_failover(DOWN_DB, GOOD, force=True) or "")
    finished(state, "completed")
    assert "ack" in (p.refuse_manual_failover(DOWN_DB, GOOD, force=True) or "")


def test_switchover_refusals() -> None:
    p, _ = make()
    assert p.refuse_switchover(True, GOOD) is None
    assert "use failover" in (p.refuse_switchover(False, GOOD) or "")
    assert "unreachable" in (
        p.refuse_switchover(True, StandbyFacts(False, False, None, None)) or ""
    )


def test_pending_outage() -> None:
    p, _ = make()
    assert p.pending_outage(SUS) and p.pending_outage(DOWN_DB) and not p.pending_outage(OK)


def test_switchover_plan_fences_and_waits_before_database_steps() -> None:
    cfg = FailoverConfig(steps=STEPS, catchup_timeout=12.0)
    plan = build_plan(
        cfg,
        id="x",
        kind="switchover",
        trigger="switchover",
        reason="r",
        from_node="main",
        to_node="failover",
    )
    assert [s.name for s in plan.steps] == [
        "maint_on",
        "fence_old_primary",
        "wait_for_catch_up",
        "stop",
        "promote",
        "traffic",
    ]
    assert plan.steps[2].timeout == 12.0
    plain = build_plan(
        cfg,
        id="x",
        kind="failover",
        trigger="automatic",
        reason="r",
        from_node="main",
        to_node="failover",
    )
    assert plain.steps == STEPS
