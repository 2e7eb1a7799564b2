"""The fault proxy itself, against a real TCP echo server: each mode does what the
chaos scenarios rely on (refuse = RST, blackhole = silence and timeouts, not refusals)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import pytest_asyncio

from tests.support.proxy import BLACKHOLE, PASS, REFUSE, FaultProxy, ProxyError

SILENCE = 0.3  # long enough to tell "nothing came" from "not yet scheduled"


@dataclass
class Echo:
    port: int
    dialled: int = 0


@pytest_asyncio.fixture
async def echo() -> AsyncIterator[Echo]:
    state = Echo(port=0)
    writers: set[asyncio.StreamWriter] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.dialled += 1
        writers.add(writer)
        try:
            while data := await reader.read(4096):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writers.discard(writer)
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        server.close()
        for w in list(writers):
            w.close()
        await server.wait_closed()


@pytest_asyncio.fixture
async def proxy(echo: Echo) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(echo.port) as p:
        yield p


async def roundtrip(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes
) -> bytes:
    writer.write(data)
    await writer.drain()
    return await asyncio.wait_for(reader.readexactly(len(data)), 2.0)


async def test_pass_forwards_both_ways(proxy: FaultProxy, echo: Echo) -> None:
    conns = [await asyncio.open_connection("127.0.0.1", proxy.port) for _ in range(3)]
    for i, (r, w) in enumerate(conns):
        assert await roundtrip(r, w, f"hello {i}".encode() * 1000) == f"hello {i}".encode() * 1000
    assert echo.dialled == 3 and proxy.connections == 3
    for _, w in conns:
        w.close()


async def test_refuse_resets_existing_and_new_connections(proxy: FaultProxy) -> None:
    r, w = await asyncio.open_connection("127.0.0.1", proxy.port)
    assert await roundtrip(r, w, b"ping") == b"ping"
    proxy.set_mode(REFUSE)
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(r.read(10), 2.0)
    # A new connection is accepted by the kernel, then reset (not a clean EOF).
    r2, w2 = await asyncio.open_connection("127.0.0.1", proxy.port)
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(r2.read(10), 2.0)
    assert proxy.connections == 0 and proxy.resets == 2
    w.close()
    w2.close()
    proxy.set_mode(PASS)
    r3, w3 = await asyncio.open_connection("127.0.0.1", proxy.port)
    assert await roundtrip(r3, w3, b"back") == b"back"
    w3.close()


async def test_blackhole_is_silence_then_delivers_what_was_held(
    proxy: FaultProxy, echo: Echo
) -> None:
    r, w = await asyncio.open_connection("127.0.0.1", proxy.port)
    assert await roundtrip(r, w, b"before") == b"before"
    proxy.set_mode(BLACKHOLE)
    w.write(b"held")
    await w.drain()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(r.read(10), SILENCE)
    # New connections are accepted (no refusal) but the target is never dialled.
    r2, w2 = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", proxy.port), 2.0)
    w2.write(b"new")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(r2.read(10), SILENCE)
    assert echo.dialled == 1 and proxy.connections == 2
    proxy.set_mode(PASS)
    assert await asyncio.wait_for(r.readexactly(4), 2.0) == b"held"
    assert await asyncio.wait_for(r2.readexactly(3), 2.0) == b"new"
    assert echo.dialled == 2
    w.close()
    w2.close()


async def test_stop_closes_everything(echo: Echo) -> None:
    p = FaultProxy(echo.port)
    await p.start()
    r, w = await asyncio.open_connection("127.0.0.1", p.port)
    assert await roundtrip(r, w, b"x") == b"x"
    p.set_mode(BLACKHOLE)
    r2, w2 = await asyncio.open_connection("127.0.0.1", p.port)
    await p.stop()
    for reader in (r, r2):
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(10), 2.0)
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", p.port)
    assert p.connections == 0
    w.close()
    w2.close()


async def test_target_refusing_resets_the_client(echo: Echo) -> None:
    async with FaultProxy(echo.port) as p:
        dead = FaultProxy(p.port)  # a port nobody will listen on after p stops
    async with dead:
        r, _ = await asyncio.open_connection("127.0.0.1", dead.port)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(r.read(10), 2.0)


def test_bad_inputs_are_one_clear_line() -> None:
    with pytest.raises(ProxyError, match=r"^proxy target '10\.0\.0\.1' is not a loopback address$"):
        FaultProxy(5432, target_host="10.0.0.1")
    with pytest.raises(
        ProxyError, match="unknown proxy mode 'drop'; known: pass, refuse, blackhole"
    ):
        FaultProxy(5432, mode="drop")
    with pytest.raises(ProxyError, match="out of range"):
        FaultProxy(0)
