"""Issue 3's proof: the control socket against the daemon as a real process over a
real PostgreSQL primary + streaming standby.

Every test starts ``watchdogd run`` as a subprocess (tests.support.daemon), speaks
the JSON-lines protocol over its real Unix socket (or runs the real client), and
checks the outcome where it lands: the daemon's status, its journal and log, and
the databases themselves.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from tests.support import need, which
from tests.support.daemon import DaemonProcess, lab_config
from tests.support.pg import eventually, leave_standby_behind
from watchdogd.control import COMMANDS, CommandError, lookup, parse_request, validate_args
from watchdogd.demo.lab import PgPair

Factory = Callable[..., DaemonProcess]
REPO = Path(__file__).resolve().parents[2]
ABORTED_BY_OPERATOR = "aborted by operator"


# --------------------------------------------------------------------------- helpers


async def ok(d: DaemonProcess, command: str, **args: Any) -> dict[str, Any]:
    reply = await d.call(command, **args)
    assert reply["ok"] is True, f"{command} {args}: {reply}"
    result: dict[str, Any] = reply["result"]
    return result


async def refused(d: DaemonProcess, command: str, **args: Any) -> str:
    reply = await d.call(command, **args)
    assert reply["ok"] is False, f"{command} {args} was not refused: {reply}"
    assert set(reply) == {"ok", "error"}
    error: str = reply["error"]
    assert error and "\n" not in error
    return error


def records(d: DaemonProcess, kind: str) -> list[dict[str, Any]]:
    return [r for r in d.journal() if r.get("type") == kind]


def events(d: DaemonProcess, name: str) -> list[dict[str, Any]]:
    return [e for e in d.events() if e.get("event") == name]


def metric(text: str, name: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"metric {name} not exposed")


async def connect(dsn: str) -> asyncpg.Connection:
    conn: asyncpg.Connection = await asyncpg.connect(dsn, timeout=5)
    return conn


async def assert_writable_primary(dsn: str, note: str) -> None:
    """The server is out of recovery and commits a write."""
    conn = await connect(dsn)
    try:
        assert await conn.fetchval("SELECT pg_is_in_recovery()") is False
        await conn.execute("CREATE TABLE IF NOT EXISTS proof (note text)")
        await conn.execute("INSERT INTO proof VALUES ($1)", note)
        assert note in [r["note"] for r in await conn.fetch("SELECT note FROM proof")]
    finally:
        await conn.close()


async def wait_for_down(d: DaemonProcess, within: float = 10.0) -> None:
    await eventually(lambda: bool(events(d, "primary_down")), within=within)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A socket directory an unprivileged user can traverse (pytest's tmp is 0700)."""
    d = Path(tempfile.mkdtemp(prefix="wde2e-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------- failover


async def test_manual_failover_promotes_the_standby(
    pg_pair: PgPair, daemon_factory: Factory, tmp_path: Path
) -> None:
    cfg = lab_config(pg_pair, tmp_path, threshold="1s", mode="manual")
    d = daemon_factory(cfg)
    await d.start()
    await d.wait_state("watching")
    # With a healthy primary a failover is the wrong tool, and there is nothing to abort.
    error = await refused(d, "failover")
    assert error.startswith("failover refused: the primary is healthy: use switchover")
    assert "--force" in error
    assert (await refused(d, "abort")).startswith("nothing to abort")
    assert d.journal() == []

    pg_pair.primary.kill()
    await wait_for_down(d)
    status = await d.wait_state("suspect")
    assert "mode is manual" in status["reason"] and not status["armed"]
    result = await ok(d, "failover", reason="primary host lost")
    assert result["plan"]["trigger"] == "manual" and result["plan"]["forced"] is False
    assert [s["name"] for s in result["plan"]["steps"]] == ["stop_replication", "promote_standby"]
    status = await d.wait_state("failed_over", within=15)
    assert status["roles"] == {"primary": "failover", "standby": "main"}
    last = status["last_failover"]
    assert last["id"] == result["started"] and last["trigger"] == "manual"
    assert last["outcome"] == "completed" and last["reason"] == "primary host lost"
    await assert_writable_primary(pg_pair.standby.dsn, "after-manual-failover")
    assert d.promotions() == 1
    # Every transition was logged and no probe cycle crashed on the way.
    changes = [e["state"] for e in events(d, "state_changed")]
    assert changes[-1] == "failed_over" and "suspect" in changes, changes
    assert not events(d, "cycle_error"), events(d, "cycle_error")[0]["error"]


async def test_lag_refuses_failover_until_forced(
    pg_pair: PgPair, daemon_factory: Factory, tmp_path: Path
) -> None:
    cfg = lab_config(pg_pair, tmp_path, threshold="1s", max_lag="1MB")
    d = daemon_factory(cfg)
    await d.start()
    await d.wait_state("watching")
    leave_standby_behind(pg_pair)
    await asyncio.sleep(1.2)  # let a cycle see the primary's new position
    pg_pair.primary.kill()
    await d.wait_state("blocked", within=10)

    error = await refused(d, "failover")
    assert error.startswith("failover refused: lag guard: standby is")
    # 1MB is 10**6 bytes, shown in binary units
    assert "more than max_lag 1.0 MB" in error and error.endswith("(use --force to override)")
    assert records(d, "failover_started") == []
    assert pg_pair.standby.is_in_recovery()

    result = await ok(d, "failover", force=True)
    assert result["plan"]["forced"] is True
    status = await d.wait_state("failed_over", within=15)
    assert status["last_failover"]["outcome"] == "completed"
    assert "(forced)" in status["last_failover"]["reason"]
    await assert_writable_primary(pg_pair.standby.dsn, "forced")
    (started,) = records(d, "failover_started")
    assert started["forced"] is True and started["trigger"] == "manual"


async def test_dry_run_renders_the_plan_masks_secrets_and_changes_nothing(
    pg_pair: PgPair, daemon_factory: Factory, tmp_path: Path, closed_port: int
) -> None:
    secret = "tok-9f3b2c71e0"
    port = closed_port  # nobody listens: a dry run must not call it
    cfg = lab_config(pg_pair, tmp_path, threshold="1s")
    cfg["failover"]["steps"] = [
        {
            "name": "primary_maintenance_on",
            "action": "http",
            "method": "POST",
            "url": f"http://127.0.0.1:{port}/maintenance?token=${{WD_TOKEN}}",
            "headers": {"Authorization": "Bearer ${WD_TOKEN}"},
            "json": {"enabled": True, "cluster": "{cluster}"},
            "required": False,
            "timeout": "1s",
        },
        {"name": "stop_replication", "action": "stop_replication"},
        {"name": "promote_standby", "action": "promote"},
        {
            "name": "switch_traffic",
            "action": "command",
            "argv": ["/bin/echo", "route-to", "{standby.name}", "{failover_id}"],
            "timeout": "5s",
        },
    ]
    d = daemon_factory(cfg, env={"WD_TOKEN": secret})
    await d.start()
    await d.wait_state("watching")

    # Without --force a healthy primary refuses even a dry run (it shows what would happen).
    assert "use switchover" in await refused(d, "failover", dry_run=True)
    reply = await d.call("failover", dry_run=True, force=True)
    assert reply["ok"] is True, reply
    result = reply["result"]
    assert result["dry_run"] is True and "started" not in result
    plan = result["plan"]
    assert (plan["from"], plan["to"], plan["trigger"], plan["forced"]) == (
        "main",
        "failover",
        "manual",
        True,
    )
    steps = {s["name"]: s for s in plan["steps"]}
    assert list(steps) == [
        "primary_maintenance_on",
        "stop_replication",
        "promote_standby",
        "switch_traffic",
    ]
    http = steps["primary_maintenance_on"]
    assert http["method"] == "POST"
    assert http["url"] == f"http://127.0.0.1:{port}/maintenance?token=***"
    assert http["headers"] == {"Authorization": "Bearer ***"}
    assert http["json"] == {"enabled": True, "cluster": "orders"}
    assert http["required"] is False and http["timeout"] == 1.0
    assert steps["stop_replication"]["node"] == "failover"
    assert steps["promote_standby"] == {
        "name": "promote_standby",
        "action": "promote",
        "timeout": steps["promote_standby"]["timeout"],
        "retries": 0,
        "required": True,
        "node": "failover",
        "engine": "postgres",
    }
    assert steps["switch_traffic"]["argv"] == [
        "/bin/echo",
        "route-to",
        "failover",
        plan["failover_id"],
    ]
    assert secret not in json.dumps(reply)

    # Nothing changed.
    await asyncio.sleep(1.0)  # a cycle or two: no delayed effect either
    assert d.journal() == []
    assert pg_pair.standby.is_in_recovery()
    status = await d.status()
    assert status["state"] == "watching" and status["last_failover"] is None
    assert status["armed"] is True
    assert secret not in d.logs()

    # Client-supplied text is masked too: a reason quoting the secret.
    reply = await d.call("failover", dry_run=True, force=True, reason=f"ticket {secret}")
    assert reply["ok"] is True, reply
    assert secret not in d.logs()
    assert secret not in json.dumps(reply), "the dry-run plan echoes a secret in its reason"


async def test_status_right_after_a_failover_shows_each_node_its_own_health(
    pg_pair: PgPair, daemon_factory: Factory, tmp_path: Path
) -> None:
    # A long interval leaves a wide window between the failover's end and the next
    # probe cycle: status must not pin the old observations on the new roles.
    cfg = lab_config(pg_pair, tmp_path, interval="1s", timeout="500ms", threshold="2s")
    d = daemon_factory(cfg)
    await d.start()
    await d.wait_state("watching")
    pg_pair.primary.kill()
    status = await d.wait_state("failed_over", within=15)
    new_primary, old_primary = status["nodes"]
    assert (new_primary["name"], new_primary["role"]) == ("failover", "primary")
    assert (old_primary["name"], old_primary["role"]) == ("main", "standby")
    # "failover" is up (just promoted), "main" is dead: whatever was last seen of
    # each must be shown under its own name.
    port = f":{pg_pair.primary.port}"
    assert new_primary["database"] is None or new_primary["database"]["ok"], new_primary
    assert port not in json.dumps(new_primary), new_primary
    assert old_primary["database"] is None or not old_primary["database"]["ok"], old_primary
    # Either was allowed in the window before the next cycle; once a cycle has run
    # under the new roles, each node must show its own observation, not "nothing".
    deadline = time.monotonic() + 5
    while True:
        new_primary, old_primary = (await d.status())["nodes"]
        if new_primary["database"] is not None and old_primary["database"] is not None:
            break
        assert time.monotonic() < deadline, (new_primary, old_primary)
        await asyncio.sleep(0.1)
    assert new_primary["database"]["ok"] and port not in json.dumps(new_primary), new_primary
    assert not old_primary["database"]["ok"], old_primary


# --------------------------------------------------------------------------- switchover


class Writer:
    """Commits one row at a time on the primary until stopped; remembers what committed."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.committed: list[int] = []
        self.failures: list[str] = []
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        conn: asyncpg.Connection | None = None
        n = 0
        while not self._stop.is_set():
            n += 1
            try:
                if conn is None:
                    conn = await asyncpg.connect(self.dsn, timeout=2)
                await conn.execute("INSERT INTO w (id) VALUES ($1)", n, timeout=2)
            except Exception as exc:  # fenced, terminated, refused: all just "not committed"
                self.failures.append(type(exc).__name__)
                if conn is not None:
                    conn.terminate()
                    conn = None
                await asyncio.sleep(0.05)
                continue
            self.committed.append(n)
            await asyncio.sleep(0.015)  # about three commits per 50 ms
        if conn is not None:
            await conn.close()


async def test_switchover_loses_no_committed_row(
    pg_pair: PgPair, daemon_factory: Factory, tmp_path: Path
) -> None:
    pg_pair.primary.execute("CREATE TABLE w (id int PRIMARY KEY)")
    cfg = lab_config(pg_pair, tmp_path, threshold="2s")
    d = daemon_factory(cfg)
    await d.start()
    await d.wait_state("watching")
    writer = Writer(pg_pair.primary.dsn)
    task = asyncio.create_task(writer.run())
    try:
        await eventually(lambda: len(writer.committed) >= 10, within=5)
        result = await ok(d, "switchover")
        assert [s["name"] for s in result["plan"]["steps"]] == [
            "fence_old_primary",
            "wait_for_catch_up",
            "stop_replication",
            "promote_standby",
        ]
        status = await d.wait_state("failed_over", within=15)
    finally:
        writer.stop()
        await asyncio.wait_for(task, 10)
    assert status["roles"] == {"primary": "failover", "standby": "main"}
    assert status["last_failover"]["trigger"] == "switchover"
    # The writer was still writing when the fence cut it off.
    assert writer.failures, "the writer never met the fence"
    assert len(writer.committed) >= 10

    new = await connect(pg_pair.standby.dsn)
    try:
        assert await new.fetchval("SELECT pg_is_in_recovery()") is False
        on_new = {r["id"] for r in await new.fetch("SELECT id FROM w")}
    finally:
        await new.close()
    lost = sorted(set(writer.committed) - on_new)
    assert not lost, f"{len(lost)} committed rows missing on the new primary: {lost[:10]}"

    old = await connect(pg_pair.primary.dsn)
    try:
        assert await old.fetchval("SHOW default_transaction_read_only") == "on"
        with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
            await old.execute("INSERT INTO w (id) VALUES (-1)")
    finally:
        await old.close()


# --------------------------------------------------------------------------- abort


async def test_abort_inside_the_outage_window_and_ack_rearms(
    pg_pair: PgPair, daemon_factory: Factory, tmp_path: Path
) -> None:
    cfg = lab_config(pg_pair, tmp_path, threshold="5s")
    d = daemon_factory(cfg)
    await d.start()
    await d.wait_state("watching")
    killed = time.monotonic()
    pg_pair.primary.kill()

    async def outage_pending() -> bool:
        status = await d.status()
        return bool(status["state"] == "suspect" and status["outage_seconds"] > 0)

    await eventually(outage_pending, within=3)
    result = await ok(d, "abort")
    assert time.monotonic() - killed < 3.0  # well inside the 5 s window
    assert "aborted" in result
    status = await d.status()
    assert status["state"] == "failed"
    assert ABORTED_BY_OPERATOR in status["reason"]
    assert ABORTED_BY_OPERATOR in status["last_failover"]["error"]
    assert status["last_failover"]["outcome"] == "aborted"
    assert status["armed"] is False and status["awaiting_ack"] is True

    # Past the threshold: still nothing promoted, nothing run.
    await asyncio.sleep(max(0.0, killed + 6.0 - time.monotonic()))
    status = await d.status()
    assert status["state"] == "failed"
    assert pg_pair.standby.is_in_recovery()
    assert records(d, "step_started") == []
    assert d.promotions() == 0

    acked = await ok(d, "ack")
    assert acked["acked"] == result["aborted"]
    assert acked["roles"] == {"primary": "main", "standby": "failover"} and acked["armed"]
    # Re-armed: the primary is still dead, so the outage is tracked afresh.
    status = await d.wait_state("suspect", within=3)
    assert status["armed"] is True and status["awaiting_ack"] is False
    assert status["roles"] == {"primary": "main", "standby": "failover"}
    # ... and a failover may happen again: the standby caught up before the kill, so
    # the lag guard must still let it through (a dry run asks the same guard).
    reply = await d.call("failover", dry_run=True)
    assert reply["ok"] is True, f"after ack the standby can no longer be promoted: {reply}"


async def test_abort_during_a_running_step_stops_before_promote(
    pg_pair: PgPair, daemon_factory: Factory, tmp_path: Path
) -> None:
    cfg = lab_config(pg_pair, tmp_path, threshold="1s")
    cfg["failover"]["steps"] = [
        {"name": "slow_hook", "action": "command", "argv": ["sleep", "2"], "timeout": "5s"},
        {"name": "promote_standby", "action": "promote"},
    ]
    d = daemon_factory(cfg)
    await d.start()
    await d.wait_state("watching")
    pg_pair.primary.kill()

    async def in_slow_step() -> bool:
        running = (await d.status())["failover_in_progress"]
        return bool(running and running["step"] == "slow_hook")

    await eventually(in_slow_step, within=8)
    asked = time.monotonic()
    result = await ok(d, "abort")
    assert time.monotonic() - asked < 1.0  # answered at once, not after the step
    assert "aborting" in result
    status = await d.wait_state("failed", within=8)
    assert ABORTED_BY_OPERATOR in status["reason"]
    assert ABORTED_BY_OPERATOR in status["last_failover"]["error"]
    assert "before step promote_standby" in status["last_failover"]["error"]
    # The slow step was let finish; promote never started.
    (slow,) = [r for r in records(d, "step_finished") if r["step"] == "slow_hook"]
    assert slow["outcome"] == "ok" and slow["seconds"] >= 1.9
    assert [r["step"] for r in records(d, "step_started")] == ["slow_hook"]
    assert pg_pair.standby.is_in_recovery()


# --------------------------------------------------------------------------- pause


async def test_pause_survives_a_restart_then_resume_fails_over(
    pg_pair: PgPair, daemon_factory: Factory, tmp_path: Path
) -> None:
    cfg = lab_config(pg_pair, tmp_path, threshold="1s")
    d = daemon_factory(cfg)
    await d.start()
    await d.wait_state("watching")
    result = await ok(d, "pause", reason="db maintenance window")
    assert result == {"paused": True, "reason": "db maintenance window"}
    assert d.terminate() == 0

    d2 = daemon_factory(cfg)
    await d2.start()
    status = await d2.wait_state("paused", within=3)
    assert status["paused"] is True and status["armed"] is False
    assert status["pause_reason"] == "db maintenance window"
    assert "db maintenance window" in status["reason"]

    pg_pair.primary.kill()
    await wait_for_down(d2)
    await asyncio.sleep(1.0)  # well past the 1 s threshold
    status = await d2.status()
    assert status["state"] == "paused" and status["outage_seconds"] > 1.0
    assert records(d2, "failover_started") == []
    assert pg_pair.standby.is_in_recovery()

    assert await ok(d2, "resume") == {"paused": False}
    status = await d2.wait_state("failed_over", within=10)
    assert status["roles"] == {"primary": "failover", "standby": "main"}
    assert not pg_pair.standby.is_in_recovery()


# --------------------------------------------------------------------------- reload


async def test_reload_refuses_a_broken_file_and_keeps_the_running_config(
    pg_pair: PgPair, daemon_factory: Factory, tmp_path: Path
) -> None:
    cfg = lab_config(pg_pair, tmp_path, threshold="2s")
    d = daemon_factory(cfg)
    await d.start()
    await d.wait_state("watching")
    assert metric(await d.metrics(), "watchdogd_outage_threshold_seconds") == 2.0
    before = await d.status()

    broken = copy.deepcopy(cfg)
    broken["failover"]["outage_threshold"] = "soon"
    d.write_config(broken)
    error = await refused(d, "reload")
    assert error.startswith("reload refused, running config kept: failover.outage_threshold:")
    assert "soon" in error or "duration" in error
    after = await d.status()
    for key in ("state", "mode", "armed", "roles", "paused"):
        assert after[key] == before[key], key
    text = await d.metrics()
    assert metric(text, "watchdogd_outage_threshold_seconds") == 2.0
    assert metric(text, "watchdogd_config_reload_success") == 0.0

    fixed = copy.deepcopy(cfg)
    fixed["failover"]["outage_threshold"] = "3s"
    d.write_config(fixed)
    assert await ok(d, "reload") == {"reloaded": True, "restart_needed_for": []}
    text = await d.metrics()
    assert metric(text, "watchdogd_outage_threshold_seconds") == 3.0
    assert metric(text, "watchdogd_config_reload_success") == 1.0

    # SIGHUP with a broken file: logged, refused, the daemon carries on.
    broken = copy.deepcopy(fixed)
    broken["probe"]["interval"] = "fast"
    d.write_config(broken)
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)

    def refused_on_hup() -> list[dict[str, Any]]:
        return [e for e in events(d, "reload_refused") if e.get("by") == "SIGHUP"]

    await eventually(refused_on_hup, within=5)
    (hup,) = refused_on_hup()
    assert any(p.startswith("probe.interval:") for p in hup["problems"])
    assert d.proc.poll() is None
    status = await d.status()
    assert status["state"] == "watching"
    assert metric(await d.metrics(), "watchdogd_outage_threshold_seconds") == 3.0


# --------------------------------------------------------------------------- ack, history


async def test_history_and_ack_after_a_failover(
    pg_pair: PgPair, daemon_factory: Factory, tmp_path: Path
) -> None:
    cfg = lab_config(pg_pair, tmp_path, threshold="1s", cooldown="0s")
    d = daemon_factory(cfg)
    await d.start()
    await d.wait_state("watching")
    assert await ok(d, "history") == {"failovers": []}
    pg_pair.primary.kill()
    status = await d.wait_state("failed_over", within=15)
    fid = status["last_failover"]["id"]

    (fo,) = (await ok(d, "history", n=5))["failovers"]
    assert (fo["id"], fo["trigger"], fo["outcome"], fo["from"], fo["to"]) == (
        fid,
        "automatic",
        "completed",
        "main",
        "failover",
    )
    assert fo["acked_at"] is None
    steps = fo["steps"]
    assert [s["name"] for s in steps] == ["stop_replication", "promote_standby"]
    moment = fo["started_at"]
    for step in steps:
        assert step["outcome"] == "ok" and step["attempts"] == 1 and step["error"] is None
        assert moment <= step["started_at"] <= step["finished_at"]
        moment = step["finished_at"]
    assert moment <= fo["finished_at"]
    assert "promoted" in steps[1]["detail"]

    # Ack: the pair is watched in its new roles, re-armed (cooldown 0s).
    acked = await ok(d, "ack")
    assert acked == {
        "acked": fid,
        "roles": {"primary": "failover", "standby": "main"},
        "armed": True,
    }
    await asyncio.sleep(1.2)  # a couple of cycles in the new roles
    status = await d.status()
    assert status["armed"] is True and status["awaiting_ack"] is False
    assert status["roles"] == {"primary": "failover", "standby": "main"}
    assert status["state"] not in ("failed_over", "failing_over", "failed")
    assert status["nodes"][0]["name"] == "failover" and status["nodes"][0]["database"]["ok"]
    assert (await ok(d, "history"))["failovers"][0]["acked_at"] is not None
    error = await refused(d, "ack")
    assert error.startswith("nothing to acknowledge")


# --------------------------------------------------------------------------- permissions


async def test_unprivileged_peer_is_refused_and_logged(
    pg_pair: PgPair, daemon_factory: Factory, tmp_path: Path, open_dir: Path
) -> None:
    runuser = need("runuser", which("runuser"))
    python = need("system python3", which("python3", "/usr/bin"))  # the venv is root's
    if os.geteuid() != 0:
        pytest.skip("needs root to run watchdogctl as another user")
    cfg = lab_config(pg_pair, tmp_path, threshold="1s")
    cfg["control"]["socket"] = str(open_dir / "control.sock")
    d = daemon_factory(cfg)
    await d.start()
    await d.wait_state("watching")
    # The config refuses "other" bits on the socket; opening it up here stands in for
    # a group the operator would be in.
    os.chmod(d.socket, 0o666)

    async def ctl_as_nobody(*argv: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            runuser, "-u", "nobody", "--", "env", f"PYTHONPATH={REPO}",
            "PYTHONDONTWRITEBYTECODE=1", python, "-m", "watchdogd.ctl",
            "--socket", d.socket, *argv,
            cwd="/", stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    code, out, err = await ctl_as_nobody("failover", "--yes", "--force")
    assert code == 1, (code, out, err)
    assert err.splitlines()[0] == "watchdogctl: failover: permission denied"
    # read_groups is empty: whoever can connect may look.
    code, out, err = await ctl_as_nobody("status")
    assert code == 0, err
    assert "watching" in out

    nobody = pwd.getpwnam("nobody").pw_uid
    (denial,) = events(d, "control.denied")
    assert denial["command"] == "failover" and denial["level"] == "warning"
    assert denial["uid"] == nobody and denial["user"] == "nobody" and denial["pid"] > 0
    assert d.journal() == []
    assert (await d.status())["state"] == "watching"
    assert pg_pair.standby.is_in_recovery()


# --------------------------------------------------------------------------- hostile input

MAX_LINE = 64 * 1024
MUTATING = sorted(n for n, c in COMMANDS.items() if c.mutating)

json_scalars = (
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.text(max_size=20)
    | st.integers() | st.integers(min_value=10**30, max_value=10**400)
)  # fmt: skip
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=10,
)  # fmt: skip


def request_line(command: Any, args: Any) -> bytes:
    return json.dumps({"command": command, "args": args}).encode()


# Valid requests this daemon (not paused, no failover ever) must refuse, changing
# nothing. (failover/abort refusals depend on the primary's health: a probe that
# times out under the fuzz's load would make them act, so they are not sent.)
REFUSED_WHEN_IDLE = [
    request_line("resume", None),
    request_line("ack", {}),
    request_line("ack", None),
]

hostile = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=80).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.builds(request_line, st.sampled_from(MUTATING), json_values),
    st.builds(request_line, json_values, json_values),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.builds(lambda n: request_line("history", {"n": n}), st.integers(-5, 1005)),
    st.sampled_from(REFUSED_WHEN_IDLE),
    st.integers(1, 100_000).map(lambda n: b"[" * n),
    st.sampled_from([
        b"NaN", b'{"command": "pause", "args": {"reason": NaN}}',
        b'{"command": "switchover", "args": {"timeout": 1e999}}',
        b'{"command": "pause", "args": {"reason": "a\\u0000b"}}',
        b'{"command": "pause", "args": {"reason": "\\u001b[2J"}}',
        b'{"command": "pause", "extra": 1}', b"\xef\xbb\xbf{}", b"\xed\xa0\x80",
        b'{"command": "status", "args": {"n": 1}}', b'{"command": "STATUS"}',
    ]),
    st.just(b"x" * (MAX_LINE + 1)),
).map(lambda line: line.replace(b"\n", b" "))  # fmt: skip


BAD_JSON = "request is not valid JSON"


def local_verdict(line: bytes) -> tuple[str, str | None]:
    """What the daemon must answer, from the shared validator: ("invalid", error),
    ("read", None) for a valid status/history, ("mutating", name) otherwise."""
    if len(line) > MAX_LINE:
        return "too_long", None
    try:
        name, raw = parse_request(line)
        command = lookup(name)
        validate_args(command, raw)
    except CommandError as exc:
        return "invalid", str(exc)
    return ("mutating", command.name) if command.mutating else ("read", command.name)


def exchange(path: str, line: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        try:
            s.sendall(line + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # hung up after an oversized line: its reply is still there
        chunks: list[bytes] = []
        while not chunks or not chunks[-1].endswith(b"\n"):
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


async def test_hostile_lines_leave_the_real_daemon_intact(
    pg_pair: PgPair, daemon_factory: Factory, tmp_path: Path
) -> None:
    # A generous probe timeout: the fuzz loads both cores, and a blip must not look like
    # an outage (the state is compared afterwards).
    cfg = lab_config(pg_pair, tmp_path, threshold="30s", interval="2500ms", timeout="2s")
    d = daemon_factory(cfg)
    await d.start()
    before = await d.wait_state("watching")
    seen: dict[str, int] = {}

    @settings(
        max_examples=1500,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.large_base_example, HealthCheck.filter_too_much],
    )  # fmt: skip
    @given(line=hostile.filter(lambda line: local_verdict(line)[0] != "mutating"
                               or line in REFUSED_WHEN_IDLE))  # fmt: skip
    def fuzz(line: bytes) -> None:
        kind, expected = local_verdict(line)
        raw = exchange(d.socket, line)
        assert raw.endswith(b"\n") and raw.count(b"\n") == 1, (line[:100], raw[:200])
        reply = json.loads(raw)
        assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool), raw
        if kind == "read":
            assert reply["ok"] is True and isinstance(reply["result"], dict), raw
        else:
            assert reply["ok"] is False and set(reply) == {"ok", "error"}, (line[:100], raw)
            error = reply["error"]
            assert isinstance(error, str) and error and len(error) < 600, raw
            if kind == "invalid":
                assert expected is not None
                if expected.startswith(BAD_JSON):
                    # How deep a nesting fits depends on each process's stack.
                    assert error.startswith(BAD_JSON), (line[:100], error)
                else:
                    assert error == expected, (line[:100], error)
        seen[kind] = seen.get(kind, 0) + 1

    await asyncio.to_thread(fuzz)
    assert sum(seen.values()) >= 1000, seen
    assert seen.get("invalid", 0) > 500 and seen.get("read") and seen.get("mutating"), seen

    assert d.proc is not None and d.proc.poll() is None
    after = await d.status()
    for key in ("state", "armed", "paused", "roles", "awaiting_ack", "last_failover"):
        assert after[key] == before[key], key
    assert after["last_cycle_at"] > before["last_cycle_at"]  # still probing
    assert d.journal() == []
    assert not events(d, "control.handler_failed")
    assert not events(d, "control.connection_failed")
    assert pg_pair.standby.is_in_recovery()


# --------------------------------------------------------------------------- single instance


def run_second(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "watchdogd.cli", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


async def test_a_second_daemon_refuses_to_start(
    pg_pair: PgPair, daemon_factory: Factory, tmp_path: Path
) -> None:
    cfg = lab_config(pg_pair, tmp_path, threshold="2s")
    d = daemon_factory(cfg)
    await d.start()
    first = await d.wait_state("watching")

    # Same config: the state_dir is locked.
    same = run_second(d.config_path)
    locked = f"watchdogd: another watchdogd is running with state_dir {cfg['state_dir']}"
    assert same.returncode == 1, same
    assert same.stderr.splitlines()[-1] == locked, same.stderr

    # Own state_dir and metrics port, same socket: the live socket is not taken over.
    other = copy.deepcopy(cfg)
    other["state_dir"] = str(tmp_path / "state2")
    other["metrics"]["listen"] = "127.0.0.1:0"  # any free port
    path = tmp_path / "second.yml"
    path.write_text(json.dumps(other))  # JSON is YAML
    second = run_second(path)
    taken = (
        f"watchdogd: another watchdogd is already listening on {d.socket}; "
        "stop it first or set a different control.socket"
    )
    assert second.returncode == 1, second
    assert second.stderr.splitlines()[-1] == taken, second.stderr
    for run in (same, second):
        assert "Traceback" not in run.stderr and run.stdout == ""

    # The first one never noticed.
    assert d.proc is not None and d.proc.poll() is None
    assert stat.S_ISSOCK(os.stat(d.socket).st_mode)
    await asyncio.sleep(0.6)
    now = await d.status()
    assert now["state"] == "watching" and now["last_cycle_at"] > first["last_cycle_at"]
    assert d.journal() == []
    # ... and the refusal was all it said: no log of a "stop" of what never ran,
    # no warning about what it left open.
    assert same.stderr.splitlines() == [locked], same.stderr
    assert second.stderr.splitlines() == [taken], second.stderr
