"""systemd integration without libsystemd: the sd_notify protocol (readiness, status,
watchdog keep-alives, reload and stop announcements).

Messages are datagrams on the AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a leading ``@``
names an abstract socket). Without that variable (not run by systemd, or a unit that is
not ``Type=notify``) every method does nothing. Sending never raises and never blocks the
event loop: the socket is non-blocking, and the first failure is logged once.

After a reload the daemon must call ``ready()`` again: ``reloading()`` tells systemd the
service is reloading until the next ``READY=1``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Mapping
from typing import Any, Protocol


class _Log(Protocol):
    def warning(self, event: str, /, **kw: Any) -> Any: ...


class _StdlibLog:
    """Fallback when no structlog logger is given: a stdlib logger taking key=value facts."""

    def __init__(self) -> None:
        self._log = logging.getLogger("watchdogd.systemd")

    def warning(self, event: str, /, **kw: Any) -> Any:
        facts = " ".join(f"{k}={v}" for k, v in kw.items())
        self._log.warning("%s %s", event, facts)


def _one_line(text: str) -> str:
    # A newline would start a new KEY=VALUE assignment inside the datagram.
    return " ".join(text.split())


class SystemdNotifier:
    """sd_notify for one daemon instance. ``environ`` defaults to ``os.environ``."""

    def __init__(self, log: _Log | None = None, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.log: _Log = log if log is not None else _StdlibLog()
        self._env = env
        self._warned = False
        self._sock: socket.socket | None = None
        self.address: str | None = None
        raw = env.get("NOTIFY_SOCKET", "")
        if raw.startswith("@"):
            self.address = "\0" + raw[1:]
        elif raw.startswith("/"):
            self.address = raw
        elif raw:
            self._warn_once(f"NOTIFY_SOCKET is neither a path nor @abstract: {raw!r}")

    @property
    def enabled(self) -> bool:
        return self.address is not None

    # ----------------------------------------------------------------------- messages

    def ready(self, status: str | None = None) -> bool:
        lines = ["READY=1"]
        if status:
            lines.append(f"STATUS={_one_line(status)}")
        return self.send(*lines)

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def reloading(self, status: str | None = None) -> bool:
        # MONOTONIC_USEC lets systemd (>= 253, Type=notify-reload) tie this message to the
        # reload it started; older versions ignore it.
        lines = [
            "RELOADING=1",
            f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}",
        ]
        if status:
            lines.append(f"STATUS={_one_line(status)}")
        return self.send(*lines)

    def stopping(self, status: str | None = None) -> bool:
        lines = ["STOPPING=1"]
        if status:
            lines.append(f"STATUS={_one_line(status)}")
        return self.send(*lines)

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more before systemd gives up on a start or stop (a failover
        step finishing during shutdown)."""
        return self.send(f"EXTEND_TIMEOUT_USEC={max(int(seconds * 1_000_000), 0)}")

    def watchdog_interval(self) -> float | None:
        """Seconds between ``watchdog()`` calls: half of ``WATCHDOG_USEC``, or None when the
        watchdog is off or meant for another process."""
        pid = self._env.get("WATCHDOG_PID")
        if pid is not None and pid.strip() != str(os.getpid()):
            return None
        usec = self._env.get("WATCHDOG_USEC")
        if not usec:
            return None
        try:
            value = int(usec)
        except ValueError:
            self._warn_once(f"WATCHDOG_USEC is not a number: {usec!r}")
            return None
        if value <= 0:
            return None
        return value / 2 / 1_000_000

    # ----------------------------------------------------------------------- transport

    def send(self, *lines: str) -> bool:
        """Send one datagram of ``KEY=VALUE`` lines. True when handed to the socket."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.setblocking(False)
                self._sock = sock
            self._sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as exc:
            self._warn_once(f"cannot notify systemd: {exc.strerror or exc}")
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _warn_once(self, message: str) -> None:
        if self._warned:
            return
        self._warned = True
        # Logging must not turn a notification glitch into a crash.
        with contextlib.suppress(Exception):
            self.log.warning("sd_notify problem (reported once)", error=message)
