"""Database probe: one ``Engine.status()`` call, bounded by the probe timeout."""

from __future__ import annotations

import time
from collections.abc import Callable

from watchdogd.engines import Engine, EngineError
from watchdogd.probes import Observation


class DatabaseProbe:
    probe = "database"

    def __init__(
        self,
        target: str,
        engine: Engine,
        timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.target = target
        self.engine = engine
        self.timeout = timeout
        self.clock = clock

    async def check(self) -> Observation:
        t0 = time.monotonic()
        at = self.clock()
        try:
            status = await self.engine.status(self.timeout)
        except EngineError as exc:
            return Observation(self.target, self.probe, False, time.monotonic() - t0, str(exc), at)
        except TimeoutError:
            return Observation(
                self.target,
                self.probe,
                False,
                time.monotonic() - t0,
                f"no answer within {self.timeout:g}s",
                at,
            )
        return Observation(
            self.target, self.probe, True, time.monotonic() - t0, status.detail, at, db=status
        )
