"""The runner: executes a Plan step by step, journaling intent and outcome.

For each step: journal the step's start (fsync'd) → run the action bounded by
the step's timeout → journal its end; retry up to ``retries`` times after
``retry_delay``; a failed ``required`` step ends the sequence as ``failed`` and
later steps never run. An operator's abort is honoured before the next step (or
during a retry delay), never in the middle of a step.

The same runner executes failovers (and switchovers), fences (the
``fence_steps`` run against an old primary that came back writable) and rejoins (the
``rejoin_steps`` and their verification, journaled and announced as ``rejoin_*``,
resumed after a restart like a failover). A fence is
journaled under its own record types and events (``fence_started``,
``fence_step_completed``, ``fence_failed`` …): it is never a failover in the
history, the metrics or the cooldown, and it is never resumed after a restart
(see ``watchdogd.daemon.sequences``).

A plan resumed after a crash skips the steps the journal shows as done. A step
that was started but never finished is run again only when it is idempotent
(per step ``idempotent:``, else the action's own default); otherwise it is
marked ``interrupted`` and, if required, the failover fails for a human to
check — guessing would risk doing it twice. A step whose attempt had failed and
whose retry delay was cut short by a shutdown (``pending_retry``) is simply
retried: the runner would have retried it anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from watchdogd.actions import Action, ActionError, StepContext
from watchdogd.core.model import StepConfig
from watchdogd.engines import EngineError
from watchdogd.policy import Plan
from watchdogd.state import journal
from watchdogd.state.journal import FailoverRecord, Outcome, RejoinRecord

Record = Callable[[dict[str, Any]], Awaitable[None]]
Emit = Callable[..., None]
# Seconds this watcher may still act (a fleet leader's authority), None: no limit.
Authority = Callable[[], float | None]

COMPLETED, FAILED, ABORTED = Outcome.COMPLETED, Outcome.FAILED, Outcome.ABORTED
INTERRUPTED = Outcome.INTERRUPTED
PENDING_RETRY = "pending_retry"

# Step outcomes a resumed sequence does not run again: done, or given their chance already
# (an optional step that failed; a non-idempotent step a restart interrupted).
_SETTLED = frozenset({"ok", "skipped", "failed", "interrupted"})


class _Stop(enum.Enum):
    ABORTED = "aborted"
    INTERRUPTED = "interrupted"
    NO_AUTHORITY = "no_authority"


class _AuthorityEnded(Exception):
    """The leader's authority ran out while a step ran: the step was cancelled."""


