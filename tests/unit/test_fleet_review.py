"""Fixes of the fleet's safety review (issue 12): each test failed before its fix.

- Two appends at once on one ``EtcdStore`` (runner and a command): both land, each
  at its own position, whatever order their answers come back in (F6).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from watchdogd.state.etcd import CompareFailed, KeyValue, Put, RangeResult, TxnResult
from watchdogd.state.etcd_store import EtcdStore
from watchdogd.state.store import Token

LEADER = b"/w/c/leader"


class GatedEtcd:
    """A fake etcd that commits each transaction on arrival and answers it only when
    the test opens its gate: answers can come back in any order."""

    def __init__(self) -> None:
        self.kv: dict[bytes, KeyValue] = {LEADER: KeyValue(LEADER, b"dc1", 5, 5, 1, 7)}
        self.rev = 5
        self.gates: list[asyncio.Event] = []

    async def get_prefix(self, prefix: bytes) -> RangeResult:
        kvs = tuple(v for k, v in sorted(self.kv.items()) if k.startswith(prefix))
        return RangeResult(self.rev, kvs, len(kvs))

    async def txn(self, compare: Sequence[Any], success: Sequence[Any] = (),
                  failure: Sequence[Any] | None = None) -> TxnResult:  # fmt: skip
        ok = all(
            (kv.create_revision if (kv := self.kv.get(c.key)) else 0) == c.operand for c in compare
        )
        if ok:
            self.rev += 1
            for op in success:
                assert isinstance(op, Put) and isinstance(op.key, bytes)
                self.kv[op.key] = KeyValue(op.key, op.value, self.rev, self.rev, 1, 0)
            result = TxnResult(True, self.rev, ())
        else:
            reads = []
            for op in failure or ():
                kv = self.kv.get(op.key)
                reads.append(RangeResult(self.rev, (kv,) if kv else (), 1 if kv else 0))
            result = TxnResult(False, self.rev, tuple(reads))
        gate = asyncio.Event()
        self.gates.append(gate)
        await gate.wait()
        if not result.succeeded:
            raise CompareFailed("compare failed", result)
        return result


async def test_concurrent_appends_both_land_in_order() -> None:
    client = GatedEtcd()
    store = EtcdStore(client, "/w/c")  # type: ignore[arg-type]
    token = Token("dc1", 5)
    pause = {"type": "pause", "reason": "a", "by": "x", "at": 1.0}
    first = asyncio.create_task(store.append(token, pause))
    await asyncio.sleep(0)
    second = asyncio.create_task(store.append(token, {"type": "resume", "by": "x", "at": 2.0}))
    opened = 0
    while not (first.done() and second.done()):
        for _ in range(5):
            await asyncio.sleep(0)
        # the newest answer first: a loser answered before the winner
        pending = [g for g in client.gates if not g.is_set()]
        assert len(pending) <= 1, "two appends were in flight at once"
        if pending:
            pending[-1].set()
            opened += 1
    positions = [first.result(), second.result()]
    journal = sorted(k for k in client.kv if b"/journal/" in k)
    assert journal == [b"/w/c/journal/0000000000000001", b"/w/c/journal/0000000000000002"]
    assert positions[0] < positions[1] and opened == 2
    # and the next append goes after both
    third = asyncio.create_task(store.append(token, {"type": "resume", "by": "y", "at": 3.0}))
    while not third.done():
        await asyncio.sleep(0)
        for g in client.gates:
            g.set()
    assert b"/w/c/journal/0000000000000003" in client.kv
