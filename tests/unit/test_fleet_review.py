"""Fixes of the fleet's safety review (issue 12, /work/wt/review-fleet.md): each test
failed before its fix.

- F6: appends on one ``EtcdStore`` one at a time; a read beside one neither waits
  nor moves where the next goes.
- F3/F4: a view seen in an earlier term, before a gap in the leader's reads, or in
  another probe window is not fresh; a change is dated at the previous read.
- F5: an ambiguous append is settled by one read; running steps keep their authority.
- F7: a huge ``outage`` is a one-line refusal of that ballot, not of the count.
- F8: stray journal keys are skipped; a damaged record is a failed state, not "down".
- F1/F2: the rejoin's fence needs and ends with the leader's authority; launches hold
  their flags across their start record.
- Low: runner bounds only in a fleet, probe interval vs ttl, a lost campaign reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_fleet_daemon import DOWN_V, ROOT, START, UP_V, Fleet, Log, raw
from watchdogd import config
from watchdogd.actions import StepContext
from watchdogd.control import CommandError
from watchdogd.daemon.lifecycle import Daemon
from watchdogd.failover.runner import Runner
from watchdogd.fleet import View
from watchdogd.policy import State, build_plan
from watchdogd.state.etcd import CompareFailed, KeyValue, Put, RangeResult, TxnResult
from watchdogd.state.etcd_store import EtcdStore
from watchdogd.state.journal import FailoverRecord, JournalDamaged, encode_line
from watchdogd.state.store import MemoryStore, StoreUnavailable, Token

LEADER = b"/w/c/leader"


class GatedEtcd:
    """A fake etcd that commits each transaction on arrival and answers it only when
    the test opens its gate: answers can come back in any order."""

    def __init__(self) -> None:
        self.kv: dict[bytes, KeyValue] = {LEADER: KeyValue(LEADER, b"dc1", 5, 5, 1, 7)}
        self.rev = 5
        self.gates: list[asyncio.Event] = []

    async def get_prefix(self, prefix: bytes) -> RangeResult:
        kvs = tuple(v for k, v in sorted(self.kv.items()) if k.startswith(prefix))
        return RangeResult(self.rev, kvs, len(kvs))

    async def txn(self, compare: Sequence[Any], success: Sequence[Any] = (),
                  failure: Sequence[Any] | None = None) -> TxnResult:  # fmt: skip
        ok = all(
            (kv.create_revision if (kv := self.kv.get(c.key)) else 0) == c.operand for c in compare
        )
        if ok:
            self.rev += 1
            for op in success:
                assert isinstance(op, Put) and isinstance(op.key, bytes)
                self.kv[op.key] = KeyValue(op.key, op.value, self.rev, self.rev, 1, 0)
            result = TxnResult(True, self.rev, ())
        else:
            reads = []
            for op in failure or ():
                kv = self.kv.get(op.key)
                reads.append(RangeResult(self.rev, (kv,) if kv else (), 1 if kv else 0))
            result = TxnResult(False, self.rev, tuple(reads))
        gate = asyncio.Event()
        self.gates.append(gate)
        await gate.wait()
        if not result.succeeded:
            raise CompareFailed("compare failed", result)
        return result


async def arrived(client: GatedEtcd, n: int) -> None:
    """Until ``n`` transactions have reached the fake etcd."""
    for _ in range(10_000):
        if len(client.gates) >= n:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{n} transactions never arrived")


async def test_concurrent_appends_both_land_in_order() -> None:
    client = GatedEtcd()
    store = EtcdStore(client, "/w/c")  # type: ignore[arg-type]
    token = Token("dc1", 5)
    pause = {"type": "pause", "reason": "a", "by": "x", "at": 1.0}
    first = asyncio.create_task(store.append(token, pause))
    await asyncio.sleep(0)
    second = asyncio.create_task(store.append(token, {"type": "resume", "by": "x", "at": 2.0}))
    opened = 0
    while not (first.done() and second.done()):
        for _ in range(5):
            await asyncio.sleep(0)
        # the newest answer first: a loser answered before the winner
        pending = [g for g in client.gates if not g.is_set()]
        assert len(pending) <= 1, "two appends were in flight at once"
        if pending:
            pending[-1].set()
            opened += 1
    positions = [first.result(), second.result()]
    journal = sorted(k for k in client.kv if b"/journal/" in k)
    assert journal == [b"/w/c/journal/0000000000000001", b"/w/c/journal/0000000000000002"]
    assert positions[0] < positions[1] and opened == 2
    # and the next append goes after both
    third = asyncio.create_task(store.append(token, {"type": "resume", "by": "y", "at": 3.0}))
    while not third.done():
        await asyncio.sleep(0)
        for g in client.gates:
            g.set()
    assert b"/w/c/journal/0000000000000003" in client.kv


async def test_a_journal_read_beside_an_append_neither_waits_nor_moves_the_end() -> None:
    client = GatedEtcd()
    store = EtcdStore(client, "/w/c")  # type: ignore[arg-type]
    token = Token("dc1", 5)
    first = asyncio.create_task(store.append(token, {"type": "resume", "by": "x", "at": 1.0}))
    await arrived(client, 1)
    # the append's record is committed, its answer not yet back: a read now
    read = await asyncio.wait_for(store.entries(), 1)  # does not wait for the append
    assert len(read) == 1
    client.gates[0].set()
    await first
    second = asyncio.create_task(store.append(token, {"type": "resume", "by": "y", "at": 2.0}))
    await arrived(client, 2)
    client.gates[1].set()
    await second
    assert b"/w/c/journal/0000000000000002" in client.kv


# ---------------------------------------------------------------- the daemon's fleet


@pytest.fixture
def fleet(tmp_path: Path) -> Any:
    f = Fleet(tmp_path)
    yield f
    f.close()


async def test_reelected_leader_does_not_count_a_view_from_its_last_term(fleet: Fleet) -> None:
    await fleet.lead("dc1", "dc2", "dc3")
    await fleet.two_rounds({"dc1": UP_V, "dc2": UP_V, "dc3": UP_V})
    f1 = fleet.fleet("dc1")
    await f1._lost("test: the leader key was taken")
    # dc3 publishes DOWN once and is cut off; its ballot lives on for the ttl
    await fleet.fleet("dc3").after_probe(DOWN_V)
    fleet.clock.advance(10.0)  # beyond max_age, within the ballot's ttl
    fleet.store._leader = None  # dc1 leads again, a new term
    await fleet.lead("dc1")
    assert f1.token is not None and f1.synced
    await f1.after_probe(DOWN_V)
    assert "dc3" not in f1.tally.fresh
    assert f1.gate(START).start is None
    # a voter that is alive counts again from its next change
    fleet.clock.advance(1.0)
    await fleet.vote({"dc1": DOWN_V, "dc2": DOWN_V, "dc3": DOWN_V})
    assert set(f1.tally.down) == {"dc1", "dc2", "dc3"}


async def test_a_gap_in_the_leaders_reads_makes_every_view_a_baseline(fleet: Fleet) -> None:
    await fleet.lead("dc1", "dc2", "dc3")
    await fleet.two_rounds({"dc1": UP_V, "dc2": UP_V, "dc3": UP_V})
    f1 = fleet.fleet("dc1")
    f1.box.unavailable = True
    await fleet.fleet("dc3").after_probe(DOWN_V)  # then silent
    for _ in range(10):
        fleet.clock.advance(1.0)
        await f1.after_probe(DOWN_V)
    f1.box.unavailable = False
    await fleet.lead("dc1")
    await f1.after_probe(DOWN_V)
    assert "dc3" not in f1.tally.fresh and "dc3" not in f1.tally.down
    assert f1.gate(START).start is None


async def test_a_change_is_dated_at_the_previous_read_not_now(fleet: Fleet) -> None:
    await fleet.lead("dc1", "dc2", "dc3")
    await fleet.two_rounds({"dc1": UP_V, "dc2": UP_V, "dc3": UP_V})
    f1 = fleet.fleet("dc1")
    read = fleet.clock()
    await fleet.fleet("dc2").after_probe(DOWN_V)
    fleet.clock.advance(2.0)
    await f1.after_probe(DOWN_V)
    assert f1.freshness.age("dc2", fleet.clock()) == pytest.approx(fleet.clock() - read)


def slow_leader(tmp_path: Path, f: Fleet, marker: Path) -> Daemon:
    """dc1 with one slow step that leaves a marker when it finishes."""
    r = raw(tmp_path, "dc1", tmp_path / "log")
    r["failover"]["steps"] = [
        {
            "name": "slow",
            "action": "command",
            "timeout": "5s",
            "argv": ["sh", "-c", f"sleep 1.5; touch {marker}"],
        }
    ]
    d = Daemon(config.parse(r), log=f.logs["dc1"], clock=f.clock)
    assert d.fleet is not None
    d.fleet.store, d.fleet.box = f.store, f.fleet("dc1").box
    f.d["dc1"] = d
    return d


async def test_an_ambiguous_append_that_landed_is_taken_and_cuts_no_step(tmp_path: Path) -> None:
    f = Fleet(tmp_path)
    marker = tmp_path / "marker"
    d = slow_leader(tmp_path, f, marker)
    assert d.fleet is not None
    await f.lead("dc1")
    await d.sequences.start_failover("failover", "manual", "t", forced=True)
    task = d.sequences.runner_task
    assert task is not None
    await asyncio.sleep(0.3)  # the slow step runs
    f.store.ambiguous_appends = 1  # the pause lands, its answer is lost
    done = await d.handle_command("pause", {"reason": "look"}, ROOT)
    assert done["paused"] is True and d.state.paused
    assert d.fleet.authority_left() > 0 and not d.fleet.needs_replay
    outcome = await asyncio.wait_for(task, 5)
    assert outcome != "interrupted" and marker.exists()
    f.close()


async def test_an_ambiguous_append_not_seen_refuses_new_work_but_not_the_running_step(
    tmp_path: Path,
) -> None:
    f = Fleet(tmp_path)
    marker = tmp_path / "marker"
    d = slow_leader(tmp_path, f, marker)
    fl = d.fleet
    assert fl is not None
    await f.lead("dc1")
    await d.sequences.start_failover("failover", "manual", "t", forced=True)
    task = d.sequences.runner_task
    assert task is not None
    await asyncio.sleep(0.3)
    real = f.store.append
    calls = 0

    async def lost_before_landing(token: Token, record: Any) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise StoreUnavailable("reply lost (test)", maybe_applied=True)
        return await real(token, record)

    f.store.append = lost_before_landing  # type: ignore[method-assign]
    with pytest.raises(CommandError, match="did not take the record"):
        await d.handle_command("pause", {"reason": "look"}, ROOT)
    assert fl.needs_replay and fl.authority_left() > 0
    with pytest.raises(CommandError, match="fate is unknown"):
        await d.handle_command("pause", {"reason": "again"}, ROOT)
    assert "fate is unknown" in (fl.refusal() or "")
    assert not fl.may_act()
    outcome = await asyncio.wait_for(task, 5)
    assert outcome != "interrupted" and marker.exists()
    await f.lead("dc1")  # nothing runs now: the leader re-reads the journal
    assert fl.synced and not fl.needs_replay and fl.command_refusal() is None
    f.close()


@pytest.mark.parametrize("outage", [10**400, -(10**400), 10**9 + 1], ids=["huge", "-huge", "1e9+1"])
def test_a_huge_outage_is_refused_with_one_line(outage: int) -> None:
    data = View("dc2", 1, "main", True, None, 1.0, None, "x").encode()
    data["outage"] = outage
    with pytest.raises(ValueError, match="outage must be a number of seconds") as err:
        View.decode(data)
    assert "\n" not in str(err.value)


async def test_a_hostile_ballot_is_skipped_not_the_leaders_count(fleet: Fleet) -> None:
    await fleet.lead("dc1", "dc2", "dc3")
    await fleet.two_rounds({"dc1": DOWN_V, "dc2": DOWN_V, "dc3": DOWN_V})
    hostile = fleet.fleet("dc2").view(DOWN_V).encode()
    hostile["outage"] = 10**400
    await fleet.fleet("dc2").box.publish("dc2", hostile)
    fleet.clock.advance(1.0)
    await fleet.fleet("dc3").after_probe(DOWN_V)
    await fleet.fleet("dc1").after_probe(DOWN_V)  # no OverflowError
    f1 = fleet.fleet("dc1")
    assert f1.up and f1.tally is not None and "dc2" not in f1.tally.down
    assert set(f1.tally.down) == {"dc1", "dc3"}
    assert fleet.logs["dc1"].named("fleet_view_refused")[-1]["voter"] == "dc2"


class Journal:
    """A fake etcd holding journal keys only (for ``EtcdStore.entries``)."""

    def __init__(self, kvs: dict[bytes, bytes]) -> None:
        self.kvs = [KeyValue(k, v, i + 1, i + 1, 1, 0) for i, (k, v) in enumerate(kvs.items())]

    async def get_prefix(self, prefix: bytes) -> RangeResult:
        kvs = tuple(kv for kv in self.kvs if kv.key.startswith(prefix))
        return RangeResult(len(self.kvs), kvs, len(kvs))


async def test_stray_keys_under_the_journal_prefix_are_not_records() -> None:
    record = {"type": "resume", "by": "x", "at": 1.0}
    client = Journal(
        {
            b"/w/c/journal/0000000000000001": encode_line(record),
            b"/w/c/journal/foo": b"junk",
            b"/w/c/journal/99": b"junk",
        }
    )
    store = EtcdStore(client, "/w/c")  # type: ignore[arg-type]
    assert [r for _, r in await store.entries()] == [record]
    assert store._next_seq == 2
    client.kvs.append(KeyValue(b"/w/c/journal/0000000000000002", b"garbage", 9, 9, 1, 0))
    with pytest.raises(JournalDamaged, match="0000000000000002"):
        await store.entries()


async def test_a_damaged_record_is_a_failed_state_not_store_down(fleet: Fleet) -> None:
    real = fleet.store.entries

    async def damaged(after: int = 0) -> Any:
        raise JournalDamaged("etcd journal key /w/c/journal/0000000000000007 is damaged")

    fleet.store.entries = damaged  # type: ignore[method-assign]
    await fleet.lead("dc1", "dc2")
    f1, f2 = fleet.fleet("dc1"), fleet.fleet("dc2")
    assert f1.is_leader and not f1.synced and f1.up and "0000000000000007" in f1.journal_damaged
    await fleet.two_rounds({"dc1": DOWN_V, "dc2": DOWN_V, "dc3": DOWN_V})
    for f in (f1, f2):
        gated = f.gate(START)
        assert gated.state == State.FAILED and gated.start is None
        assert "journal in the store is damaged" in gated.reason
        assert f.up and not f.may_act()
    assert fleet.logs["dc1"].named("store_unavailable") == []
    with pytest.raises(CommandError, match="damaged"):
        await fleet.d["dc1"].handle_command("pause", {}, ROOT)
    assert fleet.d["dc1"].status()["store"]["journal_damaged"] is not None
    from watchdogd.ctl import render_status

    for name in ("dc1", "dc2"):  # the follower says so too, not only the leader's refusal
        shown = render_status(fleet.d[name].status())
        assert "journal in the store DAMAGED: etcd journal key " in shown, shown
    # an operator repairs the record: the leader reads the journal whole and acts again
    fleet.store.entries = real  # type: ignore[method-assign]
    await fleet.lead("dc1")
    assert f1.synced and f1.journal_damaged is None
    assert fleet.logs["dc1"].named("fleet_journal_repaired")


# ---------------------------------------------------------------- the rejoin's fence (F1, F2)


class HeldEngine:
    """An old primary whose fence runs until the test releases it."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.release = asyncio.Event()
        self.cancelled = False

    async def distinct_from(self, new: Any, timeout: float) -> None:
        self.calls.append("distinct_from")

    async def fence(self, timeout: float) -> None:
        self.calls.append("fence")
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise

    async def divergence(self, new: Any, timeout: float) -> Any:
        await asyncio.Event().wait()  # never answers: the test cancels first

    async def close(self) -> None:
        pass


