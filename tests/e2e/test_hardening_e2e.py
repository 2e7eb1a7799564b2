"""Issue 15 against the daemon as a real process over a real PostgreSQL pair: a flood
of idle HTTP connections and an application that echoes its bearer token."""

from __future__ import annotations

import asyncio
import json
import os
import resource
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest_asyncio

from tests.support.daemon import DaemonProcess, lab_config
from watchdogd.demo.lab import PgPair

Factory = Callable[..., DaemonProcess]
TOKEN = "tok-5e1f0c9a7b"


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def test_idle_http_connections_cannot_starve_the_daemon(
    pg_pair: PgPair, daemon_factory: Factory, tmp_path: Path
) -> None:
    cfg = lab_config(pg_pair, tmp_path)
    d = daemon_factory(cfg)
    # Start it with systemd's default soft limit in miniature: 256 descriptors.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        await d.start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert d.proc is not None
    pid = d.proc.pid
    baseline = open_fds(pid)
    host, port = cfg["metrics"]["listen"].rsplit(":", 1)
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for _ in range(400):  # anyone who can reach the port (witnesses do) can do this
            held.append(await asyncio.open_connection(host, int(port)))
        await asyncio.sleep(0.5)
        # The daemon holds at most 64 of them, and its control socket still answers.
        assert open_fds(pid) <= baseline + 64 + 8, (baseline, open_fds(pid))
        status = await d.status()
        assert status["state"] == "watching"
        # ... the journal is still written (pause is journaled before it is answered) ...
        assert (await d.call("pause", reason="flood test"))["ok"] is True
        assert any(r.get("type") == "pause" for r in d.journal()), d.journal()
        # ... and a scrape gets in, shedding the oldest idle connection.
        text = await d.metrics()
        assert "watchdogd_build_info" in text
        # Idle connections are closed within the keep-alive timeout (5s), not an hour.
        ends = await asyncio.gather(
            *(asyncio.wait_for(r.read(), 15) for r, _ in held), return_exceptions=True
        )
        assert all(e == b"" or isinstance(e, ConnectionError) for e in ends)
        assert open_fds(pid) <= baseline + 4
        assert "watchdogd_build_info" in await d.metrics()
        assert (await d.call("resume"))["ok"] is True
    finally:
        for _, writer in held:
            writer.close()
    # Nothing about it was worth a crash: still running, still answering.
    assert d.proc.poll() is None
    assert (await d.status())["state"] == "watching"


@pytest_asyncio.fixture
async def echoing_app() -> AsyncIterator[str]:
    """A health endpoint that answers with its request's Authorization header in a
    broken status line: the probe's error detail then quotes the bearer token."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            auth = next(
                (
                    line.split(b":", 1)[1].strip()
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"authorization:")
                ),
                b"",
            )
            writer.write(b"HTTP/1.1 2x0 " + auth + b"\r\n\r\n")
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/health"
    finally:
        server.close()


async def test_an_echoed_token_never_reaches_a_peer(
    pg_pair: PgPair, daemon_factory: Factory, tmp_path: Path, echoing_app: str
) -> None:
    cfg = lab_config(pg_pair, tmp_path, trigger_on=["database"])
    cfg["primary"]["app"] = {
        "health_url": echoing_app,
        "headers": {"Authorization": "Bearer ${WD_TOKEN}"},
    }
    d = daemon_factory(cfg, env={"WD_TOKEN": TOKEN})
    await d.start()

    async def app_detail() -> str:
        status = await d.status()
        node = next(n for n in status["nodes"] if n["name"] == "main")
        return json.dumps(node.get("app"))

    for _ in range(50):
        if "Bearer" in (detail := await app_detail()):
            break
        await asyncio.sleep(0.1)
    # The probe saw the echo (so the test would show a leak) and status masked it.
    assert "Bearer ***" in detail, detail
    status = await d.status()
    assert TOKEN not in json.dumps(status)
    base = "http://{}".format(cfg["metrics"]["listen"])
    async with aiohttp.ClientSession() as s:
        for path in ("/primary", "/healthz", "/metrics"):
            async with s.get(base + path) as r:
                assert TOKEN not in await r.text(), path
