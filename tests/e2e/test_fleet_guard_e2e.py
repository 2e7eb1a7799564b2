"""The guard beside the primary, end to end (issue 12): three etcd members, the real
PostgreSQL pair, three ``watchdogd run`` watchers (dc1..dc3) and a real
``watchdogd guard`` process with its own config file. Promotions are counted from the
database (the standby's timeline) and from the journal in etcd; the order of the
guard's fence and the promotion is read from the journal's own records."""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import datetime
from typing import Any

import asyncpg
import pytest

from tests.support import timing
from tests.support.fleet import (
    CLUSTER,
    LOADED,
    NAMES,
    PREFIX,
    FleetRig,
    GuardProcess,
    cells,
    fleet_config,
    fleet_rig,
    timeline,
    write_load,
)
from tests.support.pg import eventually
from tests.support.proxy import BLACKHOLE, FaultProxy
from watchdogd.demo.lab import PgServer
from watchdogd.state.etcd import EtcdClient
from watchdogd.state.guard_keys import Ack, GuardKeys

__all__ = ["fleet_rig"]

ISO = 3.0  # guard.isolation_timeout
TTL = 5.0  # fleet_config's lease ttl (the guard's lease too)
KEYS = GuardKeys.under(f"{PREFIX}/{CLUSTER}")


def guarded_config(rig: FleetRig) -> dict[str, Any]:
    shared = fleet_config(rig.pair, rig.tmp, rig.etcd)
    shared["guard"] = {"isolation_timeout": f"{ISO:g}s"}
    return shared


async def writable(server: PgServer) -> bool | None:
    """A fresh session's write, straight to the server (never through a proxy): True
    accepted, False refused read-only, None no answer."""
    try:
        conn = await asyncpg.connect(server.dsn, timeout=2)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return None
    try:
        await conn.execute("INSERT INTO app VALUES (1)", timeout=2)
        return True
    except asyncpg.ReadOnlySQLTransactionError:
        return False
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return None
    finally:
        with contextlib.suppress(Exception):
            await conn.close(timeout=2)


async def answer(server: PgServer, within: float = 3.0) -> bool | None:
    """``writable`` until it answers (None is no answer: a session the guard's fence
    ended, which the order follower may repeat once after the promise was kept, from a
    read taken before its ack), at most ``within`` seconds; the last result."""
    until = time.monotonic() + timing.within(within)
    while True:
        result = await writable(server)
        if result is not None or time.monotonic() >= until:
            return result
        await asyncio.sleep(0.1)


async def first_refusal(server: PgServer, within: float) -> tuple[float, float] | None:
    """Write every 0.1 s until one is refused: (monotonic, wall) of that refusal, or None
    after ``within``."""
    until = time.monotonic() + within
    while time.monotonic() < until:
        if await writable(server) is False:
            return time.monotonic(), time.time()
        await asyncio.sleep(0.1)
    return None


async def stored_ack(rig: FleetRig) -> Ack | None:
    async with EtcdClient(rig.etcd.endpoints, timeout=2.0) as client:
        kv = await client.get(KEYS.ack)
    return None if kv is None else Ack.decode(kv.value)


def wall_of(event: dict[str, Any]) -> float:
    """A log line's ``ts`` (ISO, UTC) as epoch seconds."""
    return datetime.fromisoformat(str(event["ts"]).replace("Z", "+00:00")).timestamp()


async def start_fleet(rig: FleetRig, guard: GuardProcess) -> str:
    guard.start()
    await eventually(rig.guard_alive, within=15)
    await rig.start()
    leader = await rig.leader()
    await rig.wait_all(lambda s: s["state"] == "watching", 15, "watching")
    await asyncio.to_thread(rig.pair.wait_replayed)
    assert timeline(rig.pair.standby) == 1
    assert await writable(rig.pair.primary) is True
    return leader


