"""The runner: executes a Plan step by step, journaling intent and outcome.

For each step: journal ``step_started`` (fsync'd) → run the action bounded by
the step's timeout → journal ``step_finished``; retry up to ``retries`` times
after ``retry_delay``; a failed ``required`` step ends the sequence as
``failed`` and later steps never run. An operator's abort is honoured before
the next step (or retry), never in the middle of one.

A plan resumed after a crash skips the steps the journal shows as done. A step
that was started but never finished is run again only when it is idempotent
(per step ``idempotent:``, else the action's own default); otherwise it is
marked ``interrupted`` and, if required, the failover fails for a human to
check — guessing would risk doing it twice.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Any

from watchdogd.actions import Action, ActionError, StepContext
from watchdogd.config import StepConfig
from watchdogd.engines import EngineError
from watchdogd.failover.journal import FailoverRecord
from watchdogd.policy import Plan

Record = Callable[[dict[str, Any]], None]
Emit = Callable[..., None]

COMPLETED, FAILED, ABORTED = "completed", "failed", "aborted"
INTERRUPTED = "interrupted"  # stopped for a daemon shutdown; the next start resumes it


class Runner:
    def __init__(
        self,
        plan: Plan,
        ctx: StepContext,
        actions: Mapping[str, Action],
        record: Record,
        emit: Emit,
        *,
        resume: FailoverRecord | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.plan = plan
        self.ctx = ctx
        self.actions = actions
        self.record = record
        self.emit = emit
        self.resume = resume
        self.wall = wall
        self.current_step: str | None = None
        self.current_step_started: float | None = None
        self._abort = asyncio.Event()
        self._abort_by: str = "operator"
        self._interrupt = False

    def abort(self, by: str = "operator") -> None:
        self._abort_by = by
        self._abort.set()

    def interrupt(self) -> None:
        """Stop after the current step without finishing the failover in the journal,
        so the next start resumes it (daemon shutdown)."""
        self._interrupt = True

    async def run(self) -> str:
        plan = self.plan
        if self.resume is None:
            self.record(
                {
                    "type": "failover_started",
                    "id": plan.id,
                    "trigger": plan.trigger,
                    "kind": plan.kind,
                    "reason": plan.reason,
                    "from": plan.from_node,
                    "to": plan.to_node,
                    "steps": [s.name for s in plan.steps],
                    "forced": plan.forced,
                    "at": self.wall(),
                }
            )
            self.emit(
                "failover_started",
                failover_id=plan.id,
                trigger=plan.trigger,
                kind=plan.kind,
                reason=plan.reason,
                from_node=plan.from_node,
                to_node=plan.to_node,
                steps=[s.name for s in plan.steps],
            )
        else:
            done = [s.name for s in self.resume.steps if s.outcome in ("ok", "skipped")]
            self.emit(
                "failover_resumed", failover_id=plan.id, trigger=plan.trigger, steps_done=done
            )

        for step in plan.steps:
            if self._interrupt:
                self.emit("failover_interrupted", failover_id=plan.id, next_step=step.name)
                return INTERRUPTED
            if self._abort.is_set():
                return self._finish(ABORTED, f"aborted by {self._abort_by} before step {step.name}")
            prior = self.resume.step(step.name) if self.resume is not None else None
            if prior is not None and prior.outcome in ("ok", "skipped"):
                continue
            action = self.actions[step.name]
            if prior is not None and prior.started_at is not None and prior.outcome is None:
                idempotent = step.idempotent if step.idempotent is not None else action.idempotent
                if not idempotent:
                    error = (
                        "interrupted by a restart while running and not idempotent: "
                        "check its effect by hand"
                    )
                    self._step_finished(step, "interrupted", 0.0, error=error)
                    if step.required:
                        return self._finish(FAILED, f"step {step.name}: {error}")
                    continue
            outcome = await self._run_step(step, action, prior.attempts if prior else 0)
            if outcome == ABORTED:
                return self._finish(
                    ABORTED, f"aborted by {self._abort_by} during retries of {step.name}"
                )
            if outcome is not None and step.required:
                return self._finish(FAILED, f"step {step.name} failed: {outcome}")
        return self._finish(COMPLETED, None)

    async def _run_step(self, step: StepConfig, action: Action, attempts: int) -> str | None:
        """Run one step with its retries; returns None on success, else the error."""
        error = ""
        for attempt in range(attempts + 1, attempts + step.retries + 2):
            self.current_step, self.current_step_started = step.name, self.wall()
            self.record(
                {
                    "type": "step_started",
                    "id": self.plan.id,
                    "step": step.name,
                    "action": step.action,
                    "attempt": attempt,
                    "at": self.wall(),
                }
            )
            self.emit(
                "step_started",
                failover_id=self.plan.id,
                step=step.name,
                action=step.action,
                attempt=attempt,
            )
            t0 = time.monotonic()
            try:
                # The action bounds itself; this is the backstop for one that doesn't.
                async with asyncio.timeout(step.timeout + 1.0):
                    detail = await action.run(self.ctx, step.timeout)
            except (ActionError, EngineError) as exc:
                error = self.ctx.config.mask(str(exc))
            except TimeoutError:
                error = f"no result within {step.timeout:g}s"
            except Exception as exc:  # a bug in an action must not kill the sequence
                error = self.ctx.config.mask(f"unexpected {type(exc).__name__}: {exc}")
            else:
                self._step_finished(
                    step, "ok", time.monotonic() - t0, detail=self.ctx.config.mask(str(detail))
                )
                return None
            finally:
                self.current_step = None
            seconds = time.monotonic() - t0
            last = attempt > attempts + step.retries
            if last:
                break
            self.emit(
                "step_retry",
                failover_id=self.plan.id,
                step=step.name,
                attempt=attempt,
                error=error,
                seconds=round(seconds, 3),
                retry_in=step.retry_delay,
            )
            try:
                async with asyncio.timeout(step.retry_delay):
                    await self._abort.wait()
                self._step_finished(step, "failed", seconds, error=error)
                return ABORTED
            except TimeoutError:
                pass
        self._step_finished(step, "failed", seconds, error=error)
        return error

    def _step_finished(
        self,
        step: StepConfig,
        outcome: str,
        seconds: float,
        *,
        error: str | None = None,
        detail: str | None = None,
    ) -> None:
        self.record(
            {
                "type": "step_finished",
                "id": self.plan.id,
                "step": step.name,
                "action": step.action,
                "outcome": outcome,
                "error": error,
                "detail": detail,
                "seconds": round(seconds, 4),
                "at": self.wall(),
            }
        )
        event = "step_completed" if outcome == "ok" else "step_failed"
        self.emit(
            event,
            failover_id=self.plan.id,
            step=step.name,
            action=step.action,
            outcome=outcome,
            seconds=round(seconds, 4),
            error=error,
            detail=detail,
            required=step.required,
        )

    def _finish(self, outcome: str, error: str | None) -> str:
        self.record(
            {
                "type": "failover_finished",
                "id": self.plan.id,
                "outcome": outcome,
                "error": error,
                "at": self.wall(),
            }
        )
        self.emit(
            f"failover_{outcome}",
            failover_id=self.plan.id,
            trigger=self.plan.trigger,
            outcome=outcome,
            error=error,
            from_node=self.plan.from_node,
            to_node=self.plan.to_node,
        )
        return outcome
