"""The fleet's ballots in a real three-member etcd (watchdogd/state/votes.py): each
watcher's view on its own lease, all read with one linearizable read; a watcher that
stops renewing loses its vote within the ttl; quorum loss is unavailable, never a hang."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.support.etcd import EtcdCluster
from watchdogd.fleet import View
from watchdogd.state.etcd import EtcdClient
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
