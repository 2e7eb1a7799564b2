"""The guard beside the primary (watchdogd/guard.py) against a real three-member etcd
and a real PostgreSQL pair: it fences on a valid order and acknowledges, ignores a
stale one, fences itself when cut from the store with no standby streaming (and not
before its isolation timeout, nor while a standby streams), and the leader's clearance
waits for its ack or for its key to have been gone for the isolation timeout. A crashed
(SIGKILLed) primary is answered "down" and clears the leader, and comes back fenced
(with data_dir: read-only from its first session), also under a restarted guard and a
stale token; a hung (SIGSTOPped) one never clears while the guard lives.

The guard runs in the test's event loop with its own etcd client (its links to the
members go through fault proxies where a test cuts them), or as its own process where a
test kills it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest

from tests.support import timing
from tests.support.etcd import EtcdCluster
from tests.support.fleet import CELLS, LOADED, reply_interval, write_load
from tests.support.pg import eventually
from tests.support.proxy import BLACKHOLE, PASS, FaultProxy
from tests.support.redis import _die_with_parent
from watchdogd.core.model import DatabaseConfig
from watchdogd.demo.lab import PgPair
from watchdogd.engines.postgres import PostgresEngine
from watchdogd.guard import Guard, GuardSettings, SignsOfLife
from watchdogd.state.etcd import EtcdClient
from watchdogd.state.etcd_store import EtcdStore
from watchdogd.state.guard_keys import (
    GUARD_DB_TIMEOUT,
    Ack,
    GuardKeys,
    Order,
    Published,
    guard_clearance,
    order_fence,
)
from watchdogd.state.store import Token, TokenLost

pytestmark = pytest.mark.integration

PREFIX = "/watchdogd/guard-test"
TTL = 3.0  # etcd's floor with the fixture's 1 s election timeout is 2 s
ISO = 3.0
POLL = 0.25
KEYS = GuardKeys.under(PREFIX)


def published_window(published: float, interval: float) -> bool:
    """The isolation timeout the guard published is the standby's window: at least that
    of its configured interval; more once it saw two replies further apart (the
    standby's timer runs a little late, ~0.1 s, more on a loaded machine)."""
    window = standby_window(interval)
    return window <= published <= window + timing.within(2)


def standby_window(interval: float) -> float:
    """How long after the standby's last reply the guard may count it gone: its
    isolation timeout, or the standby's reply interval (``interval``, the lab's servers
    share it) plus two polls and four reads, when longer (docs/fleet.md)."""
    return max(ISO, interval + 2 * POLL + 4 * GUARD_DB_TIMEOUT)


class RecordingLog:
    """The guard's log lines, to assert on (structlog's method names)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def _add(self, level: str, event: str, **kw: Any) -> None:
        self.events.append((level, event, kw))

    def info(self, event: str, **kw: Any) -> None:
        self._add("info", event, **kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._add("warning", event, **kw)

    def error(self, event: str, **kw: Any) -> None:
        self._add("error", event, **kw)

    def named(self, event: str) -> list[dict[str, Any]]:
        return [kw for _, e, kw in self.events if e == event]


@dataclass
class Lab:
    etcd: EtcdCluster
    pair: PgPair
    client: EtcdClient  # the leader's and the test's (direct to the members)
    guard: Guard
    log: RecordingLog
    proxies: list[FaultProxy]
    task: asyncio.Task[Any] | None = None
    keepers: list[asyncio.Task[Any]] = field(default_factory=list)

    def cut(self) -> float:
        for proxy in self.proxies:
            proxy.set_mode(BLACKHOLE)
        return time.monotonic()

    async def lead(self, holder: str) -> tuple[EtcdStore, Token]:
        """Become the fleet leader and keep the lease alive for the rest of the test."""
        store = EtcdStore(self.client, PREFIX)
        token = await store.campaign(holder, TTL)
        assert token is not None and store.lease is not None
        self.keepers.append(asyncio.create_task(store.lease.keep(TTL / 3)))
        return store, token

    async def alive(self) -> bool:
        return await self.client.get(KEYS.alive) is not None


@contextlib.asynccontextmanager
async def lab(
    etcd: EtcdCluster,
    pair: PgPair,
    *,
    proxied: bool = False,
    in_process: bool = True,
    data_dir: bool = False,
    standby_hosts: tuple[str, ...] = ("127.0.0.1",),
) -> AsyncIterator[Lab]:
    """The guard for the primary, running in this event loop (``in_process``) or not
    at all (the test starts a ``guard_process``); ``data_dir``: its database config
    names the primary's data directory."""
    pair.primary.execute("CREATE TABLE app (x int)")
    proxies: list[FaultProxy] = []
    endpoints = etcd.endpoints
    if proxied:
        for member in etcd.members:
            proxy = FaultProxy(member.client_port)
            await proxy.start()
            proxies.append(proxy)
        endpoints = [f"http://127.0.0.1:{p.port}" for p in proxies]
    settings = GuardSettings(
        node="primary",
        endpoints=tuple(endpoints),
        prefix=PREFIX,
        ttl=TTL,
        isolation_timeout=ISO,
        poll=POLL,
        request_timeout=0.5,
        database=DatabaseConfig(
            "postgres",
            pair.primary.dsn,
            {"data_dir": str(pair.primary.data_dir)} if data_dir else {},
        ),
        standby_hosts=standby_hosts,
    )
    log = RecordingLog()
    engine = PostgresEngine(pair.primary.dsn)
    guard_client = settings.client()
    client = EtcdClient(etcd.endpoints, timeout=1.0)
    it = Lab(etcd, pair, client, Guard(settings, guard_client, engine, log=log), log, proxies)
    if in_process:
        it.task = asyncio.create_task(it.guard.run())
    try:
        if in_process:
            await eventually(it.alive, within=10)
        yield it
    finally:
        tasks = [*it.keepers, *([it.task] if it.task is not None else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for proxy in proxies:
            await proxy.stop()
        await guard_client.close()
        await client.close()
        await engine.close()


# The guard as its own process, as `watchdogd guard` runs it (run_guard: the engine from
# the node's database config), to be killed with SIGKILL.
_GUARD_MAIN = """
import asyncio, json, sys
from watchdogd.core.model import DatabaseConfig
from watchdogd.guard import GuardSettings, run_guard
args = json.loads(sys.argv[1])
settings = GuardSettings(
    node="primary", endpoints=tuple(args["endpoints"]), prefix=args["prefix"],
    ttl=args["ttl"], isolation_timeout=args["iso"], poll=args["poll"],
    database=DatabaseConfig("postgres", args["dsn"]), standby_hosts=("127.0.0.1",),
)
asyncio.run(run_guard(settings))
"""


def guard_process(etcd: EtcdCluster, pair: PgPair) -> subprocess.Popen[bytes]:
    args = {"endpoints": etcd.endpoints, "prefix": PREFIX, "ttl": TTL, "iso": ISO,
            "poll": POLL, "dsn": pair.primary.dsn}  # fmt: skip
    return subprocess.Popen(
        [sys.executable, "-c", _GUARD_MAIN, json.dumps(args)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=_die_with_parent,
    )


# A session ended under the probe (the fence ends every session, and the order follower
# may fence once more from a read taken before the promise's "fenced" ack): no answer.
_ENDED = (
    asyncpg.AdminShutdownError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)


async def writable(pair: PgPair) -> bool:
    """A fresh session's write on the primary: True accepted, False refused read-only
    (a session ended before it answered is asked again, in a new one, twice at most)."""
    for attempt in range(3):
        conn = await asyncpg.connect(pair.primary.dsn, timeout=5)
        try:
            await conn.execute("INSERT INTO app VALUES (1)", timeout=5)
            return True
        except asyncpg.ReadOnlySQLTransactionError:
            return False
        except _ENDED:
            if attempt == 2:
                raise
        finally:
            with contextlib.suppress(*_ENDED, OSError):
                await conn.close(timeout=5)
    raise AssertionError("unreachable")


async def read_only(pair: PgPair) -> bool:
    """A fresh session on the primary is read-only (the fence), asked without writing:
    a write makes WAL, and WAL makes the standby reply at once, which would hide how an
    IDLE standby replies (every wal_receiver_status_interval)."""
    conn = await asyncpg.connect(pair.primary.dsn, timeout=5)
    try:
        return bool(await conn.fetchval("SELECT current_setting('transaction_read_only')::bool"))
    finally:
        await conn.close(timeout=5)


async def acked_fenced(client: EtcdClient) -> bool:
    """The ack in the store says fenced."""
    kv = await client.get(KEYS.ack)
    return kv is not None and Ack.decode(kv.value).fenced


async def first_refusal(pair: PgPair, until: float) -> float | None:
    """Probe writes every 0.1 s until one is refused (its time) or ``until`` (None)."""
    while time.monotonic() < until:
        if not await writable(pair):
            return time.monotonic()
        await asyncio.sleep(0.1)
    return None


async def test_a_valid_order_fences_the_primary_acks_and_clears_the_leader(
    etcd: EtcdCluster, pg_pair: PgPair
) -> None:
    async with lab(etcd, pg_pair) as it:
        _, token = await it.lead("dc1")
        # Alive and no order of ours: the leader is not cleared.
        early = await guard_clearance(it.client, PREFIX, token, "f1", ISO, time.monotonic, 1.0)
        assert not early.cleared and "alive" in early.reason
        assert await writable(pg_pair)

        revision = await order_fence(it.client, PREFIX, token, "f1", node="primary")
        verdict = await guard_clearance(
            it.client, PREFIX, token, "f1", ISO, time.monotonic, timing.within(10)
        )
        assert verdict.cleared and verdict.via == "ack", verdict.reason
        assert not await writable(pg_pair)
        ack = it.guard.acks[-1]
        assert (ack.order_revision, ack.token, ack.fenced) == (revision, token.revision, True)
        stored = await it.client.get(KEYS.ack)
        assert stored is not None and b'"fenced": true' in stored.value
        assert it.guard.self_fences == 0  # fenced on the order, not as isolated
        # The acknowledged order is not carried out again.
        await asyncio.sleep(1.0)
        assert len(it.guard.acks) == 1


async def test_an_order_with_a_stale_token_is_ignored(etcd: EtcdCluster, pg_pair: PgPair) -> None:
    async with lab(etcd, pg_pair) as it:
        old_store, old = await it.lead("dc1")
        it.keepers.pop().cancel()
        await old_store.resign(old)
        _, new = await it.lead("dc2")
        assert new.revision > old.revision
        with pytest.raises(TokenLost):
            await order_fence(it.client, PREFIX, old, "f1")
        # An order of the old leader's that slipped in all the same (written raw).
        await it.client.put(KEYS.order, Order(old.revision, "dc1", "f1").encode())
        await asyncio.sleep(2.0)  # eight polls of the guard
        assert await writable(pg_pair)
        assert await it.client.get(KEYS.ack) is None and it.guard.acks == []
        ignored = it.log.named("guard order ignored")
        assert len(ignored) == 1 and "stale" in ignored[0]["reason"]
        verdict = await guard_clearance(it.client, PREFIX, new, "f1", ISO, time.monotonic, 1.0)
        assert not verdict.cleared

        # The guard was listening all along: the new leader's order is carried out.
        await order_fence(it.client, PREFIX, new, "f2", node="primary")
        await eventually(lambda: it.guard.acks, within=10)
        assert not await writable(pg_pair)


async def test_cut_from_the_store_with_no_standby_it_fences_itself_after_the_timeout(
    etcd: EtcdCluster, pg_pair: PgPair
) -> None:
    async with lab(etcd, pg_pair, proxied=True) as it:
        pg_pair.detach_standby()
        await asyncio.sleep(0.5)
        cut_at = it.cut()
        refused_at = await first_refusal(pg_pair, cut_at + ISO + timing.within(5))
        assert refused_at is not None, "the isolated guard never fenced"
        # Not before: its last renewal was sent at most one renewal interval (ttl/3)
        # before the cut, and the timeout counts from there.
        assert refused_at >= cut_at + ISO - TTL / 3 - 0.2
        # The write is refused as soon as the fence is in place; the guard counts it
        # once the fence is verified.
        await eventually(lambda: it.guard.self_fences == 1, within=5)
        fenced = it.log.named("guard fenced its database: isolated")
        assert len(fenced) == 1 and fenced[0]["silent_for"] >= ISO
        # Once: it stays fenced and quiet while the store is still out of reach.
        await asyncio.sleep(1.0)
        assert it.guard.self_fences == 1 and not await writable(pg_pair)

        # It kept trying: the store back, its key returns saying it fenced itself, and
        # the database stays fenced (lifting a fence is never the guard's business).
        for proxy in it.proxies:
            proxy.set_mode(PASS)

        async def back() -> bool:
            kv = await it.client.get(KEYS.alive)
            return kv is not None and b'"self_fenced": true' in kv.value

        await eventually(back, within=10)
        await eventually(lambda: it.log.named("guard reaches the store again"), within=5)
        assert not await writable(pg_pair) and it.guard.self_fences == 1


# The standby's replies as a sign of life depend on how the servers time the link: an
# idle standby replies every wal_receiver_status_interval (10 s stock, 1 s tuned, both
# far apart from ISO), a loaded one at every flush. All four cells.
@pytest.mark.parametrize(("pg_pair", "load"), CELLS, indirect=["pg_pair"])
async def test_cut_from_the_store_with_the_standby_streaming_it_does_not_fence(
    etcd: EtcdCluster, pg_pair: PgPair, load: str
) -> None:
    interval = reply_interval(pg_pair)
    async with lab(etcd, pg_pair, proxied=True) as it, write_load(pg_pair).running(load == LOADED):
        assert pg_pair.standby_streaming()
        cut_at = it.cut()
        # Through the ttl, and through two of an idle standby's reply intervals.
        while time.monotonic() < cut_at + max(ISO + TTL + 2, 2 * interval + 2):
            assert not await read_only(pg_pair), (
                "fenced although a standby streams from it",
                it.log.named("guard fenced its database: isolated"),
            )
            await asyncio.sleep(0.25)
        assert it.guard.self_fences == 0 and it.guard.signs.source == "standby"
        assert not await it.alive()  # the leader sees its key gone meanwhile

        # The standby was the only sign of life: once it leaves, the guard fences.
        detached_at = time.monotonic()
        pg_pair.detach_standby()
        window = standby_window(interval)
        refused_at = await first_refusal(pg_pair, detached_at + window + timing.within(5))
        # Not before: the standby's last reply came at most its status interval and one
        # poll before it left.
        assert refused_at is not None, "the guard never fenced once the standby left"
        assert refused_at >= detached_at + window - interval - POLL - 0.25
        settings = await it.client.get(KEYS.settings)  # what the leader waits out
        assert settings is not None
        assert published_window(Published.decode(settings.value).isolation_timeout, interval)
        await eventually(lambda: it.guard.self_fences == 1, within=5)
        print(f"guard: standby left -> fenced in {refused_at - detached_at:.1f}s")


# The primary's site cut off from everything: the store, and the standby's link (the
# walsender stays "streaming" on stock for wal_sender_timeout, 60 s, but no reply comes).
# How long that takes to count depends on the standby's reply interval: all four cells.
@pytest.mark.parametrize(("pg_pair", "load"), CELLS, indirect=["pg_pair"])
async def test_cut_from_the_store_and_the_standby_it_fences_within_the_standbys_window(
    etcd: EtcdCluster, pg_pair: PgPair, load: str
) -> None:
    interval = reply_interval(pg_pair)
    window = standby_window(interval)
    async with (
        FaultProxy(pg_pair.primary.port) as replication,
        lab(etcd, pg_pair, proxied=True) as it,
        write_load(pg_pair).running(load == LOADED) as writes,
    ):
        await asyncio.to_thread(pg_pair.repoint_standby, replication.port)
        # What the leader reads: the guard waits out the standby's window, and says so.
        settings = await it.client.get(KEYS.settings)
        assert settings is not None
        assert published_window(Published.decode(settings.value).isolation_timeout, interval)
        await asyncio.sleep(1.0)
        replication.set_mode(BLACKHOLE)
        cut_at = it.cut()
        refused_at = await first_refusal(pg_pair, cut_at + window + timing.within(5))
        assert refused_at is not None, "the isolated guard never fenced"
        took = refused_at - cut_at
        print(f"guard ({pg_pair.profile}, {load}): site cut -> fenced in {took:.1f}s")
        # Not before: its last renewal was at most ttl/3 before the cut, the standby's
        # last reply at most its interval (and a poll) before.
        assert took >= max(ISO - TTL / 3, window - interval - POLL) - 0.25, took
        await eventually(lambda: it.guard.self_fences == 1, within=5)
        assert it.log.named("guard fenced its database: isolated")[0]["silent_for"] >= ISO
        if load == LOADED:
            assert len(writes.acked) > 10, "the load barely ran"


async def test_replication_from_another_address_than_the_standbys_is_no_sign_of_life(
    etcd: EtcdCluster, pg_pair: PgPair
) -> None:
    """A WAL client in the primary's own site (pg_receivewal, a backup tool, another
    replica) says nothing about the standby's site: counted, it kept an isolated guard
    from ever fencing while the leader, seeing its key gone, promoted."""
    async with lab(etcd, pg_pair, proxied=True, standby_hosts=("127.0.0.2",)) as it:
        assert pg_pair.standby_streaming()  # from 127.0.0.1: not the configured standby
        cut_at = it.cut()
        refused_at = await first_refusal(pg_pair, cut_at + ISO + timing.within(5))
        assert refused_at is not None and refused_at >= cut_at + ISO - TTL / 3 - POLL
        # The refusal is visible before the fence action returns and is counted.
        await eventually(lambda: it.guard.self_fences == 1, within=5)
        assert it.guard.signs.source != "standby"


async def test_a_dead_guard_clears_the_leader_only_after_its_key_was_gone_the_timeout(
    etcd: EtcdCluster, pg_pair: PgPair
) -> None:
    async with lab(etcd, pg_pair, in_process=False) as it:
        process = guard_process(etcd, pg_pair)
        try:
            await eventually(it.alive, within=15)
            _, token = await it.lead("dc1")
            # It works: a first failover's order is fenced and acknowledged.
            await order_fence(it.client, PREFIX, token, "f0", node="primary")
            first = await guard_clearance(
                it.client, PREFIX, token, "f0", ISO, time.monotonic, timing.within(10)
            )
            assert first.cleared and first.via == "ack", first.reason
            pg_pair.primary.execute("ALTER SYSTEM RESET default_transaction_read_only")
            pg_pair.primary.execute("SELECT pg_reload_conf()")
            await eventually(lambda: writable(pg_pair), within=5)
            process.kill()
            killed_at = time.monotonic()
            process.wait(timeout=10)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
        await order_fence(it.client, PREFIX, token, "f1")  # nobody will ack it
        clearance = asyncio.create_task(
            guard_clearance(
                it.client,
                PREFIX,
                token,
                "f1",
                ISO,
                time.monotonic,
                timing.within(TTL + standby_window(reply_interval(pg_pair)) + 5),
            )
        )
        while await it.alive():
            assert not clearance.done()
            await asyncio.sleep(0.05)
        gone_at = time.monotonic()
        assert gone_at >= killed_at + TTL - TTL / 3 - 0.2  # the lease ran out, no earlier
        verdict = await clearance
        cleared_at = time.monotonic()
        assert verdict.cleared and verdict.via == "expired", verdict.reason
        # The guard's own silence, as it published it: the standby's reply window, as
        # that is longer than ISO (a standby streams from its primary).
        settings = await it.client.get(KEYS.settings)
        assert settings is not None
        waited = Published.decode(settings.value).isolation_timeout
        assert published_window(waited, reply_interval(pg_pair)) and waited > ISO
        assert cleared_at >= gone_at + waited - 0.3
        assert cleared_at <= gone_at + waited + timing.within(1.5)
        assert await writable(pg_pair)  # a dead guard fenced nothing


async def test_a_hung_primary_is_not_down_never_clears_and_is_fenced_when_it_wakes(
    etcd: EtcdCluster, pg_pair: PgPair
) -> None:
    async with lab(etcd, pg_pair) as it:
        _, token = await it.lead("dc1")
        await asyncio.to_thread(pg_pair.primary.sigstop)  # TCP connects still complete
        try:
            await order_fence(it.client, PREFIX, token, "f1", node="primary")
            await eventually(lambda: it.guard.acks, within=10)
            ack = it.guard.acks[0]
            assert not ack.fenced and not ack.down and "fence failed" in ack.detail
            # Longer than the isolation rule would take if the guard were gone: a live
            # guard with a hung database never clears (it may wake up writable).
            verdict = await guard_clearance(
                it.client, PREFIX, token, "f1", ISO, time.monotonic, ISO + 1
            )
            assert not verdict.cleared and "could not fence" in verdict.reason
            assert len(it.guard.acks) == 1  # the same failure is acknowledged once
        finally:
            await asyncio.to_thread(pg_pair.primary.sigcont)

        # It wakes up: the pending order is carried out at once.
        verdict = await guard_clearance(
            it.client, PREFIX, token, "f1", ISO, time.monotonic, timing.within(10)
        )
        assert verdict.cleared and verdict.via == "ack", verdict.reason
        assert not await writable(pg_pair)


@pytest.mark.parametrize("data_dir", [True, False], ids=["data_dir", "dsn_only"])
async def test_a_crashed_primary_is_answered_down_clears_and_comes_back_fenced(
    etcd: EtcdCluster, pg_pair: PgPair, data_dir: bool
) -> None:
    async with lab(etcd, pg_pair, data_dir=data_dir) as it:
        _, token = await it.lead("dc1")
        await asyncio.to_thread(pg_pair.primary.kill)  # SIGKILL: a crash, host and guard fine
        await order_fence(it.client, PREFIX, token, "f1", node="primary")
        verdict = await guard_clearance(
            it.client, PREFIX, token, "f1", ISO, time.monotonic, timing.within(5)
        )
        assert verdict.cleared and verdict.via == "down", verdict.reason
        ack = Ack.decode((await it.client.get(KEYS.ack)).value)  # type: ignore[union-attr]
        assert ack.down and not ack.fenced and "refused" in ack.detail
        auto = (pg_pair.primary.data_dir / "postgresql.auto.conf").read_text()
        assert ("default_transaction_read_only = 'on'" in auto) is data_dir

        await asyncio.sleep(1.0)  # the promise holds while it stays down
        await asyncio.to_thread(pg_pair.primary.start)
        back = time.monotonic()
        if data_dir:
            assert not await writable(pg_pair)  # read-only from its very first session
        else:  # the short window: refused within one DOWN_POLL and a fence
            refused_at = await first_refusal(pg_pair, back + timing.within(3))
            assert refused_at is not None and refused_at - back <= timing.within(2)
        await eventually(lambda: acked_fenced(it.client), within=3)
        assert not await writable(pg_pair)
        assert it.guard.promise is None


async def test_a_restarted_guard_keeps_the_down_promise_of_a_stale_order(
    etcd: EtcdCluster, pg_pair: PgPair
) -> None:
    async with lab(etcd, pg_pair) as it:
        store, token = await it.lead("dc1")
        await asyncio.to_thread(pg_pair.primary.kill)
        await order_fence(it.client, PREFIX, token, "f1", node="primary")
        verdict = await guard_clearance(
            it.client, PREFIX, token, "f1", ISO, time.monotonic, timing.within(5)
        )
        assert verdict.via == "down", verdict.reason
        # The leader that failed over on "down" is gone (its token stale), and the
        # guard restarts while the database is still down.
        for keeper in it.keepers:
            keeper.cancel()
        await store.resign(token)
        assert it.task is not None
        it.task.cancel()
        await asyncio.gather(it.task, return_exceptions=True)
        it.guard = Guard(it.guard.settings, it.guard.client, it.guard.engine, log=it.log)
        it.task = asyncio.create_task(it.guard.run())
        await eventually(lambda: it.guard.promise is not None, within=5)

        await asyncio.to_thread(pg_pair.primary.start)
        back = time.monotonic()
        refused_at = await first_refusal(pg_pair, back + timing.within(3))
        assert refused_at is not None and refused_at - back <= timing.within(2)
        await eventually(lambda: acked_fenced(it.client), within=3)


# The rule itself (pure, no server): here beside the cells above that it explains.
def test_a_standby_reply_counts_for_its_window_and_the_longest_gap_is_learned() -> None:
    signs = SignsOfLife(start=0.0)
    signs.standby_window = 15.0  # stock: 10 s replies, two polls, four reads
    signs.standby_mark(100.0, polled_at=1.0)
    signs.standby_mark(110.0, polled_at=11.0)  # a reply after the read sent at 1
    assert signs.longest_gap == 0.0  # the run's first growth measures nothing
    signs.standby_mark(110.0, polled_at=12.0)
    signs.standby_mark(120.5, polled_at=21.0)  # proof at 12; a 10.5 s gap
    assert signs.longest_gap == 10.5 and signs.source == "standby"
    # The store is silent since the start: the standby's proof at 12 holds for 15 s.
    assert not signs.isolated(26.9, ISO) and signs.isolated(27.0, ISO)
    signs.standby_unread()  # a failed read keeps the mark: the next growth still proves
    signs.standby_mark(130.0, polled_at=31.0)
    assert signs.last == 21.0 and signs.longest_gap == 10.5  # no gap measured across it
    signs.standby_mark(None, polled_at=32.0)  # gone: the next run starts afresh
    signs.standby_mark(200.0, polled_at=40.0)
    signs.standby_mark(260.0, polled_at=41.0)
    assert signs.last == 40.0 and signs.longest_gap == 10.5
    # Without a window the standby's proof counts for the timeout, as every sign.
    plain = SignsOfLife(start=0.0)
    plain.standby_mark(1.0, polled_at=5.0)
    plain.standby_mark(2.0, polled_at=6.0)
    assert not plain.isolated(7.9, ISO) and plain.isolated(8.0, ISO)
