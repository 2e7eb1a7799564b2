"""The probe cycle: probe both nodes (and their apps and the witnesses), fold the
observations into the latest view, hand them to the detector and the policy, and carry
out what they decide: start a failover, report news, fence an old primary that came
back writable. Runs every ``probe.interval`` from the scheduler, and at once when the
connection to the primary's database is found closed (``connection_lost``: a crash),
so that the outage is timed from the failure rather than from the next tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from watchdogd import policy
from watchdogd.core.model import Config, NodeConfig
from watchdogd.daemon.schedule import PROBE
from watchdogd.daemon.sequences import StoppingError
from watchdogd.detector import HEALTHY, Cycle, Detector, Verdict
from watchdogd.policy import BLOCKED, Decision, StandbyFacts
from watchdogd.probes import Observation, Probe
from watchdogd.probes.database import DatabaseProbe
from watchdogd.state.journal import JournalError

if TYPE_CHECKING:
    from watchdogd.daemon.lifecycle import Daemon


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


def make_detector(config: Config) -> Detector:
    return Detector(
        interval=config.probe.interval,
        threshold=config.failover.outage_threshold,
        recovery_successes=config.probe.recovery_successes,
        trigger_on=config.failover.trigger_on,
    )


class ProbeCycle:
    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        self.last_decision: Decision | None = None
        self._ready = False
        # The primary whose outage a failover of a previous run already announced: after
        # a restart the detector starts afresh, and must not announce it a second time.
        self.down_reported: str | None = None
        self.fenced_for: str | None = None  # the split-brain episode reported (and fenced)
        self.rejoin_checked: str | None = None  # the failover auto_rejoin looked at
        self.running = False
        # A noticed loss of the primary's connection not yet seen by a cycle, and when
        # the last one woke the cycle (the debounce).
        self.lost_at: float | None = None
        self._woken_at: float | None = None

    async def job(self) -> None:
        self.running = True
        try:
            async with asyncio.timeout(self.d.config.probe.timeout + 2.0):
                await self.run()
        except TimeoutError:
            self.d.emit("cycle_timeout", note="a probe cycle overran its bound")
        except Exception as exc:  # one bad cycle must never end the loop
            self.d.emit("cycle_error", error=str(exc))
        finally:
            self.running = False
        if self.lost_at is not None:
            self._run_now()  # noticed while this cycle ran: its probes may predate it

    def connection_lost(self, node: str) -> None:
        """An engine's probing connection was closed by its server or the network. For
        the primary's database that is a crash until proven otherwise: probe now, not at
        the next tick; at most once per interval, so a flapping connection cannot make a
        probe storm (later losses wait for the schedule)."""
        d = self.d
        if node != d.roles()[0].name:
            return
        now = d.clock()
        if self._woken_at is not None and now - self._woken_at < d.config.probe.interval:
            return
        self._woken_at = self.lost_at = now
        d.emit("primary_connection_lost", node=node, note="probing at once")
        if not self.running:
            self._run_now()

    def _run_now(self) -> None:
        if self.d.scheduler is not None:
            self.d.scheduler.run_now(PROBE)

    async def run(self) -> Verdict:
        d, cfg = self.d, self.d.config
        at = d.clock()
        lost_at, self.lost_at = self.lost_at, None
        primary, standby = d.roles()
        probes: list[Probe] = [
            DatabaseProbe(primary.name, d.engines[primary.name], cfg.probe.timeout, d.clock),
            DatabaseProbe(standby.name, d.engines[standby.name], cfg.probe.timeout, d.clock),
        ]
        apps: list[NodeConfig] = [n for n in (primary, standby) if n.app is not None]
        if apps or cfg.witnesses:
            # HTTP probes only when configured: their client is heavy for a pair without.
            from watchdogd.probes.app import AppProbe
            from watchdogd.probes.witness import WitnessProbe

            session = d.http_session()
            for node in apps:
                assert node.app is not None
                probes.append(AppProbe(node.name, node.app, session, cfg.probe.timeout, d.clock))
            probes += [WitnessProbe(w, session, cfg.probe.timeout, d.clock) for w in cfg.witnesses]
        # bounded() never raises: one probe's failure is its own failed observation.
        results = await asyncio.gather(*(self.bounded(p) for p in probes))
        pdb, sdb = results[0], results[1]
        app_obs = {o.target: o for o in results[2 : 2 + len(apps)]}
        witnesses = tuple(results[2 + len(apps) :])
        for obs in results:
            d.metrics.observe_probe(obs.target, obs.probe, obs.ok, obs.latency)
            d.emit(
                "probe_observed",
                target=obs.target,
                probe=obs.probe,
                ok=obs.ok,
                latency=obs.latency,
                detail=obs.detail,
                at=obs.at,
            )

        latest = d.latest
        latest.primary_db, latest.standby_db = pdb, sdb
        latest.primary_app = app_obs.get(primary.name)
        latest.standby_app = app_obs.get(standby.name)
        self._fold_lag(pdb, sdb, standby.name)
        verdict = d.detector.update(
            Cycle(
                at=at,
                primary_db=pdb,
                standby_db=sdb,
                primary_app=latest.primary_app,
                witnesses=witnesses,
                primary_lost_at=lost_at,
            )
        )
        previous = latest.verdict
        latest.verdict = verdict
        self.report_verdict(previous, verdict)

        fleet = d.fleet
        if fleet is not None:
            # This watcher's view goes out, the leader reads everyone's (and the journal
            # a follower follows): before the decision, which may need them.
            await fleet.after_probe(verdict, at)
        decision = d.policy.evaluate(verdict, self.standby_facts(), d.wall())
        if fleet is not None:
            decision = fleet.gate(decision)
            d.policy.state = decision.state
        self.report_decision(decision)
        if decision.start is not None and not d.sequences.running:
            # A journal that refuses the start is reported by record(); the next cycle
            # tries again, and nothing was acted on.
            with contextlib.suppress(JournalError, StoppingError):
                await d.sequences.start_failover(
                    decision.start, "automatic", verdict.reason, forced=False
                )
        if fleet is None or fleet.may_act():
            # In a fleet only the leader with authority fences or rejoins: never because
            # the store is down, never from a follower's view alone.
            await self.check_split_brain()
            self.check_auto_rejoin()
        else:
            d.metrics.set_split_brain(d.latest.writable > 1)

        d.metrics.set_armed(d.policy.armed(d.wall()))
        d.metrics.set_primary_down(verdict.outage_seconds)
        d.last_cycle_wall = d.wall()
        d.metrics.cycle_completed(d.last_cycle_wall)
        d.readiness.after_cycle()
        if not self._ready:
            self._ready = True
            d.systemd.ready(f"{d.policy.state}: {decision.reason}")
        d.systemd.watchdog()
        return verdict

    async def bounded(self, probe: Any) -> Observation:
        timeout = self.d.config.probe.timeout
        at = self.d.clock()
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
                self.d.config.mask(f"probe error: {type(exc).__name__}: {text}".rstrip(": ")),
                at,
            )

    def _fold_lag(self, pdb: Observation, sdb: Observation, standby: str) -> None:
        latest, metrics = self.d.latest, self.d.metrics
        view = policy.observe_lag(pdb, sdb, latest.last_primary_pos)
        latest.last_primary_pos = view.last_primary_pos
        latest.lag_bytes, latest.lag_seconds = view.lag_bytes, view.lag_seconds
        latest.writable = view.writable
        metrics.set_lag(standby, view.lag_bytes, view.lag_seconds)
        metrics.set_streaming(standby, view.streaming)
        metrics.set_writable_primaries(view.writable)

    def standby_facts(self) -> StandbyFacts:
        return policy.standby_facts(self.d.latest.standby_db, self.d.latest.last_primary_pos)

    # ------------------------------------------------------------------ news

    def recall_outage(self) -> None:
        """At start: an outage announced before a restart is not news again."""
        self.down_reported = policy.recalled_outage(self.d.state)

    def forget_episode(self) -> None:
        """After an ack: the pair is watched from a clean slate."""
        self.fenced_for = None
        self.down_reported = None
        self.rejoin_checked = None

    def report_verdict(self, previous: Verdict | None, verdict: Verdict) -> None:
        primary = self.d.roles()[0].name
        news, self.down_reported = policy.verdict_news(
            previous, verdict, self.down_reported, primary
        )
        facts = verdict.facts()
        for event in news:
            if event == "primary_still_down":
                note = (
                    "announced before the restart; the unfinished or unacked failover "
                    "is about this outage"
                )
                self.d.emit(event, note=note, **facts)
            else:
                self.d.emit(event, **facts)
        self.d.metrics.set_partition(verdict.partition)

    def report_decision(self, decision: Decision) -> None:
        d = self.d
        last, self.last_decision = self.last_decision, decision
        d.metrics.set_state(decision.state)
        if not policy.state_changed(last, decision):
            return
        d.systemd.status(f"{decision.state}: {decision.reason}")
        latest = d.latest
        # The decision's reason leads; the verdict's is kept beside it.
        verdict_facts = latest.verdict.facts() if latest.verdict else {}
        verdict_facts["verdict_reason"] = verdict_facts.pop("reason", None)
        d.emit(
            "state_changed",
            state=decision.state,
            previous=last.state if last else None,
            reason=decision.reason,
            lag_bytes=latest.lag_bytes,
            lag_seconds=latest.lag_seconds,
            **verdict_facts,
        )
        if decision.state == BLOCKED:
            d.emit(
                "failover_blocked", reason=decision.reason, lag_bytes=self.standby_facts().lag_bytes
            )

    def refresh_state(self) -> None:
        """Re-decide after the journal changed outside the cycle (a command, a run's end)."""
        d = self.d
        verdict = d.latest.verdict or Verdict(HEALTHY, "not probed yet")
        decision = d.policy.evaluate(verdict, self.standby_facts(), d.wall())
        if d.fleet is not None:
            decision = d.fleet.gate(decision)
            d.policy.state = decision.state
        self.report_decision(decision)
        d.metrics.set_armed(d.policy.armed(d.wall()))
        d.readiness.after_cycle()

    # ------------------------------------------------------------------ auto_rejoin

    def check_auto_rejoin(self) -> None:
        """``failover.auto_rejoin``: once per failover, when its old primary answers
        again, compute the divergence in the background and rejoin only on zero."""
        d, latest = self.d, self.d.latest
        answering = frozenset(
            o.target for o in (latest.primary_db, latest.standby_db) if o is not None and o.ok
        )
        fo = policy.auto_rejoin_due(
            d.config.failover,
            d.state,
            answering,
            d.sequences.rejoin_running,
            self.rejoin_checked,
            fencing=d.sequences.fencing,
        )
        if fo is None:
            return
        self.rejoin_checked = fo.id
        task = asyncio.create_task(d.sequences.auto_rejoin(fo), name=f"auto-rejoin-{fo.id}")
        d.background.add(task)
        task.add_done_callback(d.background.discard)
        d.sequences.auto_tasks.add(task)
        task.add_done_callback(d.sequences.auto_tasks.discard)

    # ------------------------------------------------------------------ split brain

    async def check_split_brain(self) -> None:
        d = self.d
        writable = d.latest.writable
        judged = policy.judge_split_brain(writable, d.state.last, self.fenced_for)
        d.metrics.set_split_brain(judged.split)
        self.fenced_for = judged.key
        if not judged.news:
            return  # no split, or this episode is reported (and fenced once)
        fo = judged.failover
        if fo is None:
            d.emit(
                "split_brain",
                writable_primaries=writable,
                note="both nodes accept writes and no failover of ours explains it: "
                "fencing neither; an operator must decide",
            )
            return
        d.emit(
            "split_brain",
            writable_primaries=writable,
            failover_id=fo.id,
            old_primary=fo.from_node,
            new_primary=fo.to_node,
            fence_steps=[s.name for s in d.config.failover.fence_steps],
        )
        await d.sequences.start_fence(fo)
