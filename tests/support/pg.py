"""PostgreSQL fixtures: a real primary + streaming standby per test (watchdogd.demo.lab).

Import ``pg_pair`` into a conftest (``from tests.support.pg import pg_pair``) to use
it from any test directory; it needs no other fixture. The first pair of a
session runs initdb once into a template that later pairs copy (removed at the
end of the session).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import need, timing
from watchdogd.demo.lab import (
    SERVICE_USER,
    TUNED,
    PgPair,
    PgServer,
    find_pg_bin,
    make_template,
)

SECRET = "s3cret-lab-password"  # the lab's PASSWORD_ROLE logs in with this

_TEMPLATE = pytest.StashKey[Path]()


def require_pg_bin() -> Path:
    found = find_pg_bin()
    return Path(
        need("PostgreSQL server binaries (postgres, initdb)", str(found) if found else None)
    )


def pg_template(config: pytest.Config) -> Path:
    """This session's initdb template, made on first use."""
    if _TEMPLATE not in config.stash:
        template = make_template(bin_dir=require_pg_bin())
        config.stash[_TEMPLATE] = template
        config.add_cleanup(lambda: shutil.rmtree(template.parent, ignore_errors=True))
    return config.stash[_TEMPLATE]


@pytest.fixture
def pg_pair(request: pytest.FixtureRequest) -> Iterator[PgPair]:
    """A primary and a standby streaming from it; killed and removed afterwards.
    The ``watchdogd`` role logs in over TCP with ``SECRET`` (everyone else: trust).
    On the lab's ``tuned`` profile, unless a test picks one by indirect
    parametrization: ``@pytest.mark.parametrize("pg_pair", [STOCK], indirect=True)``
    (also through a fixture built on it, such as ``fleet_rig``)."""
    bin_dir = require_pg_bin()
    profile = getattr(request, "param", TUNED)
    pair = PgPair.create(
        bin_dir=bin_dir, password=SECRET, template=pg_template(request.config), profile=profile
    )
    try:
        yield pair
    finally:
        pair.destroy()


async def eventually(
    check: Callable[[], object], within: float = 5.0, interval: float = 0.05
) -> None:
    """Wait until ``check()`` (sync or async) is truthy; fail the test after ``within``."""
    within = timing.within(within)
    deadline = time.monotonic() + within
    last: object = None
    while True:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return
        if time.monotonic() >= deadline:
            pytest.fail(f"condition not met within {within:g}s (last value: {last!r})")
        await asyncio.sleep(interval)


def leave_standby_behind(pair: PgPair) -> None:
    """Detach the standby, then write ~3 MB of WAL it never receives: a lag the
    guard must refuse (tests use max_lag 1MB)."""
    pair.detach_standby()
    pair.primary.execute(
        "CREATE TABLE unreceived AS SELECT g, repeat('x', 200) AS pad "
        "FROM generate_series(1, 12000) g"
    )


def rejoin_pair(config: pytest.Config, profile: str) -> PgPair:
    """A pair for rejoin tests: ``full_page_writes`` on (PostgreSQL's default; the lab
    turns it off for speed, and pg_rewind needs it on the source)."""
    return PgPair.create(
        bin_dir=require_pg_bin(),
        password=SECRET,
        template=pg_template(config),
        profile=profile,
        settings={"full_page_writes": "on"},
    )


def start_command(pair: PgPair, server: PgServer) -> list[str]:
    """``pg_ctl start`` for a lab server: its port, socket dir and log, as the service
    user. The engine's own default cannot know the lab's command-line settings."""
    run_as = ["runuser", "-u", SERVICE_USER, "--"] if os.geteuid() == 0 else []
    options = f"-p {server.port} -k {server.socket_dir} -c listen_addresses=127.0.0.1"
    return [*run_as, str(pair.bin_dir / "pg_ctl"), "start", "-D", str(server.data_dir),
            "-w", "-l", str(server.log_file), "-o", options]  # fmt: skip
