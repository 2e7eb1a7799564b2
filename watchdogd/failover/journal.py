"""The failover journal: an append-only, fsync'd JSON-lines file in ``state_dir``.

Every transition of a failover (intent before a step, outcome after it), every
pause/resume and every ack is appended and flushed to disk *before* it is acted
on, so a daemon killed at any point restarts knowing exactly where it was:
whether a failover is unfinished (and which step to resume), whether one awaits
an operator's ack, which node is the primary now, whether automatic failover is
paused, and when the last automatic failover started (cooldown across restarts).

Fences (the ``fence_steps`` run when an old primary comes back writable) are journaled
the same way under their own record types (``fence_started``, ``fence_step_started``,
``fence_step_finished``, ``fence_finished``) and folded into ``JournalState.fences``, never
into ``failovers``: a fence is not a failover (no history entry, no cooldown, never a
promotion) and is never resumed after a restart.

This module is the one place that encodes records (the functions below the state
classes) and decodes them (``apply``). ``replay()`` folds the records into a
``JournalState``; it is pure, so the same function serves the daemon at start-up,
``history`` and the tests. A torn last line (a crash mid-write) is tolerated and
reported, never fatal.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

JOURNAL_NAME = "journal.jsonl"


# Record types per kind of step sequence: the runner writes and replay reads these names.
@dataclass(frozen=True)
class SequenceTypes:
    started: str
    step_started: str
    step_finished: str
    finished: str


SEQUENCES = {
    "failover": SequenceTypes(
        "failover_started", "step_started", "step_finished", "failover_finished"
    ),
    "fence": SequenceTypes(
        "fence_started", "fence_step_started", "fence_step_finished", "fence_finished"
    ),
}


@dataclass
class StepRecord:
    name: str
    action: str = ""
    started_at: float | None = None
    finished_at: float | None = None
    # ok | failed | skipped | interrupted (final) | pending_retry (an attempt failed and
    # the daemon stopped during the retry delay: the next start retries it)
    outcome: str | None = None
    attempts: int = 0
    error: str | None = None
    detail: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "action": self.action,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "outcome": self.outcome,
            "attempts": self.attempts,
            "error": self.error,
            "detail": self.detail,
        }


class _Steps:
    steps: list[StepRecord]

    def step(self, name: str) -> StepRecord:
        for s in self.steps:
            if s.name == name:
                return s
        record = StepRecord(name=name)
        self.steps.append(record)
        return record


@dataclass
class FailoverRecord(_Steps):
    id: str
    trigger: str  # automatic | manual | switchover
    reason: str
    from_node: str
    to_node: str
    started_at: float
    steps: list[StepRecord] = field(default_factory=list)
    finished_at: float | None = None
    outcome: str | None = None  # completed | failed | aborted; None while unfinished
    error: str | None = None
    acked_at: float | None = None
    # Step names in plan order, so a resumed run knows what is left.
    plan: list[str] = field(default_factory=list)
    kind: str = "failover"  # failover | switchover: rebuilds the same plan on resume
    forced: bool = False

    @property
    def unfinished(self) -> bool:
        return self.outcome is None

    @property
    def promoted(self) -> bool:
        """Whether a promote step succeeded: the standby then accepts writes."""
        return any(s.action == "promote" and s.outcome == "ok" for s in self.steps)

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "trigger": self.trigger,
            "reason": self.reason,
            "from": self.from_node,
            "to": self.to_node,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "outcome": self.outcome,
            "error": self.error,
            "acked_at": self.acked_at,
            "forced": self.forced,
            "kind": self.kind,
            "steps": [s.as_dict() for s in self.steps],
        }


@dataclass
class FenceRecord(_Steps):
    """One run of the fence steps against an old primary that came back writable."""

    id: str
    failover_id: str | None  # the failover whose old primary is fenced
    reason: str
    from_node: str  # the old primary, the node being fenced
    to_node: str
    started_at: float
    steps: list[StepRecord] = field(default_factory=list)
    plan: list[str] = field(default_factory=list)
    finished_at: float | None = None
    outcome: str | None = None  # completed | failed | aborted | interrupted
    error: str | None = None

    @property
    def unfinished(self) -> bool:
        return self.outcome is None

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "failover_id": self.failover_id,
            "reason": self.reason,
            "from": self.from_node,
            "to": self.to_node,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "outcome": self.outcome,
            "error": self.error,
            "steps": [s.as_dict() for s in self.steps],
        }


@dataclass
class JournalState:
    primary: str | None = None  # current roles; None: as configured
    standby: str | None = None
    paused: bool = False
    pause_reason: str | None = None
    failovers: list[FailoverRecord] = field(default_factory=list)
    fences: list[FenceRecord] = field(default_factory=list)
    last_automatic_at: float | None = None
    problems: list[str] = field(default_factory=list)  # torn or unreadable lines

    @property
    def last(self) -> FailoverRecord | None:
        return self.failovers[-1] if self.failovers else None

    @property
    def awaiting_ack(self) -> FailoverRecord | None:
        last = self.last
        if last is not None and last.outcome is not None and last.acked_at is None:
            return last
        return None

    @property
    def unfinished(self) -> FailoverRecord | None:
        last = self.last
        return last if last is not None and last.unfinished else None

    @property
    def unfinished_fence(self) -> FenceRecord | None:
        last = self.fences[-1] if self.fences else None
        return last if last is not None and last.unfinished else None


# ---------------------------------------------------------------------------- encoding


def sequence_started(
    sequence: str,
    *,
    id: str,
    trigger: str,
    kind: str,
    reason: str,
    from_node: str,
    to_node: str,
    steps: list[str],
    at: float,
    forced: bool = False,
    failover_id: str | None = None,
    pending: bool = False,
) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "type": SEQUENCES[sequence].started,
        "id": id,
        "trigger": trigger,
        "kind": kind,
        "reason": reason,
        "from": from_node,
        "to": to_node,
        "steps": steps,
        "forced": forced,
        "at": at,
    }
    if failover_id is not None:
        rec["failover_id"] = failover_id
    if pending:
        rec["pending"] = True
    return rec


def step_started(
    sequence: str, *, id: str, step: str, action: str, attempt: int, at: float
) -> dict[str, Any]:
    return {
        "type": SEQUENCES[sequence].step_started,
        "id": id,
        "step": step,
        "action": action,
        "attempt": attempt,
        "at": at,
    }


def step_finished(
    sequence: str,
    *,
    id: str,
    step: str,
    action: str,
    outcome: str,
    at: float,
    error: str | None = None,
    detail: str | None = None,
    seconds: float = 0.0,
) -> dict[str, Any]:
    return {
        "type": SEQUENCES[sequence].step_finished,
        "id": id,
        "step": step,
        "action": action,
        "outcome": outcome,
        "error": error,
        "detail": detail,
        "seconds": round(seconds, 4),
        "at": at,
    }


def sequence_finished(
    sequence: str, *, id: str, outcome: str, error: str | None, at: float, **extra: Any
) -> dict[str, Any]:
    return {
        "type": SEQUENCES[sequence].finished,
        "id": id,
        "outcome": outcome,
        "error": error,
        "at": at,
        **extra,
    }


def pause(*, reason: str, by: str, at: float) -> dict[str, Any]:
    return {"type": "pause", "reason": reason, "by": by, "at": at}


def resume(*, by: str, at: float) -> dict[str, Any]:
    return {"type": "resume", "by": by, "at": at}


def ack(*, id: str, primary: str, standby: str, at: float, **extra: Any) -> dict[str, Any]:
    return {"type": "ack", "id": id, "primary": primary, "standby": standby, "at": at, **extra}


# ---------------------------------------------------------------------------- decoding


def apply(state: JournalState, rec: dict[str, Any]) -> None:
    """Fold one record into the state (unknown record types are ignored: forward compatible)."""
    kind = rec.get("type")
    at = float(rec.get("at", 0.0))
    if kind == "pause":
        state.paused, state.pause_reason = True, rec.get("reason")
    elif kind == "resume":
        state.paused, state.pause_reason = False, None
    elif kind == "failover_started":
        fo = FailoverRecord(
            id=rec["id"],
            trigger=rec["trigger"],
            reason=rec.get("reason", ""),
            from_node=rec["from"],
            to_node=rec["to"],
            started_at=at,
            plan=list(rec.get("steps", [])),
            kind=rec.get("kind", "failover"),
            forced=bool(rec.get("forced", False)),
        )
        state.failovers.append(fo)
        # A pending failover cancelled before any step ran does not start the cooldown.
        if fo.trigger == "automatic" and not rec.get("pending"):
            state.last_automatic_at = at
    elif kind == "fence_started":
        state.fences.append(
            FenceRecord(
                id=rec["id"],
                failover_id=rec.get("failover_id"),
                reason=rec.get("reason", ""),
                from_node=rec["from"],
                to_node=rec["to"],
                started_at=at,
                plan=list(rec.get("steps", [])),
            )
        )
    elif kind in ("fence_step_started", "fence_step_finished", "fence_finished"):
        fence = next((f for f in reversed(state.fences) if f.id == rec.get("id")), None)
        if fence is None:
            state.problems.append(f"record for unknown fence {rec.get('id')!r} ignored")
            return
        if kind == "fence_finished":
            fence.finished_at, fence.outcome, fence.error = at, rec["outcome"], rec.get("error")
        else:
            _apply_step(fence, kind.removeprefix("fence_"), rec, at)
    elif kind in ("step_started", "step_finished", "failover_finished", "ack"):
        found = next((f for f in reversed(state.failovers) if f.id == rec.get("id")), None)
        if found is None:
            state.problems.append(f"record for unknown failover {rec.get('id')!r} ignored")
            return
        fo = found
        if kind in ("step_started", "step_finished"):
            _apply_step(fo, kind, rec, at)
        elif kind == "failover_finished":
            fo.finished_at, fo.outcome, fo.error = at, rec["outcome"], rec.get("error")
        else:  # ack
            fo.acked_at = at
            state.primary, state.standby = rec["primary"], rec["standby"]


def _apply_step(seq: _Steps, kind: str, rec: dict[str, Any], at: float) -> None:
    step = seq.step(rec["step"])
    step.action = rec.get("action", step.action)
    if kind == "step_started":
        step.started_at = at if step.started_at is None else step.started_at
        step.attempts = int(rec.get("attempt", step.attempts + 1))
        step.outcome, step.finished_at = None, None
    else:
        step.finished_at, step.outcome = at, rec["outcome"]
        step.error, step.detail = rec.get("error"), rec.get("detail")


def replay(lines: list[str]) -> JournalState:
    state = JournalState()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not an object")
            apply(state, rec)
        except (ValueError, KeyError, TypeError) as exc:
            last = number == len(lines)
            what = "torn last line (crash while writing?)" if last else "unreadable line"
            state.problems.append(f"journal line {number}: {what}: {exc}")
    return state


class JournalLocked(Exception):
    """Another live daemon holds this state_dir."""


class Journal:
    """Appends records durably. One writer: the daemon that holds the state_dir's lock."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(state_dir)
        self.path = self.dir / JOURNAL_NAME
        self._fd: int | None = None
        self._lock_fd: int | None = None

    def lock(self) -> None:
        """Take the state_dir's lock (released by the kernel if we die): two daemons
        appending to one journal could both fail over."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise JournalLocked(f"another watchdogd is running with state_dir {self.dir}") from None
        self._lock_fd = fd

    def load(self) -> JournalState:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        if not self.path.exists():
            return JournalState()
        data = self.path.read_bytes()
        text = data.decode("utf-8", errors="replace")
        state = replay(text.split("\n"))
        if data and not data.endswith(b"\n"):
            # Terminate the torn line so the next record starts clean.
            self._write(b"\n")
        return state

    def append(self, record: dict[str, Any]) -> None:
        """Write one record and fsync it; raises OSError when the disk refuses."""
        line = json.dumps(record, separators=(",", ":"), default=str) + "\n"
        self._write(line.encode())

    def _write(self, data: bytes) -> None:
        if self._fd is None:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o750)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            # A new file is only durable once its directory entry is.
            dir_fd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        os.write(self._fd, data)
        os.fsync(self._fd)

    def close(self) -> None:
        for fd in (self._fd, self._lock_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._lock_fd = None
