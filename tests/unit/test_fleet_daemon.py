"""The daemon's side of a fleet (issue 12), in process and without sockets: three
daemons over one ``MemoryStore`` and shared ``MemoryVoteBox``es on a ``VirtualClock``.
Leadership, the failover gate (majority, veto, stale votes, authority), the journal in
the store (cluster-wide pause, refusals on followers), lost leadership, the store down,
and a new leader that resumes its predecessor's failover without re-running a step."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.unit.builders import PRIMARY_UP, obs
from watchdogd import config
from watchdogd.control import CommandError, Peer
from watchdogd.daemon.fleet import StoreWriteError
from watchdogd.daemon.lifecycle import Daemon
from watchdogd.detector import DOWN, HEALTHY, Verdict
from watchdogd.policy import BLOCKED, FAILING_OVER, Decision, State
from watchdogd.state import journal as records
from watchdogd.state.store import MemoryStore, VirtualClock
from watchdogd.state.votes import MemoryVoteBox

ROOT = Peer(pid=1, uid=0, gid=0, user="root")
DOWN_V = Verdict(DOWN, "primary down for 3s", outage_seconds=3.0, trigger="database")
UP_V = Verdict(HEALTHY, "primary healthy")
START = Decision(FAILING_OVER, "primary down for 3s", start="failover")


def failover_f1_started() -> dict[str, Any]:
    """The journal record of an automatic failover F1 (steps one, two) starting."""
    return records.sequence_started(
        "failover",
        id="F1",
        trigger="automatic",
        kind="failover",
        reason="primary down",
        from_node="main",
        to_node="failover",
        steps=["one", "two"],
        at=1.0,
    )


class Log:
    def __init__(self) -> None:
        self.entries: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        def log(event: str, **facts: Any) -> None:
            self.entries.append((level, event, facts))

        return log

    def named(self, event: str) -> list[dict[str, Any]]:
        return [f for _, e, f in self.entries if e == event]


def raw(tmp: Path, instance: str, steps_log: Path) -> dict[str, Any]:
    steps = [
        {
            "name": name,
            "action": "command",
            "timeout": "2s",
            "argv": ["sh", "-c", f"echo {name} >> {steps_log}"],
        }
        for name in ("one", "two")
    ]
    return {
        "cluster": "orders",
        "instance": instance,
        "primary": {
            "name": "main",
            "database": {"engine": "postgres", "dsn": "postgresql://u@127.0.0.1:1/x"},
        },
        "standby": {
            "name": "failover",
            "database": {"engine": "postgres", "dsn": "postgresql://u@127.0.0.1:2/x"},
        },
        "probe": {"interval": "1s", "timeout": "500ms"},
        "failover": {
            "outage_threshold": "3s",
            "steps": steps,
            "rejoin_steps": [{"name": "rejoin", "action": "rejoin", "timeout": "2s"}],
            "rejoin_timeout": "2s",
        },
        "metrics": {"enabled": False},
        "state_dir": str(tmp / instance),
        "store": {
            "etcd": {"endpoints": ["http://127.0.0.1:2379"], "ttl": "15s"},
            "voters": ["dc1", "dc2", "dc3"],
        },
    }


class Fleet:
    """Three watchers dc1..dc3 over one in-memory store on one virtual clock."""

    def __init__(self, tmp: Path, extra: dict[str, Any] | None = None) -> None:
        self.clock = VirtualClock(1000.0)
        self.store = MemoryStore(self.clock)
        self.steps_log = tmp / "steps.log"
        first: MemoryVoteBox | None = None
        self.d: dict[str, Daemon] = {}
        self.logs: dict[str, Log] = {}
        for name in ("dc1", "dc2", "dc3"):
            log = Log()
            data = raw(tmp, name, self.steps_log) | (extra or {})
            d = Daemon(config.parse(data), log=log, clock=self.clock)
            assert d.fleet is not None
            d.fleet.store = self.store
            box = MemoryVoteBox(self.clock, 15.0, shared_with=first)
            first = first or box
            d.fleet.box = box
            self.d[name], self.logs[name] = d, log

    def fleet(self, name: str) -> Any:
        f = self.d[name].fleet
        assert f is not None
        return f

    async def lead(self, *names: str) -> None:
        for name in names:
            await self.fleet(name)._lead_once()

    async def vote(self, verdicts: dict[str, Verdict], leader: str = "dc1") -> None:
        """One round: every follower publishes, then the leader (who reads them all)."""
        for name, verdict in verdicts.items():
            if name != leader:
                await self.fleet(name).after_probe(verdict)
        await self.fleet(leader).after_probe(verdicts[leader])

    async def two_rounds(self, verdicts: dict[str, Verdict]) -> None:
        # Freshness is the leader's receive time of a *change*: the first sighting is a
        # baseline, so a voter counts from its second publish.
        await self.vote(verdicts)
        self.clock.advance(1.0)
        await self.vote(verdicts)

    def close(self) -> None:
        for d in self.d.values():
            d.journal.close()


@pytest.fixture
def fleet(tmp_path: Path) -> Any:
    f = Fleet(tmp_path)
    yield f
    f.close()


async def test_one_leader_and_followers_that_name_it(fleet: Fleet) -> None:
    await fleet.lead("dc1", "dc2", "dc3")
    assert fleet.fleet("dc1").is_leader and fleet.fleet("dc1").synced
    for name in ("dc2", "dc3"):
        assert not fleet.fleet(name).is_leader and fleet.fleet(name).leader == "dc1"
    assert fleet.fleet("dc1").authority_left() == pytest.approx(15.0 - 1.5)
    status = fleet.d["dc2"].status()["store"]
    assert status["instance"] == "dc2" and status["leader"] == "dc1"
    assert status["is_leader"] is False and status["deadline_in"] is None
    assert status["refusal"] == "not the leader: dc1 leads; run it there"
    metrics = fleet.d["dc1"].metrics.registry
    assert metrics.get_sample_value("watchdogd_is_leader", {"cluster": "orders"}) == 1
    assert metrics.get_sample_value("watchdogd_store_up", {"cluster": "orders"}) == 1


async def test_a_majority_down_lets_the_leader_start_and_nobody_else(fleet: Fleet) -> None:
    await fleet.lead("dc1", "dc2", "dc3")
    await fleet.two_rounds({"dc1": DOWN_V, "dc2": DOWN_V, "dc3": UP_V})
    tally = fleet.fleet("dc1").tally
    assert tally is not None and tally.down == ("dc1", "dc2") and tally.needed == 2
    assert fleet.fleet("dc1").gate(START) == START
    # A follower seeing the same never starts: it names who decides.
    follower = fleet.fleet("dc2").gate(START)
    assert follower.start is None and follower.state == State.SUSPECT
    assert "dc1 leads the fleet and decides" in follower.reason
    status = fleet.d["dc1"].status()["store"]
    assert status["voters"]["dc2"]["fresh"] is True and status["voters"]["dc2"]["primary_down"]
    assert status["voters"]["dc3"]["primary_down"] is False and status["refusal"] is None
    value = fleet.d["dc1"].metrics.registry.get_sample_value
    assert value("watchdogd_voters_fresh", {"cluster": "orders"}) == 3


async def test_a_voter_with_another_config_is_counted_in_a_metric_before_any_outage(
    fleet: Fleet,
) -> None:
    """The refusal shows only when the primary is lost; the gauge (and its alert) shows
    the mismatch while everything is healthy, when there is time to fix it."""
    d3 = fleet.d["dc3"]
    deployed = d3.config
    d3.config = replace(deployed, failover=replace(deployed.failover, outage_threshold=5.0))
    await fleet.lead("dc1", "dc2", "dc3")
    await fleet.two_rounds({"dc1": UP_V, "dc2": UP_V, "dc3": UP_V})
    leader = fleet.d["dc1"].metrics.registry.get_sample_value
    follower = fleet.d["dc2"].metrics.registry.get_sample_value
    assert leader("watchdogd_voters_config_mismatched", {"cluster": "orders"}) == 1
    assert follower("watchdogd_voters_config_mismatched", {"cluster": "orders"}) == -1
    assert fleet.d["dc1"].status()["store"]["voters"]["dc3"]["config_matches"] is False
    # The same config deployed again: the count goes back to 0.
    d3.config = deployed
    fleet.clock.advance(1.0)
    await fleet.two_rounds({"dc1": UP_V, "dc2": UP_V, "dc3": UP_V})
    assert leader("watchdogd_voters_config_mismatched", {"cluster": "orders"}) == 0


async def test_a_start_short_of_authority_renews_at_once_not_at_its_turn(fleet: Fleet) -> None:
    """Before each renewal the authority dips below the first step's need (ttl 15 s:
    13.5 s after a renewal, 8.5 s before the next); a failover due then asked for a
    renewal and waited up to a renew interval (5 s). It now renews at once."""
    await fleet.lead("dc1", "dc2", "dc3")
    f1 = fleet.fleet("dc1")
    await fleet.two_rounds({"dc1": DOWN_V, "dc2": DOWN_V, "dc3": DOWN_V})
    loop = asyncio.create_task(f1._lead_loop())
    try:
        await asyncio.sleep(0.1)  # the loop's first round renewed; now it waits 5 s
        fleet.clock.advance(11.0)  # 2.5 s left, the first step needs 3 s
        assert f1.authority_left() < 3.0
        gated = f1.gate(START)
        assert gated.start is None and "would end before the first step" in gated.reason
        await asyncio.sleep(0.2)  # real time: far less than the renew interval
        assert f1.authority_left() == pytest.approx(15.0 - 1.5)
        # The votes went stale in the 11 s: counted afresh, the failover may start.
        await fleet.two_rounds({"dc1": DOWN_V, "dc2": DOWN_V, "dc3": DOWN_V})
        assert f1.gate(START) == START
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)


async def test_a_minority_down_is_refused_with_the_count(fleet: Fleet) -> None:
    await fleet.lead("dc1", "dc2", "dc3")
    await fleet.two_rounds({"dc1": DOWN_V, "dc2": UP_V, "dc3": UP_V})
    gated = fleet.fleet("dc1").gate(START)
    assert gated.start is None and gated.state == BLOCKED
    assert "only 1 of 3 voters see the primary down (2 needed" in gated.reason


async def test_a_voter_that_sees_the_primary_writable_vetoes(fleet: Fleet) -> None:
    await fleet.lead("dc1", "dc2", "dc3")
    fleet.d["dc3"].latest.primary_db = obs("main", True, 0.0, db=PRIMARY_UP)
    await fleet.two_rounds({"dc1": DOWN_V, "dc2": DOWN_V, "dc3": UP_V})
    gated = fleet.fleet("dc1").gate(START)
    assert gated.start is None and gated.state == BLOCKED and "vetoed" in gated.reason
    assert "dc3" in gated.reason


async def test_silent_voters_stop_counting(fleet: Fleet) -> None:
    await fleet.lead("dc1", "dc2", "dc3")
    await fleet.two_rounds({"dc1": DOWN_V, "dc2": DOWN_V, "dc3": DOWN_V})
    assert fleet.fleet("dc1").gate(START) == START
    # dc2 and dc3 stop publishing (cut off from the store); the leader keeps its own.
    fleet.clock.advance(8.0)
    await fleet.fleet("dc1").after_probe(DOWN_V)
    gated = fleet.fleet("dc1").gate(START)
    assert gated.start is None and "no fresh view from dc2, dc3" in gated.reason


async def test_no_authority_no_failover_and_no_command(fleet: Fleet) -> None:
    await fleet.lead("dc1", "dc2", "dc3")
    await fleet.two_rounds({"dc1": DOWN_V, "dc2": DOWN_V, "dc3": DOWN_V})
    # The renewals stop being answered: the authority runs out at its deadline.
    fleet.clock.advance(12.0)  # 13.5 s of authority, 1 s spent by the two rounds
    gated = fleet.fleet("dc1").gate(START)
    assert gated.start is None and "would end before the first step" in gated.reason
    fleet.clock.advance(1.0)
    assert fleet.fleet("dc1").authority_left() == 0.0
    with pytest.raises(CommandError, match="authority has ended"):
        await fleet.d["dc1"].handle_command("pause", {}, ROOT)
    # It still holds its token (no compare failed), but it no longer says it leads:
    # otherwise it and the next leader would both count in watchdogd_is_leader.
    from watchdogd.ctl import render_status

    await fleet.fleet("dc1").after_probe(DOWN_V)  # a cycle exports the gauges
    status = fleet.d["dc1"].status()["store"]
    assert status["is_leader"] is False and status["holds_token"] is True
    value = fleet.d["dc1"].metrics.registry.get_sample_value
    assert value("watchdogd_is_leader", {"cluster": "orders"}) == 0
    assert "dc1 (this watcher) WITHOUT AUTHORITY" in render_status(fleet.d["dc1"].status())


async def test_the_journal_is_the_stores_and_followers_follow_it(fleet: Fleet) -> None:
    await fleet.lead("dc1", "dc2", "dc3")
    with pytest.raises(CommandError, match=r"^pause refused: not the leader: dc1 leads; run it"):
        await fleet.d["dc2"].handle_command("pause", {"reason": "window"}, ROOT)
    assert (await fleet.store.entries()) == []
    done = await fleet.d["dc1"].handle_command("pause", {"reason": "window"}, ROOT)
    assert done["paused"] is True and fleet.d["dc1"].state.paused
    ((_, rec),) = await fleet.store.entries()
    assert rec["type"] == "pause"
    # Nothing in the local journal: the store is the journal in a fleet.
    assert not (Path(fleet.d["dc1"].config.state_dir) / "journal.jsonl").exists()
    assert not fleet.d["dc2"].state.paused
    await fleet.vote({"dc1": UP_V, "dc2": UP_V, "dc3": UP_V})
    assert fleet.d["dc2"].state.paused and fleet.d["dc3"].state.paused  # cluster-wide
    assert fleet.d["dc2"].status()["paused"] is True


async def test_the_store_down_is_its_own_state_and_acts_on_nothing(fleet: Fleet) -> None:
    await fleet.lead("dc1", "dc2", "dc3")
    await fleet.two_rounds({"dc1": DOWN_V, "dc2": DOWN_V, "dc3": DOWN_V})
    fleet.store.unavailable = True
    for name in ("dc1", "dc2", "dc3"):
        fleet.fleet(name).box.unavailable = True
    await fleet.vote({"dc1": DOWN_V, "dc2": DOWN_V, "dc3": DOWN_V})
    for name in ("dc1", "dc2", "dc3"):
        gated = fleet.fleet(name).gate(START)
        assert gated.state == State.STORE_UNAVAILABLE and gated.start is None
        assert not fleet.fleet(name).may_act()
    # The leader keeps its token: store trouble is never "lost".
    await fleet.lead("dc1")
    assert fleet.fleet("dc1").is_leader and fleet.logs["dc1"].named("fleet_leadership_lost") == []
    value = fleet.d["dc1"].metrics.registry.get_sample_value
    assert value("watchdogd_store_up", {"cluster": "orders"}) == 0
    with pytest.raises(StoreWriteError):
        await fleet.d["dc1"].record(records.pause(reason="x", by="y", at=1.0))


async def test_a_lost_token_stops_the_leader_at_once(fleet: Fleet) -> None:
    await fleet.lead("dc1", "dc2", "dc3")
    d1 = fleet.d["dc1"]
    # A running sequence (here: a stand-in task) is cancelled, and journals nothing.
    d1.sequences.runner_task = asyncio.create_task(asyncio.sleep(60, "never"))
    task = d1.sequences.runner_task
    fleet.clock.advance(16.0)  # dc1's lease ran out in the store (it was frozen)
    await fleet.lead("dc2")
    assert fleet.fleet("dc2").is_leader
    await fleet.lead("dc1")  # its renewal is refused: TokenLost
    assert not fleet.fleet("dc1").is_leader and task.cancelled()
    (lost,) = fleet.logs["dc1"].named("fleet_leadership_lost")
    assert "no longer holds" in lost["reason"]
    with pytest.raises(StoreWriteError, match="not the leader"):
        await d1.record(records.pause(reason="x", by="y", at=1.0))


async def test_a_new_leader_resumes_the_failover_and_runs_no_step_twice(fleet: Fleet) -> None:
    await fleet.lead("dc1", "dc2", "dc3")
    d1 = fleet.d["dc1"]
    # dc1 started a failover and finished step "one", then froze.
    await d1.record(failover_f1_started())
    for rec in (
        records.step_started("failover", id="F1", step="one", action="command", attempt=1, at=2),
        records.step_finished(
            "failover", id="F1", step="one", action="command", outcome="ok", at=3
        ),
    ):
        await d1.record(rec)
    fleet.steps_log.write_text("one\n")
    fleet.clock.advance(16.0)
    await fleet.lead("dc2")
    d2 = fleet.d["dc2"]
    assert fleet.fleet("dc2").is_leader and d2.sequences.runner_task is not None
    assert await asyncio.wait_for(d2.sequences.runner_task, 10) == "completed"
    assert fleet.steps_log.read_text().splitlines() == ["one", "two"]
    fo = d2.state.last
    assert fo is not None and fo.id == "F1" and fo.outcome == "completed"
    (resumed,) = fleet.logs["dc2"].named("failover_resumed")
    assert resumed["steps_done"] == ["one"]


async def test_a_step_that_cannot_finish_before_the_deadline_does_not_start(
    fleet: Fleet,
) -> None:
    await fleet.lead("dc1", "dc2", "dc3")
    d1 = fleet.d["dc1"]
    # The runner waits up to a renew interval and a store call for a renewal that makes
    # room: here nothing renews, so keep that wait short.
    f1 = fleet.fleet("dc1")
    f1.timing = replace(f1.timing, renew=0.2, budget=0.1)
    fleet.clock.advance(11.0)  # 2.5 s of authority left; each step needs 2 s + 1 s
    outcome = await asyncio.wait_for(
        _run(d1.sequences.start_failover("failover", "manual", "test", forced=True), d1), 10
    )
    assert outcome == "interrupted"
    assert not fleet.steps_log.exists()  # step "one" never ran
    fo = d1.state.unfinished
    assert fo is not None and [s.outcome for s in fo.steps] == []  # left for the next leader
    (event,) = fleet.logs["dc1"].named("failover_interrupted")
    assert "authority" in event["note"]
    # The next renewal is answered: the same leader re-reads the journal and resumes.
    await fleet.lead("dc1")
    task = d1.sequences.runner_task
    assert task is not None and await asyncio.wait_for(task, 10) == "completed"
    assert fleet.steps_log.read_text().splitlines() == ["one", "two"]
    assert len(fleet.logs["dc1"].named("failover_resumed")) == 1


def _one_step_runner(
    tmp_path: Path, argv: list[str], written: list[dict[str, Any]], **bounds: Any
) -> Any:
    """A failover runner of one 10 s ``command`` step, its records into ``written``."""
    from watchdogd import actions
    from watchdogd.actions import StepContext
    from watchdogd.failover.runner import Runner
    from watchdogd.policy import build_plan

    cfg = config.parse(
        raw(tmp_path, "dc1", tmp_path / "log")
        | {
            "failover": {
                "rejoin_steps": [{"name": "rejoin", "action": "rejoin", "timeout": "2s"}],
                "rejoin_timeout": "2s",
                "steps": [{"name": "slow", "action": "command", "timeout": "10s", "argv": argv}],
            }
        }
    )
    plan = build_plan(
        cfg.failover,
        id="F1",
        kind="failover",
        trigger="manual",
        reason="t",
        from_node="main",
        to_node="failover",
    )
    ctx = StepContext(
        config=cfg,
        primary=cfg.primary,
        standby=cfg.standby,
        engines={},
        failover_id="F1",
        reason="t",
        trigger="manual",
    )

    async def record(rec: dict[str, Any]) -> None:
        written.append(rec)

    steps = {s.name: actions.build(s, cfg) for s in plan.steps}
    return Runner(plan, ctx, steps, record, lambda *a, **k: None, **bounds)


async def test_a_running_step_is_cancelled_at_the_deadline(tmp_path: Path) -> None:
    marker = tmp_path / "after"
    written: list[dict[str, Any]] = []
    ends = time.monotonic() + 12.0  # enough to start the 10 s step ...

    def authority() -> float:
        return ends - time.monotonic()

    runner = _one_step_runner(
        tmp_path, ["sh", "-c", f"sleep 3; touch {marker}"], written, authority=authority
    )
    task = asyncio.create_task(runner.run())
    await asyncio.sleep(0.5)
    ends = time.monotonic()  # ... then the renewals stop: authority over
    assert await asyncio.wait_for(task, 3) == "interrupted"
    await asyncio.sleep(3.0)
    assert not marker.exists()  # the command's process group was killed with the step
    assert [r["type"] for r in written] == ["failover_started", "step_started"]


async def test_a_step_short_of_authority_asks_for_a_renewal_and_starts_after_it(
    tmp_path: Path,
) -> None:
    written: list[dict[str, Any]] = []
    ends = time.monotonic() + 5.0  # short of the 10 s step's 11 s
    asked: list[float] = []

    def authority() -> float:
        return ends - time.monotonic()

    def renew() -> None:
        nonlocal ends
        asked.append(time.monotonic())
        ends = time.monotonic() + 13.5  # the store answers the renewal

    runner = _one_step_runner(
        tmp_path, ["true"], written, authority=authority, authority_wait=6.0, renew=renew
    )
    started = time.monotonic()
    assert await asyncio.wait_for(runner.run(), 5) == "completed"
    assert len(asked) == 1 and asked[0] - started < 0.5  # at once, not at the renewal's turn
    assert [r["type"] for r in written][:2] == ["failover_started", "step_started"]


async def _run(started: Any, d: Daemon) -> str:
    await started
    task = d.sequences.runner_task
    assert task is not None
    outcome: str = await task
    return outcome


async def test_watchdogctl_status_shows_a_short_fleet_block(fleet: Fleet) -> None:
    from watchdogd.ctl import render_status

    await fleet.lead("dc1", "dc2", "dc3")
    await fleet.two_rounds({"dc1": DOWN_V, "dc2": DOWN_V, "dc3": UP_V})
    leader = render_status(fleet.d["dc1"].status())
    assert "fleet leader   dc1 (this watcher), authority " in leader
    # dated at the leader's previous read of the views (one probe interval before)
    assert "dc2: sees the primary down, 1.0s ago" in leader
    assert "dc3: sees the primary up" in leader
    follower = render_status(fleet.d["dc2"].status())
    assert "fleet leader   dc1 (this is dc2)" in follower and "store          up" in follower
    assert "commands here: not the leader: dc1 leads; run it there" in follower


async def test_an_adopted_campaign_counts_its_authority_from_its_lease_grant(
    fleet: Fleet,
) -> None:
    """A campaign whose reply was lost is adopted by the next one (EtcdStore): its
    lease was granted then, so the authority ends a ttl after that grant, not after
    the adopting round's send time."""

    class Granted:
        def __init__(self, at: float) -> None:
            self.at = at

        def deadline(self, margin: float = 0.0) -> float:
            return self.at + 15 - margin

    granted_at = fleet.clock()
    fleet.store.lease = Granted(granted_at)  # type: ignore[attr-defined]
    fleet.clock.advance(4.0)  # the adopting round comes later
    await fleet.lead("dc1")
    assert fleet.fleet("dc1").is_leader
    assert fleet.fleet("dc1").deadline == pytest.approx(granted_at + 15 - 1.5)
    assert fleet.fleet("dc1").authority_left() == pytest.approx(15 - 1.5 - 4.0)


