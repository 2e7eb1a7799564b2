"""Test helpers: a real HAProxy on loopback with an admin socket, and small HTTP apps.

``http_app(name)`` serves ``name`` on a free loopback port (it stands in for the
primary's or the standby's application); ``haproxy(tmp_path, servers)`` starts
``/usr/sbin/haproxy -db`` with a frontend on a free port, one backend ``app`` of
the given servers, an admin Unix socket and an admin TCP socket, and kills it on
exit, whatever happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from tests.support import (
    aretry_if_port_taken,
    bound_socket,
    free_port,
    need,
    port_of,
    timing,
    which,
)


@dataclass(frozen=True)
class Server:
    name: str
    port: int
    options: str = ""  # e.g. "check inter 100ms rise 1 fall 1 disabled"


@dataclass(frozen=True)
class Haproxy:
    admin_socket: str  # Unix path
    admin_tcp: str  # host:port
    frontend: str  # http://127.0.0.1:PORT
    log: Path


@contextlib.asynccontextmanager
async def http_app(name: str) -> AsyncIterator[int]:
    """An HTTP server answering every GET with ``name``; yields its port."""

    async def handler(_: web.Request) -> web.Response:
        return web.Response(text=name)

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = bound_socket()  # the site listens on it: the port is never free meanwhile
    port = port_of(sock)
    await web.SockSite(runner, sock).start()
    try:
        yield port
    finally:
        await runner.cleanup()


async def admin(socket_path: str, command: str) -> str:
    """Send one runtime API command (for arranging a test's starting state)."""
    reader, writer = await asyncio.open_unix_connection(socket_path)
    writer.write(command.encode() + b"\n")
    await writer.drain()
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    return data.decode()


@contextlib.asynccontextmanager
async def haproxy(tmp_path: Path, servers: list[Server]) -> AsyncIterator[Haproxy]:
    binary = need("haproxy", which("haproxy", "/usr/sbin"))
    proc, lb = await aretry_if_port_taken(lambda: _start(binary, tmp_path, servers))
    try:
        yield lb
    finally:
        if proc.returncode is None:
            proc.kill()
        await asyncio.wait_for(proc.wait(), 10)


async def _start(
    binary: str, tmp_path: Path, servers: list[Server]
) -> tuple[asyncio.subprocess.Process, Haproxy]:
    """haproxy on fresh ports, ready; killed if it does not come up."""
    sock = tmp_path / "admin.sock"
    tcp = f"127.0.0.1:{free_port()}"
    front = free_port()
    lines = "\n".join(
        f"    server {s.name} 127.0.0.1:{s.port} {s.options}".rstrip() for s in servers
    )
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(
        f"""global
    nbthread 1
    stats socket {sock} mode 600 level admin
    stats socket ipv4@{tcp} level admin

defaults
    mode http
    timeout connect 1s
    timeout client 5s
    timeout server 5s

frontend fe
    bind 127.0.0.1:{front}
    default_backend app

backend app
{lines}
"""
    )
    log = tmp_path / "haproxy.log"
    with log.open("wb") as out:  # truncated: a failed try's log says nothing of this one
        proc = await asyncio.create_subprocess_exec(
            binary, "-db", "-f", str(cfg), stdout=out, stderr=subprocess.STDOUT
        )
    try:
        await _wait_ready(proc, str(sock), log)
    except BaseException:
        if proc.returncode is None:
            proc.kill()
        await asyncio.wait_for(proc.wait(), 10)
        raise
    lb = Haproxy(
        admin_socket=str(sock), admin_tcp=tcp, frontend=f"http://127.0.0.1:{front}", log=log
    )
    return proc, lb


async def _wait_ready(proc: asyncio.subprocess.Process, sock: str, log: Path) -> None:
    within = timing.within(20)
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            raise RuntimeError(f"haproxy exited with {proc.returncode}: {_read(log)}")
        # Each try is bounded: one connection stuck unanswered must not use up the
        # whole wait (an unbounded read once did, on a loaded CI machine).
        with contextlib.suppress(OSError, TimeoutError):
            if "Name: HAProxy" in await asyncio.wait_for(admin(sock, "show info"), 2.0):
                return
        await asyncio.sleep(0.02)
    raise RuntimeError(f"haproxy did not come up within {within:g}s: {_read(log)}")


def _read(log: Path) -> str:
    return log.read_text(errors="replace")
