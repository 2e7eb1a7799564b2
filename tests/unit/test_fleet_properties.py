"""The fleet's vote under a hypothesis state machine: watchers publish, go silent, are
cut off from the store (each on its own), publish junk or another config; the leader
reads when it can, changes, and the virtual clock moves. After every read of the
leader, the tally (watchdogd/fleet.py over watchdogd/state/votes.py's MemoryVoteBox)
must agree with a model kept from the ground truth:

- a failover is allowed only when a strict majority of the configured voters last
  published a DOWN view, with our config, whose revision this leader saw appear (not
  on its first sighting of that voter) within ``max_age``; and each such publish came
  after the leader's previous successful read (no old view passes for a new one);
- any fresh voter saying the primary is up and writable blocks; so does a fresh
  voter with another config;
- silence never counts as down: a voter whose view expired, is junk, or was never
  published is neither fresh nor down; instances that are not voters never count.
"""

from __future__ import annotations

from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from hypothesis import currently_in_test_context, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from watchdogd.fleet import Freshness, Tally, View, tally
from watchdogd.state.store import StoreUnavailable, VirtualClock
from watchdogd.state.votes import MemoryVoteBox

T = TypeVar("T")

MAX_AGE = 3.0
TTL = 5.0
OURS = "0123456789ab"
THEIRS = "ba9876543210"
PRIMARY = "main"
OUTSIDER = "dc9"  # publishes like any watcher, is no voter


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Drive a coroutine that never waits (the memory box) to its end."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise AssertionError("the memory vote box waited on something")


def note(what: str) -> None:
    """Count it in hypothesis' statistics (--hypothesis-show-statistics)."""
    if currently_in_test_context():
        event(what)


@dataclass
class Published:
    at: float
    revision: int
    view: View | None  # None: junk


