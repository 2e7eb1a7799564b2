"""Rejoin (issue 16), daemon side: the pure rules (when a rejoin may run, what the
divergence report allows, auto_rejoin), the journal's rejoin record (replay, resume),
and the flow through a daemon built in-process whose engines are ``RejoinEngine``
stand-ins: report first, refused or journaled, steps, verification, then the ack's
effect (roles swapped, re-armed) or ``failed`` with nothing re-armed."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.fakes import RejoinEngine
from tests.unit.test_commands import ROOT, Log, raw_config
from watchdogd import config, ctl, policy, readiness
from watchdogd.control import CommandError
from watchdogd.core.model import FailoverConfig, StepConfig
from watchdogd.daemon import Daemon
from watchdogd.daemon.sequences import StoppingError
from watchdogd.detector import DOWN, HEALTHY, Verdict
from watchdogd.engines import Divergence, EngineError
from watchdogd.policy import FAILED, FAILED_OVER, WATCHING, Policy
from watchdogd.probes import Observation
from watchdogd.state import journal
from watchdogd.state.journal import JournalState, JournalWriteError, apply, replay

GTIDS = ("0-1-7", "0-1-8", "0-1-9")
DIVERGED = Divergence(known=True, lost=3, unit="transactions", items=GTIDS, detail="3 GTIDs")
ZERO = Divergence(known=True, lost=0, unit="bytes", detail="same position")
UNKNOWN = Divergence(known=False, lost=None, unit="bytes", detail="timeline history unreadable")


# --------------------------------------------------------------------------- journal lines


def failover_lines(outcome: str = "completed", promoted: bool = True) -> list[dict[str, Any]]:
    steps = ["stop_replication", "promote_standby"]
    lines = [
        journal.sequence_started(
            "failover", id="F1", trigger="automatic", kind="failover", reason="down",
            from_node="main", to_node="failover", steps=steps, at=1,
        )
    ]  # fmt: skip
    if promoted:
        for step, action in zip(steps, ("stop_replication", "promote"), strict=True):
            lines.append(
                journal.step_started("failover", id="F1", step=step, action=action, attempt=1, at=2)
            )
            lines.append(
                journal.step_finished(
                    "failover", id="F1", step=step, action=action, outcome="ok", at=3
                )
            )
    lines.append(journal.sequence_finished("failover", id="F1", outcome=outcome, error=None, at=4))
    return lines


def rejoin_started(id: str = "R1", **kw: Any) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "id": id, "trigger": "manual", "kind": "rejoin", "reason": "rejoin by root",
        "from_node": "main", "to_node": "failover", "steps": ["rejoin", "verify_rejoin"],
        "at": 10, "failover_id": "F1", "divergence": DIVERGED.as_dict(), "accepted": True,
    }  # fmt: skip
    return journal.sequence_started("rejoin", **{**facts, **kw})


def rejoin_step(
    step: str, action: str, outcome: str | None, id: str = "R1"
) -> list[dict[str, Any]]:
    lines = [journal.step_started("rejoin", id=id, step=step, action=action, attempt=1, at=11)]
    if outcome is not None:
        lines.append(
            journal.step_finished(
                "rejoin", id=id, step=step, action=action, outcome=outcome, at=12, detail="d"
            )
        )
    return lines


def as_lines(records: list[dict[str, Any]]) -> list[str]:
    """The journal's lines as ``Journal.read`` splits the file (a newline ends each)."""
    return b"".join(journal.encode_line(r) for r in records).decode().split("\n")


# --------------------------------------------------------------------------- policy


def fo_state(outcome: str = "completed", promoted: bool = True) -> JournalState:
    state = JournalState()
    for rec in failover_lines(outcome, promoted):
        apply(state, rec)
    return state


def test_a_rejoin_needs_a_failover_that_promoted_and_nothing_running() -> None:
    empty = JournalState()
    assert policy.refuse_rejoin(empty, False) == (
        "nothing to rejoin: no failover awaits an ack (the pair has its standby)"
    )
    state = JournalState()
    apply(state, failover_lines()[0])
    assert policy.refuse_rejoin(state, False) == "failover F1 is in progress"
    assert policy.refuse_rejoin(fo_state("failed", promoted=False), False) == (
        "failover F1 failed without promoting failover: main is still the primary; "
        "nothing to rejoin (ack it)"
    )
    assert policy.refuse_rejoin(fo_state(), False) is None
    # A failover that promoted and then failed a later step still left a primary behind.
    assert policy.refuse_rejoin(fo_state("failed", promoted=True), False) is None
    assert policy.refuse_rejoin(fo_state(), True) == "a rejoin is already starting"
    assert policy.refuse_rejoin(fo_state(), False, fencing=True) == (
        "the old primary is being fenced: rejoin once the fence is done"
    )
    state = fo_state()
    apply(state, rejoin_started())
    assert policy.refuse_rejoin(state, False) == "rejoin R1 of main is already running"
    apply(state, journal.ack(id="F1", primary="failover", standby="main", at=20))
    assert policy.refuse_rejoin(state, False) is not None


def test_no_manual_failover_or_switchover_while_a_rejoin_is_unfinished_or_running() -> None:
    from watchdogd.policy import StandbyFacts

    good = StandbyFacts(reachable=True, is_standby=True, lag_bytes=0, lag_seconds=0.0)
    down = Verdict(DOWN, "primary database down", outage_seconds=6, trigger="database")
    # F1 promoted, then failed a later step: --force used to let a failover through.
    state = fo_state("failed", promoted=True)
    p = Policy(FailoverConfig(), state)
    assert p.refuse_manual_failover(down, good, force=True) is None
    assert p.refuse_manual_failover(down, good, force=True, rejoining=True) == (
        "a rejoin is running or starting: let it finish first"
    )
    apply(state, rejoin_started())
    unfinished = "rejoin R1 of main is unfinished: let it finish first (watchdogctl status)"
    assert p.refuse_manual_failover(down, good, force=True) == unfinished
    assert p.refuse_manual_failover(down, good, force=False) == unfinished
    assert p.refuse_switchover(True, good) == unfinished
    assert p.refuse_switchover(True, good, rejoining=True) == unfinished


