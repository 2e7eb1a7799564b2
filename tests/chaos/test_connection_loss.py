"""Issue 13, per engine and server profile: a killed primary closes the probing
connection, and the engine reports it at once (asyncpg's termination listener; for
redis-py and aiomysql, which offer no callback, the stream transport is watched). Our
own close is never reported. Real servers, a real SIGKILL."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tests.support import timing
from tests.support.cluster import ENGINES, PROFILES, Cluster, daemon_config
from tests.support.pg import eventually
from watchdogd import config as configmod
from watchdogd import engines

# Seconds after the kill: half of the matrix's 500 ms probe interval, so a loss noticed
# in time is never one the next scheduled probe found.
NOTICED_WITHIN = 0.25


def engine_for(cluster: Cluster, tmp: Path, role: str) -> engines.Engine:
    cfg = configmod.parse(daemon_config(cluster, tmp))
    node = cfg.primary if role == "primary" else cfg.standby
    return engines.create(node.database, set(cfg.secrets))


@pytest.mark.parametrize(("engine", "profile"), [(e, p) for e in ENGINES for p in PROFILES])
async def test_a_killed_primary_is_noticed_at_once(cluster: Cluster, tmp_path: Path) -> None:
    engine = engine_for(cluster, tmp_path, "primary")
    noticed: list[float] = []
    engine.on_connection_lost(lambda: noticed.append(time.monotonic()))
    try:
        assert (await engine.status(2.0)).is_primary  # opens the probing connection
        await asyncio.sleep(0.3)
        assert (await engine.status(2.0)).is_primary  # reused: still one connection
        assert noticed == []  # a healthy idle connection says nothing
        t_kill = time.monotonic()
        await asyncio.to_thread(cluster.primary.kill)
        await eventually(lambda: noticed, within=2.0)
        assert noticed[0] - t_kill <= timing.within(NOTICED_WITHIN), noticed[0] - t_kill
        await asyncio.sleep(0.2)
        assert len(noticed) == 1
    finally:
        await engine.close()


@pytest.mark.parametrize(("engine", "profile"), [(e, "tuned") for e in ENGINES])
async def test_closing_the_connection_ourselves_is_no_loss(
    cluster: Cluster, tmp_path: Path
) -> None:
    engine = engine_for(cluster, tmp_path, "standby")
    noticed: list[float] = []
    engine.on_connection_lost(lambda: noticed.append(time.monotonic()))
    assert not (await engine.status(2.0)).is_primary
    await engine.close()
    await asyncio.sleep(0.3)
    assert noticed == []
