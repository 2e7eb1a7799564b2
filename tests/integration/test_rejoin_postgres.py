"""Rejoin on PostgreSQL (issue 16): after a failover by hand through the engine API,
the old primary's divergence report (WAL bytes past the timeline fork, and the
transactions committed there), its rejoin with pg_rewind (or a base backup) as a
standby of the new primary, and the verification, on real servers.

The stock profile is PostgreSQL's shipped defaults: neither wal_log_hints nor data
checksums, so pg_rewind is refused before anything is stopped; the tuned profile
sets wal_log_hints = on, as the docs recommend."""

from __future__ import annotations

import os
import tempfile
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
from tests.support import pg as support
from tests.support import timing
from tests.support.cluster import PgCluster, pg_cluster
from watchdogd.core.model import DatabaseConfig
from watchdogd.core.section import Section
from watchdogd.demo.lab import STOCK, TUNED, LabError, PgPair, PgServer
from watchdogd.engines import EngineError
from watchdogd.engines import postgres as engine_mod
from watchdogd.engines.postgres import PostgresEngine

pytestmark = pytest.mark.integration

Engines = tuple[PostgresEngine, PostgresEngine]


def pair_for(request: pytest.FixtureRequest, profile: str) -> Iterator[PgPair]:
    pair = support.rejoin_pair(request.config, profile)
    try:
        pair.primary.execute("CREATE TABLE notes (note text PRIMARY KEY)")
        pair.primary.execute("INSERT INTO notes VALUES ('before')")
        pair.wait_replayed()
        yield pair
    finally:
        pair.destroy()


@pytest.fixture
def tuned(request: pytest.FixtureRequest) -> Iterator[PgPair]:
    yield from pair_for(request, TUNED)


@pytest.fixture
def stock(request: pytest.FixtureRequest) -> Iterator[PgPair]:
    yield from pair_for(request, STOCK)


def make_engine(pair: PgPair, server: PgServer, **options: Any) -> PostgresEngine:
    options.setdefault("data_dir", str(server.data_dir))
    options.setdefault("start_command", support.start_command(pair, server))
    if options["data_dir"] is None:
        del options["data_dir"], options["start_command"]
    return engine_mod.create(DatabaseConfig("postgres", server.dsn, options), set())


async def fail_over(pair: PgPair, **options: Any) -> Engines:
    """(old primary, new primary): the standby promoted by hand, the old primary left
    running and writable, as after a partition."""
    old, new = make_engine(pair, pair.primary, **options), make_engine(pair, pair.standby)
    await new.promote(10)
    return old, new


@pytest.fixture
async def closing() -> AsyncIterator[list[PostgresEngine]]:
    engines: list[PostgresEngine] = []
    yield engines
    for engine in engines:
        await engine.close()


def notes(server: PgServer) -> set[str]:
    return set(server.execute("SELECT note FROM notes").split())


async def test_nothing_diverged_then_rewind(tuned: PgPair, closing: list[PostgresEngine]) -> None:
    old, new = await fail_over(tuned)
    closing += [old, new]
    tuned.standby.execute("INSERT INTO notes VALUES ('on-new-before-rejoin')")
    report = await old.divergence(new, 5)
    assert report.known and report.lost == 0 and report.diverged is False, report
    assert "nothing past the fork at" in report.detail and "on timeline 1" in report.detail

    done = await old.rejoin(new, 60)
    assert "stopped the server" in done and "pg_rewind:" in done, done
    assert f"streaming from {new.where}" in done
    assert tuned.primary.is_in_recovery()
    assert "replica of" in await wait_replica_of(old, new)
    tuned.standby.execute("INSERT INTO notes VALUES ('after')")
    await eventually_true(lambda: "after" in notes(tuned.primary))
    assert {"before", "on-new-before-rejoin"} <= notes(tuned.primary)

    # Idempotent: a second rejoin only checks, and the report says nothing to lose.
    assert (await old.rejoin(new, 10)).startswith("already a replica of")
    assert (await old.divergence(new, 5)).lost == 0


async def test_an_old_primary_dsn_that_reaches_the_new_primary_is_refused(
    tuned: PgPair, closing: list[PostgresEngine]
) -> None:
    # The node's DSN names the new primary under another name (localhost for 127.0.0.1,
    # as a VIP or DNS name moved to it would): neither divergence nor rejoin act on it.
    _, new = await fail_over(tuned)
    same = engine_mod.create(
        DatabaseConfig(
            "postgres",
            tuned.standby.dsn.replace("127.0.0.1", "localhost"),
            {
                "data_dir": str(tuned.primary.data_dir),
                "start_command": support.start_command(tuned, tuned.primary),
            },
        ),
        set(),
    )
    closing.append(new)
    await refused_as_same_server(same, new, "port")
    assert not tuned.standby.is_in_recovery() and not tuned.primary.is_in_recovery()
    tuned.standby.execute("INSERT INTO notes VALUES ('still-writable')")


