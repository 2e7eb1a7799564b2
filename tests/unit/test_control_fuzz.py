"""Hostile input for the control socket: thousands of random and malicious lines.

The server runs on the test's loop; hypothesis drives a blocking client from a
worker thread. Every generated mutating request is invalid by construction, so
afterwards the handler must never have seen one, its state must be unchanged,
and the server must still answer status correctly.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from pathlib import Path
from typing import Any

import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import LogCapture

from tests.support.fakes import StatefulDaemon
from watchdogd.control import COMMANDS, ControlServer, request
from watchdogd.core.events import Event
from watchdogd.core.feed import EventFeed
from watchdogd.core.model import ControlConfig

MAX_LINE = 64 * 1024
MUTATING = sorted(n for n, c in COMMANDS.items() if c.mutating)
STATUS = {"cluster": "orders", "state": "watching", "armed": True}


# --------------------------------------------------------------------------- strategies

json_scalars = (
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.text(max_size=30)
    | st.integers() | st.integers(min_value=10**30, max_value=10**400)
)  # fmt: skip
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)  # fmt: skip


def not_a(kind: str) -> st.SearchStrategy[Any]:
    """JSON values that are not valid for an argument of ``kind`` (null means "absent")."""
    if kind == "bool":
        return json_values.filter(lambda v: v is not None and not isinstance(v, bool))
    if kind == "text":
        return json_values.filter(lambda v: v is not None and not isinstance(v, str)) | (
            st.sampled_from(["", "   ", "a\nb", "tab\there", "\x1b[2J", "x" * 1001, "\ud800"])
        )  # fmt: skip
    if kind == "int":
        return json_values.filter(
            lambda v: v is not None and not (isinstance(v, int) and not isinstance(v, bool)
                                             and 1 <= v <= 1000))  # fmt: skip
    return json_values.filter(  # number of seconds, 0.1 .. 86400
        lambda v: v is not None and not (isinstance(v, int | float) and not isinstance(v, bool)
                                         and 0.1 <= v <= 86400))  # fmt: skip


@st.composite
def bad_mutating_request(draw: st.DrawFn) -> bytes:
    """A mutating command with at least one invalid argument (or args of the wrong type)."""
    name = draw(st.sampled_from(MUTATING))
    spec = COMMANDS[name]
    choices = ["unknown", "wrong-args-type"] + (["bad-value"] if spec.args else [])
    how = draw(st.sampled_from(choices))
    if how == "wrong-args-type":
        args: Any = draw(json_values.filter(lambda v: v is not None and not isinstance(v, dict)))
    else:
        args = {}
        for key, arg in spec.args.items():  # some valid ones alongside
            if draw(st.booleans()):
                args[key] = {"bool": True, "text": "ok", "int": 5, "number": 1.5}[arg.kind]
        if how == "unknown":
            key = draw(st.text(max_size=10).filter(lambda k: k not in spec.args))
            args[key] = draw(json_values)
        else:
            key = draw(st.sampled_from(sorted(spec.args)))
            args[key] = draw(not_a(spec.args[key].kind))
    text = json.dumps({"command": name, "args": args}, ensure_ascii=draw(st.booleans()))
    return text.encode("utf-8", "surrogatepass")


def envelope_noise() -> st.SearchStrategy[bytes]:
    """Objects that are not requests: missing/odd command, extra fields."""
    unknown = st.text(max_size=20).filter(lambda c: c not in COMMANDS)
    return st.one_of(
        st.builds(lambda c: {"command": c}, unknown),
        st.builds(lambda c: {"command": c}, json_values.filter(lambda v: not isinstance(v, str))),
        st.builds(lambda a: {"args": a}, json_values),
        st.builds(lambda c, k: {"command": c, k: 1}, st.sampled_from(MUTATING),
                  st.text(max_size=8).filter(lambda k: k not in ("command", "args"))),
        json_values.filter(lambda v: not isinstance(v, dict)),
    ).map(lambda v: json.dumps(v).encode())  # fmt: skip


def read_only_request() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.just(b'{"command": "status"}'),
        st.integers(1, 1000).map(lambda n: json.dumps({"command": "history", "args": {"n": n}})
                                 .encode()),
        st.integers(0, 1000).map(lambda n: json.dumps({"command": "events", "args": {"n": n}})
                                 .encode()),
    )  # fmt: skip


hostile = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=100).map(lambda t: t.encode("utf-8", "surrogatepass")),
    envelope_noise(),
    bad_mutating_request(),
    read_only_request(),
    st.integers(1, 200_000).map(lambda n: b"[" * n),
    st.integers(1, 30_000).map(lambda n: b'{"a":' * n),
    st.integers(4000, 20_000).map(lambda n: b'{"command": "history", "args": {"n": 1'
                                  + b"0" * n + b"}}"),
    st.sampled_from([b"NaN", b"Infinity", b'{"command": "pause", "args": {"reason": NaN}}',
                     b'{"command": "switchover", "args": {"timeout": 1e999}}',
                     b'{"command": "failover", "args": {"force": -Infinity}}',
                     b"\xef\xbb\xbf" + b'{"command": "pause"}',  # BOM: not JSON text
                     b'{"command": "pause"' b"\x00" b"}", b"\xc0\xaf", b"\xed\xa0\x80"]),
    st.just(b"x" * (MAX_LINE + 1)),
)  # fmt: skip


# --------------------------------------------------------------------------- client


def expected_replies(data: bytes) -> int:
    """How many replies the server owes for ``data`` (then the client half-closes)."""
    *complete, tail = data.split(b"\n")
    count = 0
    for segment in complete:
        count += 1
        if len(segment) > MAX_LINE:
            return count  # answered with an error, then the connection is closed
    if len(tail) > MAX_LINE:
        return count + 1
    return count + (1 if tail.strip() else 0)


def converse(path: str, data: bytes) -> list[bytes]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server hung up after an oversized line: its reply is still there
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks).splitlines()


def check_reply(raw: bytes) -> dict[str, Any]:
    reply = json.loads(raw, parse_constant=lambda c: pytest.fail(f"{c} in a reply"))
    assert isinstance(reply, dict) and isinstance(reply["ok"], bool), raw
    if reply["ok"]:
        assert set(reply) == {"ok", "result"}
    else:
        assert set(reply) == {"ok", "error"}
        assert isinstance(reply["error"], str) and reply["error"], raw
        assert len(reply["error"]) < 600, raw  # a clear line, not an echo of the input
    return dict(reply)


# --------------------------------------------------------------------------- the test


async def test_hostile_lines_leave_the_server_and_daemon_intact(sockdir: Path) -> None:
    daemon = StatefulDaemon(STATUS)
    log = structlog.wrap_logger(
        structlog.PrintLogger(),
        processors=[LogCapture()],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
    )
    feed = EventFeed()
    feed.publish(Event("step_failed", {"step": "promote", "error": "\x00\ud800 \u202e NaN"}))
    server = ControlServer(ControlConfig(socket=str(sockdir / "c.sock")), daemon, log, feed=feed)
    await server.start()
    before = dict(daemon.state)
    sent = {"lines": 0}

    @settings(
        max_examples=800,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.large_base_example],
    )  # fmt: skip
    @given(
        lines=st.lists(hostile, min_size=1, max_size=16),
        terminate_last=st.booleans(),
    )
    def fuzz(lines: list[bytes], terminate_last: bool) -> None:
        data = b"\n".join(lines) + (b"\n" if terminate_last else b"")
        replies = converse(server.path, data)
        assert len(replies) == expected_replies(data), (data[:200], replies[:5])
        for raw in replies:
            check_reply(raw)
        sent["lines"] += len(lines)

    try:
        await asyncio.to_thread(fuzz)
        assert sent["lines"] >= 2000  # thousands of lines, not a handful
        assert daemon.state == before
        assert set(daemon.calls) <= {"status", "history"}
        assert await request(server.path, "status") == {"ok": True, "result": STATUS}
        for _ in range(200):
            if server.connections == 0:
                break
            await asyncio.sleep(0.01)
        assert server.connections == 0  # nothing leaked
    finally:
        await server.stop()
