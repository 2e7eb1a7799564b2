"""Leadership, the journal and resume as a fleet of watchers sees them, on the in-memory
store (watchdogd/state/store.py ``MemoryStore``) and a virtual clock: a hypothesis
state machine.

Three watchers campaign, renew, resign, crash and run failovers through the daemon's
real ``Runner`` (watchdogd/failover/runner.py), whose journal records go to the store
guarded by the watcher's token; a new leader reads the journal afresh, replays it and
resumes an unfinished failover with the daemon's own rule (``policy.can_resume``, then
``Runner(resume=...)``, as ``Sequences.resume`` does). Meanwhile the clock runs, the
store becomes unavailable and comes back, and replies get lost after the commit.

Each watcher keeps its own belief: its token and its authority deadline, the send time
of its last acknowledged renewal (or campaign) plus the ttl minus a margin. A watcher
acts (starts a step, journals) only before its deadline; a step still running at the
deadline is cancelled (the daemon kills its process group). The steps are test actions
that count their runs: the effects the world would see.

What is checked, after every rule:
- at most one watcher has authority, and its deadline is within the store's lease of
  its token (so no watcher ever acts while another could hold a token);
- tokens only grow from one leader to the next; an append lands only with the store's
  current token (a stale token never writes), and is ``TokenLost`` only when the store
  is up and the token is really not the current one: an unavailable store never makes a
  watcher give up a token, nor is a watcher with authority ever told it lost;
- every acknowledged append is in ``entries()`` exactly once, in order (with the
  ambiguous ones, which the memory store lands), and ``replay`` gives the state the
  model folds from them;
- at most one step runs anywhere at a time; a step recorded done is never run again; a
  non-idempotent step never runs twice; a resumed failover re-runs a step left
  started-but-not-done only when it is idempotent, and otherwise ends ``failed`` (a
  human checks) without running anything more; a step recorded ``ok`` really ran to
  success; no failover is finished twice.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from hypothesis import event as hypothesis_event
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from tests.support import store_contract as contract
from watchdogd import config, policy
from watchdogd.actions import ActionError, StepContext
from watchdogd.core.model import FailoverConfig, StepConfig
from watchdogd.failover.runner import Runner
from watchdogd.policy import Plan, build_plan
from watchdogd.state import journal as records
from watchdogd.state.journal import FailoverRecord, JournalState
from watchdogd.state.store import (
    Entry,
    MemoryStore,
    StoreUnavailable,
    Token,
    TokenLost,
    VirtualClock,
    replay,
)

T = TypeVar("T")

TTL = 10.0
MARGIN = 1.0
NAMES = ("dc1", "dc2", "dc3")
MAX_FAILOVERS = 3
# Around the ttl and the margin: the edges are where fencing breaks.
ADVANCES = [0.5, 1.0, 3.0, TTL - MARGIN, TTL - 0.5, TTL, TTL + 1.0]

CONFIG = config.parse(
    {
        "cluster": "orders",
        "primary": {
            "name": "main",
            "database": {"engine": "postgres", "dsn": "postgresql://u@127.0.0.1:1/x"},
        },
        "standby": {
            "name": "failover",
            "database": {"engine": "postgres", "dsn": "postgresql://u@127.0.0.1:2/x"},
        },
        "failover": {"steps": [{"name": "x", "action": "command", "argv": ["true"]}]},
        "state_dir": "/nonexistent/watchdogd-properties",
    }
)


def at_once(call: Coroutine[Any, Any, T]) -> T:
    """Run a memory store call (it never suspends) from sync code, even inside a task: the
    runner journals through a synchronous callback."""
    try:
        call.send(None)
    except StopIteration as done:
        result: T = done.value
        return result
    call.close()
    raise AssertionError("a memory store call suspended")


def event(what: str) -> None:
    """Count what a run reached (``--hypothesis-show-statistics``); nothing outside one."""
    if currently_in_test_context():
        hypothesis_event(what)


class AuthorityEnded(Exception):
    """A watcher was asked to journal after its deadline: it refuses (never happens while
    the deadline cancels its runner; checked)."""


@dataclass(eq=False)
class Watcher:
    name: str
    token: Token | None = None
    deadline: float = float("-inf")
    task: asyncio.Task[str] | None = None
    waiting: asyncio.Future[bool] | None = None  # the step in flight awaits its result
    inflight: tuple[str, str] | None = None  # (failover id, step)
    ambiguous_sent: float | None = None  # a campaign whose reply was lost


@dataclass(eq=False)
class CountingStep:
    """A step action: counts its starts and successes (the world's view of its effect),
    checks it may run at all, then waits for the machine to say how it ends."""

    machine: Fleet
    watcher: Watcher
    name: str
    idempotent: bool

    async def run(self, ctx: StepContext, timeout: float) -> str:
        m, w = self.machine, self.watcher
        key = (ctx.failover_id, self.name)
        # The runner turns an exception of a step into a failed step: what is wrong is
        # kept for the invariant ``no_step_ran_wrongly`` to report.
        others = [o.name for o in m.watchers if o is not w and o.inflight is not None]
        m.starts[key] += 1
        m.started_log.append(key)
        for wrong, why in (
            (not m.authority(w), f"{w.name} runs step {key} without authority"),
            (key in m.recorded_ok(), f"step {key} recorded done, run again by {w.name}"),
            (bool(others), f"{w.name} starts {key} while {others} run a step"),
            (not self.idempotent and m.starts[key] > 1, f"non-idempotent step {key} run twice"),
        ):
            if wrong:
                m.wrong.append(why)
        if self.idempotent and m.starts[key] > 1:
            event("an idempotent step re-run")
        waiting: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        w.waiting, w.inflight = waiting, key
        try:
            ok = await waiting
        finally:
            w.waiting, w.inflight = None, None
        if not ok:
            raise ActionError(f"{self.name} failed (drawn)")
        m.succeeded[key] += 1
        return "done"

    def describe(self, ctx: StepContext) -> dict[str, Any]:
        return {"step": self.name}


@dataclass
class Expectation:
    """What the daemon's resume rule says a resumed failover does first."""

    fails_at_once: bool  # an interrupted non-idempotent required step: failed, nothing run
    first: str | None  # else the first step to run (None: nothing left, or unknown)


def expected_resume(plan: Plan, fo: FailoverRecord) -> Expectation:
    settled = {"ok", "skipped", "failed", "interrupted"}
    for step in plan.steps:
        prior = next((s for s in fo.steps if s.name == step.name), None)
        if prior is not None and prior.outcome in settled:
            if step.required and prior.outcome in ("failed", "interrupted"):
                return Expectation(True, None)
            continue
        if prior is not None and prior.started_at is not None and prior.outcome is None:
            if not step.idempotent:
                if step.required:
                    return Expectation(True, None)
                continue  # closed as interrupted, the next step runs
        return Expectation(False, step.name)
    return Expectation(False, None)


class Fleet(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.clock = VirtualClock()
        self.store = MemoryStore(self.clock)
        self.watchers = [Watcher(n) for n in NAMES]
        self.failover = FailoverConfig()
        self.max_token = 0  # the largest token the store ever issued
        # The model: what the store must hold (acknowledged appends, and the ambiguous
        # ones, which the memory store lands), and each acknowledged position.
        self.journal: list[dict[str, Any]] = []
        self.acked: dict[int, dict[str, Any]] = {}
        self.starts: Counter[tuple[str, str]] = Counter()
        self.succeeded: Counter[tuple[str, str]] = Counter()
        self.started_log: list[tuple[str, str]] = []
        self.failovers_begun = 0
        self.wrong: list[str] = []  # what a step found wrong when it was started

    # ----------------------------------------------------------------- helpers

    def authority(self, w: Watcher) -> bool:
        return w.token is not None and self.clock() < w.deadline

    def peek(self) -> list[Entry]:
        """The store's entries as they are (the faults put aside)."""
        unavailable, self.store.unavailable = self.store.unavailable, False
        try:
            return at_once(self.store.entries())
        finally:
            self.store.unavailable = unavailable

    def recorded_ok(self) -> set[tuple[str, str]]:
        return {
            (r["id"], r["step"])
            for _, r in self.peek()
            if r["type"] == "step_finished" and r["outcome"] == "ok"
        }

    def note_issued(self) -> None:
        held = self.store.held()
        if held is not None:
            assert held[0].revision >= self.max_token
            self.max_token = held[0].revision

    def lost(self, w: Watcher) -> None:
        """The store refused ``w``'s token: confirm it is really not the current one, then
        stop at once."""
        assert not self.store.unavailable, "TokenLost while the store is unavailable"
        assert not self.authority(w), f"{w.name} told it lost while it has authority"
        held = self.store.held()
        assert held is None or held[0] != w.token, "TokenLost for the current token"
        event("a token lost")
        w.token, w.deadline = None, float("-inf")
        self.stop(w)

    def stop(self, w: Watcher) -> None:
        """Cancel ``w``'s runner (the step in flight loses its process group)."""
        if w.task is not None:
            w.task.cancel()
            self.settle()
            w.task = None

    def settle(self) -> None:
        """Let the runners go until each waits for its step or ended."""

        async def idle() -> None:
            for _ in range(50):
                await asyncio.sleep(0)

        self.loop.run_until_complete(idle())
        for w in self.watchers:
            if w.task is not None and w.task.done():
                self.finished(w)

    def finished(self, w: Watcher) -> None:
        task, w.task = w.task, None
        assert task is not None
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            event(f"failover {task.result()}")
            return
        if isinstance(exc, TokenLost):
            self.lost(w)
        elif isinstance(exc, StoreUnavailable):
            assert self.store.unavailable or exc.maybe_applied  # keeps its token
        else:
            raise exc  # an assertion of a step, or a bug

    def record_for(self, w: Watcher) -> Any:
        async def record(rec: dict[str, Any]) -> None:
            if not self.authority(w):
                raise AuthorityEnded(f"{w.name} journals after its deadline")
            assert w.token is not None
            self.append(w, w.token, rec)

        return record

    def append(self, w: Watcher, token: Token, rec: dict[str, Any]) -> None:
        try:
            position = at_once(self.store.append(token, rec))
        except StoreUnavailable as exc:
            if exc.maybe_applied:
                event("an append's reply lost")
                self.journal.append(rec)
            else:
                assert self.store.unavailable
            raise
        except TokenLost:
            assert not self.authority(w)
            raise
        held = self.store.held()
        assert held is not None and held[0] == token, "an append landed with a stale token"
        assert token.revision == self.max_token, "an append landed with an older token"
        assert position not in self.acked and all(position > p for p in self.acked)
        self.journal.append(rec)
        self.acked[position] = rec

    # ----------------------------------------------------------------- rules

    @initialize(
        steps=st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=4),
    )
    def plan_steps(self, steps: list[tuple[bool, bool]]) -> None:
        """The failover's steps: (idempotent, required) each."""
        self.failover = FailoverConfig(
            steps=tuple(
                StepConfig(name=f"s{i}", action="command", retries=0, idempotent=idem, required=req)
                for i, (idem, req) in enumerate(steps)
            )
        )

    @rule(i=st.sampled_from(range(len(NAMES))))
    def campaign(self, i: int) -> None:
        w = self.watchers[i]
        if w.token is not None:
            return  # a leader does not campaign
        sent = self.clock()
        try:
            token = at_once(self.store.campaign(w.name, TTL))
        except StoreUnavailable as exc:
            if exc.maybe_applied:
                self.note_issued()  # a key on a lease nobody renews: it blocks until expiry
                w.ambiguous_sent = sent
            else:
                assert self.store.unavailable
            return
        if token is None:
            assert self.store.held() is not None
            return
        assert token.revision > self.max_token, "tokens must grow from leader to leader"
        self.max_token = token.revision
        w.token, w.deadline = token, sent + TTL - MARGIN

    @rule(i=st.sampled_from(range(len(NAMES))))
    def renew(self, i: int) -> None:
        w = self.watchers[i]
        if w.token is None:
            return
        sent = self.clock()
        try:
            at_once(self.store.renew(w.token))
        except StoreUnavailable:
            assert self.store.unavailable  # never a reason to give up the token
            return
        except TokenLost:
            self.lost(w)
            return
        w.deadline = sent + TTL - MARGIN

    @rule(i=st.sampled_from(range(len(NAMES))))
    def resign(self, i: int) -> None:
        w = self.watchers[i]
        if w.token is None or w.task is not None:
            return
        try:
            at_once(self.store.resign(w.token))
        except StoreUnavailable:
            assert self.store.unavailable
            return
        w.token, w.deadline = None, float("-inf")

    @rule(i=st.sampled_from(range(len(NAMES))))
    def crash(self, i: int) -> None:
        """The watcher's process dies: its step in flight with it, and its memory."""
        w = self.watchers[i]
        self.stop(w)
        w.token, w.deadline, w.ambiguous_sent = None, float("-inf"), None

    @rule(seconds=st.sampled_from(ADVANCES))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        for w in self.watchers:
            if w.task is not None and not self.authority(w):
                self.stop(w)  # cancelled at its deadline

    @rule()
    def blink(self) -> None:
        self.store.unavailable = not self.store.unavailable

    @precondition(lambda self: self.store.ambiguous_appends < 2)
    @rule()
    def lose_an_append_reply(self) -> None:
        self.store.ambiguous_appends += 1

    @precondition(lambda self: self.store.ambiguous_campaigns < 1)
    @rule()
    def lose_a_campaign_reply(self) -> None:
        self.store.ambiguous_campaigns += 1

    @rule(i=st.sampled_from(range(len(NAMES))), paused=st.booleans())
    def append_with_any_token(self, i: int, paused: bool) -> None:
        """A watcher writes with whatever token it believes it has, authority or not (an
        old leader waking up): it lands only with the current token."""
        w = self.watchers[i]
        if w.token is None or w.task is not None:
            return
        rec = (
            records.pause(reason=f"{w.name}", by=w.name, at=self.clock())
            if paused
            else records.resume(by=w.name, at=self.clock())
        )
        with contextlib.suppress(StoreUnavailable):
            try:
                self.append(w, w.token, rec)
            except TokenLost:
                self.lost(w)

    @rule(i=st.sampled_from(range(len(NAMES))))
    def act(self, i: int) -> None:
        """A watcher with authority reads the journal afresh: it resumes an unfinished
        failover (the daemon's rule), or starts a new one."""
        w = self.watchers[i]
        if not self.authority(w) or w.task is not None:
            return
        try:
            entries = at_once(self.store.entries())
        except StoreUnavailable:
            assert self.store.unavailable
            return
        state = JournalState()
        for _, rec in entries:
            records.apply(state, rec)
        fo = state.unfinished
        expectation: Expectation | None = None
        if fo is not None:
            plan = build_plan(
                self.failover,
                id=fo.id,
                kind=fo.kind,
                trigger=fo.trigger,
                reason=fo.reason,
                from_node=fo.from_node,
                to_node=fo.to_node,
                forced=fo.forced,
            )
            assert policy.can_resume(plan, fo)  # the config never changes here
            expectation = expected_resume(plan, fo)
        else:
            if self.failovers_begun >= MAX_FAILOVERS:
                return
            self.failovers_begun += 1
            plan = build_plan(
                self.failover,
                id=f"F{self.failovers_begun}-{w.name}",
                kind="failover",
                trigger="automatic",
                reason="primary down",
                from_node="main",
                to_node="failover",
            )
        ctx = StepContext(
            config=CONFIG,
            primary=CONFIG.primary,
            standby=CONFIG.standby,
            engines={},
            failover_id=plan.id,
            reason=plan.reason,
            trigger=plan.trigger,
        )
        steps = {s.name: CountingStep(self, w, s.name, bool(s.idempotent)) for s in plan.steps}
        runner = Runner(
            plan, ctx, steps, self.record_for(w), lambda *a, **k: None,
            resume=fo, wall=self.clock,
        )  # fmt: skip
        try:
            self.loop.run_until_complete(runner.begin())  # journaled before anything runs
        except StoreUnavailable:
            return
        except TokenLost:
            self.lost(w)
            return
        before = len(self.started_log)
        w.task = self.loop.create_task(runner.run())
        self.settle()
        if expectation is None:
            return
        started = self.started_log[before:]
        event(f"resume: {'fails at once' if expectation.fails_at_once else 'runs on'}")
        if expectation.fails_at_once:
            assert started == [], f"resumed {plan.id} ran {started} past an interrupted step"
            if w.task is None and fo is not None:
                state = contract.folded([r for _, r in self.peek()])
                done = next(f for f in state.failovers if f.id == fo.id)
                # Unless the store refused the closing records (then it stays unfinished).
                assert done.outcome in ("failed", None), done.outcome
        elif started and expectation.first is not None:
            assert started[0] == (plan.id, expectation.first)

    @rule(i=st.sampled_from(range(len(NAMES))), ok=st.booleans())
    def live(self, i: int, ok: bool) -> None:
        """A watcher's ordinary life, one move: campaign without a token, renew near its
        deadline, end the step it runs, or act."""
        w = self.watchers[i]
        if w.token is None:
            self.campaign(i)
        elif not self.authority(w) or w.deadline - self.clock() < TTL / 2:
            self.renew(i)
        elif w.waiting is not None:
            self.step_ends(ok)
        else:
            self.act(i)

    @rule(ok=st.booleans())
    def step_ends(self, ok: bool) -> None:
        """The step in flight (at most one, checked) ends, well or not."""
        for w in self.watchers:
            if w.waiting is not None and not w.waiting.done():
                w.waiting.set_result(ok)
        self.settle()

    # ----------------------------------------------------------------- invariants

    @invariant()
    def no_step_ran_wrongly(self) -> None:
        assert self.wrong == []

    @invariant()
    def one_authority_within_the_lease(self) -> None:
        held = self.store.held()
        with_authority = [w for w in self.watchers if self.authority(w)]
        assert len(with_authority) <= 1, [w.name for w in with_authority]
        for w in with_authority:
            assert held is not None and held[0] == w.token, f"{w.name} acts on a dead token"
            assert w.deadline <= held[1], "a deadline past the store's lease"
        for w in self.watchers:
            if w.inflight is not None:
                assert self.authority(w), f"{w.name} runs a step past its deadline"

    @invariant()
    def journal_holds_every_acknowledged_append_once_in_order(self) -> None:
        entries = self.peek()
        positions = [p for p, _ in entries]
        assert positions == sorted(set(positions))
        assert [r for _, r in entries] == self.journal
        by_position = dict(entries)
        for position, rec in self.acked.items():
            assert by_position.get(position) == rec

    @invariant()
    def replay_is_the_models_state(self) -> None:
        unavailable, self.store.unavailable = self.store.unavailable, False
        try:
            state = at_once(replay(self.store))
        finally:
            self.store.unavailable = unavailable
        assert state.problems == []
        assert state == contract.folded(self.journal)

    @invariant()
    def the_journal_tells_the_truth(self) -> None:
        finished = Counter(r["id"] for _, r in self.peek() if r["type"] == "failover_finished")
        assert all(n == 1 for n in finished.values()), finished
        for key in self.recorded_ok():
            assert self.succeeded[key] >= 1, f"{key} recorded ok, never succeeded"

    def teardown(self) -> None:
        for w in self.watchers:
            if w.task is not None:
                w.task.cancel()
        with contextlib.suppress(Exception):
            self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()


Fleet.TestCase.settings = settings(max_examples=500, stateful_step_count=80, deadline=None)
TestFleet = Fleet.TestCase


# The paths that matter most, spelled out (the machine above finds them at random too).


def fleet(*steps: tuple[bool, bool]) -> Fleet:
    m = Fleet()
    m.plan_steps(list(steps))
    return m


def check(m: Fleet) -> None:
    m.no_step_ran_wrongly()
    m.one_authority_within_the_lease()
    m.journal_holds_every_acknowledged_append_once_in_order()
    m.replay_is_the_models_state()
    m.the_journal_tells_the_truth()


def outcome(m: Fleet, fid: str) -> str | None:
    state = contract.folded([r for _, r in m.peek()])
    return next(f for f in state.failovers if f.id == fid).outcome


def test_a_leader_lost_mid_step_hands_over_and_the_next_never_reruns_done_steps() -> None:
    m = fleet((True, True), (False, True))  # s0 idempotent, s1 not; both required
    try:
        m.campaign(0)
        m.act(0)
        m.step_ends(True)  # s0 done
        assert m.watchers[0].inflight == ("F1-dc1", "s1")
        m.crash(0)  # dc1 dies during s1
        check(m)
        m.campaign(1)
        assert m.watchers[1].token is None  # dc1's key lives until its lease ends
        m.advance(TTL)
        m.campaign(1)
        assert m.watchers[1].token is not None
        m.act(1)  # resumes F1: s0 is done, s1 was interrupted and is not idempotent
        check(m)
        assert m.starts == Counter({("F1-dc1", "s0"): 1, ("F1-dc1", "s1"): 1})
        assert outcome(m, "F1-dc1") == "failed"  # for a human to check
    finally:
        m.teardown()


def test_an_interrupted_idempotent_step_is_run_again_by_the_next_leader() -> None:
    m = fleet((True, True), (True, True))
    try:
        m.campaign(0)
        m.act(0)
        m.step_ends(True)
        m.crash(0)  # during s1
        m.advance(TTL)
        m.campaign(2)
        m.act(2)
        assert m.watchers[2].inflight == ("F1-dc1", "s1")  # s0 is not run again
        m.step_ends(True)
        check(m)
        assert m.starts == Counter({("F1-dc1", "s0"): 1, ("F1-dc1", "s1"): 2})
        assert outcome(m, "F1-dc1") == "completed"
    finally:
        m.teardown()


def test_a_step_running_at_the_deadline_is_cancelled_before_anyone_else_may_lead() -> None:
    m = fleet(
        (False, True),
    )
    try:
        m.campaign(0)
        m.act(0)
        m.blink()  # the store goes away: dc1 cannot renew
        m.renew(0)
        assert m.watchers[0].token is not None  # unavailable is never lost
        m.advance(TTL - MARGIN)  # dc1's deadline: its step is cancelled
        assert m.watchers[0].task is None and m.watchers[0].inflight is None
        m.blink()
        m.campaign(1)
        assert m.watchers[1].token is None  # dc1's lease still runs for the margin
        m.advance(MARGIN)
        m.campaign(1)
        assert m.watchers[1].token is not None
        m.act(1)
        check(m)
        assert outcome(m, "F1-dc1") == "failed"
        m.renew(0)  # dc1 comes back: lost, confirmed, and it stops
        assert m.watchers[0].token is None
    finally:
        m.teardown()
