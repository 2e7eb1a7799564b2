"""The daemon's root: build everything from the config, start, serve until a signal,
stop. What runs in between lives beside it: the probe cycle (``cycle``), failovers and
fences (``sequences``), operator commands (``commands``), reload (``reload``) and what
operators and witnesses read (``views``). Every decision they need is in ``policy``.

Durable facts live in the journal (``record`` writes it before anything is acted on);
news goes out as events (``emit``) to subscribers: the log, the metrics, the webhooks.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from watchdogd import __version__, engines, policy
from watchdogd.control import ControlServer, Peer
from watchdogd.core import clock as core_clock
from watchdogd.core import httpd as web
from watchdogd.core import memory
from watchdogd.core.events import Bus, log_subscriber
from watchdogd.core.feed import EventFeed
from watchdogd.core.model import Config, NodeConfig
from watchdogd.core.secrets import Secrets
from watchdogd.daemon import reload as reloading
from watchdogd.daemon.commands import Commands
from watchdogd.daemon.cycle import Latest, ProbeCycle, make_detector
from watchdogd.daemon.fleet import Fleet
from watchdogd.daemon.readiness import EXPENSIVE_INTERVAL, ReadinessRunner
from watchdogd.daemon.schedule import PROBE, Schedule
from watchdogd.daemon.sequences import Sequences
from watchdogd.daemon.subscribers import metrics_subscriber, notify_subscriber
from watchdogd.daemon.views import Views
from watchdogd.engines import Engine
from watchdogd.logging import setup_logging
from watchdogd.metrics import Metrics, make_app, raise_fd_limit, start_http
from watchdogd.notify import Notifier
from watchdogd.policy import Policy
from watchdogd.state.journal import Journal, JournalError, JournalState, apply
from watchdogd.systemd import SystemdNotifier, watchdog_advice

if TYPE_CHECKING:
    import aiohttp


class Daemon:
    def __init__(
        self,
        config: Config,
        *,
        log: Any = None,
        clock: Callable[[], float] = core_clock.now,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.clock = clock
        self.wall = wall
        self.secrets = Secrets(config.secrets)
        if log is None:
            log = setup_logging(
                config.log.format, config.log.level, cluster=config.cluster, secrets=self.secrets
            )
        self.log: Any = log
        self.metrics = Metrics(config.cluster, fleet=config.store is not None)
        self.journal = Journal(config.state_dir)
        self.state: JournalState = JournalState()
        self.policy = Policy(config.failover, self.state)
        self.detector = make_detector(config)
        self.latest = Latest()
        self.engines: dict[str, Engine] = {}
        self.notifier = Notifier(config.webhooks, config.cluster, self.log, self.secrets)
        self.systemd = SystemdNotifier()
        # Why the journal last refused a record (None: it takes records): a failed state
        # shown by /healthz and status until a record is written again.
        self.journal_error: str | None = None
        self.last_cycle_wall: float | None = None
        self.bus = Bus(self.log)
        self.bus.subscribe(log_subscriber(self.log))
        self.bus.subscribe(metrics_subscriber(self.metrics, self.wall))
        self.bus.subscribe(notify_subscriber(self))
        # `watchdogctl events`: the recent ones, and a stream for followers.
        self.feed = EventFeed(self.wall)
        self.bus.subscribe(self.feed.publish)
        self.cycle = ProbeCycle(self)
        self.sequences = Sequences(self)
        self.commands = Commands(self)
        self.views = Views(self)
        self.readiness = ReadinessRunner(self)
        # A fleet of watchers (``store:``): leadership, votes and the journal in etcd.
        # None: one watcher and its local journal, exactly as before issue 12.
        self.fleet: Fleet | None = Fleet(self) if config.store is not None else None
        self.scheduler: Schedule | None = None
        self.session: aiohttp.ClientSession | None = None
        self._http: Any = None
        self._control: ControlServer | None = None
        self._watchdog_task: asyncio.Task[None] | None = None
        self._release_task: asyncio.Task[None] | None = None  # see watchdogd.core.memory
        self._stopping = asyncio.Event()
        self.background: set[asyncio.Task[Any]] = set()  # e.g. SIGHUP reloads

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        cfg = self.config
        # Before anything opens a descriptor: systemd's soft limit of 1024 is what a
        # flood of HTTP connections would otherwise exhaust (journal, probes, socket).
        raise_fd_limit()
        memory.tune()  # before the servers and drivers allocate their buffers
        self.journal.lock()  # one daemon per state_dir, in a fleet too
        if self.fleet is None:
            self.state = self.journal.load()
            # Found out now, not when the first failover cannot record its first step.
            self.journal.open()
            self.policy.journal = self.state
            for problem in self.state.problems:
                self.emit("journal_problem", problem=problem, path=str(self.journal.path))
        self.check_roles()
        for node in cfg.nodes:
            self.engines[node.name] = self.make_engine(node, cfg)
        self.export_config(cfg)
        if cfg.metrics.enabled:
            app = make_app(
                self.metrics,
                self.views.healthz,
                extra_routes=[
                    web.get("/primary", self.views.witness),
                    web.get("/vouch", self.views.vouch),
                    web.get("/", self.views.page),
                ],
                secrets=self.secrets,
            )
            self._http = await start_http(app, cfg.metrics.host, cfg.metrics.port)
        self._control = ControlServer(
            cfg.control, self.handle_command, self.log, secrets=self.secrets, feed=self.feed
        )
        await self._control.start()
        await self.notifier.start()
        primary, standby = self.roles()
        self.emit(
            "started",
            version=__version__,
            config=cfg.source,
            primary=primary.name,
            standby=standby.name,
            mode=cfg.failover.mode,
            outage_threshold=cfg.failover.outage_threshold,
            interval=cfg.probe.interval,
            state_dir=cfg.state_dir,
        )
        await self.advise()
        if self.fleet is None:
            await self.take_over()
        else:
            # The journal is in the store: read when this watcher leads (or follows).
            await self.fleet.start()
        # Never overlapping; a run that overruns skips the ticks it missed.
        self.scheduler = Schedule()
        self.scheduler.add(PROBE, self.cycle.job, cfg.probe.interval)
        self.scheduler.add("readiness", self.readiness.job, EXPENSIVE_INTERVAL)
        self.scheduler.start()
        self._start_watchdog()
        self._release_task = asyncio.create_task(
            memory.release_periodically(), name="release-memory"
        )

    async def take_over(self) -> None:
        """Act on the journal as it stands: close a fence a stop cut off, resume an
        unfinished failover or rejoin with today's rules. At start (one watcher), or when
        this watcher becomes the fleet's leader."""
        with contextlib.suppress(JournalError):  # reported by record(); closed next start
            await self.sequences.close_unfinished_fence()
        self.cycle.recall_outage()
        if (fo := self.state.unfinished) is not None:
            self.emit(
                "failover_unfinished",
                failover_id=fo.id,
                trigger=fo.trigger,
                steps=[s.as_dict() for s in fo.steps],
                note="resuming from the first unfinished step",
            )
            await self.sequences.resume(fo)
        await self.sequences.resume_rejoin()

    def adopt(self, state: JournalState) -> None:
        """Take ``state`` (the fleet's journal, replayed) as this daemon's state."""
        self.state = state
        self.policy.journal = state

    def authority_left(self) -> float | None:
        """Seconds this watcher may still act: None (no limit) for one watcher; a fleet
        leader's authority (0 for a follower)."""
        return None if self.fleet is None else self.fleet.authority_left()

    def authority_wait(self) -> float:
        """How long a fleet leader's step may wait for a renewal (one renew interval and
        one store call); 0 for one watcher."""
        return 0.0 if self.fleet is None else self.fleet.timing.renew + self.fleet.timing.budget

    def http_session(self) -> aiohttp.ClientSession:
        """The client session of the app and witness probes, opened on first use: a
        pair watched through its databases alone never loads an HTTP client."""
        if self.session is None:
            import aiohttp

            self.session = aiohttp.ClientSession()
        return self.session

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT, stop. SIGHUP reloads the config."""
        loop = asyncio.get_running_loop()
        try:
            await self.start()
        except BaseException:
            # Leave nothing behind (socket file, lock, servers) for the next start, and
            # say nothing: the caller prints the one line that explains the failure.
            with contextlib.suppress(Exception):
                await self.stop(quiet=True)
            raise
        loop.add_signal_handler(signal.SIGTERM, self._stopping.set)
        loop.add_signal_handler(signal.SIGINT, self._stopping.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: reloading.spawn(self))
        try:
            await self._stopping.wait()
        finally:
            await self.stop()

    def request_stop(self) -> None:
        self._stopping.set()

    async def stop(self, *, quiet: bool = False) -> None:
        if not quiet:
            self.emit("stopping", state=self.policy.state)
        self.systemd.stopping()
        if self.scheduler is not None:
            await self.scheduler.stop()
            self.scheduler = None
        self.readiness.close()
        if self._watchdog_task is not None:
            self._watchdog_task.cancel()
            self._watchdog_task = None
        if self._release_task is not None:
            self._release_task.cancel()
            self._release_task = None
        # Nothing new starts from here on, and background work (an auto_rejoin's report,
        # a reload) ends first: it could otherwise start a rejoin after the interrupt.
        self.sequences.stopping = True
        background = list(self.background)
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        # Let a running step finish and be journaled (a retry delay ends at once); the
        # next start resumes a failover, and fences again if still needed.
        await self.sequences.interrupt()
        if self.fleet is not None:
            await self.fleet.stop()
        if self._control is not None:
            await self._control.stop()
        if self._http is not None:
            await self._http.cleanup()
        await self.notifier.close(2.0)
        if self.session is not None:
            await self.session.close()
        for engine in self.engines.values():
            await engine.close()
        self.journal.close()
        if not quiet:
            self.emit("stopped")

    # ------------------------------------------------------------------ systemd watchdog

    def _start_watchdog(self) -> None:
        """Ping systemd's watchdog from a timer as well as after each probe cycle.

        Per-cycle pings alone make ``probe.interval`` (plus the cycle's own time) race
        ``WatchdogSec``: a long interval gets a healthy daemon killed — possibly in the
        middle of a failover step. The timer pings every ``WatchdogSec / 2`` but only
        while probe cycles keep completing (the same staleness rule as /healthz), so a
        stuck probe loop still stops the pings and systemd still restarts it."""
        period = self.systemd.watchdog_interval()
        if period is None:
            return
        advice = watchdog_advice(
            period * 2, self.config.probe.interval, self.config.probe.timeout, self._stall_limit()
        )
        if advice is not None:
            self.emit("watchdog_interval", advice=advice)
        self._watchdog_task = asyncio.create_task(self._watchdog_loop(period), name="watchdog")

    async def _watchdog_loop(self, period: float) -> None:
        while True:
            if policy.probe_loop_alive(self.last_cycle_wall, self.wall(), self._stall_limit()):
                self.systemd.watchdog()
            await asyncio.sleep(period)

    def _stall_limit(self) -> float:
        return policy.stall_limit(self.config.probe)

    # ------------------------------------------------------------------ config

    async def advise(self) -> None:
        """Log the engines' warnings about settings that weaken our decisions."""
        for node in self.config.nodes:
            try:
                lines = await self.engines[node.name].advise(
                    self.config.failover.outage_threshold, self.config.probe.timeout * 4
                )
            except Exception as exc:  # advice is best effort; the probes report outages
                self.emit("advice_unavailable", node=node.name, error=str(exc))
                continue
            for line in lines:
                self.emit("engine_advice", node=node.name, advice=line)

    def make_engine(self, node: NodeConfig, cfg: Config) -> Engine:
        """The node's engine, telling the probe cycle when its connection is closed."""
        engine = engines.create(node.database, set(cfg.secrets))
        engine.on_connection_lost(lambda: self.cycle.connection_lost(node.name))
        return engine

    def export_config(self, cfg: Config) -> None:
        self.metrics.set_outage_threshold(cfg.failover.outage_threshold)
        self.metrics.set_lag_limits(cfg.failover.max_lag, cfg.failover.max_lag_seconds)
        self.metrics.config_reloaded(True, self.wall())

    def check_roles(self) -> None:
        s = self.state
        if policy.journal_roles_stale(s, (n.name for n in self.config.nodes)):
            self.emit(
                "journal_roles_ignored",
                journal_primary=s.primary,
                journal_standby=s.standby,
                note="node names changed in the config; using configured roles",
            )
            s.primary = s.standby = None

    # ------------------------------------------------------------------ roles

    def base_roles(self) -> tuple[NodeConfig, NodeConfig]:
        """Roles as acknowledged: the config's, swapped by every acked failover."""
        cfg = self.config
        configured = (cfg.primary.name, cfg.standby.name)
        primary, standby = policy.base_roles(self.state, configured, (n.name for n in cfg.nodes))
        return cfg.node(primary), cfg.node(standby)

    def roles(self) -> tuple[NodeConfig, NodeConfig]:
        """Current roles: after a failover that promoted the standby, it is the primary
        even before the operator acks."""
        base, other = self.base_roles()
        primary, standby = policy.current_roles(self.state, (base.name, other.name))
        return self.config.node(primary), self.config.node(standby)

    # ------------------------------------------------------------------ journal and events

    async def record(self, rec: dict[str, Any]) -> None:
        """Journal a record durably, then fold it into the live state. A journal that
        refuses it raises JournalError (so the caller does not act) and puts the daemon
        in a visible failed state: one event, /healthz 503, ``journal_error`` in status.
        In a fleet the journal is the store's: only the leader appends, guarded by its
        token; a store that refuses or does not answer is a ``StoreWriteError`` (a
        JournalError: nothing is acted on) shown as the fleet's state, not the disk's."""
        if self.fleet is not None:
            await self.fleet.append(rec)
            apply(self.state, rec)
            return
        try:
            self.journal.append(rec)
        except JournalError as exc:
            if self.journal_error is None:
                self.emit("journal_write_failed", error=str(exc), record=rec.get("type"))
            self.journal_error = str(exc)
            raise
        if self.journal_error is not None:
            self.emit("journal_writable_again", after=self.journal_error)
            self.journal_error = None
        apply(self.state, rec)

    def emit(self, event: str, /, **facts: Any) -> None:
        """Tell every subscriber (log, metrics, webhooks): see ``watchdogd.core.events``."""
        self.bus.emit(event, **facts)

    # ------------------------------------------------------------------ the public face

    async def handle_command(
        self, command: str, args: dict[str, Any], peer: Peer
    ) -> dict[str, Any]:
        return await self.commands.handle(command, args, peer)

    def status(self) -> dict[str, Any]:
        return self.views.status()

    async def reload(self, by: str) -> dict[str, Any]:
        return await reloading.reload(self, by)
