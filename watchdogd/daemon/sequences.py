"""Failovers, fences and rejoins: build the plan, launch it through the ``Runner``
(journaled before anyone is told it started), resume an unfinished failover or rejoin
after a restart, close a fence a restart cut off, and let running sequences finish
their step at shutdown.

A rejoin brings the node failed away from back as the standby: its divergence report is
computed first (``Engine.divergence``), then ``failover.rejoin_steps`` run and the last
step (``verify_rejoin``) waits until the old primary streams from the new one and has
caught up. Only then is the failover acked, as ``watchdogctl ack`` would: roles swapped,
automatic failover re-armed.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets as pysecrets
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from watchdogd import actions, policy
from watchdogd.actions import Action, ActionError, StepContext
from watchdogd.config import step_room
from watchdogd.core.model import StepConfig
from watchdogd.core.secrets import mask_value
from watchdogd.daemon.fleet import guard_step
from watchdogd.engines import Divergence, EngineError
from watchdogd.failover.runner import COMPLETED, Runner
from watchdogd.policy import FAILING_OVER, Plan, build_plan, build_rejoin_plan
from watchdogd.state import journal as records
from watchdogd.state.journal import FailoverRecord, JournalError, RejoinRecord

if TYPE_CHECKING:
    from watchdogd.daemon.lifecycle import Daemon


# How long the divergence report may take (both servers are asked, read-only).
DIVERGENCE_TIMEOUT = 10.0


class StoppingError(RuntimeError):
    """watchdogd is stopping: no failover, rejoin or fence starts any more."""

    def __init__(self) -> None:
        super().__init__("watchdogd is stopping: nothing new starts")


@dataclass
class VerifyRejoin:
    """A rejoin's last step: ``replica_of`` asked again until it says yes or the step's
    timeout (``failover.rejoin_timeout``) is up."""

    poll: float = 0.5
    idempotent: bool = True

    async def run(self, ctx: StepContext, timeout: float) -> str:
        old, new = ctx.engine(ctx.primary), ctx.engine(ctx.standby)
        deadline = time.monotonic() + timeout
        while True:
            try:
                return await old.replica_of(new, max(0.05, deadline - time.monotonic()))
            except EngineError as exc:
                why = str(exc)
            if time.monotonic() + self.poll >= deadline:
                raise ActionError(
                    f"{ctx.primary.name} is not a caught-up replica of {ctx.standby.name} "
                    f"after {timeout:g}s: {why}"
                )
            await asyncio.sleep(self.poll)

    def describe(self, ctx: StepContext) -> dict[str, Any]:
        return {
            "node": ctx.primary.name,
            "verify": f"{ctx.primary.name} streams from {ctx.standby.name} and caught up",
        }


class Sequences:
    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        self.runner: Runner | None = None
        self.runner_task: asyncio.Task[str] | None = None
        self.fence_runner: Runner | None = None
        self.fence_task: asyncio.Task[str] | None = None
        self.rejoin_runner: Runner | None = None
        self.rejoin_task: asyncio.Task[str] | None = None
        # A rejoin's divergence report is being computed (by a command or auto_rejoin).
        self.rejoin_starting = False
        # The last divergence report (status), and the one writes_diverged went out for.
        self.last_divergence: dict[str, Any] | None = None
        self._diverged_reported: tuple[str, int | None] | None = None
        # Why auto_rejoin waits for an operator (None: it does not).
        self.rejoin_waiting: dict[str, Any] | None = None
        # Set by stop(): nothing new starts (a background auto_rejoin included).
        self.stopping = False
        # A failover's start record is being written: with a store that takes time to
        # answer, a command or a cycle meanwhile must not start a second one.
        self._launching = False
        # A fence's or a rejoin's start record is being written (the same, for them).
        self._fence_launching = False
        self._rejoin_launching = False
        # auto_rejoin's background tasks (a fleet leader that loses its token ends them).
        self.auto_tasks: set[asyncio.Task[None]] = set()

    @property
    def running(self) -> bool:
        """A failover (or switchover) is running (or starting) in this process."""
        return self.runner_task is not None or self._launching

    def new_id(self) -> str:
        stamp = datetime.fromtimestamp(self.d.wall(), UTC).strftime("%Y%m%dT%H%M%SZ")
        return f"{stamp}-{pysecrets.token_hex(2)}"

    # ------------------------------------------------------------------ plans

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
        primary, standby = self.d.base_roles()
        cfg = self.d.config.failover
        if catchup_timeout is not None:
            cfg = replace(cfg, catchup_timeout=catchup_timeout)
        return build_plan(
            cfg,
            id=id or self.new_id(),
            kind=kind,
            trigger=trigger,
            reason=reason,
            from_node=primary.name,
            to_node=standby.name,
            forced=forced,
            guard=guard_step(self.d.config),
            step_limit=None if self.d.config.store is None else step_room(self.d.config.store.etcd),
        )

    def context(self, plan: Plan) -> StepContext:
        config = self.d.config
        return StepContext(
            config=config,
            primary=config.node(plan.from_node),
            standby=config.node(plan.to_node),
            engines=self.d.engines,
            failover_id=plan.id,
            reason=plan.reason,
            trigger=plan.trigger,
            extra={} if self.d.fleet is None else {"guard": self.d.fleet.guard},
        )

    def describe(self, plan: Plan, failover_id: str | None = None) -> dict[str, Any]:
        config, ctx = self.d.config, self.context(plan)
        ids = {"failover_id": plan.id}
        if failover_id is not None:  # a rejoin after that failover
            ctx.failover_id = failover_id
            ids = {"rejoin_id": plan.id, "failover_id": failover_id}
        described = {
            **ids,
            "kind": plan.kind,
            "trigger": plan.trigger,
            "reason": plan.reason,
            "from": plan.from_node,
            "to": plan.to_node,
            "forced": plan.forced,
            "steps": [actions.describe(s, a, ctx) for s, a in self._built(plan.steps)],
        }
        # The operator's reason may quote a secret too: mask the whole plan, not just steps.
        result: dict[str, Any] = mask_value(described, config.secrets)
        return result

    def _built(self, steps: tuple[StepConfig, ...]) -> list[tuple[StepConfig, Action]]:
        # A rejoin's verification is the daemon's own step, not a configurable action.
        return [
            (s, VerifyRejoin() if s.name == policy.VERIFY_STEP else actions.build(s, self.d.config))
            for s in steps
        ]

    def _actions(self, steps: tuple[StepConfig, ...]) -> dict[str, Action]:
        return {s.name: action for s, action in self._built(steps)}

    # ------------------------------------------------------------------ failovers

    async def start_failover(
        self,
        kind: str,
        trigger: str,
        reason: str,
        *,
        forced: bool,
        catchup_timeout: float | None = None,
    ) -> Plan:
        plan = self.plan(kind, trigger, reason, forced=forced, catchup_timeout=catchup_timeout)
        await self._launch(plan, resume=None)
        return plan

    async def resume(self, fo: FailoverRecord) -> None:
        plan = self.plan(fo.kind, fo.trigger, fo.reason, forced=fo.forced, id=fo.id)
        # At start: a journal refusing records is reported by record(); start() goes on.
        with contextlib.suppress(JournalError):
            if not policy.can_resume(plan, fo):
                await self._unresumable(
                    "failover", fo.id, "finish it by hand and ack", failover_id=fo.id
                )
                return
            await self._launch(plan, resume=fo)

    async def _unresumable(self, sequence: str, id: str, what_now: str, **ids: Any) -> None:
        """Close an unfinished failover (rejoin) that the config no longer describes:
        resuming it under other steps or roles would be a guess."""
        d = self.d
        error = (
            f"cannot resume: the {sequence} steps or roles in the config changed since it "
            f"started; {what_now}"
        )
        await d.record(
            records.sequence_finished(sequence, id=id, outcome="failed", error=error, at=d.wall())
        )
        d.emit(f"{sequence}_failed", **ids, error=error)

    async def _launch(self, plan: Plan, resume: FailoverRecord | None) -> None:
        d = self.d
        if self.stopping:
            raise StoppingError
        if self.running:
            raise JournalError("a failover is already starting")
        runner = Runner(
            plan,
            self.context(plan),
            self._actions(plan.steps),
            d.record,
            d.emit,
            resume=resume,
            wall=d.wall,
            **self.authority_bounds(),
        )
        self._launching = True
        try:
            await runner.begin()  # journaled before anyone is told the failover started
        finally:
            self._launching = False
        self.runner = runner
        d.metrics.set_in_progress(True)
        d.metrics.set_state(FAILING_OVER)
        self.runner_task = asyncio.create_task(self._run(runner), name=f"failover-{plan.id}")

    async def _run(self, runner: Runner) -> str:
        d = self.d
        try:
            outcome = await self._guarded(runner)
        finally:
            self.runner, self.runner_task = None, None
            d.metrics.set_in_progress(False)
        await self._withdraw_guard_order(runner.plan.id)
        self._left_unfinished()
        d.cycle.refresh_state()
        return outcome

    async def _withdraw_guard_order(self, failover_id: str) -> None:
        """A failover the journal shows ended without completing takes back its fence
        order to the old primary's guard (``GuardLink.withdraw``); one left unfinished
        (for the next leader) keeps it."""
        fleet = self.d.fleet
        if fleet is None or fleet.guard is None:
            return
        fo = next((f for f in self.d.state.failovers if f.id == failover_id), None)
        if fo is not None and fo.outcome is not None and fo.outcome != COMPLETED:
            await fleet.guard.withdraw(failover_id)

    def _left_unfinished(self) -> None:
        """In a fleet, a sequence that ended without finishing (the store did not take a
        record, or the leader's authority ran out) is resumed by this watcher once it
        can act again: it re-reads the journal from the store first, as a new leader."""
        fleet, state = self.d.fleet, self.d.state
        if fleet is None or self.stopping:
            return
        if state.unfinished or state.unfinished_rejoin or state.unfinished_fence:
            fleet.resync()

    async def _guarded(self, runner: Runner) -> str:
        """Run a failover (or a rejoin). A journal that refuses a record is reported by
        record(); nothing more is done without a durable journal, and the sequence stays
        unfinished, so a restart resumes it once the disk takes records."""
        ids = {f"{runner.sequence}_id": runner.plan.id}
        try:
            return await runner.run()
        except JournalError as exc:
            note = (
                "the journal cannot be written: no further step runs; restart watchdogd "
                f"once it can, and the {runner.sequence} resumes"
            )
            if self.d.fleet is not None:
                note = (
                    f"the fleet's journal did not take a record ({exc}): no further step "
                    f"runs here; the {runner.sequence} stays unfinished in the store and "
                    "the leader resumes it once it can act"
                )
            self.d.emit(runner.event_name("failover_stopped"), **ids, note=note)
        except Exception as exc:
            self.d.emit(runner.event_name("failover_crashed"), **ids, error=str(exc))
        return "failed"

    # ------------------------------------------------------------------ fences

    async def start_fence(self, fo: FailoverRecord) -> None:
        """Run the fence steps through the runner (retries, timeouts, ``required``,
        journaled as a fence, never as a failover)."""
        d = self.d
        steps = d.config.failover.fence_steps
        if not steps or self.fencing or self.stopping:
            return
        if self.rejoin_running:
            # Both act on the old primary; a rejoin fences it itself before it measures.
            d.emit(
                "fence_skipped",
                failover_id=fo.id,
                old_primary=fo.from_node,
                reason="a rejoin of the old primary is running or starting (it fences first)",
            )
            return
        plan = Plan(
            id=f"fence-{self.new_id()}",
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
            d.record,
            d.emit,
            wall=d.wall,
            failover_id=fo.id,
            **self.authority_bounds(),
        )
        self._fence_launching = True  # a cycle meanwhile must not start a second fence
        try:
            await runner.begin()
        except JournalError:
            return  # reported by record(); fenced again after a restart if still needed
        finally:
            self._fence_launching = False
        self.fence_runner = runner
        self.fence_task = asyncio.create_task(self._run_fence(runner), name=plan.id)

    async def _run_fence(self, runner: Runner) -> str:
        try:
            return await runner.run()
        except Exception as exc:
            self.d.emit("fence_crashed", fence_id=runner.plan.id, error=str(exc))
            return "failed"
        finally:
            self.fence_runner = None
            self._left_unfinished()

    async def close_unfinished_fence(self) -> None:
        """A fence cut off by a crash is closed, not resumed: fencing is idempotent, and if
        both nodes still accept writes the split-brain check fences again on its own.
        Resuming it as a failover would be wrong in every way (history, cooldown, roles)."""
        d = self.d
        fence = d.state.unfinished_fence
        if fence is None:
            return
        note = (
            "the daemon stopped during this fence; fences are not resumed: the split-brain "
            "check fences again if both nodes still accept writes"
        )
        await d.record(
            records.sequence_finished(
                "fence", id=fence.id, outcome="interrupted", error=note, at=d.wall()
            )
        )
        d.emit(
            "fence_unfinished",
            fence_id=fence.id,
            failover_id=fence.failover_id,
            old_primary=fence.from_node,
            steps_done=[st.name for st in fence.steps if st.outcome == "ok"],
            note=note,
        )

    # ------------------------------------------------------------------ rejoins

    @property
    def fencing(self) -> bool:
        return self._fence_launching or (self.fence_task is not None and not self.fence_task.done())

    @property
    def rejoin_running(self) -> bool:
        """A rejoin runs, or its divergence report is being computed, in this process."""
        return self.rejoin_task is not None or self.rejoin_starting or self._rejoin_launching

    async def fence_old(self, fo: FailoverRecord) -> str | None:
        """Fence ``fo``'s old primary (read-only, client sessions ended; idempotent) before a
        real rejoin measures its divergence, so that no write lands between the report and
        the rewind. Why it failed, in one line, or None once fenced."""
        d = self.d
        old, new = d.engines[fo.from_node], d.engines[fo.to_node]
        each = self.divergence_timeout()
        fleet = d.fleet
        if fleet is not None:
            each = max(0.25, (each - 1.0) / 2)  # the whole fence (2 calls + 1 s) fits a step
        bound = 2 * each + 1.0
        if fleet is not None:
            # A fleet leader fences only within its authority, as a step: room for the
            # whole fence and one store call (waiting a renewal for it, as a step does),
            # and it is cut off at the deadline.
            need = bound + fleet.timing.budget
            loop = asyncio.get_running_loop()
            until = loop.time() + d.authority_wait()
            if fleet.authority_left() < need:
                fleet.renew_soon()
            while True:  # a renewal is a store reply, not an event here: poll, as a step does
                if not fleet.may_act() or fleet.authority_left() >= need or loop.time() >= until:
                    break
                await asyncio.sleep(0.05)
            left = fleet.authority_left()
            if not fleet.may_act() or left < need:
                return (
                    f"{fo.from_node} was not fenced: this leader's authority ({left:.1f}s "
                    f"left) is shorter than the fence may take ({need:.1f}s)"
                )

        async def fence() -> None:
            # A DSN that reaches the new primary must never fence it.
            await old.distinct_from(new, each)
            await old.fence(each)

        try:
            if not await self._within_authority(fence(), bound):
                return f"{fo.from_node} was not fenced: this leader's authority ended"
        except TimeoutError:
            return f"{fo.from_node} could not be fenced: no answer within {each:g}s"
        except Exception as exc:  # an engine error or a bug: the rejoin must not go ahead
            return d.config.mask(f"{fo.from_node} could not be fenced: {exc}")
        return None

    def authority_bounds(self) -> dict[str, Any]:
        """A runner's authority bounds: in a fleet the leader's authority, the wait for a
        renewal and the way to ask for one now; none for one watcher (its steps are
        bounded by their timeouts only, without polling an authority that is always
        unlimited)."""
        d = self.d
        if d.fleet is None:
            return {}
        return {
            "authority": d.authority_left,
            "authority_wait": d.authority_wait(),
            "renew": d.fleet.renew_soon,
        }

    def divergence_timeout(self) -> float:
        """How long one call of a divergence report or a rejoin's fence may take: in a
        fleet no longer than a leader's step may (``step_room``)."""
        store = self.d.config.store
        if store is None:
            return DIVERGENCE_TIMEOUT
        return max(0.5, min(DIVERGENCE_TIMEOUT, step_room(store.etcd)))

    async def _within_authority(self, work: Any, timeout: float) -> bool:
        """``work`` bounded by ``timeout`` and, in a fleet, cancelled the moment the
        leader's authority ends (False then); TimeoutError past ``timeout``."""
        fleet = self.d.fleet
        if fleet is None:
            async with asyncio.timeout(timeout):
                await work
            return True
        task = asyncio.ensure_future(work)
        loop = asyncio.get_running_loop()
        until = loop.time() + timeout
        try:
            while not task.done():
                if fleet.authority_left() <= 0:
                    return False
                wait = until - loop.time()
                if wait <= 0:
                    raise TimeoutError
                await asyncio.wait({task}, timeout=min(wait, 0.1))
            task.result()
            return True
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    async def measure(self, fo: FailoverRecord, *, fence: bool) -> Divergence:
        """The divergence report of a rejoin: fenced first unless ``fence`` is False (a dry
        run). A fence that fails makes the report unknown without measuring (writes may
        still land): refused unless the operator accepts it, as any unknown report (an
        old primary that is down cannot be fenced, and is rejoined only so)."""
        unfenced = await self.fence_old(fo) if fence else None
        if unfenced is not None:
            return policy.unknown_divergence(f"{unfenced}; writes may still land on it")
        return await self.divergence(fo)

    async def divergence(self, fo: FailoverRecord) -> Divergence:
        """What ``fo``'s old primary holds that its new primary lacks; never raises (a
        report that cannot be made is ``known=False`` with the reason)."""
        d = self.d
        old, new = d.engines[fo.from_node], d.engines[fo.to_node]
        each = self.divergence_timeout()
        try:
            async with asyncio.timeout(each + 1.0):
                return await old.divergence(new, each)
        except EngineError as exc:
            return policy.unknown_divergence(d.config.mask(f"{fo.from_node}: {exc}"))
        except TimeoutError:
            return policy.unknown_divergence(f"no answer within {each:g}s")
        except Exception as exc:  # a bug in an engine must not reach the operator raw
            return policy.unknown_divergence(
                d.config.mask(f"unexpected {type(exc).__name__}: {exc}")
            )

    def report_divergence(
        self, fo: FailoverRecord, div: Divergence, trigger: str
    ) -> dict[str, Any]:
        """Keep the report for status, and tell ``writes_diverged`` once per report of a
        failover (not once per command or cycle)."""
        d = self.d
        report: dict[str, Any] = mask_value(
            {
                "failover_id": fo.id,
                "old_primary": fo.from_node,
                "new_primary": fo.to_node,
                "at": d.wall(),
                **div.as_dict(),
                "summary": policy.describe_divergence(div),
            },
            d.config.secrets,
        )
        self.last_divergence = report
        key = (fo.id, div.lost)
        if div.diverged and key != self._diverged_reported:
            self._diverged_reported = key
            d.emit("writes_diverged", trigger=trigger, **report)
        return report

    def rejoin_plan(
        self, fo: FailoverRecord, trigger: str, reason: str, *, id: str | None = None
    ) -> Plan:
        return build_rejoin_plan(
            self.d.config.failover,
            id=id or f"rejoin-{self.new_id()}",
            trigger=trigger,
            reason=reason,
            fo=fo,
        )

    async def start_rejoin(
        self,
        fo: FailoverRecord,
        report: dict[str, Any],
        *,
        accepted: bool,
        trigger: str,
        reason: str,
    ) -> Plan:
        """Journal the rejoin (with its divergence report) and run it in the background."""
        plan = self.rejoin_plan(fo, trigger, reason)
        await self._launch_rejoin(plan, fo, None, {"divergence": report, "accepted": accepted})
        self.rejoin_waiting = None
        self.d.metrics.set_rejoin_waiting(False)
        return plan

    async def resume_rejoin(self) -> None:
        """At start: resume an unfinished rejoin under today's rules (the steps and roles
        it started with), or finish the ack a restart cut off after a verified rejoin."""
        d = self.d
        rj = d.state.last_rejoin
        if rj is None:
            return
        self.last_divergence = rj.divergence
        fo = next((f for f in d.state.failovers if f.id == rj.failover_id), None)
        # A journal refusing records is reported by record() (failed state, /healthz 503);
        # it must not stop start() (systemd would restart it in a loop): the next start
        # with a writable journal does it.
        if not rj.unfinished:
            if rj.outcome == COMPLETED and fo is not None and fo is d.state.awaiting_ack:
                with contextlib.suppress(JournalError, ValueError):
                    await self.rearm(rj)
            return
        ids = {"rejoin_id": rj.id, "failover_id": rj.failover_id}
        d.emit("rejoin_unfinished", **ids, note="resuming from the first unfinished step")
        plan = None if fo is None else self.rejoin_plan(fo, rj.trigger, rj.reason, id=rj.id)
        if fo is None or plan is None or not policy.can_resume(plan, rj):
            what_now = "check the old primary by hand, then run watchdogctl rejoin again"
            with contextlib.suppress(JournalError):
                await self._unresumable("rejoin", rj.id, what_now, **ids)
            return
        with contextlib.suppress(JournalError):
            await self._launch_rejoin(plan, fo, rj, {})

    async def _launch_rejoin(
        self,
        plan: Plan,
        fo: FailoverRecord,
        resume: RejoinRecord | None,
        started: dict[str, Any],
    ) -> None:
        d = self.d
        if self.stopping:
            raise StoppingError
        ctx = self.context(plan)
        ctx.failover_id = fo.id  # step templates name the failover whose old primary rejoins
        runner = Runner(
            plan,
            ctx,
            self._actions(plan.steps),
            d.record,
            d.emit,
            resume=resume,
            wall=d.wall,
            failover_id=fo.id,
            started=started,
            **self.authority_bounds(),
        )
        self._rejoin_launching = True  # a cycle meanwhile must not start a fence or rejoin
        try:
            await runner.begin()  # journaled, with the divergence report, before any step runs
        finally:
            self._rejoin_launching = False
        self.rejoin_runner = runner
        self.rejoin_task = asyncio.create_task(self._run_rejoin(runner), name=plan.id)

    async def _run_rejoin(self, runner: Runner) -> str:
        d = self.d
        try:
            outcome = await self._guarded(runner)
        finally:
            self.rejoin_runner, self.rejoin_task = None, None
        self._left_unfinished()
        rj, fo = d.state.last_rejoin, d.state.awaiting_ack
        if (
            outcome == COMPLETED
            and rj is not None
            and rj.id == runner.plan.id
            and fo is not None
            and fo.id == rj.failover_id  # the failover it rejoined for still awaits its ack
        ):
            with contextlib.suppress(JournalError):  # reported; acked at the next start
                await self.rearm(rj)
        d.cycle.refresh_state()
        return outcome

    async def rearm(self, rj: RejoinRecord) -> None:
        """A verified rejoin: ack its failover exactly as an operator's ack would."""
        await self.d.commands.acknowledge(by=f"rejoin {rj.id}", rejoin_id=rj.id)

    async def auto_rejoin(self, fo: FailoverRecord) -> None:
        """``auto_rejoin``: the old primary answers again. Rejoin it only on proof that
        nothing diverged; otherwise tell why and wait for an operator."""
        d = self.d
        self.rejoin_starting = True
        try:
            div = await self.measure(fo, fence=True)
            report = self.report_divergence(fo, div, "automatic")
            if d.state.awaiting_ack is not fo or d.state.unfinished_rejoin is not None:
                return  # an operator acted meanwhile
            if policy.refuse_rejoin(d.state, self.rejoin_task is not None, self.fencing):
                d.cycle.rejoin_checked = None  # a fence or a failover started meanwhile:
                return  # looked at again once they are done
            if not policy.auto_rejoin_starts(div):
                why = (
                    "writes diverged" if div.diverged else "divergence unknown"
                ) + f": {report['summary']}"
                self._wait_for_operator(fo, why)
                return
            # A journal error is reported by record() (retried by hand); stopping: nothing starts.
            with contextlib.suppress(JournalError, StoppingError):
                await self.start_rejoin(
                    fo,
                    report,
                    accepted=False,
                    trigger="automatic",
                    reason=f"automatic rejoin of {fo.from_node}: {report['summary']} diverged",
                )
        finally:
            self.rejoin_starting = False

    def _wait_for_operator(self, fo: FailoverRecord, why: str) -> None:
        d = self.d
        self.rejoin_waiting = {"failover_id": fo.id, "reason": why}
        d.emit(
            "rejoin_waiting",
            failover_id=fo.id,
            old_primary=fo.from_node,
            new_primary=fo.to_node,
            reason=why,
            note="auto_rejoin rejoins only with a known zero divergence: run "
            "watchdogctl rejoin (--accept-divergence to throw those writes away)",
        )
        d.metrics.set_rejoin_waiting(True)

    # ------------------------------------------------------------------ shutdown

    async def abandon(self) -> None:
        """Stop every running sequence at once, journaling nothing more (a fleet leader
        that lost its leadership): what is unfinished in the store is the next leader's
        to resume. A command step's process group is killed with its step."""
        tasks: list[asyncio.Task[Any]] = [
            t for t in (self.runner_task, self.fence_task, self.rejoin_task) if t is not None
        ]
        tasks += [t for t in self.auto_tasks if not t.done()]  # auto_rejoin fencing or measuring
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.runner = self.fence_runner = self.rejoin_runner = None
        self.runner_task = self.fence_task = self.rejoin_task = None
        self.d.metrics.set_in_progress(False)

    async def interrupt(self) -> None:
        """Let each running step finish and be journaled (a retry delay ends at once); the
        next start resumes a failover, and fences again if still needed."""
        for runner, task in (
            (self.runner, self.runner_task),
            (self.fence_runner, self.fence_task),
            (self.rejoin_runner, self.rejoin_task),
        ):
            if runner is not None and task is not None and not task.done():
                self.d.emit("waiting_for_step", step=runner.current_step, sequence=runner.sequence)
                runner.interrupt()
                with contextlib.suppress(Exception):
                    await task
