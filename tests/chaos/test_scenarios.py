"""The chaos scenarios (issue 5): one test per failure mode, each against a real
PostgreSQL primary + streaming standby and watchdogd running as its own process.

Every scenario checks three things independently of what watchdogd reports: the
number of real promotions (timeline history files in the data dirs: exactly 0 or
exactly 1), the daemon's final state, and that no row committed and replicated
before the fault is missing from whichever node is the primary at the end.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest

from tests.chaos import (
    MetricsRecorder,
    assert_rows_kept,
    commit_rows,
    events,
    promotions,
    read_rows,
    reap,
    sample,
    started_failovers,
    wait_for,
)
from tests.support.apps import DemoApps
from tests.support.daemon import DaemonProcess, lab_config
from tests.support.pg import leave_standby_behind
from tests.support.proxy import BLACKHOLE, PASS, REFUSE, FaultProxy
from watchdogd.demo.lab import PgPair

Factory = Callable[..., DaemonProcess]
ProxyFactory = Callable[[int], Awaitable[FaultProxy]]
FIVE = [
    "primary_maintenance_on",
    "stop_replication",
    "promote_standby",
    "standby_maintenance_off",
    "switch_traffic",
]
FAILED_OVER = {"primary": "failover", "standby": "main"}
UNCHANGED = {"primary": "main", "standby": "failover"}


async def started(d: DaemonProcess) -> DaemonProcess:
    await d.start()
    await d.wait_state("watching", within=10)
    return d


def finished_steps(d: DaemonProcess) -> list[str]:
    return [r["step"] for r in d.journal() if r["type"] == "step_finished"]


def ok_steps(d: DaemonProcess) -> list[str]:
    return [r["step"] for r in d.journal() if r["type"] == "step_finished" and r["outcome"] == "ok"]


# --------------------------------------------------------------------------- 1


async def test_primary_sigkill_fails_over_once(
    pg_pair: PgPair, demo_apps: DemoApps, daemon_factory: Factory, tmp_path: Path
) -> None:
    """Scenario 1: the primary postmaster is SIGKILLed (with its backends, like a power
    cut) → exactly one failover, the five steps in order, state failed_over."""
    d = await started(daemon_factory(lab_config(pg_pair, tmp_path, demo_apps)))
    rows = await commit_rows(pg_pair, "sigkill")
    assert promotions(pg_pair) == 0

    pg_pair.primary.kill()
    status = await d.wait_state("failed_over", within=20)

    assert promotions(pg_pair) == 1
    assert ok_steps(d) == FIVE
    assert status["roles"] == FAILED_OVER
    assert status["last_failover"]["outcome"] == "completed"
    assert len(started_failovers(d)) == 1
    await assert_rows_kept(pg_pair, status, rows)
    assert not demo_apps.standby.maintenance  # the new primary's app serves
    # Nothing further happens while it waits for an operator: still one promotion.
    await asyncio.sleep(1.0)
    assert (await d.status())["state"] == "failed_over"
    assert promotions(pg_pair) == 1 and len(started_failovers(d)) == 1


# --------------------------------------------------------------------------- 2


async def test_primary_hung_sigstop_fails_over_once_thanks_to_timeouts(
    pg_pair: PgPair, demo_apps: DemoApps, daemon_factory: Factory, tmp_path: Path
) -> None:
    """Scenario 2: the primary is SIGSTOPped (postmaster and backends): its port still
    accepts TCP connections but nothing answers. Bounded probes turn that into
    failures; the standby's wal_receiver_timeout (2 s) makes it agree → one failover."""
    d = await started(daemon_factory(lab_config(pg_pair, tmp_path, demo_apps)))
    rows = await commit_rows(pg_pair, "sigstop")
    try:
        hung = time.monotonic()
        pg_pair.primary.sigstop()
        status = await d.wait_state("failed_over", within=25)
        elapsed = time.monotonic() - hung
        # threshold 2 s; wal_receiver_timeout 2 s runs concurrently; steps ~1 s; slack.
        assert elapsed < 12, elapsed
        assert promotions(pg_pair) == 1
        assert ok_steps(d) == FIVE
        assert status["roles"] == FAILED_OVER
        down = events(d, "primary_down")
        assert len(down) == 1 and down[0]["standby_sees_primary"] is False
        # The hang was seen as bounded failures, never a stuck probe loop.
        assert any("main/database" in f for f in down[0]["failing"])
        assert not events(d, "cycle_timeout")
        await assert_rows_kept(pg_pair, status, rows)
        assert len(started_failovers(d)) == 1
    finally:
        pg_pair.primary.sigcont()


