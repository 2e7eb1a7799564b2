"""The detector: observations in, a verdict on the primary out. Pure: no I/O, no clock.

It answers one question per probe cycle: is the primary *really* down, and for
how long? The rules, each guarding against a known false failover:

- **Continuous outage.** A probe kind (database, app) must fail for
  ``outage_threshold`` without interruption. After failures start, the primary
  counts as recovered only after ``recovery_successes`` consecutive good cycles,
  so one lucky probe does not reset the outage timer (hysteresis); but a primary
  that answers in *this* cycle is never declared down.
- **Independent agreement.** The watcher's own failing probes are necessary,
  not sufficient: the standby must also have lost the primary. That view is
  judged by the replica's own rules, never by ours: the link is lost when the
  replica has dropped it (a crash closes it at once), or when it has been silent
  for longer than the replica's own link timeout (read from the server). A
  healthy link on an idle primary is silent for long stretches on stock
  settings (PostgreSQL: up to half of ``wal_receiver_timeout``, 30 s), so
  silence within that timeout is normal, whatever the outage threshold. When
  the standby still holds its link, the verdict is ``suspect`` with a partition
  reason, however long it lasts. With witnesses, a strict majority of all
  vantage points (own probes, the standby, every witness; an unreachable
  witness abstains and so counts as not seeing it down) must see the primary
  down.
- **App trigger.** The primary application failing while its database answers
  is a ``down`` with trigger ``app``: the database is reachable, so the policy
  plans a zero-data-loss switchover rather than a blind promotion. Reaching the
  database is itself the proof that the watcher is not cut off from the primary.
- **Outage start.** A continuous failure is timed from the cycle that first saw
  it, or, when a closed connection to the primary's database woke that cycle,
  from the moment the closure was noticed (``Cycle.primary_lost_at``; a crash
  closes connections at once). Only when the cycle's own database probe fails
  too, and never earlier than the previous cycle: the threshold, the hysteresis
  and the agreement rules are unchanged.
- **Stall guard.** When more than two and a half probe intervals passed since the
  previous cycle (VM pause, swap storm, a blocked loop), the evidence gathered
  before the gap is stale: the outage timers restart now and the cycle's verdict is
  ``stale``, on which nobody acts. One skipped tick (a gap of two intervals, and a
  hair: a cycle that outlasted its interval, say waiting on a slow store) is not a
  stall.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from watchdogd.probes import Observation


class Status(StrEnum):
    """A verdict on the primary: only ``down`` is ever acted on; ``stale`` never."""

    HEALTHY = "healthy"
    SUSPECT = "suspect"
    DOWN = "down"
    STALE = "stale"


HEALTHY, SUSPECT, DOWN, STALE = Status.HEALTHY, Status.SUSPECT, Status.DOWN, Status.STALE

# A gap between cycles longer than this many intervals is a stall. One skipped tick is
# not: the scheduler skips the tick that comes while a cycle still runs, so a cycle that
# outlasts its interval makes a gap of two intervals and a few milliseconds.
STALL_GAP = 2.5


@dataclass(frozen=True)
class Cycle:
    """The observations of one probe cycle, all taken at monotonic time ``at``."""

    at: float
    primary_db: Observation
    standby_db: Observation
    primary_app: Observation | None = None
    witnesses: tuple[Observation, ...] = ()
    # When the daemon noticed its connection to the primary's database closed (the
    # notice that woke this cycle early), in the same clock as ``at``; None otherwise.
    primary_lost_at: float | None = None


@dataclass(frozen=True)
class Verdict:
    status: Status
    reason: str
    outage_seconds: float = 0.0  # longest current continuous failure of an own probe
    trigger: str | None = None  # database | app: which failure makes it down/suspect
    failing: tuple[str, ...] = ()  # "main/database: connection refused", ...
    standby_sees_primary: bool | None = None  # None: unknown (standby unreachable)
    votes_down: int = 0
    votes_total: int = 0
    partition: bool = False
    recovered: bool = False  # an outage just ended (hysteresis satisfied)

    def facts(self) -> dict[str, object]:
        return {
            "verdict": self.status,
            "reason": self.reason,
            "outage_seconds": round(self.outage_seconds, 3),
            "trigger": self.trigger,
            "failing": list(self.failing),
            "standby_sees_primary": self.standby_sees_primary,
            "votes_down": self.votes_down,
            "votes_total": self.votes_total,
        }


@dataclass
class _Run:
    """Continuous-failure tracking of one probe kind, with recovery hysteresis."""

    failing_since: float | None = None
    good_streak: int = 0
    detail: str = ""

    def update(
        self, ok: bool, at: float, detail: str, needed: int, since: float | None = None
    ) -> bool:
        """Record one result (a failure that began at ``since``, if known); returns
        True when an outage just ended."""
        if not ok:
            self.good_streak = 0
            self.detail = detail
            if self.failing_since is None:
                self.failing_since = at if since is None else since
            return False
        if self.failing_since is None:
            return False
        self.good_streak += 1
        if self.good_streak >= needed:
            self.failing_since, self.good_streak = None, 0
            return True
        return False

    def duration(self, at: float) -> float:
        return 0.0 if self.failing_since is None else max(0.0, at - self.failing_since)


@dataclass
class Detector:
    interval: float
    threshold: float
    recovery_successes: int = 3
    trigger_on: frozenset[str] = frozenset({"database", "app"})
    _db: _Run = field(default_factory=_Run)
    _app: _Run = field(default_factory=_Run)
    _last_at: float | None = None

    @property
    def _slack(self) -> float:
        """Outages are measured between cycle starts, which the scheduler may fire a
        millisecond early: without slack the cycle due at exactly the threshold reads
        2.999 s for 3 s and the decision slips a whole interval."""
        return min(0.05, 0.1 * self.interval)

    def reset(self) -> None:
        """Forget all evidence (roles changed: a different node is the primary now)."""
        self._db, self._app, self._last_at = _Run(), _Run(), None

    def update(self, cycle: Cycle) -> Verdict:
        at = cycle.at
        stalled = self._last_at is not None and at - self._last_at > STALL_GAP * self.interval
        gap = 0.0 if self._last_at is None else at - self._last_at
        since = _loss_start(cycle.primary_lost_at, self._last_at, at, self.interval)
        self._last_at = at

        n = self.recovery_successes
        recovered = self._db.update(cycle.primary_db.ok, at, cycle.primary_db.detail, n, since)
        app = cycle.primary_app
        if app is not None:
            recovered |= self._app.update(app.ok, at, app.detail, n)
        if stalled:
            for run in (self._db, self._app):
                if run.failing_since is not None:
                    run.failing_since = at
            return Verdict(
                STALE,
                f"probe loop stalled for {gap:.1f}s: evidence discarded, outage timers restarted",
            )

        db_for, app_for = self._db.duration(at), self._app.duration(at)
        outage = max(db_for, app_for)
        failing = tuple(
            f"{o.target}/{o.probe}: {o.detail}"
            for o in (cycle.primary_db, app)
            if o is not None and not o.ok
        )
        sees = standby_sees_primary(cycle.standby_db)

        def verdict(
            status: Status,
            reason: str,
            trigger: str,
            *,
            partition: bool = False,
            votes: tuple[int, int] = (0, 0),
        ) -> Verdict:
            return Verdict(
                status,
                reason,
                outage_seconds=outage,
                trigger=trigger,
                failing=failing,
                standby_sees_primary=sees,
                votes_down=votes[0],
                votes_total=votes[1],
                partition=partition,
                recovered=recovered,
            )

        if self._db.failing_since is not None:
            if cycle.primary_db.ok:
                # Answering again, but not yet for long enough to call it recovered:
                # the timer runs on, yet nobody fails over a primary that answers.
                return verdict(
                    SUSPECT,
                    f"primary database answering again "
                    f"({self._db.good_streak}/{n} good cycles to recover)",
                    "database",
                )
            if db_for < self.threshold - self._slack:
                return verdict(
                    SUSPECT,
                    f"primary database failing for {db_for:.1f}s (threshold {self.threshold:g}s)",
                    "database",
                )
            if "database" not in self.trigger_on:
                return verdict(
                    SUSPECT,
                    "primary database down, but failover.trigger_on excludes database",
                    "database",
                )
            if sees is True:
                return verdict(
                    SUSPECT,
                    "partition between watcher and primary: the standby still streams from it"
                    + _link_note(cycle.standby_db),
                    "database",
                    partition=True,
                )
            if sees is None:
                why = "is unreachable" if not cycle.standby_db.ok else "cannot tell"
                return verdict(
                    SUSPECT,
                    f"cannot confirm the primary is down: the standby {why} "
                    f"({cycle.standby_db.detail})",
                    "database",
                )
            down_votes, total = 2, 2 + len(cycle.witnesses)
            down_votes += sum(1 for w in cycle.witnesses if w.sees_primary is False)
            votes = (down_votes, total)
            if down_votes * 2 <= total:
                return verdict(
                    SUSPECT,
                    f"only {down_votes} of {total} vantage points see the "
                    "primary down (majority needed)",
                    "database",
                    votes=votes,
                )
            return verdict(
                DOWN,
                f"primary database down for {db_for:.1f}s and the standby "
                f"agrees ({down_votes}/{total} vantage points)",
                "database",
                votes=votes,
            )

        if self._app.failing_since is not None:
            if app is not None and app.ok:
                return verdict(
                    SUSPECT,
                    f"primary application answering again "
                    f"({self._app.good_streak}/{n} good cycles to recover)",
                    "app",
                )
            if app_for < self.threshold - self._slack:
                return verdict(
                    SUSPECT,
                    f"primary application failing for {app_for:.1f}s "
                    f"(threshold {self.threshold:g}s)",
                    "app",
                )
            if "app" not in self.trigger_on:
                return verdict(
                    SUSPECT, "primary application down, but failover.trigger_on excludes app", "app"
                )
            return verdict(
                DOWN,
                f"primary application down for {app_for:.1f}s while its database answers",
                "app",
            )

        return Verdict(
            HEALTHY,
            "primary healthy",
            failing=failing,
            standby_sees_primary=sees,
            recovered=recovered,
        )


def _loss_start(
    lost_at: float | None, previous: float | None, at: float, interval: float
) -> float | None:
    """When a noticed connection loss says the outage began: not before the previous
    cycle (which saw the primary as it was then), not after this one. Without a previous
    cycle (the first one, after reset() or a reload) not before one interval ago: a stale
    notice must not backdate the outage past what one cycle could have missed."""
    if lost_at is None:
        return None
    floor = at - interval if previous is None else previous
    return min(at, max(lost_at, floor))


def _link_note(standby: Observation) -> str:
    """How quiet the standby's link is against its own limit, for the operator who
    wonders why a long silence is not an outage."""
    db = standby.db
    if db is None or db.last_receive_age is None:
        return ""
    limit = db.link_timeout
    own = (
        "no limit of its own"
        if limit == 0
        else "its own link timeout unknown"
        if limit is None
        else f"its own link timeout {limit:g}s"
    )
    return f" (last heard {db.last_receive_age:.1f}s ago; {own})"


def standby_sees_primary(standby: Observation) -> bool | None:
    """The standby's own view of the primary, judged by the standby's own rules.

    True while it holds its replication link and the link's silence is within the
    replica's own link timeout; False once the replica has given the link up, or
    when the silence has outlasted that timeout (the replica is dropping it); None
    when the standby itself cannot be asked (or is no longer a standby). Without
    a readable timeout (or with it disabled) silence is never evidence: the
    replica holding its link is the answer, until the replica itself drops it."""
    db = standby.db
    if not standby.ok or db is None or db.is_primary:
        return None
    if db.streaming is None:
        # Unknown (e.g. a role that may not see the WAL receiver) is not "lost":
        # counting it as agreement would bypass the partition guard.
        return None
    if not db.streaming:
        return False
    silence, limit = db.last_receive_age, db.link_timeout
    if silence is None or not limit:
        return True
    return silence <= limit
