"""Rejoin on MariaDB (issue 16): after a failover by hand through the engine API, the
old primary's divergence report (the GTIDs the new primary never got), its rejoin as
a GTID replica of the new primary, and the verification, on a real pair with stock
and tuned link settings."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.rejoin_checks import eventually_true, twice_around, wait_replica_of
from tests.support import mysql as support
from watchdogd.core.model import DatabaseConfig
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

    # SQL cannot take a committed transaction back, so the engine refuses to leave
    # them in place under a replica that would then disagree with its primary.
    refusal = (
        r"rejoin: old primary wrote 3 transaction\(s\) .*SQL cannot take transactions back:"
        r" rebuild this server from a backup of 127\.0\.0\.1:\d+, then rejoin$"
    )
    with pytest.raises(EngineError, match=refusal):
        await old.rejoin(new, 10)
    assert support.replica_status(pair.primary) == {}
    assert {f"split-{i}" for i in range(3)} <= values(pair.primary)


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
