"""A watcher fleet end to end (issue 12): three ``watchdogd run`` processes, three etcd
members, a real PostgreSQL pair. Promotions are counted from the database (the standby's
timeline) and from the journal in etcd."""

from __future__ import annotations

import asyncio
import copy
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support import timing
from tests.support.daemon import DaemonProcess
from tests.support.fleet import (
    CELLS,
    LOADED,
    NAMES,
    FleetRig,
    cells,
    fleet_config,
    fleet_rig,
    reply_interval,
    timeline,
    write_load,
)
from tests.support.pg import eventually
from tests.support.proxy import BLACKHOLE, FaultProxy

__all__ = ["fleet_rig"]


# A killed primary closes its connections: the standby sees its link go at once on any
# profile, so the link's timing matters less here than in the cut below. Two cells: the
# servers' defaults idle (the slowest link) and the tuned link under load (the standby
# busy replaying when the primary dies).
@pytest.mark.parametrize(
    ("pg_pair", "load"), cells("stock-idle", "tuned-load"), indirect=["pg_pair"]
)
async def test_killing_the_primary_promotes_exactly_once(fleet_rig: FleetRig, load: str) -> None:
    rig = fleet_rig
    shared = fleet_config(rig.pair, rig.tmp, rig.etcd)
    for name in NAMES:
        rig.add(name, shared)
    await rig.start()
    leader = await rig.leader()
    await rig.wait_all(lambda s: s["state"] == "watching", 15, "watching")
    rig.pair.wait_replayed()
    assert timeline(rig.pair.standby) == 1
    async with write_load(rig.pair).running(load == LOADED) as writes:
        await asyncio.sleep(1.0 if load == LOADED else 0.0)  # writes acknowledged before
        rig.pair.primary.kill()
        killed = time.monotonic()
        statuses = await rig.wait_all(lambda s: s["state"] == "failed_over", 20, "failed over")
        took = time.monotonic() - killed
    if load == LOADED:
        assert len(writes.acked) > 5, "the load barely ran"
    print(f"fleet: primary killed -> every watcher failed_over in {took:.2f}s")
    assert took < 2 + 6, took  # threshold 2 s, two vote rounds, the steps
    assert timeline(rig.pair.standby) == 2
    assert not rig.pair.standby.is_in_recovery()
    records = await rig.store_journal()
    assert [r["type"] for r in records].count("failover_started") == 1
    assert await rig.promotions_in_store() == 1
    # Every watcher follows the journal: the same failover, roles swapped everywhere.
    ids = {s["last_failover"]["id"] for s in statuses.values()}
    assert len(ids) == 1
    assert {s["roles"]["primary"] for s in statuses.values()} == {"failover"}
    # Only the leader ran it.
    started = [n for n, d in rig.watchers.items() if '"failover_started"' in d.logs()]
    assert started == [leader], rig.logs()
    await asyncio.sleep(2.0)  # and nobody promotes again
    assert timeline(rig.pair.standby) == 2


async def test_the_store_down_is_no_reason_to_fail_over(fleet_rig: FleetRig) -> None:
    rig = fleet_rig
    shared = fleet_config(rig.pair, rig.tmp, rig.etcd)
    for name in NAMES:
        rig.add(name, shared)
    await rig.start()
    await rig.leader()
    await rig.wait_all(lambda s: s["state"] == "watching", 15, "watching")
    rig.pair.wait_replayed()
    for member in rig.etcd.members:
        member.sigstop()
    await rig.wait_all(lambda s: s["state"] == "store_unavailable", 10, "store_unavailable")
    rig.pair.primary.kill()
    await asyncio.sleep(2 + 5)  # the threshold and several seconds more
    assert rig.pair.standby.is_in_recovery() and timeline(rig.pair.standby) == 1
    statuses = await rig.statuses()
    for name, status in statuses.items():
        assert status["state"] == "store_unavailable", (name, status["reason"])
        assert status["store"]["up"] is False
        metrics = await rig.watchers[name].metrics()
        assert 'watchdogd_store_up{cluster="orders"} 0.0' in metrics
    # The store answers again: the fleet fails over, once.
    for member in rig.etcd.members:
        member.sigcont()
    await rig.wait_all(lambda s: s["state"] == "failed_over", 30, "failed over")
    assert timeline(rig.pair.standby) == 2
    assert await rig.promotions_in_store() == 1


