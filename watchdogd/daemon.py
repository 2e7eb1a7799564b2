"""The daemon: composition root. Builds everything from the config, runs the probe
cycle, turns decisions into runs, and answers operators.

It owns no decision logic: each cycle it gathers observations (I/O), hands
them to the detector and the policy (pure), and carries out what they decide —
start a runner, fence an old primary that came back writable, update metrics,
log and notify. Durable facts live in the journal; this object only caches the
latest observations for ``status``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets as pysecrets
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import aiohttp
from aiohttp import web
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from watchdogd import __version__, actions, engines
from watchdogd import config as configmod
from watchdogd.actions import Action, StepContext
from watchdogd.config import Config, NodeConfig, StepConfig, mask_value
from watchdogd.control import CommandError, ControlServer, Peer
from watchdogd.detector import DOWN, HEALTHY, Cycle, Detector, Verdict
from watchdogd.engines import Engine
from watchdogd.failover import journal as records
from watchdogd.failover.journal import (
    FailoverRecord,
    Journal,
    JournalError,
    JournalState,
    apply,
)
from watchdogd.failover.runner import Runner
from watchdogd.logging import Secrets, setup_logging
from watchdogd.metrics import Metrics, make_app, start_http
from watchdogd.notify import EVENTS as NOTIFY_EVENTS
from watchdogd.notify import Notifier
from watchdogd.policy import (
    BLOCKED,
    FAILING_OVER,
    Decision,
    Plan,
    Policy,
    StandbyFacts,
    build_plan,
)
from watchdogd.probes import Observation
from watchdogd.probes.app import AppProbe
from watchdogd.probes.database import DatabaseProbe
from watchdogd.probes.witness import WitnessProbe
from watchdogd.systemd import SystemdNotifier, watchdog_advice

_WARN_EVENTS = frozenset(
    {
        "primary_down",
        "step_failed",
        "step_retry",
        "failover_failed",
        "failover_aborted",
        "failover_blocked",
        "split_brain",
        "partition_suspected",
        "stall_detected",
        "fence_step_failed",
        "fence_step_retry",
        "fence_failed",
        "fence_aborted",
        "fence_unfinished",
    }
)
# Fence events a webhook receiver used to get as ``step_failed`` (fence=True) before fences
# had events of their own. Not in notify.EVENTS yet: sent anyway, as the notifier does for
# any name, because losing the news that a fence failed is worse than an odd event name.
_ALSO_NOTIFY = frozenset({"fence_step_failed", "fence_failed", "journal_write_failed"})
_ERROR_EVENTS = frozenset({"journal_write_failed"})


@dataclass
class Latest:
    """The last cycle's observations, for status and the lag guard."""

    primary_db: Observation | None = None
    standby_db: Observation | None = None
    primary_app: Observation | None = None
    standby_app: Observation | None = None
    verdict: Verdict | None = None
    # The last write position seen on the primary: the lag guard's reference
    # when the primary is gone.
    last_primary_pos: int | None = None
    lag_bytes: int | None = None
    lag_seconds: float | None = None
    writable: int = 0


