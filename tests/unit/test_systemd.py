"""sd_notify against a real AF_UNIX datagram socket of the test's own, at a path and at an
abstract name, plus the watchdog interval rules and the never-raise guarantee."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from watchdogd.systemd import SystemdNotifier


@pytest.fixture(autouse=True)
def _structlog_defaults() -> None:
    # capture_logs() swaps only the processors; a level filter configured by another test
    # would hide the warnings asserted here.
    structlog.reset_defaults()


def _bound(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(2)
    return sock


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify.sock")
    sock = _bound(path)
    try:
        yield path, sock
    finally:
        sock.close()


@pytest.fixture
def abstract_socket() -> Iterator[tuple[str, socket.socket]]:
    name = f"watchdogd-test-{uuid.uuid4().hex}"
    sock = _bound("\0" + name)
    try:
        yield "@" + name, sock
    finally:
        sock.close()


def received(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


@pytest.mark.parametrize("kind", ["path_socket", "abstract_socket"])
def test_messages_reach_the_socket(kind: str, request: pytest.FixtureRequest) -> None:
    address, sock = request.getfixturevalue(kind)
    n = SystemdNotifier(environ={"NOTIFY_SOCKET": address})
    try:
        assert n.enabled
        assert n.ready("watching cluster shop\nprimary pg1")
        assert received(sock) == ["READY=1", "STATUS=watching cluster shop primary pg1"]
        assert n.status("suspect: primary down for 12s")
        assert received(sock) == ["STATUS=suspect: primary down for 12s"]
        assert n.watchdog()
        assert received(sock) == ["WATCHDOG=1"]

        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert n.reloading()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        reload_msg = received(sock)
        assert reload_msg[0] == "RELOADING=1"
        key, _, usec = reload_msg[1].partition("=")
        assert key == "MONOTONIC_USEC" and before <= int(usec) <= after

        assert n.stopping("finishing step promote")
        assert received(sock) == ["STOPPING=1", "STATUS=finishing step promote"]
        assert n.extend_timeout(90)
        assert received(sock) == ["EXTEND_TIMEOUT_USEC=90000000"]
    finally:
        n.close()


def test_no_notify_socket_is_a_silent_no_op() -> None:
    with capture_logs() as logs:
        n = SystemdNotifier(structlog.get_logger(), environ={})
        assert not n.enabled
        assert n.ready() is False
        assert n.watchdog() is False
        assert n.stopping() is False
    assert logs == []


def test_reads_os_environ_by_default(
    path_socket: tuple[str, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    address, sock = path_socket
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    n = SystemdNotifier()
    try:
        n.ready()
        assert received(sock) == ["READY=1"]
    finally:
        n.close()


def test_send_errors_never_raise_and_are_logged_once(tmp_path: Path) -> None:
    with capture_logs() as logs:
        n = SystemdNotifier(
            structlog.get_logger(), environ={"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}
        )
        assert n.enabled
        assert n.ready() is False
        assert n.watchdog() is False
        assert n.status("x") is False
        n.close()
    assert len(logs) == 1
    assert logs[0]["log_level"] == "warning"
    assert logs[0]["error"].startswith("cannot notify systemd: ")
    assert "\n" not in logs[0]["error"]


def test_full_receiver_does_not_block(path_socket: tuple[str, socket.socket]) -> None:
    address, _sock = path_socket  # never read: its queue fills up
    with capture_logs() as logs:
        n = SystemdNotifier(structlog.get_logger(), environ={"NOTIFY_SOCKET": address})
        started = time.monotonic()
        results = [n.status("x" * 1000) for _ in range(2000)]
        n.close()
    assert time.monotonic() - started < 2
    assert results[0] is True and results[-1] is False
    assert [e["event"] for e in logs] == ["sd_notify problem (reported once)"]


def test_bad_notify_socket_value_is_reported() -> None:
    with capture_logs() as logs:
        n = SystemdNotifier(structlog.get_logger(), environ={"NOTIFY_SOCKET": "relative.sock"})
    assert not n.enabled
    assert "NOTIFY_SOCKET is neither a path nor @abstract: 'relative.sock'" in logs[0]["error"]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "20000000"}, 10.0),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}, 1.5),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    n = SystemdNotifier(environ=env)
    assert n.watchdog_interval() == expected


def test_stdlib_fallback_logger(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    n = SystemdNotifier(environ={"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    with caplog.at_level(logging.WARNING, logger="watchdogd.systemd"):
        n.ready()
    records: list[Any] = [r for r in caplog.records if r.name == "watchdogd.systemd"]
    assert len(records) == 1
    assert "cannot notify systemd" in records[0].getMessage()
