"""``watchdogd demo --sites 3``: a watcher fleet in three "sites" on loopback.

Owns building the fleet lab — three etcd members (``watchdogd.demo.etcd``), a PostgreSQL
primary + streaming standby (``watchdogd.demo.lab``), the two app stand-ins
(``watchdogd.demo.app``), a *route* (the address clients would use; the failover's last
step flips it) and three ``watchdogd run`` processes, dc1..dc3, one per site, sharing
one config apart from ``instance`` — showing who leads and each voter's view, killing
the primary's site (its database) or the leader's site (the leading watcher and that
site's etcd member), and tearing everything down on every way out (``q``, Ctrl-C,
SIGTERM, SIGHUP, an error). ``bench/fleet.py`` reuses :class:`SitesLab`.

The sites: ``site-a`` holds the primary database, etcd1 and watcher dc1; ``site-b`` the
standby, etcd2 and dc2; ``site-c`` only etcd3 and dc3 (the tie-breaker site).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import asyncpg
import yaml
from aiohttp import web

from watchdogd.control import ControlUnavailable, request
from watchdogd.core.units import format_duration, parse_duration
from watchdogd.demo.app import DemoApp, pair_config
from watchdogd.demo.etcd import NO_ETCD, EtcdLab, find_etcd
from watchdogd.demo.lab import (
    LabError,
    PgPair,
    PgServer,
    die_with_parent,
    find_pg_bin,
    free_port,
    lab_root,
)

NO_POSTGRES = (
    "PostgreSQL server binaries not found: apt-get install postgresql (or put initdb on PATH)"
)
NODE_A, NODE_B = "site-a", "site-b"
WATCHERS = ("dc1", "dc2", "dc3")
SITE_OF = {"dc1": "site-a", "dc2": "site-b", "dc3": "site-c"}
MEMBER_OF = {"dc1": "etcd1", "dc2": "etcd2", "dc3": "etcd3"}
CLUSTER = "orders"
PREFIX = "/watchdogd"
STEPS = (
    "primary_maintenance_on",
    "stop_replication",
    "promote_standby",
    "standby_maintenance_off",
    "switch_traffic",
)
KEY_HELP = "keys: k kill the primary's site (its database)  l kill the leader's site  q quit"
SCENARIOS = ("interactive", "kill-primary", "kill-leader")


class SitesError(Exception):
    """The fleet lab could not be built or the story did not end as it must; one line."""


@dataclass(frozen=True)
class SitesSettings:
    interval: float = 1.0
    probe_timeout: float = 0.5
    threshold: float = 3.0
    ttl: float = 15.0
    etcd_timeout: float = 1.0
    # A never-started initdb data dir to copy (lab.make_template) instead of initdb.
    template: Path | None = None


class Route:
    """Where clients are sent: ``PUT /route {"to": NODE}`` (the last failover step)
    switches it and records the moment (this process's monotonic clock)."""

    def __init__(self, current: str) -> None:
        self.current = current
        self.switches: list[tuple[float, str]] = []
        self.switched = asyncio.Event()
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.add_routes([web.put("/route", self._put), web.get("/route", self._get)])
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _get(self, request: web.Request) -> web.Response:
        return web.json_response({"to": self.current})

    async def _put(self, request: web.Request) -> web.Response:
        t = time.monotonic()
        try:
            data = await request.json()
        except ValueError:
            return web.json_response({"error": "body is not JSON"}, status=400)
        target = data.get("to") if isinstance(data, dict) else None
        if target not in (NODE_A, NODE_B):
            return web.json_response(
                {"error": f'expected {{"to": NODE}} with NODE {NODE_A} or {NODE_B}'}, status=400
            )
        previous, self.current = self.current, str(target)
        self.switches.append((t, self.current))
        self.switched.set()
        return web.json_response({"to": target, "previous": previous})


@dataclass
class Watcher:
    name: str
    base: Path
    config_path: Path
    log_path: Path
    socket: Path
    process: subprocess.Popen[bytes] | None = None
    moves: int = 0

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def moved_metrics(self) -> bool:
        """Exited because its metrics port was taken between the pick and its start
        (another process bound it): start it again on another, twice at most. False
        when that was not why, or it moved twice already."""
        if self.moves >= 2 or "address already in use" not in self.log_tail():
            return False
        self.moves += 1
        cfg = yaml.safe_load(self.config_path.read_text())
        cfg["metrics"] = {"listen": f"127.0.0.1:{free_port()}"}
        self.config_path.write_text(yaml.safe_dump(cfg))
        self.start()
        return True

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "watchdogd.cli", "run", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C goes to the demo, which stops it
                preexec_fn=die_with_parent(),
            )

    def kill(self) -> None:
        """SIGKILL and reap (a stopped one too); nothing when not running."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)

    def log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return lines[-1][-300:] if lines else "(empty log)"

    async def status(self, timeout: float = 2.0) -> dict[str, Any] | None:
        """The watcher's ``status``; None when it does not answer."""
        if not self.is_running():
            return None
        try:
            reply = await request(str(self.socket), "status", None, timeout=timeout)
        except (ControlUnavailable, OSError, TimeoutError):
            return None
        result = reply.get("result") if reply.get("ok") else None
        return result if isinstance(result, dict) else None


