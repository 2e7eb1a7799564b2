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

Rejoins (the node failed away from brought back as the standby: ``watchdogctl rejoin``,
``auto_rejoin``) are journaled the same way too (``rejoin_started`` with the divergence
report and whether it was accepted, ``rejoin_step_started``, ``rejoin_step_finished``,
``rejoin_finished``) and folded into ``JournalState.rejoins``. A rejoin is resumed after
a restart like a failover; it changes the roles only through the ``ack`` record written
once it is verified. Journals written before rejoins existed replay as they did.

Records are frozen dataclasses (``SequenceStarted``, ``StepFinished``, ``Pause``, ...);
this module is the one place that encodes them (``encode``, used by the builder functions
callers write with) and decodes them (``decode``). ``apply`` decodes one record and
``fold``s it into a ``JournalState``; ``replay()`` does that for every line. It is pure, so
the same function serves the daemon at start-up, ``history`` and the tests.

Each line carries a CRC-32 of its own bytes (``"crc"``, the last key), so a line
damaged on disk is told apart from a record that merely looks odd; journals written
before checksums are read as they are, but once a line has one, every later line
must. A damaged *last* line is a crash mid-write: the record was never acted on, so
``load()`` cuts it away with a warning. A damaged line *before* the end is a hole in
the daemon's memory — it may have been the end of a failover (whose resumption would
promote twice) or a pause — so ``load()`` refuses to start, naming the line, and
``watchdogd journal check`` / ``repair`` show and fix it deliberately.

A write is complete and fsync'd or it did not happen: a short or failed write is cut
back to the previous length and raised as ``JournalWriteError``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import re
import shutil
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from watchdogd.core.errors import WatchdogdError

JOURNAL_NAME = "journal.jsonl"
# The checksum is the line's last key, so it covers every byte before it.
_CRC = re.compile(r',"crc":"([0-9a-f]{8})"\}$')
_TYPE = re.compile(r'"type"\s*:\s*"([a-z_]{1,40})"')
# At start the journal must take a record of about this size; 4 KiB is one block.
_WRITE_TEST_BYTES = 4096


