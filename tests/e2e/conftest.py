"""Fixtures for end-to-end tests: the daemon as a real process over real servers."""

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest_asyncio

from tests.support.apps import demo_apps
from tests.support.daemon import DaemonProcess
from tests.support.pg import pg_pair

__all__ = ["daemon_factory", "demo_apps", "pg_pair"]


@pytest_asyncio.fixture
async def daemon_factory(tmp_path: Path) -> AsyncIterator[Callable[..., DaemonProcess]]:
    started: list[DaemonProcess] = []

    def make(cfg: dict[str, Any], **kw: Any) -> DaemonProcess:
        d = DaemonProcess(cfg, tmp_path, **kw)
        started.append(d)
        return d

    yield make
    for d in started:
        d.kill()
