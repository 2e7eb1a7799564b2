"""Checks the engine tests share: the same scenario against each engine's real servers."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import Awaitable, Callable

import pytest

from tests.support import timing, wait_stopped
from watchdogd.engines import DbStatus, Engine, EngineError


async def eventually(
    check: Callable[[], Awaitable[DbStatus]],
    ok: Callable[[DbStatus], bool],
    timeout: float = 5.0,
    interval: float = 0.05,
) -> DbStatus:
    """Poll ``check()`` until ``ok`` holds for its status; fail after ``timeout``."""
    timeout = timing.within(timeout)
    deadline = time.monotonic() + timeout
    while True:
        status = await check()
        if ok(status):
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s; last: {status}")
        await asyncio.sleep(interval)


async def check_bounded_when_sigstopped(
    pid: int,
    probing: Engine,
    fresh: Engine,
    operation: str,
    *,
    limit: float,
    within: float,
    timeout: float,
) -> None:
    """A SIGSTOPped server (no RST, nothing answers): ``status`` on ``probing``'s open
    connection (hangs on a query), ``status`` on ``fresh`` (hangs in the handshake) and
    ``operation`` on ``fresh`` each fail within ``within`` seconds as one line ending
    ``<op> timed out after <limit>s``. Once continued, ``probing`` reconnects
    (``timeout`` bounds the calls outside the hang)."""
    await probing.status(timeout)  # the probing connection is open
    os.kill(pid, signal.SIGSTOP)
    wait_stopped(pid)
    try:
        calls: list[tuple[str, Callable[[float], Awaitable[object]]]] = [
            ("status", probing.status),
            ("status", fresh.status),
            (operation, getattr(fresh, operation)),
        ]
        for name, call in calls:
            t0 = time.monotonic()
            with pytest.raises(
                EngineError, match=rf": {name} timed out after {re.escape(f'{limit:g}')}s$"
            ):
                await call(limit)
            assert time.monotonic() - t0 < within
    finally:
        os.kill(pid, signal.SIGCONT)
    assert (await probing.status(timeout)).is_primary  # reconnects once the server is back
    await fresh.close()