# Record types per kind of step sequence: the runner writes and replay reads these names.
class Outcome(StrEnum):
    """How a failover (or a fence) ended. ``interrupted``: stopped for a daemon
    shutdown; the next start resumes a failover (a fence is closed, never resumed)."""

    COMPLETED = "completed"
    FAILED = "failed"
    ABORTED = "aborted"
    INTERRUPTED = "interrupted"


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
    "rejoin": SequenceTypes(
        "rejoin_started", "rejoin_step_started", "rejoin_step_finished", "rejoin_finished"
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
    outcome: str | None = None  # an Outcome; None while unfinished
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
    outcome: str | None = None  # an Outcome (a fence may end interrupted)
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
class RejoinRecord(FenceRecord):
    """One rejoin of the node failed away from (``from_node``) as a replica of the node
    failed over to (``to_node``), after failover ``failover_id``: journaled like a fence,
    plus who started it and the divergence report computed before anything was acted on
    (``Divergence.as_dict``). Unlike a fence it is resumed after a restart."""

    trigger: str = "manual"  # manual | automatic
    divergence: dict[str, Any] | None = None
    accepted: bool = False  # the operator accepted to throw diverged writes away

    def as_dict(self) -> dict[str, Any]:
        return {
            **super().as_dict(),
            "trigger": self.trigger,
            "divergence": self.divergence,
            "accepted_divergence": self.accepted,
        }


@dataclass(frozen=True)
class Damage:
    """A journal line that cannot be trusted."""

    line: int  # 1-based
    reason: str
    text: str  # the raw line, as read
    last: bool  # after the last newline: a torn tail from a crash mid-write

    def describe(self, path: str | os.PathLike[str] = JOURNAL_NAME) -> str:
        what = "torn last line (a crash while writing?)" if self.last else "damaged line"
        return f"{path} line {self.line}: {what}: {self.reason}"


@dataclass
class JournalState:
    primary: str | None = None  # current roles; None: as configured
    standby: str | None = None
    paused: bool = False
    pause_reason: str | None = None
    failovers: list[FailoverRecord] = field(default_factory=list)
    fences: list[FenceRecord] = field(default_factory=list)
    rejoins: list[RejoinRecord] = field(default_factory=list)
    last_automatic_at: float | None = None
    problems: list[str] = field(default_factory=list)  # torn or unreadable lines
    damaged: list[Damage] = field(default_factory=list)

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

    @property
    def last_rejoin(self) -> RejoinRecord | None:
        return self.rejoins[-1] if self.rejoins else None

    @property
    def unfinished_rejoin(self) -> RejoinRecord | None:
        last = self.last_rejoin
        return last if last is not None and last.unfinished else None


# ---------------------------------------------------------------------------- records
#
# One frozen dataclass per kind of record, and the one place that knows their on-disk
# form: ``encode`` (record -> the dict written, keys in the order they are written) and
# ``decode`` (dict read -> record, Damaged when a field replay needs is missing or of the
# wrong type). Fields replay does not need are read leniently (None when odd), as they
# always were: an odd ``by`` never made a journal unusable. The builder functions below
# (``sequence_started``, ``pause``, ...) are what callers write with.


@dataclass(frozen=True)
class SequenceStarted:
    """``failover_started`` / ``fence_started`` / ``rejoin_started``: a step sequence
    begins."""

    sequence: str  # a key of SEQUENCES: failover | fence | rejoin
    id: str
    trigger: str
    kind: str
    reason: str
    from_node: str
    to_node: str
    steps: tuple[str, ...]
    at: float
    forced: bool = False
    # fence, rejoin: the failover whose old primary is fenced / rejoins
    failover_id: str | None = None
    pending: bool = False  # written before the first step may run (cancellable)
    # rejoin: the divergence report it started with, and whether the operator accepted it
    divergence: Mapping[str, Any] | None = None
    accepted: bool = False


@dataclass(frozen=True)
class StepStarted:
    sequence: str
    id: str
    step: str
    action: str | None
    attempt: int | None
    at: float


@dataclass(frozen=True)
class StepFinished:
    sequence: str
    id: str
    step: str
    action: str | None
    outcome: str
    at: float
    error: str | None = None
    detail: str | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class SequenceFinished:
    sequence: str
    id: str
    outcome: str
    error: str | None
    at: float
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Pause:
    reason: str | None
    by: str | None
    at: float


@dataclass(frozen=True)
class Resume:
    by: str | None
    at: float


@dataclass(frozen=True)
class Ack:
    id: str
    primary: str
    standby: str
    at: float
    extra: Mapping[str, Any] = field(default_factory=dict)


Record = SequenceStarted | StepStarted | StepFinished | SequenceFinished | Pause | Resume | Ack

# Record type -> (sequence, what): "step_finished" -> ("failover", "step_finished").
_SEQUENCE_TYPES = {
    name: (sequence, what)
    for sequence, types in SEQUENCES.items()
    for what, name in (
        ("started", types.started),
        ("step_started", types.step_started),
        ("step_finished", types.step_finished),
        ("finished", types.finished),
    )
}
_FINISHED_KEYS = frozenset({"type", "id", "outcome", "error", "at"})
_ACK_KEYS = frozenset({"type", "id", "primary", "standby", "at"})


def encode(record: Record) -> dict[str, Any]:
    """A record as it is written (one line of JSON; ``encode_line`` adds the checksum)."""
    if isinstance(record, SequenceStarted):
        rec: dict[str, Any] = {
            "type": SEQUENCES[record.sequence].started,
            "id": record.id,
            "trigger": record.trigger,
            "kind": record.kind,
            "reason": record.reason,
            "from": record.from_node,
            "to": record.to_node,
            "steps": list(record.steps),
            "forced": record.forced,
            "at": record.at,
        }
        if record.failover_id is not None:
            rec["failover_id"] = record.failover_id
        if record.pending:
            rec["pending"] = True
        if record.sequence == "rejoin":
            rec["divergence"] = dict(record.divergence) if record.divergence is not None else None
            rec["accepted"] = record.accepted
        return rec
    if isinstance(record, StepStarted):
        return {
            "type": SEQUENCES[record.sequence].step_started,
            "id": record.id,
            "step": record.step,
            "action": record.action,
            "attempt": record.attempt,
            "at": record.at,
        }
    if isinstance(record, StepFinished):
        return {
            "type": SEQUENCES[record.sequence].step_finished,
            "id": record.id,
            "step": record.step,
            "action": record.action,
            "outcome": record.outcome,
            "error": record.error,
            "detail": record.detail,
            "seconds": round(record.seconds, 4),
            "at": record.at,
        }
    if isinstance(record, SequenceFinished):
        return {
            "type": SEQUENCES[record.sequence].finished,
            "id": record.id,
            "outcome": record.outcome,
            "error": record.error,
            "at": record.at,
            **record.extra,
        }
    if isinstance(record, Pause):
        return {"type": "pause", "reason": record.reason, "by": record.by, "at": record.at}
    if isinstance(record, Resume):
        return {"type": "resume", "by": record.by, "at": record.at}
    return {
        "type": "ack",
        "id": record.id,
        "primary": record.primary,
        "standby": record.standby,
        "at": record.at,
        **record.extra,
    }


# ---------------------------------------------------------------------------- writing


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
    divergence: Mapping[str, Any] | None = None,
    accepted: bool = False,
) -> dict[str, Any]:
    return encode(
        SequenceStarted(
            sequence,
            id=id,
            trigger=trigger,
            kind=kind,
            reason=reason,
            from_node=from_node,
            to_node=to_node,
            steps=tuple(steps),
            at=at,
            forced=forced,
            failover_id=failover_id,
            pending=pending,
            divergence=divergence,
            accepted=accepted,
        )
    )


