"""What the rejoin tests of every engine share: waiting until the old primary is a
verified replica of the new one, as the daemon's verification loop does."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from tests.support import timing
from watchdogd.engines import Engine, EngineError


async def wait_replica_of(old: Engine, new: Engine, within: float = 10.0) -> str:
    """``old.replica_of(new)`` until it succeeds; fail with its last reason after ``within``."""
    deadline = time.monotonic() + timing.within(within)
    while True:
        try:
            return await old.replica_of(new, 2.0)
        except EngineError as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"not a replica of the new primary: {exc}") from None
        await asyncio.sleep(0.05)


async def eventually_true(check: Callable[[], object], within: float = 10.0) -> None:
    """Poll ``check()`` (a quick synchronous read) until it is truthy; fail after ``within``."""
    deadline = time.monotonic() + timing.within(within)
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within:g}s")
        await asyncio.sleep(0.05)


async def twice_around(
    a: Engine,
    b: Engine,
    write_on_b: Callable[[str], object],
    write_on_a: Callable[[str], object],
    rejoin_timeout: float = 10.0,
) -> None:
    """After a failover from ``a`` to ``b``: ``a`` rejoins (nothing diverged), a write
    ``via-b`` on ``b`` reaches it, ``a`` takes over again, ``b`` rejoins, a write
    ``via-a`` on ``a`` reaches it, and ``b`` takes over again."""
    for old, new, write, key in ((a, b, write_on_b, "via-b"), (b, a, write_on_a, "via-a")):
        report = await old.divergence(new, 5)
        assert report.known and report.lost == 0, report
        await old.rejoin(new, rejoin_timeout)
        await wait_replica_of(old, new)
        write(key)
        await wait_replica_of(old, new)  # replayed up to the write
        await old.promote(10)  # the next failure: the rejoined node takes over again


async def refused_as_same_server(same: Engine, new: Engine, identity: str) -> None:
    """Through ``same`` (a DSN that reaches the new primary under another name) the
    check made before the rejoin's fence, the divergence report and the rejoin are all
    refused, naming the shared ``identity``; then ``same`` is closed."""
    try:
        for call in (same.distinct_from, same.divergence, same.rejoin):
            with pytest.raises(EngineError, match=rf"are the same server \({identity}") as caught:
                await call(new, 10)
            assert "\n" not in str(caught.value)
    finally:
        await same.close()
