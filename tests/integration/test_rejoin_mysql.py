"""Rejoin on MariaDB (issue 16): after a failover by hand through the engine API, the
old primary's divergence report (the GTIDs the new primary never got), its rejoin as
a GTID replica of the new primary, and the verification, on a real pair with stock
and tuned link settings. A divergent (or GTID-refused) old primary is resynced with
mariadb-dump only under ``rejoin_fallback: dump``, and refused otherwise."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.rejoin_checks import (
    eventually_true,
    failed_over_by_hand,
    refused_as_same_server,
    rejoin_under_load,
    twice_around,
    verified_while_steadily_behind,
    wait_replica_of,
)
from tests.support import mysql as support
from tests.support import timing
from tests.support.cluster import maria_cluster
from watchdogd import config
from watchdogd.actions.builtin import rejoin_method
from watchdogd.config import ConfigError
from watchdogd.core.model import Config, DatabaseConfig
from watchdogd.core.section import Section
from watchdogd.engines import EngineError
from watchdogd.engines import mysql as engine_mod
from watchdogd.engines.mysql import MySQLEngine

pytestmark = pytest.mark.integration

Engines = tuple[MySQLEngine, MySQLEngine]


@pytest.fixture(params=[support.STOCK, support.TUNED])
def pair(
    request: pytest.FixtureRequest, mariadb_template_dir: Path
) -> Iterator[support.MariaDBPair]:
    with support.mariadb_pair(mariadb_template_dir, request.param) as p:
        yield p


def make_engine(pair: support.MariaDBPair, server: support.MariaDB, **options: Any) -> MySQLEngine:
    options.setdefault("replication_user", "repl")
    options.setdefault("replication_password", pair.repl_password)
    return engine_mod.create(DatabaseConfig("mysql", pair.dsn(server), options), set())


@pytest.fixture
async def failed_over(pair: support.MariaDBPair) -> AsyncIterator[Engines]:
    """(old primary, new primary): the replica promoted by hand, the old primary left
    running and writable, as after a partition."""
    old, new = make_engine(pair, pair.primary), make_engine(pair, pair.replica)
    pair.primary.sql("INSERT INTO app.t (v) VALUES ('before')")
    pair.wait_replica_caught_up()
    await new.promote(5)
    yield old, new
    await old.close()
    await new.close()


def values(server: support.MariaDB) -> set[str]:
    return {r["v"] for r in server.sql("SELECT v FROM app.t")}


def binlog_pos(server: support.MariaDB) -> str:
    return str(server.sql("SELECT @@gtid_binlog_pos AS p")[0]["p"])


async def test_nothing_diverged_then_rejoin(
    pair: support.MariaDBPair, failed_over: Engines
) -> None:
    old, new = failed_over
    pair.replica.sql("INSERT INTO app.t (v) VALUES ('on-new-before-rejoin')")
    report = await old.divergence(new, 2)
    assert report.known and report.lost == 0 and report.diverged is False, report
    assert report.unit == "transactions" and report.items == ()

    done = await old.rejoin(new, 10)
    assert f"now a replica of 127.0.0.1:{pair.replica.port} as repl" in done
    assert "read_only turned on" in done
    assert int(pair.primary.sql("SELECT @@read_only AS ro")[0]["ro"]) == 1
    assert "replica of" in await wait_replica_of(old, new)
    pair.replica.sql("INSERT INTO app.t (v) VALUES ('after')")
    await eventually_true(lambda: "after" in values(pair.primary))
    assert {"before", "on-new-before-rejoin"} <= values(pair.primary)

    # Idempotent: a second rejoin only checks, and the report says nothing to lose.
    assert (await old.rejoin(new, 5)).startswith("already a replica of")
    assert (await old.divergence(new, 2)).lost == 0


async def test_an_old_primary_dsn_that_reaches_the_new_primary_is_refused(
    pair: support.MariaDBPair, failed_over: Engines
) -> None:
    # The node's DSN names the new primary under another name (localhost for 127.0.0.1,
    # as a VIP or DNS name moved to it would): GTID_SUBTRACT(x, x) would report nothing
    # lost, and the rejoin (or the dump fallback, which drops schemas) act on it.
    _, new = failed_over
    same = engine_mod.create(
        DatabaseConfig(
            "mysql",
            pair.dsn(pair.replica).replace("127.0.0.1", "localhost"),
            {
                "replication_user": "repl",
                "replication_password": pair.repl_password,
                "rejoin_fallback": "dump",
            },
        ),
        set(),
    )
    await refused_as_same_server(same, new, "server_id")
    assert int(pair.replica.sql("SELECT @@read_only AS ro")[0]["ro"]) == 0
    assert pair.replica.sql("SHOW SLAVE STATUS") == []
    pair.replica.sql("INSERT INTO app.t (v) VALUES ('still-writable')")


async def test_a_replica_with_read_only_off_fails_the_verification(
    pair: support.MariaDBPair, failed_over: Engines
) -> None:
    old, new = failed_over
    await old.rejoin(new, 10)
    assert "replica of" in await wait_replica_of(old, new)
    pair.primary.sql("SET GLOBAL read_only = OFF")
    with pytest.raises(EngineError, match=r"replica_of: replicating from .* read_only is off"):
        await old.replica_of(new, 5)


async def test_the_binlog_scan_reads_a_page_at_a_time(
    pair: support.MariaDBPair, failed_over: Engines, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pages of 3 events (a transaction is several): every page boundary falls inside
    # one, and the scan still names each diverged transaction once, in order.
    monkeypatch.setattr(engine_mod, "BINLOG_PAGE", 3)
    old, new = failed_over
    domain, server_id, seq = binlog_pos(pair.primary).split("-")
    for i in range(5):
        pair.primary.sql(f"INSERT INTO app.t (v) VALUES ('paged-{i}')")
    report = await old.divergence(new, 4)
    assert report.items == tuple(f"{domain}-{server_id}-{int(seq) + i}" for i in range(1, 6))
    assert report.lost == 5


async def test_diverged_transactions_are_named_and_not_silently_kept(
    pair: support.MariaDBPair, failed_over: Engines
) -> None:
    old, new = failed_over
    pair.replica.sql("INSERT INTO app.t (v) VALUES ('on-new')")
    domain, server_id, seq = binlog_pos(pair.primary).split("-")
    for i in range(3):
        pair.primary.sql(f"INSERT INTO app.t (v) VALUES ('split-{i}')")
    written = tuple(f"{domain}-{server_id}-{int(seq) + i}" for i in (1, 2, 3))
    assert binlog_pos(pair.primary) == written[-1]  # the server's own word for the last one

    report = await old.divergence(new, 2)
    assert report.known and report.diverged is True and report.lost == 3, report
    assert report.items == written
    assert "3 transaction(s)" in report.detail and written[0] in report.detail

    # SQL cannot take a committed transaction back, so without rejoin_fallback: dump
    # the engine refuses to leave them in place under a replica that would then
    # disagree with its primary, and says which option resyncs it instead.
    new_where = rf"127\.0\.0\.1:{pair.replica.port}"
    refusal = (
        r"rejoin: old primary wrote 3 transaction\(s\) .*SQL cannot take transactions back:"
        rf" set rejoin_fallback: dump on this node to resync it from {new_where} with"
        rf" mariadb-dump, or rebuild it from a backup of {new_where}, then rejoin$"
    )
    with pytest.raises(EngineError, match=refusal):
        await old.rejoin(new, 10)
    # Nothing changed: no channel, still writable, the diverged rows and GTIDs kept.
    assert support.replica_status(pair.primary) == {}
    assert int(pair.primary.sql("SELECT @@read_only AS ro")[0]["ro"]) == 0
    assert {f"split-{i}" for i in range(3)} <= values(pair.primary)
    assert binlog_pos(pair.primary) == written[-1]


def split(pair: support.MariaDBPair) -> tuple[str, ...]:
    """Three transactions on the old primary after the split: two rows and a schema
    the new primary never had; their GTIDs."""
    domain, server_id, seq = binlog_pos(pair.primary).split("-")
    pair.primary.sql("INSERT INTO app.t (v) VALUES ('split-0')")
    pair.primary.sql("INSERT INTO app.t (v) VALUES ('split-1')")
    pair.primary.sql("CREATE DATABASE split_only")
    return tuple(f"{domain}-{server_id}-{int(seq) + i}" for i in (1, 2, 3))


def schemas(server: support.MariaDB) -> set[str]:
    return {next(iter(r.values())) for r in server.sql("SHOW DATABASES")}


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where the resync's private option files go, to see that none is left behind."""
    where = tmp_path / "tmp"
    where.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(where))
    return where


