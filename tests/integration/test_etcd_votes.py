"""The fleet's ballots in a real three-member etcd (watchdogd/state/votes.py): each
watcher's view on its own lease, all read with one linearizable read; a watcher that
stops renewing loses its vote within the ttl; quorum loss is unavailable, never a hang."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator

import pytest

from tests.support import timing
from tests.support.etcd import EtcdCluster
from watchdogd.fleet import View
from watchdogd.state.etcd import EtcdClient
from watchdogd.state.store import StoreUnavailable
from watchdogd.state.votes import EtcdVoteBox

pytestmark = pytest.mark.integration

PREFIX = "/watchdogd/test-cluster"
TTL = 2  # etcd's floor with a 1 s election timeout


def view(instance: str, seq: int = 1, down: bool = False) -> dict[str, object]:
    return View(instance, seq, "main", down, not down, 0.0, True, "abc").encode()


@pytest.fixture
async def clients(etcd: EtcdCluster) -> AsyncIterator[list[EtcdClient]]:
    """One client per watcher, each starting at another member."""
    eps = etcd.endpoints
    async with (
        EtcdClient(eps, timeout=1.0) as one,
        EtcdClient(eps[1:] + eps[:1], timeout=1.0) as two,
        EtcdClient(eps[2:] + eps[:2], timeout=1.0) as three,
    ):
        yield [one, two, three]


async def test_three_watchers_publish_and_every_ballot_is_read(
    clients: list[EtcdClient],
) -> None:
    boxes = [EtcdVoteBox(c, PREFIX, TTL) for c in clients]
    for n, box in enumerate(boxes, 1):
        await box.publish(f"dc{n}", view(f"dc{n}", down=n != 2))
    for box in boxes:
        ballots = await box.ballots()
        assert sorted(ballots) == ["dc1", "dc2", "dc3"]
        assert [View.decode(ballots[n].data).primary_down for n in sorted(ballots)] == [
            True,
            False,
            True,
        ]
    # Each on its own lease; an identical view published again is a new revision.
    leases = {box.lease.id for box in boxes if box.lease is not None}
    assert len(leases) == 3
    before = (await boxes[0].ballots())["dc1"].revision
    await boxes[0].publish("dc1", view("dc1", down=True))
    assert (await boxes[1].ballots())["dc1"].revision > before
    for box in boxes:
        await box.close()
    assert await boxes[0].ballots() == {}


async def test_junk_in_the_views_never_breaks_the_read(clients: list[EtcdClient]) -> None:
    box = EtcdVoteBox(clients[0], PREFIX, TTL)
    await box.publish("dc1", view("dc1"))
    await clients[1].put(f"{PREFIX}/views/dc2", b"{not json")
    await clients[1].put(f"{PREFIX}/views/dc3", b"[1, 2]")
    await clients[1].put(f"{PREFIX}/views/dc4", b'{"instance": "dc4", "seq": "x"}')
    await clients[1].put(f"{PREFIX}/views/a/b", b"{}")
    ballots = await box.ballots()
    assert sorted(ballots) == ["dc1", "dc4"]
    assert View.decode(ballots["dc1"].data).instance == "dc1"
    with pytest.raises(ValueError, match="view: "):
        View.decode(ballots["dc4"].data)  # the caller's decode names what is wrong
    assert len(box.problems) == 3
    assert any("'dc2'" in p and "not JSON" in p for p in box.problems)
    assert any("'dc3'" in p and "not a JSON object" in p for p in box.problems)
    await box.close()


async def test_a_revoked_lease_takes_the_view_and_the_next_publish_grants_anew(
    clients: list[EtcdClient],
) -> None:
    box = EtcdVoteBox(clients[0], PREFIX, TTL)
    other = EtcdVoteBox(clients[1], PREFIX, TTL)
    await box.publish("dc1", view("dc1"))
    await other.publish("dc2", view("dc2"))
    assert box.lease is not None
    first = box.lease.id
    await clients[2].lease_revoke(first)  # e.g. an operator, or etcd expiring it
    assert sorted(await other.ballots()) == ["dc2"]
    # Right away (no keepalive due): the put is refused, a new lease is granted.
    await box.publish("dc1", view("dc1", seq=2))
    assert box.lease is not None and box.lease.id != first
    assert sorted(await other.ballots()) == ["dc1", "dc2"]
    # Later (a keepalive due): the keepalive is refused, a new lease is granted.
    second = box.lease.id
    await clients[2].lease_revoke(second)
    await asyncio.sleep(TTL / 3 + 0.1)
    await box.publish("dc1", view("dc1", seq=3))
    assert box.lease.id not in (first, second)
    assert View.decode((await other.ballots())["dc1"].data).seq == 3
    await box.close()
    await other.close()


async def test_publishing_keeps_the_view_alive_past_its_ttl(clients: list[EtcdClient]) -> None:
    """A put does not renew a lease: the box renews it itself, so a watcher that keeps
    publishing keeps its vote for many ttls."""
    box = EtcdVoteBox(clients[0], PREFIX, TTL)
    reader = EtcdVoteBox(clients[1], PREFIX, TTL)
    end = time.monotonic() + 3 * TTL
    seq = 0
    while time.monotonic() < end:
        seq += 1
        await box.publish("dc1", view("dc1", seq=seq))
        await asyncio.sleep(0.25)
        assert "dc1" in await reader.ballots(), f"the view vanished after {seq} publishes"
    assert box.lease is not None and box.lease.renewals >= 3
    await box.close()


WATCHER = """
import asyncio, sys
from watchdogd.state.etcd import EtcdClient
from watchdogd.state.votes import EtcdVoteBox
from watchdogd.fleet import View

