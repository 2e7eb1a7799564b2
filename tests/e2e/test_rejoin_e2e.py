"""Issue 16's proof: the loop around the pair, watching → failover → fence → rejoin →
watching → failover back, with the daemon as a process over a real primary + replica
and ``watchdogctl`` as an operator runs it.

Each engine's loop (Redis, MariaDB, PostgreSQL with the watcher beside the servers:
``data_dir``, pg_rewind), on servers with the tuned link settings (the replica gives a
silent primary up after 2 s):

1. the primary hangs (SIGSTOP), and the daemon fails over;
2. it comes back (SIGCONT) writable, and the daemon fences it (existing behaviour);
3. ``watchdogctl rejoin``: zero divergence, and it then streams from the new primary;
4. the new primary is killed (SIGKILL), and the daemon fails over back to the original
   node, with every write that was acknowledged and replicated present.

The second pass writes on the old primary where the replica cannot see it (the link is
cut first): the divergence report names those writes (bytes on Redis, GTIDs on
MariaDB, bytes of WAL and the xids on PostgreSQL), the rejoin is refused
without ``--accept-divergence`` and accepted with it, and the report is in
``status``, the journal and a webhook. Accepted, Redis resyncs, PostgreSQL rewinds and
MariaDB resyncs from a dump of the new primary (``rejoin_fallback: dump``), throwing the
diverged writes away, and the loop goes on.

``auto_rejoin`` is proven on Redis (rejoined by itself on a zero report, left alone and
reported once otherwise), and each engine's rejoin also runs on the servers' shipped
(stock) link settings, PostgreSQL's through the base-backup fallback."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import pymysql  # type: ignore[import-untyped]  # no stubs in the test extras
import pytest
import redis

from tests.e2e.test_engines_e2e import app_write
from tests.e2e.test_observability import start_receiver
from tests.integration.test_rejoin_postgres import notes, pair_for
from tests.support import free_port
from tests.support import mysql as mysql_support
from tests.support import pg as pg_support
from tests.support import redis as redis_support
from tests.support.daemon import DaemonProcess, ctl
from tests.support.pg import eventually
from watchdogd.demo.lab import STOCK, TUNED, PgPair, PgServer

Factory = Callable[..., DaemonProcess]
NOTIFIED = ["failover_completed", "writes_diverged", "rejoin_started", "rejoin_completed"]


def rejoin_config(
    tmp: Path, engine: str, main_db: dict[str, Any], failover_db: dict[str, Any], hook: int
) -> dict[str, Any]:
    return {
        "cluster": "orders",
        "primary": {"name": "main", "database": {"engine": engine, **main_db}},
        "standby": {"name": "failover", "database": {"engine": engine, **failover_db}},
        "probe": {"interval": "250ms", "timeout": "200ms", "recovery_successes": 2},
        "failover": {
            "mode": "automatic",
            "outage_threshold": "1s",
            "max_lag": "1MB",
            "cooldown": "1s",
            "steps": [
                {"name": "stop_replication", "action": "stop_replication", "timeout": "10s"},
                {"name": "promote_standby", "action": "promote", "timeout": "10s"},
            ],
            "fence_steps": [{"name": "fence_old_primary", "action": "fence", "timeout": "10s"}],
            "rejoin_timeout": "30s",
        },
        "notify": {"webhooks": [{"url": f"http://127.0.0.1:{hook}/hook", "events": NOTIFIED}]},
        "metrics": {"listen": f"127.0.0.1:{free_port()}"},
        "control": {"socket": str(tmp / "run" / "control.sock")},
        "log": {"format": "json", "level": "info"},
        "state_dir": str(tmp / "state"),
    }


def records(d: DaemonProcess, kind: str) -> list[dict[str, Any]]:
    return [r for r in d.journal() if r["type"] == kind]


async def fenced_after_failover(d: DaemonProcess) -> dict[str, Any]:
    """Until the old primary, back and writable, has been fenced."""
    await eventually(
        lambda: any(r["outcome"] == "completed" for r in records(d, "fence_finished")), within=20
    )

    async def one_writable() -> bool:
        return bool((await d.status())["writable_primaries"] == 1)

    await eventually(one_writable, within=5)
    status = await d.status()
    assert status["state"] == "failed_over"
    return status


class Hangs(Protocol):
    def sigstop(self) -> None: ...
    def sigcont(self) -> None: ...


async def hang_fail_over_and_fence(d: DaemonProcess, primary: Hangs) -> None:
    """Steps 1 and 2: the primary hangs, the daemon fails over; it comes back writable
    and the daemon fences it."""
    primary.sigstop()
    await d.wait_state("failed_over", within=20)
    primary.sigcont()
    await fenced_after_failover(d)


async def refused_without_acceptance(d: DaemonProcess, report: dict[str, Any]) -> None:
    """A diverged report refuses the rejoin (nothing journaled) and stays in status."""
    refused = await ctl("--socket", d.socket, "rejoin", "--yes")
    assert refused.code == 1
    assert refused.err.startswith(
        f"watchdogctl: rejoin: rejoin refused: main holds {report['summary']} that "
        "failover never got, and a rejoin throws them away: rerun with --accept-divergence"
    ), refused.err
    assert records(d, "rejoin_started") == []
    shown = (await d.status())["rejoin"]["divergence"]
    for key in ("failover_id", "lost", "unit", "items", "summary"):
        assert shown[key] == report[key], key
    human = await ctl("--socket", d.socket, "status")
    assert re.search(
        rf"^divergence +main holds {re.escape(report['summary'])} that failover never got",
        human.out,
        re.MULTILINE,
    ), human.out


def journaled_as_accepted(d: DaemonProcess, report: dict[str, Any]) -> dict[str, Any]:
    """The rejoin journals the divergence it measured when it started: the report's
    writes, exactly. PostgreSQL's byte count may have grown since the dry run: an idle
    server still writes WAL of its own (a standby snapshot every 15 s, checkpoints),
    and the bytes are measured to the old primary's end of WAL."""
    (started,) = records(d, "rejoin_started")
    assert started["accepted"] is True
    journaled: dict[str, Any] = started["divergence"]
    assert journaled["items"] == report["items"]
    if report["unit"] == "bytes":
        assert journaled["lost"] >= report["lost"]
    else:
        assert journaled["lost"] == report["lost"]
    return journaled


