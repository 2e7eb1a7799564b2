"""Issue 2's end-to-end scenarios: the daemon as a real process, a real PostgreSQL
primary + streaming standby, app stand-ins, and real kills."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg

from tests.support.apps import DemoApps
from tests.support.daemon import DaemonProcess, lab_config
from tests.support.pg import eventually, leave_standby_behind
from watchdogd.demo.lab import PgPair

Factory = Callable[..., DaemonProcess]
FIVE = [
    "primary_maintenance_on",
    "stop_replication",
    "promote_standby",
    "standby_maintenance_off",
    "switch_traffic",
]


async def write_row(dsn: str, note: str) -> None:
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS t (note text)")
        await conn.execute("INSERT INTO t VALUES ($1)", note)
    finally:
        await conn.close()


async def rows(dsn: str) -> list[str]:
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        return [r["note"] for r in await conn.fetch("SELECT note FROM t")]
    finally:
        await conn.close()


def step_order(d: DaemonProcess) -> list[str]:
    return [r["step"] for r in d.journal() if r["type"] == "step_finished" and r["outcome"] == "ok"]


async def test_kill_primary_runs_five_steps_in_order(
    pg_pair: PgPair, demo_apps: DemoApps, daemon_factory: Factory, tmp_path: Path
) -> None:
    cfg = lab_config(pg_pair, tmp_path, demo_apps, interval="500ms", threshold="2s")
    d = daemon_factory(cfg)
    await d.start()
    await d.wait_state("watching")
    await write_row(pg_pair.primary.dsn, "before-kill")
    pg_pair.wait_replayed()
    killed = time.monotonic()
    pg_pair.primary.kill()
    status = await d.wait_state("failed_over", within=20)
    elapsed = time.monotonic() - killed
    # threshold 2 s + 2 intervals + the steps themselves (generous for a loaded CI box)
    assert elapsed < 2 + 2 * 0.5 + 5, elapsed
    assert step_order(d) == FIVE
    assert status["roles"] == {"primary": "failover", "standby": "main"}
    assert status["last_failover"]["outcome"] == "completed"
    assert not status["armed"]
    # the standby is a writable primary and kept the row committed before the kill
    await write_row(pg_pair.standby.dsn, "after-failover")
    assert set(await rows(pg_pair.standby.dsn)) == {"before-kill", "after-failover"}
    assert demo_apps.primary.calls_to("POST", "/maintenance")  # attempted, best effort
    assert not demo_apps.standby.maintenance
    traffic = (tmp_path / "traffic.log").read_text().split()
    assert traffic[0] == "failover" and traffic[1] == status["last_failover"]["id"]
    # the decision was logged with its reasons
    downs = [e for e in d.events() if e.get("event") == "primary_down"]
    assert downs and downs[0]["failing"] and downs[0]["standby_sees_primary"] is False


async def test_short_outage_changes_nothing(
    pg_pair: PgPair, daemon_factory: Factory, tmp_path: Path
) -> None:
    cfg = lab_config(pg_pair, tmp_path, interval="500ms", threshold="5s")
    d = daemon_factory(cfg)
    await d.start()
    await d.wait_state("watching")
    pg_pair.primary.kill()
    await d.wait_state("suspect", within=5)
    await asyncio.sleep(1.5)
    pg_pair.primary.start()  # back after ~2 s
    await eventually(lambda: pg_pair.standby_streaming(), within=15)
    await d.wait_state("watching", within=10)
    await asyncio.sleep(1.0)
    assert not [r for r in d.journal() if r["type"] == "failover_started"]
    status = await d.status()
    assert status["roles"]["primary"] == "main" and status["armed"]


async def test_lag_guard_blocks_when_standby_fell_behind(
    pg_pair: PgPair, daemon_factory: Factory, tmp_path: Path
) -> None:
    cfg = lab_config(pg_pair, tmp_path, interval="500ms", threshold="2s", max_lag="1MB")
    d = daemon_factory(cfg)
    await d.start()
    await d.wait_state("watching")
    leave_standby_behind(pg_pair)
    await asyncio.sleep(1.5)  # let the daemon see the primary's new position
    pg_pair.primary.kill()
    status = await d.wait_state("blocked", within=15)
    assert "lag guard" in status["reason"] and "max_lag" in status["reason"]
    await asyncio.sleep(1.5)
    assert pg_pair.standby.is_in_recovery()  # nothing promoted
    assert not [r for r in d.journal() if r["type"] == "failover_started"]
    assert "watchdogd_failovers_total" in await d.metrics()


async def test_manual_mode_detects_but_never_acts(
    pg_pair: PgPair, daemon_factory: Factory, tmp_path: Path
) -> None:
    cfg = lab_config(pg_pair, tmp_path, interval="500ms", threshold="1s", mode="manual")
    d = daemon_factory(cfg)
    await d.start()
    pg_pair.primary.kill()
    await eventually(lambda: any(e.get("event") == "primary_down" for e in d.events()), within=10)
    await asyncio.sleep(2)
    status = await d.status()
    assert status["state"] == "suspect" and "mode is manual" in status["reason"]
    assert not status["armed"]
    assert pg_pair.standby.is_in_recovery()
    assert d.journal() == []


async def test_restart_after_failover_stays_failed_over(
    pg_pair: PgPair, daemon_factory: Factory, tmp_path: Path
) -> None:
    cfg = lab_config(pg_pair, tmp_path, interval="500ms", threshold="1s")
    d = daemon_factory(cfg)
    await d.start()
    await d.wait_state("watching")
    pg_pair.primary.kill()
    before = await d.wait_state("failed_over", within=15)
    assert d.terminate() == 0
    d2 = daemon_factory(cfg)
    await d2.start()
    after = await d2.wait_state("failed_over", within=5)
    assert after["roles"] == before["roles"] == {"primary": "failover", "standby": "main"}
    assert after["last_failover"]["id"] == before["last_failover"]["id"]
    await asyncio.sleep(1.5)
    starts = [r for r in d2.journal() if r["type"] == "failover_started"]
    assert len(starts) == 1


async def test_required_step_failing_stops_the_sequence(
    pg_pair: PgPair, daemon_factory: Factory, tmp_path: Path
) -> None:
    marker = tmp_path / "later-step-ran"
    cfg = lab_config(pg_pair, tmp_path, interval="500ms", threshold="1s")
    cfg["failover"]["steps"] = [
        {"name": "stop_replication", "action": "stop_replication"},
        {
            "name": "flaky_dns",
            "action": "command",
            "argv": ["sh", "-c", "echo nope >&2; exit 1"],
            "retries": 2,
            "retry_delay": "100ms",
        },
        {"name": "promote_standby", "action": "promote"},
        {"name": "later", "action": "command", "argv": ["touch", str(marker)]},
    ]
    d = daemon_factory(cfg)
    await d.start()
    await d.wait_state("watching")
    pg_pair.primary.kill()
    status = await d.wait_state("failed", within=15)
    assert "flaky_dns" in status["reason"] and "nope" in status["reason"]
    assert not marker.exists()
    assert pg_pair.standby.is_in_recovery()  # promote came after the failing step
    tries = [r for r in d.journal() if r["type"] == "step_started" and r["step"] == "flaky_dns"]
    assert len(tries) == 3
    metrics = await d.metrics()
    assert (
        'watchdogd_failovers_total{cluster="orders",outcome="failed",trigger="automatic"} 1.0'
        in metrics
    )


async def test_start_warns_when_the_standby_confirms_a_hang_too_late(
    pg_pair: PgPair, daemon_factory: Factory, tmp_path: Path
) -> None:
    # The lab's standby has wal_receiver_timeout 2s: longer than a 1s threshold.
    d = daemon_factory(lab_config(pg_pair, tmp_path, interval="500ms", threshold="1s"))
    await d.start()
    advice = [e for e in d.events() if e.get("event") == "engine_advice"]
    assert len(advice) == 1 and advice[0]["node"] == "failover"
    assert "wal_receiver_timeout is 2s" in advice[0]["advice"]
