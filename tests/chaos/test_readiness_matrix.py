"""Readiness on every engine and both server profiles, as ``watchdogd check-config
--online`` reports it: a healthy pair is ready, with a warning naming the replica's own
link timeout exactly where that setting slows detection (the shipped defaults), and a
crashed primary makes the replication check fail on the real standby.

Idle and under a steady write load on the primary (the chaos matrix's ``Load``, a few
hundred small writes a second): the lag that is normal under load stays within the
guard and never makes a healthy pair "not ready", and a standby whose replication is
detached while the primary goes on taking writes is still reported not ready."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_readiness import line_of, online
from tests.support.cluster import (
    ENGINES,
    MARIADB,
    POSTGRES,
    PROFILES,
    REDIS,
    STOCK,
    Cluster,
    Load,
)
from tests.support.pg import eventually
from tests.support.proxy import REFUSE, FaultProxy

# The replica's own rule for a silent link, per engine (the setting the warning names).
SETTING = {POSTGRES: "wal_receiver_timeout", MARIADB: "slave_net_timeout", REDIS: "repl-timeout"}
THRESHOLD = 5.0  # between the tuned profiles' 2s and the shipped 60s
CELLS = [(e, p) for e in ENGINES for p in PROFILES]
# The writer on the primary under load: a write every 3 ms at most.
LOAD_EVERY = 0.003
# Under load the lag guard is given a bound in seconds too (the bytes bound is the
# default 16 MB), far above the lag of a healthy pair, far below the shipped timeouts.
LOAD_MAX_LAG_SECONDS = "5s"


def config(cluster: Cluster, tmp: Path) -> dict[str, Any]:
    return {
        "cluster": "orders",
        "primary": {"name": "main", "database": cluster.database(cluster.primary)},
        "standby": {"name": "failover", "database": cluster.database(cluster.standby)},
        "probe": {"interval": "1s", "timeout": "500ms"},
        # The default two steps and the default rejoin step: with the pair's four checks
        # and one settings check per node, nine in all.
        "failover": {"outage_threshold": f"{THRESHOLD:g}s"},
        "metrics": {"enabled": False},
        "control": {"socket": str(tmp / "run" / "control.sock")},
        "state_dir": str(tmp / "state"),
    }


async def assert_ready(
    cluster: Cluster, cfg: dict[str, Any], tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ready, with the one warning the shipped defaults deserve and none when tuned."""
    code, lines = await online(cfg, tmp, capsys)
    assert code == 0, lines
    warnings = [x.strip() for x in lines if x.strip().startswith("warning ")]
    if cluster.profile == STOCK:
        assert len(warnings) == 1, lines
        setting = SETTING[cluster.engine]
        assert warnings[0].startswith(f"warning settings:failover: {setting} is "), lines
        assert lines[1] == "ready: 8 of 9 checks passed, the others warn"
    else:
        assert warnings == [], lines
        assert lines[1] == "ready: 9 checks passed"


async def assert_not_streaming(
    cfg: dict[str, Any], tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Soon not ready for the replication check alone: the standby itself still
    answers as a standby, only its link is down."""

    async def replication_down() -> bool:
        code, lines = await online(cfg, tmp, capsys)
        return code == 1 and any(x.strip().startswith("replication:") for x in lines)

    await eventually(replication_down, within=15, interval=0.2)
    code, lines = await online(cfg, tmp, capsys)
    assert code == 1, lines
    assert line_of(lines, "replication").startswith("replication: not streaming"), lines
    assert not any(x.strip().startswith("standby_database:") for x in lines), lines


@pytest.fixture
def cfg(cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The cell's config, with the cluster's environment set for check-config."""
    for name, value in cluster.env.items():
        monkeypatch.setenv(name, value)
    return config(cluster, tmp_path)


@pytest.mark.parametrize(("engine", "profile"), CELLS)
async def test_readiness_on_each_engine_and_profile(
    cluster: Cluster, cfg: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await assert_ready(cluster, cfg, tmp_path, capsys)

    await asyncio.to_thread(cluster.primary.kill)
    await assert_not_streaming(cfg, tmp_path, capsys)


@pytest.mark.parametrize(("engine", "profile"), CELLS)
async def test_under_write_load_a_healthy_pair_stays_ready_and_a_detached_one_is_not(
    cluster: Cluster,
    cfg: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    fault_proxy: Callable[[int], Awaitable[FaultProxy]],
) -> None:
    """A few hundred writes a second on the primary throughout. Asked three times, the
    pair is ready every time (the lag guard, in bytes and in seconds, sees the lag of
    a busy, healthy pair as within bounds). Then the standby's replication is cut
    off (it replicates through a proxy that now resets every connection) while the
    primary goes on taking writes: not ready, for the replication check."""
    proxy = await fault_proxy(cluster.primary.port)
    await cluster.repoint_standby(proxy.port)
    cfg["failover"]["max_lag_seconds"] = LOAD_MAX_LAG_SECONDS
    load = Load(cluster, every=LOAD_EVERY)
    landed: list[int] = []  # writes the primary acknowledged while each check ran
    async with load.running():
        await asyncio.sleep(0.5)
        for _ in range(3):
            before = len(load.acked)
            await assert_ready(cluster, cfg, tmp_path, capsys)
            landed.append(len(load.acked) - before)
        proxy.set_mode(REFUSE)
        before = len(load.acked)
        await assert_not_streaming(cfg, tmp_path, capsys)
        landed.append(len(load.acked) - before)
    assert load.failed == 0, f"{load.failed} writes on the primary failed"
    assert all(landed), f"no write landed during some check: {landed}"
    cell = f"{cluster.engine}-{cluster.profile}"
    print(f"{cell}: writes during each check {landed}, {len(load.acked)} in all")