def step_started(
    sequence: str, *, id: str, step: str, action: str, attempt: int, at: float
) -> dict[str, Any]:
    return encode(StepStarted(sequence, id=id, step=step, action=action, attempt=attempt, at=at))


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
    return encode(
        StepFinished(
            sequence,
            id=id,
            step=step,
            action=action,
            outcome=outcome,
            at=at,
            error=error,
            detail=detail,
            seconds=seconds,
        )
    )


def sequence_finished(
    sequence: str, *, id: str, outcome: str, error: str | None, at: float, **extra: Any
) -> dict[str, Any]:
    return encode(
        SequenceFinished(sequence, id=id, outcome=outcome, error=error, at=at, extra=extra)
    )


def pause(*, reason: str, by: str, at: float) -> dict[str, Any]:
    return encode(Pause(reason=reason, by=by, at=at))


def resume(*, by: str, at: float) -> dict[str, Any]:
    return encode(Resume(by=by, at=at))


def ack(*, id: str, primary: str, standby: str, at: float, **extra: Any) -> dict[str, Any]:
    return encode(Ack(id=id, primary=primary, standby=standby, at=at, extra=extra))


# ---------------------------------------------------------------------------- reading


class Damaged(ValueError):
    """A line or a record that cannot be trusted (raised inside replay, never out of it)."""


def _field(
    rec: Mapping[str, Any], key: str, kind: type | tuple[type, ...], default: Any = ...
) -> Any:
    if key not in rec:
        if default is ...:
            raise Damaged(f"{rec.get('type')}: missing {key!r}")
        return default
    value = rec[key]
    if default is None and value is None:
        return None
    # bool is an int to Python, never to us.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise Damaged(f"{rec.get('type')}: {key!r} has the wrong type")
    if not isinstance(value, kind):
        raise Damaged(f"{rec.get('type')}: {key!r} has the wrong type")
    return value


def _lenient(rec: Mapping[str, Any], key: str, kind: type) -> Any:
    """A field replay does not need: its value when of the right type, else None."""
    value = rec.get(key)
    return value if isinstance(value, kind) and not isinstance(value, bool) else None


def _at(rec: Mapping[str, Any]) -> float:
    at = float(_field(rec, "at", (int, float), 0.0))
    if not math.isfinite(at):
        raise Damaged(f"{rec.get('type')}: 'at' is not a finite time")
    return at


def _names(rec: Mapping[str, Any]) -> tuple[str, ...]:
    steps = _field(rec, "steps", list, [])
    if not all(isinstance(x, str) for x in steps):
        raise Damaged(f"{rec.get('type')}: 'steps' must be a list of names")
    return tuple(steps)


def _type(rec: Mapping[str, Any]) -> str:
    kind = rec.get("type")
    if not isinstance(kind, str):
        raise Damaged("no record type")
    return kind


