"""The decisions the daemon used to make inline, now pure functions of ``policy``: roles
from the journal, lag arithmetic, what a verdict is news for, split-brain attribution,
resume, abort, ack, liveness and reload. No daemon, no sockets, no clock."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.unit.builders import PRIMARY_UP, obs, standby_status
from watchdogd import config, policy
from watchdogd.core.model import ProbeConfig, StepConfig
from watchdogd.detector import DOWN, HEALTHY, STALE, SUSPECT, Verdict
from watchdogd.engines import DbStatus
from watchdogd.policy import (
    UNEXPLAINED,
    Decision,
    Plan,
    StandbyFacts,
    State,
)
from watchdogd.state.journal import FailoverRecord, JournalState, apply

NAMES = ("main", "failover")


def started(state: JournalState, id: str = "f1", at: float = 100.0) -> None:
    apply(
        state,
        {
            "type": "failover_started",
            "id": id,
            "trigger": "automatic",
            "reason": "r",
            "from": "main",
            "to": "failover",
            "steps": ["stop", "promote"],
            "at": at,
        },
    )


def step(state: JournalState, name: str, outcome: str, id: str = "f1") -> None:
    apply(state, {"type": "step_started", "id": id, "step": name, "action": name, "at": 101})
    apply(
        state,
        {
            "type": "step_finished",
            "id": id,
            "step": name,
            "action": name,
            "outcome": outcome,
            "at": 102,
        },
    )


def finished(state: JournalState, outcome: str, id: str = "f1") -> None:
    apply(state, {"type": "failover_finished", "id": id, "outcome": outcome, "at": 105})


def acked(state: JournalState, primary: str, standby: str, id: str = "f1") -> None:
    apply(state, {"type": "ack", "id": id, "primary": primary, "standby": standby, "at": 110})


# ---------------------------------------------------------------------- roles


def test_roles_are_the_configs_until_a_failover_promotes_the_standby() -> None:
    s = JournalState()
    assert policy.base_roles(s, NAMES, NAMES) == NAMES
    assert policy.current_roles(s, NAMES) == NAMES
    started(s)
    assert policy.current_roles(s, NAMES) == NAMES  # nothing promoted yet
    step(s, "promote", "ok")
    # Promoted, still running: the standby is the primary now, before any ack.
    assert policy.current_roles(s, NAMES) == ("failover", "main")
    finished(s, "completed")
    assert policy.current_roles(s, NAMES) == ("failover", "main")
    assert policy.base_roles(s, NAMES, NAMES) == NAMES  # not acked yet
    acked(s, "failover", "main")
    base = policy.base_roles(s, NAMES, NAMES)
    assert base == ("failover", "main")
    assert policy.current_roles(s, base) == ("failover", "main")


def test_a_failed_failover_without_promotion_keeps_the_roles() -> None:
    s = JournalState()
    started(s)
    step(s, "stop", "ok")
    finished(s, "failed")
    assert s.awaiting_ack is not None
    assert policy.current_roles(s, NAMES) == NAMES


def test_journal_roles_naming_unknown_nodes_are_stale_and_ignored() -> None:
    s = JournalState(primary="old-a", standby="old-b")
    assert policy.journal_roles_stale(s, NAMES)
    assert policy.base_roles(s, NAMES, NAMES) == NAMES
    s = JournalState(primary="failover", standby="main")
    assert not policy.journal_roles_stale(s, NAMES)
    assert policy.base_roles(s, NAMES, NAMES) == ("failover", "main")
    assert not policy.journal_roles_stale(JournalState(), NAMES)


# ---------------------------------------------------------------------- lag


def test_lag_is_measured_against_the_last_primary_position_even_when_it_is_gone() -> None:
    sdb = obs("failover", True, 1.0, db=standby_status(receive=900, replay=700))
    view = policy.observe_lag(obs("main", True, 1.0, db=PRIMARY_UP), sdb, None)
    assert view.last_primary_pos == 1000 and view.lag_bytes == 300  # replay lag
    assert view.lag_seconds == 0.0 and view.streaming is True and view.writable == 1
    # The primary is gone: its last position stays the reference.
    gone = policy.observe_lag(obs("main", False, 2.0), sdb, view.last_primary_pos)
    assert gone.last_primary_pos == 1000 and gone.lag_bytes == 300 and gone.writable == 0
    # Never negative (a standby that got ahead of an old sample).
    ahead = obs("failover", True, 1.0, db=standby_status(receive=1500, replay=1200))
    assert policy.observe_lag(obs("main", False, 2.0), ahead, 1000).lag_bytes == 0


def test_lag_is_unknown_without_a_reference_or_a_standby() -> None:
    sdb = obs("failover", True, 1.0, db=standby_status())
    view = policy.observe_lag(obs("main", False, 1.0), sdb, None)
    assert view.last_primary_pos is None and view.lag_bytes is None
    down = policy.observe_lag(
        obs("main", True, 1.0, db=PRIMARY_UP), obs("failover", False, 1), None
    )
    assert down.lag_bytes is None and down.lag_seconds is None and down.streaming is None


def test_two_writable_nodes_are_counted_and_a_promoted_standby_has_no_replication() -> None:
    promoted = obs("failover", True, 1.0, db=PRIMARY_UP)
    view = policy.observe_lag(obs("main", True, 1.0, db=PRIMARY_UP), promoted, None)
    assert view.writable == 2 and view.lag_bytes is None and view.streaming is None
    read_only = DbStatus(is_primary=True, writable=False, current_pos=5, detail="fenced")
    view = policy.observe_lag(obs("main", True, 1.0, db=read_only), promoted, None)
    assert view.writable == 1 and view.last_primary_pos == 5


def test_the_lag_guard_counts_what_the_standby_received_not_replayed() -> None:
    sdb = obs("failover", True, 1.0, db=standby_status(receive=900, replay=700))
    facts = policy.standby_facts(sdb, 1000)
    assert facts == StandbyFacts(True, True, 100, 0.0, "standby")
    assert policy.standby_facts(sdb, None).lag_bytes is None  # primary position never seen
    assert policy.standby_facts(sdb, 800).lag_bytes == 0
    assert policy.standby_facts(None, 1000) == StandbyFacts(
        False, False, None, None, "not probed yet"
    )
    unreachable = policy.standby_facts(obs("failover", False, 1.0), 1000)
    assert not unreachable.reachable and unreachable.detail == "connection refused"
    promoted = policy.standby_facts(obs("failover", True, 1.0, db=PRIMARY_UP), 1000)
    assert promoted.reachable and not promoted.is_standby


# ---------------------------------------------------------------------- news


def v(status: str, **kw: object) -> Verdict:
    return Verdict(status, f"primary {status}", **kw)  # type: ignore[arg-type]


def test_a_verdict_is_news_once() -> None:
    news = policy.verdict_news
    assert news(None, v(HEALTHY), None, "main") == ([], None)
    assert news(v(HEALTHY), v(SUSPECT), None, "main") == ([], None)
    assert news(v(SUSPECT), v(DOWN), None, "main") == (["primary_down"], None)
    assert news(v(DOWN), v(DOWN), None, "main") == ([], None)  # still down: not news
    assert news(v(DOWN), v(HEALTHY, recovered=True), None, "main") == (
        ["primary_recovered"],
        None,
    )
    assert news(v(HEALTHY), v(STALE), None, "main") == (["stall_detected"], None)
    assert news(None, v(DOWN), None, "main") == (["primary_down"], None)


def test_an_outage_announced_before_a_restart_is_still_down_not_down_again() -> None:
    news = policy.verdict_news
    assert news(v(SUSPECT), v(DOWN), "main", "main") == (["primary_still_down"], "main")
    # About another primary (roles swapped since): news.
    assert news(v(SUSPECT), v(DOWN), "main", "failover") == (["primary_down"], "main")
    # Healthy or recovered: a later outage is a new episode.
    assert news(v(DOWN), v(HEALTHY), "main", "main") == ([], None)
    assert news(v(DOWN), v(SUSPECT, recovered=True), "main", "main") == (
        ["primary_recovered"],
        None,
    )
    # Suspect is not healthy: the announced outage may go on.
    assert news(v(SUSPECT), v(SUSPECT), "main", "main") == ([], "main")


def test_a_partition_is_news_when_it_starts() -> None:
    news = policy.verdict_news
    assert news(v(SUSPECT), v(DOWN, partition=True), None, "main") == (
        ["primary_down", "partition_suspected"],
        None,
    )
    assert news(v(DOWN, partition=True), v(DOWN, partition=True), None, "main") == ([], None)
    assert news(None, v(SUSPECT, partition=True), None, "main") == (["partition_suspected"], None)


def test_a_decision_is_news_when_its_state_changes() -> None:
    a = Decision(State.WATCHING, "primary healthy")
    assert policy.state_changed(None, a)
    assert not policy.state_changed(a, a)
    assert not policy.state_changed(a, Decision(State.WATCHING, "other words"))
    assert policy.state_changed(a, Decision(State.SUSPECT, "primary healthy"))


def test_a_restart_recalls_the_outage_of_an_unfinished_or_unacked_unpromoted_failover() -> None:
    s = JournalState()
    assert policy.recalled_outage(s) is None
    started(s)
    assert policy.recalled_outage(s) == "main"  # unfinished
    step(s, "promote", "ok")
    assert policy.recalled_outage(s) is None  # promoted: the roles moved on
    s = JournalState()
    started(s)
    finished(s, "failed")
    assert policy.recalled_outage(s) == "main"  # unacked, not promoted
    acked(s, "main", "failover")
    assert policy.recalled_outage(s) is None


# ---------------------------------------------------------------------- split brain


def completed() -> JournalState:
    s = JournalState()
    started(s)
    step(s, "promote", "ok")
    finished(s, "completed")
    return s


def test_no_split_brain_with_one_writer_and_the_episode_is_forgotten() -> None:
    s = completed()
    for writable in (0, 1):
        judged = policy.judge_split_brain(writable, s.last, "f1")
        assert judged == policy.SplitBrain(False)
        assert judged.key is None and not judged.news and judged.failover is None


def test_our_failovers_old_primary_back_writable_is_fenced_once() -> None:
    s = completed()
    first = policy.judge_split_brain(2, s.last, None)
    assert first.split and first.news and first.key == "f1"
    assert first.failover is s.last
    again = policy.judge_split_brain(2, s.last, first.key)
    assert again.split and not again.news and again.key == "f1"


def test_a_failover_that_promoted_then_failed_explains_it_too() -> None:
    s = JournalState()
    started(s)
    step(s, "promote", "ok")
    finished(s, "failed")
    judged = policy.judge_split_brain(2, s.last, None)
    assert judged.failover is s.last and judged.key == "f1"


@pytest.mark.parametrize("case", ["none", "acked", "not_promoted"])
def test_an_unexplained_split_brain_fences_neither(case: str) -> None:
    s = JournalState()
    if case != "none":
        started(s)
        step(s, "stop", "ok")
        if case == "acked":
            step(s, "promote", "ok")
            finished(s, "completed")
            acked(s, "failover", "main")
        else:
            finished(s, "failed")
    judged = policy.judge_split_brain(2, s.last, None)
    assert judged.split and judged.news and judged.key == UNEXPLAINED
    assert judged.failover is None
    assert not policy.judge_split_brain(2, s.last, UNEXPLAINED).news


# ---------------------------------------------------------------------- sequences


def plan(steps: tuple[str, ...] = ("stop", "promote"), from_node: str = "main") -> Plan:
    return Plan(
        id="f1",
        kind="failover",
        trigger="automatic",
        reason="r",
        from_node=from_node,
        to_node="failover",
        steps=tuple(StepConfig(name=n, action=n) for n in steps),
    )


def test_resume_only_under_the_same_steps_and_roles() -> None:
    s = JournalState()
    started(s)
    fo = s.unfinished
    assert fo is not None
    assert policy.can_resume(plan(), fo)
    assert not policy.can_resume(plan(("stop", "promote", "traffic")), fo)
    assert not policy.can_resume(plan(("promote", "stop")), fo)
    assert not policy.can_resume(plan(from_node="failover"), fo)


def test_abort_targets_the_running_sequence_else_a_pending_outage_else_nothing() -> None:
    assert policy.abort_target(True, False) == "running"
    assert policy.abort_target(True, True) == "running"
    assert policy.abort_target(False, True) == "pending"
    assert policy.abort_target(False, False) == "nothing"


def test_an_ack_keeps_the_lag_reference_only_for_a_primary_that_stays_primary() -> None:
    fo = FailoverRecord(
        id="f1", trigger="automatic", reason="r", from_node="main", to_node="failover", started_at=1
    )
    assert policy.kept_primary_pos("main", fo, 1234) == 1234
    assert policy.kept_primary_pos("failover", fo, 1234) is None
    assert policy.kept_primary_pos("main", fo, None) is None


# ---------------------------------------------------------------------- liveness


def test_stall_limit_is_three_intervals_or_the_probe_timeout_plus_slack() -> None:
    assert policy.stall_limit(ProbeConfig(interval=1.0, timeout=0.5)) == 5.5
    assert policy.stall_limit(ProbeConfig(interval=10.0, timeout=2.0)) == 30.0


def test_health_and_the_probe_loop() -> None:
    assert policy.health(None, None, 100.0, 5.0, "watching") == (
        False,
        "no probe cycle completed yet",
    )
    assert policy.health(None, 98.0, 100.0, 5.0, "watching") == (
        True,
        "watching; last cycle 2.0s ago",
    )
    assert policy.health(None, 90.0, 100.0, 5.0, "watching") == (
        False,
        "probe loop stalled: last cycle 10.0s ago",
    )
    assert policy.health("disk full", 99.0, 100.0, 5.0, "watching") == (
        False,
        "journal cannot be written: disk full",
    )
    assert policy.probe_loop_alive(96.0, 100.0, 5.0)
    assert not policy.probe_loop_alive(94.0, 100.0, 5.0)
    assert not policy.probe_loop_alive(None, 100.0, 5.0)


def test_reload_names_the_sections_that_need_a_restart() -> None:
    raw = {
        "cluster": "orders",
        "primary": {"name": "main", "database": {"engine": "postgres", "dsn": "postgresql://h/x"}},
        "standby": {
            "name": "failover",
            "database": {"engine": "postgres", "dsn": "postgresql://g/x"},
        },
        "failover": {"steps": [{"name": "promote_standby", "action": "promote"}]},
        "state_dir": "/var/lib/watchdogd",
    }
    old = config.parse(raw)
    assert policy.restart_needed_for(old, old) == []
    new = replace(old, state_dir="/srv/watchdogd", probe=replace(old.probe, interval=9.0))
    assert policy.restart_needed_for(old, new) == ["state_dir"]
    new = replace(new, control=replace(old.control, socket="/run/x.sock"))
    assert policy.restart_needed_for(old, new) == ["control", "state_dir"]
