"""watchdogd and Patroni side by side: the same crash, the same poller, one table.

Builds Patroni from PyPI in its own virtualenv (``--patroni-venv``, default
``/var/cache/watchdogd-bench/patroni-venv``; made once, never part of the repo), starts
one etcd member (``etcd`` on PATH, Debian ``etcd-server``) and, per run, two fresh
PostgreSQL pairs on free loopback ports: one managed by Patroni (``etcd3`` DCS, its most
aggressive settings the validator accepts: ttl 20, loop_wait 1, retry_timeout 3), and
one watched by ``watchdogd run`` (a separate process, interval 1s, threshold 3s,
probe timeout 500ms, steps stop_replication + promote).

The crash is the primary node dying: SIGKILL of the primary's postmaster and its
backends at a random phase of the 1 s cadence; on Patroni's node the agent dies with
it (Patroni runs on the database node, and a live Patroni would just restart its
postmaster in place: no failover at all). watchdogd runs elsewhere and stays up.
The same poller, on a connection to the standby every 20 ms, times the kill ->
``pg_is_in_recovery()`` false -> a write committed.

Idle cost, measured in the same window for both (so a busy machine weighs on both
alike): RSS of the ``watchdogd run`` process against Patroni's process on the leader,
and their own CPU (utime + stime, threads included, child processes not) at the same
1 s cadence.

    .venv/bin/python bench/versus_patroni.py [--runs 5] [--idle-seconds 60] [--json PATH]

Needs etcd, the PostgreSQL server binaries and a Patroni it can install (pip, network or
a local index); when one is missing it says which in one line and exits 2. Runs as root
(the servers and Patroni run as the postgres user) or as that user.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import pwd
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import yaml

from watchdogd import __version__
from watchdogd.control import ControlUnavailable
from watchdogd.control import request as control_request
from watchdogd.demo.lab import (
    SERVICE_USER,
    PgPair,
    child_pids,
    find_pg_bin,
    free_port,
    lab_root,
    make_template,
    pid_alive,
)

CLK_TCK = os.sysconf("SC_CLK_TCK")
DEFAULT_VENV = Path("/var/cache/watchdogd-bench/patroni-venv")
PATRONI_PACKAGES = ["patroni[etcd3]", "psycopg2-binary"]
# Patroni's validator: ttl >= 20, loop_wait >= 1, retry_timeout >= 3, and
# loop_wait + 2 * retry_timeout <= ttl.
PATRONI_DCS = {"ttl": 20, "loop_wait": 1, "retry_timeout": 3}
INTERVAL, THRESHOLD, PROBE_TIMEOUT = "1s", "3s", "500ms"
POLL = 0.02


class BenchError(Exception):
    """A run could not be set up or did not fail over; one line."""


# --------------------------------------------------------------------------- measuring


def cpu_seconds(pid: int) -> float:
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"no VmRSS for pid {pid}")


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


async def wait_until(check: Any, within: float, what: str) -> Any:
    deadline = time.monotonic() + within
    while True:
        with contextlib.suppress(Exception):
            got = await check()
            if got:
                return got
        if time.monotonic() > deadline:
            raise BenchError(f"{what} within {within:g}s")
        await asyncio.sleep(0.2)


class Poller:
    """Polls the standby from before the kill: when it leaves recovery, when it takes a write."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.conn: Any = None

    async def connect(self) -> None:
        self.conn = await asyncpg.connect(self.dsn, timeout=2)
        await self.conn.fetchval("SELECT pg_is_in_recovery()", timeout=2)

    async def until_promoted(self, t0: float, within: float) -> tuple[float, float]:
        out: float | None = None
        while time.monotonic() - t0 < within:
            try:
                if self.conn is None:
                    self.conn = await asyncpg.connect(self.dsn, timeout=1)
                if out is None and not await self.conn.fetchval(
                    "SELECT pg_is_in_recovery()", timeout=1
                ):
                    out = time.monotonic() - t0
                if out is not None:
                    await self.conn.execute(
                        "CREATE TABLE IF NOT EXISTS bench_poll (at float8); "
                        "INSERT INTO bench_poll VALUES (extract(epoch FROM now()))",
                        timeout=1,
                    )
                    return out, time.monotonic() - t0
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
                await self.close()
            await asyncio.sleep(POLL)
        raise BenchError(f"the standby did not take a write within {within:g}s of the kill")

    async def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 2)


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and its direct children (a postmaster and its backends)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGSTOP)
    children = child_pids(pid)
    for p in (pid, *children):
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def as_postgres() -> dict[str, Any]:
    if os.geteuid() != 0:
        return {}
    pw = pwd.getpwnam(SERVICE_USER)
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