async def test_diverged_transactions_are_named_then_rewound_away(
    tuned: PgPair, closing: list[PostgresEngine]
) -> None:
    old, new = await fail_over(tuned)
    closing += [old, new]
    xids = [
        tuned.primary.execute(
            f"INSERT INTO notes VALUES ('split-{i}') RETURNING pg_current_xact_id()::text"
        )
        for i in range(3)
    ]
    report = await old.divergence(new, 5)
    assert report.known and report.diverged is True, report
    assert report.items == tuple(f"xid {x}" for x in xids), report
    # Three commits and their row inserts take well over a hundred bytes of WAL.
    assert (report.lost or 0) > 150, report
    assert f"wrote {report.lost} bytes of WAL past the fork" in report.detail
    assert "3 transaction(s) committed" in report.detail

    done = await old.rejoin(new, 60)
    assert "servers diverged at WAL location" in done, done
    await wait_replica_of(old, new)
    assert not {f"split-{i}" for i in range(3)} & notes(tuned.primary)
    tuned.standby.execute("INSERT INTO notes VALUES ('after')")
    await eventually_true(lambda: "after" in notes(tuned.primary))


async def test_a_restart_after_the_split_is_no_divergence(
    tuned: PgPair, closing: list[PostgresEngine]
) -> None:
    """A crashed old primary that comes back writes an end-of-recovery checkpoint past
    the fork: WAL the new primary lacks, but no committed write, so nothing diverged
    (else every rejoin after a crash would need --accept-divergence)."""
    old, new = await fail_over(tuned)
    closing += [old, new]
    tuned.primary.kill()
    tuned.primary.start()
    report = await old.divergence(new, 10)
    assert report.known and report.lost == 0 and report.items == (), report
    assert "bytes of WAL without a committed transaction" in report.detail, report

    tuned.primary.execute("INSERT INTO notes VALUES ('after-restart')")
    report = await old.divergence(new, 10)
    assert report.diverged is True and len(report.items) == 1, report


async def test_stock_settings_refuse_pg_rewind_before_stopping_anything(
    stock: PgPair, closing: list[PostgresEngine]
) -> None:
    old, new = await fail_over(stock)
    closing += [old, new]
    advice = await old.advise(30, 5)
    assert any("ALTER SYSTEM SET wal_log_hints = on;" in line for line in advice), advice
    with pytest.raises(
        EngineError,
        match=r"rejoin: pg_rewind needs wal_log_hints = on or data checksums on this server,"
        r" and both are off: ALTER SYSTEM SET wal_log_hints = on; then restart it"
        r" \(or set rewind_fallback: basebackup\)$",
    ):
        await old.rejoin(new, 30)
    status = await old.status(5)
    assert status.is_primary and status.writable  # still running, untouched


async def test_stock_settings_fall_back_to_a_base_backup(
    stock: PgPair, closing: list[PostgresEngine]
) -> None:
    old, new = await fail_over(stock, rewind_fallback="basebackup")
    closing += [old, new]
    stock.primary.execute("INSERT INTO notes VALUES ('split')")
    assert (await old.divergence(new, 5)).diverged is True

    done = await old.rejoin(new, 60)
    assert "pg_rewind impossible" in done and "base backup of the new primary" in done, done
    await wait_replica_of(old, new)
    assert "split" not in notes(stock.primary)
    stock.standby.execute("INSERT INTO notes VALUES ('after')")
    await eventually_true(lambda: "after" in notes(stock.primary))


async def test_tuned_settings_give_no_rewind_advice(
    tuned: PgPair, closing: list[PostgresEngine]
) -> None:
    engine = make_engine(tuned, tuned.primary)
    closing.append(engine)
    assert not [line for line in await engine.advise(30, 5) if "wal_log_hints" in line]


