"""The fleet's vote (watchdogd/fleet.py) and the in-memory vote box
(watchdogd/state/votes.py): freshness by the leader's own receive time, a strict
majority of configured voters, vetoes, config mismatches, the timing rule, the
authority deadline, and a hostile peer's value refused in one line."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from watchdogd.core.model import (
    Config,
    DatabaseConfig,
    FailoverConfig,
    NodeConfig,
    ProbeConfig,
    StepConfig,
)
from watchdogd.fleet import (
    Freshness,
    View,
    authority_deadline,
    config_digest,
    tally,
    timing_problem,
)
from watchdogd.state.etcd import EtcdClient
from watchdogd.state.store import StoreUnavailable, VirtualClock
from watchdogd.state.votes import EtcdVoteBox, MemoryVoteBox

VOTERS = ("dc1", "dc2", "dc3")
DIGEST = "abc123abc123"


def view(instance: str, *, down: bool = True, writable: bool | None = False, seq: int = 1,
         primary: str = "main", config: str = DIGEST) -> View:  # fmt: skip
    return View(
        instance=instance,
        seq=seq,
        primary=primary,
        primary_down=down,
        primary_writable=writable,
        outage=12.5 if down else 0.0,
        standby_ok=True,
        config=config,
    )


def seen(*instances: str, at: float = 100.0, max_age: float = 3.0) -> Freshness:
    """Freshness where each instance's view was seen to change at ``at``."""
    fresh = Freshness(max_age)
    for name in instances:
        fresh.saw(name, 1, at - 50)  # the baseline: first sighting
        fresh.saw(name, 2, at)  # a change, seen at ``at``
    return fresh


# --------------------------------------------------------------------------- freshness


def test_freshness_counts_only_changes_seen_by_the_leader() -> None:
    fresh = Freshness(max_age=3.0)
    assert fresh.age("dc1", 10.0) is None and not fresh.fresh("dc1", 10.0)
    fresh.saw("dc1", 7, 10.0)
    # The first sighting is a baseline: when it was published is unknown.
    assert fresh.age("dc1", 10.0) is None and not fresh.fresh("dc1", 10.0)
    fresh.saw("dc1", 9, 11.0)
    assert fresh.age("dc1", 12.0) == 1.0 and fresh.fresh("dc1", 12.0)
    # The same revision read again is no sign of life.
    fresh.saw("dc1", 9, 13.5)
    assert fresh.age("dc1", 14.0) == 3.0 and fresh.fresh("dc1", 14.0)
    assert not fresh.fresh("dc1", 14.01)
    # A republished view (new revision) is fresh again, from the leader's receive time.
    fresh.saw("dc1", 12, 20.0)
    assert fresh.fresh("dc1", 22.0)
    fresh.forget("dc1")
    assert fresh.age("dc1", 22.0) is None


def test_freshness_never_trusts_the_senders_clock_or_seq() -> None:
    """A view claiming a huge seq and a long outage is judged by when the leader saw it
    change, nothing else."""
    fresh = Freshness(max_age=2.0)
    fresh.saw("dc2", 5, 0.0)
    fresh.saw("dc2", 6, 1.0)
    views = {"dc2": dataclasses.replace(view("dc2"), seq=10**12, outage=1e9)}
    assert tally(views, fresh, ["dc2"], DIGEST, 3.5).fresh == ()


@pytest.mark.parametrize("max_age", [0.0, -1.0, float("nan"), float("inf")])
def test_freshness_needs_a_positive_max_age(max_age: float) -> None:
    with pytest.raises(ValueError, match="max_age"):
        Freshness(max_age)


# --------------------------------------------------------------------------- tally


def test_a_strict_majority_of_fresh_voters_allows() -> None:
    views = {n: view(n) for n in VOTERS}
    result = tally(views, seen(*VOTERS), VOTERS, DIGEST, 101.0)
    assert result.needed == 2
    assert result.down == VOTERS and result.fresh == VOTERS
    assert result.refusal() is None
    # Two of three are enough.
    two = seen("dc1", "dc2")
    result = tally(views, two, VOTERS, DIGEST, 101.0)
    assert result.fresh == ("dc1", "dc2") and result.refusal() is None


def test_one_of_three_is_not_enough_and_silence_is_not_down() -> None:
    views = {"dc1": view("dc1"), "dc2": view("dc2", down=False, writable=None),
             "dc3": view("dc3")}  # fmt: skip
    fresh = seen("dc1", "dc2")  # dc3's DOWN view never changed since first sight
    result = tally(views, fresh, VOTERS, DIGEST, 101.0)
    assert result.down == ("dc1",)
    refusal = result.refusal()
    assert refusal == (
        "only 1 of 3 voters see the primary down (2 needed; down: dc1; no fresh view from dc3)"
    )
    # Stale: the same views, read 4 s after their last change.
    result = tally({n: view(n) for n in VOTERS}, seen(*VOTERS), VOTERS, DIGEST, 103.5)
    assert result.fresh == () and result.down == ()
    assert "only 0 of 3" in (result.refusal() or "")


