"""Shared test helpers: finding server binaries, ports, running as a service user."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import NoReturn, TypeVar

import pytest

REQUIRE = os.environ.get("WATCHDOGD_REQUIRE_INTEGRATION") == "1"

T = TypeVar("T")


def need(what: str, path: str | None) -> str:
    """Return ``path`` or skip loudly (fail when WATCHDOGD_REQUIRE_INTEGRATION=1)."""
    if path and Path(path).exists():
        return path
    unavailable(f"{what} not found: install it (see .ci/run) to run this test")


def unavailable(message: str) -> NoReturn:
    """Skip the test loudly: something it needs is missing here (fail instead when
    WATCHDOGD_REQUIRE_INTEGRATION=1)."""
    if REQUIRE:
        pytest.fail(message + " [WATCHDOGD_REQUIRE_INTEGRATION=1]")
    pytest.skip(message)


def which(name: str, *extra_dirs: str) -> str | None:
    for d in extra_dirs:
        candidate = Path(d) / name
        if candidate.exists():
            return str(candidate)
    return shutil.which(name)


# --------------------------------------------------------------------------- ports
#
# A port is only ours while a socket holds it. So: an in-process server gets the bound
# socket itself (``bound_socket()``, e.g. ``web.SockSite``); a port where nothing must
# answer is held bound but not listening (``closed_port``); a server in another
# process, which must bind the port itself, is started through ``retry_if_port_taken``
# (or takes port 0 when nothing needs to know its port).

# How servers say EADDRINUSE: strerror ("Address already in use"), and BIND's
# "address in use".
IN_USE = (os.strerror(errno.EADDRINUSE).lower(), "address in use")
PORT_TRIES = 5


def bound_socket() -> socket.socket:
    """A TCP socket bound to 127.0.0.1 on a port the kernel chose, not listening.
    Whoever holds it owns the port: connections to it are refused until it listens."""
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", 0))
    except BaseException:
        s.close()
        raise
    return s


def port_of(s: socket.socket) -> int:
    port: int = s.getsockname()[1]
    return port


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port nobody listens on for the whole test (connections are refused at once):
    held bound, so no other process can start listening there meanwhile."""
    with bound_socket() as s:
        yield port_of(s)


def free_port() -> int:
    """A port that was free a moment ago, for a server in another process. Another
    process may take it before the server binds it: start the server through
    ``retry_if_port_taken``."""
    with bound_socket() as s:
        return port_of(s)


def port_taken(failure: BaseException | str) -> bool:
    """Whether a start failed because its port was taken: EADDRINUSE, or an error (or
    a server's log) that says so."""
    if isinstance(failure, OSError) and failure.errno == errno.EADDRINUSE:
        return True
    text = str(failure).lower()
    return any(words in text for words in IN_USE)


def retry_if_port_taken(start: Callable[[], T], tries: int = PORT_TRIES) -> T:
    """``start()``, which picks its ports with ``free_port()``; when it fails because
    a port was taken between choosing and binding it, again (with new ports). The
    start must clean up after itself when it raises."""
    for attempt in range(1, tries + 1):
        try:
            return start()
        except Exception as exc:
            if attempt == tries or not port_taken(exc):
                raise
    raise AssertionError("unreachable")


async def aretry_if_port_taken(start: Callable[[], Awaitable[T]], tries: int = PORT_TRIES) -> T:
    """``retry_if_port_taken`` for a start that is awaited."""
    for attempt in range(1, tries + 1):
        try:
            return await start()
        except Exception as exc:
            if attempt == tries or not port_taken(exc):
                raise
    raise AssertionError("unreachable")


def wait_stopped(pid: int, within: float = 5.0) -> None:
    """Until every thread of ``pid`` is stopped: kill() returns before a thread running
    on another core has stopped, and such a thread can still answer a query sent at
    once (seen on a loaded two-core CI machine)."""
    deadline = time.monotonic() + within
    while True:
        states = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                stat = (task / "stat").read_text()
            except FileNotFoundError:  # a thread that just ended
                continue
            states.append(stat[stat.rindex(")") + 2])
        if states and all(state in "tT" for state in states):
            return
        assert time.monotonic() < deadline, f"pid {pid} not stopped after {within}s: {states}"
        time.sleep(0.005)
