"""A failover interrupted by a shutdown and resumed by the next start, with the daemon
as a real process over a real PostgreSQL pair: SIGTERM during a step's retry delay ends
the process at once and leaves the journal resumable, and the restarted daemon does not
announce the same outage (primary_down) a second time."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from tests.support.daemon import DaemonProcess, lab_config
from tests.support.pg import eventually
from watchdogd.demo.lab import PgPair

Factory = Callable[..., DaemonProcess]


def named(d: DaemonProcess, event: str) -> list[dict[str, object]]:
    return [e for e in d.events() if e.get("event") == event]


async def test_sigterm_in_a_retry_delay_exits_at_once_and_the_restart_resumes_quietly(
    pg_pair: PgPair, daemon_factory: Factory, tmp_path: Path
) -> None:
    attempts = tmp_path / "attempts"
    cfg = lab_config(pg_pair, tmp_path, interval="300ms", timeout="200ms", threshold="1s")
    cfg["failover"]["steps"] = [
        {
            "name": "flaky_dns",
            "action": "command",
            "argv": ["sh", "-c", f"echo x >> {attempts}; echo 'no route' >&2; exit 1"],
            "retries": 3,
            "retry_delay": "30s",
        },
        {"name": "promote_standby", "action": "promote"},
    ]
    d = daemon_factory(cfg)
    await d.start()
    await d.wait_state("watching")
    pg_pair.primary.kill()
    await eventually(lambda: named(d, "step_retry"), within=15)

    t0 = time.monotonic()
    assert d.terminate(timeout=10) == 0
    assert time.monotonic() - t0 < 2.5, "SIGTERM waited out the 30s retry delay"

    journal = d.journal()
    assert not [r for r in journal if r["type"] == "failover_finished"]
    (flaky,) = [r for r in journal if r["type"] == "step_finished"]
    assert flaky["step"] == "flaky_dns" and flaky["outcome"] == "pending_retry"
    assert "attempt 1 failed" in flaky["error"] and "retry delay" in flaky["error"]
    assert named(d, "failover_interrupted")
    assert len(named(d, "primary_down")) == 1
    assert pg_pair.standby.is_in_recovery()

    d2 = daemon_factory(cfg)  # same log file: events() reads both runs
    await d2.start()
    await eventually(
        lambda: [
            r
            for r in d2.journal()
            if r["type"] == "step_started" and r["step"] == "flaky_dns" and r["attempt"] == 2
        ],
        within=10,
    )
    assert named(d2, "failover_resumed")
    # The resumed failover is still retrying (30s) while the detector sees the same
    # primary down past the threshold again: recorded, not announced.
    await eventually(lambda: named(d2, "primary_still_down"), within=10)
    assert len(named(d2, "primary_down")) == 1
    status = await d2.status()
    assert status["state"] == "failing_over"
    assert len([r for r in d2.journal() if r["type"] == "failover_started"]) == 1
    assert pg_pair.standby.is_in_recovery()
