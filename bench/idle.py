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
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from watchdogd.control import ControlUnavailable
from watchdogd.control import request as control_request
from watchdogd.core.memory import RELEASE_EVERY
from watchdogd.core.units import format_duration, parse_duration
from watchdogd.demo.app import DemoApp
from watchdogd.demo.lab import PgPair, find_pg_bin, free_port, lab_root
from watchdogd.demo.run import NO_POSTGRES

# The chaos tests' fault proxy, from the source tree (tests/ is not installed).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.proxy import BLACKHOLE, PASS, REFUSE, FaultProxy

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


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


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
        stop_process(proc)
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


# --------------------------------------------------------------------------- soak mode
#
# Months in minutes: the daemon (a real process) probes a real pair every
# ``--soak-interval`` (20 ms: 50x the default cadence, faster than probe.interval
# allows, so the child reschedules its own probe job after start), while the bench
# mixes in what a year brings: failing probes (a witness on a closed port, a witness
# answering 500 now and then, the primary's link reset or blackholed through a fault
# proxy, so the probing connection is dropped and reopened), the standby restarted,
# /metrics and /healthz scrapes, control requests (status, history, pause/resume), and
# reloads (control ``reload`` and SIGHUP, each rewriting the config so the primary's
# engine is rebuilt). RSS is sampled once a second with the cycle count; the slope is
# a least-squares fit over the samples after warm-up. The child dumps (SIGUSR1) its
# asyncio task and handle counts, live objects by type and, with ``--tracemalloc``, a
# tracemalloc snapshot: the bench prints what grew between the end of warm-up and the
# end (tracemalloc's own bookkeeping inflates RSS, so take the RSS slope from a run
# without it).

SOAK_GOAL_KB = 256.0
SOAK_GOAL_CYCLES = 100_000
SOAK_FRAMES = 12


def mallinfo_kb() -> dict[str, float]:
    """glibc's view of the C heap: bytes in use and free inside its arenas, in kB."""
    import ctypes

    class Mallinfo2(ctypes.Structure):
        _fields_ = [
            (name, ctypes.c_size_t)
            for name in (
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
            ).split()
        ]

    try:
        fn = ctypes.CDLL(None).mallinfo2
    except AttributeError:  # not glibc >= 2.33
        return {}
    fn.restype = Mallinfo2
    m = fn()
    return {"in_use": (m.uordblks + m.hblkhd) / 1024, "free": m.fordblks / 1024}


def fit(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope, NaN with fewer than three points."""
    return statistics.linear_regression(xs, ys).slope if len(xs) > 2 else float("nan")


def soak_child(config: str, interval: float, dump_dir: str, trace: bool) -> int:
    """The daemon as ``watchdogd run`` runs it, with a faster probe job and a dump hook."""
    if trace:
        tracemalloc.start(SOAK_FRAMES)
    import abc
    import gc
    import types as types_
    import weakref

    from watchdogd import config as configmod
    from watchdogd.daemon import Daemon
    from watchdogd.daemon.schedule import PROBE

    class SoakDaemon(Daemon):
        dumps = 0

        async def start(self) -> None:
            await super().start()
            assert self.scheduler is not None
            self.scheduler.reschedule(PROBE, interval)
            asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, self.dump)

        def dump(self) -> None:
            gc.collect()
            loop = asyncio.get_running_loop()
            objects = gc.get_objects()
            types = Counter(type(o).__qualname__ for o in objects)
            # What the weak references and bound builtins point at: the usual leakers.
            detail: Counter[str] = Counter()
            for o in objects:
                if isinstance(o, weakref.ref):
                    cb = getattr(o.__callback__, "__qualname__", o.__callback__)
                    detail[f"weakref to {type(o()).__qualname__} (callback {cb})"] += 1
                elif isinstance(o, types_.BuiltinMethodType):
                    owner = type(getattr(o, "__self__", None)).__qualname__
                    detail[f"builtin {o.__qualname__} of {owner}"] += 1
                elif isinstance(o, abc.ABCMeta):
                    _, cache, negative, _ = abc._get_dump(o)  # type: ignore[attr-defined]
                    for ref in (*cache, *negative):
                        detail[
                            f"ABC cache of {o.__qualname__}: {getattr(ref(), '__qualname__', None)}"
                        ] += 1
            del objects
            facts: dict[str, Any] = {
                "tasks": len(asyncio.all_tasks()),
                "timer_handles": len(getattr(loop, "_scheduled", ())),
                "ready_handles": len(getattr(loop, "_ready", ())),
                "objects": sum(types.values()),
                "types": dict(types),
                "detail": dict(detail),
                "traced_kb": tracemalloc.get_traced_memory()[0] / 1024 if trace else 0,
                "malloc_kb": mallinfo_kb(),
                "tracemalloc_overhead": tracemalloc.get_tracemalloc_memory() if trace else 0,
            }
            base = Path(dump_dir) / f"dump-{self.dumps}"
            if trace:
                tracemalloc.take_snapshot().dump(f"{base}.tracemalloc")
            Path(f"{base}.tmp").write_text(json.dumps(facts))
            os.replace(f"{base}.tmp", f"{base}.json")  # complete once it exists
            self.dumps += 1

    cfg = configmod.load(config)
    asyncio.run(SoakDaemon(cfg).run())
    return 0


def smaps(pid: int) -> dict[str, int]:
    """RSS in kB by mapping: a file's name, [heap], [stack], or [anon] for the rest."""
    out: Counter[str] = Counter()
    name = "[anon]"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(maxsplit=5)
        if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
            name = Path(head[5]).name if len(head) == 6 else "[anon]"
        elif head[0] == "Rss:":
            out[name] += int(head[1])
    return dict(out)


def smaps_growth(old: dict[str, int], new: dict[str, int]) -> list[tuple[str, int]]:
    grown = {k: new.get(k, 0) - old.get(k, 0) for k in set(old) | set(new)}
    return sorted(grown.items(), key=lambda kv: -abs(kv[1]))[:6]


def spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )


