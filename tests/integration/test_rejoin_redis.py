"""Rejoin on Redis (issue 16): after a failover by hand through the engine API, the
old primary's divergence report, its rejoin as a replica of the new primary, and
the verification, on a real pair with stock and tuned link settings."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.rejoin_checks import (
    eventually_true,
    refused_as_same_server,
    rejoin_under_load,
    twice_around,
    wait_replica_of,
)
from tests.support import redis as support
from tests.support.cluster import redis_cluster
from watchdogd import actions, config
from watchdogd.actions import ActionError, StepContext
from watchdogd.core.model import DatabaseConfig
from watchdogd.engines import EngineError
from watchdogd.engines import redis as engine_mod
from watchdogd.engines.redis import RedisEngine

pytestmark = pytest.mark.integration

Engines = tuple[RedisEngine, RedisEngine]


@pytest.fixture(params=[support.STOCK, support.TUNED])
def pair(request: pytest.FixtureRequest) -> Iterator[support.RedisPair]:
    with support.redis_pair(request.param) as p:
        yield p


def make_engine(dsn: str, **options: Any) -> RedisEngine:
    return engine_mod.create(DatabaseConfig("redis", dsn, options), set())


@pytest.fixture
async def failed_over(pair: support.RedisPair) -> AsyncIterator[Engines]:
    """(old primary, new primary): the replica promoted by hand, the old primary left
    running and writable, as after a partition."""
    old, new = make_engine(pair.dsn(pair.primary)), make_engine(pair.dsn(pair.replica))
    pair.primary.call("SET", "before", "1")
    pair.wait_caught_up()
    await new.promote(5)
    yield old, new
    await old.close()
    await new.close()


def resp(*args: str) -> int:
    """The bytes one command takes in the replication stream."""
    return len(f"*{len(args)}\r\n") + sum(len(f"${len(a)}\r\n{a}\r\n") for a in args)


async def test_nothing_diverged_then_rejoin(pair: support.RedisPair, failed_over: Engines) -> None:
    old, new = failed_over
    report = await old.divergence(new, 2)
    assert report.known and report.lost == 0 and report.diverged is False, report
    assert report.unit == "bytes" and "nothing past the fork" in report.detail

    done = await old.rejoin(new, 10)
    assert f"now a replica of 127.0.0.1:{pair.replica.port}" in done
    await wait_replica_of(old, new)
    pair.replica.call("SET", "after", "1")
    await eventually_true(lambda: pair.primary.call("GET", "after") == "1")
    assert pair.primary.call("GET", "before") == "1"

    # Idempotent: a second rejoin only checks, and the report says nothing to lose.
    assert (await old.rejoin(new, 5)).startswith("already a replica of")
    again = await old.divergence(new, 2)
    assert again.lost == 0 and "already a replica" in again.detail


async def test_an_old_primary_dsn_that_reaches_the_new_primary_is_refused(
    pair: support.RedisPair, failed_over: Engines
) -> None:
    # The node's DSN names the new primary under another name (localhost for 127.0.0.1,
    # as a VIP or DNS name moved to it would): the rejoin would make it a replica of itself.
    _, new = failed_over
    same = make_engine(pair.dsn(pair.replica).replace("127.0.0.1", "localhost"))
    await refused_as_same_server(same, new, "run_id")
    assert pair.replica.call("ROLE")[0] == "master"
    pair.replica.call("SET", "still-writable", "1")


async def test_diverged_writes_are_named_then_thrown_away(
    pair: support.RedisPair, failed_over: Engines
) -> None:
    old, new = failed_over
    written = [("SET", f"split-{i}", "x") for i in range(3)]
    for command in written:
        pair.primary.call(*command)
    report = await old.divergence(new, 2)
    assert report.known and report.diverged is True, report
    least = sum(resp(*c) for c in written)
    # The writes themselves, plus at most a SELECT the stream needs before them.
    assert least <= (report.lost or 0) <= least + resp("SELECT", "0"), report
    assert f"{report.lost} bytes" in report.detail

    await old.rejoin(new, 10)
    await wait_replica_of(old, new)
    assert pair.primary.call("EXISTS", *(c[1] for c in written)) == 0
    pair.replica.call("SET", "after", "1")
    await eventually_true(lambda: pair.primary.call("GET", "after") == "1")


async def test_rejoin_refuses_a_partner_that_is_not_a_primary(pair: support.RedisPair) -> None:
    old, replica = make_engine(pair.dsn(pair.primary)), make_engine(pair.dsn(pair.replica))
    try:
        # Before any failover the "new primary" is still a replica: nothing to rejoin to.
        with pytest.raises(EngineError, match=r"rejoin: 127\.0\.0\.1:\d+ is not a primary$"):
            await old.rejoin(replica, 5)
        with pytest.raises(EngineError, match=r"replica_of: .* is not a primary$"):
            await old.replica_of(replica, 2)
        with pytest.raises(EngineError, match=r"rejoin: the new primary is this same server$"):
            await old.rejoin(make_engine(pair.dsn(pair.primary)), 2)
    finally:
        await old.close()
        await replica.close()


async def test_the_rejoin_step_rejoins_the_node_failed_away_from(
    pair: support.RedisPair, failed_over: Engines
) -> None:
    """The built-in step as a rejoin sequence runs it: ``primary`` is the node failed
    away from (the old primary), ``standby`` the new primary."""
    old, new = failed_over
    cfg = config.parse(
        {
            "cluster": "orders",
            "primary": {
                "name": "main",
                "database": {"engine": "redis", "dsn": pair.dsn(pair.primary)},
            },
            "standby": {
                "name": "failover",
                "database": {"engine": "redis", "dsn": pair.dsn(pair.replica)},
            },
            "failover": {"steps": [{"name": "back", "action": "rejoin"}]},
        }
    )
    step = actions.build(cfg.failover.steps[0], cfg)
    ctx = StepContext(cfg, cfg.primary, cfg.standby, {"main": old, "failover": new}, "f1", "", "")
    assert step.describe(ctx) == {
        "node": "main",
        "replica_of": "failover",
        "engine": "redis",
        "method": "REPLICAOF the new primary, wait for the link and the sync",
    }
    assert "now a replica of" in await step.run(ctx, 10)
    await wait_replica_of(old, new)
    assert (await step.run(ctx, 5)).startswith("already a replica of")
    # The other way round the new primary would follow its own old primary: refused.
    backwards = StepContext(cfg, cfg.standby, cfg.primary, ctx.engines, "f1", "", "")
    with pytest.raises(ActionError, match=r"^rejoin of failover to main: redis .*: rejoin: "):
        await step.run(backwards, 5)


async def test_twice_around_the_pair(pair: support.RedisPair, failed_over: Engines) -> None:
    """Fail over, rejoin, fail back, rejoin: each node rejoins once, losing nothing."""
    a, b = failed_over
    await twice_around(
        a,
        b,
        lambda key: pair.replica.call("SET", key, "1"),
        lambda key: pair.primary.call("SET", key, "1"),
    )
    for server in (pair.primary, pair.replica):
        assert server.call("EXISTS", "before", "via-a", "via-b") == 3, server.name


@pytest.mark.parametrize("profile", [support.STOCK, support.TUNED])
async def test_rejoin_and_verification_finish_while_the_new_primary_takes_writes(
    profile: str, tmp_path: Path
) -> None:
    """A few hundred writes a second on the new primary, from before the rejoin until
    after its verification: REPLICAOF (a partial resync from the fork) and the
    verification finish in bounded time, and every acknowledged write reaches the
    rejoined server."""
    support.binary()
    await rejoin_under_load(redis_cluster(profile), tmp_path, 10)