class Runner:
    def __init__(
        self,
        plan: Plan,
        ctx: StepContext,
        actions: Mapping[str, Action],
        record: Record,
        emit: Emit,
        *,
        resume: FailoverRecord | RejoinRecord | None = None,
        wall: Callable[[], float] = time.time,
        failover_id: str | None = None,
        started: Mapping[str, Any] | None = None,
        authority: Authority | None = None,
        authority_wait: float = 0.0,
        renew: Callable[[], None] | None = None,
    ) -> None:
        self.plan = plan
        self.ctx = ctx
        self.actions = actions
        self.record = record
        self.emit = emit
        self.resume = resume
        self.wall = wall
        # A fence (a rejoin) names the failover whose old primary it fences (rejoins).
        self.sequence = plan.kind if plan.kind in ("fence", "rejoin") else "failover"
        self.failover_id = failover_id
        # Extra facts of the start record and event (a rejoin's divergence report).
        self.started = dict(started or {})
        self.authority = authority
        # How long a step may wait for a renewal that leaves it enough authority.
        self.authority_wait = authority_wait
        # Asks for that renewal now rather than at its turn (a fleet leader's lease).
        self.renew = renew
        self.current_step: str | None = None
        self.current_step_started: float | None = None
        self._abort = asyncio.Event()
        self._abort_by: str = "operator"
        self._interrupt = False
        # Set by abort() and interrupt(): ends a retry delay at once.
        self._wake = asyncio.Event()
        self._begun = False

    @property
    def is_fence(self) -> bool:
        return self.sequence == "fence"

    def abort(self, by: str = "operator") -> None:
        self._abort_by = by
        self._abort.set()
        self._wake.set()

    def interrupt(self) -> None:
        """Stop after the current step (or at once, during a retry delay) without finishing
        a failover in the journal, so the next start resumes it (daemon shutdown)."""
        self._interrupt = True
        self._wake.set()

    # ------------------------------------------------------------------ naming

    def _event(self, name: str) -> str:
        """A failover's event name, or the fence's (rejoin's) twin of it (``step_failed``
        → ``fence_step_failed``, ``failover_started`` → ``rejoin_started``)."""
        if self.sequence == "failover":
            return name
        return f"{self.sequence}_" + name.removeprefix("failover_")

    def event_name(self, name: str) -> str:
        """``_event`` for the code that drives the runner (``failover_stopped``)."""
        return self._event(name)

    def _ids(self) -> dict[str, Any]:
        if self.sequence != "failover":
            return {f"{self.sequence}_id": self.plan.id, "failover_id": self.failover_id}
        return {"failover_id": self.plan.id}

    # ------------------------------------------------------------------ the sequence

    async def begin(self) -> None:
        """Journal the start (or announce the resume). Called by whoever launches the
        run, so a journal that cannot be written refuses the run to its caller instead
        of failing later in a background task."""
        if self._begun:
            return
        self._begun = True
        plan = self.plan
        if self.resume is None:
            await self.record(
                journal.sequence_started(
                    self.sequence,
                    id=plan.id,
                    trigger=plan.trigger,
                    kind=plan.kind,
                    reason=plan.reason,
                    from_node=plan.from_node,
                    to_node=plan.to_node,
                    steps=[s.name for s in plan.steps],
                    forced=plan.forced,
                    failover_id=self.failover_id,
                    at=self.wall(),
                    **self.started,
                )
            )
            self.emit(
                self._event("failover_started"),
                **self._ids(),
                trigger=plan.trigger,
                kind=plan.kind,
                reason=plan.reason,
                from_node=plan.from_node,
                to_node=plan.to_node,
                steps=[s.name for s in plan.steps],
                **self.started,
            )
        else:
            done = [s.name for s in self.resume.steps if s.outcome in ("ok", "skipped")]
            self.emit(
                self._event("failover_resumed"),
                **self._ids(),
                trigger=plan.trigger,
                steps_done=done,
            )

    async def run(self) -> str:
        await self.begin()
        for step in self.plan.steps:
            if self._interrupt:
                return await self._interrupted(f"the daemon stopped before step {step.name}", step)
            if self._abort.is_set():
                return await self._finish(
                    ABORTED, f"aborted by {self._abort_by} before step {step.name}"
                )
            prior = self.resume.step(step.name) if self.resume is not None else None
            if prior is not None and prior.outcome in _SETTLED:
                if step.required and prior.outcome in ("failed", "interrupted"):
                    # Its failure ended the sequence; only the closing record was lost
                    # (a crash or a full disk between the two writes). Never go on past
                    # it to the promotion the failure had refused.
                    why = f": {prior.error}" if prior.error else ""
                    return await self._finish(
                        FAILED, f"step {step.name} {prior.outcome} before the restart{why}"
                    )
                continue
            action = self.actions[step.name]
            attempts, budget = 0, step.retries + 1
            if prior is not None and prior.outcome == PENDING_RETRY:
                # Its last attempt failed and ended; the rest of its retries are owed.
                attempts = prior.attempts
                budget = max(1, step.retries + 1 - prior.attempts)
            elif prior is not None and prior.started_at is not None and prior.outcome is None:
                idempotent = step.idempotent if step.idempotent is not None else action.idempotent
                if not idempotent:
                    error = (
                        "interrupted by a restart while running and not idempotent: "
                        "check its effect by hand"
                    )
                    await self._step_finished(step, "interrupted", 0.0, error=error)
                    if step.required:
                        return await self._finish(FAILED, f"step {step.name}: {error}")
                    continue
                attempts = prior.attempts
            outcome = await self._run_step(step, action, attempts, budget)
            if outcome is _Stop.ABORTED:
                return await self._finish(
                    ABORTED, f"aborted by {self._abort_by} during retries of {step.name}"
                )
            if outcome is _Stop.NO_AUTHORITY:
                return self._no_authority(step)
            if outcome is _Stop.INTERRUPTED:
                return await self._interrupted(
                    f"the daemon stopped during the retry delay of step {step.name}", step
                )
            if outcome is not None and step.required:
                return await self._finish(FAILED, f"step {step.name} failed: {outcome}")
        return await self._finish(COMPLETED, None)

    async def _run_step(
        self, step: StepConfig, action: Action, attempts: int, budget: int
    ) -> str | _Stop | None:
        """Run one step with its retries; returns None on success, a _Stop when an abort
        or shutdown cut a retry delay short, else the error."""
        error = ""
        seconds = 0.0
        last = attempts + budget
        for attempt in range(attempts + 1, last + 1):
            if not await self._authority_for(step.timeout + 1.0):
                # It could not finish before the leader's authority ends: it does not
                # start; the failover stays unfinished for whoever leads next.
                return _Stop.NO_AUTHORITY
            self.current_step, self.current_step_started = step.name, self.wall()
            await self.record(
                journal.step_started(
                    self.sequence,
                    id=self.plan.id,
                    step=step.name,
                    action=step.action,
                    attempt=attempt,
                    at=self.wall(),
                )
            )
            self.emit(
                self._event("step_started"),
                **self._ids(),
                step=step.name,
                action=step.action,
                attempt=attempt,
            )
            t0 = time.monotonic()
            try:
                # The action bounds itself; this is the backstop for one that doesn't.
                detail = await self._bounded(action.run(self.ctx, step.timeout), step.timeout + 1.0)
            except _AuthorityEnded:
                return _Stop.NO_AUTHORITY
            except (ActionError, EngineError) as exc:
                error = self.ctx.config.mask(str(exc))
            except TimeoutError:
                error = f"no result within {step.timeout:g}s"
            except Exception as exc:  # a bug in an action must not kill the sequence
                error = self.ctx.config.mask(f"unexpected {type(exc).__name__}: {exc}")
            else:
                await self._step_finished(
                    step, "ok", time.monotonic() - t0, detail=self.ctx.config.mask(str(detail))
                )
                return None
            finally:
                self.current_step = None
            seconds = time.monotonic() - t0
            if attempt >= last:
                break
            self.emit(
                self._event("step_retry"),
                **self._ids(),
                step=step.name,
                attempt=attempt,
                error=error,
                seconds=round(seconds, 3),
                retry_in=step.retry_delay,
            )
            stop = await self._retry_delay(step.retry_delay)
            if stop is _Stop.ABORTED:
                await self._step_finished(step, "failed", seconds, error=error)
                return stop
            if stop is _Stop.INTERRUPTED:
                # A fence is never resumed, so its step is over; a failover's is owed
                # its remaining retries at the next start.
                outcome = "interrupted" if self.is_fence else PENDING_RETRY
                note = (
                    f"attempt {attempt} failed ({error}); the daemon stopped during the retry delay"
                )
                await self._step_finished(step, outcome, seconds, error=note)
                return stop
        await self._step_finished(step, "failed", seconds, error=error)
        return error

    async def _authority_for(self, need: float) -> bool:
        """Whether ``need`` seconds of authority are left, waiting up to
        ``authority_wait`` for a renewal that gives them."""
        loop = asyncio.get_running_loop()
        until = loop.time() + self.authority_wait
        asked = False
        while True:
            left = self._authority_left()
            if left is None or left >= need:
                return True
            if loop.time() >= until or (left <= 0 and self.authority_wait <= 0):
                return False
            if not asked and self.renew is not None:
                self.renew()
                asked = True
            await asyncio.sleep(0.05)

    def _authority_left(self) -> float | None:
        return None if self.authority is None else self.authority()

    async def _bounded(self, work: Awaitable[Any], timeout: float) -> Any:
        """``work`` bounded by ``timeout`` and, in a fleet, by the leader's authority,
        which renewals may extend while it runs: at its end the step is cancelled (a
        command step's process group is killed) and nothing more is journaled."""
        if self.authority is None:
            async with asyncio.timeout(timeout):
                return await work
        task = asyncio.ensure_future(work)
        loop = asyncio.get_running_loop()
        until = loop.time() + timeout
        try:
            while not task.done():
                left = self._authority_left()
                if left is not None and left <= 0:
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task
                    raise _AuthorityEnded
                wait = until - loop.time()
                if wait <= 0:
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task
                    raise TimeoutError
                await asyncio.wait(
                    {task}, timeout=min(wait, left if left is not None else wait, 0.1)
                )
            return task.result()
        finally:
            if not task.done():
                # Cancelled from outside (or cut off): the action ends before we do (a
                # command step's process group is killed), never left running.
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    def _no_authority(self, step: StepConfig) -> str:
        self.emit(
            self._event("failover_interrupted"),
            **self._ids(),
            next_step=step.name,
            note="the leader's authority ends before this step could finish: it stays "
            "unfinished for the next leader",
        )
        return INTERRUPTED

    async def _retry_delay(self, delay: float) -> _Stop | None:
        """Wait ``delay`` seconds, or less when an abort or a shutdown comes first."""
        try:
            async with asyncio.timeout(delay):
                await self._wake.wait()
        except TimeoutError:
            return None
        return _Stop.ABORTED if self._abort.is_set() else _Stop.INTERRUPTED

    async def _step_finished(
        self,
        step: StepConfig,
        outcome: str,
        seconds: float,
        *,
        error: str | None = None,
        detail: str | None = None,
    ) -> None:
        await self.record(
            journal.step_finished(
                self.sequence,
                id=self.plan.id,
                step=step.name,
                action=step.action,
                outcome=outcome,
                error=error,
                detail=detail,
                seconds=seconds,
                at=self.wall(),
            )
        )
        if outcome == "ok":
            event = "step_completed"
        elif outcome == PENDING_RETRY:
            event = "step_interrupted"
        else:
            event = "step_failed"
        self.emit(
            self._event(event),
            **self._ids(),
            step=step.name,
            action=step.action,
            outcome=outcome,
            seconds=round(seconds, 4),
            error=error,
            detail=detail,
            required=step.required,
        )

    async def _interrupted(self, why: str, step: StepConfig) -> str:
        if self.is_fence:
            # Nothing resumes a fence: close it, and let the split-brain check fence
            # again after the restart if both nodes still accept writes.
            return await self._finish(INTERRUPTED, why)
        self.emit(self._event("failover_interrupted"), **self._ids(), next_step=step.name, note=why)
        return INTERRUPTED

    async def _finish(self, outcome: str, error: str | None) -> str:
        await self.record(
            journal.sequence_finished(
                self.sequence, id=self.plan.id, outcome=outcome, error=error, at=self.wall()
            )
        )
        self.emit(
            self._event(f"failover_{outcome}"),
            **self._ids(),
            trigger=self.plan.trigger,
            outcome=outcome,
            error=error,
            from_node=self.plan.from_node,
            to_node=self.plan.to_node,
        )
        return outcome
