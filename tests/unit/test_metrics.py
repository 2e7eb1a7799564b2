"""Metrics: values move as the daemon reports, the exposition is valid, the HTTP endpoint
serves it, and the dashboard only queries metrics that exist."""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from tests.support import need, which
from watchdogd import __version__
from watchdogd.metrics import (
    OUTCOMES,
    STATES,
    TRIGGERS,
    Handler,
    Metrics,
    MetricsServerError,
    bound_port,
    make_app,
    start_http,
    stop_http,
)

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "config" / "grafana-dashboard.json"


def value(m: Metrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, {"cluster": m.cluster, **labels})


def exercised() -> Metrics:
    """A Metrics with every method called once, so every series exists."""
    m = Metrics("c1")
    m.observe_probe("pg1", "database", True, 0.004)
    m.observe_probe("pg1", "database", False, 0.7)
    m.set_primary_down(12.5)
    m.set_outage_threshold(30)
    m.set_lag("pg2", 4096, 0.25)
    m.set_lag_limits(16_000_000, 10.0)
    m.set_streaming("pg2", True)
    m.set_state("suspect")
    m.set_armed(True)
    m.set_in_progress(False)
    m.set_partition(False)
    m.failover_finished("automatic", "completed", 1_700_000_000.0)
    m.step_finished("promote", "ok", 0.42)
    m.set_writable_primaries(1)
    m.set_split_brain(False)
    m.cycle_completed(1_700_000_001.0)
    m.config_reloaded(True, 1_700_000_002.0)
    return m


def test_initial_values_let_rate_start_from_zero() -> None:
    m = Metrics("c1", process_metrics=False)
    assert value(m, "watchdogd_build_info", version=__version__) == 1
    for trigger in TRIGGERS:
        for outcome in OUTCOMES:
            got = value(m, "watchdogd_failovers_total", trigger=trigger, outcome=outcome)
            assert got == 0, (trigger, outcome)
    assert [value(m, "watchdogd_state", state=s) for s in STATES] == [0] * len(STATES)
    assert value(m, "watchdogd_failover_in_progress") == 0
    assert value(m, "watchdogd_writable_primaries") == 0


def test_own_registry_per_instance() -> None:
    a, b = Metrics("a"), Metrics("b")
    a.set_primary_down(5)
    assert a.registry is not b.registry
    assert value(b, "watchdogd_primary_down_seconds") == 0
    reg = CollectorRegistry()
    assert Metrics("x", reg).registry is reg


def test_probe_observations() -> None:
    m = Metrics("c1")
    labels = {"node": "pg1", "probe": "database"}
    m.observe_probe("pg1", "database", True, 0.003)
    assert value(m, "watchdogd_probe_success", **labels) == 1
    # The failure counter exists from the first observation so increase() sees the first one.
    assert value(m, "watchdogd_probe_failures_total", **labels) == 0
    m.observe_probe("pg1", "database", False, 0.3)
    m.observe_probe("pg1", "database", False, 6.0)
    assert value(m, "watchdogd_probe_success", **labels) == 0
    assert value(m, "watchdogd_probe_failures_total", **labels) == 2
    assert value(m, "watchdogd_probe_duration_seconds_count", **labels) == 3
    assert value(m, "watchdogd_probe_duration_seconds_bucket", le="0.005", **labels) == 1
    assert value(m, "watchdogd_probe_duration_seconds_bucket", le="5.0", **labels) == 2
    assert value(m, "watchdogd_probe_duration_seconds_bucket", le="+Inf", **labels) == 3
    assert value(m, "watchdogd_probe_duration_seconds_sum", **labels) == pytest.approx(6.303)


def test_state_is_one_hot() -> None:
    m = Metrics("c1")
    m.set_state("failing_over")
    m.set_state("failed_over")
    assert {s: value(m, "watchdogd_state", state=s) for s in STATES} == {
        s: (1.0 if s == "failed_over" else 0.0) for s in STATES
    }
    with pytest.raises(ValueError, match=r"unknown state 'promoted'; known: watching"):
        m.set_state("promoted")
    assert value(m, "watchdogd_state", state="failed_over") == 1


