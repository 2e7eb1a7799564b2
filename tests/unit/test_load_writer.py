"""The chaos suite's background writer (tests/support/cluster.py) must stop when the
scenario ends, even when a driver call swallows the cancellation that ends it."""

from __future__ import annotations

import asyncio
from typing import cast

from tests.support.cluster import Cluster, Load


class _SwallowingWriter:
    """Writes that swallow a cancellation arriving as they finish, as Python 3.11's
    ``asyncio.wait_for`` can (the writer's reset path uses it)."""

    def __init__(self) -> None:
        self.resets = 0

    async def write(self, key: str) -> None:
        try:
            await asyncio.sleep(0.002)
        except asyncio.CancelledError:
            return

    async def reset_writer(self) -> None:
        self.resets += 1


async def test_load_stops_even_when_a_write_swallows_its_cancellation() -> None:
    writer = _SwallowingWriter()
    load = Load(cast(Cluster, writer), every=0.001)
    async with asyncio.timeout(5):
        async with load.running():
            await asyncio.sleep(0.05)
    count = len(load.acked)
    assert count > 0
    await asyncio.sleep(0.02)
    assert len(load.acked) == count  # nothing writes after the scenario ended
    assert writer.resets == 1