async def main() -> None:
    async with EtcdClient(sys.argv[1].split(","), timeout=1.0) as client:
        box = EtcdVoteBox(client, sys.argv[2], float(sys.argv[3]))
        seq = 0
        while True:
            seq += 1
            mine = View("dc3", seq, "main", True, False, 1.0, True, "abc")
            await box.publish("dc3", mine.encode())
            print(seq, flush=True)
            await asyncio.sleep(0.2)

asyncio.run(main())
"""


async def test_a_killed_watchers_view_expires_within_its_ttl(
    etcd: EtcdCluster, clients: list[EtcdClient]
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WATCHER, ",".join(etcd.endpoints), PREFIX, str(TTL),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(timing.within(10)):
            for _ in range(5):  # a few publishes, some keepalives
                await proc.stdout.readline()
        reader = EtcdVoteBox(clients[0], PREFIX, TTL)
        assert View.decode((await reader.ballots())["dc3"].data).primary_down is True
        proc.kill()
        killed = time.monotonic()
        await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    while "dc3" in await reader.ballots():
        assert time.monotonic() - killed < timing.within(TTL + 1.5), "the view outlived it"
        await asyncio.sleep(0.1)
    # Not before the lease could end: its last keepalive was at most ttl/3 before the kill.
    assert time.monotonic() - killed >= TTL * 2 / 3 - 0.3


async def test_quorum_loss_is_unavailable_in_bounded_time(
    etcd: EtcdCluster, clients: list[EtcdClient]
) -> None:
    box = EtcdVoteBox(clients[0], PREFIX, TTL)
    fresh = EtcdVoteBox(clients[1], PREFIX, TTL)
    await box.publish("dc1", view("dc1"))
    for member in etcd.members[:2]:
        member.sigstop()
    bound = 2 * clients[0].retry_budget + 1.0
    for call in (
        lambda: box.publish("dc1", view("dc1", seq=2)),
        lambda: fresh.publish("dc2", view("dc2")),
        lambda: box.ballots(),
        lambda: fresh.ballots(),
    ):
        start = time.monotonic()
        with pytest.raises(StoreUnavailable):
            async with asyncio.timeout(timing.within(bound + 5)):
                await call()
        assert time.monotonic() - start <= timing.within(bound)
    for member in etcd.members[:2]:
        member.sigcont()
    # Quorum back: publishing works again (the old lease may have ended meanwhile).
    deadline = time.monotonic() + timing.within(15)
    while True:
        try:
            await box.publish("dc1", view("dc1", seq=3))
            await fresh.publish("dc2", view("dc2", seq=2))
            ballots = await fresh.ballots()
            break
        except StoreUnavailable:
            assert time.monotonic() < deadline, "the cluster did not recover"
            await asyncio.sleep(0.2)
    assert View.decode(ballots["dc1"].data).seq == 3 and "dc2" in ballots
    await box.close()
    await fresh.close()


async def test_an_etcd_leader_change_loses_no_vote(
    etcd: EtcdCluster, clients: list[EtcdClient]
) -> None:
    """Watchers keep publishing through ``etcdctl move-leader``: every read that
    succeeds shows all three views (etcd keeps leases alive across a leader change),
    and publishing goes on afterwards."""
    ttl = 3
    boxes = [EtcdVoteBox(c, PREFIX, ttl) for c in clients]
    names = ["dc1", "dc2", "dc3"]
    stop = asyncio.Event()
    failures: list[str] = []

    async def watcher(box: EtcdVoteBox, name: str) -> None:
        seq = 0
        while not stop.is_set():
            seq += 1
            try:
                await box.publish(name, view(name, seq=seq))
            except StoreUnavailable as exc:
                failures.append(str(exc))
            await asyncio.sleep(0.2)

    for box, name in zip(boxes, names, strict=True):
        await box.publish(name, view(name))
    tasks = [asyncio.create_task(watcher(b, n)) for b, n in zip(boxes, names, strict=True)]
    try:
        reads = 0
        old = etcd.leader()
        target = next(m for m in etcd.members if m is not old)
        mover = asyncio.create_task(asyncio.to_thread(etcd.move_leader, target))
        end = time.monotonic() + 2 * ttl
        while not mover.done() or time.monotonic() < end:
            try:
                ballots = await boxes[0].ballots()
            except StoreUnavailable:
                continue
            reads += 1
            assert sorted(ballots) == names, f"a vote was lost: {sorted(ballots)}"
            await asyncio.sleep(0.1)
        await mover
        assert reads >= 10
        assert etcd.leader() is target
        # Under the new etcd leader every watcher's publishes still land.
        before = {n: View.decode(b.data).seq for n, b in (await boxes[1].ballots()).items()}
        await asyncio.sleep(1.0)
        after = {n: View.decode(b.data).seq for n, b in (await boxes[1].ballots()).items()}
        assert all(after[n] > before[n] for n in names), (before, after)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    for box in boxes:
        await box.close()