class Votes(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = VirtualClock(1000.0)
        self.board = MemoryVoteBox(self.clock, TTL)
        self.revision = 0  # the board's revision, as the model counts it
        self.voters: tuple[str, ...] = ()
        self.boxes: dict[str, MemoryVoteBox] = {}
        self.seq: dict[str, int] = {}
        self.last: dict[str, Published] = {}  # each watcher's last successful publish
        self.leader_box = MemoryVoteBox(self.clock, TTL, shared_with=self.board)
        self.new_leader()
        self.tallies = 0
        self.allowed = 0

    @initialize(n=st.integers(1, 5))
    def configure(self, n: int) -> None:
        self.voters = tuple(f"dc{i}" for i in range(1, n + 1))
        for name in (*self.voters, OUTSIDER):
            self.boxes[name] = MemoryVoteBox(self.clock, TTL, shared_with=self.board)
            self.seq[name] = 0

    def new_leader(self) -> None:
        self.freshness = Freshness(MAX_AGE)
        # The model of what this leader saw, per instance: the last revision, the read
        # time it first appeared (None: the first revision seen, a baseline) and the
        # time of the successful read before that one.
        self.seen: dict[str, tuple[int, float | None, float | None]] = {}
        self.reads: list[float] = []

    # ------------------------------------------------------------------ watchers

    watcher = st.integers(0, 5)  # an index into the configured voters and the outsider

    def name_of(self, index: int) -> str:
        names = (*self.voters, OUTSIDER)
        return names[index % len(names)]

    def _publish(self, name: str, data: dict[str, Any], parsed: View | None) -> None:
        box = self.boxes[name]
        if box.unavailable:
            try:
                run(box.publish(name, data))
            except StoreUnavailable:
                return
            raise AssertionError("a cut-off box published")
        run(box.publish(name, data))
        self.revision += 1
        self.last[name] = Published(self.clock(), self.revision, parsed)

    @rule(
        index=watcher,
        down=st.booleans(),
        writable=st.sampled_from([None, False, True]),
        other_config=st.sampled_from([False, False, False, True]),
        other_primary=st.sampled_from([False, False, False, True]),
        outage=st.floats(0, 1e6),
    )
    def publish(
        self,
        index: int,
        down: bool,
        writable: bool | None,
        other_config: bool,
        other_primary: bool,
        outage: float,
    ) -> None:
        self.view_of(self.name_of(index), down, writable, other_config, other_primary, outage)

    def view_of(
        self,
        name: str,
        down: bool,
        writable: bool | None,
        other_config: bool = False,
        other_primary: bool = False,
        outage: float = 10.0,
    ) -> None:
        self.seq[name] += 1
        v = View(
            instance=name,
            seq=self.seq[name],
            primary="standby" if other_primary else PRIMARY,
            primary_down=down,
            primary_writable=writable,
            outage=outage if down else 0.0,
            standby_ok=True,
            config=THEIRS if other_config else OURS,
        )
        self._publish(name, v.encode(), v)

    @rule(
        world=st.sampled_from(["down", "down", "down", "up", "unknown"]),
        dissent=st.sets(st.integers(0, 5), max_size=2),
    )
    def probe_cycle(self, world: str, dissent: set[int]) -> None:
        """Every watcher that can reach the store publishes what it sees: the world as
        it is, except the dissenters, who see the primary up and writable (their site
        still reaches it)."""
        dissenters = {self.name_of(i) for i in dissent}
        for name in self.boxes:
            if name in dissenters or world == "up":
                self.view_of(name, down=False, writable=True)
            elif world == "down":
                self.view_of(name, down=True, writable=False)
            else:
                self.view_of(name, down=False, writable=None)

    @rule(
        index=watcher,
        junk=st.sampled_from(
            [
                {"instance": "x", "seq": "1"},
                {},
                {"primary_down": True},
                {"instance": "dc1", "seq": 1, "primary": "main", "primary_down": "yes",
                 "primary_writable": None, "outage": 1.0, "standby_ok": None,
                 "config": OURS},
                # A well-formed DOWN view filed under another watcher's name.
                View("impostor", 1, PRIMARY, True, False, 99.0, True, OURS).encode(),
            ]
        ),
    )  # fmt: skip
    def publish_junk(self, index: int, junk: dict[str, Any]) -> None:
        name = self.name_of(index)
        self._publish(name, junk, None)

    @rule(index=watcher, cut=st.booleans())
    def partition(self, index: int, cut: bool) -> None:
        self.boxes[self.name_of(index)].unavailable = cut

    @rule(seconds=st.sampled_from([0.0, 0.5, 1.0]) | st.floats(0, 4.0))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    # ------------------------------------------------------------------ leader

    @rule(cut=st.booleans())
    def leader_partition(self, cut: bool) -> None:
        self.leader_box.unavailable = cut

    @rule()
    def leader_changes(self) -> None:
        self.new_leader()

    @rule()
    def read(self) -> None:
        now = self.clock()
        try:
            ballots = run(self.leader_box.ballots())
        except StoreUnavailable:
            assert self.leader_box.unavailable
            return
        assert not self.leader_box.unavailable
        previous_read = self.reads[-1] if self.reads else None
        self.reads.append(now)

        # The ground truth: a ballot is the last publish of its instance, unless expired.
        alive = {n: p for n, p in self.last.items() if now < p.at + TTL}
        assert {n: b.revision for n, b in ballots.items()} == {
            n: p.revision for n, p in alive.items()
        }

        views: dict[str, View] = {}
        for name, ballot in ballots.items():
            self.freshness.saw(name, ballot.revision, now)
            known = self.seen.get(name)
            if known is None:
                self.seen[name] = (ballot.revision, None, previous_read)  # a baseline
            elif known[0] != ballot.revision:
                self.seen[name] = (ballot.revision, now, previous_read)
            try:
                views[name] = View.decode(ballot.data)
            except ValueError as exc:
                assert alive[name].view is None, exc
                assert "\n" not in str(exc)
        result = tally(views, self.freshness, self.voters, OURS, now, primary=PRIMARY)
        self.check(result, views, alive, now)

    def model_fresh(self, name: str, now: float) -> bool:
        known = self.seen.get(name)
        return known is not None and known[1] is not None and now - known[1] <= MAX_AGE

    def check(
        self,
        result: Tally,
        views: dict[str, View],
        alive: dict[str, Published],
        now: float,
    ) -> None:
        self.tallies += 1
        fresh = tuple(
            n
            for n in self.voters
            if n in views and views[n].instance == n and self.model_fresh(n, now)
        )
        assert result.fresh == fresh
        assert result.needed == len(self.voters) // 2 + 1 and result.voters == self.voters
        assert OUTSIDER not in (*result.fresh, *result.down, *result.vetoes)
        assert set(result.down) <= set(result.fresh)
        for name in result.down:  # silence, junk, expiry never count as down
            v = alive[name].view
            assert v is not None and v.primary_down and v.primary == PRIMARY

        writable_up = [n for n in fresh if not views[n].primary_down and views[n].primary_writable]
        mismatched = [n for n in fresh if views[n].config != OURS]
        refusal = result.refusal()
        if writable_up or mismatched:
            assert refusal is not None
        if refusal is not None:
            assert "\n" not in refusal
            note("refused")
            return
        note("allowed")

        # Allowed: prove it from the ground truth, voter by voter.
        self.allowed += 1
        assert not writable_up and not mismatched
        assert len(set(result.down)) >= len(self.voters) // 2 + 1
        for name in result.down:
            published = alive[name]
            assert published.view is not None and published.view.config == OURS
            revision, first_seen, read_before = self.seen[name]
            assert revision == published.revision
            assert first_seen is not None and now - first_seen <= MAX_AGE
            # It was published after the read before the one that first showed it: no
            # old view passes for a new one, whatever its seq or outage say.
            assert read_before is not None and published.at >= read_before
            assert published.at <= now

    @invariant()
    def ages_are_the_leaders_own(self) -> None:
        now = self.clock()
        for name, (_, first_seen, _) in self.seen.items():
            age = self.freshness.age(name, now)
            if first_seen is None:
                assert age is None
            else:
                assert age == max(0.0, now - first_seen)


Votes.TestCase.settings = settings(max_examples=200, stateful_step_count=60, deadline=None)
TestVotes = Votes.TestCase


def test_the_machine_reaches_allowed_failovers() -> None:
    """The state machine is only worth something if it explores allowed failovers too:
    a fixed run where three voters see the primary down, seen changing by the leader."""
    machine = Votes()
    machine.configure(3)
    machine.probe_cycle("down", set())
    machine.read()  # baselines
    machine.advance(1.0)
    for index in (0, 1):
        machine.publish(index, True, False, False, False, 11.0)
    machine.read()
    assert machine.allowed == 1
    # Silence: 3.5 s later nothing has changed, nothing is fresh.
    machine.advance(3.5)
    machine.read()
    assert machine.allowed == 1 and machine.tallies == 3
    machine.teardown()