def test_even_voters_need_more_than_half() -> None:
    voters = ("dc1", "dc2", "dc3", "dc4")
    views = {n: view(n) for n in voters}
    result = tally(views, seen("dc1", "dc2"), voters, DIGEST, 100.0)
    assert result.needed == 3 and result.refusal() is not None
    assert tally(views, seen("dc1", "dc2", "dc3"), voters, DIGEST, 100.0).refusal() is None


def test_unknown_instances_are_ignored() -> None:
    views = {n: view(n) for n in ("dc1", "dc8", "dc9")}
    views["dc7"] = view("dc7", down=False, writable=True)
    result = tally(views, seen("dc1", "dc7", "dc8", "dc9"), VOTERS, DIGEST, 100.0)
    assert result.fresh == ("dc1",) and result.down == ("dc1",) and result.vetoes == ()
    assert result.refusal() is not None


def test_a_view_filed_under_another_name_is_ignored() -> None:
    views = {"dc1": view("dc1"), "dc2": view("dc1"), "dc3": view("dc1")}
    result = tally(views, seen(*VOTERS), VOTERS, DIGEST, 100.0)
    assert result.down == ("dc1",) and result.refusal() is not None


def test_duplicate_voters_count_once() -> None:
    result = tally({"dc1": view("dc1")}, seen("dc1"), ["dc1", "dc1", "dc2"], DIGEST, 100.0)
    assert result.voters == ("dc1", "dc2") and result.needed == 2
    assert result.refusal() is not None


def test_no_voters_allows_nothing() -> None:
    result = tally({"dc1": view("dc1")}, seen("dc1"), [], DIGEST, 100.0)
    assert result.needed == 1 and result.refusal() is not None


def test_a_fresh_writable_primary_vetoes_and_is_named() -> None:
    views = {n: view(n) for n in VOTERS}
    views["dc3"] = view("dc3", down=False, writable=True)
    result = tally(views, seen(*VOTERS), VOTERS, DIGEST, 100.0)
    assert result.down == ("dc1", "dc2") and result.vetoes == ("dc3",)
    refusal = result.refusal()
    assert refusal is not None and refusal.startswith("vetoed") and "dc3" in refusal
    assert "not promoted over" in refusal
    # A stale veto does not count; unknown writability is no veto.
    assert tally(views, seen("dc1", "dc2"), VOTERS, DIGEST, 100.0).refusal() is None
    views["dc3"] = view("dc3", down=False, writable=None)
    assert tally(views, seen(*VOTERS), VOTERS, DIGEST, 100.0).refusal() is None


def test_a_down_vote_about_another_primary_is_not_counted() -> None:
    views = {n: view(n) for n in VOTERS}
    views["dc2"] = view("dc2", primary="standby")
    result = tally(views, seen(*VOTERS), VOTERS, DIGEST, 100.0, primary="main")
    assert result.down == ("dc1", "dc3") and result.refusal() is None
    views["dc3"] = view("dc3", primary="standby")
    assert tally(views, seen(*VOTERS), VOTERS, DIGEST, 100.0, primary="main").refusal()
    # Seeing the other node up and writable is still a veto.
    views["dc3"] = view("dc3", down=False, writable=True, primary="standby")
    result = tally(views, seen(*VOTERS), VOTERS, DIGEST, 100.0, primary="main")
    assert result.vetoes == ("dc3",) and (result.refusal() or "").startswith("vetoed")


def test_voters_with_another_config_refuse_automatic_failover() -> None:
    views = {n: view(n) for n in VOTERS}
    views["dc3"] = view("dc3", config="ffff00001111")
    result = tally(views, seen(*VOTERS), VOTERS, DIGEST, 100.0)
    assert result.mismatched == ("dc3",) and len(result.down) == 3
    assert result.refusal() == "automatic failover refused: voters run different configs: dc3"
    # A stale mismatched view is no vote at all, and no objection.
    assert tally(views, seen("dc1", "dc2"), VOTERS, DIGEST, 100.0).refusal() is None


# --------------------------------------------------------------------------- timing