def test_the_divergence_report_decides_whether_a_rejoin_may_throw_writes_away() -> None:
    assert policy.refuse_divergence(ZERO, False, "main", "failover") is None
    refusal = policy.refuse_divergence(DIVERGED, False, "main", "failover")
    assert refusal == (
        "main holds 3 transactions (0-1-7, 0-1-8, 0-1-9) that failover never got, and a "
        "rejoin throws them away: rerun with --accept-divergence to accept that"
    )
    assert policy.refuse_divergence(DIVERGED, True, "main", "failover") is None
    unknown = policy.refuse_divergence(UNKNOWN, False, "main", "failover")
    assert unknown is not None and unknown.startswith(
        "divergence unknown (timeline history unreadable): nothing proves that main holds no "
        "writes failover lacks; rerun with --accept-divergence"
    )
    assert policy.refuse_divergence(UNKNOWN, True, "main", "failover") is None


def test_the_divergence_in_one_line() -> None:
    many = Divergence(True, 7, "transactions", tuple(f"0-1-{i}" for i in range(7)))
    assert policy.describe_divergence(many) == (
        "7 transactions (0-1-0, 0-1-1, 0-1-2, 0-1-3, 0-1-4, and 2 more)"
    )
    assert policy.describe_divergence(Divergence(True, 1536, "bytes")) == "1.5 kB (1536 bytes)"
    assert policy.describe_divergence(ZERO) == "0 bytes"
    assert policy.describe_divergence(UNKNOWN) == "unknown (timeline history unreadable)"
    assert policy.unknown_divergence("main: refused").diverged is None


def test_auto_rejoin_checks_each_failover_once_when_its_old_primary_answers() -> None:
    on, off = FailoverConfig(auto_rejoin=True), FailoverConfig()
    state = fo_state()
    both = frozenset({"main", "failover"})
    assert policy.auto_rejoin_due(off, state, both, False, None) is None
    assert policy.auto_rejoin_due(on, state, frozenset({"failover"}), False, None) is None
    fo = policy.auto_rejoin_due(on, state, both, False, None)
    assert fo is not None and fo.id == "F1"
    assert policy.auto_rejoin_due(on, state, both, False, "F1") is None  # checked already
    assert policy.auto_rejoin_due(on, state, both, True, None) is None  # one is running
    assert policy.auto_rejoin_due(on, state, both, False, None, fencing=True) is None
    failed = fo_state()
    apply(failed, rejoin_started())
    apply(failed, journal.sequence_finished("rejoin", id="R1", outcome="failed", error="x", at=9))
    assert policy.auto_rejoin_due(on, failed, both, False, None) is None  # an operator's now
    assert policy.auto_rejoin_starts(ZERO)
    assert not policy.auto_rejoin_starts(DIVERGED) and not policy.auto_rejoin_starts(UNKNOWN)


def test_the_state_while_a_rejoin_runs_fails_and_after_it_completed() -> None:
    state = fo_state()
    p = Policy(FailoverConfig(), state)
    ok = Verdict(HEALTHY, "primary healthy")
    facts = policy.StandbyFacts(True, True, 0, 0.0)
    assert p.evaluate(ok, facts, 100).state == FAILED_OVER
    apply(state, rejoin_started())
    running = p.evaluate(ok, facts, 100)
    assert running.state == FAILED_OVER
    assert running.reason.startswith("rejoining main as the standby of failover (rejoin R1)")
    assert not p.armed(100)
    with pytest.raises(ValueError, match="rejoin R1 of main is running"):
        p.ack_roles()
    apply(state, journal.sequence_finished("rejoin", id="R1", outcome="failed", error="e", at=11))
    failed = p.evaluate(ok, facts, 100)
    assert failed.state == FAILED and failed.reason.startswith("rejoin R1 of main failed: e;")
    assert not p.armed(100)
    # Retried and verified: the ack that follows re-arms.
    apply(state, rejoin_started("R2"))
    apply(
        state, journal.sequence_finished("rejoin", id="R2", outcome="completed", error=None, at=12)
    )
    assert p.ack_roles() == ("failover", "main")
    apply(state, journal.ack(id="F1", primary="failover", standby="main", at=13, rejoin_id="R2"))
    # (The failover started the cooldown at 1: armed once it is over.)
    assert p.evaluate(ok, facts, 100).state == WATCHING and p.armed(3601)


def test_the_rejoin_plan_ends_with_the_verification() -> None:
    cfg = FailoverConfig(
        rejoin_steps=(StepConfig(name="rewind", action="command"),), rejoin_timeout=42.0
    )
    fo = fo_state().awaiting_ack
    assert fo is not None
    plan = policy.build_rejoin_plan(cfg, id="R9", trigger="manual", reason="r", fo=fo)
    assert (plan.kind, plan.from_node, plan.to_node) == ("rejoin", "main", "failover")
    assert [(s.name, s.action) for s in plan.steps] == [
        ("rewind", "command"),
        ("verify_rejoin", "replica_of"),
    ]
    assert plan.steps[-1].timeout == 42.0 and plan.steps[-1].required


# --------------------------------------------------------------------------- journal


