"""The leader's side of the guard (``watchdogd.daemon.fleet.GuardLink``) against a real
three-member etcd: the fence order is written once per failover and token, the guard's
silence is counted across the ``guard_fence`` step's attempts, a new leader orders
afresh, and a failover that ends without completing takes its order back."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest

from tests.support.etcd import EtcdCluster
from watchdogd.actions import ActionError
from watchdogd.daemon.fleet import GuardLink
from watchdogd.state.etcd import EtcdClient
from watchdogd.state.etcd_store import EtcdStore
from watchdogd.state.guard_keys import GuardKeys, Order

pytestmark = pytest.mark.integration

PREFIX = "/watchdogd-link/orders"
KEYS = GuardKeys.under(PREFIX)
TTL = 2.0
ISO = 1.0


class FakeFleet:
    """What GuardLink reads of the daemon's Fleet, over a real client and leader key."""

    def __init__(self, client: EtcdClient, store: EtcdStore) -> None:
        self.client = client
        self.store = store
        self.prefix = PREFIX
        self.token: Any = None
        self.timing = SimpleNamespace(ttl=TTL, budget=1.0)
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.d = SimpleNamespace(clock=time.monotonic, emit=self.emit)
        self.lost: list[str] = []
        self.vouches: tuple[float | None, str] = (None, "no views read")
        self.vouch_asked: list[tuple[float, tuple[str, ...], int]] = []

    def emit(self, event: str, /, **facts: Any) -> None:
        self.events.append((event, facts))

    def _not_leader(self) -> str:
        return "not the leader"

    def _lost_soon(self, why: str) -> None:
        self.lost.append(why)

    def vouch_end(
        self, since: float, asked: tuple[str, ...], needed: int
    ) -> tuple[float | None, str]:
        """When ``needed`` of the watchers ``asked`` last may have vouched."""
        self.vouch_asked.append((since, asked, needed))
        return self.vouches


@pytest.fixture
async def fleet(etcd: EtcdCluster) -> AsyncIterator[FakeFleet]:
    async with EtcdClient(etcd.endpoints, timeout=1.0) as client:
        yield FakeFleet(client, EtcdStore(client, PREFIX))


async def order(client: EtcdClient) -> Order | None:
    kv = await client.get(KEYS.order)
    return None if kv is None else Order.decode(kv.value, kv.mod_revision)


async def cleared(link: GuardLink, until: float) -> str:
    """``clear`` in 1 s attempts until one clears (its answer) or ``until`` passed
    (``time.monotonic``; then "")."""
    while time.monotonic() < until:
        try:
            return await link.clear("f1", "main", 1.0)
        except ActionError:
            continue
    return ""


async def test_one_order_per_failover_and_token_and_the_silence_counts_across_attempts(
    fleet: FakeFleet,
) -> None:
    link = GuardLink(fleet, ISO)  # type: ignore[arg-type]
    with pytest.raises(ActionError, match="not the leader"):
        await link.clear("f1", "main", 0.5)
    assert await order(fleet.client) is None  # a follower orders nothing

    fleet.token = await fleet.store.campaign("dc1", TTL * 10)
    assert fleet.token is not None
    started = time.monotonic()
    # No guard ever wrote its key: its silence counts from the first read, and the
    # expired path also waits isolation_timeout + ttl from the order (replication
    # stopped then): ISO + TTL = 3 s, longer than one attempt.
    with pytest.raises(ActionError, match="not cleared yet"):
        await link.clear("f1", "main", 1.0)
    first = await order(fleet.client)
    assert first is not None and first.token == fleet.token.revision
    assert first.failover_id == "f1" and first.node == "main"
    reason = await cleared(link, started + ISO + TTL + 3)
    assert reason.startswith("cleared (expired)"), reason
    assert time.monotonic() - started >= ISO + TTL  # never before the rule allows
    again = await order(fleet.client)
    assert again is not None and again.revision == first.revision  # written once
    assert [e for e, _ in fleet.events].count("guard_fence_ordered") == 1

    # A new leader (a new token) resuming the same failover orders afresh.
    await fleet.store.resign(fleet.token)
    fleet.token = await fleet.store.campaign("dc2", TTL * 10)
    assert fleet.token is not None
    with pytest.raises(ActionError):
        await link.clear("f1", "main", 0.5)
    renewed = await order(fleet.client)
    assert renewed is not None and renewed.token == fleet.token.revision
    assert renewed.revision > first.revision


async def test_a_failover_that_did_not_complete_takes_its_order_back(fleet: FakeFleet) -> None:
    link = GuardLink(fleet, ISO)  # type: ignore[arg-type]
    fleet.token = await fleet.store.campaign("dc1", TTL * 10)
    assert fleet.token is not None
    with pytest.raises(ActionError):
        await link.clear("f2", "main", 0.5)
    assert await order(fleet.client) is not None
    await link.withdraw("f2")
    assert await order(fleet.client) is None
    assert ("guard_order_withdrawn", {"failover_id": "f2", "withdrawn": True}) in fleet.events

    # Another failover's order, or one written under another token, is not ours to take.
    with pytest.raises(ActionError):
        await link.clear("f3", "main", 0.5)
    await link.withdraw("f2")  # no order of f2 any more: nothing happens
    assert await order(fleet.client) is not None
    await fleet.store.resign(fleet.token)
    fleet.token = await fleet.store.campaign("dc2", TTL * 10)
    await link.withdraw("f3")  # f3 was ordered under dc1's token
    assert await order(fleet.client) is not None


async def test_with_watchers_vouching_the_expired_path_waits_for_their_silence(
    fleet: FakeFleet,
) -> None:
    """``guard.watchers``: no guard key, yet no clearance while the watchers' last
    majority vouch cannot be bounded, nor until that bound is ISO + TTL old; the bound is
    asked with the order's time, so only views read after it count."""
    link = GuardLink(fleet, ISO, ("dc1", "dc2", "dc3"), 2)  # type: ignore[arg-type]
    fleet.token = await fleet.store.campaign("dc1", TTL * 10)
    assert fleet.token is not None
    started = time.monotonic()
    with pytest.raises(ActionError, match="may still vouch for the primary to its guard"):
        await link.clear("f1", "main", ISO + TTL + 1.5)  # long enough for the other rules
    assert fleet.vouch_asked and min(since for since, _, _ in fleet.vouch_asked) >= started
    assert {(asked, needed) for _, asked, needed in fleet.vouch_asked} == {
        (("dc1", "dc2", "dc3"), 2)
    }
    fleet.vouches = (time.monotonic(), "")  # a majority vouched just now
    with pytest.raises(ActionError, match="2 watchers may have vouched for the primary"):
        await link.clear("f1", "main", 1.0)
    bound = fleet.vouches[0]
    assert bound is not None
    reason = await cleared(link, bound + ISO + TTL + 3)
    assert reason.startswith("cleared (expired)"), reason
    assert time.monotonic() - bound >= ISO + TTL