def chown_tree(path: Path) -> None:
    if os.geteuid() != 0:
        return
    pw = pwd.getpwnam(SERVICE_USER)
    for p in (path, *path.rglob("*")):
        os.chown(p, pw.pw_uid, pw.pw_gid)


def spawn(argv: list[str], log: Path, *, service: bool, env: dict[str, str] | None = None) -> Any:
    with log.open("ab") as out:
        kwargs: dict[str, Any] = as_postgres() if service else {}
        return subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=log.parent,
            env=env,
            start_new_session=True,
            **kwargs,
        )


def stop(proc: Any, timeout: float = 20) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


# --------------------------------------------------------------------------- Patroni


def patroni_version(script: Path) -> str | None:
    """Patroni's version as the service user runs it, or None if it cannot."""
    try:
        done = subprocess.run(
            [str(script), "--version"], capture_output=True, text=True, timeout=60, **as_postgres()
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    out: str = done.stdout
    return out.strip().removeprefix("patroni ")


def patroni_venv(venv: Path) -> tuple[Path | None, str]:
    """(the patroni script, its version), building the venv if needed; (None, why) if not."""
    script = venv / "bin" / "patroni"
    if (version := patroni_version(script)) is not None:
        return script, version
    print(f"building Patroni in {venv} ...", file=sys.stderr, flush=True)
    # The system's Python: the postgres user must be able to run the venv, and an
    # interpreter under /root (pyenv) is out of its reach.
    base = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
    try:
        venv.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return None, f"cannot create {venv.parent}: {exc.strerror}"
    done = subprocess.run(
        [base, "-m", "venv", "--clear", str(venv)], capture_output=True, text=True
    )
    if done.returncode == 0:
        done = subprocess.run(
            [str(venv / "bin" / "pip"), "install", "-q", *PATRONI_PACKAGES],
            capture_output=True,
            text=True,
        )
    if done.returncode != 0:
        last = (done.stderr or done.stdout).strip().splitlines()
        return None, last[-1] if last else "pip failed"
    venv.chmod(0o755)
    if (version := patroni_version(script)) is None:
        return None, f"{script} does not run as {SERVICE_USER}"
    return script, version


class Etcd:
    """One etcd member on two free loopback ports."""

    def __init__(self, binary: str, base: Path) -> None:
        self.binary, self.base = binary, base
        self.client, self.peer = free_port(), free_port()
        self.proc: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client}"

    async def start(self) -> None:
        peer = f"http://127.0.0.1:{self.peer}"
        argv = [self.binary, "--name", "bench", "--data-dir", str(self.base / "etcd")]
        argv += ["--listen-client-urls", self.url, "--advertise-client-urls", self.url]
        argv += ["--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer]
        argv += ["--initial-cluster", f"bench={peer}", "--initial-cluster-state", "new"]
        self.proc = spawn(argv, self.base / "etcd.log", service=False)
        async with aiohttp.ClientSession() as s:

            async def healthy() -> bool:
                async with s.get(f"{self.url}/health") as r:
                    return r.status == 200

            await wait_until(healthy, 20, "etcd did not answer /health")

    def stop(self) -> None:
        stop(self.proc)


@dataclass
class PatroniNode:
    name: str
    base: Path
    pg: int = field(default_factory=free_port)
    api: int = field(default_factory=free_port)
    proc: Any = None

    @property
    def data_dir(self) -> Path:
        return self.base / "data"

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.pg}/postgres"

    def postmaster(self) -> int | None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int((self.data_dir / "postmaster.pid").read_text().split()[0])
        return None

    def config(self, scope: str, etcd: Etcd, bin_dir: Path) -> dict[str, Any]:
        trust = ["local all all trust", "host all all 127.0.0.1/32 trust"]
        return {
            "scope": scope,
            "name": self.name,
            "restapi": {
                "listen": f"127.0.0.1:{self.api}",
                "connect_address": f"127.0.0.1:{self.api}",
            },
            "etcd3": {"hosts": [f"127.0.0.1:{etcd.client}"]},
            "bootstrap": {
                "dcs": {**PATRONI_DCS, "postgresql": {"use_pg_rewind": False}},
                "initdb": [{"encoding": "UTF8"}],
                "pg_hba": [*trust, "host replication all 127.0.0.1/32 trust"],
            },
            "postgresql": {
                "listen": f"127.0.0.1:{self.pg}",
                "connect_address": f"127.0.0.1:{self.pg}",
                "data_dir": str(self.data_dir),
                "bin_dir": str(bin_dir),
                "pgpass": str(self.base / "pgpass"),
                "authentication": {
                    "superuser": {"username": "postgres", "password": "bench"},
                    "replication": {"username": "postgres", "password": "bench"},
                },
                "parameters": {"unix_socket_directories": str(self.base), "fsync": "off"},
            },
            "log": {"level": "WARNING", "dir": str(self.base)},
        }

    async def state(self, session: aiohttp.ClientSession) -> dict[str, Any]:
        async with session.get(f"http://127.0.0.1:{self.api}/patroni") as r:
            got: dict[str, Any] = await r.json(content_type=None)
            return got


