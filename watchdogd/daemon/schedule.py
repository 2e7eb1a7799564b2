"""The daemon's schedule: its periodic async jobs (the probe cycle, the readiness checks)
on one APScheduler ``AsyncIOScheduler`` in the running loop, behind the few verbs the
daemon uses: ``add``, ``start``, ``run_now``, ``reschedule``, ``stop``.

What the daemon relies on, and where it comes from:

- first run at once, then a fixed rate (each run due one interval after the previous
  one was due): ``next_run_time=now`` and an ``IntervalTrigger``;
- never two runs of a job at once, a run that overruns skips the ticks it missed:
  ``max_instances=1``, ``coalesce``, a misfire grace of one interval;
- ``run_now`` (a crash noticed on the primary's connection): the job's next run time is
  set to now, and the rate continues from that run. APScheduler drops a run that finds
  the job still running (``max_instances``), so a ``run_now`` during a run is kept here
  instead, and the run starts again right after it, inside the same job instance: no
  window in which APScheduler still counts the finished run and skips the new one;
- ``reschedule`` (reload): a new trigger, the next run one new interval from now;
- ``stop``: no more runs; a run in progress is cancelled and awaited.

Everything is passed as objects (trigger, executor, job store, UTC time zone), so that
building the scheduler looks up no plugin by name and never asks tzlocal for the host's
zone. The job must bound itself (the probe cycle wraps its body in
``asyncio.timeout``) and report its own errors; one that raises anyway is logged and
the schedule goes on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from apscheduler.executors.asyncio import AsyncIOExecutor
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

_log = logging.getLogger(__name__)

PROBE = "probe"  # the probe cycle's job


def _trigger(interval: float) -> Any:
    # APScheduler quietly turns a zero interval into one second: refuse it instead.
    if not interval > 0:
        raise ValueError(f"interval must be positive, got {interval!r}")
    return IntervalTrigger(seconds=interval, timezone=UTC)


class _Job:
    """One scheduled coroutine function and what APScheduler does not track for us."""

    def __init__(self, fn: Callable[[], Awaitable[None]], name: str) -> None:
        self.fn = fn
        self.name = name
        self.running = False
        self.again = False  # run_now() asked during a run: run once more after it
        self.task: asyncio.Task[Any] | None = None
        self.stopping = False

    async def run(self) -> None:
        if self.stopping:
            return  # a wakeup queued by run_now() before stop() submitted this run late
        self.running, self.task = True, asyncio.current_task()
        try:
            while True:
                self.again = False
                try:
                    await self.fn()
                except asyncio.CancelledError:
                    if self.stopping:
                        return  # stop(): nothing to report (APScheduler would log it)
                    raise
                except Exception:
                    _log.exception("scheduled job %s raised", self.name)
                if not self.again:
                    return
        finally:
            # Set before the task ends: whoever sees False acts after this step, i.e.
            # after APScheduler's done-callback (which releases the instance) was queued.
            self.running, self.task = False, None


class Schedule:
    """One ``AsyncIOScheduler`` and its jobs, each named."""

    def __init__(self) -> None:
        # Two INFO lines per run from the scheduler are noise, not news.
        logging.getLogger("apscheduler").setLevel(logging.WARNING)
        self._scheduler = AsyncIOScheduler(
            jobstores={"default": MemoryJobStore()},
            executors={"default": AsyncIOExecutor()},
            timezone=UTC,
        )
        self._jobs: dict[str, _Job] = {}

    def add(self, name: str, fn: Callable[[], Awaitable[None]], interval: float) -> None:
        """Run ``fn`` every ``interval`` seconds, the first time at once (on ``start``)."""
        job = self._jobs[name] = _Job(fn, name)
        self._scheduler.add_job(
            job.run,  # a coroutine function: run by the executor as a task on this loop
            _trigger(interval),
            id=name,
            name=name,
            max_instances=1,
            coalesce=True,
            misfire_grace_time=max(1, int(interval)),
            next_run_time=datetime.now(UTC),
        )

    def start(self) -> None:
        """Start the runs. Call from inside the running loop."""
        self._scheduler.start()

    def running(self, name: str) -> bool:
        """Whether a run of ``name`` is in progress."""
        return self._jobs[name].running

    def run_now(self, name: str) -> None:
        """Run ``name`` at once, or right after the run in progress."""
        job = self._jobs[name]
        if job.running:
            job.again = True
        elif self._scheduler.running:
            self._scheduler.modify_job(name, next_run_time=datetime.now(UTC))

    def reschedule(self, name: str, interval: float) -> None:
        """A new interval for ``name``: its next run is one new interval from now."""
        self._scheduler.reschedule_job(name, trigger=_trigger(interval))

    async def stop(self) -> None:
        """No more runs; a run in progress is cancelled and awaited."""
        for job in self._jobs.values():
            job.stopping = True
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)  # deferred to the loop's next turn...
        await asyncio.sleep(0)  # ...which is this one: no run starts after it
        tasks = [job.task for job in self._jobs.values() if job.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
