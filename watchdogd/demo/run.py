"""The demo lab: ``watchdogd demo``, a complete local failover to watch and to poke.

Owns building the lab on loopback with no config to write — a PostgreSQL
primary + streaming standby (``watchdogd.demo.lab``), one ``DemoApp`` stack per
database, the *failover address* (a small reverse proxy whose route the last
failover step flips through its admin endpoint) and a load generator writing
orders through it — running watchdogd in-process over it with the five-step
sequence and hearing it as a subscriber of its event bus, the live terminal view
and its keys, the unattended scenarios (``kill-primary``, ``hang-primary``) with
their timeline and write accounting, and tearing every process down and removing
the lab directory on every way out (``q``, Ctrl-C, SIGTERM, SIGHUP, an error).
``bench/failover.py`` reuses :class:`Lab`.

The lab runs synchronous replication (the standby must have a commit before the
client hears "201"): that is what makes "no acknowledged write lost" a promise
the demo can check rather than a race it usually wins.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import re
import shutil
import signal
import sys
import tempfile
import termios
import time
import tty
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, TextIO

import aiohttp
import asyncpg
from aiohttp import web

from watchdogd import config as configmod
from watchdogd.control import CommandError, Peer
from watchdogd.core.events import Event as BusEvent
from watchdogd.core.events import Level
from watchdogd.core.units import format_bytes, format_duration, parse_duration
from watchdogd.daemon import Daemon
from watchdogd.demo.app import DemoApp, pair_config
from watchdogd.demo.lab import LabError, PgPair, PgServer, find_pg_bin, free_port, lab_root
from watchdogd.logging import reset_logging, setup_logging
from watchdogd.state.journal import FailoverRecord

NO_POSTGRES = (
    "PostgreSQL server binaries not found: apt-get install postgresql (or put initdb on PATH)"
)
NODE_A, NODE_B = "site-a", "site-b"
INTERVAL = 1.0
PROBE_TIMEOUT = 0.5
WRITE_RATE = 20.0
FIVE_STEPS = (
    "primary_maintenance_on",
    "stop_replication",
    "promote_standby",
    "standby_maintenance_off",
    "switch_traffic",
)
KEY_HELP_LINES = (
    "keys: k kill the primary (SIGKILL)  h hang it (SIGSTOP)  c continue it",
    "      p pause  r resume  f force a failover  s switchover  a ack  q quit",
)
KEY_HELP = "keys: " + "  ".join(line[6:] for line in KEY_HELP_LINES)
# Enough acknowledged writes to show the load generator works end to end (~1 s).
WARM_WRITES = 20


class DemoError(Exception):
    """The lab could not be built or the story did not end as it must; one line."""


class Interrupted(Exception):
    """A signal asked the demo to stop."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# --------------------------------------------------------------------------- events


@dataclass(frozen=True)
class Event:
    t: float  # monotonic seconds (the daemon's clock)
    source: str  # "daemon" or "demo"
    level: str
    name: str
    facts: dict[str, Any]


class EventLog:
    """What the demo heard, each with its monotonic time, for the live view, the
    timeline and the bench: the daemon's events (``on_event`` subscribes to its bus;
    the daemon's own log subscriber writes them to the log file) and the lab's own
    (``demo``, forwarded to the log file here)."""

    def __init__(self, forward: Any, keep: int = 5000) -> None:
        self.forward = forward
        self.events: deque[Event] = deque(maxlen=keep)
        self.listeners: list[Callable[[Event], None]] = []
        self._probe_ok: dict[str, bool] = {}  # per node: its last database probe passed

    def _add(self, source: str, level: str, name: str, facts: dict[str, Any], t: float) -> None:
        event = Event(t, source, level, name, facts)
        self.events.append(event)
        for listener in self.listeners:
            listener(event)

    def on_event(self, event: BusEvent) -> None:
        """The daemon's bus subscriber: keeps info and above (an exception as an error);
        a database probe that starts or stops failing becomes the lab's ``probe_failed``
        or ``probe_ok``."""
        if event.name == "probe_observed":
            self._probe(event.facts)
            return
        level = event.level
        if level is Level.DEBUG:
            return
        kept = "error" if level is Level.EXCEPTION else level.value
        self._add("daemon", kept, event.name, dict(event.facts), time.monotonic())

    def _probe(self, facts: Mapping[str, Any]) -> None:
        # Stamped at the instant the probe concluded (``at + latency``, the daemon's
        # clock), so the timeline shows the first failing probe exactly.
        if facts.get("probe") != "database":
            return
        node, ok = str(facts["target"]), bool(facts["ok"])
        if self._probe_ok.get(node, True) == ok:
            return
        self._probe_ok[node] = ok
        self.demo(
            "probe_ok" if ok else "probe_failed",
            t=float(facts["at"]) + float(facts["latency"]),
            node=node,
            probe=facts["probe"],
            detail=facts["detail"],
        )

    def demo(self, event: str, *, t: float | None = None, **facts: Any) -> None:
        """Something the lab did or saw (a kill, the proxy switching, a key)."""
        self.forward.info(f"demo.{event}", **facts)
        self._add("demo", "info", event, facts, time.monotonic() if t is None else t)

    def find(
        self, name: str, since: float = 0.0, source: str | None = None, **match: Any
    ) -> Event | None:
        for e in self.events:
            if (
                e.t >= since
                and e.name == name
                and (source is None or e.source == source)
                and all(e.facts.get(k) == v for k, v in match.items())
            ):
                return e
        return None