async def test_rejoin_needs_the_data_dir(tuned: PgPair, closing: list[PostgresEngine]) -> None:
    old, new = await fail_over(tuned, data_dir=None)
    closing += [old, new]
    with pytest.raises(
        EngineError,
        match=r"rejoin on PostgreSQL needs database.data_dir on this node \(the watcher must"
        r" run beside it\); see the docs' PostgreSQL page for the SSH variant$",
    ):
        await old.rejoin(new, 10)
    with pytest.raises(LabError):  # never touched: still a writable primary
        tuned.primary.execute("SELECT 1/0")
    assert not tuned.primary.is_in_recovery()


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory any user can write (pytest's tmp_path is not reachable by nobody)."""
    with tempfile.TemporaryDirectory() as where:
        Path(where).chmod(0o777)
        yield Path(where)


async def test_a_host_program_cut_off_by_its_timeout_ends_with_all_it_started(
    open_dir: Path,
) -> None:
    # As root the program runs under runuser, which cannot pass SIGKILL on: the whole
    # process group goes, even children that ignore SIGTERM, before run() returns.
    pids = open_dir / "pids"
    script = f"trap '' TERM; sleep 60 & echo $! >> {pids}; echo $$ >> {pids}; wait"
    runuser = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
    host = engine_mod.HostSide(open_dir, start_command=(*runuser, "sh", "-c", script))
    with pytest.raises(TimeoutError):
        await host.run(host.start(0.5), "start", 0.5)
    started = [int(line) for line in pids.read_text().split()]
    assert len(started) == 2

    def alive(pid: int) -> bool:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            return False
        return stat[stat.rfind(")") + 2 :].split()[0] != "Z"

    assert [pid for pid in started if alive(pid)] == []


def test_host_side_options_are_validated() -> None:
    def errors_of(data: dict[str, object]) -> list[str]:
        errors: list[str] = []
        engine_mod.validate(Section(data, "primary.database", errors, set()))
        return errors

    assert errors_of({"data_dir": "pgdata", "rewind_fallback": "reinit"}) == [
        "primary.database.data_dir: expected an absolute path, got 'pgdata'",
        "primary.database.rewind_fallback: expected one of basebackup, none, got 'reinit'",
    ]
    assert errors_of({"data_dir": "/d", "start_command": []}) == [
        "primary.database.start_command: expected a program and its arguments,"
        " e.g. [systemctl, start, postgresql]"
    ]
    assert errors_of({"run_as": "postgres"}) == [
        "primary.database.data_dir: is required with bin_dir, stop_command, start_command"
        " and run_as"
    ]
    errors: list[str] = []
    options = engine_mod.validate(
        Section(
            {"data_dir": "/d", "stop_command": ["systemctl", "stop", "pg"], "run_as": "pg"},
            "primary.database",
            errors,
            set(),
        )
    )
    assert errors == [] and options == {
        "data_dir": "/d",
        "stop_command": ("systemctl", "stop", "pg"),
        "run_as": "pg",
    }


async def test_a_crashed_old_primary_is_rewound_from_its_data_dir(
    tuned: PgPair, closing: list[PostgresEngine]
) -> None:
    """The common case: the old primary died (SIGKILL, no shutdown checkpoint) and is
    still down when it is rejoined; pg_rewind finishes its crash recovery first."""
    old, new = make_engine(tuned, tuned.primary), make_engine(tuned, tuned.standby)
    closing += [old, new]
    tuned.primary.execute("INSERT INTO notes VALUES ('last-before-crash')")
    tuned.wait_replayed()
    tuned.primary.kill()
    await new.promote(10)
    with pytest.raises(EngineError, match=r": status: connection refused"):
        await old.divergence(new, 2)  # unreachable: the daemon reports that, not a guess

    done = await old.rejoin(new, 60)
    assert "stopped the server" not in done and "pg_rewind:" in done, done
    await wait_replica_of(old, new)
    assert "last-before-crash" in notes(tuned.primary)
    tuned.standby.execute("INSERT INTO notes VALUES ('after')")
    await eventually_true(lambda: "after" in notes(tuned.primary))

    # Down again once configured as a standby (as if a rejoin was cut off after
    # writing the configuration): a rejoin only starts it, nothing is rewound.
    tuned.primary.kill()
    done = await old.rejoin(new, 60)
    assert done.startswith("started the configured standby"), done
    await wait_replica_of(old, new)


async def test_the_chaos_cluster_can_rejoin_and_kill_the_rejoined_server(
    request: pytest.FixtureRequest,
) -> None:
    """What the daemon's loops build on: a matrix cluster's rejoin options, and the
    lab killing a server that pg_ctl (not the lab) started."""
    cluster = pg_cluster(
        TUNED,
        support.require_pg_bin(),
        support.pg_template(request.config),
        support.SECRET,
        settings={"full_page_writes": "on"},
    )
    engines: list[PostgresEngine] = []
    try:
        for node in (cluster.primary, cluster.standby):
            section = {**cluster.database(node), **cluster.rejoin_options(node)}
            options = {k: v for k, v in section.items() if k not in ("engine", "dsn")}
            engines.append(
                engine_mod.create(DatabaseConfig("postgres", section["dsn"], options), set())
            )
        old, new = engines
        await cluster.write("k1")
        await cluster.wait_caught_up()
        await cluster.reset_writer()
        await new.promote(10)
        await old.rejoin(new, 60)
        await wait_replica_of(old, new)
        assert "k1" in await cluster.keys(cluster.primary)

        server = cluster.primary
        assert isinstance(server, PgServer)
        pid = server.detached_pid()
        assert pid is not None and not server.is_running()  # pg_ctl's child, not the lab's
        server.kill()
        await eventually_true(lambda: server.detached_pid() is None)
        with pytest.raises(EngineError):
            await old.status(2)
    finally:
        for engine in engines:
            await engine.close()
        cluster.close()


async def test_twice_around_the_pair(tuned: PgPair, closing: list[PostgresEngine]) -> None:
    """Fail over, rejoin, fail back, rejoin: each node is rewound once, a new timeline
    each time, losing nothing."""
    a, b = await fail_over(tuned)
    closing += [a, b]
    await twice_around(
        a,
        b,
        lambda key: tuned.standby.execute(f"INSERT INTO notes VALUES ('{key}')"),
        lambda key: tuned.primary.execute(f"INSERT INTO notes VALUES ('{key}')"),
        rejoin_timeout=60,
    )
    for server in (tuned.primary, tuned.standby):
        assert {"before", "via-a", "via-b"} <= notes(server), server.name


async def test_an_unreadable_history_is_an_unknown_divergence(
    tuned: PgPair, closing: list[PostgresEngine]
) -> None:
    tuned.primary.execute("CREATE ROLE plain LOGIN")
    tuned.wait_replayed()
    old, _ = await fail_over(tuned)
    plain = engine_mod.create(
        DatabaseConfig("postgres", tuned.standby.user_dsn("plain"), {}), set()
    )
    closing += [old, plain]
    report = await old.divergence(plain, 5)
    assert not report.known and report.lost is None and report.diverged is None, report
    assert "permission denied" in report.detail and "pg_read_server_files" in report.detail


def rejoin_cluster(request: pytest.FixtureRequest, profile: str) -> PgCluster:
    """A matrix cluster that can be rejoined (see support.rejoin_pair)."""
    return pg_cluster(
        profile,
        support.require_pg_bin(),
        support.pg_template(request.config),
        support.SECRET,
        settings={"full_page_writes": "on"},
    )


@pytest.mark.parametrize("profile", [STOCK, TUNED])
async def test_rejoin_and_verification_finish_while_the_new_primary_takes_writes(
    request: pytest.FixtureRequest, profile: str, tmp_path: Path
) -> None:
    """A few hundred writes a second on the new primary, from before the rejoin until
    after its verification: tuned, pg_rewind against the busy primary; stock (no
    wal_log_hints), a base backup of it. Both finish in bounded time, the verification
    passes, and every acknowledged write reaches the rejoined server."""
    cluster = rejoin_cluster(request, profile)
    await rejoin_under_load(cluster, tmp_path, 20, rewind_fallback="basebackup")


@pytest.mark.parametrize("profile", [STOCK, TUNED])
async def test_verification_passes_for_a_standby_steadily_behind_a_busy_primary(
    request: pytest.FixtureRequest, profile: str, tmp_path: Path
) -> None:
    """recovery_min_apply_delay 500ms on the rejoined standby stands for a replica that
    is always a little behind a busy primary: replay never reaches the primary's
    current position, yet it reaches any position read earlier within half a second."""
    cluster = rejoin_cluster(request, profile)
    try:
        async with failed_over_by_hand(cluster, tmp_path, 30, rewind_fallback="basebackup") as f:
            server = cluster.standby
            assert isinstance(server, PgServer)

            async def delay() -> None:
                server.execute("ALTER SYSTEM SET recovery_min_apply_delay = '500ms'")
                server.execute("SELECT pg_reload_conf()")

            took = await verified_while_steadily_behind(f, delay, 0.5)
    finally:
        await cluster.aclose()
    assert took < timing.within(5), took
