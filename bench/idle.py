"""Idle-cost benchmark: what watchdogd costs while nothing happens, and how it grows.

Runs the daemon as a real process (``python -m watchdogd.cli run``) for
``--seconds`` (default 60, after a ``--warmup`` of 5 s) at a ``--interval`` of 1 s
in two configurations, and reads its own /proc/PID/stat (CPU) and /proc/PID/status
(VmRSS, VmHWM):

1. **one pair**: a real PostgreSQL primary + streaming standby and one app stand-in
   per node: 4 probes per cycle (2 database, 2 app), the normal deployment.
2. **50 nodes' worth**: the same pair plus 96 witness probes, each an HTTP GET to
   its own local listener (its own port, so its own keep-alive connection): 100
   probes per cycle, i.e. 50 nodes x (database + app). One daemon watches one pair,
   so this is not how 25 pairs would be watched (that is 25 daemons, each costing
   row 1); it loads one daemon's event loop with 50 nodes' worth of probing to show
   how the per-cycle cost grows with probes. An HTTP probe is a little cheaper than
   a database probe (one asyncpg round trip), so read row 2 as a slight underestimate
   of 50 real nodes.

Jitter: the daemon exports ``watchdogd_probe_cycle_timestamp_seconds`` (wall time a
cycle *completed*) and a per-probe histogram whose count is the cycle number. The
bench scrapes /metrics once per interval, half an interval after the cycle's phase,
and reports how late each cycle completed against the schedule
``t0 + n * interval`` (t0: the earliest completion seen, so it includes the probes'
own latency variation). The scrapes cost the daemon CPU too; that cost is measured
afterwards (20 back-to-back scrapes) and reported, and the CPU figure is given both
with and without it.

    .venv/bin/python bench/idle.py [--seconds 60] [--warmup 5] [--interval 1s] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from watchdogd.core.units import format_duration, parse_duration
from watchdogd.demo.app import DemoApp
from watchdogd.demo.lab import PgPair, find_pg_bin, free_port, lab_root
from watchdogd.demo.run import NO_POSTGRES

CLK_TCK = os.sysconf("SC_CLK_TCK")
WITNESSES = 96
GOAL_RSS_MB = 60.0
GOAL_CPU_PCT = 1.0


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def cpu_seconds(pid: int) -> float:
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rfind(")") + 2 :].split()
    # utime and stime are fields 14 and 15 of stat; 3 is the first after the name.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


class Witnesses:
    """``n`` local HTTP endpoints answering the witness contract, one port each."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.urls: list[str] = []
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        async def primary(request: web.Request) -> web.Response:
            return web.json_response({"primary_up": True})

        app = web.Application()
        app.add_routes([web.get("/primary", primary)])
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        for _ in range(self.n):
            await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.urls = [f"http://127.0.0.1:{a[1]}/primary" for a in self._runner.addresses]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def daemon_config(
    pair: PgPair, apps: list[DemoApp], tmp: Path, interval: float, witnesses: list[str]
) -> dict[str, Any]:
    return {
        "cluster": "idle",
        "primary": {
            "name": "site-a",
            "database": {"engine": "postgres", "dsn": pair.primary.dsn},
            "app": {"health_url": f"{apps[0].url}/health"},
        },
        "standby": {
            "name": "site-b",
            "database": {"engine": "postgres", "dsn": pair.standby.dsn},
            "app": {"health_url": f"{apps[1].url}/health"},
        },
        "probe": {"interval": format_duration(interval), "timeout": format_duration(interval / 2)},
        "failover": {
            "mode": "automatic",
            "outage_threshold": format_duration(3 * interval),
            "steps": [
                {"name": "stop_replication", "action": "stop_replication"},
                {"name": "promote", "action": "promote"},
            ],
        },
        "witnesses": [{"name": f"node{i + 3}", "url": url} for i, url in enumerate(witnesses)],
        "metrics": {"listen": f"127.0.0.1:{free_port()}"},
        "control": {"socket": str(tmp / "run" / "control.sock")},
        "log": {"format": "json", "level": "info"},
        "state_dir": str(tmp / "state"),
    }


