"""The store seam on etcd (watchdogd/state/etcd_store.py) against a real three-member
etcd: the same contract as the local journal and the in-memory store, then
leadership by compare-and-swap with the lease, fencing, and quorum loss (unavailable,
never lost)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from tests.support import store_contract as contract
from tests.support import timing
from tests.support.etcd import EtcdCluster
from watchdogd.core import clock
from watchdogd.state import journal as records
from watchdogd.state.etcd import EtcdClient
from watchdogd.state.etcd_store import EtcdStore
from watchdogd.state.store import StoreUnavailable, Token, TokenLost, replay

pytestmark = pytest.mark.integration

PREFIX = "/watchdogd/test-cluster"
TTL = 3  # etcd's floor with a 1 s election timeout is 2 s


@pytest.fixture
async def clients(etcd: EtcdCluster) -> AsyncIterator[tuple[EtcdClient, EtcdClient]]:
    async with (
        EtcdClient(etcd.endpoints, timeout=1.0) as one,
        EtcdClient(etcd.endpoints[::-1], timeout=1.0) as two,
    ):
        yield one, two


async def test_the_store_contract_on_etcd(clients: tuple[EtcdClient, EtcdClient]) -> None:
    for prefix, check in (
        (f"{PREFIX}/a", contract.check_append_entries_replay_and_watch),
        (f"{PREFIX}/b", contract.check_foreign_token),
    ):
        store = EtcdStore(clients[0], prefix)
        token = await store.campaign("dc1", TTL)
        assert token is not None
        await check(store, token)


async def test_one_leader_and_the_next_one_fences_the_first(
    clients: tuple[EtcdClient, EtcdClient],
) -> None:
    first, second = EtcdStore(clients[0], PREFIX), EtcdStore(clients[1], PREFIX)
    token1 = await first.campaign("dc1", TTL)
    assert token1 is not None
    assert await second.campaign("dc2", TTL) is None  # the key exists
    assert await second.leader() == token1
    deadline = await first.renew(token1)
    assert first.lease is not None and deadline == first.lease.deadline()
    await first.append(token1, records.pause(reason="by dc1", by="dc1", at=1.0))

    # dc1 stops renewing (a frozen watcher): its lease and key expire, dc2 takes over.
    bound = time.monotonic() + timing.within(TTL + 5)
    token2 = None
    while token2 is None:
        assert time.monotonic() < bound, "the first leader's key never expired"
        await asyncio.sleep(0.2)
        token2 = await second.campaign("dc2", TTL)
    assert clock.now() >= deadline  # never before the first leader's own deadline
    assert token2.revision > token1.revision

    # The old leader wakes up: every guarded write is refused, explicitly.
    with pytest.raises(TokenLost):
        await first.append(token1, records.resume(by="dc1", at=2.0))
    with pytest.raises(TokenLost):
        await first.renew(token1)
    await second.append(token2, records.resume(by="dc2", at=3.0))
    state = await replay(second)
    assert state.paused is False and state.pause_reason is None
    assert [r["by"] for _, r in await second.entries()] == ["dc1", "dc2"]

    await second.resign(token2)
    assert await first.leader() is None
    assert await first.campaign("dc1", TTL) is not None


async def test_quorum_loss_is_unavailable_for_every_verb(
    etcd: EtcdCluster, clients: tuple[EtcdClient, EtcdClient]
) -> None:
    store = EtcdStore(clients[0], PREFIX)
    token = await store.campaign("dc1", 30)
    assert token is not None
    await store.append(token, records.pause(reason="before", by="dc1", at=1.0))
    for member in etcd.members[:2]:
        member.sigstop()
    with pytest.raises(StoreUnavailable):
        await store.append(token, records.resume(by="dc1", at=2.0))
    with pytest.raises(StoreUnavailable):
        await store.renew(token)
    with pytest.raises(StoreUnavailable):
        await store.leader()
    with pytest.raises(StoreUnavailable):
        await store.entries()
    with pytest.raises(StoreUnavailable):
        await EtcdStore(clients[1], PREFIX).campaign("dc2", 30)
    for member in etcd.members[:2]:
        member.sigcont()

    # Quorum back: still the leader (30 s lease), the journal resumes where it was.
    bound = time.monotonic() + timing.within(15)
    while True:
        try:
            position = await store.append(token, records.resume(by="dc1", at=3.0))
            break
        except StoreUnavailable:
            assert time.monotonic() < bound, "the cluster did not recover"
            await asyncio.sleep(0.2)
    entries = await store.entries()
    assert entries[-1][0] == position
    # The append that timed out may or may not have landed; nothing else did, and the
    # token still holds.
    written = [(r["type"], r["at"]) for _, r in entries]
    assert written in (
        [("pause", 1.0), ("resume", 3.0)],
        [("pause", 1.0), ("resume", 2.0), ("resume", 3.0)],
    )
    assert await store.leader() == Token("dc1", token.revision)


async def test_an_append_whose_reply_was_lost_is_recognised(
    clients: tuple[EtcdClient, EtcdClient],
) -> None:
    """Re-sending the record that already landed under its key returns its position
    (what a retry after a lost reply does); another record there is not overwritten."""
    store = EtcdStore(clients[0], PREFIX)
    token = await store.campaign("dc1", TTL)
    assert token is not None
    record = records.pause(reason="once", by="dc1", at=1.0)
    position = await store.append(token, record)
    store._next_seq = 1  # as if the reply had been lost: the same key again
    assert await store.append(token, record) == position
    store._next_seq = 1
    with pytest.raises(StoreUnavailable) as conflict:
        await store.append(token, records.resume(by="dc1", at=2.0))
    assert "already holds another record" in str(conflict.value)
    # The next append re-reads where the journal ends and lands after it.
    assert await store.append(token, records.resume(by="dc1", at=2.0)) > position
    assert len(await store.entries()) == 2
