"""The daemon's safety loose ends, in-process and without servers: the systemd watchdog
ping against probe.interval, a fence cut off by a restart, and primary_down after a
restart mid-failover."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from watchdogd import config
from watchdogd.control import CommandError, Peer
from watchdogd.core.model import Config
from watchdogd.daemon import Daemon
from watchdogd.detector import DOWN, HEALTHY, SUSPECT, Status, Verdict
from watchdogd.state import journal
from watchdogd.state.journal import JournalError, JournalWriteError
from watchdogd.systemd import SystemdNotifier, watchdog_advice


class Log:
    """Records (level, event, facts) like the structlog logger the daemon is given."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        def log(event: str, **facts: Any) -> None:
            self.entries.append((level, event, facts))

        return log

    def named(self, event: str) -> list[dict[str, Any]]:
        return [f for _, e, f in self.entries if e == event]


def make_config(tmp_path: Path, interval: str = "1s", timeout: str = "500ms") -> Config:
    return config.parse(
        {
            "cluster": "orders",
            "primary": {
                "name": "main",
                "database": {"engine": "postgres", "dsn": "postgresql://u@127.0.0.1:1/x"},
            },
            "standby": {
                "name": "failover",
                "database": {"engine": "postgres", "dsn": "postgresql://u@127.0.0.1:2/x"},
            },
            "probe": {"interval": interval, "timeout": timeout},
            "failover": {
                "outage_threshold": "30s",
                "steps": [{"name": "promote_standby", "action": "promote"}],
                "fence_steps": [{"name": "fence_old_primary", "action": "fence"}],
            },
            "metrics": {"enabled": False},
            "state_dir": str(tmp_path / "state"),
        }
    )


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    try:
        yield path, sock
    finally:
        sock.close()


