"""Property tests over the standby's view of the primary (issue 10).

A simulated replication link follows the rules real replicas follow on their own
settings: a healthy primary sends something at least every ``keepalive`` seconds
(PostgreSQL: the receiver's ping at half of wal_receiver_timeout; Redis:
repl-ping-replica-period; MySQL: the heartbeat period), so the link's silence
saws between 0 and ``keepalive``; the replica gives the link up once it has been
silent for ``timeout`` (0: never) or when the primary's end closes it (a crash).
The watcher meanwhile sees the primary fail throughout (it is cut off, or the
primary is really gone). Two promises are checked on every cycle:

- the view is never "lost" while the replica holds a link whose silence is within
  its own timeout, whatever the outage threshold and the probe interval;
- a ``down`` verdict never happens while the standby sees the primary.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.builders import obs, standby_status
from watchdogd.detector import DOWN, Cycle, Detector, standby_sees_primary


@dataclass(frozen=True)
class Link:
    keepalive: float  # a healthy primary is heard from at least this often
    timeout: float  # the replica's own limit on silence; 0 = never gives up
    readable: bool  # could the watcher read the timeout from the server?
    fault_at: float | None  # when the primary stopped talking (hang, cut path)
    closed_at: float | None  # when the primary's end closed the link (crash: RST)

    def last_heard(self, t: float) -> float:
        """When the replica last heard from the primary, as of time ``t``."""
        talking_until = t if self.fault_at is None else min(t, self.fault_at)
        return talking_until - talking_until % self.keepalive

    def held(self, t: float) -> bool:
        """Does the replica still hold its link at ``t`` (by its own rules)?"""
        if self.closed_at is not None and t >= self.closed_at:
            return False
        return not (self.timeout and t - self.last_heard(t) > self.timeout)

    def observe(self, t: float) -> Cycle:
        silence = t - self.last_heard(t)
        standby = standby_status(
            streaming=self.held(t),
            age=silence,
            link_timeout=self.timeout if self.readable else None,
        )
        return Cycle(
            at=t,
            primary_db=obs("main", False, t),
            standby_db=obs("failover", True, t, db=standby),
        )


links = st.builds(
    Link,
    keepalive=st.floats(0.5, 60),
    timeout=st.one_of(st.just(0.0), st.floats(1, 300)),
    readable=st.booleans(),
    fault_at=st.one_of(st.none(), st.floats(0, 200)),
    closed_at=st.one_of(st.none(), st.floats(0, 200)),
).filter(lambda link: link.timeout == 0 or link.keepalive < link.timeout)


@settings(max_examples=300, deadline=None)
@given(
    link=links,
    threshold=st.floats(0.5, 120),
    interval=st.sampled_from([0.1, 0.25, 0.5, 1.0, 2.0, 5.0]),
    span=st.floats(1, 400),
)
def test_never_lost_while_the_replica_holds_a_link_within_its_own_timeout(
    link: Link, threshold: float, interval: float, span: float
) -> None:
    detector = Detector(interval=interval, threshold=threshold, recovery_successes=3)
    for i in range(int(span / interval) + 1):
        t = i * interval
        cycle = link.observe(t)
        sees = standby_sees_primary(cycle.standby_db)
        verdict = detector.update(cycle)
        if link.held(t):
            assert sees is True, (t, cycle.standby_db.db)
        else:
            assert sees is False
        if verdict.status == DOWN:
            assert sees is False and verdict.standby_sees_primary is False
            # ...which the replica itself decided: the primary closed the link or
            # it was silent past the replica's own timeout.
            assert not link.held(t)


@settings(max_examples=200, deadline=None)
@given(
    link=st.builds(
        Link,
        keepalive=st.floats(0.5, 30),
        timeout=st.floats(1, 120),
        readable=st.booleans(),
        fault_at=st.floats(0, 50),
        closed_at=st.none(),
    ).filter(lambda link: link.keepalive < link.timeout),
    threshold=st.floats(0.5, 60),
    interval=st.sampled_from([0.25, 0.5, 1.0]),
)
def test_a_hung_primary_is_confirmed_once_the_replica_gives_up(
    link: Link, threshold: float, interval: float
) -> None:
    """Liveness: safe is not enough, a hang must still end in a failover; it comes
    after the replica's own timeout and the outage threshold, and not much later."""
    assert link.fault_at is not None
    dropped = link.last_heard(link.fault_at) + link.timeout
    due = max(dropped, threshold) + 2 * interval
    detector = Detector(interval=interval, threshold=threshold, recovery_successes=3)
    first_down = None
    for i in range(int((due + 1) / interval) + 1):
        t = i * interval
        if detector.update(link.observe(t)).status == DOWN and first_down is None:
            first_down = t
    assert first_down is not None, "a hung primary was never confirmed"
    assert first_down >= dropped and first_down <= due