async def rejoin_by_the_report(
    d: DaemonProcess, unit: str, diverged: bool, at_least: int = 1
) -> dict[str, Any]:
    """Step 3 by the dry run's report: zero goes ahead; diverged (at least ``at_least``)
    is refused, then accepted. The report is returned."""
    report: dict[str, Any] = (await rejoin_dry_run(d))["divergence"]
    assert report["known"] is True and report["unit"] == unit
    if not diverged:
        assert report["lost"] == 0 and report["diverged"] is False, report
        await rejoined(d)
        return report
    assert report["diverged"] is True and report["lost"] >= at_least, report
    await refused_without_acceptance(d, report)
    status = await rejoined(d, "--accept-divergence")
    journaled = journaled_as_accepted(d, report)
    assert status["rejoin"]["divergence"]["lost"] == journaled["lost"]
    return report


async def told_by_webhook(
    received: list[dict[str, Any]], diverged: bool, failovers: int
) -> dict[str, Any] | None:
    """What the webhook got: the failovers, one rejoin_started carrying its report, and
    writes_diverged (returned) exactly when writes diverged."""

    def named(event: str) -> list[dict[str, Any]]:
        return [r for r in received if r["event"] == event]

    await eventually(
        lambda: len(named("failover_completed")) == failovers and named("rejoin_started")
    )
    (started,) = named("rejoin_started")
    assert started["divergence"]["diverged"] is diverged, started
    if not diverged:
        assert named("writes_diverged") == []
        return None
    (report,) = named("writes_diverged")
    assert report["lost"] == started["divergence"]["lost"] and report["cluster"] == "orders"
    assert (report["old_primary"], report["new_primary"]) == ("main", "failover")
    return report