def drain(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.extend(sock.recv(4096).decode().split("\n"))
        except BlockingIOError:
            return out


# ----------------------------------------------------------------- WatchdogSec


def test_watchdog_advice_names_both_values_and_the_fix() -> None:
    assert watchdog_advice(20.0, 1.0, 0.5, 5.5) is None  # the shipped unit, default probes
    advice = watchdog_advice(20.0, 30.0, 5.0, 90.0)
    assert advice is not None and "\n" not in advice
    assert "probe.interval 30s" in advice and "probe.timeout 5s" in advice
    assert "WatchdogSec=20s" in advice
    assert "raise WatchdogSec to 87.5s or more" in advice
    assert "lower probe.interval to 3s or less" in advice
    # Just under half is not comfortable: a late timer once is a kill.
    assert watchdog_advice(20.0, 9.0, 0.9, 27.0) is not None
    assert watchdog_advice(20.0, 7.5, 0.5, 22.5) is None


async def test_long_interval_warns_at_start_and_pings_from_a_timer(
    tmp_path: Path, notify_socket: tuple[str, socket.socket]
) -> None:
    path, sock = notify_socket
    log = Log()
    d = Daemon(make_config(tmp_path, interval="3s", timeout="500ms"), log=log)
    # WatchdogSec=1s: per-cycle pings (every 3s) alone would get a healthy daemon killed.
    d.systemd = SystemdNotifier(log, {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"})
    d.last_cycle_wall = d.wall()  # a probe cycle just completed
    d._start_watchdog()
    try:
        (warning,) = log.named("watchdog_interval")
        assert "probe.interval 3s" in warning["advice"] and "WatchdogSec=1s" in warning["advice"]
        await asyncio.sleep(1.2)
        assert drain(sock).count("WATCHDOG=1") >= 2  # every 0.5s, between the cycles
        # A stalled probe loop: the pings stop, so systemd restarts the daemon.
        d.last_cycle_wall = d.wall() - d._stall_limit() - 1
        drain(sock)
        await asyncio.sleep(1.2)
        assert drain(sock) == []
    finally:
        assert d._watchdog_task is not None
        d._watchdog_task.cancel()
        d.systemd.close()


async def test_no_watchdog_no_timer_and_no_warning(tmp_path: Path) -> None:
    log = Log()
    d = Daemon(make_config(tmp_path, interval="30s", timeout="5s"), log=log)
    d.systemd = SystemdNotifier(log, {})
    d._start_watchdog()
    assert d._watchdog_task is None and log.entries == []


# ----------------------------------------------------------------- fences


def fence_records(state_dir: Path, *, finished: bool) -> None:
    j = journal.Journal(state_dir)
    j.append(
        journal.sequence_started(
            "failover",
            id="F1",
            trigger="automatic",
            kind="failover",
            reason="down",
            from_node="main",
            to_node="failover",
            steps=["promote_standby"],
            at=1,
        )
    )
    j.append(
        journal.step_started(
            "failover", id="F1", step="promote_standby", action="promote", attempt=1, at=2
        )
    )
    j.append(
        journal.step_finished(
            "failover", id="F1", step="promote_standby", action="promote", outcome="ok", at=3
        )
    )
    j.append(journal.sequence_finished("failover", id="F1", outcome="completed", error=None, at=4))
    j.append(
        journal.sequence_started(
            "fence",
            id="fence-1",
            trigger="split_brain",
            kind="fence",
            reason="old primary came back writable",
            from_node="main",
            to_node="failover",
            steps=["fence_old_primary"],
            failover_id="F1",
            at=10,
        )
    )
    j.append(
        journal.step_started(
            "fence", id="fence-1", step="fence_old_primary", action="fence", attempt=1, at=11
        )
    )
    if finished:
        j.append(
            journal.sequence_finished("fence", id="fence-1", outcome="completed", error=None, at=12)
        )
    j.close()


async def test_a_restart_mid_fence_closes_the_fence_and_resumes_nothing(tmp_path: Path) -> None:
    log = Log()
    cfg = make_config(tmp_path)
    fence_records(Path(cfg.state_dir), finished=False)
    d = Daemon(cfg, log=log)
    d.state = d.journal.load()
    d.policy.journal = d.state
    assert d.state.unfinished is None  # a fence is never an unfinished failover
    assert d.state.unfinished_fence is not None
    await d.sequences.close_unfinished_fence()
    (event,) = log.named("fence_unfinished")
    assert event["fence_id"] == "fence-1" and event["failover_id"] == "F1"
    assert event["old_primary"] == "main" and "fences again" in event["note"]
    d.journal.close()
    state = journal.Journal(cfg.state_dir).load()
    assert state.unfinished_fence is None and state.unfinished is None
    assert state.fences[0].outcome == "interrupted"
    # The failover stays what it was: completed, one promotion, awaiting its ack.
    assert [f.id for f in state.failovers] == ["F1"] and state.awaiting_ack is not None
    lines = (Path(cfg.state_dir) / "journal.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["type"] == "fence_finished"
    # Nothing to close twice.
    d2 = Daemon(cfg, log=Log())
    d2.state = d2.journal.load()
    await d2.sequences.close_unfinished_fence()
    assert d2.journal.path.read_text() == "\n".join(lines) + "\n"
    d2.journal.close()


# ----------------------------------------------------------------- primary_down


def verdict(status: Status, recovered: bool = False) -> Verdict:
    return Verdict(status, f"primary {status}", recovered=recovered)


def unfinished_failover(state_dir: Path) -> None:
    j = journal.Journal(state_dir)
    j.append(
        journal.sequence_started(
            "failover",
            id="F1",
            trigger="automatic",
            kind="failover",
            reason="down",
            from_node="main",
            to_node="failover",
            steps=["promote_standby"],
            at=1,
        )
    )
    j.close()


async def test_primary_down_is_not_announced_twice_for_a_resumed_failover(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    unfinished_failover(Path(cfg.state_dir))
    log = Log()
    d = Daemon(cfg, log=log)
    d.state = d.journal.load()
    d.policy.journal = d.state
    d.cycle.recall_outage()  # as start() does
    d.cycle.report_verdict(None, verdict(SUSPECT))
    d.cycle.report_verdict(verdict(SUSPECT), verdict(DOWN))
    assert log.named("primary_down") == [] and len(log.named("primary_still_down")) == 1
    # The primary comes back: a later outage is news again.
    d.cycle.report_verdict(verdict(DOWN), verdict(HEALTHY, recovered=True))
    d.cycle.report_verdict(verdict(HEALTHY), verdict(DOWN))
    assert len(log.named("primary_down")) == 1
    d.journal.close()


# ----------------------------------------------------------------- an unwritable journal


async def test_a_journal_that_refuses_records_is_a_visible_failed_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = Log()
    d = Daemon(make_config(tmp_path), log=log)
    d.state = d.journal.load()
    d.policy.journal = d.state
    d.last_cycle_wall = d.wall()
    assert d.views.healthz()[0]
    real_append = d.journal.append

    def full_disk(rec: dict[str, Any]) -> None:
        raise JournalWriteError(
            "journal /x/journal.jsonl: a record could not be written "
            "(No space left on device); nothing of it was kept"
        )

    monkeypatch.setattr(d.journal, "append", full_disk)
    peer = Peer(pid=1, uid=0, gid=0, user="root")
    with pytest.raises(CommandError, match=r"pause refused: journal .*No space left on device"):
        await d.handle_command("pause", {"reason": "window"}, peer)
    assert not d.state.paused  # nothing acted on what was not journaled
    # A failover (here: a manual one) is refused before it starts, not "started" and lost.
    with pytest.raises(JournalError):
        await d.sequences.start_failover("failover", "manual", "test", forced=True)
    assert (
        d.sequences.runner is None and d.sequences.runner_task is None and d.state.failovers == []
    )
    (event,) = log.named("journal_write_failed")  # once, not once per refused record
    assert "No space left on device" in event["error"] and event["record"] == "pause"
    assert [lvl for lvl, e, _ in log.entries if e == "journal_write_failed"] == ["error"]
    ok, why = d.views.healthz()
    assert not ok and why.startswith("journal cannot be written: ")
    assert d.status()["journal_error"] is not None
    writable = {"cluster": d.config.cluster}
    assert d.metrics.registry.get_sample_value("watchdogd_journal_writable", writable) == 0

    monkeypatch.setattr(d.journal, "append", real_append)
    await d.handle_command("pause", {"reason": "window"}, peer)
    assert d.state.paused and d.views.healthz()[0] and d.status()["journal_error"] is None
    assert len(log.named("journal_writable_again")) == 1
    assert d.metrics.registry.get_sample_value("watchdogd_journal_writable", writable) == 1
    d.journal.close()


# ----------------------------------------------------------------- one bad probe


class Exploding:
    target, probe = "w1", "witness"

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    async def check(self) -> Any:
        raise self.exc


@pytest.mark.parametrize(
    "exc", [RecursionError("maximum recursion depth exceeded"), KeyError("x"), MemoryError()]
)
async def test_a_probe_raising_anything_is_its_own_failed_observation(
    tmp_path: Path, exc: BaseException
) -> None:
    d = Daemon(make_config(tmp_path), log=Log())
    obs = await d.cycle.bounded(Exploding(exc))
    assert not obs.ok and obs.sees_primary is None  # a witness abstains
    assert obs.target == "w1" and obs.probe == "witness"
    assert obs.detail.startswith(f"probe error: {type(exc).__name__}")
    assert "\n" not in obs.detail