class PatroniCluster:
    def __init__(self, script: Path, etcd: Etcd, base: Path, scope: str, bin_dir: Path) -> None:
        self.script, self.etcd, self.base, self.scope = script, etcd, base, scope
        self.bin_dir = bin_dir
        self.nodes = [PatroniNode("pg1", base / "pg1"), PatroniNode("pg2", base / "pg2")]
        self.leader: PatroniNode | None = None
        self.replica: PatroniNode | None = None

    async def start(self) -> None:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.base)}
        self.base.mkdir(mode=0o755)
        for i, node in enumerate(self.nodes):
            node.base.mkdir(mode=0o700)
            path = node.base / "patroni.yml"
            path.write_text(yaml.safe_dump(node.config(self.scope, self.etcd, self.bin_dir)))
            chown_tree(node.base)
            node.proc = spawn(
                [str(self.script), str(path)], node.base / "patroni.out", service=True, env=env
            )
            if i == 0:  # the first one bootstraps the cluster and becomes its leader
                await self._wait_role(node, ("primary", "master"), 60)
        async with aiohttp.ClientSession() as s:

            async def streaming() -> bool:
                leader = next(n for n in self.nodes if n.proc.poll() is None)
                st = await leader.state(s)
                return any(r.get("state") == "streaming" for r in st.get("replication", []))

            await wait_until(streaming, 90, "Patroni's replica did not stream")
        self.leader, self.replica = self.nodes

    async def _wait_role(self, node: PatroniNode, roles: tuple[str, ...], within: float) -> None:
        async with aiohttp.ClientSession() as s:

            async def has_role() -> bool:
                if node.proc.poll() is not None:
                    raise BenchError(f"Patroni {node.name} exited (see {node.base}/patroni.out)")
                st = await node.state(s)
                return st.get("role") in roles and st.get("state") == "running"

            try:
                await wait_until(has_role, within, f"Patroni {node.name} did not lead")
            except BenchError:
                if node.proc.poll() is not None:
                    tail = (node.base / "patroni.out").read_text(errors="replace")[-600:]
                    raise BenchError(f"Patroni {node.name} exited: {tail}") from None
                raise

    def kill_leader_node(self) -> None:
        """The leader's node dies: its Patroni and its postmaster with the backends."""
        assert self.leader is not None
        pm = self.leader.postmaster()
        self.leader.proc.send_signal(signal.SIGKILL)
        if pm is not None:
            kill_tree(pm)

    def stop(self) -> None:
        for node in self.nodes:
            stop(node.proc, 30)
            pm = node.postmaster()
            if pm is not None and pid_alive(pm):
                kill_tree(pm)


# --------------------------------------------------------------------------- watchdogd