async def rejoin_dry_run(d: DaemonProcess) -> dict[str, Any]:
    ran = await ctl("--socket", d.socket, "rejoin", "--dry-run", "--json")
    assert ran.code == 0, ran
    result: dict[str, Any] = json.loads(ran.out)
    assert result["dry_run"] is True
    assert [s["name"] for s in result["plan"]["steps"]] == ["rejoin", "verify_rejoin"]
    assert (result["plan"]["from"], result["plan"]["to"]) == ("main", "failover")
    return result


async def rejoined(d: DaemonProcess, *extra: str) -> dict[str, Any]:
    """``watchdogctl rejoin`` and the wait until it is verified, acked and re-armed."""
    ran = await ctl("--socket", d.socket, "rejoin", "--yes", *extra)
    assert ran.code == 0, ran
    assert (
        ran.out.startswith("rejoin rejoin-") and "started: main -> standby of failover" in ran.out
    )

    async def done() -> bool:
        return bool(records(d, "rejoin_finished")) and (await d.status())["armed"]

    await eventually(done, within=40, interval=0.2)
    (finished,) = records(d, "rejoin_finished")
    assert finished["outcome"] == "completed", finished
    status = await d.wait_state("watching", within=10)
    assert status["roles"] == {"primary": "failover", "standby": "main"}
    assert status["rejoin"]["last"]["outcome"] == "completed"
    (ack,) = records(d, "ack")
    assert ack["rejoin_id"] == finished["id"] and ack["primary"] == "failover"
    return status


async def watched_afresh(d: DaemonProcess) -> None:
    """Until the daemon, watching the pair in its new roles, has seen the new primary's
    position (without it the lag guard rightly refuses the next failover)."""

    async def seen() -> bool:
        return (await d.status())["lag"]["bytes"] is not None

    await eventually(seen, within=10)


async def failed_back(d: DaemonProcess) -> dict[str, Any]:
    status = await d.wait_state("failed_over", within=20)
    assert status["roles"] == {"primary": "main", "standby": "failover"}
    second = records(d, "failover_finished")[-1]
    assert second["outcome"] == "completed" and len(records(d, "failover_finished")) == 2
    return status


# --------------------------------------------------------------------------- Redis


@pytest.fixture
def redis_pair() -> Iterator[redis_support.RedisPair]:
    with redis_support.redis_pair(redis_support.TUNED) as pair:
        yield pair


def redis_db(pair: redis_support.RedisPair, server: redis_support.RedisServer) -> dict[str, Any]:
    return {"dsn": pair.dsn(server)}


def redis_config(pair: redis_support.RedisPair, tmp: Path, hook: int) -> dict[str, Any]:
    return rejoin_config(
        tmp, "redis", redis_db(pair, pair.primary), redis_db(pair, pair.replica), hook
    )


def replicated_and_quiet(pair: redis_support.RedisPair) -> None:
    """Everything written has reached the replica, and the primary stops adding its
    keep-alive PINGs (14 bytes each) to the replication stream: a PING appended just
    before the fault and never delivered is 14 bytes the new primary lacks, which the
    report rightly counts. The zero passes mean "no write after the fault"."""
    pair.primary.call("CONFIG", "SET", "repl-ping-replica-period", "3600")
    pair.wait_caught_up()


def redis_follows(old: redis_support.RedisServer, new: redis_support.RedisServer) -> bool:
    info = old.info()
    return (
        info["role"] == "slave"
        and info.get("master_port") == new.port
        and info.get("master_link_status") == "up"
    )


