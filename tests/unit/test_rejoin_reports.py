"""The divergence report's shape and the engines' pure readers behind it (issue 16):
MariaDB GTID positions, MySQL GTID sets, PostgreSQL timeline history files, Redis
replication ids and offsets. The servers' side is in tests/integration/test_rejoin_*."""

from __future__ import annotations

from typing import Any

from watchdogd import actions, config
from watchdogd.actions import StepContext
from watchdogd.actions.builtin import rejoin_method
from watchdogd.core.model import Config
from watchdogd.engines import Divergence
from watchdogd.engines.mysql import _gtid_report, maria_pos, mysql_gtid_count
from watchdogd.engines.postgres import parse_history
from watchdogd.engines.redis import offset_divergence, parse_dsn


def test_divergence_says_diverged_only_when_known() -> None:
    assert Divergence(True, 0, "bytes").diverged is False
    assert Divergence(True, 12, "bytes").diverged is True
    assert Divergence(False, None, "bytes", detail="why").diverged is None
    report = Divergence(True, 2, "transactions", ("0-1-11", "0-1-12"), "two")
    data = report.as_dict()
    assert data == {
        "known": True,
        "diverged": True,
        "lost": 2,
        "unit": "transactions",
        "items": ["0-1-11", "0-1-12"],
        "detail": "two",
    }
    assert Divergence.from_dict(data) == report


def test_mariadb_positions_and_mysql_sets() -> None:
    assert maria_pos("0-1-12,3-2-7\n") == {0: (1, 12), 3: (2, 7)}
    assert maria_pos("") == {}
    uuid = "3e11fa47-71ca-11e1-9e33-c80aa9429562"
    assert mysql_gtid_count(f"{uuid}:1-5:7,\n{uuid[:-1]}3:2") == 7
    assert mysql_gtid_count("") == 0


def test_gtid_report_caps_its_list_and_says_so() -> None:
    gtids = [f"0-1-{n}" for n in range(11, 161)]
    report = _gtid_report(150, gtids, "gtid_slave_pos 0-1-10", "")
    assert report.lost == 150 and len(report.items) == 100 and report.items[0] == "0-1-11"
    assert "(0-1-11, 0-1-12, 0-1-13, 0-1-14, 0-1-15, ...)" in report.detail
    assert report.detail.endswith("(first 100 listed)")
    assert _gtid_report(0, [], "x", "").detail.startswith("nothing past x")


def test_timeline_history() -> None:
    text = "1\t0/3000060\tno recovery target specified\n\n2\t1/A0\tbefore 2000-01-01\n"
    assert parse_history(text) == {1: 0x3000060, 2: (1 << 32) + 0xA0}


def test_redis_offsets_against_the_fork() -> None:
    new = parse_dsn("redis://127.0.0.1:7001/0")
    promoted = {"master_replid": "b" * 40, "master_replid2": "a" * 40, "second_repl_offset": 1001}
    old = {"role": "master", "master_replid": "a" * 40, "master_repl_offset": 1000}
    assert offset_divergence(old, promoted, new).lost == 0
    ahead = offset_divergence({**old, "master_repl_offset": 1042}, promoted, new)
    assert ahead.lost == 42 and "past the fork at offset 1000" in ahead.detail
    stranger = offset_divergence({**old, "master_replid": "c" * 40}, promoted, new)
    assert not stranger.known and stranger.lost is None and "cannot be told" in stranger.detail
    replica = {"role": "slave", "master_host": "127.0.0.1", "master_port": 7001}
    assert offset_divergence(replica, promoted, new).lost == 0


def node_config(database: dict[str, Any]) -> Config:
    return config.parse(
        {
            "cluster": "orders",
            "primary": {"name": "main", "database": database},
            "standby": {
                "name": "failover",
                "database": {"engine": "postgres", "dsn": "postgresql://u@127.0.0.1:2/x"},
            },
            "failover": {"steps": [{"name": "back", "action": "rejoin"}]},
        }
    )


def test_the_rejoin_step_describes_who_rejoins_whom_and_how() -> None:
    plain = node_config({"engine": "postgres", "dsn": "postgresql://u@127.0.0.1:1/x"})
    step = actions.build(plain.failover.steps[0], plain)
    ctx = StepContext(plain, plain.primary, plain.standby, {}, "f1", "test", "manual")
    assert step.idempotent
    described = step.describe(ctx)
    assert described["node"] == "main" and described["replica_of"] == "failover"
    assert described["method"].startswith("none: database.data_dir is not set on main")

    local = node_config(
        {
            "engine": "postgres",
            "dsn": "postgresql://u@127.0.0.1:1/x",
            "data_dir": "/var/lib/postgresql/15/main",
            "rewind_fallback": "basebackup",
        }
    )
    assert rejoin_method(local.primary) == (
        "stop, pg_rewind against the new primary, standby.signal, start;"
        " a fresh pg_basebackup if pg_rewind cannot"
    )
