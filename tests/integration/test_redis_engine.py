"""The Redis engine against a real Redis primary + replica (tests/support/redis.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.integration import engine_checks
from tests.integration.engine_checks import check_bounded_when_sigstopped
from tests.support import redis as support
from watchdogd.core.model import DatabaseConfig
from watchdogd.core.section import Section
from watchdogd.engines import DbStatus, EngineError
from watchdogd.engines import redis as engine_mod
from watchdogd.engines.redis import FENCE_MIN_REPLICAS, RedisEngine

pytestmark = pytest.mark.integration

Engines = tuple[RedisEngine, RedisEngine]


@pytest.fixture
def pair() -> Iterator[support.RedisPair]:
    with support.redis_pair() as p:
        yield p


def make_engine(dsn: str, secrets: set[str] | None = None, **options: Any) -> RedisEngine:
    return engine_mod.create(DatabaseConfig("redis", dsn, options), secrets or set())


@pytest.fixture
async def engines(pair: support.RedisPair) -> AsyncIterator[Engines]:
    primary = make_engine(pair.dsn(pair.primary))
    replica = make_engine(pair.dsn(pair.replica))
    yield primary, replica
    await primary.close()
    await replica.close()


def eventually(
    check: Callable[[], Awaitable[DbStatus]], ok: Callable[[DbStatus], bool], timeout: float = 5.0
) -> Awaitable[DbStatus]:
    return engine_checks.eventually(check, ok, timeout, interval=0.02)


# --------------------------------------------------------------------------- status


async def test_status_on_primary_and_replica(pair: support.RedisPair, engines: Engines) -> None:
    primary, replica = engines
    pair.primary.call("SET", "k", "v")
    p = await primary.status(1)
    assert p.is_primary and p.writable and p.current_pos is not None and p.current_pos > 0
    assert "1 replica(s)" in p.detail

    # >=: the primary's once-a-second PING to its replicas advances the offset too.
    r = await eventually(
        lambda: replica.status(1), lambda s: (s.replay_pos or 0) >= (p.current_pos or 1)
    )
    assert not r.is_primary and not r.writable
    assert r.streaming is True and r.lag_seconds == 0.0 and r.replay_paused is None
    assert r.receive_pos == r.replay_pos
    assert r.last_receive_age is not None and 0 <= r.last_receive_age <= 2
    assert r.link_timeout == 60.0  # the replica's own repl-timeout (Redis's default)
    assert f"replica of 127.0.0.1:{pair.primary.port}, link up" in r.detail


async def test_lag_visible_while_link_is_down(pair: support.RedisPair, engines: Engines) -> None:
    primary, replica = engines
    # The replica cannot re-authenticate, so its link stays down while the primary writes.
    pair.replica.call("CONFIG", "SET", "masterauth", "wrong")
    pair.primary.call("CLIENT", "KILL", "TYPE", "replica")
    r = await eventually(lambda: replica.status(1), lambda s: s.streaming is False)
    for i in range(50):
        pair.primary.call("SET", f"k{i}", "x" * 100)
    p = await primary.status(1)
    r = await replica.status(1)
    assert p.current_pos is not None and r.replay_pos is not None and r.receive_pos is not None
    assert p.current_pos - r.replay_pos > 5000  # byte lag, as the daemon computes it
    assert r.receive_pos == r.replay_pos
    assert r.lag_seconds is None and r.last_receive_age is not None and "link down" in r.detail

    pair.replica.call("CONFIG", "SET", "masterauth", pair.password)
    r = await eventually(
        lambda: replica.status(1), lambda s: (s.replay_pos or 0) >= (p.current_pos or 1)
    )
    assert r.streaming is True and r.lag_seconds == 0.0


async def test_streaming_false_after_primary_killed(
    pair: support.RedisPair, engines: Engines
) -> None:
    primary, replica = engines
    assert (await replica.status(1)).streaming is True
    pair.primary.kill()
    r = await eventually(lambda: replica.status(1), lambda s: s.streaming is False)
    assert not r.is_primary and "link down" in r.detail
    with pytest.raises(EngineError, match=r"^redis 127\.0\.0\.1:\d+: status: .*111"):
        await primary.status(1)


# --------------------------------------------------------------------------- failover


async def test_stop_replication_then_promote_accepts_writes(
    pair: support.RedisPair, engines: Engines
) -> None:
    _, replica = engines
    pair.primary.call("SET", "before", "1")
    pair.wait_caught_up()
    pair.primary.kill()
    with pytest.raises(redis.ReadOnlyError):
        pair.replica.call("SET", "too-early", "1")

    done = await replica.stop_replication(2)
    assert done.startswith(f"stopped replicating from 127.0.0.1:{pair.primary.port} at offset")
    assert await replica.stop_replication(2) == "not a replica: nothing to stop"
    done = await replica.promote(2)
    assert done == "already a writable primary: write verified, nothing changed"

    pair.replica.call("SET", "after", "2")
    assert pair.replica.call("MGET", "before", "after") == ["1", "2"]
    assert pair.replica.call("EXISTS", "watchdogd:promoted") == 1
    s = await replica.status(1)
    assert s.is_primary and s.writable


async def test_promote_twice_is_a_no_op(pair: support.RedisPair, engines: Engines) -> None:
    _, replica = engines
    first = await replica.promote(2)
    assert first == (
        f"promoted: stopped replicating from 127.0.0.1:{pair.primary.port} (REPLICAOF NO ONE);"
        " write verified"
    )
    offset = pair.replica.info()["master_repl_offset"]
    second = await replica.promote(2)
    assert second == "already a writable primary: write verified, nothing changed"
    info = pair.replica.info()
    assert info["role"] == "master"
    assert info["master_repl_offset"] > offset  # only the verification write


async def test_fence_refuses_writes(pair: support.RedisPair, engines: Engines) -> None:
    primary, _ = engines
    await primary.status(1)  # fence kills this probing connection too: status reconnects
    other = pair.primary.client()
    other_id = other.client_id()
    assert pair.primary.call("CLIENT", "LIST", "ID", other_id) != ""
    done = await primary.fence(2)
    assert done.startswith(f"fenced: writes refused (min-replicas-to-write={FENCE_MIN_REPLICAS}")
    assert "not persisted" in done  # the test server has no config file
    assert pair.primary.call("CLIENT", "LIST", "ID", other_id) == ""  # its session was killed
    other.close()
    with pytest.raises(redis.ResponseError, match="NOREPLICAS"):
        pair.primary.call("SET", "k", "v")

    s = await primary.status(1)
    assert s.is_primary and not s.writable and "fenced by watchdogd" in s.detail
    again = await primary.fence(2)
    assert again.startswith("already fenced: writes refused")

    # Failing back onto the old primary: promote lifts exactly this fence.
    done = await primary.promote(2)
    assert done.startswith("promoted: cleared the watchdogd fence")
    pair.primary.call("SET", "k", "v")
    assert (await primary.status(1)).writable


async def test_promote_fails_clearly_when_writes_are_refused(
    pair: support.RedisPair, engines: Engines
) -> None:
    _, replica = engines
    # An operator's own min-replicas-to-write is left alone: promotion reports it.
    pair.replica.call("CONFIG", "SET", "min-replicas-to-write", "1")
    with pytest.raises(
        EngineError,
        match=r"promote: a write to watchdogd:promoted was refused: "
        r"NOREPLICAS",
    ) as err:
        await replica.promote(2)
    assert "\n" not in str(err.value)
    s = await replica.status(1)
    assert s.is_primary and not s.writable and "min-replicas-to-write=1" in s.detail


# --------------------------------------------------------------------------- errors


async def test_bad_password_and_dead_port_are_one_clear_line(
    pair: support.RedisPair, closed_port: int
) -> None:
    wrong = "Wr0ng-" + pair.password
    engine = make_engine(pair.dsn(pair.primary, wrong), {wrong})
    with pytest.raises(EngineError) as err:
        await engine.status(1)
    text = str(err.value)
    assert text.startswith(f"redis 127.0.0.1:{pair.primary.port}: status: ")
    assert "invalid username-password pair" in text
    assert "\n" not in text and wrong not in text and pair.password not in text
    await engine.close()

    nopw = make_engine(f"redis://127.0.0.1:{pair.primary.port}/0")
    with pytest.raises(EngineError, match=r"promote: Authentication required\. \(no password"):
        await nopw.promote(1)
    await nopw.close()

    # The password from database.password (not the DSN) is used, and never shown.
    good = make_engine(f"redis://127.0.0.1:{pair.primary.port}/0", password=pair.password)
    assert (await good.status(1)).is_primary
    await good.close()

    dead = make_engine(f"redis://:{wrong}@127.0.0.1:{closed_port}/0", {wrong})
    t0 = time.monotonic()
    with pytest.raises(EngineError) as err:
        await dead.fence(2)
    assert time.monotonic() - t0 < 2
    text = str(err.value)
    assert "fence: Error 111 connecting to 127.0.0.1" in text
    assert "\n" not in text and wrong not in text
    await dead.close()


async def test_bounded_when_server_is_sigstopped(pair: support.RedisPair, engines: Engines) -> None:
    primary, _ = engines
    await check_bounded_when_sigstopped(
        pair.primary.pid,
        primary,
        make_engine(pair.dsn(pair.primary)),
        "promote",
        limit=0.3,
        within=0.8,
        timeout=1,
    )


# --------------------------------------------------------------------------- config


def validate(data: dict[str, Any]) -> tuple[list[str], set[str], Any]:
    errors: list[str] = []
    secrets: set[str] = set()
    section = Section(data, "standby.database", errors, secrets)
    section.str("engine")
    section.str("dsn")
    options = engine_mod.validate(section)
    section.finish()
    return errors, secrets, options


@pytest.mark.parametrize(
    ("dsn", "message"),
    [
        ("rediss://:s3cret-pw@h:6379/0", "expected a URL like redis://"),
        ("redis://:s3cret-pw@:6379/0", "expected a host"),
        ("redis://:s3cret-pw@h:port/0", "not a valid Redis URL"),
        ("redis://:s3cret-pw@h:6379/zero", "expected a database number"),
        ("redis://:s3cret-pw@h:6379/0?timeout=1", "query parameters are not supported"),
    ],
)
def test_bad_dsn_is_one_config_error_without_the_password(dsn: str, message: str) -> None:
    errors, _, _ = validate({"engine": "redis", "dsn": dsn})
    assert len(errors) == 1, errors
    assert errors[0].startswith("standby.database.dsn: ") and message in errors[0]
    assert "s3cret-pw" not in errors[0]


def test_dsn_forms() -> None:
    d = engine_mod.parse_dsn("redis://h")
    assert (d.host, d.port, d.db, d.username, d.password) == ("h", 6379, 0, None, None)
    d = engine_mod.parse_dsn("redis://app:p%40ss@[::1]:7000/3")
    assert (d.host, d.port, d.db, d.username, d.password) == ("::1", 7000, 3, "app", "p@ss")
    assert d.where == "[::1]:7000" and "p@ss" not in repr(d)


def test_password_keys(tmp_path: Path) -> None:
    errors, secrets, options = validate({"engine": "redis", "dsn": "redis://:inline-pw@h/0"})
    assert errors == [] and options == {} and secrets == {"inline-pw"}

    pw_file = tmp_path / "pw"
    pw_file.write_text("file-pw\n")
    errors, secrets, options = validate(
        {"engine": "redis", "dsn": "redis://h/0", "password_file": str(pw_file)}
    )
    assert errors == [] and options == {"password": "file-pw"} and "file-pw" in secrets
    assert "file-pw" not in repr(options)

    errors, _, _ = validate({"engine": "redis", "dsn": "redis://:a-pw@h/0", "password": "b-pw"})
    assert errors == [
        "standby.database.password: give the password either in dsn or in "
        "password/password_file, not both"
    ]


async def test_advise_names_the_settings_that_confirm_a_hang_in_time(
    pair: support.RedisPair, engines: Engines
) -> None:
    """Stock repl-timeout (60 s) is later than a 5 s threshold: the advice says so and
    gives commands that, run as written, fix it without breaking the healthy link."""
    primary, replica = engines
    assert await primary.advise(5.0, 2.0) == []
    (advice,) = await replica.advise(5.0, 2.0)
    assert "repl-timeout is 60s on this replica" in advice
    assert "CONFIG SET repl-timeout 5 on the replica" in advice
    assert "CONFIG SET repl-ping-replica-period 1 on the primary" in advice
    pair.replica.call("CONFIG", "SET", "repl-timeout", "5")
    pair.primary.call("CONFIG", "SET", "repl-ping-replica-period", "1")
    assert await replica.advise(5.0, 2.0) == []
    r = await replica.status(2)
    assert r.link_timeout == 5.0 and r.streaming is True
    # Past one timeout on an idle primary the healthy link is still held.
    await asyncio.sleep(6)
    r = await replica.status(2)
    assert r.streaming is True and r.last_receive_age is not None
    assert r.link_timeout is not None and r.last_receive_age <= r.link_timeout