# --------------------------------------------------------------------------- 3


async def test_watcher_primary_link_cut_is_a_partition_not_a_failover(
    pg_pair: PgPair,
    daemon_factory: Factory,
    fault_proxy: ProxyFactory,
    tmp_path: Path,
) -> None:
    """Scenario 3: the link between watchdogd and the primary is blackholed (the
    daemon's primary DSN goes through the proxy) while the standby keeps streaming
    directly from the primary, for 3x the outage threshold → no failover: state
    suspect, reason "partition between watcher and primary", partition metric 1."""
    threshold = 2.0
    proxy = await fault_proxy(pg_pair.primary.port)
    cfg = lab_config(pg_pair, tmp_path, threshold=f"{threshold:g}s")
    cfg["primary"]["database"]["dsn"] = f"postgresql://postgres@127.0.0.1:{proxy.port}/postgres"
    d = await started(daemon_factory(cfg))
    rows = await commit_rows(pg_pair, "partition")

    writes = 0

    async def keep_writing() -> None:
        # Replication keeps streaming: the primary is alive and busy.
        nonlocal writes
        conn = await asyncpg.connect(pg_pair.primary.dsn, timeout=5)
        try:
            while True:
                await conn.execute("INSERT INTO chaos_rows VALUES ($1)", f"during-{writes}")
                writes += 1
                await asyncio.sleep(0.2)
        finally:
            await conn.close()

    writer = asyncio.create_task(keep_writing())
    try:
        proxy.set_mode(BLACKHOLE)
        cut = time.monotonic()
        seen: set[str] = set()
        while time.monotonic() - cut < 3 * threshold:
            status = await d.status()
            seen.add(status["state"])
            assert status["state"] in ("watching", "suspect"), status
            await asyncio.sleep(0.2)
        status = await d.status()
        assert status["state"] == "suspect", status
        assert "partition between watcher and primary" in status["reason"]
        assert status["outage_seconds"] >= 2 * threshold  # it did see a long outage
        assert status["lag"]["streaming"] is True
        metrics = await d.metrics()
        assert sample(metrics, "watchdogd_partition_suspected") == 1.0
        assert len(events(d, "partition_suspected")) == 1
        assert promotions(pg_pair) == 0 and not started_failovers(d)
        assert proxy.accepted > 1  # the daemon kept trying through the cut link
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
    assert writes > 10  # the primary really was writable all along

    proxy.set_mode(PASS)
    status = await d.wait_state("watching", within=10)
    assert status["roles"] == UNCHANGED
    assert sample(await d.metrics(), "watchdogd_partition_suspected") == 0.0
    assert promotions(pg_pair) == 0 and not started_failovers(d)
    assert await asyncio.to_thread(pg_pair.standby.is_in_recovery)
    await assert_rows_kept(pg_pair, status, rows)


# --------------------------------------------------------------------------- 4


async def test_flapping_primary_never_fails_over(
    pg_pair: PgPair, daemon_factory: Factory, tmp_path: Path
) -> None:
    """Scenario 4: the primary flaps down 2 s / up 2 s for 60 s with a 5 s threshold and
    a 500 ms probe interval → no failover. The flaps are SIGSTOP/SIGCONT of the
    postmaster and its backends (a hang rather than a crash: the port stays open and
    the server resumes where it was, so each up-window is a full 2 s of service;
    kill+restart would spend part of it in crash recovery). Each 2 s up-window gives
    ~4 good cycles, more than recovery_successes 3, so the outage timer resets every
    time and never reaches the threshold."""
    d = await started(
        daemon_factory(lab_config(pg_pair, tmp_path, interval="500ms", threshold="5s"))
    )
    rows = await commit_rows(pg_pair, "flap")

    states: set[str] = set()
    longest = 0.0

    async def watch() -> None:
        nonlocal longest
        while True:
            status = await d.status()
            states.add(status["state"])
            longest = max(longest, status["outage_seconds"])
            await asyncio.sleep(0.25)

    watcher = asyncio.create_task(watch())
    flaps = 0
    try:
        end = time.monotonic() + 60
        while time.monotonic() < end:
            pg_pair.primary.sigstop()
            await asyncio.sleep(2.0)
            pg_pair.primary.sigcont()
            flaps += 1
            await asyncio.sleep(2.0)
    finally:
        pg_pair.primary.sigcont()
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)

    status = await d.wait_state("watching", within=10)
    assert flaps >= 14
    assert states <= {"watching", "suspect"}, states
    assert "suspect" in states  # the flaps were seen...
    recovered = events(d, "primary_recovered")
    assert len(recovered) >= flaps - 2, (len(recovered), flaps)  # ...and each one reset
    assert longest < 5.0, longest  # the outage timer never reached the threshold
    assert not events(d, "primary_down")
    assert promotions(pg_pair) == 0 and not started_failovers(d)
    assert status["roles"] == UNCHANGED
    await assert_rows_kept(pg_pair, status, rows)