class Daemon:
    def __init__(
        self,
        config: Config,
        *,
        log: Any = None,
        clock: Callable[[], float] = time.monotonic,
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
        self.metrics = Metrics(config.cluster)
        self.journal = Journal(config.state_dir)
        self.state: JournalState = JournalState()
        self.policy = Policy(config.failover, self.state)
        self.detector = self._detector(config)
        self.latest = Latest()
        self.engines: dict[str, Engine] = {}
        self.notifier = Notifier(config.webhooks, config.cluster, self.log, self.secrets)
        self.systemd = SystemdNotifier()
        self.runner: Runner | None = None
        self.runner_task: asyncio.Task[str] | None = None
        self.fence_runner: Runner | None = None
        self.fence_task: asyncio.Task[str] | None = None
        self._fenced_for: str | None = None  # failover id whose old primary was fenced
        # The primary whose outage a failover of a previous run already announced: after
        # a restart the detector starts afresh, and must not announce it a second time.
        self._down_reported: str | None = None
        self._watchdog_task: asyncio.Task[None] | None = None
        # Why the journal last refused a record (None: it takes records): a failed state
        # shown by /healthz and status until a record is written again.
        self.journal_error: str | None = None
        self._scheduler: AsyncIOScheduler | None = None
        self._session: aiohttp.ClientSession | None = None
        self._http: Any = None
        self._control: ControlServer | None = None
        self._stopping = asyncio.Event()
        self._ready = False
        self._last_decision: Decision | None = None
        self._last_cycle_wall: float | None = None
        self._background: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------ lifecycle

    @staticmethod
    def _detector(config: Config) -> Detector:
        return Detector(
            interval=config.probe.interval,
            threshold=config.failover.outage_threshold,
            recovery_successes=config.probe.recovery_successes,
            trigger_on=config.failover.trigger_on,
        )

    async def start(self) -> None:
        cfg = self.config
        self.journal.lock()
        self.state = self.journal.load()
        # Found out now, not when the first failover cannot record its first step.
        self.journal.open()
        self.policy.journal = self.state
        for problem in self.state.problems:
            self.log.warning("journal_problem", problem=problem, path=str(self.journal.path))
        self._check_roles()
        for node in cfg.nodes:
            self.engines[node.name] = engines.create(node.database, set(cfg.secrets))
        self._session = aiohttp.ClientSession()
        self._export_config(cfg)
        if cfg.metrics.enabled:
            app = make_app(
                self.metrics, self._healthz, extra_routes=[web.get("/primary", self._witness_view)]
            )
            self._http = await start_http(app, cfg.metrics.host, cfg.metrics.port)
        self._control = ControlServer(
            cfg.control, self.handle_command, self.log, secrets=cfg.secrets
        )
        await self._control.start()
        await self.notifier.start()
        self.log.info(
            "started",
            version=__version__,
            config=cfg.source,
            primary=self.roles()[0].name,
            standby=self.roles()[1].name,
            mode=cfg.failover.mode,
            outage_threshold=cfg.failover.outage_threshold,
            interval=cfg.probe.interval,
            state_dir=cfg.state_dir,
        )
        await self._advise()
        self._close_unfinished_fence()
        self._recall_outage()
        if (fo := self.state.unfinished) is not None:
            self.log.warning(
                "failover_unfinished",
                failover_id=fo.id,
                trigger=fo.trigger,
                steps=[s.as_dict() for s in fo.steps],
                note="resuming from the first unfinished step",
            )
            self._resume(fo)
        # Two INFO lines per cycle from the scheduler are noise, not news.
        logging.getLogger("apscheduler").setLevel(logging.WARNING)
        self._scheduler = AsyncIOScheduler()
        self._scheduler.add_job(
            self.cycle_job,
            "interval",
            seconds=cfg.probe.interval,
            max_instances=1,
            coalesce=True,
            misfire_grace_time=max(1, int(cfg.probe.interval)),
            next_run_time=datetime.now(UTC),
            id="probe",
        )
        self._scheduler.start()
        self._start_watchdog()

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
            self.log.warning("watchdog_interval", advice=advice)
        self._watchdog_task = asyncio.create_task(self._watchdog_loop(period), name="watchdog")

    async def _watchdog_loop(self, period: float) -> None:
        while True:
            if self._probe_loop_alive():
                self.systemd.watchdog()
            await asyncio.sleep(period)

    def _stall_limit(self) -> float:
        """How long without a completed probe cycle before the loop counts as stalled."""
        return max(3 * self.config.probe.interval, self.config.probe.timeout + 5.0)

    def _probe_loop_alive(self) -> bool:
        last = self._last_cycle_wall
        return last is not None and self.wall() - last <= self._stall_limit()

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
        loop.add_signal_handler(signal.SIGHUP, self._spawn_reload)
        try:
            await self._stopping.wait()
        finally:
            await self.stop()

    def request_stop(self) -> None:
        self._stopping.set()

    async def stop(self, *, quiet: bool = False) -> None:
        if not quiet:
            self.log.info("stopping", state=self.policy.state)
        self.systemd.stopping()
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
        if self._watchdog_task is not None:
            self._watchdog_task.cancel()
            self._watchdog_task = None
        # Let a running step finish and be journaled (a retry delay ends at once); the
        # next start resumes a failover, and fences again if still needed.
        for runner, task in ((self.runner, self.runner_task), (self.fence_runner, self.fence_task)):
            if runner is not None and task is not None and not task.done():
                self.log.info(
                    "waiting_for_step", step=runner.current_step, sequence=runner.sequence
                )
                runner.interrupt()
                with contextlib.suppress(Exception):
                    await task
        if self._control is not None:
            await self._control.stop()
        if self._http is not None:
            await self._http.cleanup()
        await self.notifier.close(2.0)
        if self._session is not None:
            await self._session.close()
        for engine in self.engines.values():
            await engine.close()
        self.journal.close()
        if not quiet:
            self.log.info("stopped")

    async def _advise(self) -> None:
        """Log the engines' warnings about settings that weaken our decisions."""
        for node in self.config.nodes:
            advise = getattr(self.engines[node.name], "advise", None)
            if advise is None:
                continue
            try:
                lines = await advise(
                    self.config.failover.outage_threshold, self.config.probe.timeout * 4
                )
            except Exception as exc:  # advice is best effort; the probes report outages
                self.log.debug("advice_unavailable", node=node.name, error=str(exc))
                continue
            for line in lines:
                self.log.warning("engine_advice", node=node.name, advice=line)

    def _export_config(self, cfg: Config) -> None:
        self.metrics.set_outage_threshold(cfg.failover.outage_threshold)
        self.metrics.set_lag_limits(cfg.failover.max_lag, cfg.failover.max_lag_seconds)
        self.metrics.config_reloaded(True, self.wall())

    # ------------------------------------------------------------------ roles

    def _check_roles(self) -> None:
        names = {n.name for n in self.config.nodes}
        s = self.state
        if s.primary is not None and {s.primary, s.standby} != names:
            self.log.warning(
                "journal_roles_ignored",
                journal_primary=s.primary,
                journal_standby=s.standby,
                note="node names changed in the config; using configured roles",
            )
            s.primary = s.standby = None

    def base_roles(self) -> tuple[NodeConfig, NodeConfig]:
        """Roles as acknowledged: the config's, swapped by every acked failover."""
        s = self.state
        if s.primary is not None and s.standby is not None:
            try:
                return self.config.node(s.primary), self.config.node(s.standby)
            except KeyError:
                pass
        return self.config.primary, self.config.standby

    def roles(self) -> tuple[NodeConfig, NodeConfig]:
        """Current roles: after a failover that promoted the standby, it is the primary
        even before the operator acks."""
        primary, standby = self.base_roles()
        fo = self.state.awaiting_ack or self.state.unfinished
        if (
            fo is not None
            and (fo.outcome == "completed" or fo.promoted)
            and fo.to_node == standby.name
        ):
            return standby, primary
        return primary, standby

    # ------------------------------------------------------------------ the cycle

    async def cycle_job(self) -> None:
        try:
            async with asyncio.timeout(self.config.probe.timeout + 2.0):
                await self.cycle()
        except TimeoutError:
            self.log.error("cycle_timeout", note="a probe cycle overran its bound")
        except Exception as exc:  # one bad cycle must never end the loop
            self.log.exception("cycle_error", error=str(exc))

    async def cycle(self) -> Verdict:
        cfg = self.config
        at = self.clock()
        primary, standby = self.roles()
        probes: list[Any] = [
            DatabaseProbe(primary.name, self.engines[primary.name], cfg.probe.timeout, self.clock),
            DatabaseProbe(standby.name, self.engines[standby.name], cfg.probe.timeout, self.clock),
        ]
        assert self._session is not None
        apps: list[NodeConfig] = [n for n in (primary, standby) if n.app is not None]
        for node in apps:
            assert node.app is not None
            probes.append(
                AppProbe(node.name, node.app, self._session, cfg.probe.timeout, self.clock)
            )
        probes += [
            WitnessProbe(w, self._session, cfg.probe.timeout, self.clock) for w in cfg.witnesses
        ]
        # _bounded never raises: one probe's failure is its own failed observation.
        results = await asyncio.gather(*(self._bounded(p) for p in probes))
        pdb, sdb = results[0], results[1]
        app_obs = {o.target: o for o in results[2 : 2 + len(apps)]}
        witnesses = tuple(results[2 + len(apps) :])
        for obs in results:
            self.metrics.observe_probe(obs.target, obs.probe, obs.ok, obs.latency)

        latest = self.latest
        latest.primary_db, latest.standby_db = pdb, sdb
        latest.primary_app, latest.standby_app = (
            app_obs.get(primary.name),
            app_obs.get(standby.name),
        )
        self._update_lag(pdb, sdb, standby.name)
        verdict = self.detector.update(
            Cycle(
                at=at,
                primary_db=pdb,
                standby_db=sdb,
                primary_app=latest.primary_app,
                witnesses=witnesses,
            )
        )
        previous = latest.verdict
        latest.verdict = verdict
        self._report_verdict(previous, verdict)

        decision = self.policy.evaluate(verdict, self.standby_facts(), self.wall())
        self._report_decision(decision)
        if decision.start is not None and self.runner_task is None:
            # A journal that refuses the start is reported by record(); the next cycle
            # tries again, and nothing was acted on.
            with contextlib.suppress(JournalError):
                self._start_failover(decision.start, "automatic", verdict.reason, forced=False)
        self._check_split_brain()

        self.metrics.set_armed(self.policy.armed(self.wall()))
        self.metrics.set_primary_down(verdict.outage_seconds)
        self._last_cycle_wall = self.wall()
        self.metrics.cycle_completed(self._last_cycle_wall)
        if not self._ready:
            self._ready = True
            self.systemd.ready(f"{self.policy.state}: {decision.reason}")
        self.systemd.watchdog()
        return verdict

    async def _bounded(self, probe: Any) -> Observation:
        timeout = self.config.probe.timeout
        at = self.clock()
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                obs: Observation = await probe.check()
                return obs
        except TimeoutError:
            return Observation(
                probe.target,
                probe.probe,
                False,
                time.monotonic() - t0,
                f"no answer within {timeout:g}s",
                at,
            )
        except Exception as exc:
            # A hostile reply or a bug in one probe is that probe's failed observation (a
            # witness abstains): it must never stop the cycle that watches the primary.
            text = " ".join(str(exc).split())[:200]
            return Observation(
                probe.target,
                probe.probe,
                False,
                time.monotonic() - t0,
                self.config.mask(f"probe error: {type(exc).__name__}: {text}".rstrip(": ")),
                at,
            )

    def _update_lag(self, pdb: Observation, sdb: Observation, standby: str) -> None:
        latest = self.latest
        if pdb.ok and pdb.db is not None and pdb.db.current_pos is not None:
            latest.last_primary_pos = pdb.db.current_pos
        sstat = sdb.db if sdb.ok else None
        lag_bytes = None
        if (
            sstat is not None
            and not sstat.is_primary
            and latest.last_primary_pos is not None
            and sstat.replay_pos is not None
        ):
            lag_bytes = max(0, latest.last_primary_pos - sstat.replay_pos)
        latest.lag_bytes = lag_bytes
        latest.lag_seconds = sstat.lag_seconds if sstat is not None else None
        self.metrics.set_lag(standby, lag_bytes, latest.lag_seconds)
        self.metrics.set_streaming(
            standby, None if sstat is None or sstat.is_primary else bool(sstat.streaming)
        )
        latest.writable = sum(1 for o in (pdb, sdb) if o.ok and o.db is not None and o.db.writable)
        self.metrics.set_writable_primaries(latest.writable)

    def standby_facts(self) -> StandbyFacts:
        sdb = self.latest.standby_db
        if sdb is None or not sdb.ok or sdb.db is None:
            return StandbyFacts(
                False, False, None, None, sdb.detail if sdb is not None else "not probed yet"
            )
        st = sdb.db
        guard = None
        if self.latest.last_primary_pos is not None and st.receive_pos is not None:
            guard = max(0, self.latest.last_primary_pos - st.receive_pos)
        return StandbyFacts(True, not st.is_primary, guard, st.lag_seconds, st.detail)

    def _report_verdict(self, previous: Verdict | None, verdict: Verdict) -> None:
        before = previous.status if previous is not None else HEALTHY
        facts = verdict.facts()
        if verdict.status == "stale":
            self.emit("stall_detected", **facts)
        if verdict.status == DOWN and before != DOWN:
            if self._down_reported is not None and self._down_reported == self.roles()[0].name:
                self.log.info(
                    "primary_still_down",
                    note="announced before the restart; the unfinished or unacked failover "
                    "is about this outage",
                    **facts,
                )
            else:
                self.emit("primary_down", **facts)
        if verdict.status == HEALTHY or verdict.recovered:
            self._down_reported = None  # a later outage is a new episode
        if verdict.recovered:
            self.emit("primary_recovered", **facts)
        was_partition = previous is not None and previous.partition
        if verdict.partition and not was_partition:
            self.emit("partition_suspected", **facts)
        self.metrics.set_partition(verdict.partition)

    def _report_decision(self, decision: Decision) -> None:
        last = self._last_decision
        self._last_decision = decision
        self.metrics.set_state(decision.state)
        if last is not None and last.state == decision.state and last.reason == decision.reason:
            return
        if last is None or last.state != decision.state:
            self.systemd.status(f"{decision.state}: {decision.reason}")
            latest = self.latest
            # The decision's reason leads; the verdict's is kept beside it.
            verdict_facts = latest.verdict.facts() if latest.verdict else {}
            verdict_facts["verdict_reason"] = verdict_facts.pop("reason", None)
            self.log.info(
                "state_changed",
                state=decision.state,
                previous=last.state if last else None,
                reason=decision.reason,
                lag_bytes=latest.lag_bytes,
                lag_seconds=latest.lag_seconds,
                **verdict_facts,
            )
            if decision.state == BLOCKED:
                self.metrics.failover_finished("automatic", "blocked", self.wall())
                self.emit(
                    "failover_blocked",
                    reason=decision.reason,
                    lag_bytes=self.standby_facts().lag_bytes,
                )

    # ------------------------------------------------------------------ failover

    def _new_id(self) -> str:
        stamp = datetime.fromtimestamp(self.wall(), UTC).strftime("%Y%m%dT%H%M%SZ")
        return f"{stamp}-{pysecrets.token_hex(2)}"

    def plan(
        self,
        kind: str,
        trigger: str,
        reason: str,
        *,
        forced: bool = False,
        catchup_timeout: float | None = None,
        id: str | None = None,
    ) -> Plan:
        primary, standby = self.base_roles()
        cfg = self.config.failover
        if catchup_timeout is not None:
            cfg = replace(cfg, catchup_timeout=catchup_timeout)
        return build_plan(
            cfg,
            id=id or self._new_id(),
            kind=kind,
            trigger=trigger,
            reason=reason,
            from_node=primary.name,
            to_node=standby.name,
            forced=forced,
        )

    def context(self, plan: Plan) -> StepContext:
        return StepContext(
            config=self.config,
            primary=self.config.node(plan.from_node),
            standby=self.config.node(plan.to_node),
            engines=self.engines,
            failover_id=plan.id,
            reason=plan.reason,
            trigger=plan.trigger,
        )

    def _actions(self, steps: tuple[StepConfig, ...]) -> dict[str, Action]:
        return {s.name: actions.build(s, self.config) for s in steps}

    def _start_failover(
        self,
        kind: str,
        trigger: str,
        reason: str,
        *,
        forced: bool,
        catchup_timeout: float | None = None,
    ) -> Plan:
        plan = self.plan(kind, trigger, reason, forced=forced, catchup_timeout=catchup_timeout)
        self._launch(plan, resume=None)
        return plan

    def _resume(self, fo: FailoverRecord) -> None:
        plan = self.plan(fo.kind, fo.trigger, fo.reason, forced=fo.forced, id=fo.id)
        if [s.name for s in plan.steps] != fo.plan or plan.from_node != fo.from_node:
            # The config changed under an unfinished failover: do not guess.
            error = (
                "cannot resume: the failover steps or roles in the config changed since it "
                "started; finish it by hand and ack"
            )
            self.record(
                records.sequence_finished(
                    "failover", id=fo.id, outcome="failed", error=error, at=self.wall()
                )
            )
            self.emit("failover_failed", failover_id=fo.id, error=error)
            return
        self._launch(plan, resume=fo)

    def _launch(self, plan: Plan, resume: FailoverRecord | None) -> None:
        runner = Runner(
            plan,
            self.context(plan),
            self._actions(plan.steps),
            self.record,
            self.emit,
            resume=resume,
            wall=self.wall,
        )
        runner.begin()  # journaled before anyone is told the failover started
        self.runner = runner
        self.metrics.set_in_progress(True)
        self.metrics.set_state(FAILING_OVER)
        self.runner_task = asyncio.create_task(self._run(runner), name=f"failover-{plan.id}")

    async def _run(self, runner: Runner) -> str:
        try:
            outcome = await runner.run()
        except JournalError:
            # Reported by record(). Nothing more is done without a durable journal; the
            # failover stays unfinished and a restart resumes it once the disk takes records.
            self.log.error(
                "failover_stopped",
                failover_id=runner.plan.id,
                note="the journal cannot be written: no further step runs; restart watchdogd "
                "once it can, and the failover resumes",
            )
            outcome = "failed"
        except Exception as exc:
            self.log.exception("failover_crashed", failover_id=runner.plan.id, error=str(exc))
            outcome = "failed"
        finally:
            self.runner, self.runner_task = None, None
            self.metrics.set_in_progress(False)
        self._refresh_state()
        return outcome

    def _refresh_state(self) -> None:
        verdict = self.latest.verdict or Verdict(HEALTHY, "not probed yet")
        self._report_decision(self.policy.evaluate(verdict, self.standby_facts(), self.wall()))
        self.metrics.set_armed(self.policy.armed(self.wall()))

    def record(self, rec: dict[str, Any]) -> None:
        """Journal a record durably, then fold it into the live state. A journal that
        refuses it raises JournalError (so the caller does not act) and puts the daemon
        in a visible failed state: one event, /healthz 503, ``journal_error`` in status."""
        try:
            self.journal.append(rec)
        except JournalError as exc:
            if self.journal_error is None:
                self.emit("journal_write_failed", error=str(exc), record=rec.get("type"))
            self.journal_error = str(exc)
            raise
        if self.journal_error is not None:
            self.log.info("journal_writable_again", after=self.journal_error)
            self.journal_error = None
        apply(self.state, rec)

    def emit(self, event: str, **facts: Any) -> None:
        level = (
            "error" if event in _ERROR_EVENTS else "warning" if event in _WARN_EVENTS else "info"
        )
        getattr(self.log, level)(event, **facts)
        if event in ("step_completed", "step_failed"):
            self.metrics.step_finished(
                facts["step"],
                "ok" if event == "step_completed" else facts.get("outcome", "failed"),
                float(facts.get("seconds", 0.0)),
            )
        elif event in ("failover_completed", "failover_failed", "failover_aborted"):
            self.metrics.failover_finished(
                facts.get("trigger", "automatic"), event.removeprefix("failover_"), self.wall()
            )
        if event in NOTIFY_EVENTS or (event in _ALSO_NOTIFY and self.config.webhooks):
            self.notifier.notify(event, **facts)

    # ------------------------------------------------------------------ split brain

    def _check_split_brain(self) -> None:
        latest = self.latest
        split = latest.writable > 1
        self.metrics.set_split_brain(split)
        if not split:
            self._fenced_for = None  # a later episode is handled afresh
            return
        fo = self.state.last
        ours = fo is not None and fo.acked_at is None and (fo.outcome == "completed" or fo.promoted)
        key = fo.id if ours and fo is not None else "unexplained"
        if self._fenced_for == key:
            return  # this episode is reported (and fenced once); the alert keeps firing
        self._fenced_for = key
        if not ours or fo is None:
            self.emit(
                "split_brain",
                writable_primaries=latest.writable,
                note="both nodes accept writes and no failover of ours explains it: "
                "fencing neither; an operator must decide",
            )
            return
        self.emit(
            "split_brain",
            writable_primaries=latest.writable,
            failover_id=fo.id,
            old_primary=fo.from_node,
            new_primary=fo.to_node,
            fence_steps=[s.name for s in self.config.failover.fence_steps],
        )
        self._start_fence(fo)

    def _start_fence(self, fo: FailoverRecord) -> None:
        """Run the fence steps through the runner (retries, timeouts, ``required``,
        journaled as a fence, never as a failover)."""
        steps = self.config.failover.fence_steps
        if not steps or (self.fence_task is not None and not self.fence_task.done()):
            return
        plan = Plan(
            id=f"fence-{self._new_id()}",
            kind="fence",
            trigger="split_brain",
            reason="old primary came back writable",
            from_node=fo.from_node,
            to_node=fo.to_node,
            steps=steps,
        )
        ctx = self.context(plan)
        # Step templates name the failover ({failover_id}) whose old primary is fenced.
        ctx.failover_id = fo.id
        runner = Runner(
            plan,
            ctx,
            self._actions(steps),
            self.record,
            self.emit,
            wall=self.wall,
            failover_id=fo.id,
        )
        try:
            runner.begin()
        except JournalError:
            return  # reported by record(); fenced again after a restart if still needed
        self.fence_runner = runner
        self.fence_task = asyncio.create_task(self._run_fence(runner), name=plan.id)

    async def _run_fence(self, runner: Runner) -> str:
        try:
            return await runner.run()
        except Exception as exc:
            self.log.exception("fence_crashed", fence_id=runner.plan.id, error=str(exc))
            return "failed"
        finally:
            self.fence_runner = None

    def _recall_outage(self) -> None:
        """After a restart with a failover unfinished (or unacked and not promoted), its
        primary_down went out before the restart: the same outage is not news again."""
        episode = self.state.unfinished or self.state.awaiting_ack
        if episode is not None and not episode.promoted:
            self._down_reported = episode.from_node

    def _close_unfinished_fence(self) -> None:
        """A fence cut off by a crash is closed, not resumed: fencing is idempotent, and if
        both nodes still accept writes the split-brain check fences again on its own.
        Resuming it as a failover would be wrong in every way (history, cooldown, roles)."""
        fence = self.state.unfinished_fence
        if fence is None:
            return
        note = (
            "the daemon stopped during this fence; fences are not resumed: the split-brain "
            "check fences again if both nodes still accept writes"
        )
        self.record(
            records.sequence_finished(
                "fence", id=fence.id, outcome="interrupted", error=note, at=self.wall()
            )
        )
        self.emit(
            "fence_unfinished",
            fence_id=fence.id,
            failover_id=fence.failover_id,
            old_primary=fence.from_node,
            steps_done=[st.name for st in fence.steps if st.outcome == "ok"],
            note=note,
        )

    # ------------------------------------------------------------------ operators

    async def handle_command(
        self, command: str, args: dict[str, Any], peer: Peer
    ) -> dict[str, Any]:
        handler = getattr(self, f"_cmd_{command}", None)
        if handler is None:
            raise CommandError(f"unknown command {command!r}")
        try:
            result: dict[str, Any] = await handler(args, peer)
        except JournalError as exc:
            # Nothing was done: every change is journaled before it is acted on.
            raise CommandError(f"{command} refused: {exc}") from None
        return result

    async def _cmd_status(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        return self.status()

    async def _cmd_history(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        n = int(args.get("n", 10))
        return {"failovers": [f.as_dict() for f in reversed(self.state.failovers[-n:])]}

    async def _cmd_pause(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        # Masked at intake: the reason is journaled and shown back in status/history.
        reason = self.config.mask(args.get("reason") or f"paused by {_who(peer)}")
        self.record(records.pause(reason=reason, by=_who(peer), at=self.wall()))
        self.emit("paused", reason=reason, by=_who(peer))
        self._refresh_state()
        return {"paused": True, "reason": reason}

    async def _cmd_resume(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        if not self.state.paused:
            raise CommandError("automatic failover is not paused")
        self.record(records.resume(by=_who(peer), at=self.wall()))
        self.emit("resumed", by=_who(peer))
        self._refresh_state()
        return {"paused": False}

    async def _cmd_failover(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        force, dry_run = bool(args.get("force")), bool(args.get("dry_run"))
        verdict = self.latest.verdict or Verdict(HEALTHY, "not probed yet")
        refusal = self.policy.refuse_manual_failover(verdict, self.standby_facts(), force)
        if refusal is not None:
            raise CommandError(f"failover refused: {refusal}")
        reason = args.get("reason") or f"manual failover by {_who(peer)}" + (
            " (forced)" if force else ""
        )
        # Masked at intake: the reason is journaled and shown back in status/history.
        reason = self.config.mask(reason)
        return self._start_or_describe("failover", "manual", reason, force, dry_run)

    async def _cmd_switchover(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        pdb = self.latest.primary_db
        refusal = self.policy.refuse_switchover(bool(pdb and pdb.ok), self.standby_facts())
        if refusal is not None:
            raise CommandError(f"switchover refused: {refusal}")
        timeout = args.get("timeout")
        reason = f"switchover by {_who(peer)}"
        return self._start_or_describe(
            "switchover",
            "switchover",
            reason,
            False,
            bool(args.get("dry_run")),
            float(timeout) if timeout is not None else None,
        )

    def _start_or_describe(
        self,
        kind: str,
        trigger: str,
        reason: str,
        forced: bool,
        dry_run: bool,
        catchup_timeout: float | None = None,
    ) -> dict[str, Any]:
        if dry_run:
            plan = self.plan(kind, trigger, reason, forced=forced, catchup_timeout=catchup_timeout)
            return {"dry_run": True, "plan": self.describe(plan)}
        if self.state.awaiting_ack is not None:
            # A failed failover being retried by hand: the new one supersedes it.
            fo = self.state.awaiting_ack
            self.record(
                records.ack(
                    id=fo.id,
                    primary=self.base_roles()[0].name,
                    standby=self.base_roles()[1].name,
                    at=self.wall(),
                    note="superseded by a manual retry",
                )
            )
        plan = self._start_failover(
            kind, trigger, reason, forced=forced, catchup_timeout=catchup_timeout
        )
        return {"started": plan.id, "plan": self.describe(plan)}

    def describe(self, plan: Plan) -> dict[str, Any]:
        ctx = self.context(plan)
        described = {
            "failover_id": plan.id,
            "kind": plan.kind,
            "trigger": plan.trigger,
            "reason": plan.reason,
            "from": plan.from_node,
            "to": plan.to_node,
            "forced": plan.forced,
            "steps": [actions.describe(s, actions.build(s, self.config), ctx) for s in plan.steps],
        }
        # The operator's reason may quote a secret too: mask the whole plan, not just steps.
        result: dict[str, Any] = mask_value(described, self.config.secrets)
        return result

    async def _cmd_abort(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        who = _who(peer)
        if self.runner is not None:
            self.runner.abort(by=f"operator ({who})")
            self.log.warning(
                "abort_requested",
                failover_id=self.runner.plan.id,
                by=who,
                current_step=self.runner.current_step,
            )
            return {
                "aborting": self.runner.plan.id,
                "note": "the sequence stops before its next step",
            }
        verdict = self.latest.verdict or Verdict(HEALTHY, "not probed yet")
        if not self.policy.pending_outage(verdict):
            raise CommandError("nothing to abort: no failover is running or pending")
        primary, standby = self.base_roles()
        fid = self._new_id()
        self.record(
            records.sequence_started(
                "failover",
                id=fid,
                trigger="automatic",
                kind="failover",
                reason=verdict.reason,
                from_node=primary.name,
                to_node=standby.name,
                steps=[],
                at=self.wall(),
                pending=True,
            )
        )
        self.record(
            records.sequence_finished(
                "failover",
                id=fid,
                outcome="aborted",
                error=f"aborted by operator ({who}) before it started",
                at=self.wall(),
            )
        )
        self.emit(
            "failover_aborted",
            failover_id=fid,
            trigger="automatic",
            by=who,
            error="aborted by operator before it started",
        )
        self._refresh_state()
        return {"aborted": fid, "note": "no automatic failover until an operator acks"}

    async def _cmd_ack(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        try:
            primary, standby = self.policy.ack_roles()
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        fo = self.state.awaiting_ack
        assert fo is not None
        self.record(
            records.ack(id=fo.id, primary=primary, standby=standby, at=self.wall(), by=_who(peer))
        )
        self.log.info("acked", failover_id=fo.id, by=_who(peer), primary=primary, standby=standby)
        # The pair is watched in its new roles from a clean slate, except that the
        # lag guard keeps the last position of a primary that stays the primary
        # (an aborted outage: it may still be dead and never report one again).
        self.detector.reset()
        kept = self.latest.last_primary_pos if primary == fo.from_node else None
        self.latest = Latest(last_primary_pos=kept)
        self._fenced_for = None
        self._down_reported = None
        self._refresh_state()
        return {
            "acked": fo.id,
            "roles": {"primary": primary, "standby": standby},
            "armed": self.policy.armed(self.wall()),
        }

    async def _cmd_reload(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        return await self.reload(by=_who(peer))

    def _spawn_reload(self) -> None:
        task = asyncio.create_task(self._reload_quietly())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _reload_quietly(self) -> None:
        with contextlib.suppress(CommandError):
            await self.reload(by="SIGHUP")

    async def reload(self, by: str) -> dict[str, Any]:
        self.systemd.reloading()
        try:
            return await self._reload(by)
        finally:
            self.systemd.ready(f"{self.policy.state}")

    async def _reload(self, by: str) -> dict[str, Any]:
        if self.config.source is None:
            raise CommandError("reload refused: the daemon was not started from a config file")
        try:
            new = configmod.load(self.config.source)
        except configmod.ConfigError as exc:
            self.metrics.config_reloaded(False, self.wall())
            self.log.error("reload_refused", by=by, problems=exc.problems)
            raise CommandError(
                "reload refused, running config kept: " + "; ".join(exc.problems)
            ) from None
        if self.runner is not None:
            raise CommandError("reload refused: a failover is running; reload when it ends")
        changed = [
            k
            for k in ("control", "metrics", "state_dir")
            if getattr(new, k) != getattr(self.config, k)
        ]
        old = self.config
        self.config = new
        self.policy.cfg = new.failover
        self.detector = self._detector(new)
        for node in new.nodes:
            if node.name not in self.engines or old_db(old, node.name) != node.database:
                if node.name in self.engines:
                    await self.engines[node.name].close()
                self.engines[node.name] = engines.create(node.database, set(new.secrets))
        self._check_roles()
        if self._scheduler is not None and new.probe.interval != old.probe.interval:
            self._scheduler.reschedule_job("probe", trigger="interval", seconds=new.probe.interval)
        self.secrets.replace(new.secrets)
        if new.log != old.log:
            setup_logging(new.log.format, new.log.level, cluster=new.cluster, secrets=self.secrets)
        if new.webhooks != old.webhooks:
            previous, self.notifier = (
                self.notifier,
                Notifier(new.webhooks, new.cluster, self.log, self.secrets),
            )
            await self.notifier.start()
            await previous.close(2.0)
        self._export_config(new)
        await self._advise()
        self.log.info("reloaded", by=by, restart_needed_for=changed or None)
        return {"reloaded": True, "restart_needed_for": changed}

    # ------------------------------------------------------------------ views

    def status(self) -> dict[str, Any]:
        primary, standby = self.roles()
        latest = self.latest
        decision = self._last_decision
        running = None
        if self.runner is not None:
            running = {
                "id": self.runner.plan.id,
                "step": self.runner.current_step,
                "started_at": self.runner.current_step_started,
            }
        last = self.state.last
        # Match observations by node, not by role: right after a failover the roles
        # have swapped but the last cycle observed them the other way round.
        observed = [
            o
            for o in (latest.primary_db, latest.standby_db, latest.primary_app, latest.standby_app)
            if o is not None
        ]
        nodes = []
        for node, role in ((primary, "primary"), (standby, "standby")):
            db = next(
                (o for o in observed if o.target == node.name and o.probe == "database"), None
            )
            app = next((o for o in observed if o.target == node.name and o.probe == "app"), None)
            nodes.append(
                {
                    "name": node.name,
                    "role": role,
                    "database": _obs(db),
                    "app": _obs(app) if node.app is not None else None,
                }
            )
        verdict = latest.verdict
        return {
            "cluster": self.config.cluster,
            "version": __version__,
            "state": self.policy.state,
            "reason": decision.reason if decision else "starting",
            "mode": self.config.failover.mode,
            "armed": self.policy.armed(self.wall()),
            "paused": self.state.paused,
            "pause_reason": self.state.pause_reason,
            "awaiting_ack": self.state.awaiting_ack is not None,
            "cooldown_left": round(self.policy.cooldown_left(self.wall()), 1),
            "roles": {"primary": primary.name, "standby": standby.name},
            "nodes": nodes,
            "outage_seconds": round(verdict.outage_seconds, 3) if verdict else 0.0,
            "verdict": verdict.facts() if verdict else None,
            "lag": {
                "bytes": latest.lag_bytes,
                "seconds": latest.lag_seconds,
                "streaming": _streaming(latest.standby_db),
            },
            "writable_primaries": latest.writable,
            "failover_in_progress": running,
            "last_failover": _summary(last) if last else None,
            "last_cycle_at": self._last_cycle_wall,
            "journal_error": self.journal_error,
        }

    def _healthz(self) -> tuple[bool, str]:
        if self.journal_error is not None:
            return False, f"journal cannot be written: {self.journal_error}"
        if self._last_cycle_wall is None:
            return False, "no probe cycle completed yet"
        age = self.wall() - self._last_cycle_wall
        if age > self._stall_limit():
            return False, f"probe loop stalled: last cycle {age:.1f}s ago"
        return True, f"{self.policy.state}; last cycle {age:.1f}s ago"

    async def _witness_view(self, request: web.Request) -> web.Response:
        pdb = self.latest.primary_db
        up = bool(pdb is not None and pdb.ok)
        return web.json_response(
            {
                "primary_up": up,
                "primary": self.roles()[0].name,
                "detail": pdb.detail if pdb else "not probed yet",
            },
            status=200 if up else 503,
        )


def old_db(config: Config, name: str) -> Any:
    try:
        return config.node(name).database
    except KeyError:
        return None


def _who(peer: Peer) -> str:
    return f"{peer.user or 'uid ' + str(peer.uid)} (pid {peer.pid})"


def _obs(obs: Observation | None) -> dict[str, Any] | None:
    if obs is None:
        return None
    out: dict[str, Any] = {"ok": obs.ok, "detail": obs.detail, "latency": round(obs.latency, 4)}
    if obs.db is not None:
        out["writable"] = obs.db.writable
        out["is_primary"] = obs.db.is_primary
    return out


def _streaming(obs: Observation | None) -> bool | None:
    if obs is None or obs.db is None or obs.db.is_primary:
        return None
    return bool(obs.db.streaming)


def _summary(fo: FailoverRecord) -> dict[str, Any]:
    return {
        "id": fo.id,
        "trigger": fo.trigger,
        "outcome": fo.outcome or "in progress",
        "reason": fo.reason,
        "from": fo.from_node,
        "to": fo.to_node,
        "started_at": fo.started_at,
        "finished_at": fo.finished_at,
        "error": fo.error,
        "acked": fo.acked_at is not None,
    }
