"""The control socket server: validation, authorisation, socket safety and limits.

Every test talks over a real Unix socket in a private temporary directory; a
small in-test handler stands in for the daemon (the server's boundary).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pwd
import socket
import stat
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import LogCapture

from tests.support import need, which
from tests.support.fakes import RecordingDaemon
from watchdogd import control
from watchdogd.control import (
    COMMANDS,
    CommandError,
    ControlServer,
    ControlSocketError,
    ControlUnavailable,
    Peer,
    lookup,
    parse_request,
    request,
    validate_args,
)
from watchdogd.core.model import ControlConfig

KNOWN = "status, history, pause, resume, failover, switchover, abort, ack, rejoin, reload, events"


# --------------------------------------------------------------------------- helpers


def make_logger(cap: LogCapture) -> Any:
    return structlog.wrap_logger(
        structlog.PrintLogger(),
        processors=[cap],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
    )


def events(cap: LogCapture, name: str) -> list[dict[str, Any]]:
    return [dict(e) for e in cap.entries if e["event"] == name]


def exists(path: str | Path) -> bool:
    return os.path.exists(path)


async def eventually(predicate: Callable[[], bool], seconds: float = 5) -> None:
    for _ in range(int(seconds / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"still false after {seconds}s")


class Rig:
    def __init__(self, sockdir: Path) -> None:
        self.dir = sockdir
        self.path = str(sockdir / "control.sock")
        self.daemon = RecordingDaemon()
        self.cap = LogCapture()
        self.servers: list[ControlServer] = []

    async def start(self, config: ControlConfig | None = None, **kw: Any) -> ControlServer:
        server = ControlServer(
            config or ControlConfig(socket=self.path), self.daemon, make_logger(self.cap), **kw
        )
        self.servers.append(server)
        await server.start()
        return server


@pytest.fixture
async def rig(sockdir: Path) -> AsyncIterator[Rig]:
    r = Rig(sockdir)
    yield r
    for server in r.servers:
        await server.stop()


async def exchange(path: str, *lines: bytes) -> list[dict[str, Any]]:
    """Send each line on one connection, reading one reply per line."""
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        replies = []
        for line in lines:
            writer.write(line)
            await writer.drain()
            replies.append(json.loads(await asyncio.wait_for(reader.readline(), 5)))
        return replies
    finally:
        writer.close()


def line(command: str, args: Any = None) -> bytes:
    message: dict[str, Any] = {"command": command}
    if args is not None:
        message["args"] = args
    return json.dumps(message).encode() + b"\n"


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("command", "args", "expected"),
    [
        ("status", {"x": 1}, "unknown argument 'x' for status; status takes no arguments"),
        ("history", {"n": 0}, "history: argument 'n' must be from 1 to 1000, got 0"),
        ("history", {"n": 1001}, "history: argument 'n' must be from 1 to 1000, got 1001"),
        ("history", {"n": "5"}, "history: argument 'n' must be a whole number from 1 to 1000, "
                                "got '5'"),
        ("history", {"n": 2.5}, "history: argument 'n' must be a whole number"),
        ("history", {"n": True}, "history: argument 'n' must be a whole number"),
        ("history", {"count": 5}, "unknown argument 'count' for history; known: n"),
        ("pause", {"reason": 5}, "pause: argument 'reason' must be a string, got 5"),
        ("pause", {"reason": "  "}, "pause: argument 'reason' must not be empty"),
        ("pause", {"reason": "a\nb"}, "pause: argument 'reason' must be one line of printable"),
        ("pause", {"reason": "x" * 1001},
         "pause: argument 'reason' must be at most 1000 characters, got 1001"),
        ("resume", {"now": True}, "unknown argument 'now' for resume; resume takes no arguments"),
        ("failover", {"force": "yes"},
         "failover: argument 'force' must be true or false, got 'yes'"),
        ("failover", {"dry_run": 1}, "failover: argument 'dry_run' must be true or false, got 1"),
        ("failover", {"reason": ["x"]}, "failover: argument 'reason' must be a string, got a list"),
        ("failover", {"forse": True},
         "unknown argument 'forse' for failover; known: force, dry_run, reason"),
        ("failover", [1], "failover: 'args' must be an object, got a list"),
        ("failover", "force", "failover: 'args' must be an object, got 'force'"),
        ("switchover", {"timeout": "30s"},
         "switchover: argument 'timeout' must be a number of seconds from 0.1 to 86400, "
         "got '30s'"),
        ("switchover", {"timeout": 0},
         "switchover: argument 'timeout' must be from 0.1 to 86400 seconds, got 0"),
        ("switchover", {"timeout": -5},
         "switchover: argument 'timeout' must be from 0.1 to 86400 seconds, got -5"),
        ("switchover", {"timeout": float("inf")},
         "switchover: argument 'timeout' must be a number of seconds from 0.1 to 86400, got inf"),
        # Too big for a float: math.isfinite() overflowed and the peer got no reply.
        ("switchover", {"timeout": 10**400},
         "switchover: argument 'timeout' must be from 0.1 to 86400 seconds, got "),
        ("switchover", {"timeout": True},
         "switchover: argument 'timeout' must be a number of seconds from 0.1 to 86400, got true"),
        ("switchover", {"dry_run": "no"}, "switchover: argument 'dry_run' must be true or false"),
        ("abort", {"id": "x"}, "unknown argument 'id' for abort; abort takes no arguments"),
        ("ack", {"x": None}, "unknown argument 'x' for ack; ack takes no arguments"),
        ("reload", {"path": "/etc"}, "unknown argument 'path' for reload"),
    ],
)  # fmt: skip
def test_bad_arguments_are_refused_with_one_clear_line(
    command: str, args: Any, expected: str
) -> None:
    with pytest.raises(CommandError) as info:
        validate_args(lookup(command), args)
    message = str(info.value)
    assert message.startswith(expected)
    assert "\n" not in message


@pytest.mark.parametrize(
    ("command", "args", "expected"),
    [
        ("status", None, {}),
        ("history", {}, {"n": 10}),
        ("history", {"n": 1000}, {"n": 1000}),
        ("history", {"n": None}, {"n": 10}),
        ("pause", {}, {"reason": None}),
        ("pause", {"reason": "db maintenance"}, {"reason": "db maintenance"}),
        ("failover", {"force": True}, {"force": True, "dry_run": False, "reason": None}),
        ("failover", {"dry_run": True, "reason": "drill"},
         {"force": False, "dry_run": True, "reason": "drill"}),
        ("switchover", {"timeout": 2.5}, {"dry_run": False, "timeout": 2.5}),
        ("switchover", {}, {"dry_run": False, "timeout": None}),
        ("abort", {}, {}),
    ],
)  # fmt: skip
def test_valid_arguments_get_defaults_filled(
    command: str, args: Any, expected: dict[str, Any]
) -> None:
    assert validate_args(lookup(command), args) == expected


def test_command_table_marks_only_status_and_history_read_only() -> None:
    assert [n for n, c in COMMANDS.items() if not c.mutating] == ["status", "history", "events"]
    assert ", ".join(COMMANDS) == KNOWN


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"", "empty request; send one JSON object per line"),
        (b"  \t\r\n", "empty request"),
        (b"not json", "request is not valid JSON: Expecting value at column 1"),
        (b'{"command": "status"', "request is not valid JSON"),
        (b"\xff\xfe{}", "request is not valid UTF-8"),
        (b"[1, 2]", 'request must be a JSON object like {"command": "status"}, got a list'),
        (b'"status"', "request must be a JSON object"),
        (b'{"args": {}}', f"request has no 'command'; known: {KNOWN}"),
        (b'{"command": "status", "arg": {}}', "unknown field 'arg' in request"),
        (b'{"command": "history", "args": {"n": NaN}}',
         "request is not valid JSON: NaN is not a number JSON allows"),
        (b'{"command": "history", "args": {"n": -Infinity}}', "request is not valid JSON"),
        (b"[" * 100_000, "request is not valid JSON: nested too deeply"),
        (b'{"command": 1' + b"0" * 5000 + b"}", "request is not valid JSON: a number is too large"),
    ],
)  # fmt: skip
def test_malformed_requests(raw: bytes, expected: str) -> None:
    with pytest.raises(CommandError) as info:
        parse_request(raw)
    assert str(info.value).startswith(expected)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("stat", f"unknown command 'stat'; known: {KNOWN}"),
        (5, f"'command' must be a string, got 5; known: {KNOWN}"),
        (None, "'command' must be a string, got null"),
        ("x" * 500, "unknown command 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx...; known"),
    ],
)
def test_unknown_commands(name: Any, expected: str) -> None:
    with pytest.raises(CommandError, match="^" + expected.replace("(", r"\(")):
        lookup(name)


# --------------------------------------------------------------------------- protocol


async def test_errors_keep_the_connection_usable_and_never_reach_the_handler(rig: Rig) -> None:
    await rig.start()
    replies = await exchange(
        rig.path,
        b"this is not json\n",
        b"[1, 2, 3]\n",
        b'{"args": {}}\n',
        b"\n",
        line("stat"),
        line("failover", {"force": "yes"}),
        line("failover", {"forse": True}),
        line("status"),
    )
    errors = [r["error"] for r in replies[:-1]]
    assert all(r["ok"] is False for r in replies[:-1])
    assert errors[4] == f"unknown command 'stat'; known: {KNOWN}"
    assert errors[5] == "failover: argument 'force' must be true or false, got 'yes'"
    assert errors[6].startswith("unknown argument 'forse' for failover")
    assert replies[-1] == {"ok": True, "result": {"cluster": "orders", "state": "watching"}}
    assert [c[0] for c in rig.daemon.calls] == ["status"]


async def test_handler_gets_validated_args_with_defaults_and_the_peer(rig: Rig) -> None:
    await rig.start()
    replies = await exchange(rig.path, line("failover", {"force": True}), line("history"))
    assert replies[0]["result"]["args"] == {"force": True, "dry_run": False, "reason": None}
    assert replies[1]["result"]["args"] == {"n": 10}
    peer = rig.daemon.calls[0][2]
    assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), os.geteuid(), os.getegid())
    assert peer.user == pwd.getpwuid(os.geteuid()).pw_name


async def test_pipelined_requests_are_answered_in_order(rig: Rig) -> None:
    await rig.start()
    reader, writer = await asyncio.open_unix_connection(rig.path)
    writer.write(line("history", {"n": 1}) + line("history", {"n": 2}) + line("history", {"n": 3}))
    replies = [json.loads(await reader.readline()) for _ in range(3)]
    writer.close()
    assert [r["result"]["args"]["n"] for r in replies] == [1, 2, 3]


async def test_a_final_unterminated_line_is_answered(rig: Rig) -> None:
    await rig.start()
    reader, writer = await asyncio.open_unix_connection(rig.path)
    writer.write(b'{"command": "status"}')
    writer.write_eof()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert json.loads(data)["ok"] is True
    assert data.count(b"\n") == 1


async def test_mutating_commands_are_logged_with_who_sent_them(rig: Rig) -> None:
    await rig.start()
    await exchange(rig.path, line("status"), line("pause", {"reason": "upgrade"}))
    infos = [e for e in events(rig.cap, "control.command") if e["log_level"] == "info"]
    assert len(infos) == 1
    entry = infos[0]
    assert entry["command"] == "pause"
    assert entry["args"] == {"reason": "upgrade"}
    assert (entry["uid"], entry["pid"]) == (os.geteuid(), os.getpid())
    assert entry["user"] == pwd.getpwuid(os.geteuid()).pw_name


async def test_a_refusal_from_the_daemon_is_one_line(rig: Rig) -> None:
    await rig.start()
    replies = await exchange(rig.path, line("pause"), line("pause"))
    assert replies[0]["ok"] is True
    assert replies[1] == {"ok": False, "error": "automatic failover is already paused"}


async def test_a_crashing_handler_yields_internal_error_and_the_server_lives_on(
    rig: Rig,
) -> None:
    await rig.start(secrets=frozenset({"exploded"}))
    replies = await exchange(rig.path, line("reload"), line("status"))
    assert replies[0] == {"ok": False, "error": "internal error: RuntimeError: config parser ***"}
    assert replies[1]["ok"] is True
    failures = events(rig.cap, "control.handler_failed")
    assert len(failures) == 1 and failures[0]["log_level"] == "error"
    assert "Traceback" in failures[0]["traceback"]
    assert "exploded" not in repr(rig.cap.entries)  # masked, even in the traceback
    # ... and a fresh connection is served too.
    assert (await request(rig.path, "status"))["ok"] is True


async def test_odd_result_values_still_make_a_valid_json_line(rig: Rig) -> None:
    await rig.start()
    reader, writer = await asyncio.open_unix_connection(rig.path)
    writer.write(line("ack") + line("abort"))
    raw = [await reader.readline(), await reader.readline()]
    writer.close()

    def strict(text: bytes) -> Any:
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in reply"))

    ack, abort = (strict(r) for r in raw)
    assert ack["ok"] is True
    assert ack["result"]["nan"] == "nan" and ack["result"]["when"] == "2026-01-01"
    assert ack["result"]["set"] == [1] and ack["result"]["(1, 2)"] == "tuple key"
    assert abort == {"ok": False, "error": "internal error: abort returned no result object"}


# --------------------------------------------------------------------------- socket safety


async def test_socket_has_its_mode_from_the_start_and_is_removed_on_stop(rig: Rig) -> None:
    umask_before = os.umask(0o022)
    os.umask(umask_before)
    server = await rig.start(ControlConfig(socket=rig.path, mode=0o600))
    st = os.stat(rig.path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert os.umask(umask_before) == umask_before  # restored
    await server.stop()
    assert not exists(rig.path)


async def test_missing_directory_is_created_private(rig: Rig) -> None:
    path = rig.dir / "run" / "watchdogd" / "control.sock"
    await rig.start(ControlConfig(socket=str(path)))
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o750
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    assert (await request(str(path), "status"))["ok"] is True


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o752])
async def test_world_writable_directory_is_refused(rig: Rig, mode: int) -> None:
    os.chmod(rig.dir, mode)
    with pytest.raises(ControlSocketError, match=r"is world-writable \(mode [0-7]{4}\)"):
        await rig.start()
    assert not exists(rig.path)


async def test_a_file_in_the_way_is_left_alone(rig: Rig) -> None:
    with open(rig.path, "w") as f:  # noqa: ASYNC230 - a tiny local file
        f.write("precious")
    with pytest.raises(ControlSocketError, match="exists and is not a socket"):
        await rig.start()
    st = os.lstat(rig.path)
    assert stat.S_ISREG(st.st_mode) and st.st_size == len("precious")


async def test_stale_socket_is_replaced(rig: Rig) -> None:
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(rig.path)
    dead.close()  # the file stays, nobody listens: a crashed daemon's leftover
    await rig.start()
    assert (await request(rig.path, "status"))["ok"] is True
    assert events(rig.cap, "control.stale_socket_replaced")


async def test_a_second_server_on_a_live_socket_refuses_to_start(rig: Rig) -> None:
    await rig.start()
    second = ControlServer(ControlConfig(socket=rig.path), rig.daemon, make_logger(rig.cap))
    with pytest.raises(ControlSocketError, match="another watchdogd is already listening on"):
        await second.start()
    await second.stop()  # a no-op: it never started, and must not remove the live socket
    assert (await request(rig.path, "status"))["ok"] is True


async def test_stop_leaves_a_successors_socket_alone(rig: Rig) -> None:
    first = await rig.start()
    os.unlink(rig.path)
    rig.daemon.paused = True  # tells the two apart: the same handler answers both
    second = await rig.start()
    await first.stop()
    assert (await request(rig.path, "status"))["result"]["state"] == "paused"
    await second.stop()
    assert not exists(rig.path)


async def test_overlong_socket_path_is_refused(rig: Rig) -> None:
    path = str(rig.dir / ("x" * 120))
    with pytest.raises(ControlSocketError, match="is too long"):
        await rig.start(ControlConfig(socket=path))


async def test_stop_ends_connections_even_mid_request(rig: Rig) -> None:
    server = await rig.start()
    rig.daemon.gate = asyncio.Event()  # the handler never finishes on its own
    reader, writer = await asyncio.open_unix_connection(rig.path)
    writer.write(line("status"))
    await eventually(lambda: rig.daemon.in_flight == 1)
    async with asyncio.timeout(3):
        await server.stop()
        assert await reader.read() == b""
    writer.close()
    assert server.connections == 0 and not exists(rig.path)


# --------------------------------------------------------------------------- limits


async def test_a_line_of_64_kib_is_accepted_and_a_longer_one_closes(rig: Rig) -> None:
    await rig.start()
    body = b'{"command": "status"}'
    exact = body + b" " * (64 * 1024 - len(body)) + b"\n"
    assert (await exchange(rig.path, exact))[0]["ok"] is True

    reader, writer = await asyncio.open_unix_connection(rig.path)
    writer.write(body + b" " * (64 * 1024 - len(body) + 1) + b"\n" + line("status"))
    reply = json.loads(await asyncio.wait_for(reader.readline(), 5))
    assert reply == {"ok": False, "error": "request line longer than 65536 bytes; "
                     "closing the connection"}  # fmt: skip
    assert await asyncio.wait_for(reader.read(), 5) == b""  # the status after it is not served
    writer.close()
    assert events(rig.cap, "control.line_too_long")


async def test_an_endless_line_is_cut_off_without_waiting_for_a_newline(rig: Rig) -> None:
    await rig.start()
    reader, writer = await asyncio.open_unix_connection(rig.path)
    writer.write(b"x" * (1024 * 1024))  # no newline ever
    reply = json.loads(await asyncio.wait_for(reader.readline(), 5))
    assert "longer than 65536 bytes" in reply["error"]
    writer.close()
    assert (await request(rig.path, "status"))["ok"] is True


async def test_an_idle_client_is_dropped(rig: Rig) -> None:
    await rig.start(idle_timeout=0.2)
    reader, writer = await asyncio.open_unix_connection(rig.path)
    async with asyncio.timeout(3):
        reply = json.loads(await reader.readline())
        assert reply == {"ok": False, "error": "no complete request within 0.2s; "
                         "closing the connection"}  # fmt: skip
        assert await reader.read() == b""
    writer.close()


async def test_a_client_dripping_a_partial_line_is_dropped(rig: Rig) -> None:
    server = await rig.start(idle_timeout=0.3)
    reader, writer = await asyncio.open_unix_connection(rig.path)

    async def drip() -> None:
        with contextlib.suppress(OSError):  # the server hangs up mid-drip
            for ch in b'{"command": "status"}\n':
                writer.write(bytes([ch]))
                await asyncio.sleep(0.04)

    dripper = asyncio.create_task(drip())
    async with asyncio.timeout(3):
        assert "no complete request within 0.3s" in (await reader.readline()).decode()
        assert await reader.read() == b""
    dripper.cancel()
    writer.close()
    await eventually(lambda: server.connections == 0)


async def test_300_concurrent_clients_beyond_the_limit_get_busy(rig: Rig) -> None:
    server = await rig.start()  # default limit: 64 connections
    conns = await asyncio.gather(*(asyncio.open_unix_connection(rig.path) for _ in range(300)))

    async def first_line(reader: asyncio.StreamReader) -> dict[str, Any] | None:
        try:
            return dict(json.loads(await asyncio.wait_for(reader.readline(), 0.3)))
        except TimeoutError:
            return None  # served: it waits for a request

    try:
        await eventually(lambda: len(events(rig.cap, "control.busy")) == 236)
        # Busy replies come unasked, then the server hangs up.
        unasked = await asyncio.gather(*(first_line(r) for r, _ in conns))
        busy = [u for u in unasked if u is not None]
        assert len(busy) == 236 and server.connections == 64
        assert all(b["ok"] is False for b in busy)
        assert all(b["error"].startswith("busy: too many control connections (limit 64)")
                   for b in busy)  # fmt: skip
        served = [c for c, u in zip(conns, unasked, strict=True) if u is None]
        for _, writer in served:
            writer.write(line("status"))
        replies = await asyncio.gather(*(asyncio.wait_for(r.readline(), 10) for r, _ in served))
        assert all(json.loads(r)["result"]["cluster"] == "orders" for r in replies)
    finally:
        for _, writer in conns:
            writer.close()
    await eventually(lambda: server.connections == 0)
    assert (await request(rig.path, "status"))["ok"] is True  # slots were freed


async def test_300_concurrent_clients_are_all_served_when_allowed(rig: Rig) -> None:
    await rig.start(max_connections=300)
    rig.daemon.delay = 0.05  # keep handlers overlapping
    replies = await asyncio.gather(
        *(request(rig.path, "history", {"n": i % 1000 + 1}) for i in range(300))
    )
    assert [r["result"]["args"]["n"] for r in replies] == [i % 1000 + 1 for i in range(300)]
    assert len(rig.daemon.calls) == 300
    assert rig.daemon.peak > 1  # served concurrently, not one after another


# --------------------------------------------------------------------------- client helper


async def test_request_reports_a_missing_socket(rig: Rig) -> None:
    with pytest.raises(ControlUnavailable, match=f"cannot reach watchdogd at {rig.path}: ") as e:
        await request(rig.path, "status")
    assert e.value.errno == 2


async def test_request_reports_a_stale_socket(rig: Rig) -> None:
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(rig.path)
    dead.close()
    with pytest.raises(ControlUnavailable) as e:
        await request(rig.path, "status")
    assert e.value.errno == 111


async def test_request_times_out(rig: Rig) -> None:
    await rig.start()
    rig.daemon.gate = asyncio.Event()
    with pytest.raises(ControlUnavailable, match=r"no reply within 0\.2s"):
        await request(rig.path, "status", timeout=0.2)


async def test_request_rejects_something_that_is_not_watchdogd(rig: Rig) -> None:
    async def imposter(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"220 smtp ready\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(imposter, path=rig.path)
    try:
        with pytest.raises(ControlUnavailable, match="is not JSON"):
            await request(rig.path, "status")
    finally:
        server.close()
        os.unlink(rig.path)


# --------------------------------------------------------------------------- authorisation


CLIENT = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
f = s.makefile("rwb")
out = []
for request in sys.argv[2:]:
    try:
        f.write(request.encode() + b"\n")
        f.flush()
        reply = f.readline()
    except OSError:  # closed by the server (after a refusal): null
        reply = b""
    out.append(json.loads(reply) if reply else None)
print(json.dumps(out))
"""


