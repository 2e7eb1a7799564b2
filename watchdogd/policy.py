"""The policy: verdicts and operator commands in, the daemon's state and plans out.
Pure: no I/O, time is passed in.

States: watching, suspect, failing_over, failed_over, paused, blocked, failed.
What is durable (paused, the last failover and whether it was acked, the
current roles, the time of the last automatic failover) lives in the journal's
``JournalState``; the policy reads it and never keeps a copy, so a restart that
replays the journal lands in exactly the same state.

Rejoins have their rules here too: when one may start (``refuse_rejoin``), what a
divergence report allows (``refuse_divergence``; ``auto_rejoin`` only on proof of
zero), the rejoin plan (its steps, then ``verify_rejoin``), and the state while one
runs or after one failed (``rejoin_news``: failed, nothing re-armed).

The guards, in the order they are applied to a ``down`` verdict:
an unfinished failover (resume it, never start another), a failover awaiting
its ack (never act twice), pause, manual mode, cooldown, the standby's health,
the lag guard.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from watchdogd.core.model import Config, FailoverConfig, ProbeConfig, StepConfig
from watchdogd.core.units import format_bytes
from watchdogd.detector import DOWN, HEALTHY, STALE, SUSPECT, Verdict
from watchdogd.engines import Divergence
from watchdogd.probes import Observation
from watchdogd.state.journal import FailoverRecord, JournalState, Outcome, RejoinRecord


class State(StrEnum):
    """The daemon's state, as status, metrics and alerts show it."""

    WATCHING = "watching"
    SUSPECT = "suspect"
    FAILING_OVER = "failing_over"
    FAILED_OVER = "failed_over"
    PAUSED = "paused"
    BLOCKED = "blocked"
    FAILED = "failed"
    # A fleet watcher whose store (etcd) does not answer: nothing is failed over, fenced
    # or demoted because of it; probing goes on (issue 12).
    STORE_UNAVAILABLE = "store_unavailable"


WATCHING, FAILING_OVER, FAILED_OVER = State.WATCHING, State.FAILING_OVER, State.FAILED_OVER
PAUSED, BLOCKED, FAILED = State.PAUSED, State.BLOCKED, State.FAILED
STATES = tuple(State)

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
    state: State
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
            if (rejoining := rejoin_news(j, fo)) is not None:
                return rejoining
            if fo.outcome == Outcome.COMPLETED:
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
                    State.SUSPECT,
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
            return Decision(State.SUSPECT, verdict.reason)
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
        self, verdict: Verdict, standby: StandbyFacts, force: bool, rejoining: bool = False
    ) -> str | None:
        j = self.journal
        if j.unfinished is not None:
            return f"failover {j.unfinished.id} is already in progress"
        rejoin = self.refuse_during_rejoin(rejoining)
        if rejoin is not None:
            return rejoin  # even with --force: the rejoin acts on the same pair
        done = j.awaiting_ack
        if done is not None and done.outcome == Outcome.COMPLETED:
            return (
                f"failover {done.id} already completed; rebuild {done.from_node} as the "
                "standby (watchdogctl rejoin, or by hand and ack) before failing over again"
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

    def refuse_during_rejoin(self, rejoining: bool) -> str | None:
        """A rejoin unfinished in the journal, or running or starting in this process
        (``rejoining``), refuses a manual failover or switchover, forced or not."""
        rj = self.journal.unfinished_rejoin
        if rj is not None:
            return (
                f"rejoin {rj.id} of {rj.from_node} is unfinished: let it finish first "
                "(watchdogctl status)"
            )
        if rejoining:
            return "a rejoin is running or starting: let it finish first"
        return None

    def refuse_switchover(
        self, primary_db_ok: bool, standby: StandbyFacts, rejoining: bool = False
    ) -> str | None:
        j = self.journal
        if j.unfinished is not None:
            return f"failover {j.unfinished.id} is already in progress"
        rejoin = self.refuse_during_rejoin(rejoining)
        if rejoin is not None:
            return rejoin
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
        if (rj := self.journal.unfinished_rejoin) is not None:
            raise ValueError(
                f"rejoin {rj.id} of {rj.from_node} is running: it acks by itself once "
                f"{rj.from_node} is verified as the standby"
            )
        if fo.outcome == Outcome.COMPLETED or fo.promoted:
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
    guard: StepConfig | None = None,
    step_limit: float | None = None,
) -> Plan:
    """The steps to run. A switchover (the old primary still answers) fences it and
    waits until the standby has replayed everything before touching the standby's
    database: zero data loss. ``guard`` (a fleet with a guard beside the primary): the
    step that has the guard fence the old primary, before the promotion. ``step_limit``
    (a fleet): the longest step its leader may start; the switchover's own fence and
    catch-up steps are cut to it (a longer one would never start)."""
    steps = list(cfg.steps)
    if guard is not None:
        steps.insert(guard_position(steps), guard)
    if kind == "switchover":
        cut = next((i for i, s in enumerate(steps) if s.action in _DB_ACTIONS), len(steps))
        extra: list[StepConfig] = []
        if not any(s.action == "fence" for s in steps):
            fence_timeout = 30.0 if step_limit is None else min(30.0, step_limit)
            extra.append(
                StepConfig(name="fence_old_primary", action="fence", timeout=fence_timeout)
            )
        catchup = (
            cfg.catchup_timeout if step_limit is None else min(cfg.catchup_timeout, step_limit)
        )
        extra.append(StepConfig(name="wait_for_catch_up", action="catch_up", timeout=catchup))
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