async def test_diverged_old_primary_is_resynced_with_mariadb_dump(
    pair: support.MariaDBPair, private_tmp: Path
) -> None:
    """rejoin_fallback: dump: the diverged transactions are thrown away by replacing the
    old primary's data with a dump of the new one; it then replicates from the dump's
    GTID position, and can take over again with every acknowledged write."""
    old = make_engine(pair, pair.primary, rejoin_fallback="dump")
    new = make_engine(pair, pair.replica)
    pair.grant_resync()
    # A view and a routine (definer root) travel with the dump as well as rows.
    pair.primary.script(
        "INSERT INTO app.t (v) VALUES ('before')",
        "CREATE VIEW app.v AS SELECT v FROM app.t",
        "CREATE PROCEDURE app.p() SELECT COUNT(*) FROM app.t",
    )
    pair.wait_replica_caught_up()
    try:
        await new.promote(5)
        pair.replica.sql("INSERT INTO app.t (v) VALUES ('on-new')")
        written = split(pair)
        report = await old.divergence(new, 2)
        assert report.lost == 3 and report.items == written, report

        done = await old.rejoin(new, 30)
        assert done.startswith("resynced: 3 diverged transaction(s) thrown away"), done
        assert "dropped schema(s) the new primary lacks: split_only" in done
        assert f"copied 2 schema(s) from 127.0.0.1:{pair.replica.port} with mariadb-dump" in done
        assert "binary log reset" in done
        assert done.endswith(
            f"now a replica of 127.0.0.1:{pair.replica.port} as repl (GTID slave_pos), replicating"
        )
        assert pair.password not in done and pair.repl_password not in done
        assert os.listdir(private_tmp) == []  # the option files are gone

        # The diverged rows, schema and GTIDs are gone; the view and routine came over.
        assert values(pair.primary) == values(pair.replica) == {"before", "on-new"}
        assert "split_only" not in schemas(pair.primary)
        assert binlog_pos(pair.primary) == ""
        assert pair.primary.sql("SELECT COUNT(*) AS n FROM app.v")[0]["n"] == 2
        assert pair.primary.sql("SHOW PROCEDURE STATUS WHERE Db = 'app'")[0]["Name"] == "p"
        assert int(pair.primary.sql("SELECT @@read_only AS ro")[0]["ro"]) == 1
        assert "replica of" in await wait_replica_of(old, new)
        after = await old.divergence(new, 2)
        assert after.known and after.lost == 0, after

        # Every write acknowledged by the new primary reaches the old one, which can
        # then take over again with all of them.
        acked = {f"after-{i}" for i in range(20)}
        for key in sorted(acked):
            pair.replica.sql("INSERT INTO app.t (v) VALUES (%s)", (key,))
        await wait_replica_of(old, new)
        await eventually_true(lambda: acked <= values(pair.primary))
        assert "promoted" in await old.promote(10)
        assert values(pair.primary) >= acked | {"before", "on-new"}
        assert not {"split-0", "split-1"} & values(pair.primary)

        # And the GTID state it was left with lets the other node rejoin it plainly.
        back = await new.divergence(old, 2)
        assert back.known and back.lost == 0, back
        await new.rejoin(old, 10)
        pair.primary.sql("INSERT INTO app.t (v) VALUES ('back-on-old')")
        await wait_replica_of(new, old)
        await eventually_true(lambda: "back-on-old" in values(pair.replica))
    finally:
        await old.close()
        await new.close()


