"""A hostile witness cannot stop the watcher: the daemon as a real process over a real
PostgreSQL pair, with a witness that answers ``[`` 200,000 times (once a RecursionError in
every probe cycle, so nothing was detected any more and /healthz stayed 503)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest_asyncio
from aiohttp import web

from tests.support import bound_socket, port_of
from tests.support.daemon import DaemonProcess, lab_config
from tests.support.pg import eventually
from watchdogd.demo.lab import PgPair

Factory = Callable[..., DaemonProcess]


@pytest_asyncio.fixture
async def hostile_witness() -> AsyncIterator[tuple[str, list[float]]]:
    asked: list[float] = []

    async def answer(request: web.Request) -> web.Response:
        asked.append(time.monotonic())
        return web.Response(text="[" * 200_000, content_type="application/json")

    app = web.Application()
    app.router.add_get("/primary", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = bound_socket()  # the site listens on it: the port is never free meanwhile
    port = port_of(sock)
    await web.SockSite(runner, sock).start()
    try:
        yield f"http://127.0.0.1:{port}/primary", asked
    finally:
        await runner.cleanup()


async def test_a_witness_answering_200k_brackets_stops_nothing(
    pg_pair: PgPair,
    daemon_factory: Factory,
    tmp_path: Path,
    hostile_witness: tuple[str, list[float]],
) -> None:
    url, asked = hostile_witness
    cfg = lab_config(pg_pair, tmp_path, interval="300ms", timeout="200ms", threshold="1s")
    cfg["witnesses"] = [{"name": "hostile", "url": url}]
    d = daemon_factory(cfg)
    await d.start()  # a first cycle completed: READY would have been sent
    first = await d.wait_state("watching", within=10)
    await eventually(lambda: len(asked) >= 5, within=10)
    status = await d.status()
    assert status["last_cycle_at"] > first["last_cycle_at"]  # cycles keep running
    healthz = d.metrics_url.replace("/metrics", "/healthz")
    async with aiohttp.ClientSession() as s, s.get(healthz) as r:
        assert r.status == 200, await r.text()
    metrics = await d.metrics()
    assert 'watchdogd_probe_success{cluster="orders",node="hostile",probe="witness"} 0.0' in metrics
    assert not [e for e in d.events() if e.get("event") == "cycle_error"]

    # The primary is still watched: its death is detected and acted on, the hostile
    # witness abstaining.
    pg_pair.primary.kill()
    await d.wait_state("failed_over", within=20)
    downs = [e for e in d.events() if e.get("event") == "primary_down"]
    assert len(downs) == 1
