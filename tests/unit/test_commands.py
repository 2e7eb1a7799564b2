"""Operator commands against a daemon built in-process (no database: the commands
tested here do not touch one): each command's reply, its journal record and its event,
the refusals, and the control socket's permissions in front of the real handler."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import need, which
from watchdogd import config
from watchdogd.control import CommandError, ControlServer, Peer
from watchdogd.core.model import ControlConfig
from watchdogd.daemon import Daemon
from watchdogd.detector import DOWN, SUSPECT, Status, Verdict
from watchdogd.policy import FAILED, FAILED_OVER, PAUSED, WATCHING
from watchdogd.state import journal

ROOT = Peer(pid=42, uid=0, gid=0, user="root")
SECRET = "s3cret-pw"


class Log:
    """Records (level, event, facts) like the structlog logger the daemon is given."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        def log(event: str, **facts: Any) -> None:
            self.entries.append((level, event, facts))

        return log

    def named(self, event: str) -> list[dict[str, Any]]:
        return [f for _, e, f in self.entries if e == event]


def raw_config(tmp_path: Path, interval: str = "1s") -> dict[str, Any]:
    return {
        "cluster": "orders",
        "primary": {
            "name": "main",
            "database": {"engine": "postgres", "dsn": f"postgresql://u:{SECRET}@127.0.0.1:1/x"},
        },
        "standby": {
            "name": "failover",
            "database": {"engine": "postgres", "dsn": f"postgresql://u:{SECRET}@127.0.0.1:2/x"},
        },
        "probe": {"interval": interval, "timeout": "500ms"},
        "failover": {
            "outage_threshold": "30s",
            "steps": [
                {"name": "stop_replication", "action": "stop_replication"},
                {"name": "promote_standby", "action": "promote"},
            ],
        },
        "metrics": {"enabled": False},
        "state_dir": str(tmp_path / "state"),
    }


class Rig:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.log = Log()
        self.d = Daemon(config.parse(raw_config(tmp_path)), log=self.log)
        self.load()

    def load(self) -> None:
        """As start() does, without servers or probes."""
        self.d.state = self.d.journal.load()
        self.d.policy.journal = self.d.state

    async def cmd(self, command: str, peer: Peer = ROOT, **args: Any) -> dict[str, Any]:
        return await self.d.handle_command(command, args, peer)

    def records(self) -> list[dict[str, Any]]:
        path = Path(self.d.config.state_dir) / "journal.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    def types(self) -> list[str]:
        return [r["type"] for r in self.records()]

    def journal_failover(self, outcome: str | None, promoted: bool) -> None:
        """A failover of a previous run, written to the journal and replayed."""
        self.d.journal.close()
        j = journal.Journal(self.d.config.state_dir)
        steps = ["stop_replication", "promote_standby"]
        j.append(
            journal.sequence_started(
                "failover", id="F1", trigger="automatic", kind="failover", reason="down",
                from_node="main", to_node="failover", steps=steps, at=1,
            )
        )  # fmt: skip
        if promoted:
            for n, step in enumerate(steps):
                action = "stop_replication" if n == 0 else "promote"
                j.append(
                    journal.step_started(
                        "failover", id="F1", step=step, action=action, attempt=1, at=2
                    )
                )
                j.append(
                    journal.step_finished(
                        "failover", id="F1", step=step, action=action, outcome="ok", at=3
                    )
                )
        if outcome is not None:
            j.append(
                journal.sequence_finished("failover", id="F1", outcome=outcome, error=None, at=4)
            )
        j.close()
        self.d.journal = journal.Journal(self.d.config.state_dir)
        self.load()


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    r = Rig(tmp_path)
    yield r
    for engine in r.d.engines.values():
        await engine.close()
    r.d.journal.close()


# ----------------------------------------------------------------- status and history


async def test_status_before_any_probe(rig: Rig) -> None:
    status = await rig.cmd("status")
    assert status["cluster"] == "orders" and status["state"] == WATCHING
    assert status["reason"] == "starting" and status["mode"] == "automatic"
    assert status["armed"] is True and status["paused"] is False
    assert status["roles"] == {"primary": "main", "standby": "failover"}
    assert [n["database"] for n in status["nodes"]] == [None, None]
    assert status["verdict"] is None and status["last_failover"] is None
    assert status["failover_in_progress"] is None and status["journal_error"] is None
    assert status == rig.d.status()
    assert rig.types() == []  # reading writes nothing