GUARD_STEP = "guard_fence"  # the fleet's step that has the guard fence the old primary


def guard_position(steps: Sequence[StepConfig]) -> int:
    """Where the guard's fence goes: just before the first ``promote``, after replication
    was stopped (a standby streaming from the old primary is a sign of life that keeps an
    isolated guard from fencing, so the guard's silence counts only once it stopped);
    without a promote step, after the last ``stop_replication``, else first."""
    for i, step in enumerate(steps):
        if step.action == "promote":
            return i
    stops = [i for i, step in enumerate(steps) if step.action == "stop_replication"]
    return stops[-1] + 1 if stops else 0


def build_rejoin_plan(
    cfg: FailoverConfig, *, id: str, trigger: str, reason: str, fo: FailoverRecord
) -> Plan:
    """The rejoin of ``fo``'s old primary: ``rejoin_steps``, then the verification that
    it streams from the new primary and caught up, within ``rejoin_timeout``. As in the
    failover, ``from_node`` is the old primary and ``to_node`` the new one."""
    verify = StepConfig(
        name=VERIFY_STEP, action="replica_of", timeout=cfg.rejoin_timeout, idempotent=True
    )
    return Plan(
        id=id,
        kind="rejoin",
        trigger=trigger,
        reason=reason,
        from_node=fo.from_node,
        to_node=fo.to_node,
        steps=(*cfg.rejoin_steps, verify),
    )


# ---------------------------------------------------------------------- roles


def journal_roles_stale(journal: JournalState, names: Iterable[str]) -> bool:
    """The journal names roles for nodes the config no longer has (renamed): ignore them."""
    return journal.primary is not None and {journal.primary, journal.standby} != set(names)


def base_roles(
    journal: JournalState, configured: tuple[str, str], names: Iterable[str]
) -> tuple[str, str]:
    """Roles as acknowledged, (primary, standby): the config's, swapped by every acked
    failover (as the journal records), unless the journal names unknown nodes."""
    p, s = journal.primary, journal.standby
    if p is not None and s is not None and {p, s} <= set(names):
        return p, s
    return configured


def current_roles(journal: JournalState, base: tuple[str, str]) -> tuple[str, str]:
    """Roles now: after a failover that promoted the standby, it is the primary even
    before the operator acks."""
    primary, standby = base
    fo = journal.awaiting_ack or journal.unfinished
    if (
        fo is not None
        and (fo.outcome == Outcome.COMPLETED or fo.promoted)
        and fo.to_node == standby
    ):
        return standby, primary
    return primary, standby


