"""Redis test servers: a primary and a replica on free loopback ports in temp dirs.

Both require the same random password (``requirepass``; the replica also uses it
as ``masterauth``) and keep nothing on disk (``--save ""``, no AOF). The initial
sync goes through an RDB file: after a diskless one the primary holds the stream
until the replica's first ACK, up to a second later. None of these touches the
replication link's timing.

Profiles (issue 10), for the link only: ``stock`` (Redis's defaults: the primary
pings every ``repl-ping-replica-period`` 10 s, the replica gives the link up after
``repl-timeout`` 60 s) and ``tuned`` (what the docs recommend for a 2 s outage
threshold: ping every second, ``repl-timeout 2``). Without a profile the pair is
the lab's as before: ping every second, the stock ``repl-timeout``.
Every server is SIGKILLed and its directory removed on the way out, whatever
happened in between; the servers also die with the test process
(PR_SET_PDEATHSIG) so an interrupted run leaks nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from tests.support import free_port, need, retry_if_port_taken, timing, which

START_TIMEOUT = 10.0
STOCK, TUNED, LAB = "stock", "tuned", "lab"
LINK_OPTIONS: dict[str, tuple[str, ...]] = {
    STOCK: (),
    TUNED: ("--repl-ping-replica-period", "1", "--repl-timeout", "2"),
    LAB: ("--repl-ping-replica-period", "1"),
}


# Looked up once in the parent: the forked child only calls it (no dlopen there).
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl


def _die_with_parent() -> None:
    _PRCTL(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def binary() -> str:
    return need("redis-server", which("redis-server", "/usr/bin", "/usr/local/bin"))


@dataclass
class RedisServer:
    """One running redis-server; ``client()`` talks to it with the password."""

    name: str
    port: int
    base: Path
    password: str
    process: subprocess.Popen[bytes]
    _alive: bool = field(default=True, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def client(self, **kwargs: Any) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            password=self.password,
            socket_timeout=5,
            decode_responses=True,
            **kwargs,
        )

    def call(self, *args: Any) -> Any:
        with self.client() as c:
            return c.execute_command(*args)

    def info(self) -> dict[str, Any]:
        with self.client() as c:
            result: dict[str, Any] = c.info("replication")
            return result

    def log_tail(self) -> str:
        try:
            return (self.base / "redis.log").read_text(errors="replace")[-1500:]
        except OSError:
            return "(no log)"

    def log(self) -> str:
        """The server's whole log ('' before it wrote one)."""
        try:
            return (self.base / "redis.log").read_text(errors="replace")
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL (works on a SIGSTOPped server too) and reap."""
        if self._alive:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
            self._alive = False

    def sigstop(self) -> None:
        """Hang the server (one process: every thread stops), like a frozen machine."""
        self.process.send_signal(signal.SIGSTOP)

    def sigcont(self) -> None:
        if self._alive and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)


def start_redis(
    name: str, base: Path, password: str, extra: Sequence[str] = (), profile: str = LAB
) -> RedisServer:
    """Start redis-server in ``base`` (made here) and wait until it answers."""
    base.mkdir()
    return retry_if_port_taken(lambda: _start_redis(name, base, password, extra, profile))


def _start_redis(
    name: str, base: Path, password: str, extra: Sequence[str], profile: str
) -> RedisServer:
    (base / "redis.log").unlink(missing_ok=True)  # a failed try's log says nothing of this one
    port = free_port()
    cmd = [
        binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(base),
        "--save", "", "--appendonly", "no", "--daemonize", "no",
        "--logfile", str(base / "redis.log"), "--requirepass", password,
        "--repl-diskless-sync", "no", *LINK_OPTIONS[profile], *extra,
    ]  # fmt: skip
    process = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=_die_with_parent,
    )
    server = RedisServer(name=name, port=port, base=base, password=password, process=process)
    try:
        deadline = time.monotonic() + timing.within(START_TIMEOUT)
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"{name} redis-server exited {process.returncode}: {server.log_tail()}"
                )
            try:
                server.call("PING")
                return server
            except (redis.ConnectionError, redis.TimeoutError):
                pass  # not up yet (or someone else's port: it exits, then we retry)
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{name} redis-server not ready after {timing.within(START_TIMEOUT):g}s: "
                    f"{server.log_tail()}"
                )
            time.sleep(0.01)
    except BaseException:
        server.kill()
        raise


@dataclass
class RedisPair:
    primary: RedisServer
    replica: RedisServer
    password: str

    def dsn(self, server: RedisServer, password: str | None = None) -> str:
        pw = self.password if password is None else password
        return f"redis://:{pw}@127.0.0.1:{server.port}/0"

    def wait_link_up(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            info = self.replica.info()
            # Both sides must agree the initial sync is over before writes stream.
            seen = self.primary.info().get("slave0", {})
            if (
                info.get("master_link_status") == "up"
                and not info.get("master_sync_in_progress")
                and seen.get("state") == "online"
            ):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"replica link not up after {timeout:g}s: {self.replica.log_tail()}"
                )
            time.sleep(0.01)

    def repoint_replica(self, port: int, timeout: float = 15.0) -> None:
        """Replicate through ``port`` (a proxy in front of the primary) and wait until
        the link is up there (a partial resync: same primary behind the proxy)."""
        self.replica.call("REPLICAOF", "127.0.0.1", str(port))
        deadline = time.monotonic() + timeout
        while True:
            info = self.replica.info()
            if info.get("master_port") == port and info.get("master_link_status") == "up":
                self.wait_link_up(max(0.1, deadline - time.monotonic()))
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"replica link via port {port} not up after {timeout:g}s")
            time.sleep(0.02)

    def wait_caught_up(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            target = self.primary.info()["master_repl_offset"]
            if self.replica.info().get("slave_repl_offset", -1) >= target:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"replica not at primary offset {target} after {timeout:g}s")
            time.sleep(0.01)


@contextlib.contextmanager
def redis_pair(profile: str = LAB) -> Iterator[RedisPair]:
    """A primary and a replica replicating from it; both SIGKILLed on exit."""
    password = secrets.token_urlsafe(12)
    with contextlib.ExitStack() as stack:
        base = Path(tempfile.mkdtemp(prefix="watchdogd-redis-"))
        stack.callback(shutil.rmtree, base, True)
        primary = start_redis("primary", base / "primary", password, profile=profile)
        stack.callback(primary.kill)
        replica = start_redis(
            "replica",
            base / "replica",
            password,
            ["--masterauth", password, "--replicaof", "127.0.0.1", str(primary.port)],
            profile=profile,
        )
        stack.callback(replica.kill)
        pair = RedisPair(primary, replica, password)
        pair.wait_link_up()
        yield pair
