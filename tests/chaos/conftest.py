"""Fixtures for the chaos suite: a PostgreSQL pair, the app stand-ins, watchdogd as a
real process, and fault proxies; all killed or closed after each test, even on failure."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest_asyncio

from tests.support.apps import demo_apps
from tests.support.daemon import DaemonProcess
from tests.support.pg import pg_pair
from tests.support.proxy import FaultProxy

__all__ = ["daemon_factory", "demo_apps", "fault_proxy", "pg_pair"]


@pytest_asyncio.fixture
async def daemon_factory(tmp_path: Path) -> AsyncIterator[Callable[..., DaemonProcess]]:
    """``make(cfg)`` → a DaemonProcess (not started); every one is SIGKILLed at teardown.
    Daemons made in one test share ``tmp_path``: same config, log, journal and socket,
    so a second one is the first one restarted."""
    started: list[DaemonProcess] = []

    def make(cfg: dict[str, Any], **kw: Any) -> DaemonProcess:
        d = DaemonProcess(cfg, tmp_path, **kw)
        started.append(d)
        return d

    yield make
    for d in started:
        d.kill()


@pytest_asyncio.fixture
async def fault_proxy() -> AsyncIterator[Callable[[int], Awaitable[FaultProxy]]]:
    """``await make(target_port)`` → a started FaultProxy in ``pass`` mode; all are
    stopped (every connection reset) at teardown."""
    proxies: list[FaultProxy] = []

    async def make(target_port: int) -> FaultProxy:
        proxy = FaultProxy(target_port)
        proxies.append(proxy)
        await proxy.start()
        return proxy

    yield make
    for proxy in proxies:
        await proxy.stop()