# ---------------------------------------------------------------------- observations


@dataclass(frozen=True)
class LagView:
    """What one cycle's database observations say about replication and writers."""

    last_primary_pos: int | None  # the lag guard's reference, kept while the primary is gone
    lag_bytes: int | None  # replay lag: what status and metrics show
    lag_seconds: float | None
    streaming: bool | None  # None: the standby is unreachable or is a primary itself
    writable: int  # how many of the two nodes accept writes


def observe_lag(pdb: Observation, sdb: Observation, last_primary_pos: int | None) -> LagView:
    if pdb.ok and pdb.db is not None and pdb.db.current_pos is not None:
        last_primary_pos = pdb.db.current_pos
    st = sdb.db if sdb.ok else None
    lag_bytes = None
    if (
        st is not None
        and not st.is_primary
        and last_primary_pos is not None
        and st.replay_pos is not None
    ):
        lag_bytes = max(0, last_primary_pos - st.replay_pos)
    return LagView(
        last_primary_pos=last_primary_pos,
        lag_bytes=lag_bytes,
        lag_seconds=st.lag_seconds if st is not None else None,
        streaming=None if st is None or st.is_primary else bool(st.streaming),
        writable=sum(1 for o in (pdb, sdb) if o.ok and o.db is not None and o.db.writable),
    )


def standby_facts(sdb: Observation | None, last_primary_pos: int | None) -> StandbyFacts:
    """The lag guard's view of the standby. Its bytes are measured to what the standby
    has *received* (promotion replays what it received), not what it replayed."""
    if sdb is None or not sdb.ok or sdb.db is None:
        return StandbyFacts(
            False, False, None, None, sdb.detail if sdb is not None else "not probed yet"
        )
    st = sdb.db
    guard = None
    if last_primary_pos is not None and st.receive_pos is not None:
        guard = max(0, last_primary_pos - st.receive_pos)
    return StandbyFacts(True, not st.is_primary, guard, st.lag_seconds, st.detail)


def verdict_news(
    previous: Verdict | None, verdict: Verdict, down_reported: str | None, primary: str
) -> tuple[list[str], str | None]:
    """The events a new verdict is news for, in order, and the primary whose outage has
    been announced afterwards. An outage announced before a restart (``down_reported``
    names the primary) is ``primary_still_down``, not a second ``primary_down``."""
    before = previous.status if previous is not None else HEALTHY
    news: list[str] = []
    if verdict.status == STALE:
        news.append("stall_detected")
    if verdict.status == DOWN and before != DOWN:
        news.append("primary_still_down" if down_reported == primary else "primary_down")
    if verdict.status == HEALTHY or verdict.recovered:
        down_reported = None  # a later outage is a new episode
    if verdict.recovered:
        news.append("primary_recovered")
    if verdict.partition and not (previous is not None and previous.partition):
        news.append("partition_suspected")
    return news, down_reported


def state_changed(last: Decision | None, decision: Decision) -> bool:
    """A decision is news (logged, told to systemd) when its state changed; a new reason
    under the same state is not."""
    return last is None or last.state != decision.state


def recalled_outage(journal: JournalState) -> str | None:
    """After a restart with a failover unfinished (or unacked and not promoted), its
    primary_down went out before the restart: the primary whose outage is not news."""
    episode = journal.unfinished or journal.awaiting_ack
    if episode is not None and not episode.promoted:
        return episode.from_node
    return None


# ---------------------------------------------------------------------- split brain

UNEXPLAINED = "unexplained"


@dataclass(frozen=True)
class SplitBrain:
    split: bool
    # The episode: the id of the failover that explains it, UNEXPLAINED, or None (no split).
    key: str | None = None
    news: bool = False  # a new episode: report it (the alert keeps firing for an old one)
    # Ours: the failover whose old primary came back writable; fence it. None: fence neither.
    failover: FailoverRecord | None = None