def test_the_timing_rule_names_the_numbers() -> None:
    assert timing_problem(5.0, 2.0, 1.0, 15.0) is None
    assert timing_problem(5.0, 4.5, 1.0, 15.0) is None  # exactly the ttl
    problem = timing_problem(5.0, 6.0, 1.0, 15.0)
    assert problem == (
        "timing: renew interval 5s + 2 * retry budget 6s + margin 1s = 18s is more than the ttl 15s"
    )
    assert "\n" not in problem
    assert "margin" in (timing_problem(1.0, 1.0, float("nan"), 15.0) or "")
    assert "ttl" in (timing_problem(1.0, 1.0, 1.0, -3.0) or "")


def test_authority_ends_at_the_renewals_send_time_plus_ttl_minus_margin() -> None:
    assert authority_deadline(1000.0, 15.0, 2.0) == 1013.0
    assert authority_deadline(0.5, 3.0, 0.0) == 3.5


# --------------------------------------------------------------------------- views


def test_a_view_round_trips() -> None:
    v = view("dc2", writable=None)
    assert View.decode(v.encode()) == v
    assert View.decode({**v.encode(), "outage": 3}).outage == 3.0


GOOD = view("dc1").encode()


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (["not", "a", "dict"], "expected an object, not list"),
        ({**GOOD, "extra": 1}, "unknown field 'extra'"),
        ({k: v for k, v in GOOD.items() if k != "seq"}, "missing field 'seq'"),
        ({**GOOD, "instance": ""}, "instance must be a non-empty text"),
        ({**GOOD, "primary": 3}, "primary must be a non-empty text"),
        ({**GOOD, "config": None}, "config must be a non-empty text"),
        ({**GOOD, "instance": "x" * 300}, "instance must be a non-empty text"),
        ({**GOOD, "seq": True}, "seq must be a whole number"),
        ({**GOOD, "seq": -1}, "seq must be a whole number"),
        ({**GOOD, "seq": "7"}, "seq must be a whole number"),
        ({**GOOD, "primary_down": "yes"}, "primary_down must be true or false"),
        ({**GOOD, "primary_down": None}, "primary_down must be true or false"),
        ({**GOOD, "primary_writable": 1}, "primary_writable must be true, false or null"),
        ({**GOOD, "standby_ok": "no"}, "standby_ok must be true, false or null"),
        ({**GOOD, "outage": float("nan")}, "outage must be a number of seconds"),
        ({**GOOD, "outage": -1}, "outage must be a number of seconds"),
        ({**GOOD, "outage": True}, "outage must be a number of seconds"),
        ({**GOOD, "outage": [1]}, "outage must be a number of seconds"),
    ],
)
def test_a_bad_view_is_refused_in_one_line(data: Any, words: str) -> None:
    with pytest.raises(ValueError) as refused:
        View.decode(data)
    message = str(refused.value)
    assert message.startswith("view: ") and words in message
    assert "\n" not in message and len(message) < 200


def test_a_huge_hostile_value_is_quoted_short() -> None:
    with pytest.raises(ValueError) as refused:
        View.decode({**GOOD, "primary_down": "\n" * 10 + "x" * 100_000})
    assert "\n" not in str(refused.value) and len(str(refused.value)) < 200


# --------------------------------------------------------------------------- digest


def config(**failover: Any) -> Config:
    def node(name: str, dsn: str) -> NodeConfig:
        return NodeConfig(name, DatabaseConfig("postgres", dsn))

    return Config(
        cluster="shop",
        primary=node("main", "postgresql://wd:secret1@10.0.0.1/app"),
        standby=node("standby", "postgresql://wd:secret1@10.0.1.1/app"),
        probe=ProbeConfig(interval=1.0, timeout=0.5),
        failover=FailoverConfig(
            steps=(StepConfig("promote", "promote"), StepConfig("dns", "http")), **failover
        ),
        secrets=frozenset({"secret1"}),
    )


def test_the_config_digest_is_stable_short_and_blind_to_secrets() -> None:
    base = config()
    digest = config_digest(base)
    assert len(digest) == 12 and int(digest, 16) >= 0
    assert config_digest(config()) == digest
    # Secrets, DSNs, where the state lives: not decision-relevant.
    other = dataclasses.replace(
        base,
        primary=dataclasses.replace(
            base.primary, database=DatabaseConfig("postgres", "postgresql://wd:other@x/app")
        ),
        secrets=frozenset({"other"}),
        state_dir="/elsewhere",
    )
    assert config_digest(other) == digest