async def test_a_new_leader_resumes_and_runs_no_step_twice(
    fleet_rig: FleetRig, tmp_path: Path
) -> None:
    rig = fleet_rig
    ran = tmp_path / "slow-step.log"
    steps: list[dict[str, Any]] = [
        {
            # Not idempotent and not required: interrupted, it is not run again and the
            # failover goes on to the promotion.
            "name": "slow",
            "action": "command",
            "timeout": "3s",
            "required": False,
            "argv": ["sh", "-c", f"echo {{failover_id}} >> {ran}; sleep 2.5"],
        },
        {"name": "stop_replication", "action": "stop_replication", "timeout": "2s"},
        {"name": "promote_standby", "action": "promote", "timeout": "2s"},
    ]
    shared = fleet_config(rig.pair, rig.tmp, rig.etcd, ttl="6s", steps=steps)
    for name in NAMES:
        rig.add(name, shared)
    await rig.start()
    leader = await rig.leader()
    await rig.wait_all(lambda s: s["state"] == "watching", 15, "watching")
    rig.pair.wait_replayed()
    rig.pair.primary.kill()
    await eventually(lambda: ran.exists(), within=15)
    rig.watchers[leader].kill()  # SIGKILL mid-step
    del rig.watchers[leader]
    successor = await rig.leader(within=20, other_than=leader)
    assert successor != leader
    await rig.wait_all(lambda s: s["state"] == "failed_over", 25, "failed over")
    assert timeline(rig.pair.standby) == 2
    assert len(ran.read_text().splitlines()) == 1  # the slow step ran once
    records = await rig.store_journal()
    assert [r["type"] for r in records].count("failover_started") == 1
    slow = [r for r in records if r["type"] == "step_finished" and r["step"] == "slow"]
    assert [r["outcome"] for r in slow] == ["interrupted"]
    assert await rig.promotions_in_store() == 1
    assert '"failover_resumed"' in rig.watchers[successor].logs()


async def test_voters_with_different_configs_refuse_an_automatic_failover(
    fleet_rig: FleetRig,
) -> None:
    rig = fleet_rig
    shared = fleet_config(rig.pair, rig.tmp, rig.etcd)
    for name in NAMES:
        cfg = copy.deepcopy(shared)
        if name == "dc3":
            cfg["failover"]["outage_threshold"] = "3s"  # a decision-relevant difference
        rig.add(name, cfg)
    await rig.start()
    leader = await rig.leader()
    await rig.wait_all(lambda s: s["state"] == "watching", 15, "watching")
    rig.pair.wait_replayed()
    rig.pair.primary.kill()
    deadline = time.monotonic() + 3 + 5
    while time.monotonic() < deadline:
        status = await rig.watchers[leader].status()
        if "different configs" in status["reason"]:
            break
        await asyncio.sleep(0.2)
    assert status["state"] == "blocked", status["reason"]
    assert "automatic failover refused: voters run different configs" in status["reason"]
    mismatched = {n for n, v in status["store"]["voters"].items() if v["config_matches"] is False}
    assert mismatched == ({"dc3"} if leader != "dc3" else {"dc1", "dc2"})
    await asyncio.sleep(3.0)
    assert rig.pair.standby.is_in_recovery() and timeline(rig.pair.standby) == 1
    assert await rig.promotions_in_store() == 0


# The standby streams all along, and how its link looks (quiet for up to 30 s when idle
# on stock, busy under load) is what the watchers' views of the standby report: all
# four cells.
@pytest.mark.parametrize(("pg_pair", "load"), CELLS, indirect=["pg_pair"])
async def test_a_watcher_cut_from_the_primary_fails_nothing_over(
    fleet_rig: FleetRig, load: str
) -> None:
    """The leader's own link to the primary is cut (its DSN through the fault proxy);
    the other two watchers see the primary up and writable: their views veto, and a
    minority sees nothing down. No promotion."""
    rig = fleet_rig
    writes = write_load(rig.pair)
    shared = fleet_config(rig.pair, rig.tmp, rig.etcd)
    async with FaultProxy(rig.pair.primary.port) as proxy:
        cut = rig.add("dc1", shared, primary_port=proxy.port)
        await rig.start("dc1")
        assert await rig.leader() == "dc1"  # alone: it leads
        for name in ("dc2", "dc3"):
            rig.add(name, shared)
        await rig.start("dc2", "dc3")
        await rig.wait_all(lambda s: s["state"] == "watching", 15, "watching")
        assert await rig.leader() == "dc1"
        async with writes.running(load == LOADED):
            proxy.set_mode(BLACKHOLE)
            # The threshold and more, and an idle standby's reply interval and more.
            await asyncio.sleep(max(2 + 4, reply_interval(rig.pair) + 2))
        # One status is one instant: on a loaded machine the leader may be between a
        # late renewal and the next, and then refuses for its short authority first. It
        # refuses at every sample, and the veto shows within a few.
        deadline = time.monotonic() + timing.within(3)
        while True:
            status = await cut.status()
            assert status["store"]["is_leader"] and status["state"] != "failing_over"
            assert status["store"]["refusal"] is not None, status
            if status["store"]["refusal"].startswith("vetoed") or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        voters = status["store"]["voters"]
        for name in ("dc2", "dc3"):
            assert voters[name]["fresh"] and voters[name]["primary_writable"] is True, voters
            assert voters[name]["primary_down"] is False
        # A veto, whatever dc1 itself sees.
        assert status["store"]["refusal"].startswith("vetoed: the primary is up and writable")
        assert rig.pair.standby.is_in_recovery()
        assert timeline(rig.pair.standby) == 1
        assert await rig.promotions_in_store() == 0
        if load == LOADED:  # the primary served all along
            assert len(writes.acked) > 20 and writes.failed == 0, (writes.acked, writes.failed)


