"""Issue 13: a crash closes the connection to the primary at once; the daemon notices
that and probes at once, so the outage is timed from the crash, not from the next tick.
Real PostgreSQL pairs on the stock and the tuned profile, a real SIGKILL. (Each
engine's own report of a closed connection: tests/chaos/test_connection_loss.py.)"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import timing
from tests.support.daemon import lab_config
from tests.support.pg import SECRET, eventually, pg_template, require_pg_bin
from watchdogd import config as configmod
from watchdogd.core.events import Event
from watchdogd.daemon import Daemon
from watchdogd.demo.lab import STOCK, TUNED, PgPair
from watchdogd.logging import reset_logging

pytestmark = pytest.mark.integration

# How soon after the kill the loss must be noticed: the kill lands mid-interval, so the
# next scheduled probe is half an interval (0.5 s) away; noticing within half of that
# is "at once" (a killed postmaster's backend exits and its socket closes in
# milliseconds; the rest is the event loop's turn, slower on a loaded CI machine).
NOTICED_WITHIN = 0.25


@pytest.fixture(params=[STOCK, TUNED])
def pair(request: pytest.FixtureRequest) -> Iterator[PgPair]:
    pair = PgPair.create(
        bin_dir=require_pg_bin(),
        password=SECRET,
        template=pg_template(request.config),
        profile=request.param,
    )
    try:
        yield pair
    finally:
        pair.destroy()


async def kill(pair: PgPair) -> float:
    """SIGKILL the primary (postmaster and children); the monotonic time of the kill."""
    t = time.monotonic()
    await asyncio.to_thread(pair.primary.kill)
    return t


async def test_the_daemon_probes_at_once_and_times_the_outage_from_the_kill(
    pair: PgPair, tmp_path: Path
) -> None:
    threshold, interval = 2.0, 1.0
    cfg = configmod.parse(
        lab_config(pair, tmp_path, interval="1s", timeout="500ms", threshold="2s")
    )
    d = Daemon(cfg)
    events: list[tuple[float, Event]] = []
    d.bus.subscribe(lambda e: events.append((time.monotonic(), e)))

    def seen(name: str, since: float, **facts: object) -> list[float]:
        return [
            t
            for t, e in events
            if e.name == name and t >= since and all(e.facts.get(k) == v for k, v in facts.items())
        ]

    try:
        await d.start()
        await eventually(lambda: d.status()["state"] == "watching", within=10)
        await eventually(lambda: seen("probe_observed", 0.0, target="main", ok=True), within=10)
        # Mid-interval, where the next scheduled probe is half an interval away.
        probed = seen("probe_observed", 0.0, target="main", probe="database")
        await asyncio.sleep(max(0.0, probed[-1] + interval / 2 - time.monotonic()))
        cycles_before = len(seen("probe_observed", 0.0, target="main", probe="database"))
        t_kill = await kill(pair)

        await eventually(lambda: seen("probe_observed", t_kill, target="main", ok=False), 3.0)
        lost = seen("primary_connection_lost", t_kill, node="main")
        first_failure = seen("probe_observed", t_kill, target="main", ok=False)[0]
        assert len(lost) == 1 and lost[0] - t_kill <= timing.within(NOTICED_WITHIN)
        # The probe ran at once, not at the next tick half an interval later ...
        assert first_failure - t_kill <= timing.within(NOTICED_WITHIN + 0.05) < interval / 2
        # ... and no extra cycle ran before the kill (no busier polling while healthy).
        assert cycles_before <= int((t_kill - probed[0]) / interval) + 1
        assert seen("primary_connection_lost", 0.0) == lost

        await eventually(lambda: seen("primary_down", t_kill), within=threshold + 5)
        down_at = seen("primary_down", t_kill)[0]
        down = next(e for t, e in events if e.name == "primary_down")
        # Timed from the notice: down one threshold after the kill, not up to an
        # interval later; never before the threshold (nothing was weakened).
        assert threshold - 0.06 <= down_at - t_kill <= threshold + timing.within(0.3)
        assert down.facts["outage_seconds"] >= threshold - 0.05
        assert down.facts["votes_down"] >= 2  # the standby agreed, as before
    finally:
        await d.stop()
        reset_logging()
