"""Property-based tests: random observation timelines through detector + policy.

The invariants a failover daemon is judged by: never a failover when every
outage window is shorter than the threshold, never when paused or in manual
mode, never a second automatic one within the cooldown or before an ack, never
while the standby still sees the primary.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.builders import cycle
from watchdogd.core.model import FailoverConfig, StepConfig
from watchdogd.detector import STALL_GAP, Detector
from watchdogd.policy import Policy, StandbyFacts
from watchdogd.state.journal import JournalState, apply

THRESHOLD, INTERVAL, N = 5.0, 1.0, 3
GOOD = StandbyFacts(True, True, 0, 0.0)


@dataclass
class Tick:
    primary_ok: bool
    standby_streaming: bool
    standby_ok: bool
    gap: float  # seconds since the previous cycle
    ack: bool


ticks = st.lists(
    st.builds(
        Tick,
        primary_ok=st.booleans(),
        standby_streaming=st.booleans(),
        standby_ok=st.sampled_from([True, True, True, False]),
        gap=st.sampled_from([1.0, 1.0, 1.0, 1.0, 0.5, 3.5, 2.0, 2.4, 2.6]),
        ack=st.sampled_from([False] * 15 + [True]),
    ),
    max_size=150,
)
# Outages come in runs: bias the timelines towards long failing stretches too.
runs = st.lists(st.tuples(st.booleans(), st.integers(1, 12), st.booleans()), max_size=20).map(
    lambda rs: [Tick(ok, stream, True, 1.0, False) for ok, n, stream in rs for _ in range(n)]
)


def simulate(
    timeline: list[Tick], *, mode: str = "automatic", paused: bool = False, cooldown: float = 30.0
) -> list[tuple[int, float, Tick]]:
    """Run the timeline; every started failover completes at once. Returns (index, t, tick)
    for each failover start."""
    det = Detector(interval=INTERVAL, threshold=THRESHOLD, recovery_successes=N)
    state = JournalState()
    cfg = FailoverConfig(
        mode=mode,
        cooldown=cooldown,
        max_lag=10**9,
        steps=(StepConfig(name="promote", action="promote"),),
    )
    pol = Policy(cfg, state)
    if paused:
        apply(state, {"type": "pause", "at": 0})
    starts = []
    t = 0.0
    for i, tick in enumerate(timeline):
        t += tick.gap
        if tick.ack and state.awaiting_ack is not None:
            apply(
                state,
                {
                    "type": "ack",
                    "id": state.awaiting_ack.id,
                    "primary": "main",
                    "standby": "failover",
                    "at": t,
                },
            )
        verdict = det.update(cycle(t, tick.primary_ok, tick.standby_streaming, tick.standby_ok))
        decision = pol.evaluate(verdict, GOOD, t)
        if decision.start:
            starts.append((i, t, tick))
            fid = f"f{i}"
            apply(
                state,
                {
                    "type": "failover_started",
                    "id": fid,
                    "trigger": "automatic",
                    "from": "main",
                    "to": "failover",
                    "steps": ["promote"],
                    "at": t,
                },
            )
            apply(state, {"type": "failover_finished", "id": fid, "outcome": "completed", "at": t})
    return starts


def longest_outage_before(timeline: list[Tick], end: int) -> float:
    """Reference model: the longest failure run up to index ``end``, a run broken only
    by N consecutive successes or by a stall (gap > STALL_GAP intervals: one skipped
    tick is not one)."""
    t, since, streak, best = 0.0, None, 0, 0.0
    for tick in timeline[: end + 1]:
        t += tick.gap
        if tick.gap > STALL_GAP * INTERVAL and since is not None:
            since = t
        if tick.primary_ok:
            if since is not None:
                streak += 1
                if streak >= N:
                    since, streak = None, 0
        else:
            streak = 0
            since = t if since is None else since
        if since is not None:
            best = max(best, t - since)
    return best


@settings(max_examples=300, deadline=None)
@given(st.one_of(ticks, runs))
def test_no_failover_unless_an_outage_lasted_the_threshold(timeline: list[Tick]) -> None:
    for index, _, tick in simulate(timeline):
        assert longest_outage_before(timeline, index) >= THRESHOLD
        assert not tick.primary_ok


@settings(max_examples=200, deadline=None)
@given(st.one_of(ticks, runs))
def test_never_while_the_standby_sees_the_primary(timeline: list[Tick]) -> None:
    for _, _, tick in simulate(timeline):
        # the builders report the standby as heard from 0.1 s ago: streaming = sees it
        assert not (tick.standby_ok and tick.standby_streaming)
        assert tick.standby_ok  # an unreachable standby cannot confirm


@settings(max_examples=200, deadline=None)
@given(st.one_of(ticks, runs))
def test_never_when_paused_or_manual(timeline: list[Tick]) -> None:
    assert simulate(timeline, paused=True) == []
    assert simulate(timeline, mode="manual") == []


@settings(max_examples=300, deadline=None)
@given(st.one_of(ticks, runs), st.sampled_from([0.0, 10.0, 30.0, 1000.0]))
def test_never_twice_within_cooldown_or_before_ack(timeline: list[Tick], cooldown: float) -> None:
    starts = simulate(timeline, cooldown=cooldown)
    for (i1, t1, _), (i2, t2, _) in pairwise(starts):
        assert t2 - t1 >= cooldown
        assert any(tick.ack for tick in timeline[i1 + 1 : i2 + 1]), "second failover before ack"