def guard_fence_then_promote(records: list[dict[str, Any]]) -> tuple[dict[str, Any], float]:
    """The guard_fence step's one ``ok`` finish, and the wall time the promote step
    started; asserts the finish comes first in the journal and by the records' clocks."""
    fence = [
        (i, r)
        for i, r in enumerate(records)
        if r["type"] == "step_finished" and r["step"] == "guard_fence"
    ]
    assert [r["outcome"] for _, r in fence] == ["ok"], fence
    promote = [
        (i, r)
        for i, r in enumerate(records)
        if r["type"] == "step_started" and r["action"] == "promote"
    ]
    assert len(promote) == 1, promote
    (fence_at, fenced), (promote_at, promoting) = fence[0], promote[0]
    assert fence_at < promote_at, (fence_at, promote_at)
    assert fenced["at"] <= promoting["at"]
    return fenced, float(promoting["at"])


# A crash closes the standby's link at once on any profile, and the guard answers
# "down" whatever its reply window: the servers' defaults idle and the tuned link under
# load. (The isolated-site case below stays on the tuned profile: on stock the fleet
# confirms a cut-off primary only after the standby's own 60 s wal_receiver_timeout,
# past what one test may cost; the guard's half of it, fencing within its reply window
# on stock, runs on all four cells in tests/integration/test_guard.py.)
@pytest.mark.parametrize(
    ("pg_pair", "load"), cells("stock-idle", "tuned-load"), indirect=["pg_pair"]
)
async def test_a_crashed_primary_with_a_live_guard_fails_over_once_and_comes_back_fenced(
    fleet_rig: FleetRig, load: str
) -> None:
    rig = fleet_rig
    rig.pair.primary.execute("CREATE TABLE app (x int)")
    shared = guarded_config(rig)
    guard = rig.add_guard(shared)
    for name in NAMES:
        rig.add(name, shared)
    await start_fleet(rig, guard)

    async with write_load(rig.pair).running(load == LOADED) as writes:
        await asyncio.sleep(1.0 if load == LOADED else 0.0)  # writes acknowledged before
        rig.pair.primary.kill()  # SIGKILL: a crash; its host and its guard run on
        await rig.wait_all(lambda s: s["state"] == "failed_over", 25, "failed over")
    if load == LOADED:
        assert len(writes.acked) > 5, "the load barely ran"
    assert timeline(rig.pair.standby) == 2, rig.logs()
    assert not rig.pair.standby.is_in_recovery()
    records = await rig.store_journal()
    assert [r["type"] for r in records].count("failover_started") == 1
    assert await rig.promotions_in_store() == 1
    fenced, _ = guard_fence_then_promote(records)
    assert "cleared (down)" in fenced["detail"], fenced["detail"]
    ack = await stored_ack(rig)
    assert ack is not None and ack.down and not ack.fenced, ack
    assert guard.events("guard: the database is down; it is fenced the moment it answers")

    # The old primary comes back (as its service manager would restart it): the guard
    # keeps its "down" promise and fences it at once.
    await asyncio.to_thread(rig.pair.primary.start)
    back = time.monotonic()
    refused = await first_refusal(rig.pair.primary, timing.within(5))
    assert refused is not None, rig.logs()
    assert refused[0] - back <= timing.within(2), refused[0] - back
    await eventually(lambda: guard.events("guard fenced its database as it came back"), within=5)

    async def acked_fenced() -> bool:
        ack = await stored_ack(rig)
        return ack is not None and ack.fenced and "back and fenced" in ack.detail

    await eventually(acked_fenced, within=5)
    assert await answer(rig.pair.primary) is False
    await asyncio.sleep(1.0)  # and nobody promotes again
    assert timeline(rig.pair.standby) == 2
    assert await rig.promotions_in_store() == 1