async def diverged_pair(pair: support.MariaDBPair, **options: Any) -> Engines:
    """(old primary with ``options``, new primary) after a failover with 'on-new' written
    on the new primary and ``split()`` on the old one."""
    old = make_engine(pair, pair.primary, **options)
    new = make_engine(pair, pair.replica)
    pair.primary.sql("INSERT INTO app.t (v) VALUES ('before')")
    pair.wait_replica_caught_up()
    await new.promote(5)
    pair.replica.sql("INSERT INTO app.t (v) VALUES ('on-new')")
    split(pair)
    return old, new


def running_from(where: Path) -> list[str]:
    """Command lines of live processes that name a path under ``where``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(where) in cmdline:
                found.append(cmdline)
    return found


async def test_a_resync_cut_short_is_bounded_and_redone_by_the_next_rejoin(
    pair: support.MariaDBPair, private_tmp: Path
) -> None:
    """The dump hangs on a table lock: the rejoin fails at its timeout with one line,
    mariadb-dump and mariadb are killed, the option files are gone; the old primary
    still counts as diverged, so the next rejoin resyncs it from the start."""
    pair.grant_resync()
    old, new = await diverged_pair(pair, rejoin_fallback="dump")
    lock = pair.replica.connect()
    try:
        with lock.cursor() as cur:
            cur.execute("LOCK TABLES app.t WRITE")
        started = time.monotonic()
        with pytest.raises(EngineError) as caught:
            await old.rejoin(new, 3)
        took = time.monotonic() - started
        lock.close()
        timed_out = rf"mysql 127\.0\.0\.1:{pair.primary.port}: rejoin timed out after [\d.]+s"
        assert re.fullmatch(timed_out, str(caught.value)), caught.value
        assert took < timing.within(4), took
        await eventually_true(lambda: running_from(private_tmp) == [])
        assert os.listdir(private_tmp) == []
        report = await old.divergence(new, 2)
        assert report.known and report.lost == 3, report

        done = await old.rejoin(new, 30)
        assert done.startswith("resynced: 3 diverged transaction(s) thrown away"), done
        assert values(pair.primary) == {"before", "on-new"}
        assert "replica of" in await wait_replica_of(old, new)
    finally:
        if lock.open:
            lock.close()
        await old.close()
        await new.close()


async def test_a_failed_load_is_one_clear_line_and_a_retry_resyncs(
    pair: support.MariaDBPair, private_tmp: Path
) -> None:
    """The old primary fails a statement of the dump (DROP DATABASE app, on a stray
    file in its directory): the error is the mariadb client's own line, without a
    password; the old primary still counts as diverged, and a retry resyncs it."""
    pair.grant_resync()
    old, new = await diverged_pair(pair, rejoin_fallback="dump")
    stray = pair.primary.base / "data" / "app" / "stray.txt"
    stray.write_text("not a table\n")
    try:
        with pytest.raises(EngineError) as caught:
            await old.rejoin(new, 30)
        line = str(caught.value)
        prefix = (
            f"mysql 127.0.0.1:{pair.primary.port}: rejoin: loading the dump into"
            f" 127.0.0.1:{pair.primary.port} with "
        )
        assert line.startswith(prefix), line
        assert re.search(r" failed \(exit 1\): ERROR \d+ \(\w+\) at line \d+: ", line), line
        assert "\n" not in line and pair.password not in line
        assert os.listdir(private_tmp) == []
        assert (await old.divergence(new, 2)).lost == 3  # still diverged: redo it all

        assert "app" in line
        stray.unlink()
        done = await old.rejoin(new, 30)
        assert done.startswith("resynced: 3 diverged transaction(s) thrown away"), done
        assert values(pair.primary) == {"before", "on-new"}
        assert "replica of" in await wait_replica_of(old, new)
    finally:
        await old.close()
        await new.close()


async def test_missing_grants_refuse_the_resync_before_anything_changes(
    pair: support.MariaDBPair, private_tmp: Path
) -> None:
    """A dump that cannot see every schema would leave diverged ones behind (or drop
    what it cannot copy): the account's grants are checked on both servers first."""
    old, new = await diverged_pair(pair, rejoin_fallback="dump")
    where = f"mysql 127.0.0.1:{pair.primary.port}: rejoin: rejoin_fallback: dump needs"
    try:
        with pytest.raises(EngineError) as caught:
            await old.rejoin(new, 10)
        assert str(caught.value) == (
            f"{where} SELECT, SHOW VIEW, TRIGGER, EVENT, SHOW DATABASES ON *.* for the"
            f" watchdogd account on 127.0.0.1:{pair.replica.port} to dump it;"
            " nothing was changed"
        )
        pair.grant_resync(pair.replica)
        with pytest.raises(EngineError) as caught:
            await old.rejoin(new, 10)
        assert str(caught.value) == (
            f"{where} SELECT, SHOW VIEW, TRIGGER, EVENT, SHOW DATABASES, INSERT, UPDATE,"
            " DELETE, CREATE, DROP, ALTER, INDEX, REFERENCES, CREATE VIEW, CREATE ROUTINE,"
            " ALTER ROUTINE, LOCK TABLES, BINLOG ADMIN, SET USER ON *.* for the watchdogd"
            f" account on 127.0.0.1:{pair.primary.port} to load the dump; nothing was changed"
        )
        assert support.replica_status(pair.primary) == {}
        assert int(pair.primary.sql("SELECT @@read_only AS ro")[0]["ro"]) == 0
        assert {"split-0", "split-1"} <= values(pair.primary)
        assert "split_only" in schemas(pair.primary)
        assert (await old.divergence(new, 2)).lost == 3
    finally:
        await old.close()
        await new.close()