def test_a_journal_with_a_rejoin_replays_to_the_swapped_roles() -> None:
    records = [
        *failover_lines(),
        rejoin_started(),
        *rejoin_step("rejoin", "rejoin", "ok"),
        *rejoin_step("verify_rejoin", "replica_of", "ok"),
        journal.sequence_finished("rejoin", id="R1", outcome="completed", error=None, at=13),
        journal.ack(id="F1", primary="failover", standby="main", at=14, by="rejoin R1"),
    ]
    state = replay(as_lines(records))
    assert state.problems == [] and state.damaged == []
    assert [f.id for f in state.failovers] == ["F1"]  # a rejoin is not a failover
    assert state.fences == [] and state.last_automatic_at == 1
    (rj,) = state.rejoins
    assert (rj.id, rj.failover_id, rj.trigger, rj.from_node, rj.to_node) == (
        "R1", "F1", "manual", "main", "failover"
    )  # fmt: skip
    assert rj.divergence == DIVERGED.as_dict() and rj.accepted is True
    assert rj.plan == ["rejoin", "verify_rejoin"] and rj.outcome == "completed"
    assert [(s.name, s.action, s.outcome) for s in rj.steps] == [
        ("rejoin", "rejoin", "ok"),
        ("verify_rejoin", "replica_of", "ok"),
    ]
    assert (state.primary, state.standby) == ("failover", "main")
    assert state.awaiting_ack is None and state.unfinished_rejoin is None
    assert rj.as_dict()["accepted_divergence"] is True


def test_an_unfinished_rejoin_and_stray_records() -> None:
    records = [*failover_lines(), rejoin_started(), *rejoin_step("rejoin", "rejoin", None)]
    records += rejoin_step("rejoin", "rejoin", "ok", id="R-unknown")
    state = replay(as_lines(records))
    assert state.unfinished_rejoin is not None and state.unfinished_rejoin.id == "R1"
    assert state.unfinished_rejoin.steps[0].outcome is None
    assert state.problems == [
        "record for unknown rejoin 'R-unknown' ignored",
        "record for unknown rejoin 'R-unknown' ignored",
    ]
    assert state.awaiting_ack is not None  # the failover still awaits its ack


def test_a_rejoin_start_without_its_report_still_replays() -> None:
    rec = rejoin_started()
    del rec["divergence"], rec["accepted"]
    state = replay(as_lines([*failover_lines(), rec]))
    (rj,) = state.rejoins
    assert rj.divergence is None and rj.accepted is False and state.problems == []


def test_a_rejoin_record_missing_what_replay_needs_is_damage() -> None:
    rec = rejoin_started()
    del rec["from"]
    state = replay(as_lines([*failover_lines(), rec]))
    assert state.rejoins == []
    assert state.problems == ["journal line 7: damaged line: rejoin_started: missing 'from'"]


# --------------------------------------------------------------------------- the daemon


class Rig:
    """A daemon built in-process over ``RejoinEngine`` stand-ins; F1 (main -> failover,
    promoted) awaits its ack in the journal."""

    def __init__(
        self, tmp: Path, old: RejoinEngine, *, fresh: bool = True, **failover: Any
    ) -> None:
        raw = raw_config(tmp)
        raw["failover"].update(failover)
        source = tmp / "watchdogd.yml"
        source.write_text(yaml.safe_dump(raw))
        self.log = Log()
        self.old, self.new = old, RejoinEngine("failover")
        self.d = Daemon(config.load(source), log=self.log)
        self.path = Path(self.d.config.state_dir) / "journal.jsonl"
        if fresh:
            j = journal.Journal(self.d.config.state_dir)
            for rec in failover_lines():
                j.append(rec)
            j.close()

    async def load(self) -> None:
        """As start() does, without servers or probes."""
        d = self.d
        d.state = d.journal.load()
        d.policy.journal = d.state
        d.engines.update({"main": self.old, "failover": self.new})
        await d.sequences.resume_rejoin()

    async def cmd(self, command: str, **args: Any) -> dict[str, Any]:
        return await self.d.handle_command(command, args, ROOT)

    def append(self, *recs: dict[str, Any]) -> None:
        """Records a previous run left behind (read by a Rig made after this)."""
        for rec in recs:
            self.d.journal.append(rec)

    async def finished(self) -> None:
        task = self.d.sequences.rejoin_task
        if task is not None:
            await asyncio.wait_for(task, 10)

    def records(self, prefix: str = "") -> list[dict[str, Any]]:
        lines = [json.loads(x) for x in self.path.read_text().splitlines()]
        return [r for r in lines if r["type"].startswith(prefix)]

    def gauge(self, name: str) -> float | None:
        return self.d.metrics.registry.get_sample_value(name, {"cluster": "orders"})


async def make_rig(tmp: Path, old: RejoinEngine, *, fresh: bool = True, **failover: Any) -> Rig:
    """A ``Rig``, loaded as start() loads the journal (resuming a rejoin)."""
    rig = Rig(tmp, old, fresh=fresh, **failover)
    await rig.load()
    return rig


@pytest.fixture
async def made(tmp_path: Path) -> AsyncIterator[list[Rig]]:
    rigs: list[Rig] = []
    yield rigs
    for rig in rigs:
        rig.d.journal.close()


async def test_nothing_to_rejoin_is_refused_before_any_engine_is_asked(
    tmp_path: Path, made: list[Rig]
) -> None:
    rig = await make_rig(tmp_path, RejoinEngine("main"))
    made.append(rig)
    await rig.cmd("ack")
    with pytest.raises(CommandError, match=r"^rejoin refused: nothing to rejoin: no failover"):
        await rig.cmd("rejoin")
    assert rig.old.calls == [] and rig.records("rejoin") == []