async def scrape(session: aiohttp.ClientSession, url: str) -> tuple[float, int] | None:
    """(last cycle completion wall time, cycles so far) from one /metrics scrape."""
    async with session.get(url) as resp:
        text = await resp.text()
    stamp: float | None = None
    count: int | None = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "watchdogd_probe_cycle_timestamp_seconds":
                stamp = sample.value
            elif (
                sample.name == "watchdogd_probe_duration_seconds_count"
                and sample.labels.get("node") == "site-a"
                and sample.labels.get("probe") == "database"
            ):
                count = int(sample.value)
    if stamp is None or count is None or stamp == 0:
        return None
    return stamp, count


def start_daemon(config: Path, log: Path, venv: str | None = None) -> subprocess.Popen[bytes]:
    # --venv: the daemon as deployed (`pip install .`, no test extras), not this venv's.
    cmd = [f"{venv}/bin/watchdogd"] if venv else [sys.executable, "-m", "watchdogd.cli"]
    with log.open("wb") as out:
        return subprocess.Popen(
            [*cmd, "run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


async def measure(
    name: str, probes: int, cfg: dict[str, Any], tmp: Path, args: argparse.Namespace
) -> dict[str, Any]:
    path = tmp / f"{cfg['cluster']}-{probes}.yml"
    path.write_text(yaml.safe_dump(cfg))
    log = tmp / f"watchdogd-{probes}.log"
    proc = start_daemon(path, log, args.venv)
    url = "http://{}/metrics".format(cfg["metrics"]["listen"])
    interval = args.interval
    try:
        async with aiohttp.ClientSession() as session:
            first: tuple[float, int] | None = None
            deadline = time.monotonic() + 20
            while first is None:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{name}: the daemon did not start: {log.read_text()[-500:]}"
                    )
                with contextlib.suppress(aiohttp.ClientError):
                    first = await scrape(session, url)
                await asyncio.sleep(0.1)
            await asyncio.sleep(args.warmup)
            cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
            samples: dict[int, float] = {}
            rss: list[float] = []
            # Scrape half an interval after the cycles complete, on an absolute schedule.
            phase = first[0] + interval / 2
            n = int((time.time() - phase) / interval) + 1
            while time.monotonic() - t0 < args.seconds:
                await asyncio.sleep(max(0.0, phase + n * interval - time.time()))
                n += 1
                got = await scrape(session, url)
                if got is not None:
                    samples[got[1]] = got[0]
                rss.append(memory_mb(proc.pid)[0])
            window = time.monotonic() - t0
            cpu = cpu_seconds(proc.pid) - cpu0
            scrapes = len(rss)  # one scrape per loop turn
            rss_end, hwm = memory_mb(proc.pid)
            # The cost of one scrape, to separate the measurement from the idle cost.
            c0 = cpu_seconds(proc.pid)
            for _ in range(20):
                await scrape(session, url)
            per_scrape = (cpu_seconds(proc.pid) - c0) / 20
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    cycles = sorted(samples)
    offsets = [samples[c] - c * interval for c in cycles]
    base = min(offsets) if offsets else 0.0
    late_ms = [(o - base) * 1000 for o in offsets]
    expected = int(window / interval)
    return {
        "config": name,
        "probes_per_cycle": probes,
        "window_seconds": window,
        "rss_mb_end": rss_end,
        "rss_mb_max_sampled": max(rss),
        "rss_mb_peak_hwm": hwm,
        "cpu_seconds": cpu,
        "cpu_percent": 100 * cpu / window,
        "scrapes": scrapes,
        "cpu_seconds_per_scrape": per_scrape,
        "cpu_percent_without_scrapes": 100 * max(0.0, cpu - scrapes * per_scrape) / window,
        "cycles_seen": len(cycles),
        "cycles_expected": expected,
        "cycles_done": (cycles[-1] - cycles[0] + 1) if cycles else 0,
        "lateness_ms_p50": percentile(late_ms, 50),
        "lateness_ms_p99": percentile(late_ms, 99),
        "lateness_ms_max": max(late_ms) if late_ms else float("nan"),
    }


async def run(args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    pair = PgPair.create(tmp / "pg")
    apps = [DemoApp("site-a", pair.primary.dsn), DemoApp("site-b", pair.standby.dsn)]
    witnesses = Witnesses(WITNESSES)
    results = []
    try:
        for app in apps:
            await app.start()
        await witnesses.start()
        configs = [
            ("one pair", 4, []),
            (f"50 nodes' worth (pair + {WITNESSES} HTTP)", 4 + WITNESSES, witnesses.urls),
        ]
        if args.postgres_only:  # issue 13: database probes only (no app, no HTTP step)
            configs = [("PostgreSQL only (2 database probes)", 2, [])]
        for name, probes, urls in configs:
            cfg = daemon_config(pair, apps, tmp / f"d{probes}", args.interval, urls)
            if args.postgres_only:
                for role in ("primary", "standby"):
                    del cfg[role]["app"]
            (tmp / f"d{probes}").mkdir()
            print(f"measuring {name}: {args.seconds:g}s ...", file=sys.stderr, flush=True)
            results.append(await measure(name, probes, cfg, tmp / f"d{probes}", args))
    finally:
        for app in apps:
            await app.stop()
        await witnesses.stop()
        pair.destroy()
    return results


def table(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"watchdogd idle cost: {args.seconds:g}s window after {args.warmup:g}s warm-up, "
        f"interval {format_duration(args.interval)}, Python {sys.version.split()[0]}, "
        f"{os.cpu_count()} cores",
        "",
        f"{'configuration':<38}{'probes':>7}{'RSS MB':>8}{'peak':>7}{'CPU s':>8}"
        f"{'CPU %':>7}{'net %':>7}{'cycles':>9}{'late p50/p99/max ms':>22}",
    ]
    for r in results:
        late = f"{r['lateness_ms_p50']:.1f}/{r['lateness_ms_p99']:.1f}/{r['lateness_ms_max']:.1f}"
        lines.append(
            f"{r['config']:<38}{r['probes_per_cycle']:>7}{r['rss_mb_end']:>8.1f}"
            f"{r['rss_mb_peak_hwm']:>7.1f}{r['cpu_seconds']:>8.2f}{r['cpu_percent']:>7.2f}"
            f"{r['cpu_percent_without_scrapes']:>7.2f}"
            f"{r['cycles_seen']:>4}/{r['cycles_done']:<4}{late:>22}"
        )
    base = results[0]
    lines += [
        "",
        "CPU %: of one core over the window, including one /metrics scrape per interval "
        f"({base['cpu_seconds_per_scrape'] * 1000:.1f} ms CPU each for one pair, "
        f"{results[-1]['cpu_seconds_per_scrape'] * 1000:.1f} ms with 100 probes); "
        "net %: without them. cycles: seen/completed in the window. late: cycle completion "
        "against the schedule.",
        f"goal idle RSS <= {GOAL_RSS_MB:g} MB: {base['rss_mb_end']:.1f} MB "
        f"({'met' if base['rss_mb_end'] <= GOAL_RSS_MB else 'NOT met'}); "
        f"goal CPU <= {GOAL_CPU_PCT:g}% of a core: {base['cpu_percent']:.2f}% "
        f"({'met' if base['cpu_percent'] <= GOAL_CPU_PCT else 'NOT met'})",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--seconds", type=float, default=60.0, help="measurement window per config")
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--interval", default="1s")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    p.add_argument(
        "--postgres-only",
        action="store_true",
        help="measure one config: the pair's two database probes, no app, metrics on",
    )
    p.add_argument(
        "--venv", metavar="PATH", help="run PATH/bin/watchdogd (a runtime-only virtualenv)"
    )
    args = p.parse_args(argv)
    try:
        args.interval = parse_duration(args.interval)
    except ValueError as exc:
        p.error(f"--interval: {exc}")
    if args.seconds < 2 * args.interval:
        p.error("--seconds: must cover at least two intervals")
    if find_pg_bin() is None:
        print(NO_POSTGRES, file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="watchdogd-idle-", dir=lab_root()))
    tmp.chmod(0o755)  # the postgres user must reach the pair inside
    try:
        results = asyncio.run(run(args, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(table(results, args))
    if args.json:
        Path(args.json).write_text(
            json.dumps({"interval": args.interval, "results": results}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
