"""``watchdogd demo`` as a user runs it: a real PostgreSQL pair, a real kill, the
five steps, the write accounting, and nothing left behind however it ends."""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.pg import require_pg_bin
from watchdogd import cli
from watchdogd.demo import run as demo
from watchdogd.demo.lab import pid_alive

DEMO = [sys.executable, "-m", "watchdogd.cli", "demo"]
FIVE = demo.FIVE_STEPS


def leftovers(lab: Path) -> list[str]:
    """Processes still alive from the lab: started in it (every PostgreSQL process
    has its data dir as cwd) or naming it on their command line."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or not pid_alive(int(entry.name)):
            continue
        try:
            cwd = os.readlink(entry / "cwd")
        except OSError:
            cwd = ""
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            cmd = ""
        if str(lab) in cwd or str(lab) in cmd:
            found.append(f"pid {entry.name}: {cmd.strip()} (cwd {cwd})")
    return found


def lab_of(output: str) -> Path:
    m = re.search(r"^lab: (\S+)$", output, re.M)
    assert m, f"no 'lab:' line in the output:\n{output}"
    return Path(m.group(1))


def postmaster_pids(output: str) -> list[int]:
    return [int(p) for p in re.findall(r"postgres pid (\d+)", output)]


def assert_clean(output: str) -> None:
    lab = lab_of(output)
    assert not lab.exists(), f"{lab} still exists"
    assert leftovers(lab) == []
    pids = postmaster_pids(output)
    assert len(pids) == 2, output
    assert not [p for p in pids if pid_alive(p)]


def test_kill_primary_scenario_loses_no_acknowledged_write() -> None:
    require_pg_bin()
    done = subprocess.run(
        [*DEMO, "--scenario", "kill-primary", "--threshold", "2s"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=90,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    counts = re.search(
        r"^writes: (\d+) attempted, (\d+) acknowledged, (\d+) of them found on the new "
        r"primary site-b \((\d+) lost\)",
        out,
        re.M,
    )
    assert counts, out
    attempted, acked, found, lost = map(int, counts.groups())
    # Writes were acknowledged on both sides of the failover, and every one is there.
    assert acked >= 2 * demo.WARM_WRITES and attempted > acked
    assert (found, lost) == (acked, 0)
    steps = re.findall(r"^\s+[+-][\d.]+s\s+ok (\w+)", out, re.M)
    assert tuple(steps) == FIVE, out
    assert "site-b database" not in out  # only the primary was touched
    assert re.search(r"^\s+\+0\.000s  site-a database killed \(SIGKILL\)$", out, re.M), out
    assert "failover address now routes to site-b" in out
    assert "first write acknowledged by site-b" in out
    assert_clean(out)


def _read_until(proc: subprocess.Popen[str], pattern: str, within: float, seen: list[str]) -> None:
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + within
    try:
        while time.monotonic() < deadline:
            if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                break
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if re.search(pattern, line):
                return
    finally:
        sel.close()
    pytest.fail(f"no line matching {pattern!r} within {within}s:\n{''.join(seen)}")


def test_sigint_during_the_interactive_demo_removes_everything() -> None:
    require_pg_bin()
    proc = subprocess.Popen(
        DEMO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    seen: list[str] = []
    try:
        _read_until(proc, r"^running; keys:", 30, seen)
        # Hang the primary first: a SIGSTOPped server must not survive the exit either.
        assert proc.stdin is not None
        proc.stdin.write("h\n")
        proc.stdin.flush()
        _read_until(proc, r"site-a database hung \(SIGSTOP\)", 10, seen)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    out = "".join(seen) + rest
    assert proc.returncode == 128 + signal.SIGINT, out
    assert "demo: SIGINT: stopping everything" in out
    assert f"removed {lab_of(out)}" in out
    assert_clean(out)


def test_without_postgresql_one_clear_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(demo, "find_pg_bin", lambda: None)
    assert cli.main(["demo", "--scenario", "kill-primary"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "PostgreSQL server binaries not found: apt-get install postgresql (or put initdb on PATH)\n"
    )


@pytest.mark.parametrize(
    ("threshold", "message"),
    [
        ("soon", "watchdogd demo: --threshold: expected a duration like 5s, got 'soon'\n"),
        (
            "500ms",
            "watchdogd demo: --threshold: must be at least the probe interval (1s), got '500ms'\n",
        ),
    ],
)
def test_bad_threshold_is_one_line(
    threshold: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["demo", "--threshold", threshold]) == 2
    assert capsys.readouterr().err == message