async def test_dry_run_shows_the_report_and_the_steps_and_changes_nothing(
    tmp_path: Path, made: list[Rig]
) -> None:
    rig = await make_rig(tmp_path, RejoinEngine("main", DIVERGED))
    made.append(rig)
    before = rig.path.read_bytes()
    reply = await rig.cmd("rejoin", dry_run=True)
    again = await rig.cmd("rejoin", dry_run=True)
    assert rig.path.read_bytes() == before  # nothing journaled
    assert rig.old.calls == [("divergence", "failover")] * 2  # only the report was asked
    assert reply["dry_run"] is True and again["divergence"]["lost"] == 3
    report = reply["divergence"]
    assert {k: report[k] for k in ("failover_id", "old_primary", "new_primary")} == {
        "failover_id": "F1",
        "old_primary": "main",
        "new_primary": "failover",
    }
    assert (report["diverged"], report["lost"], report["items"]) == (True, 3, list(GTIDS))
    assert "rerun with --accept-divergence" in reply["refused"]
    plan = reply["plan"]
    assert (plan["rejoin_id"][:7], plan["failover_id"], plan["from"], plan["to"]) == (
        "rejoin-", "F1", "main", "failover"
    )  # fmt: skip
    assert [(s["name"], s["action"], s["node"]) for s in plan["steps"]] == [
        ("rejoin", "rejoin", "main"),
        ("verify_rejoin", "replica_of", "main"),
    ]
    assert plan["steps"][1]["timeout"] == 120.0
    assert reply["note"].startswith("the real run fences main first")
    # One writes_diverged for the report, not one per command.
    (told,) = rig.log.named("writes_diverged")
    assert told["lost"] == 3 and told["items"] == list(GTIDS) and told["trigger"] == "dry_run"
    status = await rig.cmd("status")
    assert status["rejoin"]["divergence"]["summary"] == "3 transactions (0-1-7, 0-1-8, 0-1-9)"
    assert status["rejoin"]["running"] is None and status["rejoin"]["last"] is None


async def test_diverged_writes_refuse_the_rejoin_until_accepted(
    tmp_path: Path, made: list[Rig]
) -> None:
    rig = await make_rig(tmp_path, RejoinEngine("main", DIVERGED))
    made.append(rig)
    with pytest.raises(CommandError) as refused:
        await rig.cmd("rejoin")
    assert str(refused.value) == (
        "rejoin refused: main holds 3 transactions (0-1-7, 0-1-8, 0-1-9) that failover never "
        "got, and a rejoin throws them away: rerun with --accept-divergence to accept that"
    )
    assert rig.records("rejoin") == [] and ("rejoin", "failover") not in rig.old.calls
    assert len(rig.log.named("rejoin_refused")) == 1

    reply = await rig.cmd("rejoin", accept_divergence=True)
    await rig.finished()

    assert reply["started"].startswith("rejoin-") and reply["divergence"]["lost"] == 3
    started = rig.records("rejoin_started")[0]
    assert started["divergence"]["items"] == list(GTIDS) and started["accepted"] is True
    assert started["failover_id"] == "F1" and started["steps"] == ["rejoin", "verify_rejoin"]
    assert "accepting the divergence (3 transactions" in started["reason"]
    assert [r["type"] for r in rig.records()][-7:] == [
        "rejoin_started",
        "rejoin_step_started",
        "rejoin_step_finished",
        "rejoin_step_started",
        "rejoin_step_finished",
        "rejoin_finished",
        "ack",
    ]
    ack = rig.records("ack")[0]
    assert (ack["primary"], ack["standby"], ack["rejoin_id"]) == (
        "failover",
        "main",
        reply["started"],
    )
    assert rig.old.calls[-2:] == [("rejoin", "failover"), ("replica_of", "failover")]
    status = await rig.cmd("status")
    assert status["roles"] == {"primary": "failover", "standby": "main"}
    assert status["state"] == WATCHING and status["armed"] is True
    assert status["awaiting_ack"] is False
    last = status["rejoin"]["last"]
    assert last["outcome"] == "completed" and last["accepted_divergence"] is True
    assert status["rejoin"]["divergence"]["lost"] == 3
    assert len(rig.log.named("writes_diverged")) == 1
    assert [e["rejoin_id"] for e in rig.log.named("rejoin_completed")] == [reply["started"]]
    assert rig.log.named("acked")[0]["by"] == f"rejoin {reply['started']}"


async def test_a_real_rejoin_fences_the_old_primary_before_it_measures(
    tmp_path: Path, made: list[Rig]
) -> None:
    rig = await make_rig(tmp_path, RejoinEngine("main", ZERO))
    made.append(rig)
    await rig.cmd("rejoin")
    await rig.finished()
    # Fenced first: no write lands between the report and the rewind.
    assert rig.old.calls[:4] == [
        ("distinct_from", "failover"),
        ("fence", "main"),
        ("divergence", "failover"),
        ("rejoin", "failover"),
    ]


async def refused_without_a_record(rig: Rig) -> str:
    """``watchdogctl rejoin``'s refusal: one line, and nothing journaled."""
    before = rig.path.read_bytes()
    with pytest.raises(CommandError) as refused:
        await rig.cmd("rejoin")
    assert "\n" not in str(refused.value)
    assert rig.path.read_bytes() == before
    return str(refused.value)


async def test_a_fence_that_fails_refuses_the_rejoin_unless_the_unknown_is_accepted(
    tmp_path: Path, made: list[Rig]
) -> None:
    rig = await make_rig(tmp_path, RejoinEngine("main", ZERO, fence_error="connection refused"))
    made.append(rig)
    assert (await refused_without_a_record(rig)).startswith(
        "rejoin refused: divergence unknown (main could not be fenced: connection refused; "
        "writes may still land on it): nothing proves that main holds no writes"
    )
    assert rig.old.calls == [
        ("distinct_from", "failover"),
        ("fence", "main"),
    ]  # not measured: the number would be stale
    assert not rig.d.sequences.rejoin_running
    # An old primary that is down cannot be fenced: the operator accepts the unknown.
    reply = await rig.cmd("rejoin", accept_divergence=True)
    await rig.finished()
    assert reply["divergence"]["diverged"] is None
    started = rig.records("rejoin_started")[0]
    assert started["accepted"] is True and started["divergence"]["known"] is False
    assert "could not be fenced" in started["divergence"]["detail"]


