"""systemd integration without libsystemd: the sd_notify protocol (readiness, status,
watchdog keep-alives, reload and stop announcements).

Messages are datagrams on the AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a leading ``@``
names an abstract socket). Without that variable (not run by systemd, or a unit that is
not ``Type=notify``) every method does nothing. Sending never raises and never blocks the
event loop: the socket is non-blocking, and the first failure is logged once.

After a reload the daemon must call ``ready()`` again: ``reloading()`` tells systemd the
service is reloading until the next ``READY=1``.

``watchdog_advice()`` checks ``probe.interval`` against the unit's ``WatchdogSec`` at start.
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


# Pings must come well inside half of WatchdogSec: a loaded host delays timers, and a
# ping that is late once gets the daemon killed.
_COMFORT = 0.8


def _secs(seconds: float) -> str:
    return f"{seconds:.3g}s"


def watchdog_advice(
    watchdog_sec: float, interval: float, timeout: float, stall_limit: float
) -> str | None:
    """One line for the log when probe cycles alone would not ping systemd's watchdog
    comfortably often, else None.

    A cycle pings when it completes, so two pings can be up to ``interval + timeout``
    apart. If that is not comfortably below ``WatchdogSec / 2``, systemd would kill a
    healthy daemon. The daemon then still pings from its own timer while cycles complete,
    but the operator should know that a stuck probe loop is restarted late, and how to
    fix the mismatch."""
    half = watchdog_sec / 2
    gap = interval + timeout
    if gap <= half * _COMFORT:
        return None
    max_interval = half * _COMFORT - timeout
    fix_interval = (
        f"lower probe.interval to {_secs(max_interval)} or less, or "
        if max_interval >= 0.05
        else ""
    )
    return (
        f"probe.interval {_secs(interval)} + probe.timeout {_secs(timeout)} (the longest gap "
        f"between two probe cycles) is not comfortably below half of the unit's "
        f"WatchdogSec={_secs(watchdog_sec)}: per-cycle pings alone would let systemd kill a "
        f"healthy watchdogd. watchdogd pings from a timer every {_secs(half)} while probe "
        f"cycles complete, so it is not killed, but a stuck probe loop is restarted only "
        f"after about {_secs(stall_limit + watchdog_sec)}. Fix: {fix_interval}raise "
        f"WatchdogSec to {_secs(gap * 2 / _COMFORT)} or more (systemctl edit watchdogd)"
    )


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
