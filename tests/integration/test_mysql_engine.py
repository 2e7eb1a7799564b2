"""The MySQL/MariaDB engine against a real MariaDB primary + replica (tests/support/mysql.py)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pymysql  # type: ignore[import-untyped]  # no stubs in the test extras
import pytest

from tests.integration.engine_checks import check_bounded_when_sigstopped, eventually
from tests.support import mysql as support
from watchdogd.core.model import DatabaseConfig
from watchdogd.core.section import Section
from watchdogd.engines import EngineError
from watchdogd.engines import mysql as engine_mod
from watchdogd.engines.mysql import Channel, Flavour, MySQLEngine, binlog_pos

pytestmark = pytest.mark.integration

Engines = tuple[MySQLEngine, MySQLEngine]


@pytest.fixture
def pair(mariadb_template_dir: Path) -> Iterator[support.MariaDBPair]:
    with support.mariadb_pair(mariadb_template_dir) as p:
        yield p


def make_engine(dsn: str, secrets: set[str] | None = None, **options: Any) -> MySQLEngine:
    return engine_mod.create(DatabaseConfig("mysql", dsn, options), secrets or set())


@pytest.fixture
async def engines(pair: support.MariaDBPair) -> AsyncIterator[Engines]:
    primary = make_engine(pair.dsn(pair.primary))
    replica = make_engine(pair.dsn(pair.replica))
    yield primary, replica
    await primary.close()
    await replica.close()


def app_write(pair: support.MariaDBPair, server: support.MariaDB, value: str) -> None:
    """A write as the application account (no READ_ONLY ADMIN) over TCP."""
    conn = server.tcp("app", pair.app_password)
    try:
        with conn.cursor() as cur:
            cur.execute("INSERT INTO app.t (v) VALUES (%s)", (value,))
    finally:
        conn.close()


def rows(server: support.MariaDB) -> list[str]:
    return [r["v"] for r in server.sql("SELECT v FROM app.t ORDER BY id")]


# --------------------------------------------------------------------------- status


async def test_status_on_primary_and_replica(pair: support.MariaDBPair, engines: Engines) -> None:
    primary, replica = engines
    p = await primary.status(2)
    assert p.is_primary and p.writable
    assert p.current_pos is not None and "MariaDB" in p.detail and "read-write" in p.detail

    r = await replica.status(2)
    assert not r.is_primary and not r.writable
    assert r.streaming is True and r.replay_paused is False and r.lag_seconds == 0.0
    assert r.receive_pos == r.replay_pos == p.current_pos

    app_write(pair, pair.primary, "one")
    p2 = await primary.status(2)
    assert p2.current_pos is not None and p2.current_pos > p.current_pos
    await eventually(lambda: replica.status(2), lambda s: s.replay_pos == p2.current_pos)

    # Heartbeats arrive every second (MASTER_HEARTBEAT_PERIOD=1): once the engine
    # has seen the receive state change, it knows how long ago it heard from the primary.
    r = await eventually(
        lambda: replica.status(2), lambda s: s.last_receive_age is not None, timeout=4
    )
    assert r.last_receive_age is not None and 0 <= r.last_receive_age < 2.5
    assert r.link_timeout == 60.0  # the replica's own slave_net_timeout (the default)


def test_binlog_position_folds_file_index_and_offset() -> None:
    assert binlog_pos("binlog.000007", 1934) == 7 * 2**32 + 1934
    assert binlog_pos("binlog.000008", 4) > binlog_pos("binlog.000007", 2**31)  # type: ignore[operator]
    assert binlog_pos(None, 4) is None and binlog_pos("nodigits", 4) is None


async def test_lag_visible_while_sql_thread_stopped(
    pair: support.MariaDBPair, engines: Engines
) -> None:
    primary, replica = engines
    pair.replica.sql("STOP REPLICA SQL_THREAD")
    for i in range(20):
        app_write(pair, pair.primary, f"row{i}")
    p = await primary.status(2)
    r = await eventually(lambda: replica.status(2), lambda s: s.receive_pos == p.current_pos)
    assert r.replay_pos is not None and p.current_pos is not None
    assert p.current_pos - r.replay_pos > 0  # byte lag, as the daemon computes it
    assert r.streaming is True and r.replay_paused is True and r.lag_seconds is None
    assert "SQL No" in r.detail

    pair.replica.sql("START REPLICA SQL_THREAD")
    r = await eventually(lambda: replica.status(2), lambda s: s.replay_pos == p.current_pos)
    assert r.replay_paused is False


async def test_streaming_false_after_primary_killed(
    pair: support.MariaDBPair, engines: Engines
) -> None:
    primary, replica = engines
    assert (await replica.status(2)).streaming is True
    pair.primary.kill()
    r = await eventually(lambda: replica.status(2), lambda s: s.streaming is False)
    assert not r.is_primary and "IO Connecting" in r.detail
    with pytest.raises(EngineError, match=r"^mysql 127\.0\.0\.1:\d+: status: .*Can't connect"):
        await primary.status(1)


# --------------------------------------------------------------------------- failover


async def test_stop_replication_then_promote_accepts_writes(
    pair: support.MariaDBPair, engines: Engines
) -> None:
    _, replica = engines
    # A row received but not applied (SQL thread stopped), then the primary dies:
    # promotion must still apply it.
    pair.replica.sql("STOP REPLICA SQL_THREAD")
    app_write(pair, pair.primary, "received-not-applied")
    await eventually(lambda: replica.status(2), lambda s: s.receive_pos != s.replay_pos)
    pair.primary.kill()

    done = await replica.stop_replication(5)
    assert "started the stopped SQL thread" in done and "applied everything received" in done
    assert rows(pair.replica) == ["received-not-applied"]
    s = await replica.status(2)
    assert s.is_primary and not s.writable  # no channel, still read_only
    assert await replica.stop_replication(5) == "no replication configured: nothing to stop"

    with pytest.raises(pymysql.err.OperationalError, match="read-only"):
        app_write(pair, pair.replica, "too early")
    done = await replica.promote(5)
    assert done == "promoted: read_only turned off; write verified"
    app_write(pair, pair.replica, "after promotion")
    assert rows(pair.replica) == ["received-not-applied", "after promotion"]
    s = await replica.status(2)
    assert s.is_primary and s.writable and s.current_pos is not None
    heartbeat = pair.replica.sql("SELECT server_id FROM watchdogd.heartbeat")
    assert heartbeat == [{"server_id": 2}]


async def test_promote_twice_is_a_no_op(pair: support.MariaDBPair, engines: Engines) -> None:
    _, replica = engines
    first = await replica.promote(5)  # replication still configured: stops it, too
    assert first.startswith("promoted: stopped replication from 127.0.0.1:")
    assert "read_only turned off" in first
    before = await replica.status(2)
    second = await replica.promote(5)
    assert second == "already a writable primary: write verified, nothing changed"
    after = await replica.status(2)
    assert (
        (before.is_primary, before.writable) == (after.is_primary, after.writable) == (True, True)
    )
    assert support.replica_status(pair.replica) == {}


async def test_promote_keeps_relay_log_when_both_threads_were_stopped(
    pair: support.MariaDBPair, engines: Engines
) -> None:
    # MariaDB throws away a GTID channel's relay log when a replication thread
    # starts with both stopped: the engine must apply it without losing it.
    _, replica = engines
    pair.replica.sql("STOP REPLICA SQL_THREAD")
    app_write(pair, pair.primary, "only-in-relay-log")
    await eventually(lambda: replica.status(2), lambda s: s.receive_pos != s.replay_pos)
    pair.replica.sql("STOP REPLICA IO_THREAD")
    pair.primary.kill()
    await replica.promote(5)
    assert rows(pair.replica) == ["only-in-relay-log"]


async def test_promote_refuses_when_sql_thread_failed(
    pair: support.MariaDBPair, engines: Engines
) -> None:
    _, replica = engines
    # A row that exists only on the replica makes the replicated INSERT collide.
    pair.replica.script("SET SESSION sql_log_bin = 0", "INSERT INTO app.t (id, v) VALUES (1, 'x')")
    app_write(pair, pair.primary, "collides")
    await eventually(lambda: replica.status(2), lambda s: "SQL error 1062" in s.detail)
    with pytest.raises(EngineError, match=r"promote: SQL thread stopped by error 1062") as err:
        await replica.promote(3)
    assert "\n" not in str(err.value)
    assert not (await replica.status(2)).is_primary  # nothing was changed


async def test_fence_refuses_writes(pair: support.MariaDBPair, engines: Engines) -> None:
    primary, _ = engines
    await primary.status(2)  # fence kills this probing connection too: status reconnects
    # A session holding LOCK TABLES blocks SET GLOBAL read_only: fence must end it.
    pair.primary.sql("GRANT LOCK TABLES ON app.* TO app@'127.0.0.1'")
    blocker = pair.primary.tcp("app", pair.app_password)
    blocker.cursor().execute("LOCK TABLES app.t WRITE")
    t0 = time.monotonic()
    done = await primary.fence(4)
    assert time.monotonic() - t0 < 4
    assert done.startswith("fenced: now read-only (read_only=ON)")
    assert "0 client connection" not in done
    with pytest.raises(pymysql.err.OperationalError):
        blocker.cursor().execute("SELECT 1")  # its session was killed
    blocker.close()
    with pytest.raises(pymysql.err.OperationalError, match="read-only"):
        app_write(pair, pair.primary, "after fence")
    s = await primary.status(2)
    assert s.is_primary and not s.writable and "read-only" in s.detail
    again = await primary.fence(4)
    assert again.startswith("already read-only")


# --------------------------------------------------------------------------- errors


async def test_bad_password_and_dead_port_are_one_clear_line(
    pair: support.MariaDBPair, closed_port: int
) -> None:
    wrong = "Wr0ng-" + pair.password
    engine = make_engine(pair.dsn(pair.primary, wrong), {wrong})
    with pytest.raises(EngineError) as err:
        await engine.status(2)
    text = str(err.value)
    assert text.startswith(f"mysql 127.0.0.1:{pair.primary.port}: status: Access denied")
    assert "\n" not in text and wrong not in text and pair.password not in text
    await engine.close()

    # The password from database.password (not the DSN) is used, and never shown.
    dsn = f"mysql://watchdogd@127.0.0.1:{pair.primary.port}/"
    good = make_engine(dsn, {pair.password}, password=pair.password)
    assert (await good.status(2)).is_primary
    await good.close()

    dead = make_engine(f"mysql://watchdogd:{wrong}@127.0.0.1:{closed_port}/", {wrong})
    t0 = time.monotonic()
    with pytest.raises(EngineError) as err:
        await dead.stop_replication(2)
    assert time.monotonic() - t0 < 2
    text = str(err.value)
    assert "stop_replication: Can't connect to MySQL server" in text
    assert "\n" not in text and wrong not in text
    await dead.close()


async def test_bounded_when_server_is_sigstopped(
    pair: support.MariaDBPair, engines: Engines
) -> None:
    primary, _ = engines
    await check_bounded_when_sigstopped(
        pair.primary.pid,
        primary,
        make_engine(pair.dsn(pair.primary)),
        "fence",
        limit=0.5,
        within=1.0,
        timeout=2,
    )


# --------------------------------------------------------------------------- config


def validate(data: dict[str, Any]) -> tuple[list[str], set[str], Any]:
    errors: list[str] = []
    secrets: set[str] = set()
    section = Section(data, "primary.database", errors, secrets)
    section.str("engine")
    section.str("dsn")
    options = engine_mod.validate(section)
    section.finish()
    return errors, secrets, options


@pytest.mark.parametrize(
    ("dsn", "message"),
    [
        ("postgresql://u:s3cret-pw@h/", "expected a URL like mysql://"),
        ("mysql://u:s3cret-pw@/", "expected a host"),
        ("mysql://:s3cret-pw@h:3306/", "expected a user"),
        ("mysql://u:s3cret-pw@h:99999/", "not a valid MySQL URL"),
        ("mysql://u:s3cret-pw@h/db?ssl=1", "query parameters are not supported"),
    ],
)
def test_bad_dsn_is_one_config_error_without_the_password(dsn: str, message: str) -> None:
    errors, _, _ = validate({"engine": "mysql", "dsn": dsn})
    assert len(errors) == 1, errors
    assert errors[0].startswith("primary.database.dsn: ") and message in errors[0]
    assert "s3cret-pw" not in errors[0]


def test_password_keys(tmp_path: Path) -> None:
    errors, secrets, options = validate({"engine": "mysql", "dsn": "mysql://u:inline-pw@h/"})
    assert errors == [] and options == {} and secrets == {"inline-pw"}

    pw_file = tmp_path / "pw"
    pw_file.write_text("file-pw\n")
    errors, secrets, options = validate(
        {"engine": "mysql", "dsn": "mysql://u@h/", "password_file": str(pw_file)}
    )
    assert errors == [] and options == {"password": "file-pw"} and "file-pw" in secrets
    assert "file-pw" not in repr(options)

    errors, _, _ = validate({"engine": "mysql", "dsn": "mysql://u:a-pw@h/", "password": "b-pw"})
    assert errors == [
        "primary.database.password: give the password either in dsn or in "
        "password/password_file, not both"
    ]


async def test_advise_names_the_settings_that_confirm_a_hang_in_time(
    pair: support.MariaDBPair, engines: Engines
) -> None:
    """Stock slave_net_timeout (60 s) is later than a 5 s threshold: the advice says so
    and gives statements that, run as written, fix it and keep replication running."""
    primary, replica = engines
    assert await primary.advise(5.0, 2.0) == []
    (advice,) = await replica.advise(5.0, 2.0)
    assert "slave_net_timeout is 60s on this replica" in advice
    statements = advice.split("on the replica: ", 1)[1].split(" (and", 1)[0]
    assert statements == (
        "SET GLOBAL slave_net_timeout = 5; STOP REPLICA; "
        "CHANGE MASTER TO MASTER_HEARTBEAT_PERIOD = 1; START REPLICA;"
    )
    pair.replica.script(*(s.strip() for s in statements.split(";") if s.strip()))
    support.wait_replicating(pair.replica)
    assert await replica.advise(5.0, 2.0) == []
    r = await replica.status(2)
    assert r.link_timeout == 5.0 and r.streaming is True


async def test_without_a_heartbeat_count_an_idle_links_silence_is_no_evidence() -> None:
    """MySQL with performance_schema off shows no heartbeat count: on an idle primary
    nothing the engine can see changes, so a growing 'last heard' would read as a lost
    link after slave_net_timeout although the IO thread holds it. No count: no age."""
    engine = make_engine("mysql://watchdogd:pw@127.0.0.1:1/")
    flavour = Flavour.detect("8.0.36", "MySQL Community Server", True)
    row = {
        "Source_Host": "10.0.0.1",
        "Source_Port": 3306,
        "Replica_IO_Running": "Yes",
        "Replica_SQL_Running": "Yes",
        "Source_Log_File": "binlog.000001",
        "Read_Source_Log_Pos": 100,
    }
    idle = Channel.from_row(row)
    assert idle.heartbeats is None
    for _ in range(3):
        s = engine._standby_status(flavour, idle, True, 60)
        assert s.streaming is True and s.last_receive_age is None
    moved = Channel.from_row({**row, "Read_Source_Log_Pos": 200})
    assert engine._standby_status(flavour, moved, True, 60).last_receive_age is None
    # With the count (MariaDB's SHOW ALL SLAVES STATUS), a change starts the clock.
    beat = Channel.from_row({**row, "Slave_received_heartbeats": 5})
    engine._standby_status(flavour, beat, True, 60)
    beat = Channel.from_row({**row, "Slave_received_heartbeats": 6})
    age = engine._standby_status(flavour, beat, True, 60).last_receive_age
    assert age is not None and 0 <= age < 1