# --------------------------------------------------------------------------- 5


async def test_lagging_standby_blocks_until_forced(
    pg_pair: PgPair, daemon_factory: Factory, tmp_path: Path
) -> None:
    """Scenario 5: the standby stopped receiving (detached) and the primary wrote ~3 MB
    more, beyond max_lag 1MB; then the primary dies → state blocked, no promotion.
    ``failover --force`` then promotes: one promotion, failed_over — and the
    unreceived writes are lost, which is exactly what the guard protected."""
    d = await started(daemon_factory(lab_config(pg_pair, tmp_path, max_lag="1MB")))
    rows = await commit_rows(pg_pair, "lag")
    await asyncio.to_thread(leave_standby_behind, pg_pair)

    async def lag_seen() -> bool:
        lag = (await d.status())["lag"]["bytes"]
        return lag is not None and lag > 1_000_000

    await wait_for(lag_seen, "the daemon seeing the primary's new position", within=5)
    pg_pair.primary.kill()
    status = await d.wait_state("blocked", within=15)
    assert "lag guard" in status["reason"] and "max_lag" in status["reason"]
    await asyncio.sleep(1.0)  # several more cycles: still nothing promoted
    assert (await d.status())["state"] == "blocked"
    assert promotions(pg_pair) == 0 and not started_failovers(d)
    assert await asyncio.to_thread(pg_pair.standby.is_in_recovery)

    reply = await d.call("failover", force=True)
    assert reply["ok"], reply
    status = await d.wait_state("failed_over", within=15)
    assert promotions(pg_pair) == 1
    assert status["roles"] == FAILED_OVER
    assert status["last_failover"]["trigger"] == "manual"
    assert len(started_failovers(d)) == 1
    new_primary = await assert_rows_kept(pg_pair, status, rows)
    tables = await asyncio.to_thread(
        new_primary.execute, "SELECT count(*) FROM pg_class WHERE relname = 'unreceived'"
    )
    assert tables == "0"


# --------------------------------------------------------------------------- 6