class Watchdogd:
    def __init__(self, base: Path, template: Path) -> None:
        self.base, self.template = base, template
        self.pair: PgPair | None = None
        self.proc: Any = None

    @property
    def socket(self) -> str:
        return str(self.base / "run" / "control.sock")

    async def start(self) -> None:
        self.base.mkdir(mode=0o755)
        self.pair = await asyncio.to_thread(PgPair.create, self.base / "pg", template=self.template)
        step = [
            {"name": "stop_replication", "action": "stop_replication"},
            {"name": "promote", "action": "promote"},
        ]
        cfg = {
            "cluster": "versus",
            "primary": {
                "name": "a",
                "database": {"engine": "postgres", "dsn": self.pair.primary.dsn},
            },
            "standby": {
                "name": "b",
                "database": {"engine": "postgres", "dsn": self.pair.standby.dsn},
            },
            "probe": {"interval": INTERVAL, "timeout": PROBE_TIMEOUT},
            "failover": {"mode": "automatic", "outage_threshold": THRESHOLD, "steps": step},
            "metrics": {"listen": f"127.0.0.1:{free_port()}"},
            "control": {"socket": self.socket},
            "log": {"format": "json", "level": "info"},
            "state_dir": str(self.base / "state"),
        }
        path = self.base / "watchdogd.yml"
        path.write_text(yaml.safe_dump(cfg))
        argv = [sys.executable, "-m", "watchdogd.cli", "run", "--config", str(path)]
        self.proc = spawn(argv, self.base / "watchdogd.log", service=False)

        async def watching() -> bool:
            if self.proc.poll() is not None:
                tail = (self.base / "watchdogd.log").read_text(errors="replace")[-600:]
                raise BenchError(f"watchdogd exited: {tail}")
            reply = await control_request(self.socket, "status", timeout=2)
            result = reply.get("result") or {}
            return bool(result.get("state") == "watching")

        try:
            await wait_until(watching, 30, "watchdogd was not watching")
        except ControlUnavailable as exc:
            raise BenchError(str(exc)) from None

    def stop(self) -> None:
        stop(self.proc)
        if self.pair is not None:
            self.pair.destroy()


# --------------------------------------------------------------------------- the runs


async def idle(w: Watchdogd, p: PatroniCluster, seconds: float) -> dict[str, float]:
    """RSS and own CPU of both, over the same window."""
    assert p.leader is not None
    pw, pp = w.proc.pid, p.leader.proc.pid
    c0w, c0p, t0 = cpu_seconds(pw), cpu_seconds(pp), time.monotonic()
    rw: list[float] = []
    rp: list[float] = []
    while time.monotonic() - t0 < seconds:
        await asyncio.sleep(1.0)
        rw.append(rss_mib(pw))
        rp.append(rss_mib(pp))
    window = time.monotonic() - t0
    return {
        "window_seconds": window,
        "watchdogd_rss_mib": statistics.median(rw),
        "patroni_rss_mib": statistics.median(rp),
        "watchdogd_cpu_percent": 100 * (cpu_seconds(pw) - c0w) / window,
        "patroni_cpu_percent": 100 * (cpu_seconds(pp) - c0p) / window,
    }


async def kill_and_poll(dsn: str, kill: Any, within: float) -> tuple[float, float]:
    poller = Poller(dsn)
    try:
        await poller.connect()
        await asyncio.sleep(random.uniform(0, 1.0))  # a random phase of the 1 s cadence
        t0 = time.monotonic()
        kill()
        return await poller.until_promoted(t0, within)
    finally:
        await poller.close()


async def one_run(
    n: int, args: argparse.Namespace, tmp: Path, script: Path, etcd: Etcd, template: Path
) -> dict[str, Any]:
    bin_dir = find_pg_bin()
    assert bin_dir is not None
    w = Watchdogd(tmp / f"w{n}", template)
    p = PatroniCluster(script, etcd, tmp / f"p{n}", f"bench{n}", bin_dir)
    result: dict[str, Any] = {"run": n}
    try:
        await p.start()
        await w.start()
        if n == 1:
            print(f"idle window: {args.idle_seconds:g}s ...", file=sys.stderr, flush=True)
            await asyncio.sleep(args.warmup)
            result["idle"] = await idle(w, p, args.idle_seconds)
        assert w.pair is not None and p.replica is not None
        pair = w.pair
        result["watchdogd"] = await kill_and_poll(pair.standby.dsn, pair.primary.kill, 60)
        result["patroni"] = await kill_and_poll(p.replica.dsn, p.kill_leader_node, 120)
    finally:
        w.stop()
        p.stop()
        shutil.rmtree(w.base, ignore_errors=True)
        shutil.rmtree(p.base, ignore_errors=True)
    print(
        f"run {n}: standby out of recovery after {result['watchdogd'][0]:.2f}s (watchdogd), "
        f"{result['patroni'][0]:.2f}s (Patroni)",
        file=sys.stderr,
        flush=True,
    )
    return result


