"""The detector, driven cycle by cycle with an injected clock: no sockets, no sleeps."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.unit.builders import cycle
from watchdogd.detector import DOWN, HEALTHY, STALE, SUSPECT, Cycle, Detector


def make(threshold: float = 5.0, interval: float = 1.0, n: int = 3, **kw: object) -> Detector:
    return Detector(interval=interval, threshold=threshold, recovery_successes=n, **kw)  # type: ignore[arg-type]


def test_healthy_primary_is_healthy() -> None:
    d = make()
    for t in range(10):
        v = d.update(cycle(t, primary_ok=True, standby_streaming=True))
        assert v.status == HEALTHY and v.outage_seconds == 0


def test_outage_becomes_down_only_at_threshold_with_standby_agreeing() -> None:
    d = make(threshold=5)
    statuses = [d.update(cycle(t, primary_ok=False)).status for t in range(7)]
    # failing since t=0: 0..4 s is below the 5 s threshold
    assert statuses[:5] == [SUSPECT] * 5
    assert statuses[5] == DOWN and statuses[6] == DOWN


def test_down_reports_trigger_reasons_and_failing_probes() -> None:
    d = make(threshold=2)
    for t in range(3):
        v = d.update(cycle(t, primary_ok=False))
    assert v.status == DOWN and v.trigger == "database"
    assert v.failing == ("main/database: connection refused",)
    assert v.standby_sees_primary is False
    assert "standby agrees" in v.reason and v.outage_seconds == 2


def test_standby_still_streaming_means_partition_forever() -> None:
    d = make(threshold=5)
    for t in range(60):
        v = d.update(cycle(t, primary_ok=False, standby_streaming=True))
        assert v.status == SUSPECT
    assert v.partition and "partition between watcher and primary" in v.reason


def test_quiet_link_within_the_replicas_own_timeout_is_not_a_lost_primary() -> None:
    # Issue 10: stock PostgreSQL (wal_receiver_timeout 60s) on an idle primary: the
    # healthy link is silent for up to 30 s, far past a 2 s threshold. Silence the
    # replica itself calls normal never confirms an outage the watcher alone sees.
    d = make(threshold=2, interval=0.5)
    for i in range(120):
        t = i * 0.5
        v = d.update(
            cycle(t, primary_ok=False, standby_streaming=True, age=t % 30, link_timeout=60)
        )
        assert v.status == SUSPECT and v.standby_sees_primary is True
    assert v.partition and "partition between watcher and primary" in v.reason
    assert v.reason.endswith("(last heard 29.5s ago; its own link timeout 60s)")


def test_silence_past_the_replicas_own_timeout_agrees() -> None:
    # A hung (SIGSTOPped) primary keeps the TCP link open: silence beyond what the
    # replica's own setting allows is the replica dropping the link.
    d = make(threshold=5)
    for t in range(6):
        v = d.update(
            cycle(t, primary_ok=False, standby_streaming=True, age=t + 0.5, link_timeout=3)
        )
    assert v.status == DOWN and v.standby_sees_primary is False


def test_silence_never_counts_when_the_replicas_timeout_is_unknown_or_disabled() -> None:
    for link_timeout in (None, 0.0):
        d = make(threshold=2)
        for t in range(30):
            v = d.update(
                cycle(
                    t, primary_ok=False, standby_streaming=True, age=1e6, link_timeout=link_timeout
                )
            )
            assert v.status == SUSPECT and v.standby_sees_primary is True


def test_unreachable_standby_cannot_confirm() -> None:
    d = make(threshold=2)
    for t in range(5):
        v = d.update(cycle(t, primary_ok=False, standby_ok=False))
    assert v.status == SUSPECT and v.standby_sees_primary is None
    assert "standby is unreachable" in v.reason


def test_single_lucky_probe_does_not_reset_outage_timer() -> None:
    d = make(threshold=5, n=3)
    pattern = [False, False, False, True, False, False]  # one success at t=3
    for t, ok in enumerate(pattern):
        v = d.update(cycle(t, primary_ok=ok))
    assert v.status == DOWN and v.outage_seconds == 5


def test_recovery_needs_consecutive_successes() -> None:
    d = make(threshold=10, n=3)
    for t in range(3):
        d.update(cycle(t, primary_ok=False))
    v1 = d.update(cycle(3, primary_ok=True))
    v2 = d.update(cycle(4, primary_ok=True))
    assert v1.status == SUSPECT and v2.status == SUSPECT and not v2.recovered
    v3 = d.update(cycle(5, primary_ok=True))
    assert v3.status == HEALTHY and v3.recovered and v3.outage_seconds == 0


def test_one_skipped_tick_is_not_a_stall_two_are() -> None:
    """A cycle that outlasted its interval (the scheduler skipped one tick) leaves a gap
    of two intervals and a hair: the outage timer runs on. Three intervals: a stall."""
    d = make(threshold=5, interval=1)
    for t in range(3):
        d.update(cycle(t, primary_ok=False))
    v = d.update(cycle(4.03, primary_ok=False))  # one tick skipped, 30 ms late
    assert v.status == SUSPECT and v.outage_seconds == pytest.approx(4.03)
    assert d.update(cycle(5.03, primary_ok=False)).status == DOWN
    d = make(threshold=5, interval=1)
    for t in range(3):
        d.update(cycle(t, primary_ok=False))
    assert d.update(cycle(5.0, primary_ok=False)).status == STALE


def test_stall_discards_evidence_and_restarts_timer() -> None:
    d = make(threshold=5, interval=1)
    for t in range(4):
        d.update(cycle(t, primary_ok=False))
    v = d.update(cycle(10, primary_ok=False))  # 7 s gap: the loop stalled
    assert v.status == STALE and "stalled" in v.reason
    # the timer restarted at t=10: down only at t=15
    assert d.update(cycle(11, primary_ok=False)).status == SUSPECT
    assert [d.update(cycle(t, primary_ok=False)).status for t in range(12, 16)] == [
        SUSPECT,
        SUSPECT,
        SUSPECT,
        DOWN,
    ]


def test_witness_majority_required() -> None:
    # own + standby say down, two witnesses still reach the primary: 2 of 4 is no majority
    d = make(threshold=1)
    for t in range(3):
        v = d.update(cycle(t, primary_ok=False, witnesses=(True, True)))
    assert v.status == SUSPECT and v.votes_down == 2 and v.votes_total == 4
    d = make(threshold=1)
    for t in range(3):
        v = d.update(cycle(t, primary_ok=False, witnesses=(False, None)))
    assert v.status == DOWN and v.votes_down == 3 and v.votes_total == 4


def test_unreachable_witnesses_abstain_and_block_majority() -> None:
    d = make(threshold=1)
    for t in range(3):
        v = d.update(cycle(t, primary_ok=False, witnesses=(None, None)))
    assert v.status == SUSPECT


def test_app_down_with_database_alive_is_app_trigger() -> None:
    d = make(threshold=3)
    for t in range(4):
        v = d.update(cycle(t, primary_ok=True, standby_streaming=True, app_ok=False))
    assert v.status == DOWN and v.trigger == "app"


def test_trigger_on_excludes() -> None:
    d = make(threshold=1, trigger_on=frozenset({"database"}))
    for t in range(3):
        v = d.update(cycle(t, primary_ok=True, standby_streaming=True, app_ok=False))
    assert v.status == SUSPECT and "excludes app" in v.reason
    d = make(threshold=1, trigger_on=frozenset({"app"}))
    for t in range(3):
        v = d.update(cycle(t, primary_ok=False))
    assert v.status == SUSPECT and "excludes database" in v.reason


def test_reset_forgets_everything() -> None:
    d = make(threshold=2)
    for t in range(2):
        d.update(cycle(t, primary_ok=False))
    d.reset()
    assert d.update(cycle(2, primary_ok=False)).outage_seconds == 0


def test_unknown_replication_state_is_not_agreement() -> None:
    # A monitoring role that cannot see the WAL receiver reports streaming=None:
    # treating that as "lost the primary" would bypass the partition guard.
    from dataclasses import replace

    d = make(threshold=1)
    for t in range(4):
        c = cycle(t, primary_ok=False)
        assert c.standby_db.db is not None
        blind = replace(c.standby_db, db=replace(c.standby_db.db, streaming=None))
        v = d.update(replace(c, standby_db=blind))
    assert v.status == SUSPECT and v.standby_sees_primary is None
    assert "the standby cannot tell" in v.reason


def test_a_cycle_fired_a_millisecond_early_still_decides_at_the_threshold() -> None:
    d = make(threshold=3, interval=1)
    ats = [0.0, 0.999, 1.999, 2.999]  # the scheduler runs slightly ahead of the clock
    statuses = [d.update(cycle(t, primary_ok=False)).status for t in ats]
    assert statuses == [SUSPECT, SUSPECT, SUSPECT, DOWN]
    d = make(threshold=3, interval=1)
    statuses = [d.update(cycle(t, primary_ok=False)).status for t in (0.0, 1.0, 2.0, 2.9)]
    assert statuses[-1] == SUSPECT  # 100 ms short is still short


# --------------------------------------------------------------------------- issue 13: early start


def lost(c: Cycle, at: float) -> Cycle:
    """The same cycle, woken by a closed connection to the primary noticed at ``at``."""
    return replace(c, primary_lost_at=at)


def test_a_noticed_connection_loss_starts_the_outage_clock() -> None:
    # Healthy at t=0 and t=1; the connection closes at 1.30, noticed then, and the woken
    # cycle runs at 1.31: the outage is timed from 1.30, not from the woken cycle.
    d = make(threshold=3)
    for t in (0.0, 1.0):
        assert d.update(cycle(t, primary_ok=True)).status == HEALTHY
    v = d.update(lost(cycle(1.31, primary_ok=False), 1.30))
    assert v.status == SUSPECT and v.outage_seconds == pytest.approx(0.01)
    for t in (2.31, 3.31):
        assert d.update(cycle(t, primary_ok=False)).status == SUSPECT
    v = d.update(cycle(4.31, primary_ok=False))
    assert v.status == DOWN and v.outage_seconds == pytest.approx(3.01)


def test_an_early_start_never_skips_the_standbys_agreement_or_the_majority() -> None:
    for streaming, witnesses in ((True, ()), (False, (True, True))):
        d = make(threshold=3)
        d.update(cycle(0, primary_ok=True))
        d.update(lost(cycle(0.5, False, streaming, witnesses=witnesses), 0.49))
        for t in (1.5, 2.5, 3.5, 4.5, 5.5, 6.5):
            v = d.update(
                cycle(t, primary_ok=False, standby_streaming=streaming, witnesses=witnesses)
            )
            assert v.status == SUSPECT
        assert v.outage_seconds == pytest.approx(6.01)
        if streaming:
            assert v.partition
        else:
            assert (v.votes_down, v.votes_total) == (2, 4)


def test_an_early_start_never_predates_the_previous_cycle() -> None:
    # A stale notice (older than the last cycle that saw the primary answer) cannot
    # backdate the outage: the clock starts at that previous cycle at the earliest.
    d = make(threshold=3)
    d.update(cycle(0, primary_ok=True))
    d.update(cycle(1, primary_ok=True))
    v = d.update(lost(cycle(1.2, primary_ok=False), -100.0))
    assert v.outage_seconds == pytest.approx(0.2)
    for t in (2.2, 3.2, 3.9):
        assert d.update(cycle(t, primary_ok=False)).status == SUSPECT
    assert d.update(cycle(4.0, primary_ok=False)).status == DOWN
    # Nor does a notice "from the future" start it after the cycle that saw it fail.
    d = make(threshold=3)
    v = d.update(lost(cycle(5.0, primary_ok=False), 7.0))
    assert v.outage_seconds == 0.0


def test_an_early_start_without_a_previous_cycle_goes_back_one_interval_at_most() -> None:
    # The first cycle (and the first after reset(), as after a failover) has no previous
    # cycle to bound a stale notice: it is bounded by one interval before this cycle.
    d = make(threshold=3)
    v = d.update(lost(cycle(10.0, primary_ok=False), -100.0))
    assert v.status == SUSPECT and v.outage_seconds == pytest.approx(1.0)
    for t in (11.0, 11.9):
        assert d.update(cycle(t, primary_ok=False)).status == SUSPECT
    assert d.update(cycle(12.0, primary_ok=False)).status == DOWN  # 3 s since 9.0
    d.reset()
    v = d.update(lost(cycle(20.0, primary_ok=False), 19.6))  # within the interval: kept
    assert v.outage_seconds == pytest.approx(0.4)


def test_a_loss_the_cycle_does_not_confirm_is_ignored() -> None:
    # The woken cycle finds the primary answering (a reconnect worked): no outage begins,
    # and a failure seen later is timed from its own cycle, not from the old notice.
    d = make(threshold=3)
    d.update(cycle(0, primary_ok=True))
    v = d.update(lost(cycle(0.5, primary_ok=True), 0.49))
    assert v.status == HEALTHY and v.outage_seconds == 0
    for t in (1.5, 2.5, 3.5, 4.4):
        assert d.update(cycle(t, primary_ok=t < 1.5)).status == SUSPECT
    assert d.update(cycle(4.5, primary_ok=False)).status == DOWN


def test_an_early_start_keeps_the_recovery_hysteresis() -> None:
    # One good cycle after the loss does not end the outage that began at the notice; a
    # primary answering in this cycle is never down.
    d = make(threshold=3, n=2)
    d.update(cycle(0, primary_ok=True))
    d.update(lost(cycle(0.5, primary_ok=False), 0.45))
    v = d.update(cycle(1.5, primary_ok=True))
    assert v.status == SUSPECT and v.outage_seconds == pytest.approx(1.05)
    v = d.update(cycle(2.5, primary_ok=False))
    assert v.status == SUSPECT and v.outage_seconds == pytest.approx(2.05)
    v = d.update(cycle(3.45, primary_ok=False))
    assert v.status == DOWN and v.outage_seconds == pytest.approx(3.0)
