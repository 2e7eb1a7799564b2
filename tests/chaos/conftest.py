"""Fixtures for the chaos suite: a PostgreSQL pair, the app stand-ins, watchdogd as a
real process, and fault proxies; all killed or closed after each test, even on failure.
For the matrix (test_matrix.py): a cluster of any engine on a server profile, and the
fault→failover times each cell measured, printed at the end of the run
(tests/support/report.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import pytest_asyncio

from tests.support.apps import demo_apps
from tests.support.cluster import (
    MARIADB,
    POSTGRES,
    REDIS,
    STOCK,
    Cluster,
    maria_cluster,
    pg_cluster,
    redis_cluster,
)
from tests.support.daemon import daemon_factory
from tests.support.mysql import mariadb_template_dir
from tests.support.pg import SECRET, pg_pair, pg_template, require_pg_bin
from tests.support.proxy import FaultProxy
from tests.support.redis import binary as redis_binary
from tests.support.report import pytest_terminal_summary

__all__ = [
    "daemon_factory",
    "demo_apps",
    "fault_proxy",
    "mariadb_template_dir",
    "pg_pair",
    "pytest_terminal_summary",
]


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


# --------------------------------------------------------------------------- the matrix


@pytest_asyncio.fixture
async def cluster(
    request: pytest.FixtureRequest, engine: str, profile: str
) -> AsyncIterator[Cluster]:
    """A primary + standby of ``engine`` on ``profile`` (the matrix's parameters).
    Built in the event loop's (main) thread, blocking it: no proxy runs yet, and the
    servers must die with this thread, not a worker's."""
    made: Cluster
    if engine == POSTGRES:
        made = pg_cluster(profile, require_pg_bin(), pg_template(request.config), SECRET)
    elif engine == MARIADB:
        made = maria_cluster(profile, request.getfixturevalue("mariadb_template_dir"))
    elif engine == REDIS:
        redis_binary()  # skip (or fail, in CI) loudly when missing
        made = redis_cluster(profile)
    else:
        raise AssertionError(f"unknown engine {engine!r}")
    try:
        yield made
    finally:
        await made.aclose()


# Rough wall time of a matrix cell (and of the suite's other minute-long test), to
# start the long ones first under pytest-xdist.
_LONG_ON_STOCK = {"test_hang": 65, "test_standby_link_cut": 75, "test_isolated_primary": 67}
_LONG = {"test_flapping_primary_never_fails_over": 62.0}
# The fleet's and the guard's stock/tuned cells (parametrized on pg_pair, not engine):
# about 30 s each on stock, where an idle standby replies every 10 s.
_LONG |= {
    "test_cut_from_the_store_with_the_standby_streaming_it_does_not_fence": 30.0,
    "test_cut_from_the_store_and_the_standby_it_fences_within_the_standbys_window": 20.0,
    "test_a_watcher_cut_from_the_primary_fails_nothing_over": 20.0,
}


def _cost(item: pytest.Item) -> float:
    name = getattr(item, "originalname", item.name)
    params = getattr(getattr(item, "callspec", None), "params", {})
    if "engine" not in params:
        return _LONG.get(name, 0.0)
    if params.get("profile") != STOCK:
        return 10.0
    if name == "test_watcher_primary_cut":
        return 20.0 if params["engine"] == REDIS else 40.0
    return float(_LONG_ON_STOCK.get(name, 12))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Matrix cells first, longest first (everything else keeps its order): with
    xdist the long sleep-bound cells then overlap instead of forming a tail."""
    items.sort(key=lambda item: -_cost(item))
