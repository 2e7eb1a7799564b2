"""Witness probe: asks another observer whether *it* reaches the primary.

Contract of a witness URL: JSON ``{"primary_up": true|false}`` (any status), or,
without that key, HTTP 200 for "I reach the primary" and 503 for "I don't".
A witness that cannot be asked, or answers with more than ``MAX_BODY`` bytes,
abstains (``sees_primary=None``). watchdogd's own
metrics server answers this contract at ``/primary``, so two daemons in
different places can witness for each other.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import aiohttp

from watchdogd.core.model import WitnessConfig
from watchdogd.probes import BodyTooLarge, Observation, read_capped


class WitnessProbe:
    probe = "witness"

    def __init__(
        self,
        witness: WitnessConfig,
        session: aiohttp.ClientSession,
        timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.target = witness.name
        self.witness = witness
        self.session = session
        self.timeout = witness.timeout or timeout
        self.clock = clock

    async def check(self) -> Observation:
        t0 = time.monotonic()
        at = self.clock()
        vote: bool | None = None
        try:
            async with self.session.get(
                self.witness.url, timeout=aiohttp.ClientTimeout(total=self.timeout)
            ) as resp:
                raw = await read_capped(resp.content)
                try:
                    body = json.loads(raw) if raw.strip() else None
                except (ValueError, RecursionError):  # not JSON, or nested to blow the stack
                    body = None
                if isinstance(body, dict) and isinstance(body.get("primary_up"), bool):
                    vote = body["primary_up"]
                elif resp.status == 200:
                    vote = True
                elif resp.status == 503:
                    vote = False
                detail = f"HTTP {resp.status}: " + (
                    "abstains" if vote is None else ("sees primary" if vote else "primary down")
                )
        except BodyTooLarge as exc:
            # A witness that answers with megabytes is not one to trust either way.
            detail = f"{exc}: abstains"
        except TimeoutError:
            detail = f"no answer within {self.timeout:g}s: abstains"
        except aiohttp.ClientError as exc:
            detail = f"{type(exc).__name__}: abstains"
        return Observation(
            self.target,
            self.probe,
            vote is not None,
            time.monotonic() - t0,
            detail,
            at,
            sees_primary=vote,
        )