async def test_daemon_killed_mid_step_resumes_and_promotes_once(
    pg_pair: PgPair, daemon_factory: Factory, tmp_path: Path
) -> None:
    """Scenario 6: watchdogd is SIGKILLed while a slow idempotent step (``sleep 5``)
    runs between stop_replication and promote. Restarted, it resumes from that step:
    stop_replication is not run again, the slow step is re-run, then promote and
    switch run once → exactly one promotion and a consistent journal."""
    pids = tmp_path / "slow.pids"
    runs = tmp_path / "slow.runs"
    traffic = tmp_path / "traffic.log"
    cfg = lab_config(pg_pair, tmp_path)
    cfg["failover"]["steps"] = [
        {"name": "stop_replication", "action": "stop_replication"},
        {
            "name": "slow_step",
            "action": "command",
            "idempotent": True,
            "timeout": "10s",
            "argv": ["sh", "-c", f"echo $$ >> {pids}; echo run >> {runs}; exec sleep 5"],
        },
        {"name": "promote_standby", "action": "promote"},
        {
            "name": "switch_traffic",
            "action": "command",
            "argv": ["sh", "-c", f"echo {{failover_id}} >> {traffic}"],
        },
    ]
    try:
        d = await started(daemon_factory(cfg))
        rows = await commit_rows(pg_pair, "resume")
        pg_pair.primary.kill()

        def slow_step_running() -> bool:
            return any(
                r["type"] == "step_started" and r["step"] == "slow_step" for r in d.journal()
            )

        await wait_for(slow_step_running, "the slow step starting", within=15, every=0.05)
        await wait_for(runs.exists, "the slow step's command running", within=5, every=0.05)
        d.kill()  # SIGKILL: no chance to journal anything more
        assert await asyncio.to_thread(pg_pair.standby.is_in_recovery)
        assert promotions(pg_pair) == 0
        assert not [r for r in d.journal() if r["type"] == "failover_finished"]

        d2 = daemon_factory(cfg)
        await d2.start()
        status = await d2.wait_state("failed_over", within=20)

        assert promotions(pg_pair) == 1
        assert status["roles"] == FAILED_OVER
        journal = d2.journal()
        starts = [r for r in journal if r["type"] == "failover_started"]
        finishes = [r for r in journal if r["type"] == "failover_finished"]
        assert len(starts) == 1
        assert [(f["id"], f["outcome"]) for f in finishes] == [(starts[0]["id"], "completed")]
        assert all(r["id"] == starts[0]["id"] for r in journal if "step" in r)
        started_steps = [r["step"] for r in journal if r["type"] == "step_started"]
        assert started_steps == [
            "stop_replication",
            "slow_step",  # interrupted by the kill...
            "slow_step",  # ...and re-run after the restart
            "promote_standby",
            "switch_traffic",
        ]
        attempts = [
            r["attempt"]
            for r in journal
            if r.get("step") == "slow_step" and r["type"] == "step_started"
        ]
        assert attempts == [1, 2]
        assert (
            finished_steps(d2)
            == ok_steps(d2)
            == [
                "stop_replication",
                "slow_step",
                "promote_standby",
                "switch_traffic",
            ]
        )
        assert runs.read_text().split() == ["run", "run"]
        assert traffic.read_text().split() == [starts[0]["id"]]
        assert events(d2, "failover_unfinished") and events(d2, "failover_resumed")
        await assert_rows_kept(pg_pair, status, rows)
    finally:
        reap(pids, "sleep")


# --------------------------------------------------------------------------- 7


async def test_old_primary_back_writable_is_fenced_not_failed_back(
    pg_pair: PgPair, demo_apps: DemoApps, daemon_factory: Factory, tmp_path: Path
) -> None:
    """Scenario 7: after a completed failover the old primary is restarted and comes
    back as a writable primary (split brain). watchdogd reports it (writable_primaries
    2, split_brain 1, a split_brain event), runs the fence_steps (old app into
    maintenance over HTTP, then the ``fence`` built-in), the old primary ends
    read-only, and nothing fails back: same roles, one promotion."""
    cfg = lab_config(pg_pair, tmp_path, demo_apps)
    cfg["failover"]["fence_steps"] = [
        {
            "name": "old_app_maintenance",
            "action": "http",
            "method": "POST",
            "url": f"{demo_apps.primary.url}/maintenance",
            "json": {"enabled": True},
            "timeout": "2s",
        },
        {"name": "fence_old_primary", "action": "fence", "timeout": "5s"},
    ]
    d = await started(daemon_factory(cfg))
    rows = await commit_rows(pg_pair, "split")
    pg_pair.primary.kill()
    await d.wait_state("failed_over", within=20)
    assert promotions(pg_pair) == 1

    # The old stack reboots: its app comes up serving, its database as a primary.
    demo_apps.primary.maintenance = False
    posts_before = len(demo_apps.primary.calls_to("POST", "/maintenance"))
    recorder = MetricsRecorder(d, "watchdogd_writable_primaries", "watchdogd_split_brain")
    async with recorder.running():
        pg_pair.primary.start()
        assert not await asyncio.to_thread(pg_pair.primary.is_in_recovery)

        def fenced() -> bool:
            done = {e["step"] for e in events(d, "fence_step_completed")}
            return done == {"old_app_maintenance", "fence_old_primary"}

        await wait_for(fenced, "both fence steps completing", within=15)

        def settled() -> bool:
            split = recorder.first(watchdogd_writable_primaries=2, watchdogd_split_brain=1)
            last = recorder.samples[-1] if recorder.samples else {}
            return split is not None and last == {
                "watchdogd_writable_primaries": 1.0,
                "watchdogd_split_brain": 0.0,
            }

        # Reported first (both writable, split brain 1), then cleared by the fence.
        await wait_for(settled, "split brain reported, then cleared, in the metrics", within=10)

    reports = events(d, "split_brain")
    assert len(reports) == 1
    assert reports[0]["writable_primaries"] == 2
    assert reports[0]["old_primary"] == "main" and reports[0]["new_primary"] == "failover"
    assert not events(d, "step_failed")

    # The old stack is fenced: its app in maintenance, its database read-only.
    assert demo_apps.primary.maintenance
    assert len(demo_apps.primary.calls_to("POST", "/maintenance")) > posts_before
    read_only = await asyncio.to_thread(
        pg_pair.primary.execute, "SHOW default_transaction_read_only"
    )
    assert read_only == "on"
    conn = await asyncpg.connect(pg_pair.primary.dsn, timeout=5)
    try:
        with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
            await conn.execute("INSERT INTO chaos_rows VALUES ('written-to-old-primary')")
    finally:
        await conn.close()

    # No failback: same roles, still one promotion, the new primary still writable.
    status = await d.status()
    assert status["state"] == "failed_over"
    assert status["roles"] == FAILED_OVER
    assert promotions(pg_pair) == 1 and len(started_failovers(d)) == 1
    assert status["writable_primaries"] == 1
    new_primary = await assert_rows_kept(pg_pair, status, rows)
    conn = await asyncpg.connect(new_primary.dsn, timeout=5)
    try:
        await conn.execute("INSERT INTO chaos_rows VALUES ('written-to-new-primary')")
    finally:
        await conn.close()


