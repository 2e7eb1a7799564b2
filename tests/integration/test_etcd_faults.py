"""The etcd store (watchdogd/state/etcd_store.py) under the faults a fleet meets, on a
real three-member cluster with short leases: "no leader" (two members SIGSTOPped), an
etcd leader moved while a lease is held, the quorum gone for longer than the ttl, a
campaign whose reply is lost after it took effect, and replies that are garbage or cut
in the middle (tests/support/etcd.py ``ReplyFaults``).

The rules under test: store trouble is ``StoreUnavailable``, within a bounded time,
never ``TokenLost``; a holder's deadline never moves on trouble; ``TokenLost`` comes
only once a linearizable read shows the leader key is not the token's; nobody else
wins before the old holder's own deadline; tokens grow.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from tests.support import timing
from tests.support.etcd import (
    CUT,
    DROP,
    ELECTION_MS,
    GARBAGE,
    EtcdCluster,
    EtcdMember,
    ReplyFaults,
)
from tests.support.proxy import BLACKHOLE, PASS, REFUSE, FaultProxy
from watchdogd.core import clock
from watchdogd.state import journal as records
from watchdogd.state.etcd import EtcdClient
from watchdogd.state.etcd_store import EtcdStore
from watchdogd.state.store import StoreUnavailable, Token, TokenLost

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

PREFIX = "/watchdogd/faults"
TIMEOUT = 0.5  # per attempt: a call over three endpoints gives up within 1.5 s
TTL = 3


@pytest.fixture
async def clients(etcd: EtcdCluster) -> AsyncIterator[tuple[EtcdClient, EtcdClient]]:
    async with (
        EtcdClient(etcd.endpoints, timeout=TIMEOUT) as one,
        EtcdClient(etcd.endpoints[::-1], timeout=TIMEOUT) as two,
    ):
        yield one, two


def note(n: int) -> dict[str, Any]:
    return records.pause(reason=f"note {n}", by="test", at=float(n))


async def until(call: Callable[[], Awaitable[Any]], bound: float, what: str) -> Any:
    """``call()`` again until it stops raising StoreUnavailable (never anything else)."""
    deadline = time.monotonic() + timing.within(bound)
    while True:
        try:
            return await call()
        except StoreUnavailable:
            assert time.monotonic() < deadline, f"{what}: still unavailable after {bound:g}s"
            await asyncio.sleep(0.1)


async def unavailable_within(call: Awaitable[Any], bound: float) -> StoreUnavailable:
    """``call`` raises StoreUnavailable (not TokenLost, not a hang) within ``bound``."""
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable) as raised:
        await asyncio.wait_for(call, timing.within(bound) + 2)
    assert time.monotonic() - t0 <= timing.within(bound)
    return raised.value


def stop_quorum(etcd: EtcdCluster) -> list[EtcdMember]:
    """SIGSTOP two of three members, the etcd leader among them: the third has no
    leader and cannot elect one."""
    leader = etcd.leader()
    stopped = [leader, next(m for m in etcd.members if m is not leader)]
    for member in stopped:
        member.sigstop()
    # The leader seen a moment ago may have changed before the stop: a leader still
    # running alone keeps answering (lease renewals too) until check-quorum makes it
    # step down, one election timeout later (etcd 3.4). Wait that out, twice over.
    time.sleep(2 * ELECTION_MS / 1000)
    return stopped


async def test_no_leader_is_unavailable_in_bounded_time_and_never_lost(
    etcd: EtcdCluster, clients: tuple[EtcdClient, EtcdClient]
) -> None:
    holder, other = EtcdStore(clients[0], PREFIX), EtcdStore(clients[1], PREFIX)
    token = await holder.campaign("dc1", TTL)
    assert token is not None
    await holder.append(token, note(1))
    assert holder.lease is not None
    deadline = holder.lease.deadline()
    budget = clients[0].retry_budget  # one call: one attempt per endpoint

    stopped = stop_quorum(etcd)
    # Every verb, at once: each gives up within its own budget (two calls for a campaign
    # and for an append that first reads where the journal ends).
    outcomes = await asyncio.gather(
        unavailable_within(holder.renew(token), budget + 1),
        unavailable_within(holder.append(token, note(2)), 2 * budget + 1),
        unavailable_within(holder.entries(), budget + 1),
        unavailable_within(holder.leader(), budget + 1),
        unavailable_within(other.campaign("dc2", TTL), 2 * budget + 1),
        return_exceptions=True,
    )
    failures = [o for o in outcomes if not isinstance(o, StoreUnavailable)]
    assert failures == []
    assert holder.lease is not None and holder.lease.deadline() == deadline  # never moved
    for member in stopped:
        member.sigcont()

    # Quorum back. The lease may have survived (an etcd leader change gives every lease
    # a full ttl again) or not (the old etcd leader came back and expired it): either the
    # same token goes on appending, or TokenLost, and then a fresh read agrees.
    try:
        await until(lambda: holder.renew(token), 15, "renew after the outage")
    except TokenLost:
        current = await until(other.leader, 5, "read the leader")
        assert current is None or current.revision != token.revision
        with pytest.raises(TokenLost):
            await holder.append(token, note(3))
        new = await until(lambda: other.campaign("dc2", TTL), 5, "campaign")
        assert new is not None and new.revision > token.revision
        return
    await until(lambda: holder.append(token, note(3)), 5, "append after the outage")
    assert await other.campaign("dc2", TTL) is None
    assert await other.leader() == token
    notes = [r["reason"] for _, r in await holder.entries()]
    assert notes in (["note 1", "note 3"], ["note 1", "note 2", "note 3"])


async def test_moving_the_etcd_leader_keeps_the_lease_and_the_appends_go_on(
    etcd: EtcdCluster, clients: tuple[EtcdClient, EtcdClient]
) -> None:
    holder, other = EtcdStore(clients[0], PREFIX), EtcdStore(clients[1], PREFIX)
    token = await holder.campaign("dc1", TTL)
    assert token is not None
    written: list[int] = []
    lost: list[BaseException] = []

    checked: list[float] = []

    async def lead() -> None:
        """Renew and append twice a second, as a leader does; unavailable is retried.
        After each renewal, etcd's own count of the lease's time left (whole seconds,
        rounded down) bounds the holder's deadline: it never trusts a lease past etcd's."""
        n = 0
        while True:
            try:
                deadline = await holder.renew(token)
                assert holder.lease is not None
                left = await clients[0].lease_time_to_live(holder.lease.id)
                assert deadline < clock.now() + left + 1, (deadline, left)
                checked.append(deadline)
                n += 1
                await holder.append(token, note(n))
                written.append(n)
            except StoreUnavailable:
                pass
            except TokenLost as exc:
                lost.append(exc)
                return
            await asyncio.sleep(0.5)

    leading = asyncio.create_task(lead())
    try:
        await asyncio.sleep(1)
        for _ in range(2):
            current = etcd.leader()
            target = next(m for m in etcd.members if m is not current)
            await asyncio.to_thread(etcd.move_leader, target)
            await asyncio.sleep(1.5)
            assert await other.campaign("dc2", TTL) is None  # the key is still held
    finally:
        leading.cancel()
        ended = await asyncio.gather(leading, return_exceptions=True)
    assert [e for e in ended if not isinstance(e, asyncio.CancelledError)] == []
    assert lost == []
    assert checked == sorted(checked) and len(checked) >= 4  # deadlines only move on
    assert await other.leader() == token
    # Every acknowledged append is there once, in order (an unacknowledged one may be too).
    landed = [int(r["reason"].split()[1]) for _, r in await holder.entries()]
    assert landed == sorted(set(landed)) and set(written) <= set(landed)
    assert len(written) >= 4


async def test_quorum_gone_past_the_ttl_ends_the_old_token_and_the_next_is_larger(
    etcd: EtcdCluster, clients: tuple[EtcdClient, EtcdClient]
) -> None:
    holder, other = EtcdStore(clients[0], PREFIX), EtcdStore(clients[1], PREFIX)
    token = await holder.campaign("dc1", TTL)
    assert token is not None
    assert holder.lease is not None
    deadline = holder.lease.deadline()

    stopped = stop_quorum(etcd)
    while time.monotonic() < deadline + 1:  # the holder keeps trying, in vain
        await unavailable_within(holder.renew(token), clients[0].retry_budget + 1)
    assert holder.lease.deadline() == deadline  # its authority ended on its own clock
    for member in stopped:
        member.sigcont()

    # The holder stays silent (it is past its deadline); another watcher campaigns until
    # the old lease is gone: never before the holder's own deadline.
    new = await until(
        lambda: other.campaign("dc2", TTL),
        15,
        "campaign after the outage",
    )
    bound = time.monotonic() + timing.within(TTL + 10)
    while new is None:
        assert time.monotonic() < bound, "the old lease never expired"
        await asyncio.sleep(0.2)
        new = await until(lambda: other.campaign("dc2", TTL), 5, "campaign")
    assert time.monotonic() >= deadline
    assert new.revision > token.revision
    with pytest.raises(TokenLost):
        await holder.append(token, note(1))
    with pytest.raises(TokenLost):
        await holder.renew(token)  # confirmed by a read: the key is dc2's
    await other.append(new, note(2))
    assert [r["reason"] for _, r in await other.entries()] == ["note 2"]


async def test_a_campaign_whose_reply_was_lost_is_settled_by_the_next(
    etcd: EtcdCluster, clients: tuple[EtcdClient, EtcdClient]
) -> None:
    member = etcd.members[0]
    others = [m.client_url for m in etcd.members[1:]]
    other = EtcdStore(clients[1], PREFIX)
    async with (
        ReplyFaults(member.client_port) as proxy,
        EtcdClient([proxy.url, *others], timeout=TIMEOUT) as client,
        EtcdClient([proxy.url], timeout=TIMEOUT) as lonely,
    ):
        holder = EtcdStore(client, PREFIX)
        # The txn creating the key reaches etcd, its reply is lost; the retry on the next
        # member finds the key: outcome unknown, never "lost", and not acted on.
        proxy.arm("/v3/kv/txn", DROP)
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable) as unknown:
            await holder.campaign("dc1", TTL)
        t1 = time.monotonic()
        assert unknown.value.maybe_applied and proxy.faulted == ["/v3/kv/txn"]
        assert holder.lease is None
        assert await other.campaign("dc2", TTL) is None  # the key is there

        # The next campaign reads that the key sits on its lease: it is ours, and its
        # deadline counts from the grant, before the lost reply (not from the settling).
        token = await holder.campaign("dc1", TTL)
        assert token is not None
        assert await other.leader() == token
        assert holder.lease is not None
        assert t0 <= holder.lease.last.sent_at <= t1
        await holder.append(token, note(1))
        await holder.resign(token)

        # Lost again (through the one endpoint), and the lease runs out before the next
        # campaign: another watcher leads by then, and the settling must not adopt it.
        again = EtcdStore(lonely, PREFIX)
        proxy.arm("/v3/kv/txn", DROP)
        with pytest.raises(StoreUnavailable) as unknown:
            await again.campaign("dc1", TTL)
        assert unknown.value.maybe_applied and len(proxy.faulted) == 2
        bound = time.monotonic() + timing.within(TTL + 8)
        taken = None
        while taken is None:
            assert time.monotonic() < bound, "the unrenewed lease never expired"
            await asyncio.sleep(0.3)
            taken = await other.campaign("dc2", TTL)
        assert taken.revision > token.revision
        assert await again.campaign("dc1", TTL) is None
        assert again.lease is None
        with pytest.raises(TokenLost):
            await holder.append(token, note(2))
        assert await other.leader() == taken


async def test_garbage_and_cut_replies_are_unavailable_never_lost(etcd: EtcdCluster) -> None:
    member = etcd.members[0]
    async with (
        ReplyFaults(member.client_port) as proxy,
        EtcdClient([proxy.url], timeout=TIMEOUT) as client,
    ):
        store = EtcdStore(client, PREFIX)
        token = await store.campaign("dc1", TTL)
        assert token is not None
        await store.append(token, note(1))
        assert store.lease is not None
        deadline = store.lease.deadline()

        # A reply that is not HTTP at all, after the append took effect.
        proxy.arm("/v3/kv/txn", GARBAGE)
        with pytest.raises(StoreUnavailable) as junk:
            await store.append(token, note(2))
        assert junk.value.maybe_applied
        # A well-formed JSON reply saying the compare failed, without the failure
        # branch's reads: not etcd's answer, so not "lost".
        proxy.arm("/v3/kv/txn", GARBAGE, b'{"header":{"revision":"99"},"succeeded":false}')
        with pytest.raises(StoreUnavailable):
            await store.append(token, note(3))
        # A keepalive cut in the middle: unavailable, and the deadline stays.
        proxy.arm("/v3/lease/keepalive", CUT)
        with pytest.raises(StoreUnavailable):
            await store.renew(token)
        assert store.lease.deadline() == deadline
        # A read cut in the middle.
        proxy.arm("/v3/kv/range", CUT)
        with pytest.raises(StoreUnavailable):
            await store.leader()
        assert proxy.faulted == [
            "/v3/kv/txn", "/v3/kv/txn", "/v3/lease/keepalive", "/v3/kv/range",
        ]  # fmt: skip

        # The store answers again: the same token goes on; what landed landed once.
        assert await store.renew(token) > deadline
        await store.append(token, note(4))
        notes = [r["reason"] for _, r in await store.entries()]
        assert notes[0] == "note 1" and notes[-1] == "note 4"
        assert notes[1:-1] in (["note 2"], ["note 2", "note 3"], ["note 3"], [])
        assert "note 2" in notes  # its txn reached etcd before the garbage came back
        assert await store.leader() == Token("dc1", token.revision)


async def test_a_campaign_whose_lease_ran_out_before_its_txn_is_unavailable(
    clients: tuple[EtcdClient, EtcdClient],
) -> None:
    """A watcher frozen between the grant of its lease and the txn creating the key (the
    lease expired meanwhile) hears "requested lease not found": the campaign failed and
    may be tried again (unavailable), it is neither a crash nor "somebody else leads"."""
    client = clients[0]
    store = EtcdStore(client, PREFIX)
    grant = client.lease_grant

    async def grant_then_lose(ttl: int) -> Any:
        lease = await grant(ttl)
        await client.lease_revoke(lease.id)  # as if it had expired while we were frozen
        return lease

    client.lease_grant = grant_then_lose  # type: ignore[method-assign]
    try:
        with pytest.raises(StoreUnavailable) as failed:
            await store.campaign("dc1", TTL)
    finally:
        client.lease_grant = grant  # type: ignore[method-assign]
    assert not failed.value.maybe_applied
    assert store.lease is None and await store.leader() is None
    token = await store.campaign("dc1", TTL)
    assert token is not None and await store.leader() == token


async def test_an_append_whose_reply_was_lost_lands_once(
    etcd: EtcdCluster, clients: tuple[EtcdClient, EtcdClient]
) -> None:
    """The append's txn takes effect and its reply is lost; the retry on the next member
    finds the record's key taken: unknown (``maybe_applied``), never lost; the next append
    re-reads where the journal ends and the lost one is there exactly once."""
    member = etcd.members[0]
    others = [m.client_url for m in etcd.members[1:]]
    async with (
        ReplyFaults(member.client_port) as proxy,
        EtcdClient([proxy.url, *others], timeout=TIMEOUT) as client,
    ):
        store = EtcdStore(client, PREFIX)
        token = await store.campaign("dc1", TTL)
        assert token is not None
        await store.append(token, note(1))
        proxy.arm("/v3/kv/txn", DROP)
        with pytest.raises(StoreUnavailable) as unknown:
            await store.append(token, note(2))
        assert unknown.value.maybe_applied and proxy.faulted == ["/v3/kv/txn"]
        await store.append(token, note(3))
        notes = [r["reason"] for _, r in await EtcdStore(clients[1], PREFIX).entries()]
        assert notes == ["note 1", "note 2", "note 3"]


async def test_a_new_leader_appends_after_records_written_since_it_last_read(
    clients: tuple[EtcdClient, EtcdClient],
) -> None:
    """A follower read the journal (showing status, say), the leader wrote more and
    handed over; the follower wins: its first append goes after the end as it is now,
    not where it was when it last read (that would fail as unavailable for nothing)."""
    first, second = EtcdStore(clients[0], PREFIX), EtcdStore(clients[1], PREFIX)
    token1 = await first.campaign("dc1", TTL)
    assert token1 is not None
    await first.append(token1, note(1))
    assert len(await second.entries()) == 1  # the follower's view
    await first.append(token1, note(2))
    await first.resign(token1)
    token2 = await second.campaign("dc2", TTL)
    assert token2 is not None
    await second.append(token2, note(3))
    assert [r["reason"] for _, r in await first.entries()] == ["note 1", "note 2", "note 3"]


@pytest.mark.parametrize("cut", [BLACKHOLE, REFUSE])
async def test_a_watcher_cut_off_from_every_member_is_unavailable_then_lost_only_once_read(
    etcd: EtcdCluster, clients: tuple[EtcdClient, EtcdClient], cut: str
) -> None:
    """The leading watcher's links to all three members go dark (silent, or refused) while
    etcd itself is fine: unavailable within the budget, its deadline stays; once the
    links are back after its lease ran out, another watcher leads with a larger token and
    the old one hears TokenLost, confirmed by a read."""
    proxies = [FaultProxy(m.client_port) for m in etcd.members]
    for proxy in proxies:
        await proxy.start()
    try:
        urls = [f"http://127.0.0.1:{p.port}" for p in proxies]
        async with EtcdClient(urls, timeout=TIMEOUT) as client:
            holder, other = EtcdStore(client, PREFIX), EtcdStore(clients[1], PREFIX)
            token = await holder.campaign("dc1", TTL)
            assert token is not None
            await holder.append(token, note(1))
            assert holder.lease is not None
            deadline = holder.lease.deadline()

            for proxy in proxies:
                proxy.set_mode(cut)
            await unavailable_within(holder.renew(token), client.retry_budget + 1)
            await unavailable_within(holder.append(token, note(2)), client.retry_budget + 1)
            await unavailable_within(holder.leader(), client.retry_budget + 1)
            assert holder.lease.deadline() == deadline

            # etcd is fine: once the lease runs out, the other watcher leads.
            bound = time.monotonic() + timing.within(TTL + 8)
            taken = None
            while taken is None:
                assert time.monotonic() < bound, "the cut-off holder's lease never expired"
                await asyncio.sleep(0.2)
                taken = await other.campaign("dc2", TTL)
            assert time.monotonic() >= deadline and taken.revision > token.revision

            for proxy in proxies:
                proxy.set_mode(PASS)
            with pytest.raises(TokenLost):
                await until(lambda: holder.renew(token), 10, "renew after the cut")
            with pytest.raises(TokenLost):
                await holder.append(token, note(3))
            await other.append(taken, note(4))
            notes = [r["reason"] for _, r in await other.entries()]
            assert notes == ["note 1", "note 4"]
    finally:
        for proxy in proxies:
            await proxy.stop()