async def test_abort_of_its_own_running_failover_is_never_refused(fleet: Fleet) -> None:
    """Abort only stops (a flag read before the next step) and journals nothing: a
    leader whose authority ended, or that must re-read the journal, still takes it."""

    class Running:
        plan = type("P", (), {"id": "f1"})()
        current_step = "guard_fence"
        aborted_by: str | None = None

        def abort(self, by: str = "operator") -> None:
            self.aborted_by = by

    await fleet.lead("dc1", "dc2", "dc3")
    d1 = fleet.d["dc1"]
    fleet.fleet("dc1").needs_replay = True
    with pytest.raises(CommandError, match="fate is unknown"):
        await d1.handle_command("pause", {}, ROOT)
    with pytest.raises(CommandError, match="fate is unknown"):
        await d1.handle_command("abort", {}, ROOT)  # nothing runs: the usual refusal
    running = Running()
    d1.sequences.runner = running  # type: ignore[assignment]
    reply = await d1.handle_command("abort", {}, ROOT)
    assert reply["aborting"] == "f1" and running.aborted_by is not None
    fleet.clock.advance(20.0)  # the authority is long gone as well
    assert fleet.fleet("dc1").authority_left() == 0.0
    assert (await d1.handle_command("abort", {}, ROOT))["aborting"] == "f1"


