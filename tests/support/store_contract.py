"""The state-store seam's contract, as checks any store must pass: the local journal
and the in-memory store (tests/unit/test_state_store.py) and etcd
(tests/integration/test_etcd_store.py) run the same ones."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from tests.support import timing
from watchdogd.state import journal as records
from watchdogd.state.journal import JournalState, apply
from watchdogd.state.store import RecordStore, Token, TokenLost, replay

FAILOVER: dict[str, Any] = {
    "id": "f1",
    "trigger": "automatic",
    "kind": "failover",
    "reason": "gone",
}
PROMOTE: dict[str, Any] = {"id": "f1", "step": "promote", "action": "promote"}


def history() -> list[dict[str, Any]]:
    """A failover from start to ack, a pause and a resume: what a journal holds."""
    nodes: dict[str, Any] = {"from_node": "main", "to_node": "standby"}
    return [
        records.sequence_started("failover", **FAILOVER, **nodes, steps=["promote"], at=10.0),
        records.step_started("failover", **PROMOTE, attempt=1, at=11.0),
        records.step_finished("failover", **PROMOTE, outcome="ok", at=12.0),
        records.sequence_finished("failover", id="f1", outcome="completed", error=None, at=13.0),
        records.pause(reason="maintenance", by="ops", at=14.0),
        records.resume(by="ops", at=15.0),
        records.ack(id="f1", primary="standby", standby="main", at=16.0),
    ]


def folded(recs: list[dict[str, Any]]) -> JournalState:
    state = JournalState()
    for rec in recs:
        apply(state, rec)
    return state


async def check_append_entries_replay_and_watch(seam: RecordStore, token: Token) -> None:
    """Positions grow; entries come back in order and from a position; replay folds them
    as the journal would; a watch from 0 sees exactly the entries."""
    recs = history()
    watched: list[tuple[int, dict[str, Any]]] = []
    all_seen = asyncio.Event()

    async def watch() -> None:
        async for entry in seam.watch(0):
            watched.append(entry)
            if len(watched) >= len(recs):
                all_seen.set()

    watcher = asyncio.create_task(watch())
    try:
        positions = [await seam.append(token, rec) for rec in recs]
        assert positions == sorted(set(positions))

        entries = await seam.entries()
        assert [p for p, _ in entries] == positions
        assert [r for _, r in entries] == recs
        assert [r for _, r in await seam.entries(after=positions[2])] == recs[3:]
        assert await seam.entries(after=positions[-1]) == []

        state = await replay(seam)
        assert state == folded(recs)
        assert state.last is not None and state.last.promoted and state.awaiting_ack is None
        assert (state.primary, state.paused) == ("standby", False)

        await asyncio.wait_for(all_seen.wait(), timing.within(5))
        assert watched == entries
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


async def check_foreign_token(seam: RecordStore, token: Token) -> None:
    """A token that is not the holder's writes nothing: TokenLost."""
    await seam.append(token, records.pause(reason="x", by="ops", at=1.0))
    with pytest.raises(TokenLost):
        await seam.append(Token("dc9", token.revision + 7), records.resume(by="ops", at=2.0))
    assert len(await seam.entries()) == 1
