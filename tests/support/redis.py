"""Redis test servers: a primary and a replica on free loopback ports in temp dirs.

Both require the same random password (``requirepass``; the replica also uses it
as ``masterauth``), keep nothing on disk (``--save ""``, no AOF) and ping their
replicas every second so a replica's ``master_last_io_seconds_ago`` stays
small. The initial sync goes through an RDB file: after a diskless one the
primary holds the stream until the replica's first ACK, up to a second later.
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

from tests.support import free_port, need, which

START_TIMEOUT = 10.0


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

    def kill(self) -> None:
        """SIGKILL (works on a SIGSTOPped server too) and reap."""
        if self._alive:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
            self._alive = False


def start_redis(name: str, base: Path, password: str, extra: Sequence[str] = ()) -> RedisServer:
    base.mkdir()
    port = free_port()
    cmd = [
        binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(base),
        "--save", "", "--appendonly", "no", "--daemonize", "no",
        "--logfile", str(base / "redis.log"), "--requirepass", password,
        "--repl-ping-replica-period", "1", "--repl-diskless-sync", "no", *extra,
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
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"{name} redis-server exited {process.returncode}: {server.log_tail()}"
                )
            try:
                server.call("PING")
                return server
            except redis.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{name} redis-server not ready after {START_TIMEOUT:g}s: {server.log_tail()}"
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
def redis_pair() -> Iterator[RedisPair]:
    """A primary and a replica replicating from it; both SIGKILLed on exit."""
    password = secrets.token_urlsafe(12)
    with contextlib.ExitStack() as stack:
        base = Path(tempfile.mkdtemp(prefix="watchdogd-redis-"))
        stack.callback(shutil.rmtree, base, True)
        primary = start_redis("primary", base / "primary", password)
        stack.callback(primary.kill)
        replica = start_redis(
            "replica",
            base / "replica",
            password,
            ["--masterauth", password, "--replicaof", "127.0.0.1", str(primary.port)],
        )
        stack.callback(replica.kill)
        pair = RedisPair(primary, replica, password)
        pair.wait_link_up()
        yield pair