@pytest.mark.parametrize(
    "change",
    [
        {"mode": "manual"},
        {"outage_threshold": 31.0},
        {"max_lag": 1},
        {"max_lag_seconds": 5.0},
        {"cooldown": 60.0},
        {"steps": (StepConfig("dns", "http"), StepConfig("promote", "promote"))},
        {"steps": (StepConfig("promote", "promote"), StepConfig("dns", "command"))},
    ],
)
def test_the_config_digest_sees_each_decision_setting(change: dict[str, Any]) -> None:
    base = config()
    changed = dataclasses.replace(base, failover=dataclasses.replace(base.failover, **change))
    assert config_digest(changed) != config_digest(base)


def test_the_config_digest_sees_cluster_roles_probes_and_voters() -> None:
    base = config()
    digest = config_digest(base)
    swapped = dataclasses.replace(base, primary=base.standby, standby=base.primary)
    assert config_digest(swapped) != digest
    assert config_digest(dataclasses.replace(base, cluster="other")) != digest
    probe = dataclasses.replace(base.probe, timeout=0.9)
    assert config_digest(dataclasses.replace(base, probe=probe)) != digest

    @dataclasses.dataclass(frozen=True)
    class Store:
        voters: tuple[str, ...]

    class WithStore:
        def __init__(self, voters: tuple[str, ...]) -> None:
            self.store = Store(voters)

        def __getattr__(self, name: str) -> Any:
            return getattr(base, name)

    three: Any = WithStore(("dc1", "dc2", "dc3"))
    assert config_digest(three) != digest
    assert config_digest(three) == config_digest(WithStore(("dc3", "dc1", "dc2")))  # type: ignore[arg-type]
    assert config_digest(three) != config_digest(WithStore(("dc1", "dc2")))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- memory box


async def test_memory_ballots_expire_on_the_clock_and_revisions_grow() -> None:
    clock = VirtualClock(0.0)
    one = MemoryVoteBox(clock, ttl=5.0)
    two = MemoryVoteBox(clock, ttl=5.0, shared_with=one)
    await one.publish("dc1", view("dc1").encode())
    await two.publish("dc2", view("dc2").encode())
    first = await two.ballots()
    assert set(first) == {"dc1", "dc2"}
    assert View.decode(first["dc1"].data) == view("dc1")
    clock.advance(3.0)
    await one.publish("dc1", view("dc1").encode())  # identical: still a new revision
    second = await one.ballots()
    assert second["dc1"].revision > first["dc2"].revision > first["dc1"].revision
    clock.advance(2.0)  # dc2 published 5 s ago: gone
    assert set(await one.ballots()) == {"dc1"}
    clock.advance(3.0)
    assert await one.ballots() == {}


async def test_memory_box_unavailable_and_close() -> None:
    clock = VirtualClock(0.0)
    one = MemoryVoteBox(clock, ttl=5.0)
    cut = MemoryVoteBox(clock, ttl=5.0, unavailable=True, shared_with=one)
    with pytest.raises(StoreUnavailable):
        await cut.publish("dc2", view("dc2").encode())
    with pytest.raises(StoreUnavailable):
        await cut.ballots()
    await cut.close()  # best effort: no error
    await one.publish("dc1", view("dc1").encode())
    assert set(await one.ballots()) == {"dc1"}
    await one.close()
    assert await MemoryVoteBox(clock, 5.0, shared_with=one).ballots() == {}


@pytest.mark.parametrize("name", ["", "a/b", "x" * 200, "tab\there"])
async def test_a_bad_instance_name_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match="instance name"):
        await MemoryVoteBox(VirtualClock(), 5.0).publish(name, view("dc1").encode())


async def test_a_view_that_is_not_json_is_refused() -> None:
    with pytest.raises(ValueError, match="plain JSON"):
        await MemoryVoteBox(VirtualClock(), 5.0).publish("dc1", {"x": object()})
    with pytest.raises(ValueError, match="ttl"):
        MemoryVoteBox(VirtualClock(), 0.0)


# --------------------------------------------------------------------------- etcd box


async def test_the_etcd_box_keys_and_lease_ttl() -> None:
    async with EtcdClient(["http://127.0.0.1:2379"]) as client:
        box = EtcdVoteBox(client, "/watchdogd/shop/", 1.2)
        assert box.ttl == 2 and box.key("dc1") == b"/watchdogd/shop/views/dc1"
        assert EtcdVoteBox(client, "/watchdogd/shop", 0.3).ttl == 1
        assert EtcdVoteBox(client, "/watchdogd/shop", 15).ttl == 15
        for bad in (0.0, -1.0, float("nan"), float("inf")):
            with pytest.raises(ValueError, match="ttl"):
                EtcdVoteBox(client, "/watchdogd/shop", bad)
        with pytest.raises(ValueError, match="instance name"):
            await box.publish("a/b", view("dc1").encode())  # refused before any I/O