async def test_purged_binlogs_fall_back_to_the_resync_too(
    pair: support.MariaDBPair, failed_over: Engines, private_tmp: Path
) -> None:
    """Nothing diverged, but the new primary purged the binary log the old one needs:
    GTID positioning is refused (error 1236). Without the option the error says which
    option resyncs; with it the old primary is resynced and has the purged write."""
    old, new = failed_over
    pair.grant_resync()
    pair.replica.sql("INSERT INTO app.t (v) VALUES ('purged')")
    pair.replica.sql("FLUSH BINARY LOGS")
    head = pair.replica.sql("SHOW MASTER STATUS")[0]["File"]

    def purged() -> bool:
        # PURGE keeps a log InnoDB still needs for crash recovery (its binlog
        # checkpoint moves on within about a second here): ask until it is gone.
        pair.replica.sql(f"PURGE BINARY LOGS TO '{head}'")
        return [r["Log_name"] for r in pair.replica.sql("SHOW BINARY LOGS")] == [head]

    await eventually_true(purged)
    assert (await old.divergence(new, 2)).lost == 0

    with pytest.raises(EngineError) as caught:
        await old.rejoin(new, 10)
    assert "Got fatal error 1236 from master" in str(caught.value)
    assert str(caught.value).endswith(
        f"; set rejoin_fallback: dump on this node to resync it from"
        f" 127.0.0.1:{pair.replica.port} with mariadb-dump"
    )

    resync = make_engine(pair, pair.primary, rejoin_fallback="dump")
    try:
        done = await resync.rejoin(new, 30)
        assert done.startswith(
            "resynced: the new primary refused this server's GTID position (error 1236)"
        ), done
        assert "replica of" in await wait_replica_of(resync, new)
        assert values(pair.primary) == {"before", "purged"}
        pair.replica.sql("INSERT INTO app.t (v) VALUES ('after')")
        await eventually_true(lambda: "after" in values(pair.primary))
    finally:
        await resync.close()


