"""Failovers and fences: build the plan, launch it through the ``Runner`` (journaled
before anyone is told it started), resume an unfinished failover after a restart, close
a fence a restart cut off, and let running sequences finish their step at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets as pysecrets
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from watchdogd import actions, policy
from watchdogd.actions import Action, StepContext
from watchdogd.core.model import StepConfig
from watchdogd.core.secrets import mask_value
from watchdogd.failover.runner import Runner
from watchdogd.policy import FAILING_OVER, Plan, build_plan
from watchdogd.state import journal as records
from watchdogd.state.journal import FailoverRecord, JournalError

if TYPE_CHECKING:
    from watchdogd.daemon.lifecycle import Daemon


class Sequences:
    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        self.runner: Runner | None = None
        self.runner_task: asyncio.Task[str] | None = None
        self.fence_runner: Runner | None = None
        self.fence_task: asyncio.Task[str] | None = None

    @property
    def running(self) -> bool:
        """A failover (or switchover) is running in this process."""
        return self.runner_task is not None

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
        )

    def describe(self, plan: Plan) -> dict[str, Any]:
        config, ctx = self.d.config, self.context(plan)
        described = {
            "failover_id": plan.id,
            "kind": plan.kind,
            "trigger": plan.trigger,
            "reason": plan.reason,
            "from": plan.from_node,
            "to": plan.to_node,
            "forced": plan.forced,
            "steps": [actions.describe(s, actions.build(s, config), ctx) for s in plan.steps],
        }
        # The operator's reason may quote a secret too: mask the whole plan, not just steps.
        result: dict[str, Any] = mask_value(described, config.secrets)
        return result

    def _actions(self, steps: tuple[StepConfig, ...]) -> dict[str, Action]:
        return {s.name: actions.build(s, self.d.config) for s in steps}

    # ------------------------------------------------------------------ failovers

    def start_failover(
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

    def resume(self, fo: FailoverRecord) -> None:
        d = self.d
        plan = self.plan(fo.kind, fo.trigger, fo.reason, forced=fo.forced, id=fo.id)
        if not policy.can_resume(plan, fo):
            error = (
                "cannot resume: the failover steps or roles in the config changed since it "
                "started; finish it by hand and ack"
            )
            d.record(
                records.sequence_finished(
                    "failover", id=fo.id, outcome="failed", error=error, at=d.wall()
                )
            )
            d.emit("failover_failed", failover_id=fo.id, error=error)
            return
        self._launch(plan, resume=fo)

    def _launch(self, plan: Plan, resume: FailoverRecord | None) -> None:
        d = self.d
        runner = Runner(
            plan,
            self.context(plan),
            self._actions(plan.steps),
            d.record,
            d.emit,
            resume=resume,
            wall=d.wall,
        )
        runner.begin()  # journaled before anyone is told the failover started
        self.runner = runner
        d.metrics.set_in_progress(True)
        d.metrics.set_state(FAILING_OVER)
        self.runner_task = asyncio.create_task(self._run(runner), name=f"failover-{plan.id}")

    async def _run(self, runner: Runner) -> str:
        d = self.d
        try:
            outcome = await runner.run()
        except JournalError:
            # Reported by record(). Nothing more is done without a durable journal; the
            # failover stays unfinished and a restart resumes it once the disk takes records.
            d.emit(
                "failover_stopped",
                failover_id=runner.plan.id,
                note="the journal cannot be written: no further step runs; restart watchdogd "
                "once it can, and the failover resumes",
            )
            outcome = "failed"
        except Exception as exc:
            d.emit("failover_crashed", failover_id=runner.plan.id, error=str(exc))
            outcome = "failed"
        finally:
            self.runner, self.runner_task = None, None
            d.metrics.set_in_progress(False)
        d.cycle.refresh_state()
        return outcome

    # ------------------------------------------------------------------ fences

    def start_fence(self, fo: FailoverRecord) -> None:
        """Run the fence steps through the runner (retries, timeouts, ``required``,
        journaled as a fence, never as a failover)."""
        d = self.d
        steps = d.config.failover.fence_steps
        if not steps or (self.fence_task is not None and not self.fence_task.done()):
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
            plan, ctx, self._actions(steps), d.record, d.emit, wall=d.wall, failover_id=fo.id
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
            self.d.emit("fence_crashed", fence_id=runner.plan.id, error=str(exc))
            return "failed"
        finally:
            self.fence_runner = None

    def close_unfinished_fence(self) -> None:
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
        d.record(
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

    # ------------------------------------------------------------------ shutdown

    async def interrupt(self) -> None:
        """Let each running step finish and be journaled (a retry delay ends at once); the
        next start resumes a failover, and fences again if still needed."""
        for runner, task in ((self.runner, self.runner_task), (self.fence_runner, self.fence_task)):
            if runner is not None and task is not None and not task.done():
                self.d.emit("waiting_for_step", step=runner.current_step, sequence=runner.sequence)
                runner.interrupt()
                with contextlib.suppress(Exception):
                    await task