async def redis_loop(pair: redis_support.RedisPair, d: DaemonProcess, diverged: bool) -> None:
    primary, replica = pair.primary, pair.replica
    kept = {f"acked-{i}": str(i) for i in range(20)}
    for key, value in kept.items():
        primary.call("SET", key, value)
    replicated_and_quiet(pair)
    lost = {f"lost-{i}": "x" * 100 for i in range(3)}
    if diverged:
        await cut_and_write_past_it(pair, lost)

    await hang_fail_over_and_fence(d, primary)
    with pytest.raises(redis.ResponseError, match="NOREPLICAS"):
        primary.call("SET", "while-fenced", "1")

    await rejoin_by_the_report(d, "bytes", diverged, at_least=300)
    if diverged:
        # Thrown away, as the report said: the old primary now holds the new one's data.
        assert primary.call("MGET", *lost) == [None] * len(lost)

    assert redis_follows(primary, replica)
    replica.call("SET", "after-rejoin", "1")
    await eventually(lambda: primary.call("GET", "after-rejoin") == "1")
    kept["after-rejoin"] = "1"

    await watched_afresh(d)
    replica.kill()
    await failed_back(d)
    assert primary.info()["role"] == "master"
    assert primary.call("MGET", *kept) == list(kept.values())
    primary.call("SET", "after-fail-back", "1")  # writable again: the fence is gone


@pytest.mark.parametrize("diverged", [False, True], ids=["zero", "diverged"])
async def test_redis_loop_around_the_pair(
    redis_pair: redis_support.RedisPair, daemon_factory: Factory, tmp_path: Path, diverged: bool
) -> None:
    hook, received, port = await start_receiver()
    try:
        cfg = redis_config(redis_pair, tmp_path, port)
        d = daemon_factory(cfg)
        await d.start()
        await d.wait_state("watching")
        await redis_loop(redis_pair, d, diverged)
        report = await told_by_webhook(received, diverged, failovers=2)
        assert report is None or report["lost"] > 300
        assert redis_pair.password not in d.logs()
    finally:
        await hook.cleanup()


async def cut_and_write_past_it(pair: redis_support.RedisPair, lost: dict[str, str]) -> None:
    """The replica can no longer authenticate: what the primary writes now never
    reaches it (written after the fault that will cost them)."""
    pair.replica.call("CONFIG", "SET", "masterauth", "wrong")
    pair.primary.call("CLIENT", "KILL", "TYPE", "replica")
    await eventually(lambda: pair.replica.info()["master_link_status"] == "down")
    for key, value in lost.items():
        pair.primary.call("SET", key, value)


def rejoin_waiting_metric(text: str) -> float:
    (line,) = [x for x in text.splitlines() if x.startswith("watchdogd_rejoin_waiting{")]
    return float(line.rsplit(" ", 1)[1])


@pytest.mark.parametrize("diverged", [False, True], ids=["zero", "diverged"])
async def test_redis_auto_rejoin_only_on_a_zero_report(
    redis_pair: redis_support.RedisPair, daemon_factory: Factory, tmp_path: Path, diverged: bool
) -> None:
    """``auto_rejoin``: the old primary, back and fenced, is rejoined by the daemon itself
    when nothing diverged; otherwise the daemon says so once and waits for an operator."""
    hook, received, port = await start_receiver()
    try:
        cfg = redis_config(redis_pair, tmp_path, port)
        cfg["failover"]["auto_rejoin"] = True
        cfg["notify"]["webhooks"][0]["events"].append("rejoin_waiting")
        d = daemon_factory(cfg)
        await d.start()
        await d.wait_state("watching")
        redis_pair.primary.call("SET", "acked", "1")
        replicated_and_quiet(redis_pair)
        if diverged:
            await cut_and_write_past_it(redis_pair, {"lost": "x" * 100})

        if not diverged:
            redis_pair.primary.sigstop()
            await d.wait_state("failed_over", within=20)
            redis_pair.primary.sigcont()
            await eventually(lambda: bool(records(d, "ack")), within=30)
            kinds = [r["type"] for r in d.journal()]
            # Fenced first (both nodes were writable), then rejoined by the daemon itself.
            assert kinds.index("fence_finished") < kinds.index("rejoin_started"), kinds
            (started,) = records(d, "rejoin_started")
            assert started["trigger"] == "automatic" and started["accepted"] is False
            assert started["divergence"]["lost"] == 0
            assert records(d, "rejoin_finished")[0]["outcome"] == "completed"
            status = await d.wait_state("watching", within=10)
            assert status["roles"] == {"primary": "failover", "standby": "main"}
            assert redis_follows(redis_pair.primary, redis_pair.replica)
            await told_by_webhook(received, False, failovers=1)
            return

        await hang_fail_over_and_fence(d, redis_pair.primary)

        async def waiting() -> bool:
            return (await d.status())["rejoin"]["waiting"] is not None

        await eventually(waiting, within=15)
        await eventually(lambda: any(r["event"] == "rejoin_waiting" for r in received))
        await asyncio.sleep(1.5)  # six more cycles: nothing new is said or done
        status = await d.status()
        assert status["state"] == "failed_over" and status["armed"] is False
        assert status["rejoin"]["waiting"]["reason"].startswith("writes diverged: ")
        assert records(d, "rejoin_started") == []
        assert rejoin_waiting_metric(await d.metrics()) == 1.0
        events = [r["event"] for r in received]
        assert events.count("writes_diverged") == 1 and events.count("rejoin_waiting") == 1
        assert redis_pair.primary.call("GET", "lost") == "x" * 100  # untouched

        await rejoined(d, "--accept-divergence")
        assert rejoin_waiting_metric(await d.metrics()) == 0.0
        assert (await d.status())["rejoin"]["waiting"] is None
        assert redis_pair.primary.call("MGET", "acked", "lost") == ["1", None]
    finally:
        await hook.cleanup()


