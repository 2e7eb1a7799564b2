"""Watchers vouching for the guard, under a hypothesis state machine: three watchers see
the primary healthy, suspect, down or stall, in any order; their views reach the store
or not; their journal reads come or not; they restart; the guard asks them at every
moment something happens; a failover starts at a drawn time; the leader reads the
views when it likes, and time moves. The safety property of watchdogd/fleet.py's
``Vouching`` and ``vouch_end``:

- every bound the leader computes after the failover started lies at or after every
  sign of life the guard took from the watchers (a time at or after which a strict
  majority each vouched), before or after that read. So a guard
  whose last sign of life came from the watchers has fenced by the bound plus its
  isolation timeout, which is what the leader waits for.
"""

from __future__ import annotations

import itertools

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from watchdogd.detector import DOWN, HEALTHY, STALE, SUSPECT, Status
from watchdogd.fleet import Freshness, View, Vouching, vouch_end

VOTERS = ("dc1", "dc2", "dc3")
MAX_AGE = 3.0  # the leader's freshness window
STALE_AFTER = 2.5  # a watcher's last cycle older than this vouches for nothing
CYCLE_VERDICTS = [HEALTHY, HEALTHY, DOWN, SUSPECT]  # a fleet's cycle: mostly healthy


class VouchingMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.watchers = {name: Vouching(0.0, STALE_AFTER) for name in VOTERS}
        # A watcher's view the store took, awaiting the journal read of the same cycle:
        # whether it said the primary is not down.
        self.pending: dict[str, bool] = {}
        self.ballots: dict[str, tuple[int, View]] = {}
        self.revisions = itertools.count(1)
        self.failover_at: float | None = None
        self.due = 0.0
        self.freshness = Freshness(MAX_AGE)
        self.last_read: float | None = None
        self.seen: dict[str, tuple[int, float]] = {}
        self.majority_rounds: list[float] = []  # the guard's signs of life from vouches
        self.last_yes: dict[str, float] = {}
        self.bounds: list[float] = []

    @initialize(due=st.floats(1.0, 30.0))
    def failover_due(self, due: float) -> None:
        """When the failover starts: journaled (followers' reads see it from then on),
        then the fence order. Drawn up front, so that it comes after some history."""
        self.due = due

    def _advance(self, dt: float) -> None:
        self.now += dt
        if self.failover_at is None and self.now >= self.due:
            self.failover_at = self.now

    @rule(dt=st.floats(0.01, 1.0))
    def time_passes(self, dt: float) -> None:
        self._advance(dt)

    @rule(
        name=st.sampled_from(VOTERS),
        status=st.sampled_from([HEALTHY, HEALTHY, SUSPECT, DOWN, STALE]),
        stored=st.booleans(),
    )
    def probe_cycle(self, name: str, status: Status, stored: bool) -> None:
        """A cycle: its verdict, its view built, published (the store took it or not)."""
        self._cycle(name, status, stored)

    @rule(
        statuses=st.lists(
            st.sampled_from([HEALTHY, HEALTHY, DOWN, SUSPECT]), min_size=3, max_size=3
        ),
        stored=st.lists(st.booleans(), min_size=3, max_size=3),
        read=st.lists(st.booleans(), min_size=3, max_size=3),
        dt=st.floats(0.5, 1.0),
        leader_reads=st.booleans(),
    )
    def fleet_cycle(
        self,
        statuses: list[Status],
        stored: list[bool],
        read: list[bool],
        dt: float,
        leader_reads: bool,
    ) -> None:
        """Every watcher's cycle of one probe interval, with its journal read (or not),
        then the leader's read (or not)."""
        self._advance(dt)
        for name, status, took, reads in zip(VOTERS, statuses, stored, read, strict=True):
            self._cycle(name, status, took)
            self.guard_asks()  # between the publish and the read
            if reads:
                self.journal_read(name)
        if leader_reads:
            self.leader_reads()

    def _cycle(self, name: str, status: Status, stored: bool) -> None:
        watcher = self.watchers[name]
        watcher.cycle(self.now, status, "main")
        self.pending.pop(name, None)  # an earlier cycle's read never came
        if not stored:
            return
        view = View(
            instance=name,
            seq=0,
            primary="main",
            primary_down=status == DOWN,
            primary_writable=None,
            outage=0.0,
            standby_ok=None,
            config="x",
            vouch_age=watcher.age(self.now),
        )
        self.ballots[name] = (next(self.revisions), view)
        self.pending[name] = not view.primary_down

    @rule(name=st.sampled_from(VOTERS))
    def journal_read(self, name: str) -> None:
        """The same cycle's read of the journal, after its view was stored."""
        if name in self.pending:
            self.watchers[name].confirm(self.pending.pop(name), self.failover_at is not None)

    @rule(name=st.sampled_from(VOTERS))
    def restart(self, name: str) -> None:
        self.watchers[name] = Vouching(self.now, STALE_AFTER)
        self.pending.pop(name, None)

    @rule()
    def guard_asks(self) -> None:
        """One round of the guard (``Guard._ask_watchers``): each yes dated now; its sign
        of life is the second latest of the watchers' last yeses."""
        for name in VOTERS:
            if self.watchers[name].ask("main", self.now)[0]:
                self.last_yes[name] = self.now
        latest = sorted(self.last_yes.values(), reverse=True)
        if len(latest) >= 2:
            self.majority_rounds.append(latest[1])

    @rule()
    def leader_reads(self) -> None:
        """One linearizable read of every ballot, as ``Fleet._count`` does it."""
        now, since = self.now, self.last_read
        if since is None or now - since > MAX_AGE:
            self.freshness = Freshness(MAX_AGE)
            since = now
        self.last_read = now
        for name, (revision, _) in self.ballots.items():
            self.freshness.saw(name, revision, since)
            if name not in self.seen or self.seen[name][0] != revision:
                self.seen[name] = (revision, now)
        if self.failover_at is None:
            return  # the leader bounds the vouches only with views read after its order
        views = {name: view for name, (_, view) in self.ballots.items()}
        seen_at = {name: at for name, (_, at) in self.seen.items()}
        end, _ = vouch_end(views, seen_at, self.freshness, VOTERS, 2, now, "main")
        if end is not None:
            self.bounds.append(end)

    @invariant()
    def guard_polls(self) -> None:
        """The guard asks every poll: at every moment something happened, too."""
        self.guard_asks()

    @invariant()
    def no_majority_vouched_after_a_bound(self) -> None:
        if self.bounds and self.majority_rounds:
            bound, latest = min(self.bounds), max(self.majority_rounds)
            assert latest <= bound + 1e-9, (
                f"a majority vouched at {latest:.3f}, after the leader's bound {bound:.3f}"
            )


VouchingMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=60, deadline=None
)
test_vouching = VouchingMachine.TestCase

# Checked by hand (the test fails each time): a DOWN verdict that does not revoke, the
# earliest silence taken as the bound, and a journal read that ignores a failover.
