"""Watchers vouching for the primary to its guard (issue 12, the guard's third sign of
life): when a watcher vouches, what bounds its vouches for the leader, the leader's
wait, the guard's count, and the config. Pure rules with injected clocks, and three
daemons over one in-memory store."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_fleet_config import fleet as fleet_raw
from tests.unit.test_fleet_config import problems
from tests.unit.test_fleet_daemon import DOWN_V, UP_V, Fleet, failover_f1_started, raw
from tests.unit.test_guard import ISO, TOKEN, settings, snap
from watchdogd import config
from watchdogd.detector import DOWN, HEALTHY, STALE, SUSPECT
from watchdogd.fleet import Freshness, View, Vouching, config_digest, vouch_end
from watchdogd.guard import GuardConfigError, SignsOfLife, settings_from_config
from watchdogd.state.guard_keys import ClearanceRule, Published

VOTERS_ = ("dc1", "dc2", "dc3")

GUARDED = {
    "guard": {
        "isolation_timeout": "10s",
        "watchers": {n: f"http://127.0.0.1:{9000 + i}" for i, n in enumerate(VOTERS_)},
    }
}


@pytest.fixture
def fleet(tmp_path: Path) -> Any:
    """Three daemons over one in-memory store, their config with guard.watchers."""
    failover = raw(tmp_path, "dc1", tmp_path / "steps.log")["failover"]
    stop = {"name": "stop_replication", "action": "stop_replication", "timeout": "2s"}
    failover = {**failover, "steps": [stop, *failover["steps"]]}
    f = Fleet(tmp_path, {**GUARDED, "failover": failover})
    yield f
    f.close()


# --------------------------------------------------------------------------- Vouching


def test_a_watcher_vouches_only_once_confirmed_through_the_store() -> None:
    v = Vouching(start=100.0, stale_after=2.5)
    assert v.ask("main", 100.0) == (False, "not probed yet")
    v.cycle(101.0, HEALTHY, "main")
    yes, why = v.ask("main", 101.1)
    assert not yes and "not yet confirmed through the store" in why
    # Its healthy view reached the store and a journal read after it shows no failover.
    v.confirm(published_healthy=True, failover_unfinished=False)
    assert v.ask("main", 101.2)[0] is True
    assert v.age(103.2) == 2.0  # counted from the last vouch
    # Another node than its primary: no.
    yes, why = v.ask("standby", 101.3)
    assert not yes and "standby is not the primary here (main is)" == why
    # Its last cycle too long ago (a stalled watcher): no.
    yes, why = v.ask("main", 103.6)
    assert not yes and "last probe cycle was 2.6s ago" in why


@pytest.mark.parametrize("status", [SUSPECT, STALE])
def test_no_vouch_while_the_primary_is_not_healthy_here(status: Any) -> None:
    v = Vouching(start=0.0, stale_after=2.5)
    v.cycle(1.0, HEALTHY, "main")
    v.confirm(True, False)
    v.cycle(2.0, status, "main")
    assert v.ask("main", 2.1)[0] is False
    v.cycle(3.0, HEALTHY, "main")  # healthy again, never revoked: vouches again
    assert v.ask("main", 3.1)[0] is True


def test_a_down_verdict_revokes_until_a_healthy_view_and_a_clean_journal_read() -> None:
    v = Vouching(start=0.0, stale_after=2.5)
    v.cycle(1.0, HEALTHY, "main")
    v.confirm(True, False)
    assert v.ask("main", 1.0)[0]
    v.cycle(2.0, DOWN, "main")
    v.cycle(3.0, HEALTHY, "main")  # back, but not yet through the store
    yes, why = v.ask("main", 3.1)
    assert not yes and "saw the primary down" in why
    assert v.age(3.1) == 2.1  # the view published now bounds its vouches: 1.0 was the last
    v.confirm(published_healthy=True, failover_unfinished=True)  # a failover runs
    assert v.ask("main", 3.2)[0] is False
    v.confirm(published_healthy=False, failover_unfinished=False)  # that view said down
    assert v.ask("main", 3.3)[0] is False
    v.cycle(4.0, DOWN, "main")
    v.confirm(published_healthy=True, failover_unfinished=False)  # this cycle is DOWN
    assert v.ask("main", 4.1)[0] is False
    v.cycle(5.0, HEALTHY, "main")
    v.confirm(published_healthy=True, failover_unfinished=False)
    assert v.ask("main", 5.1)[0] is True


def test_a_new_primary_revokes() -> None:
    v = Vouching(start=0.0, stale_after=2.5)
    v.cycle(1.0, HEALTHY, "main")
    v.confirm(True, False)
    v.cycle(2.0, HEALTHY, "failover")  # roles changed (a failover was acknowledged)
    yes, why = v.ask("failover", 2.1)
    assert not yes and "primary changed to failover" in why


# --------------------------------------------------------------------------- vouch_end


def view(name: str, *, down: bool = True, age: float | None = 0.0, primary: str = "main") -> View:
    return View(
        instance=name,
        seq=1,
        primary=primary,
        primary_down=down,
        primary_writable=None,
        outage=5.0 if down else 0.0,
        standby_ok=True,
        config="x",
        vouch_age=age,
    )


def fresh(*names: str, at: float = 100.0) -> Freshness:
    f = Freshness(5.0)
    for name in names:
        f.saw(name, 1, at - 1)
        f.saw(name, 2, at)
    return f


VOTERS = ("dc1", "dc2", "dc3")


def test_the_bound_is_the_second_earliest_silence_of_three() -> None:
    views = {"dc1": view("dc1", age=10.0), "dc2": view("dc2", age=4.0), "dc3": view("dc3", age=1.0)}
    seen = {"dc1": 100.0, "dc2": 99.0, "dc3": 100.0}
    end, why = vouch_end(views, seen, fresh(*VOTERS), VOTERS, 2, 100.0, "main")
    # Silent since 90 (dc1), 95 (dc2), 99 (dc3): after 95 two of three are silent, so no
    # majority vouched after 95.
    assert (end, why) == (95.0, "")


def test_no_bound_without_enough_voters_known_silent() -> None:
    seen = dict.fromkeys(VOTERS, 100.0)
    cases = {
        "up": {"dc1": view("dc1"), "dc2": view("dc2", down=False)},
        "unknown age": {"dc1": view("dc1"), "dc2": view("dc2", age=None)},
        "another primary": {"dc1": view("dc1"), "dc2": view("dc2", primary="failover")},
        "filed under another name": {"dc1": view("dc1"), "dc2": view("dc3")},
    }
    for what, views in cases.items():
        end, why = vouch_end(views, seen, fresh(*VOTERS), VOTERS, 2, 100.0, "main")
        assert end is None, what
        assert why == (
            "1 of the 3 watchers the guard asks are known to have stopped vouching for main "
            "(2 needed)"
        )
    # Stale views do not count either.
    views = {"dc1": view("dc1"), "dc2": view("dc2")}
    end, _ = vouch_end(views, seen, fresh("dc1", "dc2"), VOTERS, 2, 106.0, "main")
    assert end is None
    # Five voters: three must be silent.
    five = ("a", "b", "c", "d", "e")
    views = {n: view(n, age=float(i)) for i, n in enumerate(five[:3])}
    end, _ = vouch_end(views, dict.fromkeys(five, 100.0), fresh(*five), five, 3, 100.0, "main")
    assert end == 100.0  # silent since 100, 99, 98: the third earliest is 100
    del views["a"]
    assert (
        vouch_end(views, dict.fromkeys(five, 100.0), fresh(*five), five, 3, 100.0, "main")[0]
        is None
    )


# --------------------------------------------------------------------------- the leader's wait


def test_the_expired_path_waits_until_the_watchers_silence_is_old_enough() -> None:
    asked: list[tuple[tuple[str, ...], int]] = []

    def answer(end: float | None, why: str = "") -> Any:
        def vouches(names: tuple[str, ...], needed: int) -> tuple[float | None, str]:
            asked.append((names, needed))
            return end, why

        return vouches

    rule = ClearanceRule(
        TOKEN, "f1", ISO, margin=3.0, vouching=True, vouchers=VOTERS, vouches_needed=2
    )
    rule.observe(snap(alive=False), now=0.0)
    no_bound = rule.observe(snap(alive=False), now=50.0, vouches=answer(None, "1 of 3"))
    assert not no_bound.cleared and "may still vouch" in no_bound.reason
    assert not rule.observe(snap(alive=False), now=50.0).cleared  # not counted at all
    early = rule.observe(snap(alive=False), now=50.0, vouches=answer(37.5))
    assert not early.cleared and "vouched for the primary 12.5s ago, less than 13s" in early.reason
    assert rule.observe(snap(alive=False), now=50.0, vouches=answer(37.0)).cleared
    assert asked == [(("dc1", "dc2", "dc3"), 2)] * 3  # our config's list and count
    # Acks never needed the watchers: the guard fenced on our order.
    assert not ClearanceRule(TOKEN, "f1", ISO).vouching


def test_a_guard_that_published_vouching_is_waited_for_whatever_our_config_says() -> None:
    """And with the guard's own list and count: a guard run with another config file
    (three voters where the fleet has five, say) asks whom it asks."""
    published = Published("main", ISO, vouching=True, watchers=("dc1", "dc2"), needed=2)
    assert Published.decode(published.encode()) == published
    assert Published.decode(Published("main", ISO).encode()).vouching is False
    base = b'{"node": "main", "isolation_timeout": 5, '
    for junk, words in (
        (base + b'"vouching": 1}', "'vouching' is not a bool"),
        (base + b'"vouching": true, "needed": 1}', "'watchers' is not a list"),
        (base + b'"vouching": true, "watchers": ["a"], "needed": 2}', "'needed' 2 is not 1..1"),
        (base + b'"vouching": true, "watchers": ["a", "a"], "needed": 2}', "names one twice"),
    ):
        with pytest.raises(ValueError, match=words):
            Published.decode(junk)
    asked: list[tuple[tuple[str, ...], int]] = []

    def vouches(names: tuple[str, ...], needed: int) -> tuple[float | None, str]:
        asked.append((names, needed))
        return None, "unknown"

    rule = ClearanceRule(TOKEN, "f1", ISO, vouchers=VOTERS, vouches_needed=2)
    rule.observe(replace(snap(alive=False), published=published), now=0.0)
    verdict = rule.observe(
        replace(snap(alive=False), published=published), now=ISO, vouches=vouches
    )
    assert not verdict.cleared and "may still vouch" in verdict.reason
    assert asked == [(("dc1", "dc2"), 2)]


def test_a_guard_that_can_never_count_has_no_bound_to_wait_for() -> None:
    views = {"dc1": view("dc1")}
    end, why = vouch_end(views, {"dc1": 100.0}, fresh("dc1"), ("dc1",), 2, 100.0, "main")
    assert end == -math.inf and why == ""


# --------------------------------------------------------------------------- the guard


def test_a_majority_vouching_is_a_sign_of_life_counted_from_when_it_was_asked() -> None:
    signs = SignsOfLife(start=0.0)
    signs.vouched(8.0)
    assert signs.source == "watchers"
    assert not signs.isolated(17.9, ISO)
    assert signs.isolated(18.0, ISO)


def test_too_few_watchers_for_a_majority_is_refused() -> None:
    with pytest.raises(GuardConfigError, match="a strict majority of the 3 voters"):
        settings(watchers=(("dc1", "http://127.0.0.1:1"),), voters=3)
    ok = settings(watchers=(("dc1", "http://a:1"), ("dc2", "http://b:1")), voters=3)
    assert ok.vouches_needed == 2


# --------------------------------------------------------------------------- config


WATCHERS = {"dc1": "http://10.0.0.5:9644", "dc2": "http://10.0.1.5:9644/"}


def test_guard_watchers_in_the_config_reach_the_guard_and_the_digest() -> None:
    data = {**fleet_raw(), "guard": {"isolation_timeout": "20s", "watchers": WATCHERS}}
    cfg = config.parse(data)
    assert cfg.guard is not None
    assert cfg.guard.watchers == (("dc1", "http://10.0.0.5:9644"), ("dc2", "http://10.0.1.5:9644"))
    s = settings_from_config(cfg, "main")
    assert s.watchers == cfg.guard.watchers and s.voters == 3
    plain = config.parse({**fleet_raw(), "guard": {"isolation_timeout": "20s"}})
    # Voters that disagree on whether the guard counts vouches refuse to fail over.
    assert config_digest(cfg) != config_digest(plain)


@pytest.mark.parametrize(
    ("watchers", "expected"),
    [
        ({"dc9": "http://a:1", "dc1": "http://b:1"}, "guard.watchers.dc9: 'dc9' is not one of"),
        ({"dc1": "ftp://a:1", "dc2": "http://b:1"}, "guard.watchers.dc1: expected the watcher"),
        ({"dc1": "https://a:1", "dc2": "http://b:1"}, "guard.watchers.dc1: expected the watcher"),
        ({"dc1": "http://a", "dc2": "http://b:1"}, "guard.watchers.dc1: expected the watcher"),
        ({"dc1": "http://a:1/vouch", "dc2": "http://b:1"}, "guard.watchers.dc1: expected"),
        ({"dc1": "http://a:1"}, "guard.watchers: lists 1 of 3 voters: a strict majority (2)"),
        ({"dc1": ["x"], "dc2": "http://b:1"}, "guard.watchers: expected a mapping of strings"),
    ],
)
def test_bad_guard_watchers_are_one_line_each(watchers: Any, expected: str) -> None:
    data = {**fleet_raw(), "guard": {"isolation_timeout": "20s", "watchers": watchers}}
    found = problems(data)
    assert any(p.startswith(expected) for p in found), found
    assert all("\n" not in p for p in found)


def test_a_view_carries_its_vouch_age_and_an_old_watchers_view_still_decodes() -> None:
    v = view("dc1", age=2.5)
    assert View.decode(v.encode()) == v
    older = {k: val for k, val in v.encode().items() if k != "vouch_age"}
    assert View.decode(older).vouch_age is None
    for bad in (-1, True, "1", float("nan")):
        with pytest.raises(ValueError, match="vouch_age must be"):
            View.decode({**v.encode(), "vouch_age": bad})


# --------------------------------------------------------------------------- three daemons


async def test_the_fleet_vouches_stops_on_down_and_the_leader_bounds_it(fleet: Fleet) -> None:
    await fleet.lead("dc1", "dc2", "dc3")
    f1, f2 = fleet.fleet("dc1"), fleet.fleet("dc2")
    # A watcher just started vouches for nobody; one healthy round through the store and
    # it vouches for its primary, not for the standby.
    assert f2.vouch("main")["vouch"] is False
    await fleet.two_rounds(dict.fromkeys(("dc1", "dc2", "dc3"), UP_V))
    answer = f2.vouch("main")
    assert answer == {
        "instance": "dc2",
        "node": "main",
        "vouch": True,
        "detail": "the primary main is healthy as seen from here",
    }
    assert f2.vouch("failover")["vouch"] is False
    assert f1.vouch("main")["vouch"] is True  # the leader too
    assert fleet.d["dc3"].status()["store"]["vouching"] is True
    vouched_at = fleet.clock()
    # The primary is lost: every watcher sees it down, stops vouching, and its view says
    # since when; the leader bounds the watchers' last majority vouch by it.
    fleet.clock.advance(3.0)
    await fleet.two_rounds(dict.fromkeys(("dc1", "dc2", "dc3"), DOWN_V))
    assert f2.vouch("main")["vouch"] is False
    assert fleet.d["dc3"].status()["store"]["vouching"] is False
    assert f1.views["dc2"].vouch_age == pytest.approx(4.0)  # built 3 + 1 s after the vouch
    end, why = f1.vouch_end(0.0, VOTERS, 2)
    assert why == "" and end is not None
    assert vouched_at <= end <= vouched_at + 1.0  # no earlier than the true last vouch
    # Views read before the fence order do not bound anything.
    assert f1.vouch_end(fleet.clock() + 1, VOTERS, 2)[0] is None
    assert f2.vouch_end(0.0, VOTERS, 2) == (None, "not the leader: dc1 leads; run it there")


async def test_no_vouch_again_while_the_fleets_journal_shows_a_failover_unfinished(
    fleet: Fleet,
) -> None:
    await fleet.lead("dc1", "dc2", "dc3")
    await fleet.two_rounds(dict.fromkeys(("dc1", "dc2", "dc3"), DOWN_V))
    # The leader journals a failover start, which the followers read.
    d1 = fleet.d["dc1"]
    await d1.record(failover_f1_started())
    fleet.clock.advance(1.0)
    await fleet.two_rounds(dict.fromkeys(("dc1", "dc2", "dc3"), UP_V))  # the primary is back
    for name in ("dc1", "dc2", "dc3"):
        answer = fleet.fleet(name).vouch("main")
        assert answer["vouch"] is False and "saw the primary down" in answer["detail"], name


def test_a_reply_gap_longer_than_the_senders_timeout_is_a_clock_step_not_learned() -> None:
    signs = SignsOfLife(start=0.0, gap_limit=60.0)
    marks = ((1000.0, 1.0), (1001.0, 2.0), (1011.0, 3.0), (4611.0, 4.0))
    for mark, at in marks[:3]:  # replies 10 s apart
        signs.standby_mark(mark, at)
    assert signs.longest_gap == 10.0
    signs.standby_mark(*marks[3])  # the standby's clock stepped an hour ahead
    assert signs.longest_gap == 10.0
    assert signs.source == "standby" and signs.last == 3.0  # still a reply: counted
    unlimited = SignsOfLife(start=0.0)
    for mark, at in marks:
        unlimited.standby_mark(mark, at)
    assert unlimited.longest_gap == 3600.0


def test_the_store_gets_what_is_left_of_the_cycles_interval(fleet: Fleet) -> None:
    """A store that does not answer must not make the cycle outlast its interval: the
    scheduler would skip a tick and the detector call the gap a stalled loop."""
    f = fleet.fleet("dc1")  # probe interval 1 s
    now = fleet.clock()
    assert f.store_bound(None) == 1.0
    assert f.store_bound(now) == pytest.approx(0.9)
    assert f.store_bound(now - 0.3) == pytest.approx(0.6)
    # Probes that took their whole timeout still leave the store half the full bound:
    # round trips across sites (one skipped tick is no stall for the detector).
    assert f.store_bound(now - 0.5) == 0.5
    assert f.store_bound(now - 0.85) == 0.5


async def test_a_leader_past_its_authority_does_not_vouch_again_from_its_own_state(
    fleet: Fleet,
) -> None:
    """A leader whose lease may have expired (its deadline passed without a renewal)
    holds a state another leader may have moved past: it stays silent."""
    await fleet.lead("dc1", "dc2", "dc3")
    await fleet.two_rounds(dict.fromkeys(("dc1", "dc2", "dc3"), DOWN_V))
    f1 = fleet.fleet("dc1")
    fleet.clock.advance(20.0)  # past ttl 15 s - margin, no renewal
    assert f1.is_leader and f1.authority_left() == 0
    await fleet.two_rounds(dict.fromkeys(("dc1", "dc2", "dc3"), UP_V))
    assert f1.vouch("main")["vouch"] is False
    assert fleet.fleet("dc2").vouch("main")["vouch"] is True  # a follower read the journal
    await fleet.lead("dc1")  # renewed: the state is the journal's again
    await fleet.two_rounds(dict.fromkeys(("dc1", "dc2", "dc3"), UP_V))
    assert f1.vouch("main")["vouch"] is True


async def test_without_guard_watchers_nobody_vouches_and_views_stay_as_before(
    tmp_path: Path,
) -> None:
    """A fleet whose guard counts no vouches sends views an earlier version reads (no
    vouch_age) and answers every /vouch with no."""
    plain = Fleet(tmp_path)
    try:
        await plain.lead("dc1", "dc2", "dc3")
        await plain.two_rounds(dict.fromkeys(("dc1", "dc2", "dc3"), UP_V))
        f1 = plain.fleet("dc1")
        assert f1.views["dc2"].vouch_age is None
        assert "vouch_age" not in f1.views["dc2"].encode()
        answer = plain.fleet("dc2").vouch("main")
        assert answer["vouch"] is False and "no guard.watchers" in answer["detail"]
        assert plain.d["dc2"].status()["store"]["vouching"] is False
        # A guard that counts vouches beside this fleet: never cleared by expiry, and
        # the reason says why.
        end, why = f1.vouch_end(0.0, ("dc1", "dc2", "dc3"), 2)
        assert end is None and "this fleet's config has no guard.watchers" in why
    finally:
        plain.close()