async def test_a_rejoin_cut_off_by_a_killed_daemon_resumes_after_the_restart(
    redis_pair: redis_support.RedisPair, daemon_factory: Factory, tmp_path: Path
) -> None:
    """SIGKILL the daemon in the middle of a rejoin: the next start resumes it from its
    first unfinished step (the done ``rejoin`` step is not run again), verifies it and
    re-arms."""
    hook, _, port = await start_receiver()
    try:
        cfg = redis_config(redis_pair, tmp_path, port)
        cfg["failover"]["rejoin_steps"] = [
            {"name": "rejoin", "action": "rejoin"},
            {"name": "tell_ops", "action": "command", "argv": ["sleep", "3"], "idempotent": True},
        ]
        d = daemon_factory(cfg)
        await d.start()
        await d.wait_state("watching")
        redis_pair.primary.call("SET", "acked", "1")
        replicated_and_quiet(redis_pair)
        await hang_fail_over_and_fence(d, redis_pair.primary)
        ran = await ctl("--socket", d.socket, "rejoin", "--yes")
        assert ran.code == 0, ran

        async def at_tell_ops() -> bool:
            running = (await d.status())["rejoin"]["running"]
            return running is not None and running["step"] == "tell_ops"

        await eventually(at_tell_ops, within=20)
        d.kill()
        assert records(d, "rejoin_finished") == [] and records(d, "ack") == []

        again = daemon_factory(cfg)
        await again.start()
        await eventually(lambda: bool(records(again, "ack")), within=30)
        (finished,) = records(again, "rejoin_finished")
        assert finished["outcome"] == "completed"
        steps = [(r["step"], r["outcome"]) for r in records(again, "rejoin_step_finished")]
        assert steps == [("rejoin", "ok"), ("tell_ops", "ok"), ("verify_rejoin", "ok")]
        resumed = [e for e in again.events() if e.get("event") == "rejoin_resumed"]
        assert [e["steps_done"] for e in resumed] == [["rejoin"]]
        status = await again.wait_state("watching", within=10)
        assert status["roles"] == {"primary": "failover", "standby": "main"}
        assert redis_follows(redis_pair.primary, redis_pair.replica)
    finally:
        await hook.cleanup()


# --------------------------------------------------------------------------- MariaDB


@pytest.fixture
def maria(mariadb_template_dir: Path) -> Iterator[mysql_support.MariaDBPair]:
    with mysql_support.mariadb_pair(mariadb_template_dir, mysql_support.TUNED) as pair:
        yield pair


