"""The etcd client (watchdogd/state/etcd.py) against a real three-member etcd cluster
(tests/support/etcd.py): reads, compare-and-swap, leases and their deadline, failover
between endpoints, quorum loss, leader moves, watches, TLS with client certificates and
authentication.

The rule under test throughout: only an explicit compare failure is ``CompareFailed``;
a stopped member, a lost quorum or a refused connection is ``StoreUnavailable``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from tests.support import timing
from tests.support.etcd import EtcdCluster, EtcdMember, etcd_cluster
from watchdogd.core import clock
from watchdogd.state.etcd import (
    Compare,
    CompareFailed,
    Delete,
    EtcdClient,
    Get,
    LeaseNotFound,
    Put,
    RangeResult,
    StoreUnavailable,
    TlsFiles,
    WatchCompacted,
    WatchEvent,
    Written,
)

pytestmark = pytest.mark.integration

TIMEOUT = 1.0  # per attempt


@pytest.fixture
async def client(etcd: EtcdCluster) -> AsyncIterator[EtcdClient]:
    async with EtcdClient(etcd.endpoints, timeout=TIMEOUT) as c:
        yield c


def follower_first(etcd: EtcdCluster) -> list[EtcdMember]:
    """The members with a follower first: stopping it leaves a leader in place (stopping
    the leader would add an election to what a test measures)."""
    leader = etcd.leader()
    return [m for m in etcd.members if m is not leader] + [leader]


def leader_key(name: str) -> str:
    return f"/watchdogd/test/{name}"


async def test_put_range_and_compare_and_swap(client: EtcdClient) -> None:
    revision = await client.put("/watchdogd/test/a", b"one")
    kv = await client.get("/watchdogd/test/a")
    assert kv is not None and kv.value == b"one" and kv.mod_revision == revision
    assert await client.get("/watchdogd/test/missing") is None

    # Leadership: created only if absent; its create_revision is the fencing token.
    key = leader_key("leader")
    won = await client.txn([Compare(key, "create", "=", 0)], [Put(key, b"dc1")])
    assert won.succeeded and won.responses == (Written("put"),)
    held = await client.get(key)
    assert held is not None
    token = held.create_revision
    assert token == won.revision

    with pytest.raises(CompareFailed) as lost:
        await client.txn([Compare(key, "create", "=", 0)], [Put(key, b"dc2")])
    # The failure branch read the compared key: who holds it now.
    current = lost.value.result.responses[0]
    assert isinstance(current, RangeResult)
    assert current.kvs[0].value == b"dc1" and current.kvs[0].create_revision == token

    # A write guarded by the token lands while the token holds ...
    guarded = await client.txn(
        [Compare(key, "create", "=", token), Compare("/watchdogd/test/j/1", "create", "=", 0)],
        [Put("/watchdogd/test/j/1", b"record"), Get(key)],
    )
    assert isinstance(guarded.responses[1], RangeResult)
    assert guarded.responses[1].kvs[0].create_revision == token
    # ... and not once the key was deleted and re-created (a new token).
    await client.delete(key)
    await client.txn([Compare(key, "create", "=", 0)], [Put(key, b"dc2")])
    with pytest.raises(CompareFailed):
        await client.txn(
            [Compare(key, "create", "=", token)],
            [Put("/watchdogd/test/j/2", b"record")],
            [Get(key), Delete("/watchdogd/test/nothing")],
        )
    assert await client.get("/watchdogd/test/j/2") is None

    prefix = await client.get_prefix("/watchdogd/test/j/")
    assert [kv.key for kv in prefix.kvs] == [b"/watchdogd/test/j/1"]


async def test_lease_keepalive_keeps_key_and_expiry_deletes_it(client: EtcdClient) -> None:
    lease = await client.lease_grant(2)
    assert lease.ttl >= 2
    await client.put("/watchdogd/test/held", b"x", lease=lease.id)
    keeper = asyncio.create_task(lease.keep(0.3))
    try:
        await asyncio.sleep(lease.ttl * 2)
        assert await client.get("/watchdogd/test/held") is not None
        assert lease.renewals >= 4
        assert 0 < await client.lease_time_to_live(lease.id) <= lease.ttl
    finally:
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper

    # Renewals stop: the key goes with the lease, never before the deadline.
    deadline = lease.deadline()
    bound = time.monotonic() + timing.within(lease.ttl + 3)
    while True:
        started = time.monotonic()
        present = await client.get("/watchdogd/test/held") is not None
        ended = time.monotonic()
        if not present:
            assert ended >= deadline, f"key gone {deadline - ended:.3f}s before the deadline"
            break
        assert ended < bound, "the lease did not expire"
        assert started < bound
        await asyncio.sleep(0.05)
    with pytest.raises(LeaseNotFound):
        await lease.renew()
    with pytest.raises(LeaseNotFound):
        await client.lease_time_to_live(lease.id)


async def test_deadline_is_send_time_of_last_acknowledged_renewal_plus_ttl(
    client: EtcdClient,
) -> None:
    lease = await client.lease_grant(5)
    before = clock.now()  # the clock leases are timed on
    renewal = await lease.renew()
    after = clock.now()
    assert before <= renewal.sent_at <= after
    assert renewal.ttl == lease.ttl == 5
    assert lease.last == renewal
    assert lease.deadline(margin=1.5) == pytest.approx(renewal.sent_at + 5 - 1.5)
    # remaining() first, then the clock: read the other way round, a busy machine's delay
    # between the two reads made a correct remaining() look too small.
    remaining = lease.remaining(margin=1.5)
    assert 5 - 1.5 - (clock.now() - before) <= remaining <= 5 - 1.5

    # A failed renewal leaves the deadline where the last acknowledged one put it.
    await client.lease_revoke(lease.id)
    last = lease.last
    with pytest.raises(LeaseNotFound):
        await lease.renew()
    assert lease.last == last
    await client.lease_revoke(lease.id)  # revoking a revoked lease: done already


async def test_closed_port_fails_over_at_once(etcd: EtcdCluster, closed_port: int) -> None:
    endpoints = [f"http://127.0.0.1:{closed_port}", *etcd.endpoints]
    async with EtcdClient(endpoints, timeout=TIMEOUT) as client:
        started = time.monotonic()
        await client.put("/watchdogd/test/f", b"1")
        assert time.monotonic() - started < TIMEOUT  # refused: no wait for the timeout
        assert client._current == 1  # the next call starts at the endpoint that answered


async def test_stopped_member_fails_over_within_the_attempt_timeout(
    etcd: EtcdCluster,
) -> None:
    members = follower_first(etcd)
    members[0].sigstop()
    async with EtcdClient([m.client_url for m in members], timeout=TIMEOUT) as client:
        started = time.monotonic()
        kv = await client.range("/watchdogd/test/x")
        elapsed = time.monotonic() - started
        assert kv.revision > 0
        # One attempt timed out on the frozen member, the next answered.
        assert TIMEOUT <= elapsed < TIMEOUT + timing.within(TIMEOUT)
        # Later calls start at the member that answered: no waiting on the frozen one.
        started = time.monotonic()
        key = leader_key("after-stop")
        await client.txn([Compare(key, "create", "=", 0)], [Put(key, b"dc1")])
        assert time.monotonic() - started < TIMEOUT


async def test_quorum_loss_is_unavailable_never_compare_failed(
    etcd: EtcdCluster, client: EtcdClient
) -> None:
    key = leader_key("quorum")
    await client.txn([Compare(key, "create", "=", 0)], [Put(key, b"dc1")])
    lease = await client.lease_grant(30)
    for member in etcd.members[:2]:
        member.sigstop()

    # This compare would fail on a healthy etcd: without quorum there is no answer.
    with pytest.raises(StoreUnavailable) as txn_failed:
        await client.txn([Compare(key, "create", "=", 0)], [Put(key, b"dc2")])
    assert txn_failed.value.maybe_applied  # requests reached servers that did not answer
    assert "\n" not in str(txn_failed.value)
    for endpoint in etcd.endpoints:
        assert endpoint in str(txn_failed.value)
    with pytest.raises(StoreUnavailable):
        await client.range(key)  # linearizable: no stale answer from the lone member
    with pytest.raises(StoreUnavailable):
        await lease.renew()
    assert lease.last_error is not None

    for member in etcd.members[:2]:
        member.sigcont()
    # Quorum back: the same compare fails explicitly, the only "lost".
    bound = time.monotonic() + timing.within(15)
    while True:
        try:
            await client.txn([Compare(key, "create", "=", 0)], [Put(key, b"dc2")])
        except CompareFailed:
            break
        except StoreUnavailable:
            assert time.monotonic() < bound, "the cluster did not recover"
            await asyncio.sleep(0.2)
        else:
            pytest.fail("the compare succeeded on a key that exists")


async def test_a_store_blink_shorter_than_the_ttl_keeps_the_lease(
    etcd: EtcdCluster, client: EtcdClient
) -> None:
    """Quorum gone for a few seconds under a 12 s lease: renewals fail (unavailable, the
    deadline stays), then succeed again; the key was never lost, the deadline never
    passed. (Noticing takes one retry budget: 3 endpoints x 1 s.)"""
    lease = await client.lease_grant(12)
    await client.put("/watchdogd/test/blink", b"x", lease=lease.id)
    keeper = asyncio.create_task(lease.keep(0.5))
    try:
        await asyncio.sleep(1)
        for member in etcd.members[:2]:
            member.sigstop()
        bound = time.monotonic() + timing.within(client.retry_budget + 2)
        while lease.last_error is None:
            assert time.monotonic() < bound, "a renewal without quorum did not fail"
            await asyncio.sleep(0.1)
        assert "unavailable" in lease.last_error
        for member in etcd.members[:2]:
            member.sigcont()
        bound = time.monotonic() + timing.within(10)
        while lease.last_error is not None:
            assert time.monotonic() < bound, f"renewals did not resume: {lease.last_error}"
            assert lease.remaining() > 0, "the deadline passed during the blink"
            await asyncio.sleep(0.1)
        assert not keeper.done()
        kv = await client.get("/watchdogd/test/blink")
        assert kv is not None and kv.lease == lease.id
    finally:
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper


async def test_move_leader_during_keepalive_keeps_the_lease(
    etcd: EtcdCluster, client: EtcdClient
) -> None:
    lease = await client.lease_grant(5)
    await client.put("/watchdogd/test/lease-moved", b"x", lease=lease.id)
    keeper = asyncio.create_task(lease.keep(0.3))
    try:
        for _ in range(2):
            old = await asyncio.to_thread(etcd.leader)  # etcdctl: off the loop, renewals go on
            target = next(m for m in etcd.members if m is not old)
            await asyncio.to_thread(etcd.move_leader, target)
            await asyncio.sleep(0.5)
        await asyncio.sleep(lease.ttl)
        assert not keeper.done()
        assert await client.get("/watchdogd/test/lease-moved") is not None
        assert lease.remaining() > 0
    finally:
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper


async def collect(events: list[WatchEvent], client: EtcdClient, start_revision: int) -> None:
    watch = client.watch("/watchdogd/test/w/", b"/watchdogd/test/w0", start_revision=start_revision)
    async with watch:
        async for event in watch:
            events.append(event)


async def wait_for(events: list[WatchEvent], count: int, seconds: float) -> None:
    bound = time.monotonic() + timing.within(seconds)
    while len(events) < count:
        assert time.monotonic() < bound, f"saw {len(events)} events, expected {count}"
        await asyncio.sleep(0.02)


async def test_watch_sees_puts_and_resumes_after_its_member_stops(
    etcd: EtcdCluster,
) -> None:
    events: list[WatchEvent] = []
    members = follower_first(etcd)
    endpoints = [m.client_url for m in members]
    async with (
        EtcdClient(endpoints, timeout=TIMEOUT) as watcher,
        EtcdClient(endpoints[1:], timeout=TIMEOUT) as writer,
    ):
        watch = watcher.watch("/watchdogd/test/w/", b"/watchdogd/test/w0", idle_check=0.5)

        async def consume() -> None:
            async with watch:
                async for event in watch:
                    events.append(event)

        task = asyncio.create_task(consume())
        try:
            await asyncio.sleep(0.3)
            await writer.put("/watchdogd/test/w/1", b"a")
            await writer.delete("/watchdogd/test/w/1")
            await wait_for(events, 2, 5)
            assert [(e.type, e.kv.key) for e in events] == [
                ("put", b"/watchdogd/test/w/1"),
                ("delete", b"/watchdogd/test/w/1"),
            ]
            members[0].sigstop()  # the watch's member
            await writer.put("/watchdogd/test/w/2", b"b")  # while its stream is frozen
            await writer.put("/watchdogd/test/w/3", b"c")
            await wait_for(events, 4, 10)
            assert [e.kv.value for e in events[2:]] == [b"b", b"c"]
            revisions = [e.revision for e in events]
            assert revisions == sorted(set(revisions))  # resumed: nothing lost, nothing twice
            assert watch.reconnects >= 1
            assert watch.next_revision == revisions[-1] + 1
            assert not task.done()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_watch_on_a_leader_that_loses_quorum_ends_without_waiting_for_idle(
    etcd: EtcdCluster,
) -> None:
    """The watch asks for a member with a leader (gRPC metadata ``hasleader``): a leader
    cut off from its followers steps down and cancels the stream, long before the idle
    check would have noticed."""
    leader = etcd.leader()
    followers = [m for m in etcd.members if m is not leader]
    endpoints = [leader.client_url] + [m.client_url for m in followers]
    idle_check = 60.0
    async with EtcdClient(endpoints, timeout=TIMEOUT) as client:
        watch = client.watch("/watchdogd/test/w/", b"/watchdogd/test/w0", idle_check=idle_check)

        async def consume() -> None:
            async with watch:
                async for _ in watch:
                    pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.5)
        for member in followers:
            member.sigstop()
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as caught:
            await asyncio.wait_for(task, timing.within(20))
    assert time.monotonic() - started < idle_check / 3
    assert f"{leader.client_url}: etcdserver: no leader" in str(caught.value)


async def test_watch_from_a_compacted_revision_says_so(client: EtcdClient) -> None:
    first = await client.put("/watchdogd/test/w/c", b"1")
    await client.put("/watchdogd/test/w/c", b"2")
    cluster_revision = await client.put("/watchdogd/test/w/c", b"3")
    await client._call(  # compaction is an operator's act: no public method for it
        "kv/compaction", {"revision": str(cluster_revision)}, lambda reply: reply
    )
    events: list[WatchEvent] = []
    with pytest.raises(WatchCompacted) as compacted:
        await asyncio.wait_for(collect(events, client, start_revision=first), 10)
    assert compacted.value.compact_revision == cluster_revision
    assert events == []


@pytest.fixture
def secure_cluster() -> Iterator[EtcdCluster]:
    with etcd_cluster(tls=True, extra=["--auth-token-ttl=2"]) as c:
        yield c


async def test_tls_with_client_certificates_and_auth(secure_cluster: EtcdCluster) -> None:
    certs = secure_cluster.certs
    assert certs is not None
    tls = TlsFiles(str(certs.ca), str(certs.client_cert), str(certs.client_key))
    async with EtcdClient(secure_cluster.endpoints, timeout=TIMEOUT, tls=tls) as client:
        await client.put("/watchdogd/test/tls", b"1")
        written = await client.get("/watchdogd/test/tls")
        assert written is not None and written.value == b"1"

    # Without a client certificate the members refuse the handshake: unavailable.
    async with EtcdClient(
        secure_cluster.endpoints, timeout=TIMEOUT, tls=TlsFiles(str(certs.ca))
    ) as anonymous:
        with pytest.raises(StoreUnavailable) as refused:
            await anonymous.get("/watchdogd/test/tls")
        assert "\n" not in str(refused.value)

    await asyncio.to_thread(secure_cluster.enable_auth, "watchdogd", "s3cret-pw", "/watchdogd/")
    async with EtcdClient(
        secure_cluster.endpoints, timeout=TIMEOUT, tls=tls, username="watchdogd",
        password="s3cret-pw",
    ) as client:  # fmt: skip
        await client.put("/watchdogd/test/auth", b"1")
        lease = await client.lease_grant(5)
        # The server's token lives 2 s: the client authenticates again when it is refused.
        await asyncio.sleep(3.5)
        kv = await client.get("/watchdogd/test/auth")
        assert kv is not None and kv.value == b"1"
        await lease.renew()
        # Outside the role's prefix: refused, and that is "unavailable", not "lost".
        with pytest.raises(StoreUnavailable) as denied:
            await client.txn([Compare("/other", "create", "=", 0)], [Put("/other", b"x")])
        assert "permission denied" in str(denied.value)

    async with EtcdClient(
        secure_cluster.endpoints, timeout=TIMEOUT, tls=tls, username="watchdogd",
        password="wrong",
    ) as wrong:  # fmt: skip
        with pytest.raises(StoreUnavailable) as failed:
            await wrong.get("/watchdogd/test/auth")
        assert "authentication failed" in str(failed.value)
        assert "wrong" not in str(failed.value)

    async with EtcdClient(secure_cluster.endpoints, timeout=TIMEOUT, tls=tls) as nobody:
        with pytest.raises(StoreUnavailable) as unauthenticated:
            await nobody.get("/watchdogd/test/auth")
        assert "no username configured" in str(unauthenticated.value)