def decode(rec: Mapping[str, Any]) -> Record | None:
    """The record a dict read from the journal holds; None for a type this version does
    not know (forward compatible). Damaged when a field replay needs is missing or of the
    wrong type; fields are checked in a fixed order, so the first problem is named."""
    kind = _type(rec)
    at = _at(rec)
    if kind == "pause":
        return Pause(reason=_field(rec, "reason", str, None), by=_lenient(rec, "by", str), at=at)
    if kind == "resume":
        return Resume(by=_lenient(rec, "by", str), at=at)
    if kind == "ack":
        return Ack(
            id=_field(rec, "id", str),
            primary=_field(rec, "primary", str),
            standby=_field(rec, "standby", str),
            at=at,
            extra={k: v for k, v in rec.items() if k not in _ACK_KEYS},
        )
    if kind not in _SEQUENCE_TYPES:
        return None
    sequence, what = _SEQUENCE_TYPES[kind]
    if what == "started" and sequence == "failover":
        started = SequenceStarted(
            sequence,
            id=_field(rec, "id", str),
            trigger=_field(rec, "trigger", str),
            reason=_field(rec, "reason", str, ""),
            from_node=_field(rec, "from", str),
            to_node=_field(rec, "to", str),
            at=at,
            steps=_names(rec),
            kind=_field(rec, "kind", str, "failover"),
            forced=_field(rec, "forced", bool, False),
        )
        return replace(started, pending=_field(rec, "pending", bool, False))
    if what == "started":
        return SequenceStarted(
            sequence,
            id=_field(rec, "id", str),
            failover_id=_field(rec, "failover_id", str, None),
            reason=_field(rec, "reason", str, ""),
            from_node=_field(rec, "from", str),
            to_node=_field(rec, "to", str),
            at=at,
            steps=_names(rec),
            trigger=_lenient(rec, "trigger", str) or "",
            kind=_lenient(rec, "kind", str) or sequence,
            divergence=_lenient(rec, "divergence", dict),
            accepted=rec.get("accepted") is True,
        )
    if what == "finished":
        return SequenceFinished(
            sequence,
            id=_field(rec, "id", str),
            outcome=_field(rec, "outcome", str),
            error=_field(rec, "error", str, None),
            at=at,
            extra={k: v for k, v in rec.items() if k not in _FINISHED_KEYS},
        )
    if what == "step_started":
        return StepStarted(
            sequence,
            id=_field(rec, "id", str),
            step=_field(rec, "step", str),
            action=_field(rec, "action", str, None),
            attempt=_field(rec, "attempt", int, None),
            at=at,
        )
    seconds = rec.get("seconds")
    return StepFinished(
        sequence,
        id=_field(rec, "id", str),
        step=_field(rec, "step", str),
        action=_field(rec, "action", str, None),
        outcome=_field(rec, "outcome", str),
        error=_field(rec, "error", str, None),
        detail=_field(rec, "detail", str, None),
        at=at,
        seconds=float(seconds) if isinstance(seconds, int | float) else 0.0,
    )


def apply(state: JournalState, rec: Mapping[str, Any]) -> None:
    """Fold one record into the state (unknown record types are ignored: forward
    compatible). A known record with a missing field or a field of the wrong type
    raises Damaged before it changes anything. A record for a sequence the journal
    never started is noted in ``problems`` and ignored, whatever its other fields."""
    kind = _type(rec)
    _at(rec)
    if kind == "ack" or _SEQUENCE_TYPES.get(kind, ("", "started"))[1] != "started":
        # Its sequence first: one the journal never started makes the record moot.
        fid = _field(rec, "id", str)
        sequence = "failover" if kind == "ack" else _SEQUENCE_TYPES[kind][0]
        if _sequence(state, sequence, fid) is None:
            state.problems.append(f"record for unknown {sequence} {fid!r} ignored")
            return
    record = decode(rec)
    if record is not None:
        fold(state, record)


def _sequence(
    state: JournalState, sequence: str, id: str
) -> FailoverRecord | FenceRecord | RejoinRecord | None:
    if sequence == "fence":
        return next((f for f in reversed(state.fences) if f.id == id), None)
    if sequence == "rejoin":
        return next((r for r in reversed(state.rejoins) if r.id == id), None)
    return next((f for f in reversed(state.failovers) if f.id == id), None)