def maria_db(pair: mysql_support.MariaDBPair, server: mysql_support.MariaDB) -> dict[str, Any]:
    # A diverged old primary can only be rejoined by a resync from the new one.
    return {
        "dsn": pair.dsn(server),
        "replication_user": "repl",
        "replication_password": pair.repl_password,
        "rejoin_fallback": "dump",
    }


def rows(server: mysql_support.MariaDB) -> set[str]:
    return {r["v"] for r in server.sql("SELECT v FROM app.t")}


def maria_follows(old: mysql_support.MariaDB, new: mysql_support.MariaDB) -> bool:
    st = mysql_support.replica_status(old)
    return (
        st.get("Master_Port") == new.port
        and st.get("Slave_IO_Running") == "Yes"
        and st.get("Slave_SQL_Running") == "Yes"
    )


async def maria_loop(pair: mysql_support.MariaDBPair, d: DaemonProcess, diverged: bool) -> None:
    primary, replica = pair.primary, pair.replica
    kept = {f"acked-{i}" for i in range(20)}
    for value in sorted(kept):
        app_write(pair, primary, value)
    pair.wait_replica_caught_up()
    lost: list[str] = []
    if diverged:
        replica.sql("STOP SLAVE IO_THREAD")  # what the primary writes now never arrives
        before = str(primary.sql("SELECT @@gtid_binlog_pos AS p")[0]["p"])
        for i in range(3):
            app_write(pair, primary, f"lost-{i}")
        domain, server_id, seq = before.split("-")
        lost = [f"{domain}-{server_id}-{int(seq) + i}" for i in (1, 2, 3)]

    await hang_fail_over_and_fence(d, primary)
    with pytest.raises(pymysql.err.OperationalError, match=r"read-only|read_only"):
        app_write(pair, primary, "while-fenced")

    report = (await rejoin_dry_run(d))["divergence"]
    assert report["known"] is True and report["unit"] == "transactions"
    if diverged:
        assert report["diverged"] is True and report["lost"] == 3, report
        assert (
            report["items"] == lost and report["summary"] == f"3 transactions ({', '.join(lost)})"
        )
        await refused_without_acceptance(d, report)
        await rejoined(d, "--accept-divergence")
        journaled_as_accepted(d, report)
        assert not {f"lost-{i}" for i in range(3)} & rows(primary)  # thrown away
    else:
        assert report["lost"] == 0 and report["diverged"] is False, report
        await rejoined(d)
    assert maria_follows(primary, replica)
    app_write(pair, replica, "after-rejoin")
    await eventually(lambda: "after-rejoin" in rows(primary))
    kept.add("after-rejoin")
    await watched_afresh(d)
    replica.kill()
    await failed_back(d)
    app_write(pair, primary, "after-fail-back")  # writable again
    assert kept <= rows(primary)
    assert not {f"lost-{i}" for i in range(3)} & rows(primary)


@pytest.mark.parametrize("diverged", [False, True], ids=["zero", "diverged"])
async def test_mariadb_loop_around_the_pair(
    maria: mysql_support.MariaDBPair, daemon_factory: Factory, tmp_path: Path, diverged: bool
) -> None:
    hook, received, port = await start_receiver()
    try:
        cfg = rejoin_config(
            tmp_path, "mysql", maria_db(maria, maria.primary), maria_db(maria, maria.replica), port
        )
        d = daemon_factory(cfg)
        maria.grant_resync()
        await d.start()
        await d.wait_state("watching")
        await maria_loop(maria, d, diverged)
        report = await told_by_webhook(received, diverged, failovers=2)
        assert report is None or (report["lost"], len(report["items"])) == (3, 3)
        for secret in (maria.password, maria.repl_password):
            assert secret not in d.logs()
            assert secret not in (Path(cfg["state_dir"]) / "journal.jsonl").read_text()
    finally:
        await hook.cleanup()


# --------------------------------------------------------------------------- PostgreSQL


@pytest.fixture
def pg_rejoin_pair(request: pytest.FixtureRequest) -> Iterator[PgPair]:
    """The tuned lab pair (wal_log_hints on, the standby gives a silent primary up after
    2 s) with full_page_writes on, as pg_rewind needs."""
    yield from pair_for(request, TUNED)  # with a table notes holding 'before'


