"""The metrics port's own HTTP server (watchdogd.core.httpd) over real sockets: what
Prometheus, load balancers and browsers send, and what a hostile peer might."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator

import pytest_asyncio

from watchdogd.core import httpd
from watchdogd.metrics import Metrics, bound_port, make_app, start_http, stop_http


@pytest_asyncio.fixture
async def port() -> AsyncIterator[int]:
    async def boom(request: httpd.Request) -> httpd.Response:
        raise RuntimeError("a bug")

    async def echo(request: httpd.Request) -> httpd.Response:
        return httpd.json_response({"q": request.query, "ua": request.headers.get("user-agent")})

    app = make_app(Metrics("c1"), lambda: (True, "fine"), [httpd.get("/boom", boom)])
    app.router.add_get("/echo", echo)  # attaching a page later is one line
    server = await start_http(app, "127.0.0.1", 0, keepalive_timeout=1.0)
    try:
        yield bound_port(server)
    finally:
        await stop_http(server)


async def exchange(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


def head_and_body(reply: bytes) -> tuple[list[str], bytes]:
    head, _, body = reply.partition(b"\r\n\r\n")
    return head.decode().split("\r\n"), body


async def test_get_head_404_405_and_500(port: int) -> None:
    lines, body = head_and_body(
        await exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    )
    assert lines[0] == "HTTP/1.1 200 OK" and body == b"ok fine\n"
    assert "Content-Type: text/plain; charset=utf-8" in lines and "Content-Length: 8" in lines
    lines, body = head_and_body(
        await exchange(port, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    )
    assert lines[0] == "HTTP/1.1 200 OK" and "Content-Length: 8" in lines and body == b""
    lines, _ = head_and_body(await exchange(port, b"GET /nope HTTP/1.0\r\n\r\n"))
    assert lines[0] == "HTTP/1.1 404 Not Found"
    lines, _ = head_and_body(await exchange(port, b"POST /metrics HTTP/1.0\r\n\r\n"))
    assert lines[0] == "HTTP/1.1 405 Method Not Allowed" and "Allow: GET" in lines
    lines, body = head_and_body(await exchange(port, b"GET /boom HTTP/1.0\r\n\r\n"))
    assert lines[0] == "HTTP/1.1 500 Internal Server Error" and b"a bug" not in body


async def test_keep_alive_serves_several_requests_on_one_connection(port: int) -> None:
    reply = await exchange(
        port,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /echo?a=1&a=2&b= HTTP/1.1\r\nHost: x\r\nUser-Agent: t\r\nConnection: close\r\n\r\n",
    )
    assert reply.count(b"HTTP/1.1 200 OK") == 2
    assert reply.endswith(b'{"q": {"a": "1", "b": ""}, "ua": "t"}')


async def test_metrics_negotiate_format_and_compression(port: int) -> None:
    lines, body = head_and_body(
        await exchange(
            port,
            b"GET /metrics HTTP/1.1\r\nHost: x\r\n"
            b"Accept: application/openmetrics-text; version=1.0.0\r\n"
            b"Accept-Encoding: gzip\r\nConnection: close\r\n\r\n",
        )
    )
    assert any(h.startswith("Content-Type: application/openmetrics-text") for h in lines)
    assert "Content-Encoding: gzip" in lines
    text = gzip.decompress(body).decode()
    assert "watchdogd_build_info" in text and text.endswith("# EOF\n")
    lines, body = head_and_body(
        await exchange(
            port,
            b"GET /metrics?name[]=watchdogd_build_info HTTP/1.1\r\n"
            b"Host: x\r\nConnection: close\r\n\r\n",
        )
    )
    names = {ln.split("{")[0] for ln in body.decode().splitlines() if not ln.startswith("#")}
    assert names == {"watchdogd_build_info"}


async def test_malformed_oversized_and_bodied_requests_are_refused_and_closed(port: int) -> None:
    cases = {
        b"NONSENSE\r\n\r\n": "400 Bad Request",
        b"GET /healthz HTTP/2.0\r\n\r\n": "505 HTTP Version Not Supported",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n": "400 Bad Request",
        # RFC 9112 3.2: an HTTP/1.1 request must name its Host.
        b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n": "400 Bad Request",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: x\r\n\r\n": "400 Bad Request",
        # urlsplit raises ValueError on an unbalanced IPv6 bracket in the target.
        b"GET http://[/x HTTP/1.1\r\nHost: x\r\n\r\n": "400 Bad Request",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 9999999\r\n\r\n": (
            "413 Request Entity Too Large"
        ),
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n": (
            "411 Length Required"
        ),
        b"GET /healthz HTTP/1.1\r\nX: " + b"a" * (httpd.MAX_HEAD + 10) + b"\r\n\r\n": (
            "431 Request Header Fields Too Large"
        ),
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX: " + b"a" * httpd.MAX_HEAD + b"\r\n\r\n": (
            "431 Request Header Fields Too Large"  # complete, and too large all the same
        ),
    }
    for raw, status in cases.items():
        lines, _ = head_and_body(await exchange(port, raw))  # read() returned: closed
        assert lines[0] == f"HTTP/1.1 {status}", (raw[:40], lines[0])
    # A small body is read and dropped, and the connection goes on.
    reply = await exchange(
        port,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    assert reply.count(b"HTTP/1.1 200 OK") == 2


async def test_a_slow_sender_is_cut_off_at_the_keepalive_timeout(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        for _ in range(3):  # a header line every half second never completes a request
            await asyncio.sleep(0.5)
            writer.write(b"X: y\r\n")
        # Closed (a reset, when our last line was still unread there).
        ends = await asyncio.gather(asyncio.wait_for(reader.read(), 5), return_exceptions=True)
        assert ends[0] == b"" or isinstance(ends[0], ConnectionError), ends
    finally:
        writer.close()
