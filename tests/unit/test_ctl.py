"""``watchdogctl`` against a real ControlServer on a Unix socket.

``main(argv)`` runs in a worker thread (it owns its own event loop) while the
server runs on the test's loop; one test runs it as a real subprocess.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import socket
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import LogCapture

from tests.support import need, which
from tests.support.fakes import ScriptedDaemon
from watchdogd.control import ControlServer
from watchdogd.core.model import ControlConfig
from watchdogd.ctl import format_bytes, main, needs_confirmation, render, render_status

REPO = Path(__file__).resolve().parents[2]
STARTED = 1764300000.0
WHEN = datetime.fromtimestamp(STARTED, UTC).strftime("%Y-%m-%d %H:%M:%SZ")

STATUS: dict[str, Any] = {
    "cluster": "orders",
    "state": "watching",
    "reason": "all probes healthy",
    "mode": "automatic",
    "armed": True,
    "paused": False,
    "pause_reason": None,
    "awaiting_ack": False,
    "roles": {"primary": "main", "standby": "failover"},
    "nodes": [
        {"name": "main", "role": "primary",
         "database": {"ok": True, "writable": True, "detail": "primary, writable",
                      "latency": 0.002},
         "app": {"ok": True, "detail": "200", "latency": 0.004}},
        {"name": "failover", "role": "standby",
         "database": {"ok": False, "writable": False,
                      "detail": "connection refused by 127.0.0.1:5433", "latency": 0.5},
         "app": None},
    ],
    "outage_seconds": 12.5,
    "lag": {"bytes": 1572864, "seconds": 2.0, "streaming": True},
    "failover_in_progress": None,
    "last_failover": {"id": "20261128T022300Z-ab12", "trigger": "automatic",
                      "outcome": "completed", "reason": "primary down for 30s", "from": "main",
                      "to": "failover", "started_at": STARTED, "finished_at": STARTED + 4.2},
}  # fmt: skip

HISTORY: dict[str, Any] = {
    "failovers": [
        {"id": "20261128T022300Z-ab12", "trigger": "manual", "reason": "drill",
         "from": "main", "to": "failover", "started_at": STARTED,
         "finished_at": STARTED + 4.2, "outcome": "failed",
         "steps": [
             {"name": "stop_replication", "started_at": STARTED,
              "finished_at": STARTED + 0.12, "outcome": "ok", "attempts": 1, "error": None,
              "detail": "replication stopped"},
             {"name": "promote", "started_at": STARTED + 0.2, "finished_at": STARTED + 4.2,
              "outcome": "failed", "attempts": 3, "error": "timed out after 1s",
              "detail": None},
             {"name": "switch_dns", "started_at": None, "finished_at": None,
              "outcome": "skipped", "attempts": 0, "error": None, "detail": None},
         ]},
    ]
}  # fmt: skip

PLAN: dict[str, Any] = {
    "dry_run": True,
    "plan": {"failover_id": "20261128T030000Z-cd34", "trigger": "manual", "from": "main",
             "to": "failover", "reason": "drill",
             "steps": [
                 {"name": "stop_replication", "action": "stop_replication", "timeout": 30.0,
                  "retries": 0, "required": True},
                 {"name": "maintenance_off", "action": "http", "timeout": 5.0, "retries": 2,
                  "required": False, "method": "POST",
                  "url": "http://failover.example/maintenance?cluster=orders"},
             ]},
}  # fmt: skip


class Rig:
    def __init__(self, path: str, daemon: ScriptedDaemon) -> None:
        self.path = path
        self.daemon = daemon

    async def run(self, *argv: str) -> int:
        """``watchdogctl --socket <rig> argv...`` in-process."""
        return await asyncio.to_thread(main, ["--socket", self.path, *argv])


@pytest.fixture
async def rig(sockdir: Path) -> AsyncIterator[Rig]:
    daemon = ScriptedDaemon(STATUS, HISTORY, PLAN)
    log = structlog.wrap_logger(
        structlog.PrintLogger(),
        processors=[LogCapture()],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
    )
    server = ControlServer(ControlConfig(socket=str(sockdir / "control.sock")), daemon, log)
    await server.start()
    yield Rig(server.path, daemon)
    await server.stop()


def squeeze(text: str) -> str:
    return re.sub(r"[ \t]+", " ", text)


# --------------------------------------------------------------------------- rendering


async def test_status_prints_a_compact_table(rig: Rig, capsys: pytest.CaptureFixture[str]) -> None:
    assert await rig.run("status") == 0
    out = squeeze(capsys.readouterr().out)
    expected_lines = [
        "cluster orders",
        "state watching (all probes healthy)",
        "mode automatic, armed",
        "roles primary main, standby failover",
        "outage 12.5s",
        "lag 1.6 MB, 2.0s behind, streaming",
        f"last failover 20261128T022300Z-ab12: automatic, completed, main -> failover, {WHEN} "
        "(took 4.2s)",
        "reason: primary down for 30s",
        "awaiting ack no",
        "NODE ROLE DATABASE WRITABLE APP",
        "main primary ok (2ms) yes ok (4ms)",
        "failover standby FAIL: connection refused by 127.0.0.1:5433 no -",
    ]
    lines = [line.strip() for line in out.splitlines()]
    for expected in expected_lines:
        assert expected in lines, f"{expected!r} not in:\n{out}"
    assert "paused" not in out  # only shown when paused


async def test_status_shows_pause_progress_and_ack(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    rig.daemon.status = {
        **STATUS, "paused": True, "pause_reason": "db upgrade", "awaiting_ack": True,
        "armed": False, "outage_seconds": 0.0, "last_failover": None,
        "failover_in_progress": {"id": "X-1", "step": "promote_standby", "started_at": STARTED},
    }  # fmt: skip
    assert await rig.run("status") == 0
    lines = [squeeze(line).strip() for line in capsys.readouterr().out.splitlines()]
    assert "paused yes: db upgrade" in lines
    assert "mode automatic, NOT armed" in lines
    assert "outage none" in lines
    assert "last failover none" in lines
    assert f"in progress X-1 at step promote_standby, started {WHEN}" in lines
    assert "awaiting ack YES (watchdogctl ack)" in lines


@pytest.mark.parametrize(
    "status",
    [
        {},
        {"cluster": "x"},
        {"cluster": None, "nodes": "oops", "lag": 5, "roles": [], "last_failover": "yes"},
        {"nodes": [None, {"name": "a", "database": "weird", "app": {"ok": False}}],
         "lag": {"bytes": "many", "seconds": None}, "outage_seconds": "long",
         "failover_in_progress": {"started_at": 1e300}, "state": "x\x1b[2Jy\nz"},
    ],
)  # fmt: skip
def test_status_rendering_tolerates_missing_and_odd_keys(status: dict[str, Any]) -> None:
    text = render_status(status)
    assert text.startswith("cluster")
    assert "\x1b" not in text  # daemon text cannot drive the terminal


def test_odd_status_values_are_shown_plainly() -> None:
    text = render_status({"state": "x\x1b[2Jy\nz", "nodes": [{"name": "a", "app": {"ok": False}}]})
    assert re.search(r"^state +x \[2Jy z$", text, re.M)
    assert re.search(r"^a\s+\?\s+-\s+-\s+FAIL: down$", text, re.M)


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 B"), (999, "999 B"), (1536, "1.5 kB"), (1572864, "1.6 MB"),
     (3 * 10**9, "3.0 GB"), (5 * 10**12, "5.0 TB"), (10**18, "1000000.0 TB"), (None, "?"),
     ("x", "?")],
)  # fmt: skip
def test_format_bytes(n: Any, text: str) -> None:
    assert format_bytes(n) == text


async def test_json_prints_the_raw_result(rig: Rig, capsys: pytest.CaptureFixture[str]) -> None:
    assert await rig.run("--json", "status") == 0
    assert json.loads(capsys.readouterr().out) == STATUS
    assert await rig.run("history", "--json", "-n", "3") == 0  # also accepted after the command
    assert json.loads(capsys.readouterr().out) == HISTORY
    assert rig.daemon.calls[-1] == ("history", {"n": 3})


async def test_history_prints_each_failover_with_its_steps(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await rig.run("history", "-n", "5") == 0
    lines = [squeeze(line).strip() for line in capsys.readouterr().out.splitlines()]
    assert lines[0] == (
        f"20261128T022300Z-ab12: manual, failed, main -> failover, {WHEN} (took 4.2s)"
    )
    assert "reason: drill" in lines
    assert "STEP AT OUTCOME TOOK ATTEMPTS DETAIL" in lines
    assert "stop_replication +0.0s ok 120ms 1 replication stopped" in lines
    assert "promote +0.2s failed 4.0s 3 error: timed out after 1s" in lines
    assert "switch_dns - skipped - 0" in lines
    assert rig.daemon.calls == [("history", {"n": 5})]


def test_empty_history() -> None:
    assert render("history", {"failovers": []}) == "no failovers recorded"
    assert render("history", {"failovers": "garbage"}) == "no failovers recorded"


async def test_failover_dry_run_prints_the_plan_without_asking(
    rig: Rig, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", FakeTTY("no\n"))  # would refuse, if it were asked
    assert await rig.run("failover", "--dry-run", "--reason", "drill") == 0
    out = capsys.readouterr()
    lines = [squeeze(line).strip() for line in out.out.splitlines()]
    assert lines[0] == (
        "dry run (nothing was changed): failover 20261128T030000Z-cd34 (manual), main -> failover"
    )
    assert "reason: drill" in lines
    assert "1. stop_replication [stop_replication] timeout 30.0s, retries 0, required" in lines
    assert "2. maintenance_off [http] timeout 5.0s, retries 2, optional" in lines
    assert "method: POST" in lines
    assert "url: http://failover.example/maintenance?cluster=orders" in lines
    assert "Type yes" not in out.err
    assert rig.daemon.calls == [("failover", {"force": False, "dry_run": True, "reason": "drill"})]


async def test_mutating_command_results_are_printed(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await rig.run("pause", "--reason", "db upgrade") == 0
    assert capsys.readouterr().out == "automatic failover paused\npaused: yes\n"
    assert await rig.run("ack") == 0
    assert capsys.readouterr().out == "ack: done\n"
    assert rig.daemon.calls == [("pause", {"reason": "db upgrade"}), ("ack", {})]


async def test_arguments_reach_the_daemon(rig: Rig) -> None:
    assert await rig.run("--yes", "failover", "--force", "--reason", "primary on fire") == 0
    assert await rig.run("switchover", "--timeout", "2m") == 0
    assert await rig.run("switchover", "--dry-run", "--timeout", "45") == 0
    assert rig.daemon.calls == [
        ("failover", {"force": True, "dry_run": False, "reason": "primary on fire"}),
        ("switchover", {"dry_run": False, "timeout": 120.0}),
        ("switchover", {"dry_run": True, "timeout": 45.0}),
    ]


# --------------------------------------------------------------------------- exit codes


async def test_refused_by_the_daemon_exits_1_with_its_error(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await rig.run("resume") == 1
    out = capsys.readouterr()
    assert out.err == "watchdogctl: resume: automatic failover is not paused\n"
    assert out.out == ""


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["stat"], "invalid choice: 'stat'"),
        (["history", "-n", "many"], "invalid int value: 'many'"),
        (["history", "-n", "0"],
         "watchdogctl: history: argument 'n' must be from 1 to 1000, got 0"),
        (["pause", "--reason", "  "], "watchdogctl: pause: argument 'reason' must not be empty"),
        (["switchover", "--timeout", "soon"], "expected seconds like 30 or a duration like 2m"),
        (["switchover", "--timeout", "0.01"],
         "watchdogctl: switchover: argument 'timeout' must be from 0.1 to 86400 seconds"),
        (["--timeout", "-1", "status"], "must be a positive number of seconds, got '-1'"),
        (["failover", "--forse"], "unrecognized arguments: --forse"),
    ],
)  # fmt: skip
async def test_usage_errors_exit_2_without_contacting_the_daemon(
    rig: Rig, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert await rig.run(*argv) == 2
    assert message in capsys.readouterr().err
    assert rig.daemon.calls == []


async def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "switchover" in capsys.readouterr().out


async def test_no_socket_exits_3_naming_the_path_and_what_to_check(
    sockdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(sockdir / "nothing-here.sock")
    assert await asyncio.to_thread(main, ["--socket", path, "status"]) == 3
    err = capsys.readouterr().err
    assert err.startswith(f"watchdogctl: cannot reach watchdogd at {path}: ")
    assert "is watchdogd running" in err and "control.socket" in err


async def test_stale_socket_exits_3(sockdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(sockdir / "stale.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()
    assert await asyncio.to_thread(main, ["--socket", path, "--yes", "pause"]) == 3
    assert "nobody is listening (stale socket)" in capsys.readouterr().err


async def test_no_reply_within_timeout_exits_3(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    rig.daemon.hang = True
    assert await rig.run("--timeout", "0.3", "status") == 3
    assert "no reply within 0.3s" in capsys.readouterr().err


async def test_socket_comes_from_the_environment_unless_given(
    rig: Rig, sockdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("WATCHDOGD_SOCKET", rig.path)
    assert await asyncio.to_thread(main, ["status"]) == 0
    assert "orders" in capsys.readouterr().out
    elsewhere = str(sockdir / "elsewhere.sock")
    assert await asyncio.to_thread(main, ["--socket", elsewhere, "status"]) == 3
    assert elsewhere in capsys.readouterr().err


async def test_as_a_subprocess(rig: Rig, sockdir: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "WATCHDOGD_SOCKET": rig.path}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "watchdogd.ctl", "status", cwd=REPO, env=env,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    assert "state" in out.decode() and "watching (all probes healthy)" in out.decode()
    # stdin is not a TTY: a mutating command runs without asking; a refusal exits 1.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "watchdogd.ctl", "resume", cwd=REPO, env=env,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    assert err.decode() == "watchdogctl: resume: automatic failover is not paused\n"


# --------------------------------------------------------------------------- confirmation


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("command", "args", "assume_yes", "interactive", "asks"),
    [
        ("failover", {}, False, True, True),
        ("failover", {"force": True}, False, True, True),
        ("failover", {}, True, True, False),
        ("failover", {}, False, False, False),
        ("failover", {"dry_run": True}, False, True, False),
        ("switchover", {"dry_run": True}, False, True, False),
        ("pause", {}, False, True, True),
        ("reload", {}, False, True, True),
        ("status", {}, False, True, False),
        ("history", {"n": 3}, False, True, False),
    ],
)
def test_confirmation_decision(
    command: str, args: dict[str, Any], assume_yes: bool, interactive: bool, asks: bool
) -> None:
    assert needs_confirmation(
        command, args, assume_yes=assume_yes, interactive=interactive
    ) is asks  # fmt: skip


@pytest.mark.parametrize("answer", ["no\n", "y\n", "\n", ""])
async def test_without_yes_on_a_tty_anything_but_yes_refuses(
    rig: Rig, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], answer: str
) -> None:
    monkeypatch.setattr(sys, "stdin", FakeTTY(answer))
    assert await rig.run("failover", "--force") == 1
    err = capsys.readouterr().err
    assert (
        "About to fail over from the primary to the standby on cluster orders "
        "(primary main, standby failover) [forced].\nType yes to continue: "
    ) in err
    assert err.endswith("watchdogctl: not confirmed; nothing was done\n")
    assert "failover" not in rig.daemon.commands


async def test_typing_yes_on_a_tty_goes_ahead(
    rig: Rig, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", FakeTTY("YES\n"))
    assert await rig.run("pause", "--reason", "upgrade") == 0
    assert "About to pause automatic failover on cluster orders" in capsys.readouterr().err
    assert rig.daemon.commands == ["status", "pause"]


async def test_yes_flag_skips_the_question_on_a_tty(
    rig: Rig, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", FakeTTY(""))
    assert await rig.run("ack", "--yes") == 0
    assert "Type yes" not in capsys.readouterr().err
    assert rig.daemon.commands == ["ack"]


# --------------------------------------------------------------------------- as another user


async def test_an_unprivileged_operator_may_look_but_not_fail_over(sockdir: Path) -> None:
    """The real watchdogctl, run as ``nobody``, against a socket it may connect to."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run watchdogctl as another user")
    runuser = need("runuser", which("runuser"))
    # The venv's interpreter lives under /root; the system one can run the client.
    python = need("system python3", which("python3", "/usr/bin"))
    os.chmod(sockdir, 0o755)
    daemon = ScriptedDaemon(STATUS, HISTORY, PLAN)
    log = structlog.wrap_logger(structlog.PrintLogger(), processors=[LogCapture()])
    config = ControlConfig(socket=str(sockdir / "control.sock"), mode=0o666)
    server = ControlServer(config, daemon, log)
    await server.start()

    async def ctl(*argv: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            runuser, "-u", "nobody", "--", "env", f"PYTHONPATH={REPO}",
            "PYTHONDONTWRITEBYTECODE=1", python, "-m", "watchdogd.ctl",
            "--socket", server.path, *argv,
            cwd="/", stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    try:
        code, out, err = await ctl("status")
        if "ModuleNotFoundError" in err:
            pytest.skip(f"the system python cannot import watchdogd.ctl: {err.splitlines()[-1]}")
        assert code == 0, err
        assert "watching (all probes healthy)" in out
        code, out, err = await ctl("--yes", "failover", "--force")
        assert code == 1
        assert err.startswith("watchdogctl: failover: permission denied\n  you need to be root")
        assert daemon.commands == ["status"]
    finally:
        await server.stop()
