"""Run watchdogd as a real process against a lab: config builder, start/stop/kill,
control requests, journal reading."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest_asyncio
import yaml

from tests.support import aretry_if_port_taken, free_port, need, timing, which
from watchdogd.control import request
from watchdogd.demo.lab import PgPair, die_with_parent


def lab_config(
    pair: PgPair,
    tmp: Path,
    apps: Any = None,
    *,
    traffic_log: Path | None = None,
    interval: str = "500ms",
    timeout: str = "300ms",
    threshold: str = "2s",
    five_steps: bool = True,
    **failover: Any,
) -> dict[str, Any]:
    """The issue's five-step sequence against the lab's servers and app stand-ins."""
    traffic_log = traffic_log or tmp / "traffic.log"
    primary: dict[str, Any] = {
        "name": "main",
        "database": {"engine": "postgres", "dsn": pair.primary.dsn},
    }
    standby: dict[str, Any] = {
        "name": "failover",
        "database": {"engine": "postgres", "dsn": pair.standby.dsn},
    }
    steps: list[dict[str, Any]] = [
        {"name": "stop_replication", "action": "stop_replication"},
        {"name": "promote_standby", "action": "promote"},
    ]
    if apps is not None:
        primary["app"] = {"health_url": f"{apps.primary.url}/health"}
        standby["app"] = {"health_url": f"{apps.standby.url}/health"}
        if five_steps:
            steps = [
                {
                    "name": "primary_maintenance_on",
                    "action": "http",
                    "method": "POST",
                    "url": f"{apps.primary.url}/maintenance",
                    "json": {"enabled": True},
                    "required": False,
                    "timeout": "1s",
                    "retries": 1,
                    "retry_delay": "100ms",
                },
                *steps,
                {
                    "name": "standby_maintenance_off",
                    "action": "http",
                    "method": "DELETE",
                    "url": f"{apps.standby.url}/maintenance",
                    "timeout": "2s",
                },
                {
                    "name": "switch_traffic",
                    "action": "command",
                    "timeout": "5s",
                    "argv": [
                        "sh",
                        "-c",
                        f'echo "{{standby.name}} {{failover_id}}" >> {traffic_log}',
                    ],
                },
            ]
    return {
        "cluster": "orders",
        "primary": primary,
        "standby": standby,
        "probe": {"interval": interval, "timeout": timeout, "recovery_successes": 3},
        "failover": {
            "mode": "automatic",
            "outage_threshold": threshold,
            "max_lag": "16MB",
            "cooldown": "1h",
            "steps": steps,
            **failover,
        },
        "metrics": {"listen": f"127.0.0.1:{free_port()}"},
        "control": {"socket": str(tmp / "run" / "control.sock")},
        "log": {"format": "json", "level": "info"},
        "state_dir": str(tmp / "state"),
    }


class DaemonProcess:
    def __init__(
        self,
        cfg: dict[str, Any],
        tmp: Path,
        env: dict[str, str] | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        """``prefix``: an argv prefix the daemon is started through (``ip netns exec NS``)."""
        self.cfg = cfg
        self.prefix = list(prefix)
        self.tmp = tmp
        self.config_path = tmp / "watchdogd.yml"
        self.write_config(cfg)
        self.log_path = tmp / "watchdogd.log"
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.socket = cfg["control"]["socket"]
        self.metrics_url = "http://{}/metrics".format(cfg["metrics"]["listen"])

    @property
    def argv(self) -> list[str]:
        return [sys.executable, "-m", "watchdogd.cli", "run", "--config", str(self.config_path)]

    def write_config(self, cfg: dict[str, Any]) -> None:
        self.config_path.write_text(yaml.safe_dump(cfg))

    async def start(self, ready_within: float = 15.0) -> None:
        """Start and wait for the first probe cycle. When the metrics port was taken
        since the config chose it, start again on another (``retry_if_port_taken``)."""
        first = True

        async def attempt() -> None:
            nonlocal first
            if not first:  # on the same address (a site's, in a network namespace)
                host = self.cfg["metrics"]["listen"].rsplit(":", 1)[0]
                self.cfg["metrics"]["listen"] = f"{host}:{free_port()}"
                self.write_config(self.cfg)
                self.metrics_url = "http://{}/metrics".format(self.cfg["metrics"]["listen"])
            first = False
            await self._start_once(ready_within)

        await aretry_if_port_taken(attempt)

    async def _start_once(self, ready_within: float) -> None:
        start_of_log = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(  # noqa: ASYNC220 - a daemon we poll, never await
            [*self.prefix, *self.argv],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
            # A test that forgets one (or a worker that dies) leaks no daemon probing
            # ports that later tests reuse.
            preexec_fn=die_with_parent(),
        )
        log.close()
        deadline = time.monotonic() + timing.within(ready_within)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                this_run = self.log_path.read_bytes()[start_of_log:].decode(errors="replace")
                raise RuntimeError(f"watchdogd exited with {self.proc.returncode}:\n{this_run}")
            try:
                status = await self.status()
                if status.get("last_cycle_at"):
                    return
            except Exception:
                pass
            await asyncio.sleep(0.1)
        raise RuntimeError(f"watchdogd not ready within {ready_within}s:\n{self.logs()}")

    async def call(self, command: str, **args: Any) -> dict[str, Any]:
        reply: dict[str, Any] = await request(self.socket, command, args or None, timeout=10)
        return reply

    async def status(self) -> dict[str, Any]:
        reply = await self.call("status")
        assert reply["ok"], reply
        result: dict[str, Any] = reply["result"]
        return result

    async def wait_state(self, *states: str, within: float = 20.0) -> dict[str, Any]:
        within = timing.within(within)
        deadline = time.monotonic() + within
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            status = await self.status()
            if status["state"] in states:
                return status
            await asyncio.sleep(0.1)
        raise AssertionError(
            f"state {status.get('state')!r} ({status.get('reason')}) never became "
            f"{states} within {within}s\n{self.logs()[-4000:]}"
        )

    async def metrics(self) -> str:
        async with aiohttp.ClientSession() as s, s.get(self.metrics_url) as r:
            return await r.text()

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.logs().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def journal(self) -> list[dict[str, Any]]:
        path = Path(self.cfg["state_dir"]) / "journal.jsonl"
        if not path.exists():
            return []
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def terminate(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def promotions(self) -> int:
        """How many times a promote step *ran to success* according to the journal."""
        return sum(
            1
            for r in self.journal()
            if r.get("type") == "step_finished"
            and r.get("action") == "promote"
            and r.get("outcome") == "ok"
        )


@dataclass
class Ran:
    code: int
    out: str
    err: str


async def ctl(*argv: str, env: dict[str, str] | None = None) -> Ran:
    """The installed watchdogctl, run as a script would run it (stdin not a terminal)."""
    exe = need("watchdogctl", which("watchdogctl", str(Path(sys.executable).parent)))
    proc = await asyncio.create_subprocess_exec(
        exe,
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return Ran(proc.returncode, out.decode(), err.decode())


@pytest_asyncio.fixture
async def daemon_factory(tmp_path: Path) -> AsyncIterator[Callable[..., DaemonProcess]]:
    """``make(cfg)`` → a DaemonProcess (not started); every one is SIGKILLed at teardown.
    Daemons made in one test share ``tmp_path``: same config, log, journal and socket,
    so a second one is the first one restarted."""
    started: list[DaemonProcess] = []

    def make(cfg: dict[str, Any], **kw: Any) -> DaemonProcess:
        d = DaemonProcess(cfg, tmp_path, **kw)
        started.append(d)
        return d

    yield make
    for d in started:
        d.kill()