def fold(state: JournalState, record: Record) -> None:
    """Fold one decoded record into the state."""
    if isinstance(record, Pause):
        state.paused, state.pause_reason = True, record.reason
    elif isinstance(record, Resume):
        state.paused, state.pause_reason = False, None
    elif isinstance(record, SequenceStarted) and record.sequence == "failover":
        state.failovers.append(
            FailoverRecord(
                id=record.id,
                trigger=record.trigger,
                reason=record.reason,
                from_node=record.from_node,
                to_node=record.to_node,
                started_at=record.at,
                plan=list(record.steps),
                kind=record.kind,
                forced=record.forced,
            )
        )
        # A pending failover cancelled before any step ran does not start the cooldown.
        if record.trigger == "automatic" and not record.pending:
            state.last_automatic_at = record.at
    elif isinstance(record, SequenceStarted):
        run: dict[str, Any] = {
            "id": record.id,
            "failover_id": record.failover_id,
            "reason": record.reason,
            "from_node": record.from_node,
            "to_node": record.to_node,
            "started_at": record.at,
            "plan": list(record.steps),
        }
        if record.sequence == "rejoin":
            divergence = dict(record.divergence) if record.divergence is not None else None
            state.rejoins.append(
                RejoinRecord(
                    **run, trigger=record.trigger, divergence=divergence, accepted=record.accepted
                )
            )
        else:
            state.fences.append(FenceRecord(**run))
    elif isinstance(record, Ack):
        fo = _sequence(state, "failover", record.id)
        if isinstance(fo, FailoverRecord):
            fo.acked_at = record.at
            state.primary, state.standby = record.primary, record.standby
    else:
        seq = _sequence(state, record.sequence, record.id)
        if seq is None:
            return
        if isinstance(record, SequenceFinished):
            seq.finished_at, seq.outcome, seq.error = record.at, record.outcome, record.error
        elif isinstance(record, StepStarted):
            step = seq.step(record.step)
            step.action = record.action or step.action
            step.started_at = record.at if step.started_at is None else step.started_at
            step.attempts = record.attempt if record.attempt is not None else step.attempts + 1
            step.outcome, step.finished_at = None, None
        else:
            step = seq.step(record.step)
            step.action = record.action or step.action
            step.finished_at, step.outcome = record.at, record.outcome
            step.error, step.detail = record.error, record.detail


def decode_line(line: str, *, checksummed: bool = False) -> dict[str, Any]:
    """One journal line → its record; Damaged when it cannot be trusted. ``checksummed``:
    an earlier line had a checksum, so this one must too."""
    match = _CRC.search(line)
    if match is not None:
        body = line[: match.start()] + "}"
        crc = zlib.crc32(body.encode("utf-8", "surrogateescape"))
        if f"{crc:08x}" != match.group(1):
            raise Damaged("checksum mismatch")
    elif checksummed:
        raise Damaged("no checksum, after lines that have one")
    try:
        rec = json.loads(line)
    except RecursionError:
        raise Damaged("nested too deeply") from None
    except ValueError as exc:
        raise Damaged(f"not JSON: {exc}") from None
    if not isinstance(rec, dict):
        raise Damaged("not an object")
    rec.pop("crc", None)
    return rec


def encode_line(record: dict[str, Any]) -> bytes:
    """One record → its checksummed line, newline included."""
    if "crc" in record:
        raise ValueError("'crc' is the journal's own key")
    body = json.dumps(record, separators=(",", ":"), default=str, allow_nan=False)
    crc = zlib.crc32(body.encode("utf-8", "surrogateescape"))
    return (body[:-1] + f',"crc":"{crc:08x}"}}\n').encode("utf-8", "surrogateescape")


def replay(lines: list[str]) -> JournalState:
    """Fold lines into a state. Never raises: damaged lines are listed in
    ``state.damaged`` (and ``problems``) for the caller to judge."""
    state = JournalState()
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    # Only bytes after the last newline can be a torn write: every record ends with its
    # newline in the same write, so a damaged line that has one was damaged later.
    torn = len(lines)
    checksummed = False
    for number, line in numbered:
        try:
            rec = decode_line(line, checksummed=checksummed)
            checksummed = checksummed or _CRC.search(line) is not None
            apply(state, rec)
        except (Damaged, ValueError, KeyError, TypeError, OverflowError) as exc:
            damage = Damage(number, str(exc), line, number == torn)
            state.damaged.append(damage)
            state.problems.append(damage.describe("journal"))
    return state


def guess_type(text: str) -> str | None:
    """The record type a damaged line seems to have had, if that part is legible."""
    match = _TYPE.search(text)
    return match.group(1) if match else None


class JournalError(WatchdogdError):
    """The journal cannot be used; the message is one line for an operator."""