def pg_db(pair: PgPair, server: PgServer) -> dict[str, Any]:
    """The watcher runs beside each server: its data directory and how to start it."""
    return {
        "dsn": server.dsn,
        "data_dir": str(server.data_dir),
        "start_command": pg_support.start_command(pair, server),
    }


async def pg_loop(pair: PgPair, d: DaemonProcess, diverged: bool) -> None:
    primary, standby = pair.primary, pair.standby
    kept = {"before", *(f"acked-{i}" for i in range(20))}
    primary.execute("INSERT INTO notes SELECT 'acked-' || i FROM generate_series(0, 19) AS i")
    pair.wait_replayed()
    xids: list[str] = []
    if diverged:
        # The standby stops receiving: what the primary commits now never reaches it.
        standby.execute("ALTER SYSTEM SET primary_conninfo = ''")
        standby.execute("SELECT pg_reload_conf()")
        await eventually(
            lambda: standby.execute("SELECT count(*) FROM pg_stat_wal_receiver") == "0"
        )
        xids = [
            primary.execute(f"INSERT INTO notes VALUES ('lost-{i}') RETURNING pg_current_xact_id()")
            for i in range(3)
        ]

    await hang_fail_over_and_fence(d, primary)
    assert primary.execute("SHOW default_transaction_read_only") == "on"

    report = await rejoin_by_the_report(d, "bytes", diverged, at_least=150)
    if diverged:
        assert report["items"] == [f"xid {x}" for x in xids], report
        # Rewound away, as the report said.
        assert not {f"lost-{i}" for i in range(3)} & notes(primary)

    assert primary.is_in_recovery()
    standby.execute("INSERT INTO notes VALUES ('after-rejoin')")
    await eventually(lambda: "after-rejoin" in notes(primary), within=10)
    kept.add("after-rejoin")

    await watched_afresh(d)
    standby.kill()
    await failed_back(d)
    assert not primary.is_in_recovery()
    primary.execute("INSERT INTO notes VALUES ('after-fail-back')")  # writable again
    assert kept <= notes(primary)


@pytest.mark.parametrize("diverged", [False, True], ids=["zero", "diverged"])
async def test_postgres_loop_around_the_pair(
    pg_rejoin_pair: PgPair, daemon_factory: Factory, tmp_path: Path, diverged: bool
) -> None:
    pair = pg_rejoin_pair
    hook, received, port = await start_receiver()
    try:
        cfg = rejoin_config(
            tmp_path, "postgres", pg_db(pair, pair.primary), pg_db(pair, pair.standby), port
        )
        cfg["failover"]["rejoin_steps"] = [{"name": "rejoin", "action": "rejoin", "timeout": "1m"}]
        d = daemon_factory(cfg)
        await d.start()
        await d.wait_state("watching")
        await pg_loop(pair, d, diverged)
        report = await told_by_webhook(received, diverged, failovers=2)
        assert report is None or len(report["items"]) == 3
        assert pg_support.SECRET not in d.logs()
    finally:
        await hook.cleanup()


# --------------------------------------------------------------------------- stock settings
#
# On the servers' shipped link settings a hung primary is confirmed only after the
# replica's own timeout (60 s), so these passes fail over by hand with the old primary
# still up and writable (as after a partition), then rejoin on stock settings, and kill
# the new primary (a crash is confirmed at once on any settings) to fail back.


async def forced_failover_and_fence(d: DaemonProcess) -> None:
    ran = await ctl("--socket", d.socket, "failover", "--force", "--yes")
    assert ran.code == 0, ran
    await d.wait_state("failed_over", within=20)
    await fenced_after_failover(d)