@dataclass
class SitesLab:
    """Everything the fleet demo and ``bench/fleet.py`` run, built by ``start()`` and
    torn down by ``close()`` (idempotent, bounded, safe after a partial start)."""

    settings: SitesSettings
    keep: bool = False
    dir: Path = field(init=False)
    etcd: EtcdLab | None = None
    pair: PgPair | None = None
    apps: dict[str, DemoApp] = field(default_factory=dict)
    route: Route | None = None
    watchers: dict[str, Watcher] = field(default_factory=dict)
    killed: list[str] = field(default_factory=list)
    _own_etcd: bool = False
    _closed: bool = False

    def __post_init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="watchdogd-sites-", dir=lab_root()))
        self.dir.chmod(0o755)  # the postgres user must reach its data dirs

    async def start(self, *, etcd: EtcdLab | None = None, prefix: str = PREFIX) -> None:
        """Build the lab. ``etcd``: an already running cluster to use (the bench keeps
        one across trials, each under its own ``prefix``); else one is built here."""
        bin_dir = find_pg_bin()
        if bin_dir is None:
            raise SitesError(NO_POSTGRES)
        if etcd is None:
            try:
                # Blocking (a second or two) and from the main thread, so the members
                # die with this process (PR_SET_PDEATHSIG); nothing else runs yet.
                self.etcd = EtcdLab.create(self.dir / "etcd")
            except LabError as exc:
                raise SitesError(f"cannot build the etcd cluster: {exc}") from None
            self._own_etcd = True
        else:
            self.etcd = etcd
            self._own_etcd = False
        try:
            self.pair = PgPair.create(
                self.dir / "pg", bin_dir=bin_dir, template=self.settings.template
            )
        except LabError as exc:
            raise SitesError(f"cannot build the PostgreSQL pair: {exc}") from None
        self.apps = {
            NODE_A: DemoApp(NODE_A, self.pair.primary.dsn),
            NODE_B: DemoApp(NODE_B, self.pair.standby.dsn, maintenance=True),
        }
        for app in self.apps.values():
            await app.start()
        self.route = Route(NODE_A)
        await self.route.start()
        shared = self.config(prefix)
        for name in WATCHERS:
            base = self.dir / name
            (base / "run").mkdir(parents=True)
            cfg = dict(shared)
            cfg["instance"] = name
            cfg["state_dir"] = str(base / "state")
            cfg["control"] = {"socket": str(base / "run" / "control.sock")}
            cfg["metrics"] = {"listen": f"127.0.0.1:{free_port()}"}
            path = base / "watchdogd.yml"
            path.write_text(yaml.safe_dump(cfg))
            self.watchers[name] = Watcher(
                name, base, path, base / "watchdogd.log", base / "run" / "control.sock"
            )
        for w in self.watchers.values():
            w.start()

    def config(self, prefix: str) -> dict[str, Any]:
        """The config every watcher shares: the five steps against this lab, step
        timeouts that fit in the leader's authority (see docs/fleet.md)."""
        assert self.pair is not None and self.route is not None and self.etcd is not None
        s, fmt = self.settings, format_duration
        cfg = pair_config(
            CLUSTER,
            (NODE_A, self.pair.primary.dsn, self.apps[NODE_A]),
            (NODE_B, self.pair.standby.dsn, self.apps[NODE_B]),
            self.route.url,
            interval=fmt(s.interval),
            probe_timeout=fmt(s.probe_timeout),
            threshold=fmt(s.threshold),
        )
        cfg["failover"]["rejoin_steps"] = [{"name": "rejoin", "action": "rejoin", "timeout": "5s"}]
        cfg["failover"]["rejoin_timeout"] = "5s"
        return {
            **cfg,
            "store": {
                "etcd": {
                    "endpoints": self.etcd.endpoints,
                    "prefix": prefix,
                    "ttl": fmt(s.ttl),
                    "timeout": fmt(s.etcd_timeout),
                },
                "voters": list(WATCHERS),
            },
            "log": {"format": "json", "level": "info"},
        }

    # -- looking

    async def statuses(self) -> dict[str, dict[str, Any] | None]:
        names = list(self.watchers)
        got = await asyncio.gather(*(self.watchers[n].status() for n in names))
        return dict(zip(names, got, strict=True))

    @staticmethod
    def leader_of(statuses: dict[str, dict[str, Any] | None]) -> str | None:
        """The watcher every answering watcher names as the leader (it says it leads)."""
        live = {n: s for n, s in statuses.items() if s is not None and "store" in s}
        if not live:
            return None
        leaders = [n for n, s in live.items() if s["store"].get("is_leader")]
        named = {s["store"].get("leader") for s in live.values()}
        if len(leaders) == 1 and named == {leaders[0]}:
            return leaders[0]
        return None

    async def wait_ready(
        self, within: float = 60.0, check: Callable[[], None] | None = None
    ) -> str:
        """Until the watchers agree on a leader that sees every voter fresh and is
        watching; the leader's name. SitesError naming what was missing."""
        deadline = time.monotonic() + within
        seen = "no status yet"
        while time.monotonic() < deadline:
            if check is not None:
                check()
            for w in self.watchers.values():
                if w.process is not None and w.process.poll() is not None:
                    if w.moved_metrics():
                        continue
                    raise SitesError(
                        f"watcher {w.name} exited with {w.process.returncode}: {w.log_tail()}"
                    )
            statuses = await self.statuses()
            leader = self.leader_of(statuses)
            st = statuses.get(leader) if leader else None
            if st is not None:
                voters = st["store"]["voters"]
                fresh = [n for n, v in voters.items() if v.get("fresh")]
                if st["state"] == "watching" and len(fresh) == len(WATCHERS):
                    return str(leader)
                seen = f"leader {leader}: {st['state']} ({st['reason']}); fresh: {fresh}"
            else:
                seen = f"no agreed leader: {self.brief(statuses)}"
            await asyncio.sleep(0.2)
        raise SitesError(f"the fleet was not ready within {within:g}s: {seen}")

    @staticmethod
    def brief(statuses: dict[str, dict[str, Any] | None]) -> str:
        parts = []
        for n, s in statuses.items():
            if s is None:
                parts.append(f"{n} no answer")
            else:
                parts.append(f"{n} {s['state']} leader={s.get('store', {}).get('leader')}")
        return ", ".join(parts)

    def view_lines(self, statuses: dict[str, dict[str, Any] | None]) -> list[str]:
        """Who leads, and each watcher's state and its own view of the pair."""
        leader = self.leader_of(statuses)
        lines = [f"leader: {leader or 'none agreed'}"]
        for name, st in statuses.items():
            site = SITE_OF[name]
            if st is None:
                lines.append(f"  {name} ({site}): not answering")
                continue
            store = st.get("store", {})
            nodes = {n["name"]: n for n in st.get("nodes", [])}
            db = nodes.get(st["roles"]["primary"], {}).get("database") or {}
            view = "primary up" if db.get("ok") else "primary DOWN"
            lines.append(
                f"  {name} ({site}): {'LEADER ' if store.get('is_leader') else ''}"
                f"state {st['state']}, {view}, outage {st['outage_seconds']:.1f}s, "
                f"roles {st['roles']['primary']}/{st['roles']['standby']}"
            )
            if store.get("is_leader"):
                votes = ", ".join(
                    f"{v}:{'down' if info.get('primary_down') else 'up'}"
                    f"{'' if info.get('fresh') else '(stale)'}"
                    for v, info in store.get("voters", {}).items()
                )
                lines.append(f"      votes {votes}; {st['reason']}")
        return lines

    # -- faults

    def kill_primary_site(self) -> str:
        """SIGKILL the primary database (site-a's)."""
        assert self.pair is not None
        server = self.pair.primary
        if not server.is_running():
            return "site-a: the primary database is already down"
        server.kill()
        self.killed.append("primary database")
        return "site-a: primary database killed (SIGKILL)"

    def kill_watcher(self, name: str) -> None:
        self.watchers[name].kill()
        self.killed.append(f"watcher {name}")

    def kill_leader_site(self, leader: str) -> str:
        """SIGKILL the leading watcher and its site's etcd member."""
        assert self.etcd is not None
        self.kill_watcher(leader)
        member = self.etcd.member(MEMBER_OF[leader])
        member.kill()
        self.killed.append(f"etcd member {member.name}")
        return f"{SITE_OF[leader]}: watcher {leader} and {member.name} killed (SIGKILL)"

    # -- the database's own word

    @staticmethod
    def timeline(server: PgServer) -> int:
        """The server's timeline id from its WAL directory (1: never promoted)."""
        out = server.execute(
            "SELECT coalesce(max(('x' || substr(name, 1, 8))::bit(32)::int), 1) "
            "FROM pg_ls_waldir() WHERE name LIKE '%.history'"
        )
        return int(out)

    async def until_promoted(self, within: float) -> float:
        """Poll the standby's pg_is_in_recovery() every 50 ms; the monotonic moment it
        answered false. SitesError after ``within`` seconds."""
        assert self.pair is not None
        deadline = time.monotonic() + within
        conn = await asyncpg.connect(self.pair.standby.dsn, timeout=5)
        try:
            while time.monotonic() < deadline:
                with contextlib.suppress(asyncpg.PostgresError, OSError, TimeoutError):
                    if not await conn.fetchval("SELECT pg_is_in_recovery()", timeout=1):
                        return time.monotonic()
                await asyncio.sleep(0.05)
        finally:
            with contextlib.suppress(Exception):
                await conn.close(timeout=2)
        raise SitesError(f"the standby was not promoted within {within:g}s")

    def logs(self) -> str:
        return "\n".join(f"{n}: {w.log_tail()}" for n, w in self.watchers.items())

    # -- teardown

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for w in self.watchers.values():
            w.kill()
        for app in self.apps.values():
            with contextlib.suppress(Exception):
                async with asyncio.timeout(3):
                    await app.stop()
        if self.route is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(3):
                    await self.route.stop()
        if self.pair is not None:
            self.pair.destroy(keep_dir=True)
        if self.etcd is not None and getattr(self, "_own_etcd", False):
            self.etcd.close()
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)