async def test_a_dsn_that_reaches_the_new_primary_never_fences_it(
    tmp_path: Path, made: list[Rig]
) -> None:
    rig = await make_rig(tmp_path, RejoinEngine("main", ZERO, same_server_as="failover"))
    made.append(rig)
    assert "main and failover are the same server" in await refused_without_a_record(rig)
    assert rig.old.calls == [("distinct_from", "failover")]  # no fence, no report


async def test_auto_rejoin_waits_for_an_operator_when_the_fence_fails(
    tmp_path: Path, made: list[Rig]
) -> None:
    rig = await make_rig(
        tmp_path, RejoinEngine("main", ZERO, fence_error="timed out"), auto_rejoin=True
    )
    made.append(rig)
    observe(rig, "failover", "main")
    rig.d.cycle.check_auto_rejoin()
    await asyncio.gather(*rig.d.background)
    assert (
        rig.old.calls == [("distinct_from", "failover"), ("fence", "main")]
        and rig.records("rejoin") == []
    )
    (waiting,) = rig.log.named("rejoin_waiting")
    assert waiting["reason"] == (
        "divergence unknown: unknown (main could not be fenced: timed out; "
        "writes may still land on it)"
    )


class SlowReport(RejoinEngine):
    """Its divergence report waits until ``go`` is set, so the test acts meanwhile."""

    def __init__(self, name: str) -> None:
        super().__init__(name, ZERO)
        self.asked, self.go = asyncio.Event(), asyncio.Event()

    async def divergence(self, new_primary: Any, timeout: float) -> Divergence:
        self.asked.set()
        await self.go.wait()
        return await super().divergence(new_primary, timeout)


async def fence_held(until: asyncio.Event) -> str:
    """A fence task that runs until ``until`` is set."""
    await until.wait()
    return "completed"


def fence_steps() -> list[dict[str, Any]]:
    return [{"name": "fence_old_primary", "action": "fence"}]


async def test_a_fence_during_the_report_refuses_the_rejoin_and_no_fence_during_one(
    tmp_path: Path, made: list[Rig]
) -> None:
    slow = SlowReport("main")
    rig = await make_rig(tmp_path, slow, fence_steps=fence_steps())
    made.append(rig)
    fo = rig.d.state.awaiting_ack
    assert fo is not None
    command = asyncio.create_task(rig.cmd("rejoin"))
    await asyncio.wait_for(slow.asked.wait(), 5)
    # The split-brain check fires during the report: no fence while a rejoin starts.
    await rig.d.sequences.start_fence(fo)
    assert rig.d.sequences.fence_task is None and rig.records("fence") == []
    (skipped,) = rig.log.named("fence_skipped")
    assert skipped["failover_id"] == "F1" and "rejoin" in skipped["reason"]
    # A fence that slipped in anyway (it ran before this check existed) still refuses.
    blocker = asyncio.Event()
    rig.d.sequences.fence_task = asyncio.create_task(fence_held(blocker))
    slow.go.set()
    with pytest.raises(CommandError, match=r"^rejoin refused: the old primary is being fenced"):
        await command
    assert rig.records("rejoin") == [] and ("rejoin", "failover") not in rig.old.calls
    blocker.set()
    await rig.d.sequences.fence_task


async def auto_rejoin_in_report(
    tmp_path: Path, made: list[Rig], **failover: Any
) -> tuple[Rig, SlowReport]:
    """A Rig whose auto_rejoin has started and waits in its divergence report."""
    slow = SlowReport("main")
    rig = await make_rig(tmp_path, slow, auto_rejoin=True, **failover)
    made.append(rig)
    observe(rig, "failover", "main")
    rig.d.cycle.check_auto_rejoin()
    await asyncio.wait_for(slow.asked.wait(), 5)
    return rig, slow


async def test_auto_rejoin_refused_after_its_report_when_a_fence_started(
    tmp_path: Path, made: list[Rig]
) -> None:
    rig, slow = await auto_rejoin_in_report(tmp_path, made)
    blocker = asyncio.Event()
    rig.d.sequences.fence_task = asyncio.create_task(fence_held(blocker))
    slow.go.set()
    await asyncio.gather(*rig.d.background)
    assert rig.records("rejoin") == [] and rig.d.sequences.rejoin_task is None
    assert rig.d.cycle.rejoin_checked is None  # looked at again once the fence is done
    blocker.set()
    await rig.d.sequences.fence_task


async def rejoin_in_report(
    tmp_path: Path, made: list[Rig]
) -> tuple[Rig, SlowReport, asyncio.Task[dict[str, Any]]]:
    """A Rig whose ``watchdogctl rejoin`` waits in its divergence report."""
    slow = SlowReport("main")
    rig = await make_rig(tmp_path, slow)
    made.append(rig)
    assert not rig.d.readiness._busy()
    command = asyncio.create_task(rig.cmd("rejoin"))
    await asyncio.wait_for(slow.asked.wait(), 5)
    return rig, slow, command


async def test_a_forced_failover_or_a_switchover_is_refused_while_a_rejoin_starts(
    tmp_path: Path, made: list[Rig]
) -> None:
    rig, slow, command = await rejoin_in_report(tmp_path, made)
    with pytest.raises(CommandError, match=r"^failover refused: a rejoin is running or starting"):
        await rig.cmd("failover", force=True)
    with pytest.raises(CommandError, match=r"^switchover refused: a rejoin is running or"):
        await rig.cmd("switchover")
    slow.go.set()
    await command
    await rig.finished()
    assert [r["id"] for r in rig.records("failover_started")] == ["F1"]  # none started
    assert rig.records("ack")[0]["rejoin_id"] == rig.records("rejoin_started")[0]["id"]