def versions(script: Path, patroni: str, etcd: str, bin_dir: Path) -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        done = subprocess.run(argv, capture_output=True, text=True)
        return (done.stdout or done.stderr).strip().splitlines()[0]

    mem = next(
        int(line.split()[1]) / 1024 / 1024
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    return {
        "machine": f"{os.cpu_count()} vCPUs, {mem:.1f} GiB RAM, Linux {platform.release()}",
        "watchdogd": __version__,
        "python": sys.version.split()[0],
        "patroni_python": first_line([str(script.parent / "python"), "--version"]).split()[-1],
        "patroni": patroni,
        "etcd": first_line([etcd, "--version"]).removeprefix("etcd Version: "),
        "postgresql": first_line([str(bin_dir / "postgres"), "--version"]),
    }


def table(runs: list[dict[str, Any]], info: dict[str, str]) -> tuple[str, dict[str, Any]]:
    idle_ = runs[0]["idle"]
    rows: list[tuple[str, float, float, str]] = []
    for i, what in ((0, "kill -> standby out of recovery"), (1, "kill -> standby takes a write")):
        w = [r["watchdogd"][i] for r in runs]
        p = [r["patroni"][i] for r in runs]
        rows.append((f"{what} p50 (s)", percentile(w, 50), percentile(p, 50), "3f"))
        rows.append((f"{what} max (s)", max(w), max(p), "3f"))
    rows.append(("idle RSS (MiB)", idle_["watchdogd_rss_mib"], idle_["patroni_rss_mib"], "1f"))
    rows.append(
        (
            "idle CPU (% of one core)",
            idle_["watchdogd_cpu_percent"],
            idle_["patroni_cpu_percent"],
            "2f",
        )
    )
    lines = [
        f"watchdogd {info['watchdogd']} vs Patroni {info['patroni']}: {len(runs)} runs each, "
        f"SIGKILL of the primary node at a random phase; same poller (every {POLL * 1000:g} ms)",
        f"watchdogd: interval {INTERVAL}, threshold {THRESHOLD}, probe timeout {PROBE_TIMEOUT}; "
        f"Patroni: ttl {PATRONI_DCS['ttl']}, loop_wait {PATRONI_DCS['loop_wait']}, "
        f"retry_timeout {PATRONI_DCS['retry_timeout']} (etcd3 DCS, etcd {info['etcd']})",
        f"{info['postgresql']}; Python {info['python']} (Patroni's {info['patroni_python']}); "
        f"{info['machine']}",
        "",
        f"{'':<42}{'watchdogd':>11}{'Patroni':>11}{'ratio':>9}",
    ]
    summary: dict[str, Any] = {}
    for label, ours, theirs, fmt in rows:
        ratio = ours / theirs if theirs else float("nan")
        summary[label] = {"watchdogd": ours, "patroni": theirs, "ratio": ratio}
        lines.append(f"{label:<42}{ours:>11.{fmt}}{theirs:>11.{fmt}}{ratio:>8.2f}x")
    lines += [
        "",
        f"ratio = watchdogd / Patroni (below 1: watchdogd is faster or leaner). Idle: one "
        f"{idle_['window_seconds']:.0f} s window measured for both at once; RSS the median of "
        "1 s samples of `watchdogd run` and of Patroni's process on the leader; CPU their own "
        "(threads included, child processes not).",
    ]
    return "\n".join(lines), summary


async def run_all(
    args: argparse.Namespace, tmp: Path, script: Path, etcd_bin: str
) -> list[dict[str, Any]]:
    etcd = Etcd(etcd_bin, tmp)
    template = await asyncio.to_thread(make_template, tmp / "template")
    runs: list[dict[str, Any]] = []
    try:
        await etcd.start()
        for n in range(1, args.runs + 1):
            runs.append(await one_run(n, args, tmp, script, etcd, template))
    finally:
        etcd.stop()
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--idle-seconds", type=float, default=60.0)
    p.add_argument("--warmup", type=float, default=10.0, help="before the idle window")
    p.add_argument("--patroni-venv", type=Path, default=DEFAULT_VENV)
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs: must be at least 1")
    etcd_bin = shutil.which("etcd")
    bin_dir = find_pg_bin()
    if etcd_bin is None:
        print("versus_patroni: needs etcd on PATH (Debian: apt-get install etcd-server)")
        return 2
    if bin_dir is None:
        print("versus_patroni: needs the PostgreSQL server binaries (postgresql-15)")
        return 2
    script, version = patroni_venv(args.patroni_venv)
    if script is None:
        print(f"versus_patroni: needs Patroni from PyPI in {args.patroni_venv}: {version}")
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="watchdogd-versus-", dir=lab_root()))
    tmp.chmod(0o755)  # the postgres user must reach the clusters inside
    try:
        runs = asyncio.run(run_all(args, tmp, script, etcd_bin))
    except BenchError as exc:
        print(f"versus_patroni: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    info = versions(script, version, etcd_bin, bin_dir)
    text, summary = table(runs, info)
    print(text)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"versions": info, "summary": summary, "runs": runs}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