async def test_history_is_newest_first_and_limited(rig: Rig) -> None:
    assert await rig.cmd("history") == {"failovers": []}
    rig.journal_failover("completed", promoted=True)
    (only,) = (await rig.cmd("history", n=5))["failovers"]
    assert only["id"] == "F1" and only["outcome"] == "completed"
    status = await rig.cmd("status")
    assert status["last_failover"]["id"] == "F1" and status["last_failover"]["acked"] is False


# ----------------------------------------------------------------- pause and resume


async def test_pause_is_journaled_announced_and_shown(rig: Rig) -> None:
    reply = await rig.cmd("pause", reason="db upgrade")
    assert reply == {"paused": True, "reason": "db upgrade"}
    (rec,) = rig.records()
    assert rec["type"] == "pause" and rec["reason"] == "db upgrade"
    assert rec["by"] == "root (pid 42)"
    assert rig.log.named("paused") == [{"reason": "db upgrade", "by": "root (pid 42)"}]
    status = await rig.cmd("status")
    assert status["paused"] is True and status["pause_reason"] == "db upgrade"
    assert status["state"] == PAUSED and status["armed"] is False
    # A restart replays it.
    assert journal.Journal(rig.d.config.state_dir).load().paused


async def test_pause_without_a_reason_names_who_and_masks_a_secret(rig: Rig) -> None:
    nobody = Peer(pid=7, uid=65534, gid=65534, user=None)
    reply = await rig.cmd("pause", nobody)
    assert reply["reason"] == "paused by uid 65534 (pid 7)"
    await rig.cmd("resume")
    reply = await rig.cmd("pause", reason=f"password {SECRET} rotated")
    assert SECRET not in json.dumps(reply) and SECRET not in json.dumps(rig.records())
    assert reply["reason"] == "password *** rotated"


async def test_resume_needs_a_pause(rig: Rig) -> None:
    with pytest.raises(CommandError, match=r"^automatic failover is not paused$"):
        await rig.cmd("resume")
    assert rig.types() == []
    await rig.cmd("pause")
    assert await rig.cmd("resume") == {"paused": False}
    assert rig.types() == ["pause", "resume"]
    assert rig.log.named("resumed") == [{"by": "root (pid 42)"}]
    assert (await rig.cmd("status"))["state"] == WATCHING


# ----------------------------------------------------------------- failover and switchover


async def test_failover_refused_while_the_primary_is_healthy_even_as_a_dry_run(rig: Rig) -> None:
    for args in ({}, {"dry_run": True}):
        with pytest.raises(CommandError, match="failover refused: the primary is healthy"):
            await rig.cmd("failover", ROOT, **args)
    assert rig.types() == [] and rig.d.sequences.runner is None


async def test_a_forced_dry_run_describes_the_plan_and_does_nothing(rig: Rig) -> None:
    reply = await rig.cmd("failover", force=True, dry_run=True, reason=f"drill {SECRET}")
    assert reply["dry_run"] is True
    plan = reply["plan"]
    assert plan["from"] == "main" and plan["to"] == "failover" and plan["forced"] is True
    assert plan["kind"] == "failover" and plan["trigger"] == "manual"
    assert [s["name"] for s in plan["steps"]] == ["stop_replication", "promote_standby"]
    assert SECRET not in json.dumps(reply) and plan["reason"] == "drill ***"
    assert rig.types() == [] and rig.d.sequences.runner is None


async def test_failover_refused_while_the_standby_is_unknown_unless_forced(rig: Rig) -> None:
    rig.d.latest.verdict = Verdict(DOWN, "primary database down", trigger="database")
    with pytest.raises(CommandError, match=r"standby database unreachable .*use --force"):
        await rig.cmd("failover", dry_run=True)