async def test_stop_ends_a_background_auto_rejoin_before_it_can_start_one(
    tmp_path: Path, made: list[Rig]
) -> None:
    rig, _ = await auto_rejoin_in_report(tmp_path, made, fence_steps=fence_steps())
    (task,) = rig.d.background
    await asyncio.wait_for(rig.d.stop(quiet=True), 10)
    assert task.cancelled() and rig.d.background == set()
    assert rig.d.sequences.rejoin_task is None and rig.records("rejoin") == []
    # Nothing new starts after stop: not a fence, not a rejoin, not a failover.
    fo = rig.d.state.awaiting_ack
    assert fo is not None
    await rig.d.sequences.start_fence(fo)
    assert rig.d.sequences.fence_task is None
    with pytest.raises(StoppingError):
        await rig.d.sequences.start_rejoin(fo, {}, accepted=False, trigger="manual", reason="r")
    with pytest.raises(StoppingError):
        await rig.d.sequences.start_failover("failover", "manual", "r", forced=True)


async def test_an_auto_rejoin_whose_report_ends_while_stopping_starts_nothing(
    tmp_path: Path, made: list[Rig]
) -> None:
    rig, slow = await auto_rejoin_in_report(tmp_path, made)
    rig.d.sequences.stopping = True
    slow.go.set()
    await asyncio.gather(*rig.d.background)
    assert rig.d.sequences.rejoin_task is None and rig.records("rejoin") == []


def test_rejoin_steps_are_checked_with_the_whole_config_and_by_readiness(
    tmp_path: Path,
) -> None:
    script = tmp_path / "rewind"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o644)
    raw = raw_config(tmp_path)
    raw["failover"]["rejoin_steps"] = [
        {"name": "rewind", "action": "command", "argv": [str(script)]},
        {"name": "notify", "action": "command", "argv": ["true"], "required": False},
    ]
    with pytest.raises(config.ConfigError) as bad:
        config.parse(raw)
    assert bad.value.problems == [f"failover.rejoin_steps[0].argv[0]: {script} is not executable"]
    script.chmod(0o755)
    cfg = config.parse(raw)
    pending = {c.name: c for c in readiness.pending(cfg)}
    assert pending["rejoin_step:rewind"].severity == readiness.ERROR
    assert pending["rejoin_step:notify"].severity == readiness.WARNING


def test_rejoin_steps_never_target_the_new_primary_with_a_rejoin_or_the_old_with_promote(
    tmp_path: Path,
) -> None:
    raw = raw_config(tmp_path)
    raw["failover"]["rejoin_steps"] = [
        {"name": "rewind", "action": "rejoin", "target": "standby"},
        {"name": "up", "action": "promote", "target": "primary"},
        {"name": "ok_rejoin", "action": "rejoin", "target": "primary"},
        {"name": "ok_promote", "action": "promote"},
    ]
    with pytest.raises(config.ConfigError) as bad:
        config.parse(raw)
    assert bad.value.problems == [
        "failover.rejoin_steps[0].target: 'standby' would rewind the new primary: a rejoin "
        "step rejoins the old primary (target: primary, the default)",
        "failover.rejoin_steps[1].target: 'primary' would promote the old primary beside the "
        "new one (split brain): in rejoin_steps, promote only the standby (the new primary)",
    ]
    # The same targets elsewhere are not a rejoin's business.
    raw["failover"]["rejoin_steps"] = raw["failover"]["rejoin_steps"][2:]
    raw["failover"]["fence_steps"] = [{"name": "f", "action": "rejoin", "target": "standby"}]
    config.parse(raw)


async def test_no_reload_while_a_rejoin_starts(tmp_path: Path, made: list[Rig]) -> None:
    rig, slow, command = await rejoin_in_report(tmp_path, made)
    engines = dict(rig.d.engines)
    with pytest.raises(CommandError, match=r"^reload refused: a rejoin is starting \(its"):
        await rig.cmd("reload")
    assert rig.d.engines == engines  # the report's engines were not replaced under it
    slow.go.set()
    await command
    await rig.finished()


async def test_readiness_waits_while_a_rejoin_starts_or_runs(
    tmp_path: Path, made: list[Rig]
) -> None:
    rig, slow, command = await rejoin_in_report(tmp_path, made)
    assert rig.d.readiness._busy()  # the divergence report
    slow.go.set()
    await command
    await rig.finished()
    assert not rig.d.readiness._busy()


class AckedMeanwhile(RejoinEngine):
    """Its verification finds the failover acked meanwhile (another path wrote the ack)."""

    rig: Rig | None = None

    async def replica_of(self, new_primary: Any, timeout: float) -> str:
        done = await super().replica_of(new_primary, timeout)
        assert self.rig is not None
        d = self.rig.d
        await d.record(
            journal.ack(id="F1", primary="failover", standby="main", at=d.wall(), by="x")
        )
        return done


async def test_a_verified_rejoin_acks_only_the_failover_it_rejoined_for(
    tmp_path: Path, made: list[Rig]
) -> None:
    old = AckedMeanwhile("main", ZERO)
    rig = await make_rig(tmp_path, old)
    made.append(rig)
    old.rig = rig
    await rig.cmd("rejoin")
    task = rig.d.sequences.rejoin_task
    assert task is not None
    assert await asyncio.wait_for(task, 10) == "completed"  # no AssertionError from the ack
    assert [r["by"] for r in rig.records("ack")] == ["x"]  # not acked a second time
    assert rig.log.named("acked") == []


async def test_an_unknown_divergence_is_refused_unless_accepted(
    tmp_path: Path, made: list[Rig]
) -> None:
    rig = await make_rig(tmp_path, RejoinEngine("main", EngineError("connection refused")))
    made.append(rig)
    with pytest.raises(CommandError, match=r"divergence unknown \(main: connection refused\)"):
        await rig.cmd("rejoin")
    assert rig.records("rejoin") == [] and rig.log.named("writes_diverged") == []
    reply = await rig.cmd("rejoin", accept_divergence=True)
    await rig.finished()
    assert rig.records("rejoin_started")[0]["divergence"]["known"] is False
    assert reply["divergence"]["diverged"] is None
    assert (await rig.cmd("status"))["state"] == WATCHING