async def as_user(user: str, path: str, *requests: str) -> list[dict[str, Any]]:
    """Run a real client process as ``user`` (the system python: the venv is root's)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a client as another user")
    runuser = need("runuser", which("runuser"))
    python = need("system python3", which("python3", "/usr/bin"))
    proc = await asyncio.create_subprocess_exec(
        runuser, "-u", user, "--", python, "-c", CLIENT, path, *requests,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err.decode()
    result: list[dict[str, Any]] = json.loads(out)
    return result


STATUS = '{"command": "status"}'
HISTORY = '{"command": "history", "args": {"n": 2}}'
FAILOVER = '{"command": "failover", "args": {"force": true}}'
DENIED = {"ok": False, "error": "permission denied"}


def open_config(path: str, **kw: Any) -> ControlConfig:
    # mode 0666 gives "other" rights, which config parsing forbids: built directly.
    return ControlConfig(socket=path, mode=0o666, **kw)


async def test_unprivileged_user_may_read_but_not_fail_over(rig: Rig, open_dir: Path) -> None:
    await rig.start(open_config(rig.path))  # read_groups empty: anyone who can connect reads
    status, history, failover = await as_user("nobody", rig.path, STATUS, HISTORY, FAILOVER)
    assert status["ok"] is True and status["result"]["cluster"] == "orders"
    assert history["ok"] is True
    assert failover == DENIED
    assert [c[0] for c in rig.daemon.calls] == ["status", "history"]
    assert rig.daemon.calls[0][2].user == "nobody"
    (denial,) = events(rig.cap, "control.denied")
    assert denial["log_level"] == "warning" and denial["command"] == "failover"
    assert denial["uid"] == pwd.getpwnam("nobody").pw_uid and denial["pid"] > 0


async def test_read_groups_grant_status_to_members_only(rig: Rig, open_dir: Path) -> None:
    nogroup = _group_of("nobody")
    await rig.start(open_config(rig.path, read_groups=(nogroup,)))
    status, failover = await as_user("nobody", rig.path, STATUS, FAILOVER)
    assert status["ok"] is True
    assert failover == DENIED


async def test_outside_read_groups_even_status_is_denied(rig: Rig, open_dir: Path) -> None:
    await rig.start(open_config(rig.path, read_groups=("root",)))
    (status,) = await as_user("nobody", rig.path, STATUS)
    (history,) = await as_user("nobody", rig.path, HISTORY)
    assert status == DENIED and history == DENIED
    assert rig.daemon.calls == []


@pytest.mark.parametrize("grant", ["allow_users", "allow_groups"])
async def test_allowed_users_and_groups_may_fail_over(rig: Rig, open_dir: Path, grant: str) -> None:
    name = "nobody" if grant == "allow_users" else _group_of("nobody")
    await rig.start(open_config(rig.path, read_groups=("root",), **{grant: (name,)}))
    (failover,) = await as_user("nobody", rig.path, FAILOVER)
    assert failover["ok"] is True
    assert failover["result"]["args"]["force"] is True
    assert events(rig.cap, "control.command")[0]["user"] == "nobody"


async def test_supplementary_group_membership_counts(rig: Rig, open_dir: Path) -> None:
    user, group = _supplementary_member()
    await rig.start(open_config(rig.path, read_groups=("root",), allow_groups=(group,)))
    (failover,) = await as_user(user, rig.path, FAILOVER)
    assert failover["ok"] is True


async def test_access_levels_resolve_groups_at_check_time(rig: Rig) -> None:
    user, group = _supplementary_member()
    pw = pwd.getpwnam(user)
    peer = Peer(pid=1, uid=pw.pw_uid, gid=pw.pw_gid, user=user)
    stranger = Peer(pid=1, uid=54321, gid=54321, user=None)
    root = Peer(pid=1, uid=0, gid=0, user="root")
    server = await rig.start(
        ControlConfig(socket=rig.path, allow_groups=(group, "no-such-group-xyz"),
                      read_groups=("no-such-group-xyz",))
    )  # fmt: skip
    assert server.access(peer) == "full"
    assert server.access(stranger) == "none"  # read_groups set but unresolvable: fail closed
    assert server.access(root) == "full"
    assert any("no-such-group-xyz" in e["problem"]
               for e in events(rig.cap, "control.config_name_unknown"))  # fmt: skip


def _group_of(user: str) -> str:
    import grp

    return grp.getgrgid(pwd.getpwnam(user).pw_gid).gr_name


def _supplementary_member() -> tuple[str, str]:
    """A (user, group) where the user is in the group only as a supplementary member."""
    import grp

    for group in grp.getgrall():
        for user in group.gr_mem:
            with contextlib.suppress(KeyError):
                if pwd.getpwnam(user).pw_gid != group.gr_gid:
                    return user, group.gr_name
    pytest.skip("no user with a supplementary group on this machine")


# --------------------------------------------------------------------------- issue 15


HOLD = r"""
import json, socket, sys, time
conns = []
for _ in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sys.argv[1])
    conns.append(s)
