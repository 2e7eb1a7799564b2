"""The policy: verdicts and operator commands in, the daemon's state and plans out.
Pure: no I/O, time is passed in.

States: watching, suspect, failing_over, failed_over, paused, blocked, failed.
What is durable (paused, the last failover and whether it was acked, the
current roles, the time of the last automatic failover) lives in the journal's
``JournalState``; the policy reads it and never keeps a copy, so a restart that
replays the journal lands in exactly the same state.

The guards, in the order they are applied to a ``down`` verdict:
an unfinished failover (resume it, never start another), a failover awaiting
its ack (never act twice), pause, manual mode, cooldown, the standby's health,
the lag guard.
"""

from __future__ import annotations

from dataclasses import dataclass

from watchdogd.config import FailoverConfig, StepConfig
from watchdogd.detector import DOWN, HEALTHY, STALE, SUSPECT, Verdict
from watchdogd.failover.journal import JournalState

WATCHING, SUSPECTED, FAILING_OVER, FAILED_OVER = (
    "watching",
    "suspect",
    "failing_over",
    "failed_over",
)
PAUSED, BLOCKED, FAILED = "paused", "blocked", "failed"
STATES = (WATCHING, SUSPECTED, FAILING_OVER, FAILED_OVER, PAUSED, BLOCKED, FAILED)

# Actions that change the standby's database role: a switchover waits and fences before them.
_DB_ACTIONS = frozenset({"stop_replication", "promote"})


@dataclass(frozen=True)
class StandbyFacts:
    """What the lag guard needs to know about the standby at decision time."""

    reachable: bool
    is_standby: bool
    # Bytes the standby would lose if promoted now: the last primary position
    # seen minus what the standby has received (promotion replays what it received).
    lag_bytes: int | None
    lag_seconds: float | None
    detail: str = ""


@dataclass(frozen=True)
class Decision:
    state: str
    reason: str
    start: str | None = None  # "failover" | "switchover": start an automatic sequence now


@dataclass(frozen=True)
class Plan:
    id: str
    kind: str  # failover | switchover
    trigger: str  # automatic | manual | switchover
    reason: str
    from_node: str
    to_node: str
    steps: tuple[StepConfig, ...]
    forced: bool = False


