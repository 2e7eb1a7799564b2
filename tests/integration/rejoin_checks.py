"""What the rejoin tests of every engine share: waiting until the old primary is a
verified replica of the new one, as the daemon's verification loop does, and the
rejoin under a steady write load on the new primary (``rejoin_under_load``)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support import timing
from tests.support.cluster import Cluster, Load, MariaCluster, PgCluster, RedisCluster
from tests.support.pg import eventually
from watchdogd import config, engines
from watchdogd.actions import StepContext
from watchdogd.core.model import Config
from watchdogd.daemon.sequences import VerifyRejoin
from watchdogd.engines import Engine, EngineError


async def wait_replica_of(old: Engine, new: Engine, within: float = 10.0) -> str:
    """``old.replica_of(new)`` until it succeeds; fail with its last reason after ``within``."""
    deadline = time.monotonic() + timing.within(within)
    while True:
        try:
            return await old.replica_of(new, 2.0)
        except EngineError as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"not a replica of the new primary: {exc}") from None
        await asyncio.sleep(0.05)


async def eventually_true(check: Callable[[], object], within: float = 10.0) -> None:
    """Poll ``check()`` (a quick synchronous read) until it is truthy; fail after ``within``."""
    deadline = time.monotonic() + timing.within(within)
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within:g}s")
        await asyncio.sleep(0.05)


async def twice_around(
    a: Engine,
    b: Engine,
    write_on_b: Callable[[str], object],
    write_on_a: Callable[[str], object],
    rejoin_timeout: float = 10.0,
) -> None:
    """After a failover from ``a`` to ``b``: ``a`` rejoins (nothing diverged), a write
    ``via-b`` on ``b`` reaches it, ``a`` takes over again, ``b`` rejoins, a write
    ``via-a`` on ``a`` reaches it, and ``b`` takes over again."""
    for old, new, write, key in ((a, b, write_on_b, "via-b"), (b, a, write_on_a, "via-a")):
        report = await old.divergence(new, 5)
        assert report.known and report.lost == 0, report
        await old.rejoin(new, rejoin_timeout)
        await wait_replica_of(old, new)
        write(key)
        await wait_replica_of(old, new)  # replayed up to the write
        await old.promote(10)  # the next failure: the rejoined node takes over again


async def refused_as_same_server(same: Engine, new: Engine, identity: str) -> None:
    """Through ``same`` (a DSN that reaches the new primary under another name) the
    check made before the rejoin's fence, the divergence report and the rejoin are all
    refused, naming the shared ``identity``; then ``same`` is closed."""
    try:
        for call in (same.distinct_from, same.divergence, same.rejoin):
            with pytest.raises(EngineError, match=rf"are the same server \({identity}") as caught:
                await call(new, 10)
            assert "\n" not in str(caught.value)
    finally:
        await same.close()


# The writer on the new primary: one small write every 3 ms at most, a few hundred a
# second (the chaos matrix's Load, at a higher rate), each acknowledged one recorded.
LOAD_EVERY = 0.003
LOAD_WARMUP = 0.5  # seconds of writes on the new primary before the rejoin starts


def swap_roles(cluster: Cluster) -> None:
    """After a failover by hand: the cluster's primary is the node failed over to, so
    its writes (``Load``), ``keys`` and ``wait_caught_up`` follow the new roles."""
    if isinstance(cluster, PgCluster) and cluster.pair is not None:
        cluster.pair.primary, cluster.pair.standby = cluster.pair.standby, cluster.pair.primary
    elif isinstance(cluster, (MariaCluster, RedisCluster)) and cluster.pair is not None:
        cluster.pair.primary, cluster.pair.replica = cluster.pair.replica, cluster.pair.primary
    else:
        raise AssertionError(f"no pair to swap in {cluster!r}")


@dataclass
class FailedOver:
    """A cluster failed over by hand: ``cluster.primary`` is now the new primary, and
    the engines are those of the daemon's config: ``old`` (main) and ``new`` (failover)."""

    cluster: Cluster
    cfg: Config
    old: Engine
    new: Engine
    seeded: set[str]

    async def verify(self) -> str:
        """The daemon's own verification step (``verify_rejoin``), bounded by
        ``failover.rejoin_timeout``; ActionError when it fails."""
        engines_ = {"main": self.old, "failover": self.new}
        ctx = StepContext(self.cfg, self.cfg.primary, self.cfg.standby, engines_, "r1", "", "")
        return await VerifyRejoin().run(ctx, self.cfg.failover.rejoin_timeout)


