"""A fault-injecting TCP proxy for chaos tests: put it between the daemon (a separate
process) and a server, then cut the link at run time.

It runs inside the test's event loop, listens on a free 127.0.0.1 port and forwards
to a loopback target. Modes, switchable at any time with ``set_mode``:

- ``pass``: forward both ways.
- ``refuse``: reset every connection at once (RST, via SO_LINGER 0) and reset new
  ones as soon as they are accepted: the client sees "connection reset".
- ``blackhole``: like a dropped route. Connections stay open but nothing is
  forwarded in either direction; new connections are accepted and hear nothing
  (the upstream is not even dialled). Clients see timeouts, never refusals. Bytes
  already in flight are held, not lost, and delivered if the mode returns to
  ``pass`` — TCP would retransmit them once the route came back.

``stop()`` resets every connection and closes the listener. Loopback only: the
target must be a loopback address.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import struct
from dataclasses import dataclass, field
from types import TracebackType

PASS, REFUSE, BLACKHOLE = "pass", "refuse", "blackhole"
MODES = (PASS, REFUSE, BLACKHOLE)

_CHUNK = 65536
_CONNECT_TIMEOUT = 5.0


class ProxyError(Exception):
    """The proxy was misused (bad mode, non-loopback target); one line."""


@dataclass(eq=False)
class _Link:
    """One client connection and, once dialled, its upstream connection."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    def reset(self) -> None:
        """RST both sides: SO_LINGER 0 makes close() send a reset, not a FIN."""
        for writer in (self.client, self.upstream):
            if writer is None:
                continue
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class FaultProxy:
    """``async with FaultProxy(target_port) as proxy:`` then connect to ``proxy.port``."""

    def __init__(self, target_port: int, *, target_host: str = "127.0.0.1", mode: str = PASS):
        if not _loopback(target_host):
            raise ProxyError(f"proxy target {target_host!r} is not a loopback address")
        if not 0 < target_port < 65536:
            raise ProxyError(f"proxy target port {target_port} is out of range 1-65535")
        self._check(mode)
        self.target_host = target_host
        self.target_port = target_port
        self.port = 0  # the listening port, known after start()
        self.accepted = 0  # connections accepted so far, in any mode
        self.resets = 0  # connections this proxy reset (refuse mode, stop)
        self._mode = mode
        self._open = asyncio.Event()  # set while bytes may flow (pass mode)
        if mode == PASS:
            self._open.set()
        self._links: set[_Link] = set()
        self._server: asyncio.Server | None = None

    @staticmethod
    def _check(mode: str) -> None:
        if mode not in MODES:
            raise ProxyError(f"unknown proxy mode {mode!r}; known: {', '.join(MODES)}")

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def connections(self) -> int:
        """Client connections currently held open by the proxy."""
        return len(self._links)

    def __repr__(self) -> str:
        return (
            f"FaultProxy(127.0.0.1:{self.port} -> {self.target_host}:{self.target_port}, "
            f"{self._mode})"
        )

    # -- lifecycle

    async def start(self) -> None:
        if self._server is not None:
            return
        # Port 0: the kernel picks a free port, with no window for another test to take it.
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        tasks = [link.task for link in self._links if link.task is not None]
        self._reset_all()  # also cancels the handlers
        await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- faults

    def set_mode(self, mode: str) -> None:
        self._check(mode)
        self._mode = mode
        if mode == PASS:
            self._open.set()
            return
        self._open.clear()
        if mode == REFUSE:
            self._reset_all()

    def _reset_all(self) -> None:
        for link in list(self._links):
            self._reset(link)

    def _reset(self, link: _Link) -> None:
        if link not in self._links:
            return  # already ended
        self._links.discard(link)
        self.resets += 1
        link.reset()
        if link.task is not None and link.task is not asyncio.current_task():
            link.task.cancel()

    # -- forwarding

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        link = _Link(client=writer, task=asyncio.current_task())
        self._links.add(link)
        clean = False
        try:
            if self._mode == REFUSE:
                return
            # Blackhole: the connection is accepted and hears nothing until the mode changes.
            await self._open.wait()
            async with asyncio.timeout(_CONNECT_TIMEOUT):
                up_reader, link.upstream = await asyncio.open_connection(
                    self.target_host, self.target_port
                )
            await self._splice(reader, writer, up_reader, link.upstream)
            clean = True
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass  # the target refused or a side went away: reset the client below
        except asyncio.CancelledError:
            pass  # reset by set_mode(REFUSE) or stop(); ends the handler quietly
        finally:
            if clean and link in self._links:
                # A side closed normally: close the other normally too (FIN, not RST).
                self._links.discard(link)
                for side in (writer, link.upstream):
                    if side is not None:
                        side.close()
            else:
                self._reset(link)

    async def _splice(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
    ) -> None:
        pumps = [
            asyncio.ensure_future(self._pump(reader, up_writer)),
            asyncio.ensure_future(self._pump(up_reader, writer)),
        ]
        try:
            # Either side closing ends the pair: the protocols proxied here (PostgreSQL,
            # HTTP/1.1) never half-close.
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        while True:
            await self._open.wait()
            data = await src.read(_CHUNK)
            if not data:
                return
            # Read just before a blackhole began: hold it, as a dropped route would.
            await self._open.wait()
            dst.write(data)
            await dst.drain()