def format_bytes(n: float) -> str:
    """Decimal units, as ``max_lag: 16MB`` is written in the config."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


class Policy:
    def __init__(self, cfg: FailoverConfig, journal: JournalState) -> None:
        self.cfg = cfg
        self.journal = journal
        self.state = WATCHING

    # ------------------------------------------------------------------ automatic

    def armed(self, now: float) -> bool:
        """Whether a confirmed outage would be failed over automatically right now
        (standby health and lag aside, which are only known at that moment)."""
        j = self.journal
        return (
            self.cfg.mode == "automatic"
            and not j.paused
            and j.unfinished is None
            and j.awaiting_ack is None
            and self.cooldown_left(now) == 0.0
        )

    def cooldown_left(self, now: float) -> float:
        last = self.journal.last_automatic_at
        if last is None:
            return 0.0
        return max(0.0, last + self.cfg.cooldown - now)

    def evaluate(self, verdict: Verdict, standby: StandbyFacts, now: float) -> Decision:
        decision = self._evaluate(verdict, standby, now)
        self.state = decision.state
        return decision

    def _evaluate(self, verdict: Verdict, standby: StandbyFacts, now: float) -> Decision:
        j = self.journal
        if (fo := j.unfinished) is not None:
            return Decision(FAILING_OVER, f"failover {fo.id} in progress ({fo.reason})")
        if (fo := j.awaiting_ack) is not None:
            if fo.outcome == "completed":
                return Decision(
                    FAILED_OVER,
                    f"failed over from {fo.from_node} to {fo.to_node}; "
                    "automatic failover disarmed until an operator acks",
                )
            why = f": {fo.error}" if fo.error else ""
            return Decision(
                FAILED,
                f"failover {fo.id} {fo.outcome}{why}; "
                "automatic failover disarmed until an operator acks",
            )
        if verdict.status == STALE:
            return Decision(self.state, verdict.reason)
        if j.paused:
            why = f" ({j.pause_reason})" if j.pause_reason else ""
            extra = "" if verdict.status == HEALTHY else f"; {verdict.reason}"
            return Decision(PAUSED, f"automatic failover paused by operator{why}{extra}")
        if verdict.status == DOWN:
            if self.cfg.mode == "manual":
                return Decision(
                    SUSPECTED,
                    f"{verdict.reason}; mode is manual: an operator "
                    "must fail over (watchdogctl failover)",
                )
            if (left := self.cooldown_left(now)) > 0:
                return Decision(
                    BLOCKED,
                    f"{verdict.reason}; cooldown: the last automatic "
                    f"failover was less than {self.cfg.cooldown:g}s ago "
                    f"({left:.0f}s left)",
                )
            if (refusal := self.refuse(standby)) is not None:
                return Decision(BLOCKED, f"{verdict.reason}; {refusal}")
            kind = "switchover" if verdict.trigger == "app" else "failover"
            return Decision(FAILING_OVER, verdict.reason, start=kind)
        if verdict.status == SUSPECT:
            return Decision(SUSPECTED, verdict.reason)
        return Decision(WATCHING, verdict.reason)

    def refuse(self, standby: StandbyFacts) -> str | None:
        """Why promoting the standby now would be unsafe, or None."""
        if not standby.reachable:
            return f"standby database unreachable ({standby.detail})"
        if not standby.is_standby:
            return f"standby database is not replicating ({standby.detail})"
        if standby.lag_bytes is None:
            return "lag guard: replication lag unknown (primary position never seen)"
        if standby.lag_bytes > self.cfg.max_lag:
            return (
                f"lag guard: standby is {format_bytes(standby.lag_bytes)} behind, more than "
                f"max_lag {format_bytes(self.cfg.max_lag)}"
            )
        limit = self.cfg.max_lag_seconds
        if limit is not None and standby.lag_seconds is not None and standby.lag_seconds > limit:
            return (
                f"lag guard: standby is {standby.lag_seconds:.1f}s behind, more than "
                f"max_lag_seconds {limit:g}s"
            )
        return None

    # ------------------------------------------------------------------ operators

    def refuse_manual_failover(
        self, verdict: Verdict, standby: StandbyFacts, force: bool
    ) -> str | None:
        j = self.journal
        if j.unfinished is not None:
            return f"failover {j.unfinished.id} is already in progress"
        done = j.awaiting_ack
        if done is not None and done.outcome == "completed":
            return (
                f"failover {done.id} already completed; rebuild {done.from_node} as the "
                "standby and ack before failing over again"
            )
        if force:
            return None
        if verdict.status == HEALTHY and done is None:
            return (
                "the primary is healthy: use switchover for a planned change "
                "(or --force to promote anyway)"
            )
        refusal = self.refuse(standby)
        return None if refusal is None else f"{refusal} (use --force to override)"

    def refuse_switchover(self, primary_db_ok: bool, standby: StandbyFacts) -> str | None:
        j = self.journal
        if j.unfinished is not None:
            return f"failover {j.unfinished.id} is already in progress"
        if j.awaiting_ack is not None:
            return f"failover {j.awaiting_ack.id} awaits an ack"
        if not primary_db_ok:
            return "the primary database is down: use failover"
        if not standby.reachable or not standby.is_standby:
            return self.refuse(standby)
        return None

    def pending_outage(self, verdict: Verdict) -> bool:
        """An automatic failover is pending: the primary is failing, nothing has started."""
        j = self.journal
        return verdict.status in (SUSPECT, DOWN) and j.unfinished is None and j.awaiting_ack is None

    def ack_roles(self) -> tuple[str, str]:
        """The roles after acking the failover that awaits it: (primary, standby).
        Raises ValueError when there is nothing to ack."""
        fo = self.journal.awaiting_ack
        if fo is None:
            raise ValueError(
                "nothing to acknowledge: no completed or failed failover awaits an ack"
            )
        if fo.outcome == "completed" or fo.promoted:
            return fo.to_node, fo.from_node
        return fo.from_node, fo.to_node


def build_plan(
    cfg: FailoverConfig,
    *,
    id: str,
    kind: str,
    trigger: str,
    reason: str,
    from_node: str,
    to_node: str,
    forced: bool = False,
) -> Plan:
    """The steps to run. A switchover (the old primary still answers) fences it and
    waits until the standby has replayed everything before touching the standby's
    database: zero data loss."""
    steps = list(cfg.steps)
    if kind == "switchover":
        cut = next((i for i, s in enumerate(steps) if s.action in _DB_ACTIONS), len(steps))
        extra: list[StepConfig] = []
        if not any(s.action == "fence" for s in steps):
            extra.append(StepConfig(name="fence_old_primary", action="fence", timeout=30.0))
        extra.append(
            StepConfig(name="wait_for_catch_up", action="catch_up", timeout=cfg.catchup_timeout)
        )
        steps[cut:cut] = extra
    return Plan(
        id=id,
        kind=kind,
        trigger=trigger,
        reason=reason,
        from_node=from_node,
        to_node=to_node,
        steps=tuple(steps),
        forced=forced,
    )
