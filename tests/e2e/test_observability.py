"""Issue 4 end to end: metrics scraped over HTTP during a real failover, sd_notify on a
datagram socket of the test's, webhooks received in order, a dead webhook costing nothing."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tests.support import bound_socket, port_of
from tests.support.apps import DemoApps
from tests.support.daemon import DaemonProcess, lab_config
from tests.support.pg import eventually
from watchdogd.demo.lab import PgPair

Factory = Callable[..., DaemonProcess]


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float | None:
    want = frozenset({"cluster": "orders", **labels}.items())
    return samples(text).get((name, want))


def current_state(text: str) -> str | None:
    for (name, labels), v in samples(text).items():
        if name == "watchdogd_state" and v == 1:
            return dict(labels)["state"]
    return None


async def test_metrics_follow_a_real_failover(
    pg_pair: PgPair, demo_apps: DemoApps, daemon_factory: Factory, tmp_path: Path
) -> None:
    cfg = lab_config(
        pg_pair, tmp_path, demo_apps, interval="300ms", timeout="200ms", threshold="1500ms"
    )
    # a visible failing_over phase, and the fence for the split brain later
    cfg["failover"]["steps"].insert(
        3, {"name": "settle", "action": "command", "argv": ["sleep", "1"], "idempotent": True}
    )
    cfg["failover"]["fence_steps"] = [{"name": "fence_old_primary", "action": "fence"}]
    d = daemon_factory(cfg)
    await d.start()
    await d.wait_state("watching")

    # lag > 0 while replay is paused and the primary writes
    pg_pair.pause_replay()
    pg_pair.primary.execute("CREATE TABLE pad AS SELECT g FROM generate_series(1, 20000) g")

    async def lagging() -> bool:
        v = value(await d.metrics(), "watchdogd_replication_lag_bytes", standby="failover")
        return v is not None and v > 0

    await eventually(lagging, within=5)
    pg_pair.resume_replay()
    pg_pair.wait_replayed()
    # A scrape that reads watching: on a busy machine a 200 ms probe times out now and
    # then, and a scrape in such a moment reads suspect before any fault.
    text = ""

    async def watching() -> bool:
        nonlocal text
        text = await d.metrics()
        return current_state(text) == "watching"

    await eventually(watching, within=10)
    assert value(text, "watchdogd_standby_streaming", standby="failover") == 1
    assert value(text, "watchdogd_writable_primaries") == 1
    assert value(text, "watchdogd_automatic_failover_armed") == 1
    assert value(text, "watchdogd_probe_success", node="main", probe="database") == 1

    # The state before the kill comes from the scrape above: a crash is noticed at once
    # (the closed connection wakes the cycle), so the first scrape after the kill may
    # already read suspect.
    before = current_state(text)
    seen = [before] if before else []
    pg_pair.primary.kill()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        text = await d.metrics()
        state = current_state(text)
        if state and (not seen or seen[-1] != state):
            seen.append(state)
        if state == "failed_over":
            break
        await asyncio.sleep(0.05)
    assert seen == ["watching", "suspect", "failing_over", "failed_over"], seen
    assert value(text, "watchdogd_probe_success", node="main", probe="database") == 0
    assert (value(text, "watchdogd_probe_failures_total", node="main", probe="database") or 0) >= 1
    assert value(text, "watchdogd_failovers_total", trigger="automatic", outcome="completed") == 1
    assert value(text, "watchdogd_automatic_failover_armed") == 0
    assert (value(text, "watchdogd_last_failover_timestamp_seconds") or 0) > time.time() - 60
    for step in ("stop_replication", "promote_standby", "settle", "switch_traffic"):
        count = value(
            text, "watchdogd_failover_step_duration_seconds_count", step=step, outcome="ok"
        )
        assert count == 1, step
    settle = value(
        text, "watchdogd_failover_step_duration_seconds_sum", step="settle", outcome="ok"
    )
    assert settle is not None and 1.0 <= settle < 3.0

    # the old primary comes back writable: split brain, then fenced
    pg_pair.primary.start()

    async def split() -> bool:
        return value(await d.metrics(), "watchdogd_writable_primaries") == 2

    await eventually(split, within=10, interval=0.02)

    async def fenced() -> bool:
        t = await d.metrics()
        return value(t, "watchdogd_writable_primaries") == 1

    await eventually(fenced, within=10)
    assert pg_pair.primary.execute("SHOW default_transaction_read_only").strip() == "on"
    events = [e["event"] for e in d.events()]
    assert "split_brain" in events
    status = await d.status()
    assert status["roles"]["primary"] == "failover"  # no failback


async def test_sd_notify_ready_watchdog_stopping(
    pg_pair: PgPair, daemon_factory: Factory, tmp_path: Path
) -> None:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    cfg = lab_config(pg_pair, tmp_path, interval="300ms", timeout="200ms")
    d = daemon_factory(cfg, env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "2000000"})
    await d.start()
    await asyncio.sleep(1.0)
    assert d.terminate() == 0
    messages = []
    while True:
        try:
            messages.append(sock.recv(4096).decode())
        except BlockingIOError:
            break
    sock.close()
    lines = [line for m in messages for line in m.splitlines()]
    assert "READY=1" in lines
    assert lines.count("WATCHDOG=1") >= 3
    assert "STOPPING=1" in lines
    assert lines.index("READY=1") < lines.index("STOPPING=1")
    assert any(x.startswith("STATUS=watching") for x in lines)


async def start_receiver(fail_first: int = 0) -> tuple[web.AppRunner, list[dict[str, Any]], int]:
    received: list[dict[str, Any]] = []
    failures = {"left": fail_first}

    async def hook(request: web.Request) -> web.Response:
        if failures["left"] > 0:
            failures["left"] -= 1
            return web.Response(status=503)
        received.append(json.loads(await request.text()))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = bound_socket()  # the site listens on it: the port is never free meanwhile
    await web.SockSite(runner, sock).start()
    return runner, received, port_of(sock)


async def test_webhooks_in_order_and_a_dead_one_costs_nothing(
    pg_pair: PgPair, daemon_factory: Factory, tmp_path: Path, closed_port: int
) -> None:
    runner, received, port = await start_receiver(fail_first=1)
    dead = closed_port  # nobody listens here
    cfg = lab_config(pg_pair, tmp_path, interval="300ms", timeout="200ms", threshold="1s")
    cfg["notify"] = {
        "webhooks": [
            {"url": f"http://127.0.0.1:{dead}/hook", "timeout": "2s"},
            {"url": f"http://127.0.0.1:{port}/hook", "headers": {"X-Token": "${HOOK_TOKEN}"}},
        ]
    }
    try:
        d = daemon_factory(cfg, env={"HOOK_TOKEN": "tok-hook-secret"})
        await d.start()
        await d.wait_state("watching")
        t0 = time.monotonic()
        pg_pair.primary.kill()
        await d.wait_state("failed_over", within=15)
        took = time.monotonic() - t0
        # threshold 1 s + a few cycles + steps; a dead webhook adds nothing
        assert took < 5, took

        async def all_arrived() -> bool:
            return any(r["event"] == "failover_completed" for r in received)

        await eventually(all_arrived, within=10)
        events = [r["event"] for r in received]
        assert events == ["primary_down", "failover_started", "failover_completed"], events
        assert all(r["cluster"] == "orders" and "ts" in r for r in received)
        assert received[1]["failover_id"] == received[2]["failover_id"]
        logs = d.logs()
        assert "tok-hook-secret" not in logs
        assert "webhook" in logs  # the dead receiver is a logged warning, nothing more
    finally:
        await runner.cleanup()
