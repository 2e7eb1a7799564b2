"""The state-store seam (watchdogd/state/store.py): one contract, two stores.

The local journal behind the seam writes the very bytes ``Journal.append`` writes and
replays to the state ``Journal.load`` gives; the in-memory store models etcd's
leadership on a virtual clock, and its faults are "unavailable", never "lost".
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tests.support import store_contract as contract
from watchdogd.state import journal as records
from watchdogd.state.journal import Journal, JournalDamaged
from watchdogd.state.store import (
    LOCAL,
    LocalJournalStore,
    MemoryStore,
    RecordStore,
    StoreUnavailable,
    Token,
    TokenLost,
    VirtualClock,
    replay,
)


@pytest.fixture(params=["local", "memory"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[RecordStore, Token]]:
    if request.param == "local":
        journal = Journal(tmp_path)
        journal.lock()
        journal.load()
        journal.open()
        try:
            yield LocalJournalStore(journal), LOCAL
        finally:
            journal.close()
    else:
        memory = MemoryStore()
        token = await memory.campaign("dc1", 15)
        assert token is not None
        yield memory, token


async def test_append_entries_replay_and_watch(store: tuple[RecordStore, Token]) -> None:
    await contract.check_append_entries_replay_and_watch(*store)


async def test_a_foreign_token_is_lost_and_writes_nothing(
    store: tuple[RecordStore, Token],
) -> None:
    await contract.check_foreign_token(*store)


async def test_local_store_writes_the_journals_own_bytes(tmp_path: Path) -> None:
    direct, seamed = Journal(tmp_path / "direct"), Journal(tmp_path / "seam")
    for journal in (direct, seamed):
        journal.lock()
        journal.load()
        journal.open()
    store = LocalJournalStore(seamed)
    for rec in contract.history():
        direct.append(rec)
        await store.append(LOCAL, rec)
    assert seamed.path.read_bytes() == direct.path.read_bytes()
    for journal in (direct, seamed):
        journal.close()
    assert (
        await replay(LocalJournalStore(Journal(tmp_path / "seam")))
        == Journal(tmp_path / "direct").load()
    )


async def test_local_store_refuses_a_damaged_line_like_the_start_does(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.open()
    for rec in contract.history()[:3]:
        journal.append(rec)
    lines = journal.path.read_bytes().split(b"\n")
    lines[1] = lines[1].replace(b"promote", b"pr0mote", 1)  # the checksum no longer fits
    journal.path.write_bytes(b"\n".join(lines))
    with pytest.raises(JournalDamaged) as seam_refused:
        await LocalJournalStore(journal).entries()
    with pytest.raises(JournalDamaged):
        Journal(tmp_path).load()
    assert "line 2" in str(seam_refused.value)
    journal.close()


async def test_memory_leadership_follows_the_lease_on_the_virtual_clock() -> None:
    clock = VirtualClock()
    store = MemoryStore(clock)
    first = await store.campaign("dc1", ttl=10)
    assert first is not None
    assert await store.campaign("dc2", ttl=10) is None  # the key exists
    clock.advance(9)
    assert await store.renew(first) == 19
    clock.advance(9)
    assert await store.leader() == first
    clock.advance(1)  # 10 s since the last renewal: the lease and its key are gone
    assert await store.leader() is None
    with pytest.raises(TokenLost):
        await store.renew(first)

    second = await store.campaign("dc2", ttl=10)
    assert second is not None and second.revision > first.revision
    with pytest.raises(TokenLost):
        await store.append(first, records.pause(reason="late", by="dc1", at=20.0))
    await store.append(second, records.pause(reason="ok", by="dc2", at=20.0))
    await store.resign(second)
    assert await store.leader() is None
    with pytest.raises(ValueError):
        clock.advance(-1)


async def test_memory_faults_are_unavailable_never_lost() -> None:
    store = MemoryStore()
    token = await store.campaign("dc1", ttl=10)
    assert token is not None
    store.unavailable = True
    for call in (
        store.append(token, records.pause(reason="x", by="ops", at=1.0)),
        store.renew(token),
        store.leader(),
        store.entries(),
        store.campaign("dc2", 10),
    ):
        with pytest.raises(StoreUnavailable):
            await call
    store.unavailable = False
    assert await store.entries() == []

    store.ambiguous_appends = 1
    with pytest.raises(StoreUnavailable) as lost_reply:
        await store.append(token, records.pause(reason="x", by="ops", at=1.0))
    assert lost_reply.value.maybe_applied
    assert len(await store.entries()) == 1  # it landed: only a fresh read tells


# A property over random schedules: two watchers campaign, renew and append while the
# virtual clock runs and the store blinks. Fencing holds: a record lands only while its
# writer holds the unexpired lease, and once a newer leader wrote, an older one never does.
# Steps around the ttl (10 s): the edges are where fencing breaks.
STEPS = [0.0, 5.0, 9.99, 10.0, 12.0]
KINDS = ["campaign", "renew", "resign", "blink"] + ["append", "advance"] * 3
OPS = st.lists(
    st.tuples(st.sampled_from(KINDS), st.sampled_from(["dc1", "dc2"]), st.sampled_from(STEPS)),
    min_size=3,
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(OPS)
# The edges, always: an append exactly at the ttl, and the old leader after the new one.
@example([("campaign", "dc1", 0.0), ("advance", "dc1", 10.0), ("append", "dc1", 0.0)])
@example(
    [
        ("campaign", "dc1", 0.0),
        ("advance", "dc1", 12.0),
        ("campaign", "dc2", 0.0),
        ("append", "dc2", 0.0),
        ("renew", "dc1", 0.0),
        ("append", "dc1", 0.0),
    ]
)
def test_fencing_holds_on_any_schedule(ops: list[tuple[str, str, float]]) -> None:
    asyncio.run(run_schedule(ops))


async def run_schedule(ops: list[tuple[str, str, float]]) -> None:
    clock = VirtualClock()
    store = MemoryStore(clock)
    tokens: dict[str, Token] = {}
    renewed: dict[str, float] = {}
    written: list[int] = []
    for op, holder, seconds in ops:
        if op == "advance":
            clock.advance(seconds)
            continue
        if op == "blink":
            store.unavailable = not store.unavailable
            continue
        try:
            if op == "campaign":
                token = await store.campaign(holder, ttl=10)
                if token is not None:
                    tokens[holder], renewed[holder] = token, clock()
            elif holder in tokens and op == "renew":
                await store.renew(tokens[holder])
                renewed[holder] = clock()
            elif holder in tokens and op == "resign":
                await store.resign(tokens[holder])
            elif holder in tokens and op == "append":
                token = tokens[holder]
                await store.append(token, {"type": "note", "rev": token.revision})
                # It landed: the writer's lease was alive, by its own renewals.
                assert clock() < renewed[holder] + 10
                assert store.unavailable is False
                written.append(token.revision)
        except TokenLost:
            assert not store.unavailable  # an outage is never "lost"
        except StoreUnavailable:
            assert store.unavailable
    assert written == sorted(written)  # no older leader after a newer one
    store.unavailable = False
    assert [r["rev"] for _, r in await store.entries()] == written