def test_lag_unknown_is_nan_not_stale() -> None:
    m = Metrics("c1")
    m.set_lag("pg2", 1000, 1.5)
    assert value(m, "watchdogd_replication_lag_bytes", standby="pg2") == 1000
    assert value(m, "watchdogd_replication_lag_seconds", standby="pg2") == 1.5
    m.set_lag("pg2", None, None)
    assert math.isnan(value(m, "watchdogd_replication_lag_bytes", standby="pg2") or 0)
    assert math.isnan(value(m, "watchdogd_replication_lag_seconds", standby="pg2") or 0)
    m.set_streaming("pg2", True)
    assert value(m, "watchdogd_standby_streaming", standby="pg2") == 1
    m.set_streaming("pg2", False)
    assert value(m, "watchdogd_standby_streaming", standby="pg2") == 0
    m.set_streaming("pg2", None)
    assert math.isnan(value(m, "watchdogd_standby_streaming", standby="pg2") or 0)


def test_lag_limits_can_be_unset() -> None:
    m = Metrics("c1")
    m.set_lag_limits(16_000_000, 30.0)
    assert value(m, "watchdogd_failover_max_lag_bytes") == 16_000_000
    assert value(m, "watchdogd_failover_max_lag_seconds") == 30
    m.set_lag_limits(1_000, None)
    assert value(m, "watchdogd_failover_max_lag_bytes") == 1_000
    assert value(m, "watchdogd_failover_max_lag_seconds") is None


def test_failover_outcomes_and_steps() -> None:
    m = Metrics("c1")
    m.set_in_progress(True)
    assert value(m, "watchdogd_failover_in_progress") == 1
    m.failover_finished("automatic", "failed", 100.0)
    assert value(m, "watchdogd_failovers_total", trigger="automatic", outcome="failed") == 1
    # Only a completed failover moves the "last failover" time.
    assert value(m, "watchdogd_last_failover_timestamp_seconds") == 0
    m.failover_finished("manual", "completed", 200.0)
    assert value(m, "watchdogd_failovers_total", trigger="manual", outcome="completed") == 1
    assert value(m, "watchdogd_last_failover_timestamp_seconds") == 200
    assert value(m, "watchdogd_failovers_total", trigger="automatic", outcome="completed") == 0
    with pytest.raises(ValueError, match="unknown failover trigger 'cron'"):
        m.failover_finished("cron", "completed", 1.0)
    with pytest.raises(ValueError, match="unknown failover outcome 'ok'"):
        m.failover_finished("manual", "ok", 1.0)

    m.step_finished("promote", "ok", 0.02)
    m.step_finished("promote", "ok", 200.0)
    labels = {"step": "promote", "outcome": "ok"}
    assert value(m, "watchdogd_failover_step_duration_seconds_count", **labels) == 2
    assert value(m, "watchdogd_failover_step_duration_seconds_bucket", le="0.025", **labels) == 1
    assert value(m, "watchdogd_failover_step_duration_seconds_bucket", le="300.0", **labels) == 2


def test_flags_and_gauges() -> None:
    m = Metrics("c1")
    m.set_primary_down(3.5)
    m.set_outage_threshold(30)
    m.set_armed(True)
    m.set_partition(True)
    m.set_split_brain(True)
    m.set_writable_primaries(2)
    m.cycle_completed(1234.5)
    got = {
        n: value(m, n)
        for n in (
            "watchdogd_primary_down_seconds",
            "watchdogd_outage_threshold_seconds",
            "watchdogd_automatic_failover_armed",
            "watchdogd_partition_suspected",
            "watchdogd_split_brain",
            "watchdogd_writable_primaries",
            "watchdogd_probe_cycle_timestamp_seconds",
        )
    }
    assert list(got.values()) == [3.5, 30, 1, 1, 1, 2, 1234.5]
    m.set_armed(False)
    m.set_primary_down(0)
    assert value(m, "watchdogd_automatic_failover_armed") == 0
    assert value(m, "watchdogd_primary_down_seconds") == 0


def test_journal_writable_follows_the_last_write() -> None:
    m = Metrics("c1")
    assert value(m, "watchdogd_journal_writable") == 1
    m.set_journal_writable(False)
    assert value(m, "watchdogd_journal_writable") == 0
    m.set_journal_writable(True)
    assert value(m, "watchdogd_journal_writable") == 1


