"""Issue 14: ``watchdogctl events --follow --json`` (the installed client, as a
subprocess) shows a real failover as it happens: the daemon as a process, a real
PostgreSQL primary + streaming standby, the app stand-ins, a real kill."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.e2e.test_failover import FIVE
from tests.support import need, timing, which
from tests.support.apps import DemoApps
from tests.support.daemon import DaemonProcess, lab_config
from watchdogd.demo.lab import PgPair

Factory = Callable[..., DaemonProcess]


async def read_until(
    stdout: asyncio.StreamReader,
    done: Callable[[dict[str, Any]], bool],
    within: float,
    after: int = 0,
) -> list[dict[str, Any]]:
    """JSON lines of events numbered after ``after`` until one satisfies ``done``."""
    lines: list[dict[str, Any]] = []
    async with asyncio.timeout(timing.within(within)):
        while True:
            raw = await stdout.readline()
            assert raw, f"the stream ended early after {[e.get('name') for e in lines]}"
            event = json.loads(raw)
            if event["seq"] <= after:
                continue
            lines.append(event)
            if done(event):
                return lines


def first(events: list[dict[str, Any]], name: str, **facts: Any) -> int:
    for i, e in enumerate(events):
        if e["name"] == name and all(e["facts"].get(k) == v for k, v in facts.items()):
            return i
    raise AssertionError(f"no {name} {facts} in {[e['name'] for e in events]}")


async def test_events_follow_shows_a_real_failover_as_it_happens(
    pg_pair: PgPair, demo_apps: DemoApps, daemon_factory: Factory, tmp_path: Path
) -> None:
    cfg = lab_config(
        pg_pair, tmp_path, demo_apps, interval="300ms", timeout="200ms", threshold="1500ms"
    )
    d = daemon_factory(cfg)
    await d.start()
    await d.wait_state("watching")
    exe = need("watchdogctl", which("watchdogctl", str(Path(sys.executable).parent)))
    # Everything up to now is old news; the client starts with the ring (so nothing
    # between its start and its stream is lost) and the test skips what is older.
    before = (await d.call("events", n=0))["result"]["seq"]
    proc = await asyncio.create_subprocess_exec(
        exe, "--socket", d.socket, "events", "--follow", "--json", "-n", "100",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=dict(os.environ),
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    try:
        # The client is connected once a harmless command's event reaches it.
        reply = await d.call("pause", reason="events e2e: am I following?")
        assert reply["ok"], reply
        (paused,) = await read_until(proc.stdout, lambda e: e["name"] == "paused", 15, before)
        assert paused["facts"]["reason"] == "events e2e: am I following?"
        assert (await d.call("resume"))["ok"]
        await read_until(proc.stdout, lambda e: e["name"] == "resumed", 10, before)

        pg_pair.primary.kill()
        killed = time.time()
        events = await read_until(
            proc.stdout,
            lambda e: e["name"] == "state_changed" and e["facts"]["state"] == "failed_over",
            30,
        )
        shown_at = time.time()
        names = [e["name"] for e in events]
        # In the order they happened, numbered without gaps (nothing dropped).
        seqs = [e["seq"] for e in events]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
        failing = first(events, "probe_observed", target="main", probe="database", ok=False)
        down = first(events, "primary_down")
        started = first(events, "failover_started")
        steps = [
            (e["name"], e["facts"]["step"])
            for e in events
            if e["name"] in ("step_started", "step_completed")
        ]
        assert steps == [(kind, s) for s in FIVE for kind in ("step_started", "step_completed")]
        first_step = first(events, "step_started", step=FIVE[0])
        last_step = first(events, "step_completed", step=FIVE[-1])
        completed = first(events, "failover_completed")
        failed_over = len(events) - 1
        assert failing < down < started < first_step < last_step < completed, names
        assert completed <= failed_over
        assert events[down]["level"] == "warning"
        assert events[completed]["facts"]["failover_id"] == events[started]["facts"]["failover_id"]
        # Each came as it happened: stamped after the kill, and printed within a few
        # seconds of it (threshold 1.5 s + the steps), not at the end of a batch.
        assert all(e["at"] >= killed - 1 for e in events[failing:])
        assert shown_at - killed < timing.within(15), shown_at - killed

        proc.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(proc.wait(), 10)
        err = (await proc.stderr.read()).decode()
        assert code == 0 and err == "", (code, err)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    status = await d.status()
    assert status["state"] == "failed_over"