# --------------------------------------------------------------------------- failover address


class FailoverAddress:
    """The address clients use: forwards every request to the current stack.
    ``PUT /route {"to": NODE}`` switches it (the failover's last step);
    ``GET /route`` tells where it points."""

    def __init__(
        self,
        upstreams: dict[str, str],
        current: str,
        events: EventLog,
        timeout: float = 2.0,
    ) -> None:
        self.upstreams = upstreams
        self.current = current
        self.events = events
        self.timeout = timeout
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout), auto_decompress=False
        )
        app = web.Application()
        app.add_routes(
            [
                web.get("/route", self._get_route),
                web.put("/route", self._put_route),
                web.route("*", "/{tail:.*}", self._forward),
            ]
        )
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=1.0
        )
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _get_route(self, request: web.Request) -> web.Response:
        return web.json_response({"to": self.current, "upstream": self.upstreams[self.current]})

    async def _put_route(self, request: web.Request) -> web.Response:
        try:
            data = await request.json()
        except ValueError:
            return web.json_response({"error": "body is not JSON"}, status=400)
        target = data.get("to") if isinstance(data, dict) else None
        if target not in self.upstreams:
            known = ", ".join(sorted(self.upstreams))
            return web.json_response(
                {"error": f'expected {{"to": NODE}} with NODE one of {known}, got {data!r}'},
                status=400,
            )
        previous, self.current = self.current, str(target)
        if previous != target:
            self.events.demo("traffic_switched", previous=previous, to=target)
        return web.json_response({"to": target, "previous": previous})

    async def _forward(self, request: web.Request) -> web.Response:
        name = self.current
        assert self._session is not None
        body = await request.read()
        headers = {}
        if "Content-Type" in request.headers:
            headers["Content-Type"] = request.headers["Content-Type"]
        try:
            async with self._session.request(
                request.method,
                self.upstreams[name] + request.path_qs,
                data=body or None,
                headers=headers,
            ) as resp:
                payload = await resp.read()
                return web.Response(
                    status=resp.status,
                    body=payload,
                    headers={
                        "Content-Type": resp.headers.get(
                            "Content-Type", "application/octet-stream"
                        ),
                        "X-Served-By": name,
                    },
                )
        except TimeoutError:
            error = f"{name}: no answer within {self.timeout:g}s"
        except aiohttp.ClientError as exc:
            error = f"{name}: {type(exc).__name__}"
        return web.json_response({"error": error}, status=502, headers={"X-Served-By": name})


# --------------------------------------------------------------------------- load generator


@dataclass(frozen=True)
class Ack:
    app: str  # the stack that answered 201
    id: int
    t: float  # monotonic