async def test_a_leader_frozen_past_its_lease_acts_on_nothing_when_it_wakes(
    fleet_rig: FleetRig, tmp_path: Path
) -> None:
    """SIGSTOP of the leader mid-step, past its lease: another watcher takes over and
    fails over; the old leader, continued, finds its authority over (its clock says the
    deadline passed) and its token lost: no further step, no second promotion."""
    rig = fleet_rig
    ran = tmp_path / "slow-step.log"
    steps: list[dict[str, Any]] = [
        {
            "name": "slow",
            "action": "command",
            "timeout": "3s",
            "required": False,
            "argv": ["sh", "-c", f"echo {{failover_id}} >> {ran}; sleep 2.5"],
        },
        {"name": "stop_replication", "action": "stop_replication", "timeout": "2s"},
        {"name": "promote_standby", "action": "promote", "timeout": "2s"},
    ]
    shared = fleet_config(rig.pair, rig.tmp, rig.etcd, ttl="6s", steps=steps)
    for name in NAMES:
        rig.add(name, shared)
    await rig.start()
    leader = await rig.leader()
    await rig.wait_all(lambda s: s["state"] == "watching", 15, "watching")
    rig.pair.wait_replayed()
    rig.pair.primary.kill()
    await eventually(lambda: ran.exists(), within=15)
    frozen = rig.watchers.pop(leader)  # out of the rig's status polling, killed below
    assert frozen.proc is not None
    try:
        await frozen_past_its_lease(rig, frozen, leader, ran)
    finally:
        frozen.kill()


async def frozen_past_its_lease(
    rig: FleetRig, frozen: DaemonProcess, leader: str, ran: Path
) -> None:
    assert frozen.proc is not None
    frozen.proc.send_signal(signal.SIGSTOP)
    try:
        await rig.leader(within=20, other_than=leader)
        await rig.wait_all(lambda s: s["state"] == "failed_over", 25, "failed over")
    finally:
        frozen.proc.send_signal(signal.SIGCONT)
    assert timeline(rig.pair.standby) == 2
    before = await rig.store_journal()

    async def stepped_down() -> bool:
        status = await frozen.status()
        return not status["store"]["is_leader"]

    await eventually(stepped_down, within=10)
    await asyncio.sleep(2.0)
    assert timeline(rig.pair.standby) == 2
    assert await rig.store_journal() == before  # the old leader wrote nothing more
    assert len((await asyncio.to_thread(ran.read_text)).splitlines()) == 1
    assert await rig.promotions_in_store() == 1
    logs = frozen.logs()
    assert '"fleet_leadership_lost"' in logs
    # It never started the next step on its own.
    started = [e for e in frozen.events() if e.get("event") == "step_started"]
    assert [e["step"] for e in started] == ["slow"]


async def test_an_etcd_leader_change_during_the_countdown_promotes_once(
    fleet_rig: FleetRig,
) -> None:
    rig = fleet_rig
    shared = fleet_config(rig.pair, rig.tmp, rig.etcd)
    for name in NAMES:
        rig.add(name, shared)
    await rig.start()
    await rig.leader()
    await rig.wait_all(lambda s: s["state"] == "watching", 15, "watching")
    rig.pair.wait_replayed()
    etcd_leader = rig.etcd.leader()
    other = next(m for m in rig.etcd.members if m is not etcd_leader)
    rig.pair.primary.kill()
    await asyncio.to_thread(rig.etcd.move_leader, other)  # leases reset, no vote lost
    await rig.wait_all(lambda s: s["state"] == "failed_over", 20, "failed over")
    assert timeline(rig.pair.standby) == 2
    assert await rig.promotions_in_store() == 1
    records = await rig.store_journal()
    assert [r["type"] for r in records].count("failover_started") == 1
