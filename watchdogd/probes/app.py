"""Application health probe: ``GET health_url`` answers 2xx (or ``expect_status``) in time."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import aiohttp

from watchdogd.core.model import AppConfig
from watchdogd.probes import BodyTooLarge, Observation, read_capped


class AppProbe:
    probe = "app"

    def __init__(
        self,
        target: str,
        app: AppConfig,
        session: aiohttp.ClientSession,
        timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.target = target
        self.app = app
        self.session = session
        self.timeout = timeout
        self.clock = clock

    async def check(self) -> Observation:
        t0 = time.monotonic()
        at = self.clock()
        try:
            async with self.session.get(
                self.app.health_url,
                headers=dict(self.app.headers),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                allow_redirects=False,
            ) as resp:
                # Read (capped) so the connection can be reused; the status decides.
                with contextlib.suppress(BodyTooLarge):
                    await read_capped(resp.content)
                ok = (
                    resp.status in self.app.expect_status
                    if self.app.expect_status
                    else 200 <= resp.status < 300
                )
                detail = f"HTTP {resp.status}"
        except TimeoutError:
            ok, detail = False, f"no answer within {self.timeout:g}s"
        except aiohttp.ClientError as exc:
            ok, detail = False, _one_line(exc)
        return Observation(self.target, self.probe, ok, time.monotonic() - t0, detail, at)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
