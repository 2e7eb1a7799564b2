"""Daemon bugs the chaos suite found, each pinned by a test against the real daemon
process so it stays fixed."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from tests.chaos import events, promotions, sample, started_failovers, wait_for
from tests.support.daemon import DaemonProcess, lab_config
from tests.support.pg import leave_standby_behind
from watchdogd.demo.lab import PgPair

Factory = Callable[..., DaemonProcess]


async def test_state_changes_are_reported_without_breaking_cycles_or_commands(
    pg_pair: PgPair, daemon_factory: Factory, tmp_path: Path
) -> None:
    """Every state change (the first cycle, an operator's pause and resume, a blocked
    failover) is logged and acted on: no probe cycle errors, the commands answer ok,
    and a blocked failover is alertable (event + watchdogd_failovers_total{outcome=
    "blocked"})."""
    d = daemon_factory(lab_config(pg_pair, tmp_path, max_lag="1MB"))
    await d.start()
    await d.wait_state("watching", within=10)

    paused = await d.call("pause", reason="maintenance window")
    assert paused["ok"], paused
    assert (await d.wait_state("paused", within=3))["paused"]
    resumed = await d.call("resume")
    assert resumed["ok"], resumed
    await d.wait_state("watching", within=3)

    await asyncio.to_thread(leave_standby_behind, pg_pair)

    async def lag_seen() -> bool:
        lag = (await d.status())["lag"]["bytes"]
        return lag is not None and lag > 1_000_000

    await wait_for(lag_seen, "the daemon seeing the primary's new position", within=5)
    pg_pair.primary.kill()
    await d.wait_state("blocked", within=15)
    await asyncio.sleep(0.6)  # one more cycle
    assert promotions(pg_pair) == 0 and not started_failovers(d)

    errors = events(d, "cycle_error")
    assert not errors, errors[0]["error"]
    assert len(events(d, "failover_blocked")) == 1
    metrics = await d.metrics()
    assert sample(metrics, "watchdogd_failovers_total", outcome="blocked", trigger="automatic") == 1
    changes = [e["state"] for e in events(d, "state_changed")]
    assert changes[:3] == ["watching", "paused", "watching"] and changes[-1] == "blocked"
