"""Chaos suite (issue 5): real PostgreSQL primary + standby, watchdogd as a real process,
the app stand-ins and a fault-injecting proxy; one test per failure mode.

This module owns the suite's evidence helpers, so every scenario judges the outcome
the same way and independently of what watchdogd says about itself:

- ``promotions(pair)`` counts real promotions from the servers' data dirs (each
  promotion writes a timeline history file ``pg_wal/0000000N.history``);
- ``commit_rows`` / ``assert_rows_kept`` prove that no row committed and replicated
  before the fault is missing from whichever node is the primary at the end;
- ``sample`` and ``MetricsRecorder`` read the daemon's Prometheus exposition.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
from prometheus_client.parser import text_string_to_metric_families

from tests.support import timing
from tests.support.daemon import DaemonProcess
from watchdogd.demo.lab import PgPair, PgServer

_HISTORY = re.compile(r"[0-9A-F]{8}\.history")
TABLE = "chaos_rows"
# Node names lab_config() gives the servers.
NODES = {"main": "primary", "failover": "standby"}


def promotions(pair: PgPair) -> int:
    """Real promotions on either server: timeline history files in pg_wal (readable
    because the suite runs as root). The lab's pair starts on timeline 1 with none."""
    return sum(
        1
        for server in (pair.primary, pair.standby)
        for f in (server.data_dir / "pg_wal").iterdir()
        if _HISTORY.fullmatch(f.name)
    )


def server_for(pair: PgPair, node: str) -> PgServer:
    server: PgServer = getattr(pair, NODES[node])
    return server


async def commit_rows(pair: PgPair, tag: str, n: int = 20) -> set[str]:
    """Commit ``n`` rows one transaction each, plus a batch of 200 in one, on the
    primary; return once the standby has replayed them all (lag 0)."""
    notes = [f"{tag}-{i}" for i in range(n)]
    batch = [f"{tag}-batch-{i}" for i in range(200)]
    conn = await asyncpg.connect(pair.primary.dsn, timeout=5)
    try:
        await conn.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (note text PRIMARY KEY)")
        for note in notes:
            await conn.execute(f"INSERT INTO {TABLE} VALUES ($1)", note)
        await conn.executemany(f"INSERT INTO {TABLE} VALUES ($1)", [(b,) for b in batch])
    finally:
        await conn.close()
    await asyncio.to_thread(pair.wait_replayed)
    return {*notes, *batch}


async def read_rows(dsn: str) -> set[str]:
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        return {r["note"] for r in await conn.fetch(f"SELECT note FROM {TABLE}", timeout=5)}
    finally:
        await conn.close()


async def assert_rows_kept(pair: PgPair, status: dict[str, Any], rows: set[str]) -> PgServer:
    """The node the daemon names primary really is one (not in recovery) and holds
    every row committed before the fault. Returns that server."""
    server = server_for(pair, status["roles"]["primary"])
    in_recovery = await asyncio.to_thread(server.execute, "SELECT pg_is_in_recovery()")
    assert in_recovery == "f", f"{server.name} is named primary but is in recovery"
    missing = rows - await read_rows(server.dsn)
    assert not missing, (
        f"{len(missing)} committed rows missing on {server.name}: {sorted(missing)[:5]}"
    )
    return server


def started_failovers(d: DaemonProcess) -> list[dict[str, Any]]:
    return [r for r in d.journal() if r["type"] == "failover_started"]


def events(d: DaemonProcess, name: str) -> list[dict[str, Any]]:
    return [e for e in d.events() if e.get("event") == name]


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in a Prometheus exposition (labels: a subset to match)."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return None


async def wait_for(
    check: Callable[[], Awaitable[bool] | bool], what: str, within: float, every: float = 0.1
) -> None:
    within = timing.within(within)
    deadline = time.monotonic() + within
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {within:g}s")
        await asyncio.sleep(every)


class MetricsRecorder:
    """Scrapes the daemon's /metrics in the background and keeps, per scrape, the
    values of ``names`` (a short-lived state shows up even between two polls)."""

    def __init__(self, d: DaemonProcess, *names: str, every: float = 0.05) -> None:
        self.d = d
        self.names = names
        self.every = every
        self.samples: list[dict[str, float | None]] = []
        self.errors = 0

    async def _loop(self) -> None:
        while True:
            try:
                text = await self.d.metrics()
            except Exception:  # the daemon may be busy; the next scrape will do
                self.errors += 1
            else:
                self.samples.append({n: sample(text, n) for n in self.names})
            await asyncio.sleep(self.every)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[MetricsRecorder]:
        task = asyncio.create_task(self._loop())
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def first(self, **values: float) -> int | None:
        """Index of the first scrape where every named metric had the given value."""
        for i, s in enumerate(self.samples):
            if all(s.get(k) == v for k, v in values.items()):
                return i
        return None


def reap(pid_file: Path, must_contain: str) -> None:
    """Kill processes a step left behind (their pids listed in ``pid_file``), checking
    the command line first so a recycled pid is never hit."""
    if not pid_file.exists():
        return
    for line in pid_file.read_text().split():
        pid = int(line)
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if must_contain.encode() in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