@contextlib.asynccontextmanager
async def failed_over_by_hand(
    cluster: Cluster, tmp: Path, rejoin_timeout: float, **old_options: Any
) -> AsyncIterator[FailedOver]:
    """Seed ``cluster``, promote its standby by hand (the old primary left running and
    writable, as after a partition) and swap its roles. ``old_options`` are added to
    the old primary's database section."""
    seeded = await cluster.seed("seed")
    old_node, new_node = cluster.primary, cluster.standby
    main = {**cluster.database(old_node), **cluster.rejoin_options(old_node), **old_options}
    cfg = config.parse(
        {
            "cluster": "orders",
            "primary": {"name": "main", "database": main},
            "standby": {"name": "failover", "database": cluster.database(new_node)},
            "failover": {"rejoin_timeout": f"{rejoin_timeout:g}s"},
            "metrics": {"enabled": False},
            "control": {"socket": str(tmp / "control.sock")},
            "state_dir": str(tmp / "state"),
        }
    )
    old = engines.create(cfg.primary.database, set())
    new = engines.create(cfg.standby.database, set())
    try:
        await cluster.reset_writer()
        await new.promote(10)
        swap_roles(cluster)
        yield FailedOver(cluster, cfg, old, new, seeded)
    finally:
        await old.close()
        await new.close()


async def all_acked_on_both(cluster: Cluster, acked: set[str]) -> None:
    """Once the rejoined node has caught up: every write in ``acked`` is on the new
    primary and on the rejoined old primary (the cluster's roles are swapped)."""
    await cluster.wait_caught_up(timing.within(15))
    for node, role in ((cluster.primary, "new primary"), (cluster.standby, "rejoined node")):
        missing = acked - await cluster.keys(node)
        assert not missing, f"{len(missing)} acknowledged writes missing on the {role}"


async def rejoin_under_load(
    cluster: Cluster, tmp: Path, within: float, rejoin_timeout: float = 60, **old_options: Any
) -> None:
    """Fail ``cluster`` over by hand, start a steady writer on the new primary, then
    rejoin the old primary and run the daemon's own verification step while the
    writes go on. Asserts that nothing diverged, that the rejoin and the verification
    each finish ``within`` seconds under load, that the new primary acknowledged
    every write, and, once the writer has stopped and the rejoined node has caught
    up, that both hold every write ever acknowledged. Closes ``cluster``."""
    try:
        took = await _rejoin_under_load(cluster, tmp, rejoin_timeout, **old_options)
    finally:
        await cluster.aclose()
    print(f"{cluster.engine}-{cluster.profile} rejoined under load: {took}")
    assert took["rejoin"] < timing.within(within), took
    assert took["verify"] < timing.within(within), took


async def _rejoin_under_load(
    cluster: Cluster, tmp: Path, rejoin_timeout: float, **old_options: Any
) -> dict[str, float]:
    async with failed_over_by_hand(cluster, tmp, rejoin_timeout, **old_options) as f:
        load = Load(cluster, every=LOAD_EVERY, tag="on-new")
        async with load.running():
            await asyncio.sleep(LOAD_WARMUP)
            report = await f.old.divergence(f.new, 5)
            assert report.known and report.lost == 0, report
            before = len(load.acked)
            started = time.monotonic()
            await f.old.rejoin(f.new, rejoin_timeout)
            rejoined = time.monotonic()
            detail = await f.verify()
            verified = time.monotonic()
            during = len(load.acked) - before
            await asyncio.sleep(LOAD_WARMUP)  # and the writes go on past the verification
            after = len(load.acked) - before - during
        assert "replica of" in detail, detail
        took = {"rejoin": rejoined - started, "verify": verified - rejoined}
        assert load.failed == 0, f"{load.failed} writes on the new primary failed"
        # The writer ran before the rejoin and after the verification, never failing:
        # all along (a loaded machine makes it far slower than its few hundred a second).
        assert before >= 10 and after >= 10, (before, during, after)
        await all_acked_on_both(cluster, f.seeded | set(load.acked))
        return {**took, "writes_during": float(during), "writes": float(len(load.acked))}


async def verified_while_steadily_behind(
    f: FailedOver, delay: Callable[[], Awaitable[None]], behind: float
) -> float:
    """After the rejoin, ``delay()`` makes the rejoined node apply the stream
    ``behind`` seconds late (as a replica steadily behind a busy primary is), then a
    writer keeps the new primary busy: every position read from it is ahead of what
    the replica has applied at that moment. The verification still passes, once the
    replica has applied up to the position read when it began, and no sooner; every
    acknowledged write reaches the replica. Returns the seconds the verification took."""
    await f.old.rejoin(f.new, f.cfg.failover.rejoin_timeout)
    await delay()
    load = Load(f.cluster, every=LOAD_EVERY, tag="delayed")
    async with load.running():
        await asyncio.sleep(LOAD_WARMUP + behind)  # the replica now lags, steadily
        # Start right after the writer's next acknowledged write: the position the
        # verification reads is then that fresh, and the replica reaches it only
        # ``behind`` later (a writer starved on a loaded machine may have written
        # nothing for a second, leaving a target the replica had already applied).
        acked = len(load.acked)
        await eventually(lambda: len(load.acked) > acked, within=10, interval=0.005)
        started = time.monotonic()
        detail = await f.verify()
        took = time.monotonic() - started
    assert "replica of" in detail, detail
    assert load.failed == 0, f"{load.failed} writes on the new primary failed"
    assert took >= behind / 2, f"verified after {took:.2f}s of a replica {behind}s behind"
    await all_acked_on_both(f.cluster, f.seeded | set(load.acked))
    return took
