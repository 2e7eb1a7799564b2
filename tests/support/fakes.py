"""Stand-ins for the daemon behind a real ``ControlServer`` (unit tests of the control
socket, ``watchdogctl`` and the protocol fuzz), and the short socket directory they
listen in. Each is a command handler: ``await fake(command, args, peer)``.

``RejoinEngine`` stands in for a database engine in in-process tests of the daemon's
rejoin flow (the real engines are proven against real servers in tests/e2e)."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from watchdogd.control import CommandError, Peer
from watchdogd.engines import DbStatus, Divergence, Engine, EngineError


class RecordingDaemon:
    """Records calls and keeps a little state; can be slowed (``delay``) or held
    (``gate``), and answers some commands with values JSON cannot carry as they are."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any], Peer]] = []
        self.paused = False
        self.gate: asyncio.Event | None = None
        self.delay = 0.0
        self.in_flight = 0
        self.peak = 0

    async def __call__(self, command: str, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        self.calls.append((command, args, peer))
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.gate is not None:
                await self.gate.wait()
            if command == "status":
                return {"cluster": "orders", "state": "paused" if self.paused else "watching"}
            if command == "pause":
                if self.paused:
                    raise CommandError("automatic failover is already paused")
                self.paused = True
                return {"paused": True}
            if command == "reload":
                raise RuntimeError("config parser exploded\nwith a second line")
            if command == "ack":
                odd: dict[Any, Any] = {
                    "nan": float("nan"), "inf": float("-inf"), "when": dt.date(2026, 1, 1),
                    "set": {1}, (1, 2): "tuple key", "big": 10**5000,
                }  # fmt: skip
                return odd
            if command == "abort":
                return ["not", "a", "dict"]  # type: ignore[return-value]
            return {"command": command, "args": args}
        finally:
            self.in_flight -= 1


class ScriptedDaemon:
    """Answers with the given status, history and (dry-run) plan; ``hang`` never answers."""

    def __init__(
        self, status: dict[str, Any], history: dict[str, Any], plan: dict[str, Any]
    ) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.status = status
        self.history = history
        self.plan = plan
        self.hang = False

    async def __call__(self, command: str, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        self.calls.append((command, args))
        if self.hang:
            await asyncio.Event().wait()
        if command == "status":
            return self.status
        if command == "history":
            return self.history
        if command in ("failover", "switchover") and args.get("dry_run"):
            return self.plan
        if command == "resume":
            raise CommandError("automatic failover is not paused")
        if command == "pause":
            return {"message": "automatic failover paused", "paused": True}
        return {}

    @property
    def commands(self) -> list[str]:
        return [c for c, _ in self.calls]


class StatefulDaemon:
    """Counts every state change a mutating command would make (the fuzz must make none)."""

    def __init__(self, status: dict[str, Any]) -> None:
        self.status = status
        self.state = {"paused": False, "failovers": 0, "reloads": 0}
        self.calls: list[str] = []

    async def __call__(self, command: str, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        self.calls.append(command)
        if command == "status":
            return dict(self.status)
        if command == "history":
            return {"failovers": [], "n": args["n"]}
        # Any mutating call changes state: the fuzz must never get here.
        if command == "pause":
            self.state["paused"] = True
        elif command == "failover":
            self.state["failovers"] += 1
        else:
            self.state["reloads"] += 1
        return {}


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A directory for a control socket: short (sun_path is 108 bytes) and outside
    pytest's 0700 tree, so ``open_dir`` can let an unprivileged client reach it."""
    d = Path(tempfile.mkdtemp(prefix="wdsock-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def open_dir(sockdir: Path) -> Path:
    """``sockdir``, traversable by any user (an unprivileged client reaches the socket)."""
    os.chmod(sockdir, 0o755)
    return sockdir


class RejoinEngine:
    """The old primary's (or the new primary's) engine as the rejoin flow sees it: a
    scripted divergence report (or an EngineError), ``rejoin`` that makes it follow,
    and ``replica_of`` that says no ``not_caught_up`` times after the rejoin first."""

    def __init__(
        self,
        name: str,
        report: Divergence | EngineError | None = None,
        *,
        not_caught_up: int = 0,
        rejoin_error: str | None = None,
        fence_error: str | None = None,
        same_server_as: str | None = None,
    ) -> None:
        self.name = name
        self.fence_error = fence_error
        # The name of the node whose server this one's DSN really reaches (a VIP, say).
        self.same_server_as = same_server_as
        self.report = report or Divergence(known=True, lost=0, unit="bytes")
        self.not_caught_up = not_caught_up
        self.rejoin_error = rejoin_error
        self.follows: str | None = None
        self.calls: list[tuple[str, str]] = []

    async def divergence(self, new_primary: Engine, timeout: float) -> Divergence:
        self.calls.append(("divergence", new_primary.name))
        if isinstance(self.report, EngineError):
            raise self.report
        return self.report

    async def rejoin(self, new_primary: Engine, timeout: float) -> str:
        self.calls.append(("rejoin", new_primary.name))
        if self.rejoin_error is not None:
            raise EngineError(self.rejoin_error)
        self.follows = new_primary.name
        return f"{self.name} follows {new_primary.name}"

    async def distinct_from(self, new_primary: Engine, timeout: float) -> None:
        self.calls.append(("distinct_from", new_primary.name))
        if self.same_server_as == new_primary.name:
            raise EngineError(f"{self.name} and {new_primary.name} are the same server")

    async def replica_of(self, new_primary: Engine, timeout: float) -> str:
        self.calls.append(("replica_of", new_primary.name))
        if self.follows != new_primary.name:
            raise EngineError(f"{self.name} does not replicate from {new_primary.name}")
        if self.not_caught_up > 0:
            self.not_caught_up -= 1
            raise EngineError("streaming, 100 bytes behind")
        return f"{self.name} streams from {new_primary.name}, caught up"

    async def status(self, timeout: float) -> DbStatus:
        raise EngineError("not probed in this test")

    async def stop_replication(self, timeout: float) -> str:
        raise EngineError("not in a rejoin")

    async def promote(self, timeout: float) -> str:
        raise EngineError("not in a rejoin")

    async def fence(self, timeout: float) -> str:
        self.calls.append(("fence", self.name))
        if self.fence_error is not None:
            raise EngineError(self.fence_error)
        return f"{self.name} read-only"

    async def advise(self, outage_threshold: float, timeout: float) -> list[str]:
        return []

    def on_connection_lost(self, callback: Callable[[], None] | None) -> None:
        """Nothing to watch: a scripted engine has no connection to lose."""

    async def close(self) -> None:
        return None