# --------------------------------------------------------------------------- the demo


class SitesDemo:
    def __init__(self, scenario: str, settings: SitesSettings, keep: bool, out: TextIO) -> None:
        self.scenario = scenario
        self.settings = settings
        self.keep = keep
        self.out = out
        self.stop = asyncio.Event()
        self.signum: int | None = None
        self.keys: asyncio.Queue[str] = asyncio.Queue()
        self._stdin_fd: int | None = None

    def print(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def _on_signal(self, signum: int) -> None:
        if self.signum is None:
            self.signum = signum
        self.stop.set()

    def _check(self) -> None:
        if self.signum is not None:
            raise SitesError(f"stopped by {signal.Signals(self.signum).name}")

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        for sig in signals:
            loop.add_signal_handler(sig, self._on_signal, sig)
        lab = SitesLab(self.settings, keep=self.keep)
        self.print(f"lab: {lab.dir}")
        code = 1
        try:
            code = await self._run(lab)
        except SitesError as exc:
            if self.signum is None:
                self.print(f"demo: FAILED: {exc}")
            code = 1
        finally:
            self._stop_keys()
            if self.signum is not None:
                self.print(f"demo: {signal.Signals(self.signum).name}: stopping everything")
                code = 128 + self.signum
            await lab.close()
            self.print(f"lab kept in {lab.dir}" if self.keep else f"removed {lab.dir}")
            for sig in signals:
                loop.remove_signal_handler(sig)
        return code

    async def _run(self, lab: SitesLab) -> int:
        s = self.settings
        self.print(
            "building the fleet: 3 etcd members, a PostgreSQL primary + standby, "
            "two app stand-ins, 3 watchers"
        )
        await lab.start()
        assert lab.pair is not None and lab.etcd is not None
        self.print(
            f"  site-a: primary postgres pid {lab.pair.primary.pid} port "
            f"{lab.pair.primary.port}, etcd1, watcher dc1"
        )
        self.print(
            f"  site-b: standby postgres pid {lab.pair.standby.pid} port "
            f"{lab.pair.standby.port}, etcd2, watcher dc2"
        )
        self.print("  site-c: etcd3, watcher dc3")
        self.print(
            f"  etcd {', '.join(lab.etcd.endpoints)}; probe {s.interval:g}s, "
            f"threshold {s.threshold:g}s, ttl {s.ttl:g}s"
        )
        for name, w in lab.watchers.items():
            self.print(f"  {name}: watchdogctl --socket {w.socket} status")
        leader = await lab.wait_ready(60.0, self._check)
        self.print(f"fleet ready: {leader} leads, every voter fresh")
        lines = lab.view_lines(await lab.statuses())
        for line in lines:
            self.print(line)
        if self.scenario == "interactive":
            return await self._interactive(lab, lines)
        return await self._scenario(lab, leader)

    async def _scenario(self, lab: SitesLab, leader: str) -> int:
        assert lab.pair is not None and lab.route is not None
        t0 = time.monotonic()
        if self.scenario == "kill-primary":
            self.print(f"t=0.0s {lab.kill_primary_site()}")
            survivors = list(WATCHERS)
        else:
            self.print(f"t=0.0s {lab.kill_leader_site(leader)}")
            self.print(f"t=0.0s {lab.kill_primary_site()}")
            survivors = [n for n in WATCHERS if n != leader]
        within = self.settings.ttl + self.settings.threshold + 30.0
        promoted = await self._promoted_or_stop(lab, within)
        self.print(f"t={promoted - t0:.1f}s the standby is promoted (pg_is_in_recovery false)")
        deadline = time.monotonic() + 20.0
        new_leader: str | None = None
        last: dict[str, dict[str, Any] | None] = {}
        while time.monotonic() < deadline:
            self._check()
            last = {n: s for n, s in (await lab.statuses()).items() if n in survivors}
            new_leader = lab.leader_of(last)
            st = last.get(new_leader) if new_leader else None
            fo = st.get("last_failover") if st is not None else None
            # "outcome" reads "in progress" while it runs; finished_at is set at the end.
            if fo and fo.get("finished_at") is not None and lab.route.switches:
                break
            await asyncio.sleep(0.2)
        for line in lab.view_lines(last):
            self.print(line)
        st = last.get(new_leader) if new_leader else None
        fo = st.get("last_failover") if st else None
        if new_leader is None or st is None or fo is None:
            raise SitesError(f"no leader reported the failover: {lab.brief(last)}")
        if lab.route.switches:
            t, to = lab.route.switches[-1]
            self.print(f"t={t - t0:.1f}s traffic switched to {to}")
        promotions = await asyncio.to_thread(lab.timeline, lab.pair.standby) - 1
        self.print(f"leaders agreeing: 1 ({new_leader})")
        self.print(f"promotions (the standby's timeline): {promotions}")
        self.print(f"failover {fo.get('id')}: {fo.get('outcome')} by {new_leader}")
        if fo.get("outcome") != "completed" or promotions != 1:
            self.print("demo: FAILED: the failover did not complete exactly once")
            return 1
        self.print(f"demo: ok: {NODE_A} -> {NODE_B}, led by {new_leader}, one promotion")
        return 0

    async def _promoted_or_stop(self, lab: SitesLab, within: float) -> float:
        task = asyncio.create_task(lab.until_promoted(within))
        stopper = asyncio.create_task(self.stop.wait())
        done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        for t in (task, stopper):
            if t not in done:
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
        self._check()
        return task.result()

    # -- interactive

    async def _summary(self, lab: SitesLab) -> None:
        """Where the route points and the promotions, from the standby's timeline."""
        assert lab.pair is not None and lab.route is not None
        self.print(f"route: clients sent to {lab.route.current}")
        if lab.pair.standby.is_running():
            with contextlib.suppress(LabError):
                promotions = await asyncio.to_thread(lab.timeline, lab.pair.standby) - 1
                self.print(f"promotions (the standby's timeline): {promotions}")

    def _start_keys(self) -> bool:
        """Keys from stdin, one per character (a pipe works too); a terminal stays in
        line mode, so press Enter after the key."""
        try:
            fd = sys.stdin.fileno()
            asyncio.get_running_loop().add_reader(fd, self._read_key, fd)
        except (AttributeError, OSError, ValueError):
            return False
        self._stdin_fd = fd
        return True

    def _read_key(self, fd: int) -> None:
        try:
            data = os.read(fd, 64)
        except OSError:
            data = b""
        if not data:
            self._stop_keys()
            return
        for ch in data.decode(errors="replace"):
            if not ch.isspace():
                self.keys.put_nowait(ch.lower())

    def _stop_keys(self) -> None:
        if self._stdin_fd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._stdin_fd)
            self._stdin_fd = None

    async def _interactive(self, lab: SitesLab, shown: list[str]) -> int:
        keys = self._start_keys()
        self.print(
            f"running; {KEY_HELP} (Enter after each key; or Ctrl-C)"
            if keys
            else "running; stdin gives no keys: Ctrl-C or SIGTERM stops the demo"
        )
        next_view = 0.0
        while True:
            if self.signum is not None:
                return 128 + self.signum
            if time.monotonic() >= next_view:
                lines = lab.view_lines(await lab.statuses())
                # Only when something changed: the outage counter alone does not count.
                if [_no_numbers(x) for x in lines] != [_no_numbers(x) for x in shown]:
                    self.print(time.strftime("%H:%M:%S"))
                    for line in lines:
                        self.print(line)
                    shown = lines
                next_view = time.monotonic() + 1.0
            try:
                async with asyncio.timeout(0.25):
                    key = await self.keys.get()
            except TimeoutError:
                continue
            if key == "q":
                self.print("quitting")
                await self._summary(lab)
                return 0
            if key == "k":
                self.print(await asyncio.to_thread(lab.kill_primary_site))
            elif key == "l":
                leader = lab.leader_of(await lab.statuses())
                if leader is None:
                    self.print("no agreed leader to kill right now")
                else:
                    self.print(await asyncio.to_thread(lab.kill_leader_site, leader))
            else:
                self.print(f"unknown key {key!r}; {KEY_HELP}")