async def test_failover_refused_during_one_and_after_a_completed_one(rig: Rig) -> None:
    rig.journal_failover(None, promoted=False)
    with pytest.raises(CommandError, match="failover F1 is already in progress"):
        await rig.cmd("failover", force=True)
    rig.journal_failover("completed", promoted=True)
    with pytest.raises(CommandError, match="already completed; rebuild main as the standby"):
        await rig.cmd("failover", force=True, dry_run=True)


async def test_switchover_refusals(rig: Rig) -> None:
    with pytest.raises(CommandError, match="switchover refused: the primary database is down"):
        await rig.cmd("switchover", dry_run=True)
    rig.journal_failover("failed", promoted=False)
    with pytest.raises(CommandError, match="switchover refused: failover F1 awaits an ack"):
        await rig.cmd("switchover")
    assert rig.types().count("ack") == 0


# ----------------------------------------------------------------- abort


async def test_abort_with_nothing_running_or_pending(rig: Rig) -> None:
    with pytest.raises(
        CommandError, match=r"^nothing to abort: no failover is running or pending$"
    ):
        await rig.cmd("abort")
    assert rig.types() == []


@pytest.mark.parametrize("status", [SUSPECT, DOWN])
async def test_abort_of_a_pending_outage_is_journaled_and_disarms(rig: Rig, status: Status) -> None:
    rig.d.latest.verdict = Verdict(status, "primary database failing for 5s", trigger="database")
    reply = await rig.cmd("abort")
    fid = reply["aborted"]
    assert reply["note"] == "no automatic failover until an operator acks"
    started, finished = rig.records()
    assert started["type"] == "failover_started" and started["id"] == fid
    assert started["pending"] is True and started["steps"] == []
    assert started["reason"] == "primary database failing for 5s"
    assert finished["type"] == "failover_finished" and finished["outcome"] == "aborted"
    assert finished["error"] == "aborted by operator (root (pid 42)) before it started"
    (event,) = rig.log.named("failover_aborted")
    assert event == {
        "failover_id": fid,
        "trigger": "automatic",
        "by": "root (pid 42)",
        "error": "aborted by operator before it started",
    }
    status_now = await rig.cmd("status")
    assert status_now["state"] == FAILED and status_now["awaiting_ack"] is True
    assert status_now["armed"] is False
    # Nothing pending any more: a second abort has nothing to stop.
    with pytest.raises(CommandError, match="nothing to abort"):
        await rig.cmd("abort")


# ----------------------------------------------------------------- ack


async def test_ack_with_nothing_to_acknowledge(rig: Rig) -> None:
    with pytest.raises(CommandError, match=r"^nothing to acknowledge: no completed or failed"):
        await rig.cmd("ack")
    assert rig.types() == []


async def test_ack_of_a_completed_failover_swaps_the_roles_and_rearms(rig: Rig) -> None:
    rig.journal_failover("completed", promoted=True)
    assert (await rig.cmd("status"))["roles"] == {"primary": "failover", "standby": "main"}
    rig.d.cycle.refresh_state()
    assert rig.d.policy.state == FAILED_OVER
    rig.d.latest.last_primary_pos = 1234
    before = len(rig.records())
    reply = await rig.cmd("ack")
    assert reply["acked"] == "F1" and reply["roles"] == {"primary": "failover", "standby": "main"}
    rec = rig.records()[before]
    assert rec["type"] == "ack" and rec["id"] == "F1" and rec["by"] == "root (pid 42)"
    assert (rec["primary"], rec["standby"]) == ("failover", "main")
    assert rig.log.named("acked") == [
        {"failover_id": "F1", "by": "root (pid 42)", "primary": "failover", "standby": "main"}
    ]
    # A new primary: the old one's write position is no reference for the lag guard.
    assert rig.d.latest.last_primary_pos is None
    assert [n.name for n in rig.d.roles()] == ["failover", "main"]
    assert (await rig.cmd("status"))["awaiting_ack"] is False
    # Its cooldown (from t=1, long past) is over: armed again.
    assert reply["armed"] is True


