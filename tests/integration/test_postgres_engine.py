"""The PostgreSQL engine against a real primary + standby (watchdogd.demo.lab)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio

from tests.support.pg import SECRET, eventually
from watchdogd.core.model import DatabaseConfig
from watchdogd.core.section import Section
from watchdogd.demo.lab import PASSWORD_ROLE, PgPair
from watchdogd.engines import EngineError
from watchdogd.engines import postgres as pg
from watchdogd.engines._common import Secret

pytestmark = pytest.mark.integration


@pytest_asyncio.fixture
async def engines(pg_pair: PgPair) -> AsyncIterator[tuple[pg.PostgresEngine, pg.PostgresEngine]]:
    primary = pg.PostgresEngine(pg_pair.primary.dsn)
    standby = pg.PostgresEngine(pg_pair.standby.dsn)
    try:
        yield primary, standby
    finally:
        await primary.close()
        await standby.close()


def one_line_without(exc: EngineError, *secrets: str) -> str:
    text = str(exc)
    assert "\n" not in text
    for secret in secrets:
        assert secret not in text
    return text


# --------------------------------------------------------------------------- status


async def test_status_of_primary_and_standby(
    pg_pair: PgPair, engines: tuple[pg.PostgresEngine, pg.PostgresEngine]
) -> None:
    primary, standby = engines
    pg_pair.primary.execute("CREATE TABLE t (x int); INSERT INTO t VALUES (1)")
    pg_pair.wait_replayed()

    p = await primary.status(2.0)
    assert p.is_primary and p.writable
    assert isinstance(p.current_pos, int) and p.current_pos > 0
    assert p.receive_pos is None and p.replay_pos is None and p.streaming is None
    assert p.detail.startswith("primary, read-write")

    s = await standby.status(2.0)
    assert not s.is_primary and not s.writable
    assert s.current_pos is None
    assert s.streaming is True
    assert s.receive_pos is not None and s.replay_pos is not None
    assert s.replay_pos == s.receive_pos <= p.current_pos
    assert s.lag_seconds == 0
    assert s.replay_paused is False
    assert s.last_receive_age is not None and 0 <= s.last_receive_age < 3
    assert s.link_timeout == 2.0  # the lab's wal_receiver_timeout, read from the standby
    assert "streaming" in s.detail


async def test_lag_in_bytes_while_replay_is_paused(
    pg_pair: PgPair, engines: tuple[pg.PostgresEngine, pg.PostgresEngine]
) -> None:
    primary, standby = engines
    # Lag in seconds is measured from the last replayed transaction's commit time
    # (pg_last_xact_replay_timestamp()), which stays NULL until the standby has
    # replayed one since it started: replay one first, so there is a lag to see.
    pg_pair.primary.execute("CREATE TABLE replayed (x int)")
    pg_pair.wait_replayed()
    # The server's clock, on this host: that commit was stamped before this.
    replayed_at = time.time()
    pg_pair.pause_replay()
    pg_pair.primary.execute("CREATE TABLE t AS SELECT generate_series(1, 5000) AS x")

    async def received_not_replayed() -> bool:
        s = await standby.status(2.0)
        p = await primary.status(2.0)
        assert s.receive_pos is not None and s.replay_pos is not None
        return s.receive_pos == p.current_pos and s.receive_pos > s.replay_pos

    await eventually(received_not_replayed)
    stalled = time.time() - replayed_at
    s = await standby.status(2.0)
    assert s.replay_paused is True and s.streaming is True
    # At least as old as the stall (the last replayed commit is older still).
    assert s.lag_seconds is not None and s.lag_seconds >= stalled > 0
    assert "replay paused" in s.detail

    pg_pair.resume_replay()

    async def caught_up() -> bool:
        s = await standby.status(2.0)
        return s.replay_pos == s.receive_pos and s.lag_seconds == 0

    await eventually(caught_up)
    assert (await standby.status(2.0)).replay_paused is False


async def test_streaming_turns_false_when_primary_is_killed(
    pg_pair: PgPair, engines: tuple[pg.PostgresEngine, pg.PostgresEngine]
) -> None:
    primary, standby = engines
    assert (await standby.status(2.0)).streaming is True
    pg_pair.primary.kill()

    async def not_streaming() -> bool:
        return (await standby.status(2.0)).streaming is False

    await eventually(not_streaming, within=3.0)
    with pytest.raises(EngineError, match="status"):
        await primary.status(1.0)


async def test_status_of_hung_primary_times_out_and_standby_notices(
    pg_pair: PgPair, engines: tuple[pg.PostgresEngine, pg.PostgresEngine]
) -> None:
    primary, standby = engines
    await primary.status(1.0)  # the probing connection is open: the hang hits a query
    timeout_text = await standby.setting("wal_receiver_timeout", 1.0)
    assert timeout_text == "2s" and pg.pg_duration_seconds(timeout_text) == 2.0
    pg_pair.primary.sigstop()
    try:
        # The standby only notices a hung primary after wal_receiver_timeout: this
        # is why the daemon warns when that setting exceeds the outage threshold.
        assert (await standby.status(1.0)).streaming is True

        for engine in (primary, pg.PostgresEngine(pg_pair.primary.dsn)):  # query, then connect
            started = time.monotonic()
            with pytest.raises(EngineError) as caught:
                await engine.status(0.5)
            assert time.monotonic() - started < 0.5 + 0.3
            assert one_line_without(caught.value).endswith("status timed out after 0.5s")
            await engine.close()

        async def not_streaming() -> bool:
            return (await standby.status(1.0)).streaming is False

        await eventually(not_streaming, within=4.0)
    finally:
        pg_pair.primary.sigcont()
    # Recovers on the next call once the server answers again.
    assert (await primary.status(2.0)).is_primary


async def test_status_recovers_after_server_restart(
    pg_pair: PgPair, engines: tuple[pg.PostgresEngine, pg.PostgresEngine]
) -> None:
    primary, _ = engines
    await primary.status(1.0)
    pg_pair.primary.restart()
    # The cached connection died with the old server; one call still succeeds.
    assert (await primary.status(2.0)).is_primary


async def test_setting_of_unknown_name_is_one_clear_line(
    engines: tuple[pg.PostgresEngine, pg.PostgresEngine],
) -> None:
    primary, _ = engines
    with pytest.raises(EngineError) as caught:
        await primary.setting("no_such_setting", 1.0)
    assert 'unrecognized configuration parameter "no_such_setting"' in one_line_without(
        caught.value
    )
    assert (await primary.status(1.0)).is_primary  # reconnects after the error


# --------------------------------------------------------------------------- operations


async def test_stop_replication(
    pg_pair: PgPair, engines: tuple[pg.PostgresEngine, pg.PostgresEngine]
) -> None:
    primary, standby = engines
    pg_pair.pause_replay()
    done = await standby.stop_replication(5.0)
    assert "resumed paused replay" in done and "WAL receiver gone" in done
    s = await standby.status(2.0)
    assert not s.is_primary and s.streaming is False and s.replay_paused is False
    received = s.receive_pos

    pg_pair.primary.execute("CREATE TABLE after_stop (x int)")
    await asyncio.sleep(0.3)
    assert (await standby.status(2.0)).receive_pos == received  # nothing arrives any more

    assert await standby.stop_replication(5.0) == "replication already stopped"
    assert "already primary" in await primary.stop_replication(5.0)
    assert pg_pair.primary.execute("SELECT count(*) FROM pg_stat_replication") == "0"


async def test_promote_then_write_and_promote_again_is_a_no_op(
    pg_pair: PgPair, engines: tuple[pg.PostgresEngine, pg.PostgresEngine]
) -> None:
    _, standby = engines
    await standby.stop_replication(5.0)
    done = await standby.promote(10.0)
    assert done.startswith("promoted to primary (timeline 2)")
    s = await standby.status(2.0)
    assert s.is_primary and s.writable

    conn = await asyncpg.connect(pg_pair.standby.dsn, timeout=5)
    try:
        await conn.execute("CREATE TABLE orders (id int); INSERT INTO orders VALUES (1)")
        assert await conn.fetchval("SELECT count(*) FROM orders") == 1
    finally:
        await conn.close()

    timeline = "SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)"
    before = pg_pair.standby.execute(timeline)
    assert await standby.promote(10.0) == "already primary; accepts writes"
    assert pg_pair.standby.execute(timeline) == before == "00000002"


async def test_promote_applies_everything_received_while_paused(
    pg_pair: PgPair, engines: tuple[pg.PostgresEngine, pg.PostgresEngine]
) -> None:
    primary, standby = engines
    pg_pair.pause_replay()
    pg_pair.primary.execute("CREATE TABLE t AS SELECT generate_series(1, 1000) AS x")
    target = (await primary.status(2.0)).current_pos

    async def received() -> bool:
        s = await standby.status(2.0)
        return s.receive_pos == target and s.replay_pos != target

    await eventually(received)
    pg_pair.primary.kill()
    assert (await standby.promote(10.0)).startswith("promoted")
    assert pg_pair.standby.execute("SELECT count(*) FROM t") == "1000"


async def test_promote_is_bounded_and_clear_on_a_hung_server(pg_pair: PgPair) -> None:
    engine = pg.PostgresEngine(pg_pair.standby.dsn)
    pg_pair.standby.sigstop()
    try:
        started = time.monotonic()
        with pytest.raises(EngineError, match=r"promote timed out after 0\.5s$"):
            await engine.promote(0.5)
        assert time.monotonic() - started < 0.8
    finally:
        pg_pair.standby.sigcont()
        await engine.close()
    assert pg_pair.standby.is_in_recovery()  # never got as far as promoting


async def test_fence_refuses_writes_and_ends_open_sessions(
    pg_pair: PgPair, engines: tuple[pg.PostgresEngine, pg.PostgresEngine]
) -> None:
    primary, _ = engines
    assert (await primary.status(2.0)).writable
    session = await asyncpg.connect(pg_pair.primary.dsn, timeout=5)
    await session.execute("CREATE TABLE t (x int)")
    backend = session.get_server_pid()
    try:
        done = await primary.fence(5.0)
        assert done.startswith("fenced: now read-only; ")
        assert not done.endswith("; 0 client session(s) ended")
        fresh = await asyncpg.connect(pg_pair.primary.dsn, timeout=5)
        try:
            # Ended by the server while our client still holds it open: its backend is
            # gone (checked server-side; how asyncpg notices the FATAL depends on timing).
            async def ended() -> bool:
                n = await fresh.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = $1", backend
                )
                return bool(n == 0)

            await eventually(ended, within=3)
            with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
                await fresh.execute("INSERT INTO t VALUES (1)")
        finally:
            await fresh.close()
    finally:
        session.terminate()

    s = await primary.status(2.0)  # its probing connection was ended too: reconnects
    assert s.is_primary and not s.writable and "read-only" in s.detail
    again = await primary.fence(5.0)
    assert again.startswith("already read-only; ")


async def test_promote_clears_a_read_only_fence(
    pg_pair: PgPair, engines: tuple[pg.PostgresEngine, pg.PostgresEngine]
) -> None:
    _, standby = engines
    await standby.fence(5.0)  # e.g. an old primary that was fenced, now being failed back to
    done = await standby.promote(10.0)
    assert done.endswith("cleared default_transaction_read_only (it was fenced)")

    async def writable() -> bool:
        return (await standby.status(2.0)).writable

    await eventually(writable)


# --------------------------------------------------------------------------- errors & secrets


async def test_password_is_merged_at_connect_time_and_never_shown(pg_pair: PgPair) -> None:
    dsn = pg_pair.primary.user_dsn(PASSWORD_ROLE)
    good = pg.create(DatabaseConfig("postgres", dsn, {"password": Secret(SECRET)}), {SECRET})
    try:
        assert (await good.status(2.0)).is_primary
        assert SECRET not in repr(good)
    finally:
        await good.close()

    wrong = "wrong-password-4711"
    for engine in (
        pg.PostgresEngine(dsn, password=wrong, secrets={wrong}),
        pg.PostgresEngine(dsn.replace("@", f":{wrong}@")),  # inline in the DSN
    ):
        with pytest.raises(EngineError) as caught:
            await engine.status(2.0)
        text = one_line_without(caught.value, wrong)
        assert f'password authentication failed for user "{PASSWORD_ROLE}"' in text
        assert text.startswith(f"postgres 127.0.0.1:{pg_pair.primary.port}/postgres: status: ")
        await engine.close()


async def test_unreachable_port_is_one_clear_line(closed_port: int) -> None:
    port = closed_port
    engine = pg.PostgresEngine(f"postgresql://u:pw-in-dsn@127.0.0.1:{port}/db")
    started = time.monotonic()
    with pytest.raises(EngineError) as caught:
        await engine.status(2.0)
    assert time.monotonic() - started < 1.0
    text = one_line_without(caught.value, "pw-in-dsn")
    assert text.startswith(f"postgres 127.0.0.1:{port}/db: status: ")
    assert "refused" in text.lower()
    await engine.close()
    await engine.close()  # twice: still never raises


def read(data: dict[str, object]) -> tuple[object, list[str], set[str]]:
    errors: list[str] = []
    secrets: set[str] = set()
    section = Section(data, "primary.database", errors, secrets)
    section.str("engine")
    section.str("dsn")
    options = pg.validate(section)
    section.finish()
    return options, errors, secrets


def test_validate_reads_password_and_password_file(tmp_path: Path) -> None:
    options, errors, secrets = read(
        {"engine": "postgres", "dsn": "postgresql://app@db:5432/app", "password": "hunter22"}
    )
    assert errors == [] and options == {"password": "hunter22"} and secrets == {"hunter22"}
    assert "hunter22" not in repr(options)

    (tmp_path / "pw").write_text("from-file\n")
    options, errors, _ = read(
        {
            "engine": "postgres",
            "dsn": "postgresql://app@db/app",
            "password_file": str(tmp_path / "pw"),
        }
    )
    assert errors == [] and options == {"password": "from-file"}


def test_validate_errors_name_their_path() -> None:
    _, errors, _ = read({"engine": "postgres", "dsn": "mysql://app@db/app"})
    assert errors == [
        "primary.database.dsn: expected a URL like postgresql://user@host:5432/dbname, "
        "got scheme 'mysql'"
    ]
    _, errors, _ = read({"engine": "postgres", "dsn": "postgresql://app@db:99999/app"})
    assert len(errors) == 1 and errors[0].startswith("primary.database.dsn: not a valid")
    _, errors, secrets = read(
        {"engine": "postgres", "dsn": "postgresql://app:inline-pw@db/app", "password": "other"}
    )
    assert errors == [
        "primary.database.password: give the password either in dsn or in "
        "password/password_file, not both"
    ]
    assert "inline-pw" in secrets  # masked everywhere by the daemon
    _, errors, _ = read({"engine": "postgres", "dsn": "postgresql://db/app", "passwd": "x"})
    assert errors == ["primary.database.passwd: unknown key"]


def test_mask_dsn() -> None:
    assert pg.mask_dsn("postgresql://u:p%40ss@h:5/d?sslmode=require&password=x") == (
        "postgresql://u:***@h:5/d?sslmode=require&password=***"
    )
    assert pg.mask_dsn("postgresql://u@h/d") == "postgresql://u@h/d"


def test_pg_duration_seconds() -> None:
    assert pg.pg_duration_seconds("2s") == 2.0
    assert pg.pg_duration_seconds("1min") == 60.0
    assert pg.pg_duration_seconds("500ms") == 0.5
    assert pg.pg_duration_seconds("0") == 0.0
    assert pg.pg_duration_seconds("off") is None


async def test_advise_warns_about_a_slow_wal_receiver_timeout(pg_pair: PgPair) -> None:
    from watchdogd.engines.postgres import PostgresEngine

    standby = PostgresEngine(pg_pair.standby.dsn)
    primary = PostgresEngine(pg_pair.primary.dsn)
    try:
        assert await primary.advise(1.0, 2.0) == []
        assert await standby.advise(5.0, 2.0) == []  # the lab sets 2s
        advice = await standby.advise(1.0, 2.0)
        assert len(advice) == 1 and "wal_receiver_timeout is 2s" in advice[0]
        # The advice names the exact setting and the value that fixes it, and that
        # value is what the standby then reports as its own link timeout.
        assert "ALTER SYSTEM SET wal_receiver_timeout = '1s'" in advice[0]
        pg_pair.standby.execute("ALTER SYSTEM SET wal_receiver_timeout = '1s'")
        pg_pair.standby.execute("SELECT pg_reload_conf()")
        await eventually(lambda: _link_timeout_is(standby, 1.0))
        assert await standby.advise(1.0, 2.0) == []
        # Disabled (0): the standby never gives up on a silent link.
        pg_pair.standby.execute("ALTER SYSTEM SET wal_receiver_timeout = 0")
        pg_pair.standby.execute("SELECT pg_reload_conf()")
        await eventually(lambda: _link_timeout_is(standby, 0.0))
        (never,) = await standby.advise(30.0, 2.0)
        assert "confirmed never" in never and "wal_receiver_timeout = '30s'" in never
    finally:
        await standby.close()
        await primary.close()


async def _link_timeout_is(engine: pg.PostgresEngine, seconds: float) -> bool:
    return (await engine.status(2.0)).link_timeout == seconds


async def test_stock_standby_on_an_idle_primary_is_quiet_yet_still_sees_it() -> None:
    """Issue 10's premise on a real server: with PostgreSQL's shipped link settings
    (wal_receiver_timeout 60s, wal_sender_timeout 60s, status interval 10s) an idle
    primary says nothing to a healthy standby for seconds on end. The standby's view
    is judged by its own 60 s timeout, read from the server, so the quiet link is
    still "sees the primary", far past a short outage threshold."""
    from tests.support.pg import require_pg_bin
    from watchdogd.detector import standby_sees_primary
    from watchdogd.probes import Observation

    pair = PgPair.create(
        bin_dir=require_pg_bin(),
        wal_receiver_timeout="60s",
        settings={"wal_sender_timeout": "'60s'", "wal_receiver_status_interval": "'10s'"},
    )
    standby = pg.PostgresEngine(pair.standby.dsn)
    try:
        deadline = time.monotonic() + 20
        while True:
            s = await standby.status(2.0)
            if s.last_receive_age is not None and s.last_receive_age > 4:
                break
            assert time.monotonic() < deadline, f"the idle link was never quiet for 4s: {s}"
            await asyncio.sleep(0.25)
        assert s.streaming is True and s.link_timeout == 60.0
        seen = Observation("failover", "database", True, 0.001, s.detail, 0.0, db=s)
        assert standby_sees_primary(seen) is True
    finally:
        await standby.close()
        pair.destroy()
