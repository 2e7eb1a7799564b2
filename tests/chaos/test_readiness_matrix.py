"""Readiness on every engine and both server profiles, as ``watchdogd check-config
--online`` reports it: a healthy pair is ready, with a warning naming the replica's own
link timeout exactly where that setting slows detection (the shipped defaults), and a
crashed primary makes the replication check fail on the real standby."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_readiness import line_of, online
from tests.support.cluster import ENGINES, MARIADB, POSTGRES, PROFILES, REDIS, STOCK, Cluster
from tests.support.pg import eventually

# The replica's own rule for a silent link, per engine (the setting the warning names).
SETTING = {POSTGRES: "wal_receiver_timeout", MARIADB: "slave_net_timeout", REDIS: "repl-timeout"}
THRESHOLD = 5.0  # between the tuned profiles' 2s and the shipped 60s


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


@pytest.mark.parametrize(("engine", "profile"), [(e, p) for e in ENGINES for p in PROFILES])
async def test_readiness_on_each_engine_and_profile(
    cluster: Cluster,
    engine: str,
    profile: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in cluster.env.items():
        monkeypatch.setenv(name, value)
    cfg = config(cluster, tmp_path)
    code, lines = await online(cfg, tmp_path, capsys)
    assert code == 0, lines
    warnings = [x.strip() for x in lines if x.strip().startswith("warning ")]
    if profile == STOCK:
        assert len(warnings) == 1, lines
        assert warnings[0].startswith(f"warning settings:failover: {SETTING[engine]} is "), lines
        assert lines[1] == "ready: 8 of 9 checks passed, the others warn"
    else:
        assert warnings == [], lines
        assert lines[1] == "ready: 9 checks passed"

    await asyncio.to_thread(cluster.primary.kill)

    async def replication_down() -> bool:
        code, lines = await online(cfg, tmp_path, capsys)
        return code == 1 and any(x.strip().startswith("replication:") for x in lines)

    await eventually(replication_down, within=15, interval=0.2)
    code, lines = await online(cfg, tmp_path, capsys)
    assert code == 1, lines
    assert line_of(lines, "replication").startswith("replication: not streaming"), lines
    # the standby itself still answers as a standby: only its link is down
    assert not any(x.strip().startswith("standby_database:") for x in lines), lines