async def test_a_leader_short_of_down_votes_looks_again_within_the_cycle(fleet: Fleet) -> None:
    """The leader sees the primary down and a voter's "down" lands just after its read:
    it reads once more a moment later, in the same cycle, and may start now rather
    than an interval later."""
    await fleet.lead("dc1", "dc2", "dc3")
    await fleet.two_rounds({"dc1": UP_V, "dc2": UP_V, "dc3": UP_V})
    fleet.clock.advance(1.0)
    await fleet.fleet("dc3").after_probe(UP_V)

    async def dc2_down_soon() -> None:
        await asyncio.sleep(0.05)
        await fleet.fleet("dc2").after_probe(DOWN_V)

    late = asyncio.create_task(dc2_down_soon())
    f1 = fleet.fleet("dc1")
    await f1.after_probe(DOWN_V, fleet.clock())
    await late
    assert f1.tally is not None and f1.tally.down == ("dc1", "dc2")
    assert f1.gate(START) == START
    # A leader that could not act anyway (its authority over) does not look again.
    fleet.clock.advance(1.0)
    await fleet.fleet("dc2").after_probe(UP_V)
    fleet.clock.advance(14.0)
    assert f1.authority_left() == 0
    late = asyncio.create_task(dc2_down_soon())
    await f1.after_probe(DOWN_V, fleet.clock())
    await late
    assert f1.tally is not None and "dc2" not in f1.tally.down
