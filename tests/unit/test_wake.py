"""Issue 13: a closed connection to the primary wakes the probe cycle at once, debounced
(a flapping connection cannot make a probe storm); the standby's does not wake it, and
a notice during a cycle is followed by one more cycle right after it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from watchdogd import config
from watchdogd.core.events import Event
from watchdogd.daemon import Daemon
from watchdogd.daemon.schedule import PROBE, Schedule

INTERVAL = 5.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


Rig = tuple[Daemon, list[Event], Clock]


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    """A daemon (not started) with an injected clock, and the events it emits."""
    clock = Clock()
    db = "postgresql://x@127.0.0.1:1/x"
    raw: dict[str, Any] = {
        "cluster": "c",
        "primary": {"name": "a", "database": {"engine": "postgres", "dsn": db}},
        "standby": {"name": "b", "database": {"engine": "postgres", "dsn": db}},
        "probe": {"interval": f"{INTERVAL:g}s", "timeout": "500ms"},
        "metrics": {"enabled": False},
        "control": {"socket": str(tmp_path / "control.sock")},
        "state_dir": str(tmp_path / "state"),
    }
    d = Daemon(config.parse(raw), clock=clock)
    events: list[Event] = []
    d.bus.subscribe(events.append)
    return d, events, clock


async def test_a_lost_primary_connection_wakes_the_cycle_once_per_interval(rig: Rig) -> None:
    d, events, clock = rig
    runs: list[float | None] = []

    async def job() -> None:  # what the cycle would see: the noticed loss, consumed
        runs.append(d.cycle.lost_at)
        d.cycle.lost_at = None

    d.scheduler = Schedule()
    d.scheduler.add(PROBE, job, INTERVAL)
    d.scheduler.start()
    try:
        await asyncio.sleep(0.05)
        assert runs == [None]  # the first, scheduled run
        for _ in range(5):  # a flapping connection
            d.cycle.connection_lost("a")
            clock.now += 0.1
            await asyncio.sleep(0.02)
        assert runs == [None, 1000.0]  # one wake, timed at the first notice
        lost = [e for e in events if e.name == "primary_connection_lost"]
        assert len(lost) == 1 and lost[0].facts["node"] == "a"

        d.cycle.connection_lost("b")  # the standby's connection: no wake
        clock.now += INTERVAL
        await asyncio.sleep(0.05)
        assert len(runs) == 2

        d.cycle.connection_lost("a")  # an interval later: wakes again
        await asyncio.sleep(0.05)
        assert runs == [None, 1000.0, clock.now]
    finally:
        await d.scheduler.stop()


async def test_a_loss_noticed_during_a_cycle_is_followed_by_a_cycle_after_it(rig: Rig) -> None:
    d = rig[0]
    seen: list[float | None] = []

    async def slow_run() -> None:  # the cycle's run(): takes the notice when it starts
        seen.append(d.cycle.lost_at)
        d.cycle.lost_at = None
        await asyncio.sleep(0.2)

    d.cycle.run = slow_run  # type: ignore[assignment,method-assign]
    d.scheduler = Schedule()
    d.scheduler.add(PROBE, d.cycle.job, INTERVAL)  # the real job: bounded, reporting
    d.scheduler.start()
    try:
        await asyncio.sleep(0.05)
        assert d.cycle.running
        d.cycle.connection_lost("a")  # mid-cycle: this cycle's probes predate it
        await asyncio.sleep(0.5)
        assert seen == [None, 1000.0]  # one more cycle right after, not 5 s later
    finally:
        await d.scheduler.stop()