def test_the_option_files_log_in_with_any_password(
    pair: support.MariaDBPair, tmp_path: Path
) -> None:
    """The logins the resync hands to mariadb-dump and mariadb: quoted so the real
    client reads back exactly the password, whatever it holds; 0600."""
    password = "a\"b\\c#d'e;f g\\n=[x]"
    pair.primary.sql("CREATE USER tricky@'127.0.0.1' IDENTIFIED BY %s", (password,))
    dsn = engine_mod.parse_dsn(f"mysql://tricky@127.0.0.1:{pair.primary.port}/")
    path = engine_mod._option_file(str(tmp_path), "login.cnf", dsn, password)
    assert os.stat(path).st_mode & 0o777 == 0o600
    client = subprocess.run(
        ["mariadb", f"--defaults-extra-file={path}", "-N", "-e", "SELECT CURRENT_USER()"],
        capture_output=True,
        text=True,
        timeout=timing.within(10),
        check=False,
    )
    assert (client.returncode, client.stdout.strip()) == (0, "tricky@127.0.0.1"), client.stderr
    assert password not in " ".join(client.args)


def mysql_config(**options: Any) -> Config:
    def node(name: str, port: int) -> dict[str, Any]:
        dsn = f"mysql://watchdogd:a-long-secret@127.0.0.1:{port}/"
        return {"name": name, "database": {"engine": "mysql", "dsn": dsn, **options}}

    return config.parse(
        {
            "cluster": "orders",
            "primary": node("main", 3306),
            "standby": node("failover", 3307),
            "failover": {"steps": [{"name": "back", "action": "rejoin"}]},
        }
    )


