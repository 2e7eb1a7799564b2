"""``watchdogd demo --sites 3`` as a user runs it: three real etcd members, three
``watchdogd run`` watchers, a real PostgreSQL pair; one leader, one promotion counted
from the standby's own timeline, and nothing left behind however it ends."""

from __future__ import annotations

import base64
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_demo import lab_of, leftovers, postmaster_pids
from tests.support.etcd import etcd_binary
from tests.support.pg import require_pg_bin
from watchdogd import cli
from watchdogd.demo import sites
from watchdogd.demo.etcd import EtcdLab, EtcdMember
from watchdogd.demo.etcd import LabError as EtcdLabError
from watchdogd.demo.lab import pid_alive

DEMO = [sys.executable, "-m", "watchdogd.cli", "demo", "--sites", "3"]


def assert_clean(output: str) -> None:
    lab = lab_of(output)
    assert not lab.exists(), f"{lab} still exists"
    assert leftovers(lab) == []
    pids = postmaster_pids(output)
    assert len(pids) == 2, output
    assert not [p for p in pids if pid_alive(p)]


def _read_until(proc: subprocess.Popen[str], pattern: str, within: float, seen: list[str]) -> None:
    """Read the demo's output until a line matches ``pattern``. Raw reads of the pipe's
    descriptor: a buffered readline() would keep lines that select() cannot see."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + within
    pending = ""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(fd, 65536).decode(errors="replace")
        if not chunk:
            break
        pending += chunk
        *lines, pending = pending.split("\n")
        seen.extend(line + "\n" for line in lines)
        if any(re.search(pattern, line) for line in lines):
            seen.append(pending)
            return
    seen.append(pending)
    pytest.fail(f"no line matching {pattern!r} within {within}s:\n{''.join(seen)}")


def run_scenario(scenario: str, within: float) -> str:
    require_pg_bin()
    etcd_binary()
    done = subprocess.run(
        [*DEMO, "--scenario", scenario],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=within,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    return out


def test_kill_primary_site_one_leader_one_promotion() -> None:
    out = run_scenario("kill-primary", 60)
    ready = re.search(r"^fleet ready: (dc\d) leads, every voter fresh$", out, re.M)
    assert ready, out
    # Before the kill exactly one watcher says it leads, and the others name it.
    before = out[ready.end() : out.index("primary database killed")]
    assert len(re.findall(r"LEADER", before)) == 1, before
    assert re.search(r"^t=0\.0s site-a: primary database killed \(SIGKILL\)$", out, re.M), out
    promoted = re.search(r"^t=([\d.]+)s the standby is promoted", out, re.M)
    assert promoted, out
    # threshold 3 s + the five steps; far under a lease's length.
    assert float(promoted.group(1)) < 3.0 + 5.0, out
    assert re.search(r"^t=[\d.]+s traffic switched to site-b$", out, re.M), out
    assert "promotions (the standby's timeline): 1\n" in out
    # The leader elsewhere was never lost: the same watcher finished the failover.
    assert f"leaders agreeing: 1 ({ready.group(1)})" in out
    assert re.search(r"^failover \S+: completed by dc\d$", out, re.M), out
    assert out.count("demo: ok:") == 1
    assert_clean(out)


def test_kill_leader_site_with_the_primary_a_new_leader_promotes_once() -> None:
    out = run_scenario("kill-leader", 75)
    ready = re.search(r"^fleet ready: (dc\d) leads", out, re.M)
    assert ready, out
    old = ready.group(1)
    assert re.search(rf"^t=0\.0s site-\w: watcher {old} and etcd\d killed \(SIGKILL\)$", out, re.M)
    new = re.search(r"^leaders agreeing: 1 \((dc\d)\)$", out, re.M)
    assert new, out
    assert new.group(1) != old
    promoted = re.search(r"^t=([\d.]+)s the standby is promoted", out, re.M)
    assert promoted, out
    # Not before the dead leader's lease (15 s) could end; within ttl + threshold + slack.
    assert 10.0 < float(promoted.group(1)) < 15.0 + 3.0 + 8.0, out
    assert "promotions (the standby's timeline): 1\n" in out
    assert_clean(out)


def test_sigint_during_the_interactive_fleet_demo_removes_everything() -> None:
    require_pg_bin()
    etcd_binary()
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
        _read_until(proc, r"^running; keys:", 60, seen)
        assert proc.stdin is not None
        proc.stdin.write("l\n")
        proc.stdin.flush()
        _read_until(proc, r"watcher dc\d and etcd\d killed \(SIGKILL\)", 10, seen)
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


def test_interactive_k_fails_over_once_and_q_sums_up() -> None:
    require_pg_bin()
    etcd_binary()
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
        _read_until(proc, r"^running; keys:", 60, seen)
        assert proc.stdin is not None
        proc.stdin.write("k\n")
        proc.stdin.flush()
        _read_until(proc, r"site-a: primary database killed \(SIGKILL\)", 10, seen)
        # The view is printed again when it changes: the leader reports the failover.
        _read_until(proc, r"LEADER state failed_over", 30, seen)
        proc.stdin.write("q\n")
        proc.stdin.flush()
        rest, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    out = "".join(seen) + rest
    assert proc.returncode == 0, out
    assert "route: clients sent to site-b\n" in out
    assert "promotions (the standby's timeline): 1\n" in out
    assert_clean(out)


def test_without_etcd_one_clear_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sites, "find_pg_bin", lambda: "/usr/bin")
    monkeypatch.setattr(sites, "find_etcd", lambda: None)
    assert cli.main(["demo", "--sites", "3", "--scenario", "kill-primary"]) == 2
    assert capsys.readouterr().err == (
        "etcd not found: apt-get install etcd-server (or put etcd on PATH)\n"
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--sites", "2"], "watchdogd demo: --sites: only 3 is supported, got 2\n"),
        (
            ["--sites", "3", "--scenario", "hang-primary"],
            "watchdogd demo: --sites 3: unknown scenario 'hang-primary' "
            "(known: interactive, kill-primary, kill-leader)\n",
        ),
        (
            ["--scenario", "kill-leader"],
            "watchdogd demo: --scenario kill-leader needs --sites 3\n",
        ),
    ],
)
def test_bad_fleet_arguments_are_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["demo", *argv]) == 2
    assert capsys.readouterr().err == message


def test_lab_etcd_members_stop_die_and_come_back(tmp_path: Path) -> None:
    """The demo's etcd lab: a SIGSTOPped member stops answering and the others keep a
    quorum; a killed member restarts on its data and rejoins; close() leaves nothing."""
    etcd_binary()
    lab = EtcdLab.create(tmp_path / "etcd")
    try:
        one, two, three = lab.members
        pids = [m.pid for m in lab.members]
        put(lab, two, "k", "v1")
        one.sigstop()
        assert not one.healthy()
        put(lab, three, "k", "v2")  # two of three: still a quorum
        one.sigcont()
        lab.wait_healthy(10, [one])
        one.kill()
        assert not one.is_running()
        put(lab, two, "k", "v3")
        lab.restart("etcd1")
        assert one.is_running() and one.pid not in pids
        assert get(lab, one, "k") == "v3"  # caught up with what it missed
        with pytest.raises(EtcdLabError, match="no etcd member 'etcd9'"):
            lab.member("etcd9")
    finally:
        lab.close()
    assert not [p for p in pids if p is not None and pid_alive(p)]
    assert not any(m.is_running() for m in lab.members)


def _kv(member: EtcdMember, path: str, body: dict[str, str], timeout: float = 5) -> dict[str, Any]:
    req = urllib.request.Request(
        f"{member.client_url}/v3/kv/{path}", data=json.dumps(body).encode(), method="POST"
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        out: dict[str, Any] = json.loads(resp.read())
        return out


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def put(lab: EtcdLab, member: EtcdMember, key: str, value: str) -> None:
    """A write, retried for up to 20 s: a proposal the stopped leader had taken is lost,
    and etcd answers it only at its request timeout (about 7 s); a retry goes to the
    new leader."""
    deadline = time.monotonic() + 20
    while True:
        try:
            _kv(member, "put", {"key": _b64(key), "value": _b64(value)}, timeout=3)
            return
        except (OSError, TimeoutError):
            if time.monotonic() > deadline:
                raise


def get(lab: EtcdLab, member: EtcdMember, key: str) -> str:
    kvs = _kv(member, "range", {"key": _b64(key)}).get("kvs", [])
    return base64.b64decode(kvs[0]["value"]).decode() if kvs else ""
