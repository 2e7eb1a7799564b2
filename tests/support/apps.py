"""Application stand-ins: a DemoApp per database of the pg_pair (watchdogd.demo.app).

Import ``demo_apps`` into a conftest along with ``pg_pair`` to use it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest_asyncio

from watchdogd.demo.app import DemoApp
from watchdogd.demo.lab import PgPair


@dataclass
class DemoApps:
    primary: DemoApp
    standby: DemoApp


@asynccontextmanager
async def running_apps(pair: PgPair) -> AsyncIterator[DemoApps]:
    """The primary app serving, the standby app in maintenance (as before a failover)."""
    apps = DemoApps(
        primary=DemoApp("primary", pair.primary.dsn),
        standby=DemoApp("standby", pair.standby.dsn, maintenance=True),
    )
    try:
        await apps.primary.start()
        await apps.standby.start()
        yield apps
    finally:
        await apps.primary.stop()
        await apps.standby.stop()


@pytest_asyncio.fixture
async def demo_apps(pg_pair: PgPair) -> AsyncIterator[DemoApps]:
    async with running_apps(pg_pair) as apps:
        yield apps