async def test_an_isolated_primary_site_is_fenced_by_its_guard_before_the_standby_is_promoted(
    fleet_rig: FleetRig,
) -> None:
    """The primary's site (the database and its guard) is cut off from everything: the
    watchers reach the primary through a proxy, the guard reaches each etcd member
    through one, the standby streams through one. All cut at once; the primary runs on,
    writable to its own site until its guard fences it."""
    rig = fleet_rig
    rig.pair.primary.execute("CREATE TABLE app (x int)")
    shared = guarded_config(rig)
    primary = rig.pair.primary
    async with contextlib.AsyncExitStack() as stack:
        to_primary = await stack.enter_async_context(FaultProxy(primary.port))
        replication = await stack.enter_async_context(FaultProxy(primary.port))
        to_etcd = [
            await stack.enter_async_context(FaultProxy(member.client_port))
            for member in rig.etcd.members
        ]
        await asyncio.to_thread(rig.pair.repoint_standby, replication.port)
        guard = rig.add_guard(shared, endpoints=[f"http://127.0.0.1:{p.port}" for p in to_etcd])
        for name in NAMES:
            rig.add(name, shared, primary_port=to_primary.port)
        await start_fleet(rig, guard)

        for proxy in (to_primary, replication, *to_etcd):
            proxy.set_mode(BLACKHOLE)
        cut = time.monotonic()
        refusal = asyncio.create_task(first_refusal(primary, ISO + timing.within(10)))
        # Its own site still writes to it: nothing fenced it yet.
        assert await writable(primary) is True

        await rig.wait_all(lambda s: s["state"] == "failed_over", 35, "failed over")
        refused = await refusal
        assert refused is not None, "the isolated guard never fenced its database"
        refused_mono, refused_wall = refused
        # Not before its isolation timeout: its last sign of life (a renewal, sent every
        # ttl/3; a standby reply, every second in the lab) came at most ttl/3 before
        # the cut.
        assert refused_mono >= cut + ISO - TTL / 3 - 0.3, refused_mono - cut
        # Fenced by the guard, as isolated: the primary still runs, a primary, read-only.
        isolated = guard.events("guard fenced its database: isolated")
        assert len(isolated) == 1, guard.logs()[-3000:]
        assert isolated[0]["silent_for"] >= ISO
        assert not primary.is_in_recovery()
        assert primary.execute("SHOW default_transaction_read_only") == "on"
        assert await writable(primary) is False

        assert timeline(rig.pair.standby) == 2, rig.logs()
        assert not rig.pair.standby.is_in_recovery()
        records = await rig.store_journal()
        assert [r["type"] for r in records].count("failover_started") == 1
        assert await rig.promotions_in_store() == 1
        fenced, promote_started = guard_fence_then_promote(records)
        # Cleared because the guard's key was gone for the isolation timeout.
        assert "cleared (expired)" in fenced["detail"], fenced["detail"]
        # The old primary refused writes before the promotion started (wall clocks of
        # this one machine): by the test's own probe and by the guard's log line.
        assert refused_wall < promote_started, (refused_wall, promote_started)
        assert wall_of(isolated[0]) < promote_started
        print(
            f"guard: cut -> old primary fenced {refused_mono - cut:.2f}s; "
            f"fenced {promote_started - refused_wall:.2f}s before the promotion started"
        )
        await asyncio.sleep(1.0)  # and nobody promotes again
        assert timeline(rig.pair.standby) == 2
        assert await rig.promotions_in_store() == 1


async def test_a_voter_without_the_guard_section_refuses_the_automatic_failover(
    fleet_rig: FleetRig,
) -> None:
    """Whether the leader waits for the guard is a decision setting: a leader without
    ``guard:`` would promote over a primary its guard never fenced. A voter whose file
    lacks it runs a different config: the automatic failover is refused, whoever leads."""
    rig = fleet_rig
    rig.pair.primary.execute("CREATE TABLE app (x int)")
    shared = guarded_config(rig)
    guard = rig.add_guard(shared)
    for name in NAMES:
        cfg = dict(shared)
        if name == "dc3":
            del cfg["guard"]
        rig.add(name, cfg)
    leader = await start_fleet(rig, guard)

    rig.pair.primary.kill()
    deadline = time.monotonic() + timing.within(2 + 6)
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = await rig.watchers[leader].status()
        if "different configs" in status["reason"] or status["state"] == "failed_over":
            break
        await asyncio.sleep(0.2)
    assert status["state"] == "blocked", (status["state"], status["reason"], rig.logs())
    assert "automatic failover refused: voters run different configs" in status["reason"]
    await asyncio.sleep(2.0)
    assert rig.pair.standby.is_in_recovery() and timeline(rig.pair.standby) == 1
    assert await rig.promotions_in_store() == 0
