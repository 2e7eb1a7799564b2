"""The metrics port's HTTP server: h11 (the HTTP/1.1 protocol: parsing requests, framing
responses, keep-alive) on asyncio streams, with our routing and limits around it. What
the port needs: a few small GETs from Prometheus, load balancers, witnesses and browsers.

aiohttp's server would do, but importing aiohttp costs about 10 MiB of resident memory:
a third of a daemon that watches a pair through its databases alone (issue 13); h11 is
pure Python and small. aiohttp stays the client for outbound HTTP (probes, steps,
webhooks), loaded when a config uses one. The handler API borrows aiohttp.web's names
(``Request``, ``Response``, ``json_response``, ``get``, ``app.router.add_get``), so a
route reads the same.

The port is reachable by whoever can reach the host, so every peer is bounded: a request
head is at most ``MAX_HEAD`` bytes, and head and body must arrive within the keep-alive
timeout of the connection going idle (a slow sender is cut off, as is an idle one); a
request body (nothing here takes one) is read and dropped up to ``MAX_BODY`` bytes,
refused beyond, and a chunked one is refused; at most ``max_connections`` connections at
once, a new one shedding the oldest idle one (or itself when all are busy with a
request). A request h11 cannot parse is answered with its status hint (400; 431 for a
head too large) and the connection closed; so is an HTTP/1.1 request without ``Host``
(RFC 9112, section 3.2).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11

MAX_HEAD = 16 * 1024
MAX_BODY = 64 * 1024
WRITE_TIMEOUT = 10.0  # a peer that does not read its reply is dropped after this
READ_SIZE = 4096

_log = logging.getLogger(__name__)


class Request:
    """One parsed request: method, path, query (first value per key; ``query_all`` has
    every value) and headers (names in lower case, repeated ones joined by ``,``)."""

    def __init__(
        self, method: str, target: str, headers: Mapping[str, str], version: str = "HTTP/1.1"
    ) -> None:
        parts = urlsplit(target)
        self.method = method
        self.path = parts.path or "/"
        self.query_all: dict[str, list[str]] = parse_qs(parts.query, keep_blank_values=True)
        self.query = {k: v[0] for k, v in self.query_all.items()}
        self.headers = dict(headers)
        self.version = version


class Response:
    """A complete reply. ``text`` is encoded with ``charset`` (type ``text/plain`` unless
    ``content_type`` says otherwise); ``body`` is sent as is. ``compress``: gzip it when
    the client accepts that."""

    def __init__(
        self,
        *,
        status: int = 200,
        text: str | None = None,
        body: bytes | None = None,
        content_type: str | None = None,
        charset: str = "utf-8",
        headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
        compress: bool = False,
    ) -> None:
        self.status = status
        self.headers: dict[str, str] = dict(headers or {})
        self.charset: str | None = None
        if text is not None:
            body = text.encode(charset)
            content_type, self.charset = content_type or "text/plain", charset
        self.content_type = content_type  # without parameters, as aiohttp has it
        if content_type is not None:
            suffix = f"; charset={self.charset}" if self.charset else ""
            self.headers["Content-Type"] = content_type + suffix
        self.body = body or b""
        self.compress = compress

    @property
    def text(self) -> str:
        return self.body.decode(self.charset or "utf-8", "replace")


def json_response(data: Any, *, status: int = 200) -> Response:
    return Response(status=status, text=json.dumps(data), content_type="application/json")


Handler = Callable[[Request], Awaitable[Response]]
Middleware = Callable[[Request, Handler], Awaitable[Response]]
Route = tuple[str, str, Handler]


def get(path: str, handler: Handler) -> Route:
    """A GET route, for ``App(routes=...)`` or ``app.add_routes``."""
    return ("GET", path, handler)


class App:
    """The route table: ``app.router.add_get("/", page)`` attaches one more page."""

    def __init__(
        self, routes: Iterable[Route] = (), *, middlewares: Iterable[Middleware] = ()
    ) -> None:
        self._routes: dict[str, dict[str, Handler]] = {}
        self.middlewares = list(middlewares)
        self.add_routes(routes)

    @property
    def router(self) -> App:
        return self

    def add_route(self, method: str, path: str, handler: Handler) -> None:
        self._routes.setdefault(path, {})[method.upper()] = handler

    def add_get(self, path: str, handler: Handler) -> None:
        self.add_route("GET", path, handler)

    def add_routes(self, routes: Iterable[Route]) -> None:
        for method, path, handler in routes:
            self.add_route(method, path, handler)

    async def handle(self, request: Request) -> Response:
        methods = self._routes.get(request.path)
        if methods is None:
            return _error(HTTPStatus.NOT_FOUND)
        handler = methods.get("GET" if request.method == "HEAD" else request.method)
        if handler is None:
            allow = ", ".join(sorted(methods))
            return _error(HTTPStatus.METHOD_NOT_ALLOWED, {"Allow": allow})
        for middleware in reversed(self.middlewares):
            handler = _wrap(middleware, handler)
        try:
            return await handler(request)
        except Exception:
            _log.exception("handler of %s %s raised", request.method, request.path)
            return _error(HTTPStatus.INTERNAL_SERVER_ERROR)


def _wrap(middleware: Middleware, inner: Handler) -> Handler:
    async def wrapped(request: Request) -> Response:
        return await middleware(request, inner)

    return wrapped


def _error(status: HTTPStatus, headers: Mapping[str, str] | None = None) -> Response:
    return Response(status=status, text=f"{status.value}: {status.phrase}", headers=headers)


class _Refused(Exception):
    """A request answered with an error status, after which the connection closes."""

    def __init__(self, status: int) -> None:
        self.status = status


class Connection:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.busy = False
        self.task = asyncio.current_task()

    def close(self) -> None:
        self.writer.close()


class Server:
    """Serves an ``App`` on host:port until ``cleanup()``."""

    def __init__(
        self, app: App, *, max_connections: int = 64, keepalive_timeout: float = 5.0
    ) -> None:
        self.app = app
        self.max_connections = max_connections
        self.keepalive_timeout = keepalive_timeout
        self.connections: list[Connection] = []
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._serve, host, port, limit=MAX_HEAD)

    @property
    def port(self) -> int | None:
        if self._server is None or not self._server.sockets:
            return None
        return int(self._server.sockets[0].getsockname()[1])

    async def cleanup(self) -> None:
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        for conn in list(self.connections):
            conn.close()
            if conn.task is not None:
                conn.task.cancel()
        tasks = [c.task for c in self.connections if c.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()

    def _shed(self, new: Connection) -> None:
        # A closed connection stays listed until its task ends: count the open ones.
        live = [c for c in self.connections if not c.writer.is_closing()]
        if len(live) <= self.max_connections:
            return
        idle = [c for c in live if c is not new and not c.busy]
        (idle[0] if idle else new).close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(writer)
        self.connections.append(conn)
        self._shed(conn)
        http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        try:
            while not writer.is_closing():
                try:
                    async with asyncio.timeout(self.keepalive_timeout):
                        request = await self._receive(reader, http, conn)
                    if request is None:
                        break  # the peer closed between requests
                    response = await self.app.handle(request)
                except _Refused as refused:
                    request, response = None, _error(HTTPStatus(refused.status))
                    response.headers["Connection"] = "close"
                await self._send(writer, http, request, response)
                conn.busy = False
                if http.our_state is not h11.DONE or http.their_state is not h11.DONE:
                    break  # h11 says the connection cannot be reused (close, HTTP/1.0)
                http.start_next_cycle()
        except (TimeoutError, ConnectionError, h11.ProtocolError):
            pass  # idle or slow past the keep-alive timeout, the peer went away, or gave up
        finally:
            self.connections.remove(conn)
            writer.close()

    async def _receive(
        self, reader: asyncio.StreamReader, http: h11.Connection, conn: Connection
    ) -> Request | None:
        """The next request, its body read and dropped; None when the peer closed."""
        buffered, fed = len(http.trailing_data[0]), 0
        request: Request | None = None
        while True:
            try:
                event = http.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                if buffered + fed - len(http.trailing_data[0]) > MAX_HEAD:
                    status = HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE
                raise _Refused(status) from None
            if event is h11.NEED_DATA:
                data = await reader.read(READ_SIZE)
                if not data and request is None and not buffered + fed:
                    return None
                if not data:
                    raise ConnectionResetError("the peer closed in the middle of a request")
                fed += len(data)
                http.receive_data(data)
            elif isinstance(event, h11.Request):
                conn.busy = True
                if buffered + fed - len(http.trailing_data[0]) > MAX_HEAD:
                    raise _Refused(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
                request = _request(event)
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                return request
            elif isinstance(event, h11.ConnectionClosed):
                return None
            # h11.Data: a small body, dropped.

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        http: h11.Connection,
        request: Request | None,
        response: Response,
    ) -> None:
        body = response.body
        headers = dict(response.headers)
        accepts = request.headers.get("accept-encoding", "") if request else ""
        if response.compress and "gzip" in accepts.lower() and body:
            body = gzip.compress(body)
            headers["Content-Encoding"] = "gzip"
        headers.setdefault("Content-Type", "application/octet-stream")
        headers["Content-Length"] = str(len(body))
        try:
            phrase = HTTPStatus(response.status).phrase
        except ValueError:
            phrase = ""
        fields = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        out = http.send(h11.Response(status_code=response.status, headers=fields, reason=phrase))
        if body and (request is None or request.method != "HEAD"):
            out += http.send(h11.Data(data=body)) or b""
        out += http.send(h11.EndOfMessage()) or b""
        writer.write(out or b"")
        async with asyncio.timeout(WRITE_TIMEOUT):
            await writer.drain()


def _request(event: h11.Request) -> Request:
    """Ours from h11's: a method without body, a GET with a small one, nothing chunked."""
    version = "HTTP/" + event.http_version.decode("ascii")
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise _Refused(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED)
    headers: dict[str, str] = {}
    for name, value in event.headers:
        key, text = name.decode("latin-1"), value.decode("latin-1")
        headers[key] = f"{headers[key]},{text}" if key in headers else text
    if "transfer-encoding" in headers:
        raise _Refused(HTTPStatus.LENGTH_REQUIRED)
    if int(headers.get("content-length", "0")) > MAX_BODY:  # h11 checked it is a number
        raise _Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
    target = event.target.decode("latin-1")
    try:
        return Request(event.method.decode("ascii").upper(), target, headers, version)
    except ValueError:  # urlsplit: a target such as ``http://[/x`` (unbalanced bracket)
        raise _Refused(HTTPStatus.BAD_REQUEST) from None