def judge_split_brain(
    writable: int, last: FailoverRecord | None, handled: str | None
) -> SplitBrain:
    """Two writable primaries: whose failover explains it, and whether it is news.

    Ours is the last failover, not acked, that promoted the standby: its old primary came
    back writable and is fenced (once per episode). Anything else is unexplained and
    nothing is fenced: an operator must decide."""
    if writable <= 1:
        return SplitBrain(False)  # a later episode is handled afresh
    ours = (
        last is not None
        and last.acked_at is None
        and (last.outcome == Outcome.COMPLETED or last.promoted)
    )
    key = last.id if ours and last is not None else UNEXPLAINED
    return SplitBrain(True, key, key != handled, last if ours else None)


# ---------------------------------------------------------------------- sequences


def can_resume(plan: Plan, fo: FailoverRecord | RejoinRecord) -> bool:
    """An unfinished failover resumes only under the steps and roles it started with:
    if the config changed under it, do not guess."""
    return [s.name for s in plan.steps] == fo.plan and plan.from_node == fo.from_node


def kept_primary_pos(acked_primary: str, fo: FailoverRecord, last_pos: int | None) -> int | None:
    """After an ack the pair is watched afresh, except that the lag guard keeps the last
    position of a primary that stays the primary (an aborted outage: it may still be dead
    and never report one again)."""
    return last_pos if acked_primary == fo.from_node else None


def abort_target(running: bool, pending: bool) -> str:
    """What ``abort`` stops: ``running`` (the runner, before its next step), ``pending``
    (an automatic failover about to start: journaled as aborted before it began), or
    ``nothing`` (refused)."""
    if running:
        return "running"
    return "pending" if pending else "nothing"


# ---------------------------------------------------------------------- rejoin

# The last step of every rejoin: the old primary streams from the new one and caught up.
VERIFY_STEP = "verify_rejoin"


def rejoin_of(journal: JournalState, fo: FailoverRecord) -> RejoinRecord | None:
    """The last rejoin after failover ``fo``, if any."""
    rj = journal.last_rejoin
    return rj if rj is not None and rj.failover_id == fo.id else None


def rejoin_news(journal: JournalState, fo: FailoverRecord) -> Decision | None:
    """The state while a failover awaits its ack and a rejoin ran after it: running is
    still failed_over (disarmed until verified); a rejoin that did not complete is
    ``failed``, and nothing is re-armed."""
    rj = rejoin_of(journal, fo)
    if rj is None or rj.outcome == Outcome.COMPLETED:
        return None
    if rj.unfinished:
        return Decision(
            FAILED_OVER,
            f"rejoining {rj.from_node} as the standby of {rj.to_node} (rejoin {rj.id}); "
            "automatic failover disarmed until it is verified",
        )
    why = f": {rj.error}" if rj.error else ""
    return Decision(
        FAILED,
        f"rejoin {rj.id} of {rj.from_node} {rj.outcome}{why}; {rj.to_node} has no standby "
        "and automatic failover stays disarmed: fix it and run watchdogctl rejoin again "
        "(or rebuild it by hand and ack)",
    )


def refuse_rejoin(journal: JournalState, running: bool, fencing: bool = False) -> str | None:
    """Why a rejoin cannot start now, or None: there must be a failover awaiting its ack
    that promoted the standby, and nothing else running (a fence of the old primary
    first finishes: both act on the same server)."""
    if journal.unfinished is not None:
        return f"failover {journal.unfinished.id} is in progress"
    if fencing:
        return "the old primary is being fenced: rejoin once the fence is done"
    rj = journal.unfinished_rejoin
    if rj is not None:
        return f"rejoin {rj.id} of {rj.from_node} is already running"
    if running:
        return "a rejoin is already starting"
    fo = journal.awaiting_ack
    if fo is None:
        return "nothing to rejoin: no failover awaits an ack (the pair has its standby)"
    if not (fo.outcome == Outcome.COMPLETED or fo.promoted):
        return (
            f"failover {fo.id} {fo.outcome} without promoting {fo.to_node}: "
            f"{fo.from_node} is still the primary; nothing to rejoin (ack it)"
        )
    return None