def test_rejoin_fallback_is_a_checked_key_and_shows_in_the_method() -> None:
    with pytest.raises(ConfigError) as caught:
        mysql_config(rejoin_fallback="rsync")
    assert caught.value.problems == [
        "primary.database.rejoin_fallback: expected one of dump, none, got 'rsync'",
        "standby.database.rejoin_fallback: expected one of dump, none, got 'rsync'",
    ]
    plain = (
        "CHANGE MASTER TO the new primary with GTID auto-positioning, START REPLICA, read_only=ON"
    )
    assert rejoin_method(mysql_config().primary) == plain
    assert rejoin_method(mysql_config(rejoin_fallback="none").primary) == plain
    resync = mysql_config(rejoin_fallback="dump")
    assert resync.primary.database.options["rejoin_fallback"] == "dump"
    assert rejoin_method(resync.primary) == (
        f"{plain}; if transactions diverged: resync with mariadb-dump (divergent)"
    )


def test_replication_credentials_are_validated() -> None:
    errors: list[str] = []
    engine_mod.validate(
        Section({"replication_password": "a-long-secret"}, "standby.database", errors, set())
    )
    assert errors == ["standby.database.replication_password: needs replication_user as well"]
    secrets: set[str] = set()
    data = {"replication_user": "repl", "replication_password": "a-long-secret"}
    options = engine_mod.validate(Section(data, "standby.database", errors, secrets))
    assert len(errors) == 1 and options["replication_user"] == "repl"
    assert "a-long-secret" in secrets and repr(options["replication_password"]) == "'***'"


async def test_twice_around_the_pair(pair: support.MariaDBPair, failed_over: Engines) -> None:
    """Fail over, rejoin, fail back, rejoin: each node rejoins once, losing nothing."""
    a, b = failed_over
    insert = "INSERT INTO app.t (v) VALUES (%s)"
    await twice_around(
        a,
        b,
        lambda key: pair.replica.sql(insert, (key,)),
        lambda key: pair.primary.sql(insert, (key,)),
    )
    for server in (pair.primary, pair.replica):
        assert {"before", "via-a", "via-b"} <= values(server), server.name


@pytest.mark.parametrize("profile", [support.STOCK, support.TUNED])
async def test_rejoin_and_verification_finish_while_the_new_primary_takes_writes(
    profile: str, mariadb_template_dir: Path, tmp_path: Path
) -> None:
    """A few hundred writes a second on the new primary, from before the rejoin until
    after its verification: the GTID rejoin and the verification finish in bounded
    time, and every acknowledged write reaches the rejoined server."""
    await rejoin_under_load(maria_cluster(profile, mariadb_template_dir), tmp_path, 10)


@pytest.mark.parametrize("profile", [support.STOCK, support.TUNED])
async def test_verification_passes_for_a_replica_steadily_behind_a_busy_primary(
    profile: str, mariadb_template_dir: Path, tmp_path: Path
) -> None:
    """MASTER_DELAY = 1 on the rejoined replica stands for a replica that is always a
    little behind a busy primary: it never applies up to the primary's current
    position, yet it reaches any position read earlier within a second."""
    cluster = maria_cluster(profile, mariadb_template_dir)
    try:
        async with failed_over_by_hand(cluster, tmp_path, 30) as f:
            server = cluster.standby
            assert isinstance(server, support.MariaDB)

            async def delay() -> None:
                server.script("STOP SLAVE", "CHANGE MASTER TO MASTER_DELAY = 1", "START SLAVE")

            took = await verified_while_steadily_behind(f, delay, 1.0)
    finally:
        await cluster.aclose()
    assert took < timing.within(6), took