async def test_ack_of_an_aborted_outage_keeps_roles_and_the_lag_reference(rig: Rig) -> None:
    rig.d.latest.verdict = Verdict(DOWN, "primary down", trigger="database")
    rig.d.latest.last_primary_pos = 99
    await rig.cmd("abort")
    reply = await rig.cmd("ack")
    assert reply["roles"] == {"primary": "main", "standby": "failover"}
    assert reply["armed"] is True  # an aborted pending failover starts no cooldown
    assert rig.d.latest.last_primary_pos == 99 and rig.d.latest.verdict is None
    assert (await rig.cmd("status"))["state"] == WATCHING


# ----------------------------------------------------------------- reload and the rest


async def test_reload_without_a_config_file_is_refused(rig: Rig) -> None:
    with pytest.raises(CommandError, match=r"^reload refused: the daemon was not started from"):
        await rig.cmd("reload")


async def test_reload_from_the_file_applies_or_refuses(tmp_path: Path) -> None:
    path = tmp_path / "watchdogd.yaml"
    path.write_text(yaml.safe_dump(raw_config(tmp_path)))
    log = Log()
    d = Daemon(config.load(str(path)), log=log)
    try:
        path.write_text(yaml.safe_dump(raw_config(tmp_path, interval="2s")))
        reply = await d.handle_command("reload", {}, ROOT)
        assert reply == {"reloaded": True, "restart_needed_for": []}
        assert d.config.probe.interval == 2.0 and d.detector.interval == 2.0
        assert log.named("reloaded") == [{"by": "root (pid 42)", "restart_needed_for": None}]
        changed = raw_config(tmp_path, interval="2s")
        changed["state_dir"] = str(tmp_path / "elsewhere")
        path.write_text(yaml.safe_dump(changed))
        reply = await d.handle_command("reload", {}, ROOT)
        assert reply["restart_needed_for"] == ["state_dir"]
        path.write_text("cluster: [")
        with pytest.raises(CommandError, match=r"^reload refused, running config kept: "):
            await d.handle_command("reload", {}, ROOT)
        assert d.config.state_dir == str(tmp_path / "elsewhere")
        assert len(log.named("reload_refused")) == 1
    finally:
        for engine in d.engines.values():
            await engine.close()
        d.journal.close()


async def test_an_unknown_command_is_refused(rig: Rig) -> None:
    with pytest.raises(CommandError, match=r"^unknown command 'promote'$"):
        await rig.cmd("promote")


# ----------------------------------------------------------------- permissions

CLIENT = r"""
import json, socket, sys
out = []
for request in sys.argv[2:]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sys.argv[1])
    s.sendall(request.encode() + b"\n")
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    out.append(json.loads(data))
print(json.dumps(out))
"""


async def as_user(user: str, path: str, *requests: str) -> list[dict[str, Any]]:
    if os.geteuid() != 0:
        pytest.skip("needs root to run a client as another user")
    runuser = need("runuser", which("runuser"))
    python = need("system python3", which("python3", "/usr/bin"))
    proc = await asyncio.create_subprocess_exec(
        runuser, "-u", user, "--", python, "-c", CLIENT, path, *requests,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err.decode()
    result: list[dict[str, Any]] = json.loads(out)
    return result


async def test_a_reader_gets_status_but_cannot_pause_or_fail_over(rig: Rig, open_dir: Path) -> None:
    path = str(open_dir / "control.sock")
    # mode 0666 gives "other" rights, which config parsing forbids: built directly.
    server = ControlServer(
        ControlConfig(socket=path, mode=0o666), rig.d.handle_command, Log(), secrets=frozenset()
    )
    await server.start()
    try:
        status, history, pause, failover = await as_user(
            "nobody",
            path,
            '{"command": "status"}',
            '{"command": "history"}',
            '{"command": "pause", "args": {"reason": "x"}}',
            '{"command": "failover", "args": {"force": true, "dry_run": true}}',
        )
    finally:
        await server.stop()
    assert status["ok"] is True and status["result"]["roles"]["primary"] == "main"
    assert history == {"ok": True, "result": {"failovers": []}}
    denied = {"ok": False, "error": "permission denied"}
    assert pause == denied and failover == denied
    assert rig.types() == [] and not rig.d.state.paused  # the handler never ran