def describe_divergence(div: Divergence, limit: int = 5) -> str:
    """One line for humans: ``3 transactions (0-1-5, 0-1-6, 0-1-7)``, ``1.2 kB``."""
    if div.diverged is None:
        return f"unknown ({div.detail or 'no detail'})"
    if div.unit == "bytes" and div.lost is not None:
        amount = f"{format_bytes(div.lost)} ({div.lost} bytes)" if div.lost else "0 bytes"
    else:
        amount = f"{div.lost} {div.unit}"
    shown = list(div.items[:limit])
    if len(div.items) > limit:
        shown.append(f"and {len(div.items) - limit} more")
    return amount + (f" ({', '.join(shown)})" if shown else "")


def refuse_divergence(div: Divergence, accept: bool, old: str, new: str) -> str | None:
    """Why a rejoin with this divergence report must not go ahead, or None. A rejoin
    throws away what only the old primary holds: that takes the operator's word
    (``accept``), and so does a report that cannot prove there is nothing."""
    if accept or div.diverged is False:
        return None
    if div.diverged is None:
        return (
            f"divergence unknown ({div.detail or 'no detail'}): nothing proves that {old} "
            f"holds no writes {new} lacks; rerun with --accept-divergence to rejoin anyway "
            "(whatever only it holds is thrown away)"
        )
    return (
        f"{old} holds {describe_divergence(div)} that {new} never got, and a rejoin throws "
        "them away: rerun with --accept-divergence to accept that"
    )


def unknown_divergence(error: str) -> Divergence:
    """The report when the engine could not be asked (the old primary unreachable)."""
    return Divergence(known=False, lost=None, unit="", detail=error)


def auto_rejoin_due(
    cfg: FailoverConfig,
    journal: JournalState,
    answering: frozenset[str],
    running: bool,
    checked: str | None,
    fencing: bool = False,
) -> FailoverRecord | None:
    """With ``auto_rejoin``: the failover whose old primary should be checked for a
    rejoin now (its database answers again, nothing runs, this episode is not checked
    yet and no rejoin after it ran), else None. ``answering``: the nodes whose database
    probe succeeded this cycle; ``checked``: the failover id last checked."""
    if not cfg.auto_rejoin or refuse_rejoin(journal, running, fencing) is not None:
        return None
    fo = journal.awaiting_ack
    if fo is None or fo.id == checked or fo.from_node not in answering:
        return None
    return None if rejoin_of(journal, fo) is not None else fo


def auto_rejoin_starts(div: Divergence) -> bool:
    """An automatic rejoin goes ahead only on proof that nothing is thrown away."""
    return div.diverged is False


# ---------------------------------------------------------------------- liveness


def stall_limit(probe: ProbeConfig) -> float:
    """How long without a completed probe cycle before the loop counts as stalled."""
    return max(3 * probe.interval, probe.timeout + 5.0)


def probe_loop_alive(last_cycle: float | None, now: float, limit: float) -> bool:
    return last_cycle is not None and now - last_cycle <= limit


def health(
    journal_error: str | None, last_cycle: float | None, now: float, limit: float, state: str
) -> tuple[bool, str]:
    """/healthz: (healthy, why)."""
    if journal_error is not None:
        return False, f"journal cannot be written: {journal_error}"
    if last_cycle is None:
        return False, "no probe cycle completed yet"
    age = now - last_cycle
    if age > limit:
        return False, f"probe loop stalled: last cycle {age:.1f}s ago"
    return True, f"{state}; last cycle {age:.1f}s ago"


# Config sections a reload cannot apply: the sockets and the journal are held open.
# guard: a plan's guard step needs the fleet's guard link, built at start.
RESTART_ONLY = ("control", "metrics", "state_dir", "instance", "store", "guard")


def restart_needed_for(old: Config, new: Config) -> list[str]:
    """The sections a reload changed but cannot apply: they need a restart."""
    return [k for k in RESTART_ONLY if getattr(new, k) != getattr(old, k)]