time.sleep(0.5)
out = []
for s in conns:
    s.settimeout(0.2)
    try:
        data = s.recv(65536)
        out.append(json.loads(data) if data else "closed")
    except TimeoutError:
        out.append(None)  # served: waiting for a request
print(json.dumps(out), flush=True)
sys.stdin.readline()  # hold every connection until the test is done
"""


async def hold_as(user: str, path: str, n: int) -> tuple[Any, list[Any]]:
    """``n`` connections from a process running as ``user``; what each got unasked."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a client as another user")
    runuser = need("runuser", which("runuser"))
    python = need("system python3", which("python3", "/usr/bin"))
    proc = await asyncio.create_subprocess_exec(
        runuser, "-u", user, "--", python, "-c", HOLD, path, str(n),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    first = await asyncio.wait_for(proc.stdout.readline(), 20)
    return proc, json.loads(first)


async def release(proc: Any) -> None:
    proc.stdin.close()
    await asyncio.wait_for(proc.wait(), 10)


async def test_a_refused_peer_is_disconnected(rig: Rig, open_dir: Path) -> None:
    server = await rig.start(open_config(rig.path, read_groups=("root",)))
    status, history = await as_user("nobody", rig.path, STATUS, HISTORY)
    assert status == DENIED
    assert history is None  # the connection was closed after the refusal
    assert rig.daemon.calls == []
    await eventually(lambda: server.connections == 0)


async def test_one_uid_cannot_take_every_slot(rig: Rig, open_dir: Path) -> None:
    server = await rig.start(open_config(rig.path))  # nobody may read
    proc, got = await hold_as("nobody", rig.path, 20)
    try:
        served = [g for g in got if g is None]
        busy = [g for g in got if isinstance(g, dict)]
        assert len(served) == 8 and len(busy) == 12, got
        uid = pwd.getpwnam("nobody").pw_uid
        assert all(
            b == {"ok": False, "error": f"busy: too many control connections from uid {uid} "
                  "(limit 8); close some and try again"}
            for b in busy
        )  # fmt: skip
        assert server.connections == 8
        assert (await request(rig.path, "status"))["ok"] is True  # the operator gets in
    finally:
        await release(proc)
    await eventually(lambda: server.connections == 0)


async def test_slots_are_kept_for_full_access_peers(rig: Rig, open_dir: Path) -> None:
    server = await rig.start(open_config(rig.path), max_connections=12, reserved=4, per_uid=100)
    proc, got = await hold_as("nobody", rig.path, 12)
    try:
        assert got.count(None) == 8, got
        assert {g["error"] for g in got if g is not None} == {
            "busy: the remaining control connections are reserved for operators with full "
            "access; try again shortly"
        }
        # Root still has its four reserved slots.
        conns = [await asyncio.open_unix_connection(rig.path) for _ in range(4)]
        try:
            for _, writer in conns:
                writer.write(line("status"))
            answers = [json.loads(await asyncio.wait_for(r.readline(), 5)) for r, _ in conns]
            assert all(a["ok"] is True for a in answers), answers
            assert server.connections == 12
        finally:
            for _, writer in conns:
                writer.close()
    finally:
        await release(proc)


async def test_a_connection_lives_only_so_long(rig: Rig) -> None:
    await rig.start(max_lifetime=0.6)
    reader, writer = await asyncio.open_unix_connection(rig.path)
    replies: list[dict[str, Any]] = []
    try:
        for _ in range(40):  # a request every 0.1s keeps it busy, never idle
            try:
                writer.write(line("status"))
                await writer.drain()
            except OSError:  # closed by the server; its last words are still buffered
                break
            raw = await asyncio.wait_for(reader.readline(), 5)
            if not raw:
                break
            replies.append(json.loads(raw))
            if not replies[-1]["ok"]:
                break
            try:  # pause 0.1s, listening: the server may speak first and hang up
                raw = await asyncio.wait_for(reader.readline(), 0.1)
            except TimeoutError:
                continue
            if raw:
                replies.append(json.loads(raw))
            break
        with contextlib.suppress(OSError):
            rest = await asyncio.wait_for(reader.read(), 5)
            replies.extend(json.loads(x) for x in rest.splitlines())
    finally:
        writer.close()
    assert replies[-1] == {
        "ok": False,
        "error": "connection open longer than 0.6s; closing it (connect again)",
    }
    assert all(r["ok"] for r in replies[:-1]) and 3 <= len(replies) <= 8, replies


async def test_every_reply_is_masked_with_the_current_secrets(rig: Rig) -> None:
    from watchdogd.core.secrets import Secrets

    secrets = Secrets(["tok-old-7f3a"])
    await rig.start(secrets=secrets)
    echo = "Bearer tok/new+9b2c; url t=tok%2Fnew%2B9b2c; old tok-old-7f3a"

    async def handler(command: str, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        if command == "history":
            raise CommandError(f"refused: {echo}")
        return {"nodes": [{"detail": echo, echo: (echo,)}]}

    rig.servers[-1].handler = handler
    secrets.replace(["tok/new+9b2c"])  # a reload: new secrets, old ones still masked
    status, history = await exchange(rig.path, line("status"), line("history"))
    assert "tok" not in json.dumps(status) + json.dumps(history)
    masked = "Bearer ***; url t=***; old ***"
    assert status["result"] == {"nodes": [{"detail": masked, masked: [masked]}]}
    assert history == {"ok": False, "error": f"refused: {masked}"}


def test_peer_groups_come_from_the_kernel() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        from watchdogd.control import _peer_groups

        assert _peer_groups(a, os.getpid()) == frozenset(os.getgroups())


async def test_access_uses_the_peers_kernel_groups(rig: Rig) -> None:
    user, group = _supplementary_member()
    import grp

    gid = grp.getgrnam(group).gr_gid
    server = await rig.start(ControlConfig(socket=rig.path, allow_groups=(group,),
                                           read_groups=("no-such-group-xyz",)))  # fmt: skip
    pw = pwd.getpwnam(user)
    # The user database says member; the process's own groups (what it holds) decide.
    assert server.access(Peer(1, pw.pw_uid, pw.pw_gid, user, frozenset())) == "none"
    assert server.access(Peer(1, 54321, 54321, None, frozenset({gid}))) == "full"


async def test_control_group_owns_the_socket(rig: Rig) -> None:
    os.chmod(rig.dir, 0o750)
    group = _group_of("nobody")
    import grp

    gid = grp.getgrnam(group).gr_gid
    await rig.start(ControlConfig(socket=rig.path, mode=0o660, group=group))
    st = os.stat(rig.path)
    assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (gid, 0o660)
    # The directory (ours, 0750) lets the control group through, and nobody else.
    dst = os.stat(rig.dir)
    assert (dst.st_gid, stat.S_IMODE(dst.st_mode)) == (gid, 0o750)
    # An operator only in the control group can use watchdogctl (read-only here).
    status, failover = await as_user("nobody", rig.path, STATUS, FAILOVER)
    assert status["ok"] is True and failover == DENIED


@pytest.mark.parametrize(
    ("group", "expected"),
    [
        ("no-such-group-xyz", "control.group: no such group 'no-such-group-xyz'"),
        ("root", "control.group: 'root' is the daemon's own group; name a group for operators"),
    ],
)
async def test_bad_control_group_is_one_line(rig: Rig, group: str, expected: str) -> None:
    if group == "root" and os.getegid() != 0:
        pytest.skip("the daemon's own group is root only when running as root")
    with pytest.raises(ControlSocketError) as info:
        await rig.start(ControlConfig(socket=rig.path, group=group))
    assert str(info.value).startswith(expected) and "\n" not in str(info.value)
    assert not exists(rig.path)


async def test_group_writable_or_foreign_directory_is_refused(rig: Rig) -> None:
    os.chmod(rig.dir, 0o770)
    with pytest.raises(ControlSocketError, match=r"is group-writable \(mode 0770\)"):
        await rig.start()
    os.chmod(rig.dir, 0o755)
    if os.geteuid() != 0:
        pytest.skip("needs root to give the directory away")
    nobody = pwd.getpwnam("nobody").pw_uid
    os.chown(rig.dir, nobody, -1)
    with pytest.raises(ControlSocketError, match=f"belongs to uid {nobody}, not to the daemon"):
        await rig.start()
    assert not exists(rig.path)


async def test_an_unforeseen_failure_checking_a_request_still_gets_a_one_line_reply(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A huge integer once made a check raise OverflowError: the peer got no reply at
    all. Whatever a check raises, the peer gets one line and the connection lives on."""
    await rig.start()
    (reply,) = await exchange(rig.path, line("switchover", {"timeout": 10**400}))
    assert reply["ok"] is False and "must be from 0.1 to 86400 seconds" in reply["error"]

    real = control.validate_args

    def broken(command: Any, args: Any) -> Any:
        if command.name == "switchover":
            raise OverflowError("int too large to convert to float")
        return real(command, args)

    monkeypatch.setattr(control, "validate_args", broken)
    bad, status = await exchange(rig.path, line("switchover", {"timeout": 5}), line("status"))
    assert bad == {
        "ok": False,
        "error": "bad request: OverflowError: int too large to convert to float",
    }
    assert status["ok"] is True
    assert [e["error"] for e in events(rig.cap, "control.request_check_failed")] == [
        "OverflowError: int too large to convert to float"
    ]