def tail(log: Path) -> str:
    return log.read_text(errors="replace")[-800:]


class Flaky:
    """A witness that answers 500 every ``every``-th request (an abstaining witness)."""

    def __init__(self, every: int = 7) -> None:
        self.every = every
        self.requests = 0
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        async def primary(request: web.Request) -> web.Response:
            self.requests += 1
            if self.requests % self.every == 0:
                return web.Response(status=500, text="flaky")
            return web.json_response({"primary_up": True})

        app = web.Application()
        app.add_routes([web.get("/primary", primary)])
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/primary"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def soak_config(
    pair: PgPair, apps: list[DemoApp], tmp: Path, proxy_port: int, witnesses: list[str], flip: int
) -> dict[str, Any]:
    # probe.interval 50 ms (the least the config takes; the child probes faster) and a
    # threshold no soak reaches: failing probes make the primary suspect, never failed over.
    cfg = daemon_config(pair, apps, tmp, 0.05, witnesses)
    cfg["cluster"] = "soak"
    # The app name alternates on each reload, so each reload rebuilds the primary's engine.
    cfg["primary"]["database"]["dsn"] = (
        f"postgresql://postgres@127.0.0.1:{proxy_port}/postgres?application_name=soak{flip % 2}"
    )
    cfg["probe"] = {"interval": "50ms", "timeout": "40ms", "recovery_successes": 2 + flip % 2}
    cfg["failover"]["outage_threshold"] = "1h"
    return cfg