def old_primary(fleet: Fleet) -> tuple[Daemon, HeldEngine, FailoverRecord]:
    d = fleet.d["dc1"]
    engine = HeldEngine()
    d.engines["main"] = engine  # type: ignore[assignment]
    d.engines["failover"] = HeldEngine()  # type: ignore[assignment]
    fo = FailoverRecord(
        id="f1", trigger="automatic", reason="t", from_node="main", to_node="failover",
        started_at=1.0,
    )  # fmt: skip
    return d, engine, fo


async def test_the_rejoins_fence_needs_the_leaders_authority(fleet: Fleet) -> None:
    d, engine, fo = old_primary(fleet)
    # a follower (no authority) fences nothing
    why = await d.sequences.fence_old(fo)
    assert why is not None and "authority" in why and engine.calls == []
    await fleet.lead("dc1")
    # too little authority left for the whole fence and a store call, and no renewal
    # comes within the wait
    d.authority_wait = lambda: 0.3  # type: ignore[method-assign]
    fleet.clock.advance(5.0)
    why = await d.sequences.fence_old(fo)
    assert why is not None and "shorter than the fence may take" in why and engine.calls == []


async def test_the_rejoins_fence_is_cut_off_at_the_authoritys_end(fleet: Fleet) -> None:
    d, engine, fo = old_primary(fleet)
    await fleet.lead("dc1")
    task = asyncio.create_task(d.sequences.fence_old(fo))
    while "fence" not in engine.calls:
        assert not task.done(), task.result()
        await asyncio.sleep(0.01)
    fleet.clock.advance(14.0)  # the renewals were not answered: the deadline passes
    why = await asyncio.wait_for(task, 2)
    assert why is not None and "authority ended" in why and engine.cancelled