async def test_redis_rejoin_on_stock_settings(daemon_factory: Factory, tmp_path: Path) -> None:
    hook, received, port = await start_receiver()
    try:
        with redis_support.redis_pair(redis_support.STOCK) as pair:
            d = daemon_factory(redis_config(pair, tmp_path, port))
            await d.start()
            await d.wait_state("watching")
            pair.primary.call("SET", "acked", "1")
            replicated_and_quiet(pair)
            await forced_failover_and_fence(d)
            await rejoin_by_the_report(d, "bytes", diverged=False)
            assert redis_follows(pair.primary, pair.replica)
            pair.replica.call("SET", "after-rejoin", "1")
            await eventually(lambda: pair.primary.call("GET", "after-rejoin") == "1")
            await watched_afresh(d)
            pair.replica.kill()
            await failed_back(d)
            assert pair.primary.call("MGET", "acked", "after-rejoin") == ["1", "1"]
        await told_by_webhook(received, False, failovers=2)
    finally:
        await hook.cleanup()


async def test_mariadb_rejoin_on_stock_settings(
    mariadb_template_dir: Path, daemon_factory: Factory, tmp_path: Path
) -> None:
    hook, received, port = await start_receiver()
    try:
        with mysql_support.mariadb_pair(mariadb_template_dir, mysql_support.STOCK) as pair:
            cfg = rejoin_config(
                tmp_path, "mysql", maria_db(pair, pair.primary), maria_db(pair, pair.replica), port
            )
            d = daemon_factory(cfg)
            await d.start()
            await d.wait_state("watching")
            app_write(pair, pair.primary, "acked")
            pair.wait_replica_caught_up()
            await forced_failover_and_fence(d)
            await rejoin_by_the_report(d, "transactions", diverged=False)
            assert maria_follows(pair.primary, pair.replica)
            app_write(pair, pair.replica, "after-rejoin")
            await eventually(lambda: "after-rejoin" in rows(pair.primary))
            await watched_afresh(d)
            pair.replica.kill()
            await failed_back(d)
            app_write(pair, pair.primary, "after-fail-back")
            assert {"acked", "after-rejoin", "after-fail-back"} <= rows(pair.primary)
        await told_by_webhook(received, False, failovers=2)
    finally:
        await hook.cleanup()


@pytest.fixture
def pg_stock_pair(request: pytest.FixtureRequest) -> Iterator[PgPair]:
    yield from pair_for(request, STOCK)  # PostgreSQL's shipped settings


async def test_postgres_rejoin_on_stock_settings_falls_back_to_a_base_backup(
    pg_stock_pair: PgPair, daemon_factory: Factory, tmp_path: Path
) -> None:
    """Stock PostgreSQL has neither wal_log_hints nor data checksums: pg_rewind is
    impossible, and ``rewind_fallback: basebackup`` rebuilds the old primary instead."""
    hook, received, port = await start_receiver()
    pair = pg_stock_pair
    try:
        main_db = {**pg_db(pair, pair.primary), "rewind_fallback": "basebackup"}
        cfg = rejoin_config(tmp_path, "postgres", main_db, pg_db(pair, pair.standby), port)
        cfg["failover"]["rejoin_steps"] = [{"name": "rejoin", "action": "rejoin", "timeout": "1m"}]
        d = daemon_factory(cfg)
        await d.start()
        await d.wait_state("watching")
        await forced_failover_and_fence(d)
        await rejoin_by_the_report(d, "bytes", diverged=False)
        (step,) = [r for r in records(d, "rejoin_step_finished") if r["step"] == "rejoin"]
        assert "pg_rewind impossible" in step["detail"], step
        assert "with a base backup of the new primary" in step["detail"], step
        assert pair.primary.is_in_recovery()
        pair.standby.execute("INSERT INTO notes VALUES ('after-rejoin')")
        await eventually(lambda: "after-rejoin" in notes(pair.primary), within=10)
        await watched_afresh(d)
        pair.standby.kill()
        await failed_back(d)
        pair.primary.execute("INSERT INTO notes VALUES ('after-fail-back')")
        assert {"before", "after-rejoin", "after-fail-back"} <= notes(pair.primary)
        await told_by_webhook(received, False, failovers=2)
    finally:
        await hook.cleanup()