class Soak:
    """Drives the workload against the child daemon and samples it."""

    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.flip = 0
        self.counts: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.smaps: list[dict[str, int]] = []

    async def control(self, sock: str, command: str, args: dict[str, Any] | None = None) -> None:
        try:
            reply = await control_request(sock, command, args, timeout=10)
        except ControlUnavailable as exc:
            self.errors[f"{command}: {exc}"] += 1
            return
        self.counts[command] += 1
        if not reply.get("ok"):
            self.errors[f"{command}: {reply.get('error')}"] += 1

    async def dump(self, proc: subprocess.Popen[bytes], dumps: Path, n: int) -> dict[str, Any]:
        self.smaps.append(smaps(proc.pid))
        proc.send_signal(signal.SIGUSR1)
        path = dumps / f"dump-{n}.json"
        deadline = time.monotonic() + 120
        while not path.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("soak: the daemon wrote no dump")
            await asyncio.sleep(0.1)
        facts: dict[str, Any] = json.loads(path.read_text())
        return facts

    async def run(self) -> dict[str, Any]:
        args, tmp = self.args, self.tmp
        pair = PgPair.create(tmp / "pg")
        apps = [DemoApp("site-a", pair.primary.dsn), DemoApp("site-b", pair.standby.dsn)]
        proxy = FaultProxy(pair.primary.port)
        flaky = Flaky()
        dumps = tmp / "dumps"
        dumps.mkdir()
        (tmp / "d").mkdir()
        proc: subprocess.Popen[bytes] | None = None
        try:
            for app in apps:
                await app.start()
            await proxy.start()
            await flaky.start()
            refused = f"http://127.0.0.1:{free_port()}/primary"  # nobody listens there
            witnesses = [flaky.url, refused]
            path = tmp / "soak.yml"

            def write_config() -> dict[str, Any]:
                cfg = soak_config(pair, apps, tmp / "d", proxy.port, witnesses, self.flip)
                path.write_text(yaml.safe_dump(cfg))
                return cfg

            cfg = write_config()
            log = tmp / "watchdogd-soak.log"
            argv = [sys.executable, __file__, "--soak-child", str(path)]
            argv += [
                "--soak-interval",
                format_duration(args.soak_interval),
                "--dump-dir",
                str(dumps),
            ]
            proc = spawn(argv + (["--tracemalloc"] if args.tracemalloc else []), log)
            return await self.drive(proc, cfg, pair, proxy, write_config, dumps, log)
        finally:
            if proc is not None:
                stop_process(proc)
            await proxy.stop()
            await flaky.stop()
            for app in apps:
                await app.stop()
            pair.destroy()

    async def drive(
        self,
        proc: subprocess.Popen[bytes],
        cfg: dict[str, Any],
        pair: PgPair,
        proxy: FaultProxy,
        write_config: Callable[[], dict[str, Any]],
        dumps: Path,
        log: Path,
    ) -> dict[str, Any]:
        args = self.args
        url = "http://{}/metrics".format(cfg["metrics"]["listen"])
        healthz = "http://{}/healthz".format(cfg["metrics"]["listen"])
        sock = cfg["control"]["socket"]
        samples: list[tuple[int, float]] = []  # (cycle, RSS kB) after warm-up
        restart: asyncio.Task[None] | None = None
        t_start = time.monotonic()
        # Bounded: a daemon slowed by --tracemalloc must not stall the workload.
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            cycles = 0
            warm_at: int | None = None
            before: dict[str, Any] = {}
            tick = 0
            t0 = 0.0
            while True:
                await asyncio.sleep(1.0)
                tick += 1
                if proc.poll() is not None:
                    raise RuntimeError(f"soak: the daemon exited: {tail(log)}")
                try:
                    got = await scrape(session, url)
                    async with session.get(healthz) as resp:
                        await resp.read()
                    self.counts["scrape"] += 1
                except (aiohttp.ClientError, TimeoutError) as exc:
                    if cycles:  # before the first answer the daemon is still starting
                        self.errors[f"scrape: {exc or type(exc).__name__}"] += 1
                    got = None
                if got is None:
                    if time.monotonic() - t_start > 60:
                        raise RuntimeError(f"soak: no cycles: {tail(log)}")
                    continue
                cycles = got[1]
                rss_kb = memory_mb(proc.pid)[0] * 1024
                if warm_at is None and cycles >= args.warmup_cycles:
                    await self.dump(proc, dumps, 0)
                    warm_at, t0 = cycles, time.monotonic()
                    print(f"soak: warm after {cycles} cycles, RSS {rss_kb:.0f} kB", file=sys.stderr)
                elif warm_at is not None:
                    samples.append((cycles, rss_kb))
                    if not before and cycles - warm_at >= args.cycles // 2:
                        # Objects and heap are compared from half-way, past one-time
                        # caches the first reloads and restarts fill.
                        before = await self.dump(proc, dumps, 1)
                    if tick % 30 == 0:
                        done = cycles - warm_at
                        print(
                            f"soak: {done}/{args.cycles} cycles after warm-up, RSS {rss_kb:.0f} kB",
                            file=sys.stderr,
                            flush=True,
                        )
                    if cycles - warm_at >= args.cycles:
                        break
                # The workload: one or two things a second, on a fixed rotation.
                await self.control(sock, "status")
                if tick % 2 == 0:
                    await self.control(sock, "history", {"n": 5})
                if tick % 10 == 5:
                    await self.control(sock, "pause", {"reason": "soak"})
                elif tick % 10 == 7:
                    await self.control(sock, "resume")
                phase = tick % 20
                if phase == 3:
                    proxy.set_mode(REFUSE)  # connection reset, reconnects refused
                    self.counts["refuse"] += 1
                elif phase == 13:
                    proxy.set_mode(BLACKHOLE)  # probes time out
                    self.counts["blackhole"] += 1
                elif phase in (4, 14):
                    proxy.set_mode(PASS)
                if tick % 60 == 30:
                    self.flip += 1
                    write_config()
                    await self.control(sock, "reload")
                elif tick % 60 == 50:
                    self.flip += 1
                    write_config()
                    proc.send_signal(signal.SIGHUP)
                    self.counts["sighup"] += 1
                if tick % 90 == 45 and (restart is None or restart.done()):
                    restart = asyncio.create_task(asyncio.to_thread(pair.standby.restart))
                    self.counts["standby restart"] += 1
            window = time.monotonic() - t0
            if restart is not None:
                await restart
            after = await self.dump(proc, dumps, 2)
        assert warm_at is not None
        return self.summarize(samples, warm_at, cycles, window, before, after, dumps)

    def summarize(
        self,
        samples: list[tuple[int, float]],
        warm_at: int,
        cycles: int,
        window: float,
        before: dict[str, Any],
        after: dict[str, Any],
        dumps: Path,
    ) -> dict[str, Any]:
        xs = [float(c - warm_at) for c, _ in samples]
        ys = [kb for _, kb in samples]
        slope = fit(xs, ys)
        # The daemon returns free heap pages every memory.RELEASE_EVERY seconds, so RSS
        # is a sawtooth: fit its peaks and its floors per window of that length too.
        n = int(RELEASE_EVERY)
        windows = [samples[i : i + n] for i in range(0, len(samples) - n + 1, n)]
        mids = [statistics.fmean(c - warm_at for c, _ in w) for w in windows]
        peak = fit(mids, [max(kb for _, kb in w) for w in windows])
        floor = fit(mids, [min(kb for _, kb in w) for w in windows])
        grown = {
            name: after["types"].get(name, 0) - before["types"].get(name, 0)
            for name in set(after["types"]) | set(before["types"])
        }
        top_types = sorted(grown.items(), key=lambda kv: -kv[1])[:12]
        d0, d1 = before["detail"], after["detail"]
        detail = {k: d1.get(k, 0) - d0.get(k, 0) for k in set(d0) | set(d1)}
        top_detail = [kv for kv in sorted(detail.items(), key=lambda kv: -kv[1])[:6] if kv[1] > 0]
        heap: list[str] = []
        if self.args.tracemalloc:
            old = tracemalloc.Snapshot.load(str(dumps / "dump-1.tracemalloc"))
            new = tracemalloc.Snapshot.load(str(dumps / "dump-2.tracemalloc"))
            ignore = [tracemalloc.Filter(False, tracemalloc.__file__)]
            old, new = old.filter_traces(ignore), new.filter_traces(ignore)
            for stat in new.compare_to(old, "traceback")[:10]:
                frames = [f"{f.filename}:{f.lineno}" for f in stat.traceback][-4:]
                heap.append(
                    f"{stat.size_diff / 1024:+9.1f} kB {stat.count_diff:+7d} blocks  "
                    + " <- ".join(reversed(frames))
                )
        return {
            "soak_interval": self.args.soak_interval,
            "warmup_cycles": warm_at,
            "cycles": cycles - warm_at,
            "window_seconds": window,
            "cycles_per_second": (cycles - warm_at) / window if window else 0.0,
            "rss_kb_after_warmup": ys[0] if ys else float("nan"),
            "rss_kb_end": ys[-1] if ys else float("nan"),
            "rss_kb_max": max(ys) if ys else float("nan"),
            "slope_kb_per_10k": slope * 10_000,
            "peak_slope_kb_per_10k": peak * 10_000,
            "floor_slope_kb_per_10k": floor * 10_000,
            "windows": len(windows),
            # The verdict takes the steepest of the three fits.
            "projection_kb_per_100k": max(slope, peak, floor) * SOAK_GOAL_CYCLES,
            "tasks": [before["tasks"], after["tasks"]],
            "timer_handles": [before["timer_handles"], after["timer_handles"]],
            "objects": [before["objects"], after["objects"]],
            "top_types": top_types,
            "top_detail": top_detail,
            "traced_kb": [before["traced_kb"], after["traced_kb"]],
            "smaps_growth_kb": smaps_growth(self.smaps[0], self.smaps[2]),
            "malloc_kb": [before["malloc_kb"], after["malloc_kb"]],
            "heap_growers": heap,
            "workload": dict(self.counts),
            "rss_samples": samples,  # (cycle, RSS kB), for fits of one's own
            "errors": dict(self.errors),
        }