async def test_lost_leadership_ends_a_background_auto_rejoin(fleet: Fleet) -> None:
    d, engine, fo = old_primary(fleet)
    await fleet.lead("dc1")
    d.state.failovers.append(fo)
    task = asyncio.create_task(d.sequences.auto_rejoin(fo))
    d.sequences.auto_tasks.add(task)
    while "fence" not in engine.calls:
        assert not task.done()
        await asyncio.sleep(0.01)
    assert d.sequences.rejoin_running
    await fleet.fleet("dc1")._lost("test: the key was taken")
    assert task.done() and engine.cancelled and not d.sequences.rejoin_running


async def test_no_fence_starts_while_a_rejoins_start_record_is_in_flight(fleet: Fleet) -> None:
    d, _, _ = old_primary(fleet)
    seq = d.sequences
    seq._rejoin_launching = True  # what _launch_rejoin holds across runner.begin()
    assert seq.rejoin_running
    seq._rejoin_launching = False
    seq._fence_launching = True  # what start_fence holds across runner.begin()
    assert seq.fencing


# ---------------------------------------------------------------- runner bounds (Low)


class Lingering:
    """An action whose cancellation takes a moment to clean up."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cleaned = False

    async def run(self, ctx: Any, timeout: float) -> str:
        self.started.set()
        try:
            await asyncio.sleep(30)
        finally:
            await asyncio.sleep(0.2)  # e.g. a process group being killed and reaped
            self.cleaned = True
        return "done"


def one_step_runner(tmp_path: Path, action: Lingering, **bounds: Any) -> Runner:
    cfg = config.parse(raw(tmp_path, "dc1", tmp_path / "log"))
    plan = build_plan(
        cfg.failover, id="F1", kind="failover", trigger="manual", reason="t",
        from_node="main", to_node="failover",
    )  # fmt: skip
    ctx = StepContext(
        config=cfg, primary=cfg.primary, standby=cfg.standby, engines={},
        failover_id="F1", reason="t", trigger="manual",
    )  # fmt: skip

    async def record(rec: dict[str, Any]) -> None:
        pass

    acts = {s.name: action for s in plan.steps}
    return Runner(plan, ctx, acts, record, lambda *a, **k: None, **bounds)  # type: ignore[arg-type]


async def test_a_cancelled_runner_waits_for_its_step_to_end(tmp_path: Path) -> None:
    action = Lingering()
    runner = one_step_runner(tmp_path, action, authority=lambda: 100.0)
    task = asyncio.create_task(runner.run())
    await action.started.wait()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert action.cleaned  # the step ended before the runner did


async def test_one_watcher_passes_no_authority_to_its_runners(tmp_path: Path) -> None:
    cfg = raw(tmp_path, "solo", tmp_path / "log")
    del cfg["store"]
    solo = Daemon(config.parse(cfg), log=Log(), clock=time.monotonic)
    assert solo.sequences.authority_bounds() == {}
    fleet = Fleet(tmp_path)
    bounds = fleet.d["dc1"].sequences.authority_bounds()
    assert bounds["authority"] == fleet.d["dc1"].authority_left and bounds["authority_wait"] > 0
    assert bounds["renew"] == fleet.fleet("dc1").renew_soon
    fleet.close()
    solo.journal.close()


# ---------------------------------------------------------------- check-config (Low)


def test_a_probe_interval_that_outlives_the_ballots_is_refused(tmp_path: Path) -> None:
    r = raw(tmp_path, "dc1", tmp_path / "log")
    r["probe"] = {"interval": "15s", "timeout": "1s"}
    with pytest.raises(config.ConfigError) as info:
        config.parse(r)
    (problem,) = [p for p in info.value.problems if p.startswith("probe.interval")]
    assert "store.etcd.ttl 15s" in problem and "\n" not in problem
    r["probe"] = {"interval": "2s", "timeout": "1s"}
    assert config.parse(r).probe.interval == 2.0


# ---------------------------------------------------------------- a campaign's lost reply (Low)


class PendingStore(MemoryStore):
    """A store whose last campaign reply was lost although the key is ours."""

    pending_campaign = True

    async def campaign(self, holder: str, ttl: float) -> Token | None:
        self.pending_campaign = False
        assert self._leader is not None
        return self._leader.token  # settled: the key stands on our lease


async def test_a_leader_key_that_names_us_after_a_lost_reply_is_settled_at_once(
    fleet: Fleet,
) -> None:
    store = PendingStore(fleet.clock)
    fleet.fleet("dc1").store = store
    won = await MemoryStore.campaign(store, "dc1", 15.0)  # landed; its reply was "lost"
    assert won is not None
    f1 = fleet.fleet("dc1")
    await f1._lead_once()
    assert f1.token == won and f1.is_leader and f1.leader == "dc1"


async def test_a_second_fence_does_not_start_while_the_firsts_record_is_in_flight(
    tmp_path: Path,
) -> None:
    f = Fleet(tmp_path)
    r = raw(tmp_path, "dc1", tmp_path / "log")
    r["failover"]["fence_steps"] = [
        {"name": "fence", "action": "command", "timeout": "1s", "argv": ["true"]}
    ]
    d = Daemon(config.parse(r), log=f.logs["dc1"], clock=f.clock)
    assert d.fleet is not None
    d.fleet.store, d.fleet.box = f.store, f.fleet("dc1").box
    f.d["dc1"] = d
    await f.lead("dc1")
    fo = FailoverRecord(
        id="f1", trigger="automatic", reason="t", from_node="main", to_node="failover",
        started_at=1.0,
    )  # fmt: skip
    slow, asked = asyncio.Event(), asyncio.Event()
    written: list[str] = []

    async def record(rec: dict[str, Any]) -> None:
        written.append(rec["type"])
        asked.set()
        await slow.wait()  # the store takes its time to answer

    d.record = record  # type: ignore[method-assign]
    first = asyncio.create_task(d.sequences.start_fence(fo))
    await asked.wait()
    assert d.sequences.fencing
    await d.sequences.start_fence(fo)  # a cycle meanwhile
    assert len(written) == 1
    slow.set()
    await first
    task = d.sequences.fence_task
    assert task is not None
    await asyncio.wait_for(task, 5)
    f.close()


async def test_a_reload_that_changes_the_probe_rebuilds_the_freshness_window(
    fleet: Fleet, tmp_path: Path
) -> None:
    import yaml

    r = raw(tmp_path, "dc1", tmp_path / "log")
    path = tmp_path / "watchdogd.yml"
    path.write_text(yaml.safe_dump(r))
    d = Daemon(config.load(path), log=fleet.logs["dc1"], clock=fleet.clock)
    assert d.fleet is not None
    d.fleet.store, d.fleet.box = fleet.store, fleet.fleet("dc1").box
    before = d.fleet.freshness.max_age
    r["probe"]["interval"] = "2s"
    path.write_text(yaml.safe_dump(r))
    await d.reload(by="test")
    assert d.fleet.freshness.max_age == pytest.approx(before + 3 * 1.0)
    d.journal.close()