class LoadGenerator:
    """A steady ``rate`` of ``POST /orders`` through the failover address. Counts
    what clients see and remembers every acknowledged order (stack, id)."""

    def __init__(self, url: str, rate: float = WRITE_RATE, timeout: float = 2.0) -> None:
        self.url = url.rstrip("/") + "/orders"
        self.rate = rate
        self.timeout = timeout
        self.attempted = 0
        self.errors = 0
        self.acks: list[Ack] = []
        self.last_error: str | None = None
        self._recent_acks: deque[float] = deque()
        self._recent_errors: deque[float] = deque()
        self._inflight: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def acknowledged(self) -> int:
        return len(self.acks)

    def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        self._task = asyncio.create_task(self._run(), name="demo-load")

    async def stop(self) -> None:
        """Stop sending and wait for the requests in flight (each bounded by ``timeout``),
        so the counts are final."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _run(self) -> None:
        period = 1.0 / self.rate
        due = time.monotonic()
        while True:
            # At most one request per period, on an absolute schedule: a slow answer
            # does not lower the rate, it only adds to the requests in flight.
            if len(self._inflight) < 4 * self.rate:
                task = asyncio.create_task(self._one())
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)
            due += period
            await asyncio.sleep(max(0.0, due - time.monotonic()))

    async def _one(self) -> None:
        assert self._session is not None
        self.attempted += 1
        try:
            async with self._session.post(self.url, json={}) as resp:
                data = await resp.json(content_type=None)
                if resp.status == 201 and isinstance(data, dict):
                    ack = Ack(str(data.get("app")), int(data["id"]), time.monotonic())
                    self.acks.append(ack)
                    self._recent_acks.append(ack.t)
                    return
                reason = data.get("error") if isinstance(data, dict) else None
                self._error(f"HTTP {resp.status}" + (f" {reason}" if reason else ""))
        except TimeoutError:
            self._error(f"no answer within {self.timeout:g}s")
        except (aiohttp.ClientError, ValueError, KeyError, TypeError) as exc:
            self._error(type(exc).__name__)

    def _error(self, reason: str) -> None:
        self.errors += 1
        self.last_error = reason
        self._recent_errors.append(time.monotonic())

    def rates(self, window: float = 2.0) -> tuple[float, float]:
        """Acknowledged and failed writes per second over the last ``window`` seconds."""
        horizon = time.monotonic() - window
        for q in (self._recent_acks, self._recent_errors):
            while q and q[0] < horizon:
                q.popleft()
        return len(self._recent_acks) / window, len(self._recent_errors) / window


# --------------------------------------------------------------------------- the lab


@dataclass(frozen=True)
class LabSettings:
    threshold: float = 3.0
    interval: float = INTERVAL
    probe_timeout: float = PROBE_TIMEOUT
    write_rate: float = WRITE_RATE
    # A never-started initdb data dir to copy (lab.make_template) instead of initdb.
    template: Path | None = None
    # Where the journal goes; default: inside the lab dir (tmpfs when available).
    state_dir: Path | None = None
    synchronous: bool = True
    # PostgreSQL replication-link settings (watchdogd.demo.lab profiles): tuned | stock.
    profile: str = "tuned"


@dataclass
class Counts:
    attempted: int
    acknowledged: int
    found: int
    errors: int
    new_primary: str

    @property
    def lost(self) -> int:
        return self.acknowledged - self.found

    def line(self) -> str:
        return (
            f"writes: {self.attempted} attempted, {self.acknowledged} acknowledged, "
            f"{self.found} of them found on the new primary {self.new_primary} "
            f"({self.lost} lost); {self.errors} refused or unanswered"
        )


class Lab:
    """Everything ``watchdogd demo`` runs, built by ``start()`` and torn down by
    ``close()`` (idempotent, bounded, and safe after a partial start)."""

    def __init__(self, settings: LabSettings, *, keep: bool = False) -> None:
        self.settings = settings
        self.keep = keep
        self.dir = Path(tempfile.mkdtemp(prefix="watchdogd-demo-", dir=lab_root()))
        # The postgres user must traverse it to reach its data dirs.
        self.dir.chmod(0o755)
        self.pair: PgPair | None = None
        self.apps: dict[str, DemoApp] = {}
        self.proxy: FailoverAddress | None = None
        self.load: LoadGenerator | None = None
        self.daemon: Daemon | None = None
        self.events = EventLog(None)
        self.hung: set[str] = set()
        self.metrics_port = 0
        self._log_file: TextIO | None = None
        self._closed = False

    # -- building

    @property
    def socket(self) -> Path:
        return self.dir / "run" / "control.sock"

    @property
    def log_path(self) -> Path:
        return self.dir / "watchdogd.log"

    async def start(self) -> None:
        bin_dir = find_pg_bin()
        if bin_dir is None:
            raise DemoError(NO_POSTGRES)
        self._log_file = self.log_path.open("a", buffering=1)
        self.events.forward = setup_logging("json", "info", cluster="demo", stream=self._log_file)
        try:
            # Blocking (about a second); nothing else runs in the loop yet.
            self.pair = PgPair.create(
                self.dir / "pg",
                bin_dir=bin_dir,
                template=self.settings.template,
                profile=self.settings.profile,
            )
            if self.settings.synchronous:
                self._make_synchronous(self.pair)
        except LabError as exc:
            raise DemoError(f"cannot build the PostgreSQL pair: {exc}") from None
        pair = self.pair
        self.apps = {
            NODE_A: DemoApp(NODE_A, pair.primary.dsn),
            NODE_B: DemoApp(NODE_B, pair.standby.dsn, maintenance=True),
        }
        for app in self.apps.values():
            await app.start()
        self.proxy = FailoverAddress(
            {name: app.url for name, app in self.apps.items()}, NODE_A, self.events
        )
        await self.proxy.start()
        self.load = LoadGenerator(self.proxy.url, self.settings.write_rate)
        try:
            cfg = configmod.parse(self.config())
        except configmod.ConfigError as exc:  # a bug here, not the user's: say what
            raise DemoError(f"demo config rejected: {'; '.join(exc.problems)}") from None
        self.daemon = Daemon(cfg, log=self.events.forward)
        self.daemon.bus.subscribe(self.events.on_event)
        await self.daemon.start()

    @staticmethod
    def _make_synchronous(pair: PgPair) -> None:
        # Only the primary's own settings (after the base backup): once promoted, the
        # standby must not wait for a synchronous standby it does not have.
        pair.primary.execute("ALTER SYSTEM SET synchronous_standby_names = 'standby'")
        pair.primary.execute("SELECT pg_reload_conf()")
        sql = "SELECT sync_state FROM pg_stat_replication WHERE application_name = 'standby'"
        deadline = time.monotonic() + 10.0
        while pair.primary.execute(sql) != "sync":
            if time.monotonic() > deadline:
                raise LabError("the standby did not become a synchronous standby within 10s")
            time.sleep(0.05)

    def config(self) -> dict[str, Any]:
        """The daemon's config: the issue's five steps against this lab."""
        assert self.pair is not None and self.proxy is not None
        s, fmt = self.settings, format_duration
        self.metrics_port = free_port()
        cfg = pair_config(
            "demo",
            (NODE_A, self.pair.primary.dsn, self.apps[NODE_A]),
            (NODE_B, self.pair.standby.dsn, self.apps[NODE_B]),
            self.proxy.url,
            interval=fmt(s.interval),
            probe_timeout=fmt(s.probe_timeout),
            threshold=fmt(s.threshold),
            promote_timeout="10s",
        )
        cfg["failover"]["fence_steps"] = [
            {"name": "fence_old_primary", "action": "fence", "timeout": "5s"}
        ]
        return {
            **cfg,
            "metrics": {"listen": f"127.0.0.1:{self.metrics_port}"},
            "control": {"socket": str(self.socket)},
            "log": {"format": "json", "level": "info"},
            "state_dir": str(s.state_dir or self.dir / "state"),
        }

    # -- driving

    def server(self, node: str) -> PgServer:
        assert self.pair is not None
        return self.pair.primary if node == NODE_A else self.pair.standby

    def roles(self) -> tuple[str, str]:
        assert self.daemon is not None
        primary, standby = self.daemon.roles()
        return primary.name, standby.name

    async def kill(self, node: str) -> str:
        server = self.server(node)
        if not server.is_running():
            return f"{node}: database already down"
        t = time.monotonic()
        await asyncio.to_thread(server.kill)
        self.hung.discard(node)
        self.events.demo("killed", t=t, node=node, signal="SIGKILL")
        return f"{node}: database killed (SIGKILL)"

    async def hang(self, node: str) -> str:
        server = self.server(node)
        if not server.is_running():
            return f"{node}: database is down, nothing to hang"
        if node in self.hung:
            return f"{node}: database already hung"
        t = time.monotonic()
        await asyncio.to_thread(server.sigstop)
        self.hung.add(node)
        self.events.demo("hung", t=t, node=node, signal="SIGSTOP")
        return f"{node}: database hung (SIGSTOP)"

    async def resume(self) -> str:
        if not self.hung:
            return "no hung database to continue"
        names = sorted(self.hung)
        for node in names:
            await asyncio.to_thread(self.server(node).sigcont)
            self.hung.discard(node)
            self.events.demo("continued", node=node, signal="SIGCONT")
        return f"{', '.join(names)}: database continued (SIGCONT)"

    async def command(self, command: str, **args: Any) -> str:
        """A control command as an operator would send it; the answer as one line."""
        assert self.daemon is not None
        user = pwd.getpwuid(os.getuid()).pw_name
        peer = Peer(pid=os.getpid(), uid=os.getuid(), gid=os.getgid(), user=user)
        try:
            result = await self.daemon.handle_command(command, args, peer)
        except CommandError as exc:
            return f"{command}: {exc}"
        self.events.demo("command", command=command, result=result)
        return f"{command}: " + ", ".join(
            f"{k} {v}" for k, v in result.items() if k != "plan" and not isinstance(v, dict)
        )

    async def verify(self) -> Counts:
        """Which acknowledged orders the current primary holds (by stack and id)."""
        assert self.load is not None and self.pair is not None
        primary = self.roles()[0]
        acked = {(a.app, a.id) for a in self.load.acks}
        found: set[tuple[str, int]] = set()
        if acked:
            try:
                conn = await asyncpg.connect(self.server(primary).dsn, timeout=5)
            except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
                raise DemoError(f"cannot read orders on {primary}: {exc}") from None
            try:
                rows = await conn.fetch(
                    "SELECT app, id FROM orders WHERE id = ANY($1::bigint[])",
                    [i for _, i in acked],
                    timeout=5,
                )
            finally:
                await conn.close()
            found = {(r["app"], r["id"]) for r in rows} & acked
        return Counts(
            attempted=self.load.attempted,
            acknowledged=len(acked),
            found=len(found),
            errors=self.load.errors,
            new_primary=primary,
        )

    # -- teardown

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.load is not None:
            await _bounded(self.load.stop(), 5.0)
        if self.daemon is not None:
            await _bounded(self.daemon.stop(), 15.0)
        for app in self.apps.values():
            await _bounded(app.stop(), 3.0)
        if self.proxy is not None:
            await _bounded(self.proxy.stop(), 3.0)
        if self.pair is not None:
            # SIGKILL reaches a SIGSTOPped server too; nothing is left behind.
            self.pair.destroy(keep_dir=True)
        reset_logging()
        if self._log_file is not None:
            self._log_file.close()
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)


async def _bounded(aw: Any, seconds: float) -> None:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(seconds):
            await aw


# --------------------------------------------------------------------------- timeline


def _steps_of(fo: FailoverRecord) -> list[str]:
    return fo.plan or [s.name for s in fo.steps]


def timeline(lab: Lab, fo: FailoverRecord, since: float = 0.0) -> list[str]:
    """The story of one failover, t = 0 at what set it off (the kill, the hang, or
    the decision when an operator asked)."""
    events = [e for e in lab.events.events if e.t >= since]
    started = next(
        (e for e in events if e.name == "failover_started" and e.facts.get("failover_id") == fo.id),
        None,
    )
    if started is None:
        return [f"failover {fo.id}: no events recorded"]
    cause = next(
        (e for e in reversed(events) if e.name in ("killed", "hung") and e.t <= started.t),
        None,
    )
    t0 = cause.t if cause is not None else started.t
    finished = next(
        (
            e
            for e in events
            if e.name.startswith("failover_")
            and e.name not in ("failover_started", "failover_resumed")
            and e.facts.get("failover_id") == fo.id
        ),
        None,
    )
    end = finished.t if finished is not None else time.monotonic()
    rows: list[tuple[float, str]] = []

    def add(t: float, text: str) -> None:
        rows.append((t - t0, text))

    if cause is not None:
        add(
            cause.t,
            f"{cause.facts['node']} database {cause.name} ({cause.facts.get('signal')})",
        )
    first_fail = next(
        (
            e
            for e in events
            if e.name == "probe_failed"
            and e.facts.get("node") == fo.from_node
            and e.t >= t0 - INTERVAL
            and e.t <= started.t
        ),
        None,
    )
    if first_fail is not None:
        add(first_fail.t, f"first failing probe: {fo.from_node}: {first_fail.facts['detail']}")
    down = next(
        (e for e in events if e.name == "primary_down" and t0 <= e.t <= started.t + 0.001),
        None,
    )
    if down is not None:
        add(
            down.t,
            f"primary_down after {down.facts.get('outage_seconds', 0):.1f}s outage "
            f"(standby sees primary: {down.facts.get('standby_sees_primary')})",
        )
    add(started.t, f"failover_started ({fo.trigger}, {fo.kind}): {fo.reason}")
    for e in events:
        if e.facts.get("failover_id") != fo.id or e.t > end + 0.001:
            continue
        if e.name in ("step_completed", "step_failed"):
            mark = "ok " if e.name == "step_completed" else "FAILED "
            what = e.facts.get("detail") or e.facts.get("error") or ""
            add(
                e.t,
                f"  {mark}{e.facts['step']:<24} {float(e.facts.get('seconds', 0)):7.3f}s  {what}",
            )
    switch = next((e for e in events if e.name == "traffic_switched" and e.t >= started.t), None)
    if switch is not None:
        add(switch.t, f"failover address now routes to {switch.facts['to']}")
    if finished is not None:
        error = finished.facts.get("error")
        add(finished.t, f"{finished.name}" + (f": {error}" if error else ""))
    if lab.load is not None:
        before = [a for a in lab.load.acks if a.app == fo.from_node and a.t <= t0]
        after = [a for a in lab.load.acks if a.app == fo.to_node and a.t >= started.t]
        if before:
            add(before[-1].t, f"last write acknowledged by {fo.from_node} (order {before[-1].id})")
        if after:
            add(after[0].t, f"first write acknowledged by {fo.to_node} (order {after[0].id})")
    rows.sort()
    origin = {"killed": "the kill", "hung": "the hang"}.get(cause.name if cause else "", "")
    out = [f"failover {fo.id} timeline (t = 0 at {origin or 'the decision'}):"]
    out += [f"  {t:+8.3f}s  {text}" for t, text in rows]
    return out


# --------------------------------------------------------------------------- the view


_STATE_COLOURS = MappingProxyType(
    {
        "watching": "32",
        "suspect": "33",
        "failing_over": "1;31",
        "failed_over": "36",
        "paused": "35",
        "blocked": "1;31",
        "failed": "1;31",
    }
)
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _fmt_bytes(n: int | None) -> str:
    return "?" if n is None else format_bytes(n)


def _fmt_obs(obs: Any) -> str:
    if not obs:
        return "-"
    if obs.get("ok"):
        return f"ok {obs['latency'] * 1000:.0f}ms"
    return f"FAIL ({obs.get('detail', '')})"


def _event_line(e: Event) -> str | None:
    """One line for an event worth showing (plain view and the live view's tail)."""
    f = e.facts
    name = e.name
    if e.source == "demo":
        if name in ("killed", "hung", "continued"):
            return f"{f['node']} database {name} ({f['signal']})"
        if name == "traffic_switched":
            return f"failover address: {f['previous']} -> {f['to']}"
        if name == "probe_failed":
            return f"probe failed: {f['node']}/{f['probe']}: {f['detail']}"
        if name == "probe_ok":
            return f"probe ok again: {f['node']}/{f['probe']}"
        return None
    if name == "state_changed":
        return f"state {f.get('previous')} -> {f.get('state')}: {f.get('reason')}"
    if name == "primary_down":
        return f"primary_down: {', '.join(f.get('failing', []))}"
    if name == "failover_started":
        return f"failover_started ({f.get('trigger')}): {f.get('reason')}"
    if name == "step_completed":
        return f"step {f.get('step')} ok in {f.get('seconds')}s: {f.get('detail')}"
    if name in ("step_failed", "step_retry"):
        return f"step {f.get('step')} {name.removeprefix('step_')}: {f.get('error')}"
    if name.startswith("failover_"):
        error = f.get("error")
        return name + (f": {error}" if error else "")
    if name in ("split_brain", "fence_step_completed", "paused", "resumed", "acked"):
        return f"{name}: " + ", ".join(f"{k}={v}" for k, v in f.items() if k != "note")
    if e.level in ("warning", "error"):
        return f"{name}: " + ", ".join(f"{k}={v}" for k, v in f.items())
    return None


class View:
    """Renders the lab's state: a full-screen ANSI frame on a terminal, else plain
    log lines (events as they happen, a status line every few seconds)."""

    def __init__(self, lab: Lab, out: TextIO, live: bool) -> None:
        self.lab = lab
        self.out = out
        self.live = live
        self.started = time.monotonic()
        self.message = ""
        self.tail: deque[str] = deque(maxlen=8)
        self._last_plain_status = 0.0
        lab.events.listeners.append(self._on_event)

    def stamp(self, t: float | None = None) -> str:
        return f"[{(t if t is not None else time.monotonic()) - self.started:7.2f}s]"

    def _on_event(self, e: Event) -> None:
        line = _event_line(e)
        if line is None:
            return
        text = f"{self.stamp(e.t)} {line}"
        self.tail.append(text)
        if not self.live:
            print(text, file=self.out, flush=True)

    def say(self, text: str) -> None:
        self.message = text
        if not self.live:
            print(f"{self.stamp()} > {text}", file=self.out, flush=True)

    def status_line(self) -> str:
        lab = self.lab
        assert lab.daemon is not None and lab.load is not None and lab.proxy is not None
        st = lab.daemon.status()
        ok_rate, err_rate = lab.load.rates()
        lag = st["lag"]
        return (
            f"{self.stamp()} state {st['state']} | outage {st['outage_seconds']:.1f}s | "
            f"lag {_fmt_bytes(lag['bytes'])} | primary {st['roles']['primary']} | "
            f"traffic -> {lab.proxy.current} | writes {ok_rate:.0f}/s ok, {err_rate:.0f}/s failed "
            f"(acked {lab.load.acknowledged}, failed {lab.load.errors})"
        )

    def tick(self) -> None:
        if self.live:
            self._frame()
        elif time.monotonic() - self._last_plain_status >= 5.0:
            self._last_plain_status = time.monotonic()
            print(self.status_line(), file=self.out, flush=True)

    def _frame(self) -> None:
        lab = self.lab
        d, load, proxy, pair = lab.daemon, lab.load, lab.proxy, lab.pair
        assert d is not None and load is not None and proxy is not None and pair is not None
        st = d.status()
        state = st["state"]
        colour = _STATE_COLOURS.get(state, "0")
        lag = st["lag"]
        streaming = {True: "streaming", False: "NOT streaming", None: "-"}[lag["streaming"]]
        lag_s = f"{lag['seconds']:.2f}s" if lag["seconds"] is not None else "?"
        ok_rate, err_rate = load.rates()
        armed = "armed" if st["armed"] else "disarmed"
        lines = [
            f"\x1b[1mwatchdogd demo\x1b[0m  cluster demo  interval {d.config.probe.interval:g}s  "
            f"threshold {d.config.failover.outage_threshold:g}s  lab {lab.dir}",
            "",
            f"state    \x1b[{colour}m{state}\x1b[0m ({armed}"
            + (", paused" if st["paused"] else "")
            + (", awaiting ack: press a" if st["awaiting_ack"] else "")
            + ")",
            f"reason   {st['reason']}",
            f"outage   {st['outage_seconds']:.1f}s of {d.config.failover.outage_threshold:g}s",
            f"lag      {_fmt_bytes(lag['bytes'])} / {lag_s}  ({streaming}; "
            + ("synchronous replication)" if lab.settings.synchronous else "asynchronous)"),
        ]
        for node in st["nodes"]:
            name = node["name"]
            server = lab.server(name)
            app = lab.apps[name]
            db_state = (
                "hung (SIGSTOP)"
                if name in lab.hung
                else ("running" if server.is_running() else "down")
            )
            lines.append(
                f"{node['role']:<8} {name}  db :{server.port} {db_state:<14} "
                f"probe {_fmt_obs(node['database'])}  |  app :{app.port} "
                f"{'maintenance' if app.maintenance else 'serving'}  "
                f"probe {_fmt_obs(node['app'])}"
            )
        lines += [
            f"traffic  failover address {proxy.url} -> {proxy.current}",
            f"clients  {ok_rate:4.0f} writes/s acknowledged, {err_rate:4.0f}/s failing   "
            f"(attempted {load.attempted}, acknowledged {load.acknowledged}, "
            f"failed {load.errors}"
            + (f", last error: {load.last_error}" if load.errors else "")
            + ")",
            "",
        ]
        fo = d.state.last
        if fo is None:
            lines.append("failover none yet")
        else:
            outcome = fo.outcome or "running"
            lines.append(f"failover {fo.id} ({fo.trigger}, {fo.kind}): {outcome}")
            for name in _steps_of(fo):
                rec = next((s for s in fo.steps if s.name == name), None)
                if rec is None or rec.started_at is None:
                    lines.append(f"  [ ] {name}")
                elif rec.outcome is None:
                    lines.append(f"  [>] {name:<24} running {time.time() - rec.started_at:5.1f}s")
                elif rec.outcome == "ok":
                    secs = (rec.finished_at or 0) - rec.started_at
                    lines.append(f"  [x] {name:<24} {secs:6.3f}s  {rec.detail or ''}")
                else:
                    lines.append(f"  [!] {name:<24} {rec.outcome}: {rec.error or ''}")
        lines += ["", "events", *[f"  {t}" for t in self.tail], ""]
        lines += KEY_HELP_LINES
        if self.message:
            lines.append(f"> {self.message}")
        width = shutil.get_terminal_size((120, 40)).columns
        body = "\x1b[K\n".join(_clip(line, width) for line in lines)
        self.out.write("\x1b[H" + body + "\x1b[K\x1b[J")
        self.out.flush()


def _clip(line: str, width: int) -> str:
    """Cut a line to the terminal width, counting only visible characters."""
    visible = 0
    out = []
    i = 0
    while i < len(line):
        m = _ANSI.match(line, i)
        if m:
            out.append(m.group())
            i = m.end()
            continue
        if visible >= width - 1:
            break
        out.append(line[i])
        visible += 1
        i += 1
    return "".join(out) + "\x1b[0m"


# --------------------------------------------------------------------------- running it


class Demo:
    def __init__(
        self, scenario: str, threshold: float, keep: bool, out: TextIO = sys.stdout
    ) -> None:
        self.scenario = scenario
        self.threshold = threshold
        self.keep = keep
        self.out = out
        self.live = out.isatty()
        self.stop = asyncio.Event()
        self.signum: int | None = None
        self.keys: asyncio.Queue[str] = asyncio.Queue()
        self._term: list[Any] | None = None
        self._stdin_fd: int | None = None
        self._entered_screen = False
        self._ticker: asyncio.Task[None] | None = None

    def _on_signal(self, signum: int) -> None:
        if self.signum is None:
            self.signum = signum
        self.stop.set()

    def print(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        for sig in signals:
            loop.add_signal_handler(sig, self._on_signal, sig)
        lab = Lab(LabSettings(threshold=self.threshold), keep=self.keep)
        self.print(f"lab: {lab.dir}")
        code = 1
        try:
            code = await self._run(lab)
        except Interrupted as exc:
            code = 128 + exc.signum
        except DemoError as exc:
            self._leave_screen()
            self.print(f"demo: FAILED: {exc}")
            code = 1
        finally:
            self._leave_screen()
            self._stop_keys()
            if self.signum is not None:
                self.print(f"demo: {signal.Signals(self.signum).name}: stopping everything")
                code = 128 + self.signum
            await lab.close()
            self.print(f"lab kept in {lab.dir}" if self.keep else f"removed {lab.dir}")
            for sig in signals:
                loop.remove_signal_handler(sig)
        return code

    def _check(self) -> None:
        if self.signum is not None:
            raise Interrupted(self.signum)

    async def _run(self, lab: Lab) -> int:
        self.print("building the lab: PostgreSQL primary + synchronous standby, two app stacks")
        await lab.start()
        self._check()
        assert lab.pair is not None and lab.proxy is not None and lab.load is not None
        self.print(
            f"  {NODE_A} (primary): postgres pid {lab.pair.primary.pid} port "
            f"{lab.pair.primary.port}, app {lab.apps[NODE_A].url}"
        )
        self.print(
            f"  {NODE_B} (standby): postgres pid {lab.pair.standby.pid} port "
            f"{lab.pair.standby.port}, app {lab.apps[NODE_B].url} (maintenance)"
        )
        self.print(
            f"  failover address {lab.proxy.url}; {lab.settings.write_rate:g} writes/s through it"
        )
        self.print(
            f"  watchdogd in-process: metrics http://127.0.0.1:{lab.metrics_port}/metrics, "
            f"control: watchdogctl --socket {lab.socket} status"
        )
        lab.load.start()
        view = View(lab, self.out, self.live)
        if self.live:
            self.out.write("\x1b[?1049h\x1b[?25l\x1b[H\x1b[J")
            self._entered_screen = True
        self._ticker = asyncio.create_task(self._tick(view), name="demo-view")
        try:
            if self.scenario == "interactive":
                keys = self._start_keys()
                if not self.live:
                    self.print(
                        f"running; {KEY_HELP} (or Ctrl-C)"
                        if keys
                        else "running; stdin gives no keys: Ctrl-C or SIGTERM stops the demo"
                    )
                await self._interactive(lab, view)
                return 0
            return await self._scenario(lab, view)
        finally:
            await self._end_view()

    async def _end_view(self) -> None:
        """Stop refreshing, then leave the full screen: what is printed next stays."""
        ticker, self._ticker = self._ticker, None
        if ticker is not None:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
        self._leave_screen()

    def _leave_screen(self) -> None:
        if self._entered_screen:
            self._entered_screen = False
            self.out.write("\x1b[?25h\x1b[?1049l")
            self.out.flush()

    async def _tick(self, view: View) -> None:
        while True:
            view.tick()
            await asyncio.sleep(0.25)

    # -- unattended

    async def _wait(self, check: Callable[[], bool], within: float, what: str) -> None:
        deadline = time.monotonic() + within
        while not check():
            self._check()
            if time.monotonic() > deadline:
                raise DemoError(f"{what} within {within:g}s")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.05):
                    await self.stop.wait()

    async def _scenario(self, lab: Lab, view: View) -> int:
        d, load = lab.daemon, lab.load
        assert d is not None and load is not None
        await self._wait(
            lambda: d.status()["state"] == "watching" and load.acknowledged >= WARM_WRITES,
            30.0,
            "the lab was not watching with writes acknowledged",
        )
        primary, standby = lab.roles()
        since = time.monotonic()
        if self.scenario == "kill-primary":
            await lab.kill(primary)
        else:
            await lab.hang(primary)
        await self._wait(
            lambda: d.status()["state"] in ("failed_over", "failed", "blocked"),
            self.threshold + 30.0,
            "no failover",
        )
        st = d.status()
        fo = d.state.last
        if st["state"] != "failed_over" or fo is None or fo.outcome != "completed":
            raise DemoError(f"the failover did not complete: {st['state']}: {st['reason']}")
        await self._wait(
            lambda: sum(1 for a in load.acks if a.app == standby) >= WARM_WRITES,
            15.0,
            f"no {WARM_WRITES} writes acknowledged through the new primary {standby}",
        )
        await load.stop()
        counts = await lab.verify()
        await self._end_view()
        self.print(view.status_line())
        for line in timeline(lab, fo, since):
            self.print(line)
        self.print(counts.line())
        missing = [step for step in FIVE_STEPS if step not in _steps_of(fo)]
        if counts.lost:
            self.print(f"demo: FAILED: {counts.lost} acknowledged write(s) lost")
            return 1
        if missing:
            self.print(f"demo: FAILED: steps missing from the sequence: {', '.join(missing)}")
            return 1
        self.print(f"demo: ok: {primary} -> {standby}, no acknowledged write lost")
        return 0

    # -- interactive

    def _start_keys(self) -> bool:
        """Keys from stdin: cbreak mode on a terminal; a pipe works too (one key per
        character), so the demo can be scripted. No stdin (or /dev/null): no keys."""
        try:
            fd = sys.stdin.fileno()
        except (AttributeError, OSError, ValueError):
            return False
        if os.isatty(fd):
            self._term = termios.tcgetattr(fd)
            tty.setcbreak(fd)
        try:
            asyncio.get_running_loop().add_reader(fd, self._read_key, fd)
        except (OSError, ValueError):
            self._restore_term()
            return False
        self._stdin_fd = fd
        return True

    def _read_key(self, fd: int) -> None:
        try:
            data = os.read(fd, 64)
        except OSError:
            data = b""
        if not data:  # EOF: keep running, just without keys
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
        self._restore_term()

    def _restore_term(self) -> None:
        if self._term is not None:
            with contextlib.suppress(termios.error, OSError, ValueError):
                termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, self._term)
            self._term = None

    async def _interactive(self, lab: Lab, view: View) -> None:
        view.say("running: " + ("press a key" if self.live else "waiting for keys or Ctrl-C"))
        seen_failovers: set[str] = set()
        while True:
            self._check()
            getter = asyncio.create_task(self.keys.get())
            stopper = asyncio.create_task(self.stop.wait())
            done, _ = await asyncio.wait(
                {getter, stopper}, timeout=0.25, return_when=asyncio.FIRST_COMPLETED
            )
            for task in (getter, stopper):
                if task not in done:
                    task.cancel()
            self._report_finished(lab, view, seen_failovers)
            if getter not in done:
                continue
            key = getter.result()
            if key == "q":
                view.say("quitting")
                await self._end_view()
                await self._print_history(lab)
                return
            view.say(await self._key(lab, key))

    def _report_finished(self, lab: Lab, view: View, seen: set[str]) -> None:
        """In the plain view, print each failover's timeline once it ends."""
        assert lab.daemon is not None
        fo = lab.daemon.state.last
        if fo is None or fo.outcome is None or fo.id in seen:
            return
        seen.add(fo.id)
        if not self.live:
            for line in timeline(lab, fo):
                self.print(line)

    async def _key(self, lab: Lab, key: str) -> str:
        primary, _ = lab.roles()
        if key == "k":
            return await lab.kill(primary)
        if key == "h":
            return await lab.hang(primary)
        if key == "c":
            return await lab.resume()
        if key == "p":
            return await lab.command("pause", reason="paused from the demo")
        if key == "r":
            return await lab.command("resume")
        if key == "f":
            return await lab.command("failover", force=True)
        if key == "s":
            return await lab.command("switchover")
        if key == "a":
            return await lab.command("ack")
        return f"unknown key {key!r}; {KEY_HELP}"

    async def _print_history(self, lab: Lab) -> None:
        """Every failover's timeline, then the write accounting against the current
        primary (when it can be asked)."""
        assert lab.daemon is not None and lab.load is not None
        for fo in lab.daemon.state.failovers:
            if fo.steps or fo.outcome:
                for line in timeline(lab, fo):
                    self.print(line)
        await lab.load.stop()
        primary = lab.roles()[0]
        if lab.server(primary).is_running() and primary not in lab.hung:
            with contextlib.suppress(DemoError):
                self.print((await lab.verify()).line())
                return
        load = lab.load
        self.print(
            f"writes: {load.attempted} attempted, {load.acknowledged} acknowledged, "
            f"{load.errors} failed (the primary {primary} cannot be asked which it holds)"
        )


def main(scenario: str = "interactive", *, threshold: str = "3s", keep: bool = False) -> int:
    """``watchdogd demo``: 0 done, 1 the story failed, 2 bad input or no PostgreSQL,
    128+N stopped by signal N."""
    try:
        seconds = parse_duration(threshold)
    except ValueError as exc:
        print(f"watchdogd demo: --threshold: {exc}", file=sys.stderr)
        return 2
    if seconds < INTERVAL:
        print(
            f"watchdogd demo: --threshold: must be at least the probe interval "
            f"({INTERVAL:g}s), got {threshold!r}",
            file=sys.stderr,
        )
        return 2
    if scenario not in ("interactive", "kill-primary", "hang-primary"):
        print(f"watchdogd demo: unknown scenario {scenario!r}", file=sys.stderr)
        return 2
    if find_pg_bin() is None:
        print(NO_POSTGRES, file=sys.stderr)
        return 2
    return asyncio.run(Demo(scenario, seconds, keep).run())


__all__ = [
    "FIVE_STEPS",
    "NO_POSTGRES",
    "Counts",
    "DemoError",
    "EventLog",
    "FailoverAddress",
    "Lab",
    "LabSettings",
    "LoadGenerator",
    "main",
    "timeline",
]
