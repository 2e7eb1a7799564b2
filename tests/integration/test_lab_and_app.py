"""The local PostgreSQL lab (watchdogd.demo.lab) and the app stand-in (watchdogd.demo.app)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from tests.support.apps import DemoApps
from tests.support.pg import eventually, pg_template, require_pg_bin
from watchdogd.demo.app import DemoApp
from watchdogd.demo.lab import (
    LabError,
    PgPair,
    child_pids,
    find_pg_bin,
    pid_alive,
    pid_file_segment,
    shm_attached,
)

pytestmark = pytest.mark.integration


def refuses(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for {pid}")


# --------------------------------------------------------------------------- lab


def test_find_pg_bin() -> None:
    found = find_pg_bin()
    require_pg_bin()
    assert found is not None
    version = subprocess.run(
        [str(found / "postgres"), "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert "PostgreSQL" in version and int(version.split()[-1].split(".")[0]) >= 13


def test_pair_streams_and_replicates(pg_pair: PgPair) -> None:
    p, s = pg_pair.primary, pg_pair.standby
    assert p.dsn == f"postgresql://postgres@127.0.0.1:{p.port}/postgres"
    assert not p.is_in_recovery() and s.is_in_recovery()
    assert pg_pair.standby_streaming()
    assert s.execute("SHOW wal_receiver_timeout") == "2s"
    for server in (p, s):
        assert server.pid is not None and server.data_dir.is_relative_to(pg_pair.base)
        if os.geteuid() == 0:
            assert uid_of(server.pid) != 0  # PostgreSQL runs as the service user

    p.execute("CREATE TABLE t AS SELECT 42 AS x")
    pg_pair.wait_replayed()
    assert s.execute("SELECT x FROM t") == "42"


async def test_kill_and_restart(pg_pair: PgPair) -> None:
    p = pg_pair.primary
    pid = p.pid
    assert pid is not None
    children = child_pids(pid)
    assert children  # checkpointer, walsender, ...
    p.kill()
    assert not p.is_running() and p.pid is None
    assert not pid_alive(pid) and not any(pid_alive(c) for c in children)
    assert refuses(p.port)
    await eventually(lambda: not pg_pair.standby_streaming(), within=3.0)

    p.start()
    assert p.execute("SELECT 1") == "1"
    # The standby's WAL receiver reconnects by itself.
    await eventually(pg_pair.standby_streaming, within=5.0)


def test_sigstop_hangs_and_sigcont_resumes(pg_pair: PgPair) -> None:
    p = pg_pair.primary
    p.sigstop()
    try:
        started = time.monotonic()
        with pytest.raises(LabError, match=r"^primary: psql: no answer within 0\.5s$"):
            p.execute("SELECT 1", timeout=0.5)
        assert time.monotonic() - started < 1.5
        assert p.is_running()  # hung, not dead
    finally:
        p.sigcont()
    assert p.execute("SELECT 1") == "1"
    p.sigstop()
    p.stop()  # a hung server can still be stopped (it is resumed first)
    assert not p.is_running() and refuses(p.port)


def test_port_taken_at_restart_is_one_clear_line(pg_pair: PgPair) -> None:
    p = pg_pair.primary
    p.stop()
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", p.port))
        squatter.listen()
        with pytest.raises(LabError) as caught:
            p.start()  # clients know this port: it must not move
        assert str(caught.value) == (
            f"primary: postgres did not start on port {p.port}: could not bind IPv4 address "
            f'"127.0.0.1": Address already in use (could not create any TCP/IP sockets)'
        )
        assert not p.is_running()
        old_port = p.port
        p.start(may_move=True)  # a new server may go elsewhere
        assert p.port != old_port and p.execute("SELECT 1") == "1"


def test_pause_resume_detach_reattach(pg_pair: PgPair) -> None:
    p, s = pg_pair.primary, pg_pair.standby
    p.execute("CREATE TABLE t (x int)")
    pg_pair.wait_replayed()

    pg_pair.pause_replay()
    p.execute("INSERT INTO t VALUES (1)")
    with pytest.raises(LabError, match="did not replay"):
        pg_pair.wait_replayed(timeout=0.5)
    assert s.execute("SELECT count(*) FROM t") == "0"
    pg_pair.resume_replay()
    pg_pair.wait_replayed()
    assert s.execute("SELECT count(*) FROM t") == "1"

    pg_pair.detach_standby()
    assert not pg_pair.standby_streaming() and s.is_in_recovery()
    p.execute("INSERT INTO t VALUES (2)")
    with pytest.raises(LabError, match="did not replay"):
        pg_pair.wait_replayed(timeout=0.5)
    pg_pair.reattach_standby()
    pg_pair.wait_replayed()
    assert s.execute("SELECT count(*) FROM t") == "2"


def test_destroy_kills_everything_and_is_safe_twice(pg_pair: PgPair) -> None:
    pids = []
    for server in (pg_pair.primary, pg_pair.standby):
        assert server.pid is not None
        pids += [server.pid, *child_pids(server.pid)]
    pg_pair.standby.sigstop()  # even a hung server goes
    pg_pair.destroy()
    pg_pair.destroy()
    assert not pg_pair.base.exists()
    assert not any(pid_alive(pid) for pid in pids)
    assert refuses(pg_pair.primary.port) and refuses(pg_pair.standby.port)


def test_a_crashed_server_leaks_no_shared_memory(pg_pair: PgPair) -> None:
    """A SIGKILLed postmaster leaves its System V segment; a lab that then removes
    the data dir leaked one per crash until shmget() failed machine-wide."""
    segments = {}
    for server in (pg_pair.primary, pg_pair.standby):
        segment = pid_file_segment(server.data_dir)
        assert segment is not None and shm_attached(*segment), server.name
        segments[server.name] = segment
    pg_pair.primary.kill()  # a crash mid-test: gone at once, and a restart still works
    assert shm_attached(*segments["primary"]) is None
    pg_pair.primary.start()
    assert pg_pair.primary.execute("SELECT 1") == "1"
    restarted = pid_file_segment(pg_pair.primary.data_dir)
    assert restarted is not None and shm_attached(*restarted)
    pg_pair.destroy()
    assert shm_attached(*restarted) is None
    assert shm_attached(*segments["standby"]) is None


def test_bad_settings_fail_with_one_line_and_leave_nothing_behind(
    request: pytest.FixtureRequest,
) -> None:
    bin_dir = require_pg_bin()
    with tempfile.TemporaryDirectory(dir="/tmp") as parent:
        os.chmod(parent, 0o755)
        base = Path(parent) / "lab"
        with pytest.raises(LabError) as caught:
            PgPair.create(
                base,
                bin_dir=bin_dir,
                template=pg_template(request.config),
                settings={"shared_buffers": "'lots'"},
            )
        text = str(caught.value)
        assert "\n" not in text
        assert text.startswith("primary: postgres did not start on port ")
        assert 'invalid value for parameter "shared_buffers": "lots"' in text
        assert not base.exists()


def test_unusable_base_dir_is_one_clear_line(tmp_path: Path) -> None:
    bin_dir = require_pg_bin()
    (tmp_path / "full" / "x").mkdir(parents=True)
    with pytest.raises(LabError, match=r"lab directory exists and is not empty$"):
        PgPair.create(tmp_path / "full", bin_dir=bin_dir)
    if os.geteuid() != 0:
        return  # only root hands the servers to another user
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    with pytest.raises(LabError) as caught:
        PgPair.create(private / "lab", bin_dir=bin_dir)
    assert str(caught.value) == (
        f"{private}: not traversable by the postgres user (mode drwx------); put the lab under /tmp"
    )
    assert not (private / "lab").exists()


# --------------------------------------------------------------------------- demo app


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


async def test_health_follows_the_database(
    pg_pair: PgPair, demo_apps: DemoApps, http: aiohttp.ClientSession
) -> None:
    for app in (demo_apps.primary, demo_apps.standby):
        async with http.get(f"{app.url}/health") as r:
            assert r.status == 200
            body = await r.json()
            assert body["ok"] is True and body["app"] == app.name
    pg_pair.primary.kill()
    started = time.monotonic()
    async with http.get(f"{demo_apps.primary.url}/health") as r:
        assert r.status == 503
        body = await r.json()
        assert body["ok"] is False and body["db"]
    assert time.monotonic() - started < 1.0
    pg_pair.primary.start()
    async with http.get(f"{demo_apps.primary.url}/health") as r:
        assert r.status == 200  # reconnects by itself
    assert [c.path for c in demo_apps.primary.calls_to("GET", "/health")] == ["/health"] * 3


async def test_health_of_a_hung_database_is_bounded(
    pg_pair: PgPair, demo_apps: DemoApps, http: aiohttp.ClientSession
) -> None:
    pg_pair.primary.sigstop()
    try:
        started = time.monotonic()
        async with http.get(f"{demo_apps.primary.url}/health") as r:
            assert r.status == 503
            assert (await r.json())["db"] == "database did not answer within 0.5s"
        assert time.monotonic() - started < 1.0
    finally:
        pg_pair.primary.sigcont()


async def test_maintenance_switch(demo_apps: DemoApps, http: aiohttp.ClientSession) -> None:
    url = f"{demo_apps.primary.url}/maintenance"

    async def state() -> bool:
        async with http.get(url) as r:
            assert r.status == 200
            return bool((await r.json())["maintenance"])

    assert await state() is False
    async with http.post(url) as r:
        assert r.status == 200 and (await r.json())["maintenance"] is True
    assert await state() is True and demo_apps.primary.maintenance
    async with http.delete(url) as r:
        assert r.status == 200
    assert await state() is False
    async with http.post(url, json={"enabled": True}) as r:
        assert r.status == 200
    async with http.post(url, json={"enabled": False}) as r:
        assert r.status == 200
    assert await state() is False
    async with http.post(url, data="on please") as r:
        assert r.status == 400 and (await r.json())["error"] == "body is not JSON"
    async with http.post(url, json={"enabled": "yes"}) as r:
        assert r.status == 400
    assert await state() is False
    assert [(c.method, c.path) for c in demo_apps.primary.calls][:2] == [
        ("GET", "/maintenance"),
        ("POST", "/maintenance"),
    ]
    assert demo_apps.standby.maintenance  # started in maintenance, untouched


async def test_orders_are_written_only_where_the_database_is_writable(
    pg_pair: PgPair, demo_apps: DemoApps, http: aiohttp.ClientSession
) -> None:
    primary, standby = demo_apps.primary, demo_apps.standby
    for expected_id in (1, 2):
        async with http.post(f"{primary.url}/orders") as r:
            assert r.status == 201 and (await r.json())["id"] == expected_id
    async with http.get(f"{primary.url}/orders/count") as r:
        assert (await r.json())["count"] == 2

    async with http.post(f"{standby.url}/orders") as r:
        assert r.status == 503 and (await r.json())["error"] == "in maintenance"
    async with http.delete(f"{standby.url}/maintenance"):
        pass
    async with http.post(f"{standby.url}/orders") as r:
        assert r.status == 503 and (await r.json())["error"] == "database is read-only"
    pg_pair.wait_replayed()
    async with http.get(f"{standby.url}/orders/count") as r:
        assert (await r.json())["count"] == 2

    async with http.post(f"{primary.url}/maintenance"):
        pass
    async with http.post(f"{primary.url}/orders") as r:
        assert r.status == 503
    assert pg_pair.primary.execute("SELECT count(*) FROM orders") == "2"
    assert len(primary.calls_to("POST", "/orders")) == 3


async def test_order_count_before_any_order(pg_pair: PgPair, http: aiohttp.ClientSession) -> None:
    app = DemoApp("solo", pg_pair.primary.dsn)
    await app.start()
    try:
        assert app.port != 0
        async with http.get(f"{app.url}/orders/count") as r:
            assert r.status == 200 and (await r.json())["count"] == 0
    finally:
        await app.stop()
    assert refuses(app.port)


async def test_hang_mode_stalls_requests_and_stop_is_still_quick(
    demo_apps: DemoApps, http: aiohttp.ClientSession
) -> None:
    app = demo_apps.primary
    app.hang = True
    with pytest.raises(asyncio.TimeoutError):
        await http.get(f"{app.url}/health", timeout=aiohttp.ClientTimeout(total=0.3))
    assert app.calls_to("GET", "/health")  # it arrived, it just never got an answer

    pending = asyncio.ensure_future(http.get(f"{app.url}/health"))
    await eventually(lambda: len(app.calls_to("GET", "/health")) == 2, within=2.0)
    app.hang = False
    async with await pending as r:
        assert r.status == 200

    app.hang = True
    stalled = asyncio.ensure_future(http.get(f"{app.url}/health"))
    await eventually(lambda: len(app.calls_to("GET", "/health")) == 3, within=2.0)
    started = time.monotonic()
    await app.stop()
    assert time.monotonic() - started < 2.0
    # Released on stop: answered, or cut off by the shutdown; either way, not stuck.
    with contextlib.suppress(aiohttp.ClientError):
        async with asyncio.timeout(1.0), await stalled as r:
            await r.read()