def soak_table(r: dict[str, Any]) -> str:
    goal = r["projection_kb_per_100k"] <= SOAK_GOAL_KB
    lines = [
        f"watchdogd soak: {r['cycles']} cycles after {r['warmup_cycles']} warm-up cycles, "
        f"every {format_duration(r['soak_interval'])} ({r['cycles_per_second']:.1f} cycles/s "
        f"over {r['window_seconds']:.0f}s), Python {sys.version.split()[0]}, "
        f"{os.cpu_count()} cores",
        "",
        f"RSS after warm-up {r['rss_kb_after_warmup']:.0f} kB, at the end "
        f"{r['rss_kb_end']:.0f} kB, max {r['rss_kb_max']:.0f} kB",
        f"slope {r['slope_kb_per_10k']:+.1f} kB per 10,000 cycles (least squares over "
        f"1 s samples after warm-up); of the per-{RELEASE_EVERY:g}s peaks "
        f"{r['peak_slope_kb_per_10k']:+.1f}, of the floors {r['floor_slope_kb_per_10k']:+.1f} "
        f"({r['windows']} windows)",
        f"asyncio tasks {r['tasks'][0]} -> {r['tasks'][1]}, timer handles "
        f"{r['timer_handles'][0]} -> {r['timer_handles'][1]}, live objects "
        f"{r['objects'][0]} -> {r['objects'][1]}",
        "workload: " + ", ".join(f"{k} {v}" for k, v in sorted(r["workload"].items())),
    ]
    if r["errors"]:
        lines.append("workload errors: " + "; ".join(f"{k} x{v}" for k, v in r["errors"].items()))
    lines.append(
        "object types grown most (half-way -> end): "
        + ", ".join(f"{name} {n:+d}" for name, n in r["top_types"] if n > 0)
    )
    if r["top_detail"]:
        lines.append("of which: " + ", ".join(f"{name} {n:+d}" for name, n in r["top_detail"]))
    m0, m1 = r["malloc_kb"]
    if m0 and m1:
        lines.append(
            f"C heap (glibc, half-way -> end): in use {m0['in_use']:.0f} -> {m1['in_use']:.0f} kB, "
            f"free inside arenas {m0['free']:.0f} -> {m1['free']:.0f} kB"
        )
    lines.append(
        "RSS grown by mapping (after warm-up -> end): "
        + ", ".join(f"{name} {kb:+d} kB" for name, kb in r["smaps_growth_kb"] if kb)
    )
    if r["traced_kb"][1]:
        lines.append(f"traced Python heap {r['traced_kb'][0]:.0f} -> {r['traced_kb'][1]:.0f} kB")
    if r["heap_growers"]:
        lines += ["tracemalloc top growers (half-way -> end):", *r["heap_growers"]]
    lines.append(
        f"goal <= {SOAK_GOAL_KB:g} kB over {SOAK_GOAL_CYCLES:,} cycles: projected "
        f"{r['projection_kb_per_100k']:+.1f} kB ({'met' if goal else 'NOT met'})"
    )
    return "\n".join(lines)


