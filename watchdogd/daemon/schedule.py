"""The probe schedule: one async job every ``interval`` seconds on the running loop.

What the daemon needs of a scheduler, and no more: the first run at once, then a fixed
rate (the next run is due one interval after the previous one was due, so the phase
does not drift); never two runs at once (a run that overruns its interval skips the
ticks it missed, it never queues them); ``run_now()`` for a run at once, e.g. when the
connection to the primary is found closed (a run in progress is followed by another
right after it), after which the rate continues from that run; ``reschedule()`` for a
new interval (reload). APScheduler did this before; it is about 4.8 MiB resident for
one interval job (its import pulls in importlib.metadata, multiprocessing and tzlocal),
a sixth of an idle daemon (issue 13).

The job must bound itself (the probe cycle wraps its body in ``asyncio.timeout``) and
report its own errors; one that raises anyway is logged and the schedule goes on.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable

_log = logging.getLogger(__name__)


class Every:
    def __init__(
        self, job: Callable[[], Awaitable[None]], interval: float, *, name: str = "probe"
    ) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be positive, got {interval!r}")
        self.job = job
        self.interval = interval
        self.name = name
        self.running = False  # a run is in progress
        self.runs = 0
        self._now = False  # run_now() asked for a run
        self._poke = asyncio.Event()
        self._due = 0.0  # loop time the next run is due
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start, with the first run at once. Call from inside the running loop."""
        loop = asyncio.get_running_loop()
        self._due = loop.time()
        self._task = loop.create_task(self._loop(), name=f"schedule-{self.name}")

    def run_now(self) -> None:
        """Run at once (right after the run in progress, if any)."""
        self._now = True
        self._poke.set()

    def reschedule(self, interval: float) -> None:
        """A new interval: the next run is due one new interval from now (or from the
        start of the run in progress)."""
        if not interval > 0:
            raise ValueError(f"interval must be positive, got {interval!r}")
        self.interval = interval
        if not self.running:
            self._due = asyncio.get_running_loop().time() + interval
            self._poke.set()

    async def stop(self) -> None:
        """Stop; a run in progress is cancelled."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._poke.clear()
            if not self._now:
                delay = self._due - loop.time()
                if delay > 0:
                    try:
                        async with asyncio.timeout(delay):
                            await self._poke.wait()
                    except TimeoutError:
                        pass
                    else:
                        continue  # run_now() or reschedule(): look again
            woken, self._now = self._now, False
            started = loop.time()
            base = started if woken else self._due
            self.running = True
            try:
                await self.job()
            except Exception:
                _log.exception("scheduled job %s raised", self.name)
            finally:
                self.running = False
                self.runs += 1
            due = base + self.interval
            now = loop.time()
            if due < now:  # overran: skip the missed ticks, keep the phase
                due += math.ceil((now - due) / self.interval) * self.interval
            self._due = due
