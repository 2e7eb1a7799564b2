"""The guard's pure rules with injected clocks: its signs of life, which orders it
carries out, when the leader may promote; and its settings and command line."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
from pathlib import Path

import pytest
import yaml

from watchdogd import cli
from watchdogd.config import parse
from watchdogd.core.model import DatabaseConfig
from watchdogd.guard import (
    DbAddress,
    GuardConfigError,
    GuardSettings,
    SignsOfLife,
    _local,
    address_of,
    persist_read_only,
    postmaster_running,
    refused,
    settings_from_config,
)
from watchdogd.state.etcd import EtcdClient, KeyValue
from watchdogd.state.guard_keys import (
    Ack,
    ClearanceRule,
    GuardKeys,
    GuardSnapshot,
    Order,
    guard_clearance,
    order_verdict,
    snapshot_of,
)
from watchdogd.state.store import Token

ISO = 10.0
TOKEN = Token("dc1", 42)


# --------------------------------------------------------------------------- signs of life


def test_the_start_counts_and_the_timeout_is_measured_from_the_last_sign() -> None:
    signs = SignsOfLife(start=100.0)
    assert not signs.isolated(109.9, ISO)
    assert signs.isolated(110.0, ISO)
    signs.store_renewed(105.0)  # a renewal sent at 105, acknowledged later
    assert signs.source == "store"
    assert not signs.isolated(114.9, ISO) and signs.isolated(115.0, ISO)
    signs.store_renewed(103.0)  # a slower, older renewal never moves the sign back
    assert signs.last == 105.0


def test_a_standby_reply_counts_only_when_its_mark_grew_since_the_previous_read() -> None:
    signs = SignsOfLife(start=0.0)
    signs.standby_mark(500.0, polled_at=20.0)  # the first read proves nothing by itself
    assert signs.last == 0.0
    signs.standby_mark(500.0, polled_at=21.0)  # no new reply
    assert signs.last == 0.0
    signs.standby_mark(501.0, polled_at=22.0)  # a reply arrived after the read sent at 21
    assert (signs.last, signs.source) == (21.0, "standby")
    # The marks are the standby's clock: a mark far in the future is still only "grew".
    signs.standby_mark(10_000.0, polled_at=23.0)
    assert signs.last == 22.0


def test_no_standby_or_an_unreadable_mark_breaks_the_chain() -> None:
    signs = SignsOfLife(start=0.0)
    signs.standby_mark(1.0, polled_at=10.0)
    signs.standby_mark(None, polled_at=11.0)  # detached, or the query failed
    signs.standby_mark(2.0, polled_at=12.0)  # grew, but not since a read that saw it
    assert signs.last == 0.0
    assert signs.isolated(12.0, ISO)
    signs.standby_mark(3.0, polled_at=13.0)
    assert signs.last == 12.0 and not signs.isolated(13.0, ISO)


# --------------------------------------------------------------------------- orders


def snap(
    *,
    leader: int | None = 42,
    order: Order | None = None,
    ack: Ack | None = None,
    alive: bool = True,
) -> GuardSnapshot:
    return GuardSnapshot(
        revision=100,
        leader_token=leader,
        leader_holder=None if leader is None else "dc1",
        order=order,
        ack=ack,
        alive=alive,
    )


ORDER = Order(token=42, holder="dc1", failover_id="f1", revision=77)


def test_an_order_is_valid_only_with_the_current_leader_keys_token() -> None:
    assert order_verdict(snap(order=ORDER))[0] == ORDER
    assert order_verdict(snap())[0] is None
    order, why = order_verdict(snap(leader=None, order=ORDER))
    assert order is None and "stale: no leader key" in why
    order, why = order_verdict(snap(leader=43, order=ORDER))
    assert order is None and "token 42" in why and "token 43" in why
    odd = dataclasses.replace(ORDER, action="reboot")
    assert order_verdict(snap(order=odd))[0] is None


def test_an_order_naming_another_node_is_not_for_this_guard() -> None:
    named = dataclasses.replace(ORDER, node="a")
    assert Order.decode(named.encode(), 77) == named
    assert order_verdict(snap(order=named), "a")[0] == named
    order, why = order_verdict(snap(order=named), "b")
    assert order is None and "for node 'a'" in why
    assert order_verdict(snap(order=ORDER), "b")[0] == ORDER  # no node named: any guard


def test_an_order_acknowledged_as_fenced_is_not_carried_out_again() -> None:
    done = Ack(order_revision=77, token=42, fenced=True, detail="fenced")
    assert order_verdict(snap(order=ORDER, ack=done))[0] is None
    failed = dataclasses.replace(done, fenced=False)
    assert order_verdict(snap(order=ORDER, ack=failed))[0] == ORDER  # tried again
    older = dataclasses.replace(done, order_revision=70)
    assert order_verdict(snap(order=ORDER, ack=older))[0] == ORDER


def test_keys_that_do_not_decode_count_as_absent_with_one_line_each() -> None:
    keys = GuardKeys.under("/watchdogd/c/")
    assert keys.order == b"/watchdogd/c/guard/order"

    def kv(key: bytes, value: bytes) -> KeyValue:
        return KeyValue(key, value, 5, 9, 1, 0)

    leader = kv(keys.leader, b"dc1")
    result = snapshot_of(
        10, leader, (kv(keys.order, b"{not json"), kv(keys.ack, b'{"fenced": "yes"}')), keys
    )
    assert result.order is None and result.ack is None and not result.alive
    assert result.leader_token == 5
    assert len(result.problems) == 2 and all("\n" not in p for p in result.problems)
    good = snapshot_of(10, leader, (kv(keys.order, ORDER.encode()), kv(keys.alive, b"x")), keys)
    assert good.order == dataclasses.replace(ORDER, revision=9) and good.alive
    ack = Ack(9, 5, True, "x" * 1000)
    assert Ack.decode(ack.encode()).detail == "x" * 300


def test_an_order_answered_down_is_carried_out_even_once_its_token_is_stale() -> None:
    down = Ack(order_revision=77, token=42, fenced=False, detail="refused", down=True)
    assert Ack.decode(down.encode()) == down and down.promised
    # The leader may have failed over on "down": the fence is owed whoever leads now.
    order, why = order_verdict(snap(leader=50, order=ORDER, ack=down))
    assert order == ORDER and "answered down" in why
    assert order_verdict(snap(leader=None, order=ORDER, ack=down))[0] == ORDER
    # Another order's "down", or a fenced one: the usual rules.
    other = dataclasses.replace(down, order_revision=70)
    assert order_verdict(snap(leader=50, order=ORDER, ack=other))[0] is None
    done = dataclasses.replace(down, fenced=True)
    assert order_verdict(snap(leader=50, order=ORDER, ack=done))[0] is None
    with pytest.raises(ValueError, match="'down' is not a bool"):
        Ack.decode(b'{"order_revision": 1, "token": 1, "fenced": false, "down": "yes"}')
    assert not Ack.decode(b'{"order_revision": 1, "token": 1, "fenced": false}').down


# --------------------------------------------------------------------------- clearance


def test_cleared_by_a_down_ack_of_our_own_order_only() -> None:
    rule = ClearanceRule(TOKEN, "f1", ISO)
    down = Ack(order_revision=77, token=42, fenced=False, detail="refused", down=True)
    verdict = rule.observe(snap(order=ORDER, ack=down), now=0.0)
    assert verdict.cleared and verdict.via == "down" and "refused" in verdict.reason
    hung = dataclasses.replace(down, down=False, detail="fence timed out")
    verdict = rule.observe(snap(order=ORDER, ack=hung), now=0.0)
    assert not verdict.cleared and "could not fence" in verdict.reason
    other = dataclasses.replace(ORDER, failover_id="f0")
    assert not rule.observe(snap(order=other, ack=down), now=0.0).cleared
    assert not rule.observe(snap(order=ORDER, ack=dataclasses.replace(down, token=41)),
                            now=0.0).cleared  # fmt: skip
    assert not rule.observe(snap(leader=50, order=ORDER, ack=down), now=0.0).cleared


def test_cleared_by_an_ack_of_our_own_order_only() -> None:
    rule = ClearanceRule(TOKEN, "f1", ISO)
    ack = Ack(order_revision=77, token=42, fenced=True, detail="read-only")
    verdict = rule.observe(snap(order=ORDER, ack=ack), now=0.0)
    assert verdict.cleared and verdict.via == "ack"
    # An ack of an older order, another failover's order, a failed fence: not cleared.
    assert not rule.observe(snap(order=ORDER, ack=dataclasses.replace(ack, order_revision=70)),
                            now=0.0).cleared  # fmt: skip
    other = dataclasses.replace(ORDER, failover_id="f0")
    assert not rule.observe(snap(order=other, ack=ack), now=0.0).cleared
    refused = rule.observe(snap(order=ORDER, ack=dataclasses.replace(ack, fenced=False)), 0.0)
    assert not refused.cleared and "could not fence" in refused.reason
    # Our order, acked, but the leader key is someone else's now.
    assert not rule.observe(snap(leader=50, order=ORDER, ack=ack), now=0.0).cleared


def test_cleared_when_the_key_was_absent_in_consecutive_reads_for_the_timeout() -> None:
    rule = ClearanceRule(TOKEN, "f1", ISO)
    assert not rule.observe(snap(alive=True), now=0.0).cleared
    assert not rule.observe(snap(alive=False), now=1.0).cleared  # absent since 1.0
    assert not rule.observe(snap(alive=False), now=10.9).cleared
    verdict = rule.observe(snap(alive=False), now=11.0)
    assert verdict.cleared and verdict.via == "expired"


def test_a_guard_run_with_a_longer_isolation_timeout_is_waited_out() -> None:
    """The guard publishes what it runs with (guard/settings, on no lease): a leader
    configured with a shorter timeout than the guard's would otherwise promote while an
    isolated guard has not fenced yet."""
    from dataclasses import replace

    from watchdogd.state.guard_keys import Published

    longer = Published("main", ISO * 3)
    assert Published.decode(longer.encode()) == longer
    for junk in (b"[]", b'{"node": "main"}', b'{"node": "main", "isolation_timeout": true}'):
        with pytest.raises(ValueError, match="guard settings"):
            Published.decode(junk)
    rule = ClearanceRule(TOKEN, "f1", ISO)
    assert not rule.observe(replace(snap(alive=True), published=longer), now=0.0).cleared
    rule.observe(replace(snap(alive=False), published=longer), now=1.0)
    verdict = rule.observe(replace(snap(alive=False), published=longer), now=1.0 + ISO + 1)
    assert not verdict.cleared and f"{ISO * 3:g}s" in verdict.reason
    assert rule.observe(replace(snap(alive=False), published=longer), now=1.0 + 3 * ISO).cleared


@pytest.mark.parametrize("interruption", ["alive again", "store unavailable"])
def test_a_present_key_or_a_failed_read_restarts_the_count(interruption: str) -> None:
    rule = ClearanceRule(TOKEN, "f1", ISO)
    rule.observe(snap(alive=False), now=0.0)
    if interruption == "alive again":
        rule.observe(snap(alive=True), now=5.0)
    else:
        verdict = rule.observe(None, now=5.0, why="etcd kv/txn unavailable: ...")
        assert not verdict.cleared and verdict.reason.startswith("store unavailable")
    rule.observe(snap(alive=False), now=6.0)
    assert not rule.observe(snap(alive=False), now=15.9).cleared
    assert rule.observe(snap(alive=False), now=16.0).cleared


def test_never_cleared_without_leadership_or_before_the_standby_went_quiet() -> None:
    rule = ClearanceRule(TOKEN, "f1", ISO)
    rule.observe(snap(leader=None, alive=False), now=0.0)
    assert not rule.observe(snap(leader=None, alive=False), now=100.0).cleared
    quiet = ClearanceRule(TOKEN, "f1", ISO, quiet_since=5.0, margin=3.0)
    quiet.observe(snap(alive=False), now=0.0)
    verdict = quiet.observe(snap(alive=False), now=17.9)  # absent 17.9 s, quiet 12.9 s
    assert not verdict.cleared and "stopped streaming" in verdict.reason
    assert quiet.observe(snap(alive=False), now=18.0).cleared


async def test_clearance_is_bounded_by_wait_and_never_cleared_on_an_unavailable_store(
    closed_port: int,
) -> None:
    now = [0.0]
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    async with EtcdClient([f"http://127.0.0.1:{closed_port}"], timeout=0.5) as client:
        verdict = await guard_clearance(
            client, "/wd/c", TOKEN, "f1", 1.0, lambda: now[0], wait=30.0, sleep=sleep
        )
    assert not verdict.cleared and verdict.reason.startswith("store unavailable")
    assert 29.0 <= sum(slept) <= 30.0


# --------------------------------------------------------------------------- settings, CLI


def settings(**changes: object) -> GuardSettings:
    base: dict[str, object] = {
        "node": "a",
        "endpoints": ("http://127.0.0.1:2379",),
        "prefix": "/watchdogd/c",
        "ttl": 6.0,
        "isolation_timeout": 10.0,
    }
    base.update(changes)
    return GuardSettings(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"endpoints": ("ftp://x:1",)}, "store.etcd.endpoints"),
        ({"endpoints": ()}, "store.etcd.endpoints"),
        ({"ttl": 1.0}, "store.etcd.ttl"),
        ({"isolation_timeout": 0.0}, "guard.isolation_timeout"),
        ({"poll": 3.0}, "poll"),
        ({"username": "u"}, "username and password"),
        ({"cert_file": "c.pem"}, "cert_file and key_file"),
    ],
)
def test_bad_settings_are_one_line(changes: dict[str, object], words: str) -> None:
    with pytest.raises(GuardConfigError) as info:
        settings(**changes)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_settings_hide_the_password_and_derive_their_timing() -> None:
    s = settings(username="u", password="hunter2-secret")
    assert "hunter2-secret" not in repr(s)
    assert s.renew_interval == 2.0 and s.timeout == 1.0 and s.fence_timeout == 3.0


def config_data() -> dict[str, object]:
    db = "postgresql://x@127.0.0.1:{}/x"
    return {
        "cluster": "c",
        "primary": {"name": "a", "database": {"engine": "postgres", "dsn": db.format(1)}},
        "standby": {"name": "b", "database": {"engine": "postgres", "dsn": db.format(2)}},
    }


def test_settings_from_a_config_with_store_and_guard_sections() -> None:
    cfg = parse(config_data())
    with pytest.raises(GuardConfigError, match="no store: section"):
        settings_from_config(cfg, "a")
    # The real config's sections, as `watchdogd guard --config` reads them.
    fleet = {
        **config_data(),
        "instance": "dc1",
        "store": {
            "etcd": {"endpoints": ["http://127.0.0.1:2379"], "prefix": "/watchdogd",
                     "ttl": "6s", "timeout": "500ms"},
            "voters": ["dc1", "dc2", "dc3"],
        },
        # Steps that fit in a fleet leader's authority under a 6 s lease.
        "failover": {
            "steps": [
                {"name": "stop", "action": "stop_replication", "timeout": "2s"},
                {"name": "promote", "action": "promote", "timeout": "2s"},
            ],
            "rejoin_steps": [{"name": "rejoin", "action": "rejoin", "timeout": "2s"}],
            "rejoin_timeout": "2s",
        },
    }  # fmt: skip
    with pytest.raises(GuardConfigError, match="no guard: section"):
        settings_from_config(parse(fleet), "a")
    full = parse({**fleet, "guard": {"isolation_timeout": "20s"}})
    with pytest.raises(GuardConfigError, match="'z' is not a node"):
        settings_from_config(full, "z")
    s = settings_from_config(full, "a")
    assert s.prefix == "/watchdogd/c" and s.isolation_timeout == 20.0 and s.ttl == 6.0
    assert s.database == cfg.primary.database


def test_the_guard_command_exits_2_with_one_line_without_a_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "watchdogd.yml"
    path.write_text(yaml.safe_dump(config_data()))
    assert cli.main(["guard", "--config", str(path), "--node", "a"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("watchdogd guard: the config has no store:")
    bad = tmp_path / "bad.yml"
    bad.write_text("cluster: c\n")
    assert cli.main(["guard", "--config", str(bad), "--node", "a"]) == 2


# --------------------------------------------------------------------------- "down"


def test_the_database_address_comes_from_its_dsn() -> None:
    def of(engine: str, dsn: str) -> DbAddress | None:
        return address_of(DatabaseConfig(engine, dsn))

    assert of("postgres", "postgresql://u@db1:6000/x") == DbAddress("db1", 6000)
    assert of("postgres", "postgresql://u@127.0.0.1/x") == DbAddress("127.0.0.1", 5432)
    assert of("postgres", "postgresql://u@/x?host=/run/pg") == DbAddress(
        socket_path="/run/pg/.s.PGSQL.5432"
    )
    assert of("redis", "redis://h/0") == DbAddress("h", 6379)
    assert of("mysql", "mysql://u@h/x?unix_socket=/s") == DbAddress(socket_path="/s")
    assert of("postgres", "postgresql://u@/x") is None  # cannot tell: never "down"
    assert address_of(None) is None


async def test_only_a_refused_connection_or_a_missing_socket_is_down(
    closed_port: int, tmp_path: Path
) -> None:
    why = await refused(DbAddress("127.0.0.1", closed_port), 1.0)
    assert why is not None and "refused" in why
    assert await refused(DbAddress(socket_path=str(tmp_path / "none")), 1.0) is not None
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        assert await refused(DbAddress("127.0.0.1", port), 1.0) is None
    finally:
        server.close()
    # Only this host's addresses count: a remote refusal may be a firewall's. (Checked
    # by binding, so nothing is sent to the remote address.)
    assert _local(socket.AF_INET, ("127.0.0.1", closed_port))
    assert not _local(socket.AF_INET, ("192.0.2.1", closed_port))
    # No answer in time is a hang, never "down" (even where the port would refuse).
    assert await refused(DbAddress("127.0.0.1", closed_port), 0.0) is None


def test_a_live_postmaster_is_running_a_stale_pid_file_is_not(tmp_path: Path) -> None:
    assert not postmaster_running(tmp_path)
    (tmp_path / "postmaster.pid").write_text(f"{os.getpid()}\n/data\n")
    assert postmaster_running(tmp_path)
    (tmp_path / "postmaster.pid").write_text("999999999\n")
    assert not postmaster_running(tmp_path)
    (tmp_path / "postmaster.pid").write_text("garbage\n")
    assert postmaster_running(tmp_path)  # cannot tell: not down


def test_the_fence_is_written_into_postgresql_auto_conf(tmp_path: Path) -> None:
    auto = tmp_path / "postgresql.auto.conf"
    auto.write_text(
        "# Do not edit\nprimary_conninfo = 'x'\ndefault_transaction_read_only = 'off'\n"
    )
    persist_read_only(tmp_path)
    lines = auto.read_text().splitlines()
    assert lines == [
        "# Do not edit",
        "primary_conninfo = 'x'",
        "default_transaction_read_only = 'on'",
    ]
    assert auto.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["postgresql.auto.conf"]