async def test_zero_divergence_rejoins_and_waits_for_the_catch_up(
    tmp_path: Path, made: list[Rig]
) -> None:
    rig = await make_rig(tmp_path, RejoinEngine("main", ZERO, not_caught_up=2))
    made.append(rig)
    await rig.cmd("rejoin")
    await rig.finished()
    assert rig.old.calls.count(("replica_of", "failover")) == 3
    assert rig.log.named("writes_diverged") == []
    assert rig.records("rejoin_started")[0]["accepted"] is False
    assert (await rig.cmd("status"))["armed"] is True


async def test_a_failed_verification_is_failed_and_nothing_is_rearmed(
    tmp_path: Path, made: list[Rig]
) -> None:
    rig = await make_rig(
        tmp_path, RejoinEngine("main", ZERO, not_caught_up=10**6), rejoin_timeout="1s"
    )
    made.append(rig)
    await rig.cmd("rejoin")
    # While it runs: no reload, no second rejoin, no ack.
    with pytest.raises(CommandError, match=r"^reload refused: a rejoin is running; reload when"):
        await rig.cmd("reload")
    with pytest.raises(
        CommandError, match=r"^rejoin refused: rejoin rejoin-\S+ of main is already"
    ):
        await rig.cmd("rejoin")
    with pytest.raises(CommandError, match=r"is running: it acks by itself once main is verified"):
        await rig.cmd("ack")
    await rig.finished()
    (end,) = rig.records("rejoin_finished")
    assert end["outcome"] == "failed"
    assert end["error"].startswith(
        "step verify_rejoin failed: main is not a caught-up replica of failover after 1s: "
        "streaming, 100 bytes behind"
    )
    assert rig.records("ack") == []
    status = await rig.cmd("status")
    assert status["state"] == FAILED and status["armed"] is False
    assert status["roles"] == {"primary": "failover", "standby": "main"}
    assert status["rejoin"]["last"]["outcome"] == "failed"
    assert len(rig.log.named("rejoin_failed")) == 1
    # The operator fixes it and runs it again: the same machinery, and then re-armed.
    rig.old.not_caught_up = 0
    await rig.cmd("rejoin")
    await rig.finished()
    assert (await rig.cmd("status"))["armed"] is True
    assert len(rig.records("rejoin_started")) == 2
    assert (await rig.cmd("reload"))["reloaded"] is True  # once none runs


async def test_a_rejoin_cut_off_by_a_restart_resumes_where_it_was(
    tmp_path: Path, made: list[Rig]
) -> None:
    rig = await make_rig(tmp_path, RejoinEngine("main", DIVERGED))
    made.append(rig)
    # What a daemon killed during the verification left behind.
    rig.append(rejoin_started(), *rejoin_step("rejoin", "rejoin", "ok"))
    rig.append(*rejoin_step("verify_rejoin", "replica_of", None))
    rig.d.journal.close()
    old = RejoinEngine("main", DIVERGED)
    old.follows = "failover"  # the rejoin step did its work before the kill
    restarted = await make_rig(tmp_path, old, fresh=False)
    made.append(restarted)
    await restarted.finished()

    assert old.calls == [("replica_of", "failover")]  # the rejoin step is not run again
    assert [e["rejoin_id"] for e in restarted.log.named("rejoin_unfinished")] == ["R1"]
    assert [e["steps_done"] for e in restarted.log.named("rejoin_resumed")] == [["rejoin"]]
    assert [r["type"] for r in restarted.records()][-4:] == [
        "rejoin_step_started",
        "rejoin_step_finished",
        "rejoin_finished",
        "ack",
    ]
    status = await restarted.cmd("status")
    assert status["armed"] is True and status["state"] == WATCHING
    # The report the rejoin started with is still what status shows.
    assert status["rejoin"]["divergence"]["items"] == list(GTIDS)


async def test_a_rejoin_the_config_no_longer_describes_is_closed_not_guessed(
    tmp_path: Path, made: list[Rig]
) -> None:
    rig = await make_rig(tmp_path, RejoinEngine("main"))
    made.append(rig)
    rig.append(rejoin_started(steps=["rewind", "verify_rejoin"]))
    rig.append(*rejoin_step("rewind", "command", None))
    rig.d.journal.close()
    restarted = await make_rig(tmp_path, RejoinEngine("main"), fresh=False)
    made.append(restarted)
    assert restarted.d.sequences.rejoin_task is None and restarted.old.calls == []
    (end,) = restarted.records("rejoin_finished")
    assert end["outcome"] == "failed" and end["error"].startswith(
        "cannot resume: the rejoin steps or roles in the config changed since it started; "
        "check the old primary by hand, then run watchdogctl rejoin again"
    )
    assert [e["rejoin_id"] for e in restarted.log.named("rejoin_failed")] == ["R1"]
    restarted.d.cycle.refresh_state()  # as the first probe cycle decides
    status = await restarted.cmd("status")
    assert status["state"] == FAILED and status["armed"] is False


