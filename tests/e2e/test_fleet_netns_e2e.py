"""Whole-site partitions (issue 12), with network namespaces: three sites (a, b, c), each
its own namespace with one etcd member and one watcher (dc1, dc2, dc3); the primary and
the guard in a, the standby in b, streaming from a's address. A site is cut off by
taking its link down (tests/support/netns.py; this kernel has no netem). Promotions are
counted from the database itself (the standby's timeline) and from the journal in etcd.

dc3 starts first and leads: the leader is never in the primary's site."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tests.e2e.test_fleet_guard_e2e import (
    ISO,
    TTL,
    guard_fence_then_promote,
    guarded_config,
    stored_ack,
    wall_of,
    writable,
)
from tests.support import timing
from tests.support.fleet import GUARD_ALIVE, VOUCHING, GuardProcess, timeline, vouched_by
from tests.support.netns import SiteFleet, in_site_writable, site_fleet
from tests.support.pg import eventually
from watchdogd.state.etcd import EtcdClient, StoreUnavailable
from watchdogd.state.guard_keys import GUARD_POLL_DEFAULT

__all__ = ["site_fleet"]

WATCHERS = {"dc1": "a", "dc2": "b", "dc3": "c"}


async def start_sites(fleet: SiteFleet, *, vouched: bool = False) -> GuardProcess:
    """The guard in a, then dc3 alone (it becomes the leader), then dc1 and dc2; every
    watcher watching, the standby caught up, the primary writable. ``vouched``: the
    guard asks the three watchers to vouch (``guard.watchers``: their metrics ports on
    their sites' addresses), and counts all three before this returns."""
    rig = fleet.rig
    rig.pair.primary.execute("CREATE TABLE app (x int)")
    shared = guarded_config(rig)
    for name, site in WATCHERS.items():
        fleet.add_watcher(name, site, shared)
    if vouched:
        vouched_by(shared, rig.watchers)
    guard = fleet.add_guard("a", shared)
    guard.start()
    await eventually(rig.guard_alive, within=15)
    await rig.start("dc3")
    assert await fleet.leader("dc3") == "dc3"
    await rig.start("dc1", "dc2")
    assert await rig.leader() == "dc3"
    await rig.wait_all(lambda s: s["state"] == "watching", 15, "watching")
    await asyncio.to_thread(rig.pair.wait_replayed)
    assert timeline(rig.pair.standby) == 1
    assert await writable(rig.pair.primary) is True
    if vouched:
        guard.restart_if_watchers_moved(rig.watchers)
        await eventually(lambda: vouching_now(guard) == ["dc1", "dc2", "dc3"], within=10)
    return guard


def vouching_now(guard: GuardProcess) -> list[str] | None:
    """Whom the guard counts as vouching now, by its log (None: nobody, or not counted)."""
    events = guard.events(VOUCHING)
    if not events or not events[-1]["counted"]:
        return None
    return sorted(events[-1]["vouching"])


async def first_refusal_in(fleet: SiteFleet, site: str, within: float) -> float | None:
    """Write to the primary from a client in ``site`` every 0.2 s until one is refused:
    the wall time of that refusal, or None after ``within``."""
    until = time.monotonic() + within
    while time.monotonic() < until:
        if await in_site_writable(fleet.rig.pair.primary, fleet.sites[site]) is False:
            return time.time()
        await asyncio.sleep(0.2)
    return None


async def guard_key_gone(fleet: SiteFleet, within: float) -> tuple[float | None, float] | None:
    """Read the guard's key every 0.1 s from the members outside site a until it is
    gone: (the wall time of the start of the last read that still saw it, of the end of
    the first that did not): the key vanished in between. None if it never went within
    ``within``."""
    outside = [m.client_url for m in fleet.rig.etcd.members[1:]]
    seen: float | None = None
    until = time.monotonic() + within
    async with EtcdClient(outside, timeout=1.0) as client:
        while time.monotonic() < until:
            started = time.time()
            try:
                present = await client.get(GUARD_ALIVE) is not None
            except StoreUnavailable:  # the members left electing a new etcd leader
                present = None  # unknown: proves nothing either way
            if present is False:
                return seen, time.time()
            if present:
                seen = started
            await asyncio.sleep(0.1)
    return None


# The guard without ``guard.watchers``, and with the three watchers asked to vouch: dc1,
# in the cut-off site, still reaches the primary, but one of three is no majority.
@pytest.mark.parametrize("vouched", [False, True], ids=["unvouched", "vouched"])
async def test_the_primary_site_cut_off_is_fenced_by_its_guard_then_failed_over_once(
    site_fleet: SiteFleet, vouched: bool
) -> None:
    """Site a (primary, etcd1, dc1, guard) loses its link. The guard, with no sign of
    life (its lease gone with the store's quorum, the standby's replies gone, at most
    dc1 vouching), fences its primary; the leader dc3 promotes the standby once, only
    after the guard's key expired and its isolation timeout passed (and, vouched, that
    long and a ttl after the last vouch the guard could count). Healed: the old primary
    is still read-only, one promotion, one leader."""
    fleet = site_fleet
    rig = fleet.rig
    primary, standby = rig.pair.primary, rig.pair.standby
    guard = await start_sites(fleet, vouched=vouched)

    fleet.sites.cut("a")
    cut = time.time()
    refusal = asyncio.create_task(first_refusal_in(fleet, "a", ISO + timing.within(10)))
    key_gone = asyncio.create_task(guard_key_gone(fleet, 2 * TTL + timing.within(10)))
    # Clients in its own site still write to it: nothing fenced it yet.
    assert await in_site_writable(primary, fleet.sites["a"]) is True

    await rig.watchers["dc3"].wait_state("failed_over", within=35)
    refused = await refusal
    assert refused is not None, f"the isolated guard never fenced its database\n{rig.logs()}"
    # Not before its isolation timeout: its last sign of life (a renewal every ttl/3, a
    # standby reply every second) came at most ttl/3 before the cut.
    assert refused - cut >= ISO - TTL / 3 - 0.3, refused - cut
    isolated = guard.events("guard fenced its database: isolated")
    assert len(isolated) == 1, guard.logs()[-3000:]
    assert isolated[0]["silent_for"] >= ISO

    assert timeline(standby) == 2, rig.logs()
    assert not standby.is_in_recovery()
    records = await rig.store_journal()
    assert [r["type"] for r in records].count("failover_started") == 1
    assert await rig.promotions_in_store() == 1
    fenced, promote_started = guard_fence_then_promote(records)
    assert "cleared (expired)" in fenced["detail"], fenced["detail"]
    # The leader counts the isolation timeout from when it saw the guard's key gone:
    # no promotion before the key vanished (after it was last seen) + that timeout.
    gone = await key_gone
    assert gone is not None, "the cut-off guard's key never expired"
    last_seen, gone_at = gone
    assert last_seen is not None, "the guard's key was never seen after the cut"
    assert promote_started >= last_seen + ISO, promote_started - last_seen
    assert refused < promote_started, (refused, promote_started)
    if vouched:
        events = guard.events(VOUCHING)
        last_counted = max(i for i, e in enumerate(events) if e["counted"])
        assert events[last_counted + 1 :], events[-3:]
        uncounted = events[last_counted + 1]
        # Counted until the cut: the first round after it that the guard did not count
        # came once dc2's and dc3's answers timed out; none counted after that.
        assert wall_of(uncounted) > cut, (uncounted, cut)
        # dc1, in site a with the primary, vouched after the cut: not counted.
        alone = [e for e in events[last_counted + 1 :] if e["vouching"] == ["dc1"]]
        assert alone, events[last_counted:]
        # The last vouch counted came before the line saying none is: no promotion
        # before it + the isolation timeout. The leader's own rule waits a ttl more
        # after the last vouch it can bound, and the guard asked every poll until the cut.
        assert promote_started >= wall_of(uncounted) + ISO, promote_started - wall_of(uncounted)
        assert promote_started >= cut - GUARD_POLL_DEFAULT - 0.3 + ISO + TTL, promote_started - cut
        print(
            f"site a cut -> the guard counts no majority {wall_of(uncounted) - cut:.2f}s, "
            f"dc1 alone vouching in {len(alone)} of its {len(events) - last_counted - 1} "
            "changes since"
        )
    print(
        f"site a cut -> old primary fenced {refused - cut:.2f}s, guard key gone "
        f"{last_seen - cut:.2f}..{gone_at - cut:.2f}s, "
        f"promotion started {promote_started - cut:.2f}s"
    )

    fleet.sites.heal("a")
    healed = await rig.leader(within=20)
    assert healed == "dc3", healed

    # Back in touch, the guard finds the leader's standing order and carries it out on
    # its already fenced database (ending its client sessions again), then acknowledges.
    async def acked_fenced() -> bool:
        ack = await stored_ack(rig)
        return ack is not None and ack.fenced

    await eventually(acked_fenced, within=10)
    assert await writable(primary) is False  # fenced, and still so with its site back
    assert not primary.is_in_recovery()
    assert primary.execute("SHOW default_transaction_read_only") == "on"
    await rig.wait_all(lambda s: s["store"]["leader"] == "dc3", 15, "following dc3")
    await asyncio.sleep(1.0)  # and nobody promotes again
    assert timeline(standby) == 2
    assert await rig.promotions_in_store() == 1
    assert await writable(standby) is True


async def test_the_leaders_site_cut_off_moves_the_leadership_and_fails_nothing_over(
    site_fleet: SiteFleet,
) -> None:
    """Site c (etcd3 and the leader dc3, no database) loses its link. dc3 sees the
    primary down but has lost the store; dc1 and dc2 elect a new leader among
    themselves and see the primary up: nothing is failed over or fenced. Healed: dc3
    follows the new leader."""
    fleet = site_fleet
    rig = fleet.rig
    primary, standby = rig.pair.primary, rig.pair.standby
    await start_sites(fleet)

    fleet.sites.cut("c")
    cut = time.monotonic()
    new = await fleet.leader("dc1", "dc2", within=TTL + 10, other_than="dc3")
    moved = time.monotonic() - cut
    assert new in ("dc1", "dc2")
    # dc3's authority (its last acknowledged renewal + ttl - margin) ended before its
    # lease expired in the store, so before anyone else could take the leader key.
    cut_off: dict[str, Any] = await rig.watchers["dc3"].status()
    assert cut_off["store"]["up"] is False, cut_off["store"]
    assert cut_off["store"]["deadline_in"] in (None, 0), cut_off["store"]
    # Past the outage threshold (2 s) and then some, as seen by the cut-off dc3.
    await asyncio.sleep(4.0)
    cut_off = await rig.watchers["dc3"].status()
    print(
        f"site c cut -> leader {new} after {moved:.2f}s; dc3 then: "
        f"{cut_off['state']} ({cut_off['reason']}), store {cut_off['store']}"
    )
    assert cut_off["state"] == "store_unavailable", (cut_off["state"], cut_off["reason"])
    assert standby.is_in_recovery() and timeline(standby) == 1
    assert await writable(primary) is True
    assert await rig.promotions_in_store() == 0
    assert "failover_started" not in [r["type"] for r in await rig.store_journal()]

    fleet.sites.heal("c")
    assert await rig.leader(within=20) == new
    await rig.wait_all(lambda s: s["state"] == "watching", 15, "watching")
    assert not (await rig.watchers["dc3"].status())["store"]["is_leader"]
    assert standby.is_in_recovery() and timeline(standby) == 1
    assert await writable(primary) is True
    assert await rig.promotions_in_store() == 0