def test_config_reload_keeps_last_success_time() -> None:
    m = Metrics("c1")
    m.config_reloaded(True, 10.0)
    m.config_reloaded(False, 20.0)
    assert value(m, "watchdogd_config_reload_success") == 0
    assert value(m, "watchdogd_config_last_reload_timestamp_seconds") == 10
    m.config_reloaded(True, 30.0)
    assert value(m, "watchdogd_config_reload_success") == 1
    assert value(m, "watchdogd_config_last_reload_timestamp_seconds") == 30


def test_exposition_passes_promtool_check_metrics() -> None:
    promtool = need("promtool (Debian package prometheus)", which("promtool"))
    text = exercised().exposition()
    proc = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, timeout=30
    )
    # promtool prints lint problems on stderr and exits 1 (3 for pure lint problems).
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()
    assert proc.stderr.decode().strip() == ""


async def test_http_endpoints_serve_metrics_and_health() -> None:
    m = exercised()
    health: dict[str, Any] = {"alive": True, "detail": "state=watching"}
    app = make_app(m, lambda: (health["alive"], health["detail"]))
    runner = await start_http(app, "127.0.0.1", 0)
    try:
        base = f"http://127.0.0.1:{bound_port(runner)}"
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{base}/metrics") as r:
                assert r.status == 200
                assert r.headers["Content-Type"].startswith("text/plain")
                body = await r.text()
            families = {f.name for f in text_string_to_metric_families(body)}
            assert {"watchdogd_state", "watchdogd_failovers", "watchdogd_build_info"} <= families
            assert 'watchdogd_state{cluster="c1",state="suspect"} 1.0' in body

            async with s.get(f"{base}/healthz") as r:
                assert (r.status, await r.text()) == (200, "ok state=watching\n")
            health.update(alive=False, detail="probe loop stalled\nfor 40s")
            async with s.get(f"{base}/healthz") as r:
                assert (r.status, await r.text()) == (503, "unhealthy probe loop stalled for 40s\n")
            async with s.get(f"{base}/nope") as r:
                assert r.status == 404
    finally:
        await stop_http(runner)


async def test_healthz_that_raises_reads_unhealthy() -> None:
    def broken() -> tuple[bool, str]:
        raise RuntimeError("secret detail")

    runner = await start_http(make_app(Metrics("c1"), broken), "127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{bound_port(runner)}/healthz") as r:
                assert r.status == 503
                assert await r.text() == "unhealthy health check raised RuntimeError\n"
    finally:
        await stop_http(runner)


async def test_extra_routes_are_served() -> None:
    from watchdogd.core import httpd as web

    async def status(request: web.Request) -> web.Response:
        return web.json_response({"state": "watching"})

    async def primary(request: web.Request) -> web.Response:
        return web.Response(text="pg1")

    routes: list[tuple[str, str, Handler]] = [
        web.get("/status", status),
        ("GET", "/primary", primary),
    ]
    app = make_app(Metrics("c1"), lambda: (True, ""), routes)
    runner = await start_http(app, "127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{bound_port(runner)}/status") as r:
                assert await r.json() == {"state": "watching"}
            async with s.get(f"http://127.0.0.1:{bound_port(runner)}/primary") as r:
                assert await r.text() == "pg1"
            async with s.get(f"http://127.0.0.1:{bound_port(runner)}/healthz") as r:
                assert await r.text() == "ok\n"
    finally:
        await stop_http(runner)


async def test_port_in_use_is_one_clear_line() -> None:
    first = await start_http(make_app(Metrics("a"), lambda: (True, "")), "127.0.0.1", 0)
    port = bound_port(first)
    try:
        with pytest.raises(MetricsServerError) as info:
            await start_http(make_app(Metrics("b"), lambda: (True, "")), "127.0.0.1", port)
        message = str(info.value)
        assert message.startswith(f"metrics.listen: cannot listen on 127.0.0.1:{port}: ")
        assert "\n" not in message
    finally:
        await stop_http(first)


# --------------------------------------------------------------------------- dashboard


def _exprs(node: Any) -> list[str]:
    found: list[str] = []
    if isinstance(node, dict):
        for key, v in node.items():
            if key in ("expr", "query", "definition") and isinstance(v, str):
                found.append(v)
            else:
                found.extend(_exprs(v))
    elif isinstance(node, list):
        for v in node:
            found.extend(_exprs(v))
    return found