def refusing_journal(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    def full_disk(rec: dict[str, Any]) -> None:
        raise JournalWriteError("journal: a record could not be written (No space left)")

    monkeypatch.setattr(rig.d.journal, "append", full_disk)


@pytest.mark.parametrize("left", ["verified", "unfinished", "unresumable"])
async def test_a_journal_refusing_records_at_start_does_not_stop_the_start(
    tmp_path: Path, made: list[Rig], monkeypatch: pytest.MonkeyPatch, left: str
) -> None:
    rig = await make_rig(tmp_path, RejoinEngine("main"))
    made.append(rig)
    if left == "unresumable":
        rig.append(rejoin_started(steps=["rewind", "verify_rejoin"]))
    else:
        rig.append(rejoin_started(), *rejoin_step("rejoin", "rejoin", "ok"))
    if left == "verified":
        rig.append(*rejoin_step("verify_rejoin", "replica_of", "ok"))
        rig.append(
            journal.sequence_finished("rejoin", id="R1", outcome="completed", error=None, at=13)
        )
    before = rig.path.read_bytes()
    refusing_journal(rig, monkeypatch)
    rig.d.state = JournalState()
    await rig.load()  # as start() does: no JournalError out of it
    # A resumed rejoin stops at its first record, journaling nothing and acking nothing.
    await rig.finished()
    assert rig.path.read_bytes() == before and rig.d.sequences.rejoin_task is None
    (event,) = rig.log.named("journal_write_failed")
    assert "No space left" in event["error"]
    assert rig.d.state.awaiting_ack is not None  # nothing acted on what was not journaled


async def test_a_verified_rejoin_whose_ack_a_crash_cut_off_is_acked_at_start(
    tmp_path: Path, made: list[Rig]
) -> None:
    rig = await make_rig(tmp_path, RejoinEngine("main"))
    made.append(rig)
    rig.append(rejoin_started(), *rejoin_step("rejoin", "rejoin", "ok"))
    rig.append(*rejoin_step("verify_rejoin", "replica_of", "ok"))
    rig.append(journal.sequence_finished("rejoin", id="R1", outcome="completed", error=None, at=13))
    rig.d.state = JournalState()
    await rig.load()
    assert rig.records("ack")[0]["rejoin_id"] == "R1" and rig.old.calls == []
    assert rig.d.state.awaiting_ack is None and rig.d.policy.armed(rig.d.wall())


def observe(rig: Rig, *up: str) -> None:
    latest = rig.d.latest
    latest.primary_db = Observation("failover", "database", "failover" in up, 0.0, "", 0.0)
    latest.standby_db = Observation("main", "database", "main" in up, 0.0, "", 0.0)


async def test_auto_rejoin_rejoins_only_with_a_known_zero_divergence(
    tmp_path: Path, made: list[Rig]
) -> None:
    rig = await make_rig(tmp_path, RejoinEngine("main", ZERO), auto_rejoin=True)
    made.append(rig)
    observe(rig, "failover")  # the old primary is still down
    rig.d.cycle.check_auto_rejoin()
    assert rig.d.background == set() and rig.old.calls == []
    observe(rig, "failover", "main")
    rig.d.cycle.check_auto_rejoin()
    await asyncio.gather(*rig.d.background)
    await rig.finished()
    started = rig.records("rejoin_started")[0]
    assert started["trigger"] == "automatic" and started["divergence"]["lost"] == 0
    assert rig.records("ack")[0]["rejoin_id"] == started["id"]
    assert rig.d.policy.armed(rig.d.wall())


@pytest.mark.parametrize("report", [DIVERGED, UNKNOWN], ids=["diverged", "unknown"])
async def test_auto_rejoin_waits_for_an_operator_and_says_so_once(
    tmp_path: Path, made: list[Rig], report: Divergence
) -> None:
    rig = await make_rig(tmp_path, RejoinEngine("main", report), auto_rejoin=True)
    made.append(rig)
    observe(rig, "failover", "main")
    for _ in range(3):  # three cycles
        rig.d.cycle.check_auto_rejoin()
        await asyncio.gather(*rig.d.background)
    assert rig.old.calls == [
        ("distinct_from", "failover"),
        ("fence", "main"),
        ("divergence", "failover"),
    ]
    assert rig.records("rejoin") == []
    (waiting,) = rig.log.named("rejoin_waiting")
    assert waiting["failover_id"] == "F1"
    assert len(rig.log.named("writes_diverged")) == (1 if report is DIVERGED else 0)
    assert rig.gauge("watchdogd_rejoin_waiting") == 1.0
    status = await rig.cmd("status")
    assert status["rejoin"]["waiting"]["reason"] == waiting["reason"]
    why = "writes diverged: 3 transactions" if report is DIVERGED else "divergence unknown"
    assert waiting["reason"].startswith(why)
    # The operator decides: accepted, rejoined, re-armed, and the alert clears.
    await rig.cmd("rejoin", accept_divergence=True)
    await rig.finished()
    assert rig.gauge("watchdogd_rejoin_waiting") == 0.0
    assert (await rig.cmd("status"))["rejoin"]["waiting"] is None


# --------------------------------------------------------------------------- watchdogctl


async def test_watchdogctl_rejoin_arguments_and_rendering(tmp_path: Path, made: list[Rig]) -> None:
    ns = ctl.build_parser().parse_args(["rejoin", "--dry-run", "--accept-divergence"])
    assert ctl.command_args(ns) == {"dry_run": True, "accept_divergence": True}
    assert ctl.command_args(ctl.build_parser().parse_args(["rejoin"])) == {}
    rig = await make_rig(tmp_path, RejoinEngine("main", DIVERGED))
    made.append(rig)
    dry = ctl.render("rejoin", await rig.cmd("rejoin", dry_run=True))
    lines = dry.splitlines()
    assert lines[0] == "dry run (nothing was changed): rejoin main as the standby of failover"
    assert lines[1] == (
        "divergence: main holds 3 transactions (0-1-7, 0-1-8, 0-1-9) that failover never "
        "got; a rejoin throws them away"
    )
    assert lines[2].startswith("would be REFUSED: main holds 3 transactions")
    assert [line.split("[")[0].strip() for line in lines if "[" in line] == [
        "1. rejoin",
        "2. verify_rejoin",
    ]
    started = ctl.render("rejoin", await rig.cmd("rejoin", accept_divergence=True))
    assert started.splitlines()[0].endswith("started: main -> standby of failover")
    await rig.finished()
    status = ctl.render_status(await rig.cmd("status"))
    assert "last rejoin" in status and ": completed, main -> standby of failover" in status
    assert re.search(r"^divergence +main holds 3 transactions", status, re.MULTILINE)
