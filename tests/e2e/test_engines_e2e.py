"""Issue 7's proof for the MySQL/MariaDB and Redis engines: the daemon as a real process
over a real primary + replica of each (tests/support/mysql.py, tests/support/redis.py),
real SIGKILLs, the lag guard, and the database password kept out of everything an
operator reads (``watchdogctl failover --dry-run``, status, logs, journal)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.support import free_port
from tests.support import mysql as mysql_support
from tests.support import redis as redis_support
from tests.support.daemon import DaemonProcess, ctl
from tests.support.pg import eventually

Factory = Callable[..., DaemonProcess]
STEPS = ["stop_replication", "promote_standby", "repoint_app"]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def maria(mariadb_template_dir: Path) -> Iterator[mysql_support.MariaDBPair]:
    with mysql_support.mariadb_pair(mariadb_template_dir) as pair:
        yield pair


@pytest.fixture
def redis_pair() -> Iterator[redis_support.RedisPair]:
    with redis_support.redis_pair() as pair:
        yield pair


# --------------------------------------------------------------------------- helpers


def engine_config(
    tmp: Path,
    engine: str,
    primary_db: dict[str, Any],
    standby_db: dict[str, Any],
    hook: dict[str, Any],
    *,
    max_lag: str = "1MB",
) -> dict[str, Any]:
    """Modelled on lab_config(): the two engine built-ins, then an application hook
    that is handed the database password (as a real one would be, to repoint the app)."""
    return {
        "cluster": "orders",
        "primary": {"name": "main", "database": {"engine": engine, **primary_db}},
        "standby": {"name": "failover", "database": {"engine": engine, **standby_db}},
        "probe": {"interval": "500ms", "timeout": "300ms", "recovery_successes": 3},
        "failover": {
            "mode": "automatic",
            "outage_threshold": "1500ms",
            "max_lag": max_lag,
            "cooldown": "1h",
            "steps": [
                {"name": "stop_replication", "action": "stop_replication", "timeout": "10s"},
                {"name": "promote_standby", "action": "promote", "timeout": "10s"},
                {"name": "repoint_app", "action": "command", "timeout": "5s", **hook},
            ],
        },
        "metrics": {"listen": f"127.0.0.1:{free_port()}"},
        "control": {"socket": str(tmp / "run" / "control.sock")},
        "log": {"format": "json", "level": "info"},
        "state_dir": str(tmp / "state"),
    }


async def dry_run_is_masked(d: DaemonProcess, password: str, hook_env: dict[str, str]) -> None:
    """``watchdogctl failover --dry-run --force``: the plan rendered, a secret in it shown
    as ***, the password itself nowhere (human rendering and raw result)."""
    human = await ctl("--socket", d.socket, "failover", "--dry-run", "--force")
    assert human.code == 0, human
    head = human.out.splitlines()[0]
    assert (
        head.startswith("dry run (nothing was changed): failover ") and "main -> failover" in head
    )
    names = re.findall(r"^ *\d+\. (\S+) \[", human.out, re.MULTILINE)
    assert names == STEPS
    assert "repointed to failover with password" in human.out  # {standby.name} rendered
    raw = await ctl("--socket", d.socket, "failover", "--dry-run", "--force", "--json")
    assert raw.code == 0, raw
    plan = json.loads(raw.out)["plan"]
    assert (plan["from"], plan["to"], plan["forced"]) == ("main", "failover", True)
    assert [s["name"] for s in plan["steps"]] == STEPS
    assert {k: plan["steps"][1][k] for k in ("action", "node", "engine")} == {
        "action": "promote",
        "node": "failover",
        "engine": d.cfg["standby"]["database"]["engine"],
    }
    assert plan["steps"][2]["env"] == hook_env
    if "***" in json.dumps(hook_env):
        assert json.dumps(hook_env) in human.out
    for text in (human.out, human.err, raw.out, raw.err):
        assert password not in text
    # nothing was started by the dry run
    status = await d.status()
    assert status["state"] == "watching" and status["failover_in_progress"] is None
    assert not [r for r in d.journal() if r["type"] == "failover_started"]


def step_order(d: DaemonProcess) -> list[str]:
    return [r["step"] for r in d.journal() if r["type"] == "step_finished" and r["outcome"] == "ok"]


def assert_never_leaked(d: DaemonProcess, password: str, status: dict[str, Any]) -> None:
    """The hook printed the password; the daemon recorded *** in its place."""
    [hook] = [r for r in d.journal() if r.get("step") == "repoint_app" and r.get("detail")]
    assert hook["detail"] == "sh exited 0: repointed to failover with password ***"
    logged = [e for e in d.events() if e.get("event") == "step_completed"]
    assert any(e.get("detail", "").endswith("password ***") for e in logged)
    assert password not in d.logs()
    assert password not in (Path(d.cfg["state_dir"]) / "journal.jsonl").read_text()
    assert password not in json.dumps(status)


async def wait_lag_seen(d: DaemonProcess, more_than: int) -> None:
    """Until the daemon has seen the primary's new position (the guard's reference)."""

    async def seen() -> bool:
        lag = (await d.status())["lag"]["bytes"]
        return lag is not None and lag > more_than

    await eventually(seen, within=10, interval=0.1)


# --------------------------------------------------------------------------- MariaDB


def maria_hook() -> dict[str, Any]:
    return {
        "argv": ["sh", "-c", 'echo "repointed to {standby.name} with password $DB_PASSWORD"'],
        "env": {"DB_PASSWORD": "${MYSQL_PW}"},
    }


def maria_dsn(server: mysql_support.MariaDB) -> str:
    return f"mysql://watchdogd:${{MYSQL_PW}}@127.0.0.1:{server.port}/"


def app_write(pair: mysql_support.MariaDBPair, server: mysql_support.MariaDB, value: str) -> None:
    """A write as the application account (no READ_ONLY ADMIN), over TCP."""
    conn = server.tcp("app", pair.app_password)
    try:
        with conn.cursor() as cur:
            cur.execute("INSERT INTO app.t (v) VALUES (%s)", (value,))
    finally:
        conn.close()


def app_rows(server: mysql_support.MariaDB) -> list[str]:
    return [r["v"] for r in server.sql("SELECT v FROM app.t ORDER BY id")]


async def test_mariadb_primary_killed_fails_over_with_the_password_masked(
    maria: mysql_support.MariaDBPair, daemon_factory: Factory, tmp_path: Path
) -> None:
    cfg = engine_config(
        tmp_path,
        "mysql",
        {"dsn": maria_dsn(maria.primary)},
        {"dsn": maria_dsn(maria.replica)},
        maria_hook(),
    )
    d = daemon_factory(cfg, env={"MYSQL_PW": maria.password})
    await d.start()
    await d.wait_state("watching")
    app_write(maria, maria.primary, "before-kill")
    maria.wait_replica_caught_up()
    await dry_run_is_masked(d, maria.password, {"DB_PASSWORD": "***"})

    maria.primary.kill()
    status = await d.wait_state("failed_over", within=20)

    assert step_order(d) == STEPS
    assert status["roles"] == {"primary": "failover", "standby": "main"}
    assert status["last_failover"]["outcome"] == "completed"
    # the promoted replica takes the application's writes and kept the replicated row
    app_write(maria, maria.replica, "after-failover")
    assert app_rows(maria.replica) == ["before-kill", "after-failover"]
    assert mysql_support.replica_status(maria.replica) == {}  # no channel left
    assert maria.replica.sql("SELECT @@read_only AS ro")[0]["ro"] == 0
    assert_never_leaked(d, maria.password, status)


async def test_mariadb_lag_guard_blocks_when_the_replica_stopped_receiving(
    maria: mysql_support.MariaDBPair, daemon_factory: Factory, tmp_path: Path
) -> None:
    cfg = engine_config(
        tmp_path,
        "mysql",
        {"dsn": maria_dsn(maria.primary)},
        {"dsn": maria_dsn(maria.replica)},
        maria_hook(),
        max_lag="64kB",
    )
    d = daemon_factory(cfg, env={"MYSQL_PW": maria.password})
    await d.start()
    await d.wait_state("watching")
    maria.replica.sql("STOP SLAVE IO_THREAD")
    # ~200 kB of binlog the replica never receives
    maria.primary.script(
        *(f"INSERT INTO app.t (v) VALUES (REPEAT('{i % 10}', 100))" for i in range(1500))
    )
    await wait_lag_seen(d, 64_000)

    maria.primary.kill()
    status = await d.wait_state("blocked", within=15)

    assert "lag guard" in status["reason"] and "max_lag" in status["reason"], status["reason"]
    await asyncio.sleep(1.0)
    assert (await d.status())["state"] == "blocked"
    assert mysql_support.replica_status(maria.replica)["Master_Port"] == maria.primary.port
    assert maria.replica.sql("SELECT @@read_only AS ro")[0]["ro"] == 1
    assert not [r for r in d.journal() if r["type"] == "failover_started"]


# --------------------------------------------------------------------------- Redis


def redis_hook(password_file: Path) -> dict[str, Any]:
    # The hook reads the password file itself and no ${ENV} holds the password: only
    # database.password_file tells the daemon the value it must mask in the output.
    return {
        "argv": [
            "sh",
            "-c",
            'echo "repointed to {standby.name} with password $(cat "$DB_PASSWORD_FILE")"',
        ],
        "env": {"DB_PASSWORD_FILE": str(password_file)},
    }


def redis_db(server: redis_support.RedisServer, password_file: Path) -> dict[str, Any]:
    return {"dsn": f"redis://127.0.0.1:{server.port}/0", "password_file": str(password_file)}


def redis_config(
    pair: redis_support.RedisPair, tmp: Path, *, max_lag: str = "1MB"
) -> dict[str, Any]:
    password_file = tmp / "redis.password"
    password_file.write_text(pair.password + "\n")
    password_file.chmod(0o600)
    return engine_config(
        tmp,
        "redis",
        redis_db(pair.primary, password_file),
        redis_db(pair.replica, password_file),
        redis_hook(password_file),
        max_lag=max_lag,
    )


async def test_redis_primary_killed_fails_over_with_the_password_masked(
    redis_pair: redis_support.RedisPair, daemon_factory: Factory, tmp_path: Path
) -> None:
    d = daemon_factory(redis_config(redis_pair, tmp_path))
    await d.start()
    await d.wait_state("watching")
    redis_pair.primary.call("SET", "before-kill", "1")
    redis_pair.wait_caught_up()
    await dry_run_is_masked(
        d, redis_pair.password, {"DB_PASSWORD_FILE": str(tmp_path / "redis.password")}
    )

    redis_pair.primary.kill()
    status = await d.wait_state("failed_over", within=20)

    assert step_order(d) == STEPS
    assert status["roles"] == {"primary": "failover", "standby": "main"}
    assert status["last_failover"]["outcome"] == "completed"
    assert redis_pair.replica.info()["role"] == "master"
    redis_pair.replica.call("SET", "after-failover", "2")
    assert redis_pair.replica.call("MGET", "before-kill", "after-failover") == ["1", "2"]
    assert_never_leaked(d, redis_pair.password, status)


async def test_redis_lag_guard_blocks_when_the_link_is_broken(
    redis_pair: redis_support.RedisPair, daemon_factory: Factory, tmp_path: Path
) -> None:
    cfg = redis_config(redis_pair, tmp_path, max_lag="32kB")
    d = daemon_factory(cfg)
    await d.start()
    await d.wait_state("watching")
    # The replica cannot re-authenticate, so its link stays down while the primary writes.
    redis_pair.replica.call("CONFIG", "SET", "masterauth", "wrong")
    redis_pair.primary.call("CLIENT", "KILL", "TYPE", "replica")
    await eventually(lambda: redis_pair.replica.info()["master_link_status"] == "down")
    with redis_pair.primary.client() as c:
        pipe = c.pipeline(transaction=False)
        for i in range(100):
            pipe.set(f"k{i}", "x" * 1000)
        pipe.execute()
    await wait_lag_seen(d, 32_000)

    redis_pair.primary.kill()
    status = await d.wait_state("blocked", within=15)

    assert "lag guard" in status["reason"] and "max_lag" in status["reason"], status["reason"]
    await asyncio.sleep(1.0)
    assert (await d.status())["state"] == "blocked"
    assert redis_pair.replica.info()["role"] == "slave"
    with pytest.raises(redis.ReadOnlyError):
        redis_pair.replica.call("SET", "too-early", "1")
    assert not [r for r in d.journal() if r["type"] == "failover_started"]


async def test_a_password_in_the_operators_reason_is_masked(
    redis_pair: redis_support.RedisPair, daemon_factory: Factory, tmp_path: Path
) -> None:
    """The operator's free text is shown back in plans, status, history and the journal,
    so it gets the same masking as everything else (a pasted password, say)."""
    d = daemon_factory(redis_config(redis_pair, tmp_path))
    await d.start()
    await d.wait_state("watching")
    password = redis_pair.password
    reason = f"rotating {password} after a leak"
    sock = ("--socket", d.socket)

    dry = await ctl(*sock, "failover", "--dry-run", "--force", "--json", "--reason", reason)
    assert dry.code == 0, dry
    assert json.loads(dry.out)["plan"]["reason"] == "rotating *** after a leak"

    real = await ctl(*sock, "failover", "--force", "--yes", "--json", "--reason", reason)
    assert real.code == 0, real
    await d.wait_state("failed_over", within=10)
    status = await ctl(*sock, "status", "--json")
    history = await ctl(*sock, "history", "--json")
    assert json.loads(status.out)["last_failover"]["reason"] == "rotating *** after a leak"
    for text in (dry.out, real.out, status.out, history.out, d.logs()):
        assert password not in text
    assert password not in (Path(d.cfg["state_dir"]) / "journal.jsonl").read_text()