def test_dashboard_queries_only_existing_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and dashboard["uid"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert "cluster" in variables

    exposition = exercised().exposition().decode()
    samples = {s.name for f in text_string_to_metric_families(exposition) for s in f.samples}
    exprs = _exprs(dashboard)
    used = {n for e in exprs for n in re.findall(r"\bwatchdogd_[a-z_]+", e)}
    assert used, "the dashboard queries no watchdogd metric"
    assert used - samples == set()

    wanted = {
        "watchdogd_state",
        "watchdogd_automatic_failover_armed",
        "watchdogd_primary_down_seconds",
        "watchdogd_replication_lag_bytes",
        "watchdogd_replication_lag_seconds",
        "watchdogd_probe_duration_seconds_bucket",
        "watchdogd_probe_success",
        "watchdogd_failovers_total",
        "watchdogd_failover_step_duration_seconds_bucket",
        "watchdogd_writable_primaries",
    }
    assert wanted - used == set()
    assert any("histogram_quantile" in e for e in exprs)

    panels = [p for p in dashboard["panels"] if p.get("type") != "row"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            # Every query is scoped to the selected cluster.
            assert 'cluster=~"$cluster"' in target["expr"], (panel["title"], target["expr"])


# --------------------------------------------------------------------------- issue 15


async def test_every_response_body_is_masked_with_the_current_secrets() -> None:
    from watchdogd.core import httpd as web
    from watchdogd.core.secrets import Secrets

    secrets = Secrets(["old-tok-1a2b"])
    echo = "Authorization: Bearer new/tok+3c4d (t=new%2Ftok%2B3c4d) old-tok-1a2b"

    async def primary(request: web.Request) -> web.Response:
        return web.json_response({"detail": echo})

    app = make_app(
        Metrics("c1"), lambda: (False, echo), [web.get("/primary", primary)], secrets=secrets
    )
    runner = await start_http(app, "127.0.0.1", 0)
    secrets.replace(["new/tok+3c4d"])  # a reload: the middleware sees the new secrets
    try:
        base = f"http://127.0.0.1:{bound_port(runner)}"
        async with aiohttp.ClientSession() as s:
            async with s.get(base + "/primary") as r:
                body = await r.text()
            async with s.get(base + "/healthz") as r:
                health = await r.text()
        assert "tok" not in body + health, body + health
        assert json.loads(body) == {"detail": "Authorization: Bearer *** (t=***) ***"}
        assert health == "unhealthy Authorization: Bearer *** (t=***) ***\n"
    finally:
        await stop_http(runner)


async def test_idle_connections_are_capped_and_shed() -> None:
    import asyncio

    runner = await start_http(
        make_app(Metrics("c1"), lambda: (True, "")),
        "127.0.0.1",
        0,
        max_connections=5,
        keepalive_timeout=1.0,
    )
    port = bound_port(runner)
    held = []
    try:
        for _ in range(30):
            held.append(await asyncio.open_connection("127.0.0.1", port))
        await asyncio.sleep(0.2)
        assert len(runner.connections) <= 5
        # A scrape still gets in: it sheds the oldest idle connection.
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{port}/metrics") as r:
                assert r.status == 200 and "watchdogd_build_info" in await r.text()
        # Idle connections are closed after the keep-alive timeout, not after an hour.
        ends = await asyncio.gather(
            *(asyncio.wait_for(reader.read(), 5) for reader, _ in held), return_exceptions=True
        )
        assert all(e == b"" or isinstance(e, ConnectionError) for e in ends), ends
        assert len(runner.connections) == 0
    finally:
        for _, writer in held:
            writer.close()
        await stop_http(runner)


def test_soft_descriptor_limit_is_raised_to_the_hard_one() -> None:
    import sys

    script = (
        "import resource\n"
        "from watchdogd.metrics import raise_fd_limit\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
        "before, after = raise_fd_limit()\n"
        "print(before, after, hard, resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    before, after, hard, now = map(int, out.stdout.split())
    assert before == 256 and after == now and now == (hard if hard != -1 else 1 << 20)
