"""The installed ``watchdogctl`` against the daemon as a real process over a real
PostgreSQL pair: what an operator types, what they read, and the exit codes
scripts rely on (0 done, 1 refused, 2 usage error, 3 cannot reach the daemon)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from tests.support.daemon import DaemonProcess, ctl, lab_config
from watchdogd.demo.lab import PgPair

Factory = Callable[..., DaemonProcess]


def row(text: str, key: str) -> str:
    """The value of a ``key  value`` line of the status view."""
    for line in text.splitlines():
        if line.startswith(key + " "):
            return line[len(key) :].strip()
    raise AssertionError(f"no {key!r} row in:\n{text}")


async def test_operator_session_on_a_healthy_pair(
    pg_pair: PgPair, daemon_factory: Factory, tmp_path: Path
) -> None:
    cfg = lab_config(pg_pair, tmp_path, threshold="2s")
    d = daemon_factory(cfg)
    await d.start()
    await d.wait_state("watching")
    sock = ["--socket", d.socket]

    r = await ctl(*sock, "status")
    assert r.code == 0, r
    assert row(r.out, "cluster") == "orders"
    assert row(r.out, "state").startswith("watching")
    assert row(r.out, "mode") == "automatic, armed"
    assert row(r.out, "roles") == "primary main, standby failover"
    assert row(r.out, "last failover") == "none" and row(r.out, "awaiting ack") == "no"
    table = r.out.split("\n\n")[1].splitlines()
    assert table[0].split() == ["NODE", "ROLE", "DATABASE", "WRITABLE", "APP"]
    main, failover = table[1].split(), table[2].split()
    assert main[:3] == ["main", "primary", "ok"] and main[3].endswith("ms)")  # ok (3ms)
    assert failover[:3] == ["failover", "standby", "ok"]
    assert main[-2:] == ["yes", "-"] and failover[-2:] == ["no", "-"]

    # The socket from the environment; the raw result as JSON.
    r = await ctl("status", "--json", env={"WATCHDOGD_SOCKET": d.socket})
    assert r.code == 0, r
    status = json.loads(r.out)
    assert status["state"] == "watching" and status["roles"]["primary"] == "main"

    r = await ctl(*sock, "failover", "--yes")
    assert r.code == 1, r
    assert r.out == ""
    assert r.err.startswith(
        "watchdogctl: failover: failover refused: the primary is healthy: use switchover"
    )
    assert len(r.err.splitlines()) == 1

    r = await ctl(*sock, "failover", "--dry-run", "--force")
    assert r.code == 0, r
    lines = r.out.splitlines()
    assert lines[0].startswith("dry run (nothing was changed): failover ")
    assert lines[0].endswith("(manual), main -> failover")
    assert "  1. stop_replication [stop_replication]" in lines[2]
    assert "  2. promote_standby [promote]" in r.out and "node: failover" in r.out

    r = await ctl(*sock, "history", "-n", "0")
    assert r.code == 2, r
    assert r.err == "watchdogctl: history: argument 'n' must be from 1 to 1000, got 0\n"

    r = await ctl(*sock, "pause", "--reason", "db upgrade")  # not a terminal: no prompt
    assert r.code == 0, r
    assert "paused: yes" in r.out and "reason: db upgrade" in r.out
    r = await ctl(*sock, "status")
    assert row(r.out, "paused") == "yes: db upgrade"
    assert row(r.out, "mode") == "automatic, NOT armed"
    assert (await ctl(*sock, "resume")).code == 0
    r = await ctl(*sock, "resume")
    assert (r.code, r.err) == (1, "watchdogctl: resume: automatic failover is not paused\n")

    r = await ctl("--socket", str(tmp_path / "nothing.sock"), "status")
    assert r.code == 3, r
    assert r.err.startswith(f"watchdogctl: cannot reach watchdogd at {tmp_path}/nothing.sock")
    assert "is watchdogd running" in r.err

    assert [x["type"] for x in d.journal()] == ["pause", "resume"]
    assert pg_pair.standby.is_in_recovery()


async def test_operator_reads_history_and_acks_after_a_failover(
    pg_pair: PgPair, daemon_factory: Factory, tmp_path: Path
) -> None:
    cfg = lab_config(pg_pair, tmp_path, threshold="1s")
    d = daemon_factory(cfg)
    await d.start()
    await d.wait_state("watching")
    pg_pair.primary.kill()
    status = await d.wait_state("failed_over", within=15)
    fid = status["last_failover"]["id"]
    sock = ["--socket", d.socket]

    r = await ctl(*sock, "status")
    assert r.code == 0, r
    assert row(r.out, "state").startswith("failed_over (failed over from main to failover")
    assert row(r.out, "mode") == "automatic, NOT armed"
    assert row(r.out, "roles") == "primary failover, standby main"
    assert row(r.out, "last failover").startswith(f"{fid}: automatic, completed, main -> failover")
    assert row(r.out, "awaiting ack") == "YES (watchdogctl ack)"

    r = await ctl(*sock, "history")
    assert r.code == 0, r
    lines = r.out.splitlines()
    assert lines[0].startswith(f"{fid}: automatic, completed, main -> failover")
    assert lines[2].split() == ["STEP", "AT", "OUTCOME", "TOOK", "ATTEMPTS", "DETAIL"]
    assert lines[3].split()[0] == "stop_replication" and lines[3].split()[2] == "ok"
    assert lines[4].split()[0] == "promote_standby" and "promoted to primary" in lines[4]

    r = await ctl(*sock, "ack", "--yes")
    assert r.code == 0, r
    assert f"acked: {fid}" in r.out
    r = await ctl(*sock, "ack", "--yes")
    assert r.code == 1 and "nothing to acknowledge" in r.err