# --------------------------------------------------------------------------- 8


async def test_required_step_failing_leaves_failed_and_alertable(
    pg_pair: PgPair,
    demo_apps: DemoApps,
    daemon_factory: Factory,
    fault_proxy: ProxyFactory,
    tmp_path: Path,
) -> None:
    """Scenario 8: a required step keeps failing — the standby app's maintenance-off
    call goes through a proxy that resets every connection → after its retries the
    sequence stops: state failed, later steps untouched, and alertable
    (watchdogd_failovers_total{outcome="failed"} 1, watchdogd_state{state="failed"} 1)."""
    proxy = await fault_proxy(demo_apps.standby.port)
    proxy.set_mode(REFUSE)
    traffic = tmp_path / "traffic.log"
    cfg = lab_config(pg_pair, tmp_path, demo_apps, traffic_log=traffic)
    step = cfg["failover"]["steps"][3]
    assert step["name"] == "standby_maintenance_off"
    step.update(
        url=f"http://127.0.0.1:{proxy.port}/maintenance",
        retries=2,
        retry_delay="100ms",
        timeout="1s",
    )
    d = await started(daemon_factory(cfg))
    rows = await commit_rows(pg_pair, "failing")

    pg_pair.primary.kill()
    status = await d.wait_state("failed", within=20)

    assert "standby_maintenance_off" in status["reason"]
    tries = [
        r
        for r in d.journal()
        if r["type"] == "step_started" and r["step"] == "standby_maintenance_off"
    ]
    assert len(tries) == 3 and proxy.accepted >= 3
    # Later steps untouched: never journaled, never run; the standby app never reached.
    assert "switch_traffic" not in {r.get("step") for r in d.journal()}
    assert not traffic.exists()
    assert demo_apps.standby.maintenance
    assert not demo_apps.standby.calls_to("DELETE", "/maintenance")
    assert finished_steps(d) == FIVE[:4]
    # The promotion before the failing step happened, once; the roles reflect it.
    assert promotions(pg_pair) == 1
    assert status["roles"] == FAILED_OVER
    assert status["last_failover"]["outcome"] == "failed"
    metrics = await d.metrics()
    assert (
        sample(metrics, "watchdogd_failovers_total", outcome="failed", trigger="automatic") == 1.0
    )
    assert sample(metrics, "watchdogd_failovers_total", outcome="completed") == 0.0
    assert sample(metrics, "watchdogd_state", state="failed") == 1.0
    assert sample(metrics, "watchdogd_state", state="failed_over") == 0.0
    assert [e["step"] for e in events(d, "step_failed")] == ["standby_maintenance_off"]
    await assert_rows_kept(pg_pair, status, rows)
    await asyncio.sleep(1.0)  # and it stays failed: no new attempt without an operator
    assert (await d.status())["state"] == "failed"
    assert len(started_failovers(d)) == 1 and promotions(pg_pair) == 1
    assert (await read_rows(pg_pair.standby.dsn)) >= rows