def soak_main(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="watchdogd-soak-", dir=lab_root()))
    tmp.chmod(0o755)  # the postgres user must reach the pair inside
    try:
        result = asyncio.run(Soak(args, tmp).run())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(soak_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


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
    soak = p.add_argument_group("soak mode (months of cycles in minutes)")
    soak.add_argument("--soak", action="store_true", help="run the soak instead")
    soak.add_argument("--cycles", type=int, default=30_000, help="cycles after warm-up")
    soak.add_argument("--warmup-cycles", type=int, default=3_000)
    soak.add_argument("--soak-interval", default="20ms", help="probe cycle every (20ms)")
    soak.add_argument(
        "--tracemalloc", action="store_true", help="also diff tracemalloc snapshots (inflates RSS)"
    )
    p.add_argument("--soak-child", metavar="CONFIG", help=argparse.SUPPRESS)
    p.add_argument("--dump-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        args.interval = parse_duration(args.interval)
        args.soak_interval = parse_duration(args.soak_interval)
    except ValueError as exc:
        p.error(f"--interval: {exc}")
    if args.soak_child:
        return soak_child(args.soak_child, args.soak_interval, args.dump_dir, args.tracemalloc)
    if args.soak:
        if find_pg_bin() is None:
            print(NO_POSTGRES, file=sys.stderr)
            return 2
        return soak_main(args)
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