def _no_numbers(line: str) -> str:
    return "".join("#" if c.isdigit() else c for c in line)


def main(
    sites: int, scenario: str = "interactive", *, threshold: str = "3s", keep: bool = False
) -> int:
    """``watchdogd demo --sites 3``: 0 done, 1 the story failed, 2 bad input or a missing
    binary, 128+N stopped by signal N."""
    if sites != 3:
        print(f"watchdogd demo: --sites: only 3 is supported, got {sites}", file=sys.stderr)
        return 2
    if scenario not in SCENARIOS:
        known = ", ".join(SCENARIOS)
        print(
            f"watchdogd demo: --sites 3: unknown scenario {scenario!r} (known: {known})",
            file=sys.stderr,
        )
        return 2
    try:
        seconds = parse_duration(threshold)
    except ValueError as exc:
        print(f"watchdogd demo: --threshold: {exc}", file=sys.stderr)
        return 2
    settings = SitesSettings(threshold=seconds)
    if seconds < settings.interval:
        print(
            f"watchdogd demo: --threshold: must be at least the probe interval "
            f"({settings.interval:g}s), got {threshold!r}",
            file=sys.stderr,
        )
        return 2
    if find_pg_bin() is None:
        print(NO_POSTGRES, file=sys.stderr)
        return 2
    if find_etcd() is None:
        print(NO_ETCD, file=sys.stderr)
        return 2
    return asyncio.run(SitesDemo(scenario, settings, keep, sys.stdout).run())


__all__ = [
    "NO_POSTGRES",
    "SCENARIOS",
    "SitesDemo",
    "SitesError",
    "SitesLab",
    "SitesSettings",
    "main",
]