class JournalLocked(JournalError):
    """Another live daemon holds this state_dir."""


class JournalWriteError(JournalError):
    """A record could not be written durably (and was cut back, so nothing half-written
    stays behind)."""


class JournalDamaged(JournalError):
    """A line before the end of the journal cannot be trusted."""


def _nofollow(path: Path, flags: int, mode: int = 0o640) -> int:
    # O_NOFOLLOW: a symlink planted in state_dir must not redirect our writes.
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)


def _fsync_dir(path: Path) -> None:
    dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:  # pragma: no cover - POSIX reports an error instead
            raise OSError(errno.EIO, "write wrote nothing")
        view = view[written:]


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
        fd = _nofollow(self.dir / "lock", os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise JournalLocked(f"another watchdogd is running with state_dir {self.dir}") from None
        self._lock_fd = fd

    def read(self) -> tuple[bytes, JournalState]:
        """The journal's bytes and their replay, changing nothing (``journal check``)."""
        if not self.path.exists():
            return b"", JournalState()
        try:
            fd = _nofollow(self.path, os.O_RDONLY)
            with os.fdopen(fd, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise JournalError(
                f"journal {self.path} cannot be read ({exc.strerror or exc})"
            ) from None
        return data, replay(data.decode("utf-8", "surrogateescape").split("\n"))

    def load(self) -> JournalState:
        """Replay the journal for a start: a torn last line is cut away (with a problem
        noted), a damaged line before it raises JournalDamaged."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        data, state = self.read()
        inner = [d for d in state.damaged if not d.last]
        if inner:
            first = inner[0]
            more = f" (and {len(inner) - 1} more)" if len(inner) > 1 else ""
            raise JournalDamaged(
                f"journal {self.path} line {first.line} is damaged ({first.reason}){more}; "
                "refusing to guess what it recorded: see `watchdogd journal check --config "
                "FILE`, then `watchdogd journal repair --config FILE`"
            )
        torn = [d for d in state.damaged if d.last]
        if torn:
            # Never acted on (acting follows the fsync'd write): cut it away so the
            # next record starts clean and the torn bytes never sit mid-journal.
            keep = _line_offset(data, torn[0].line)
            self._truncate(keep)
            state.problems[-1] += f"; removed ({len(data) - keep} bytes)"
        elif data and not data.endswith(b"\n"):
            # Complete and valid, only its newline missing: seal it.
            self._write(b"\n")
        return state

    def open(self) -> None:
        """Open the journal for appending and prove the disk takes a record now, so an
        unwritable journal refuses the start instead of the first failover."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        try:
            self._open()
            probe = self.dir / f".write-test-{os.getpid()}"
            fd = _nofollow(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            try:
                _write_all(fd, b"\0" * _WRITE_TEST_BYTES)
                os.fsync(fd)
            finally:
                os.close(fd)
                with contextlib.suppress(OSError):
                    probe.unlink()
        except OSError as exc:
            raise JournalWriteError(
                f"journal {self.path} is not writable ({exc.strerror or exc}); watchdogd "
                "records every failover step there before acting on it"
            ) from None

    def append(self, record: dict[str, Any]) -> None:
        """Write one record and fsync it; JournalWriteError when the disk refuses."""
        try:
            line = encode_line(record)
        except ValueError as exc:  # a NaN or a 'crc' key: a bug, but never a torn line
            raise JournalWriteError(f"journal record cannot be encoded: {exc}") from None
        self._write(line)

    def _open(self) -> int:
        if self._fd is None:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o750)
            existed = self.path.exists()
            self._fd = _nofollow(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            if not existed:
                # A new file is only durable once its directory entry is.
                _fsync_dir(self.dir)
        return self._fd

    def _write(self, data: bytes) -> None:
        try:
            fd = self._open()
            before = os.fstat(fd).st_size
        except OSError as exc:
            raise JournalWriteError(
                f"journal {self.path}: cannot open for writing ({exc.strerror or exc})"
            ) from None
        try:
            _write_all(fd, data)
            os.fsync(fd)
        except OSError as exc:
            # Half a record glued to the next one would cost both at replay.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, before)
                os.fsync(fd)
            raise JournalWriteError(
                f"journal {self.path}: a record could not be written ({exc.strerror or exc}); "
                "nothing of it was kept"
            ) from None

    def _truncate(self, length: int) -> None:
        fd = _nofollow(self.path, os.O_WRONLY)
        try:
            os.ftruncate(fd, length)
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        for fd in (self._fd, self._lock_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._lock_fd = None


def _line_offset(data: bytes, line: int) -> int:
    """Byte offset where 1-based ``line`` starts."""
    offset = 0
    for _ in range(line - 1):
        offset = data.index(b"\n", offset) + 1
    return offset


# ---------------------------------------------------------------------------- repair


@dataclass
class Repair:
    """What ``repair`` would do, or refuses to do, to a damaged journal."""

    dropped: list[Damage]
    appended: list[dict[str, Any]]
    refusals: list[str]
    notes: list[str]
    content: bytes  # the repaired journal


def plan_repair(data: bytes, *, close_unfinished: bool, at: float) -> Repair:
    """Drop the damaged lines, unless dropping one could make watchdogd resume a failover
    that had in fact ended (a second promotion): then refuse, or with
    ``close_unfinished`` close that failover as failed for a human to check and ack."""
    lines = data.decode("utf-8", "surrogateescape").split("\n")
    state = replay(lines)
    dropped = state.damaged
    numbers = {d.line for d in dropped}
    kept = [line for n, line in enumerate(lines, 1) if n not in numbers and line.strip()]
    repaired = replay(kept)
    refusals: list[str] = []
    notes: list[str] = []
    appended: list[dict[str, Any]] = []
    # Where each failover starts, in the original numbering.
    started_at_line = {}
    for n, line in enumerate(lines, 1):
        if n in numbers or not line.strip():
            continue
        with contextlib.suppress(Damaged, ValueError):
            rec = decode_line(line)
            if rec.get("type") == "failover_started" and isinstance(rec.get("id"), str):
                started_at_line[rec["id"]] = n
    # Failovers the kept lines refer to but no kept line starts.
    referred: set[str] = set()
    for line in kept:
        with contextlib.suppress(Damaged, ValueError):
            rec = decode_line(line)
            if rec.get("type") in ("step_started", "step_finished", "failover_finished", "ack"):
                referred.add(str(rec.get("id")))
    orphans = sorted(referred - {f.id for f in repaired.failovers})
    if orphans and dropped:
        where = ", ".join(str(d.line) for d in dropped)
        refusals.append(
            f"later lines refer to failover(s) {', '.join(orphans)} whose start may be on "
            f"damaged line(s) {where}: without it watchdogd would forget that failover "
            "(and whether it promoted); restore that line by hand from the copy"
        )
    fo = repaired.unfinished
    if fo is not None:
        later = [d.line for d in dropped if d.line > started_at_line.get(fo.id, 0)]
        if later:
            where = ", ".join(str(n) for n in later)
            if close_unfinished:
                appended.append(
                    sequence_finished(
                        "failover",
                        id=fo.id,
                        outcome="failed",
                        error=(
                            f"closed by `watchdogd journal repair`: damaged line(s) {where} "
                            "may have recorded its end; check the cluster by hand, then ack"
                        ),
                        at=at,
                    )
                )
            else:
                refusals.append(
                    f"without line(s) {where}, failover {fo.id} looks unfinished and the next "
                    "start would resume it (promote again if it had promoted); rerun with "
                    "--close-unfinished to close it as failed for a human to check and ack"
                )
    for d in dropped:
        kind = guess_type(d.text)
        if kind in (None, "pause"):
            notes.append(
                f"line {d.line} may have been a pause: automatic failover is "
                f"{'paused' if repaired.paused else 'armed'} after the repair; "
                "`watchdogctl pause` again if it should be paused"
            )
    body = "".join(line + "\n" for line in kept).encode("utf-8", "surrogateescape")
    body += b"".join(encode_line(rec) for rec in appended)
    return Repair(dropped, appended, refusals, notes, body)


def write_repair(journal_path: Path, content: bytes, *, stamp: float | None = None) -> Path:
    """Keep a copy of the journal, then replace it atomically with ``content``."""
    when = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(stamp))
    backup = journal_path.with_name(f"{journal_path.name}.{when}.damaged")
    shutil.copy2(journal_path, backup, follow_symlinks=False)
    tmp = journal_path.with_name(f".{journal_path.name}.repair")
    fd = _nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        _write_all(fd, content)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, journal_path)
    _fsync_dir(journal_path.parent)
    return backup
