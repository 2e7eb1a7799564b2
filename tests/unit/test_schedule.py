"""The daemon's schedule (watchdogd.daemon.schedule.Schedule, over APScheduler) on a real
event loop: first run at once, a fixed rate without drift, never two runs at once,
run_now, reschedule, stop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

from tests.support import timing
from watchdogd.daemon.schedule import Schedule

INTERVAL = 0.1
NAME = "job"


def every(job: Callable[[], Awaitable[None]], interval: float) -> Schedule:
    schedule = Schedule()
    schedule.add(NAME, job, interval)
    return schedule


class Job:
    def __init__(self, takes: float = 0.0) -> None:
        self.takes = takes
        self.starts: list[float] = []
        self.active = 0
        self.most_at_once = 0

    async def __call__(self) -> None:
        self.starts.append(time.monotonic())
        self.active += 1
        self.most_at_once = max(self.most_at_once, self.active)
        try:
            await asyncio.sleep(self.takes)
        finally:
            self.active -= 1


async def test_first_run_at_once_then_a_fixed_rate_without_drift() -> None:
    job = Job(takes=0.03)  # a run's own time must not push the next one later
    sched = every(job, INTERVAL)
    t0 = time.monotonic()
    sched.start()
    await asyncio.sleep(10.5 * INTERVAL)
    await sched.stop()
    assert job.starts[0] - t0 < timing.within(0.02)
    assert 10 <= len(job.starts) <= 12
    # The n-th run is due n intervals after the first: lateness does not accumulate.
    late = [s - (job.starts[0] + n * INTERVAL) for n, s in enumerate(job.starts)]
    assert max(late) < timing.within(0.03), late


async def test_a_run_that_overruns_is_never_overlapped_and_skips_missed_ticks() -> None:
    job = Job(takes=2.5 * INTERVAL)
    sched = every(job, INTERVAL)
    sched.start()
    await asyncio.sleep(10 * INTERVAL)
    await sched.stop()
    assert job.most_at_once == 1
    gaps = [b - a for a, b in zip(job.starts, job.starts[1:], strict=False)]
    # Each run starts on the first tick after the previous one ended: 3 intervals apart.
    assert all(2.9 * INTERVAL <= g <= 3 * INTERVAL + timing.within(0.03) for g in gaps), gaps


async def test_run_now_runs_at_once_and_the_rate_continues_from_there() -> None:
    job = Job()
    sched = every(job, 10 * INTERVAL)
    sched.start()
    await asyncio.sleep(0.2 * INTERVAL)
    assert len(job.starts) == 1
    woken = time.monotonic()
    sched.run_now(NAME)
    await asyncio.sleep(0.2 * INTERVAL)
    assert len(job.starts) == 2 and job.starts[1] - woken < timing.within(0.02)
    await asyncio.sleep(12 * INTERVAL)  # next one interval after the woken run
    await sched.stop()
    assert len(job.starts) == 3
    assert job.starts[2] - job.starts[1] == pytest.approx(10 * INTERVAL, abs=timing.within(0.03))


async def test_run_now_during_a_run_follows_it_without_overlap() -> None:
    job = Job(takes=3 * INTERVAL)
    sched = every(job, 100 * INTERVAL)
    sched.start()
    await asyncio.sleep(INTERVAL)
    assert sched.running(NAME)
    sched.run_now(NAME)
    sched.run_now(NAME)  # twice while running: still one run after it
    await asyncio.sleep(8 * INTERVAL)
    await sched.stop()
    assert len(job.starts) == 2 and job.most_at_once == 1
    assert job.starts[1] - job.starts[0] == pytest.approx(3 * INTERVAL, abs=timing.within(0.03))


async def test_run_now_just_as_a_run_ends_is_not_lost() -> None:
    # The moment APScheduler still counts the finished run as running (its bookkeeping
    # is a done-callback of the run's task): a run_now() then must still run the job.
    sched: Schedule
    job = Job()
    ended: list[float] = []

    async def run_then_wake() -> None:
        await job()
        if len(job.starts) == 1:
            asyncio.get_running_loop().call_soon(sched.run_now, NAME)
            ended.append(time.monotonic())

    sched = every(run_then_wake, 100 * INTERVAL)
    sched.start()
    await asyncio.sleep(2 * INTERVAL)
    await sched.stop()
    assert len(job.starts) == 2
    assert job.starts[1] - ended[0] < timing.within(0.02)


async def test_reschedule_takes_the_new_interval_from_now() -> None:
    job = Job()
    sched = every(job, 100 * INTERVAL)
    sched.start()
    await asyncio.sleep(0.5 * INTERVAL)
    changed = time.monotonic()
    sched.reschedule(NAME, INTERVAL)
    await asyncio.sleep(3.5 * INTERVAL)
    await sched.stop()
    assert len(job.starts) == 4
    assert job.starts[1] - changed == pytest.approx(INTERVAL, abs=timing.within(0.03))


async def test_stop_cancels_a_run_in_progress_and_ends_the_schedule() -> None:
    job = Job(takes=100 * INTERVAL)
    sched = every(job, INTERVAL)
    sched.start()
    await asyncio.sleep(INTERVAL)
    await sched.stop()
    assert job.active == 0 and not sched.running(NAME)
    await asyncio.sleep(2 * INTERVAL)
    assert len(job.starts) == 1


async def test_a_job_that_raises_does_not_end_the_schedule() -> None:
    runs: list[int] = []

    async def broken() -> None:
        runs.append(1)
        raise RuntimeError("boom")

    sched = every(broken, INTERVAL)
    sched.start()
    await asyncio.sleep(2.5 * INTERVAL)
    await sched.stop()
    assert len(runs) == 3


def test_a_bad_interval_is_refused() -> None:
    with pytest.raises(ValueError, match="interval must be positive"):
        every(Job(), 0)
    sched = every(Job(), INTERVAL)
    with pytest.raises(ValueError, match="interval must be positive"):
        sched.reschedule(NAME, -1)


async def test_a_run_now_just_before_stop_does_not_run_after_it() -> None:
    # run_now's wakeup may hand APScheduler's executor a run that only starts as a task
    # after stop() returned: that run must not call the job.
    job = Job()
    sched = every(job, 100 * INTERVAL)
    sched.start()
    await asyncio.sleep(INTERVAL)
    assert len(job.starts) == 1
    sched.run_now(NAME)
    await asyncio.sleep(0)  # the wakeup submits the run: its task starts inside stop()
    await sched.stop()
    await asyncio.sleep(2 * INTERVAL)
    assert len(job.starts) == 1 and not sched.running(NAME)
