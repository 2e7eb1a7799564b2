"""`watchdogd run` refuses to start with one clear line and leaves nothing behind."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from watchdogd import cli
from watchdogd.state import journal


def config(tmp: Path, metrics_port: int = 0) -> Path:
    """metrics_port 0: the daemon listens on any free port (no test here scrapes it)."""
    db = "postgresql://x@127.0.0.1:{}/x"
    path = tmp / "watchdogd.yml"
    path.write_text(
        yaml.safe_dump(
            {
                "cluster": "c",
                "primary": {"name": "a", "database": {"engine": "postgres", "dsn": db.format(1)}},
                "standby": {"name": "b", "database": {"engine": "postgres", "dsn": db.format(2)}},
                "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
                "control": {"socket": str(tmp / "run" / "control.sock")},
                "state_dir": str(tmp / "state"),
            }
        )
    )
    return path


def run(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "watchdogd.cli", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_metrics_port_taken_is_one_line_and_cleans_up(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = run(config(tmp_path, taken.getsockname()[1]))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("watchdogd: metrics.listen: cannot listen on 127.0.0.1:")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "control.sock").exists()


def test_invalid_config_exits_2_with_path_named_lines(tmp_path: Path) -> None:
    path = tmp_path / "bad.yml"
    path.write_text("cluster: c\nprobe: {interval: soon}\n")
    result = run(path)
    assert result.returncode == 2
    assert "probe.interval: expected a duration like 5s, got 'soon'" in result.stderr
    assert "primary: is required" in result.stderr


# ------------------------------------------------------------------ the journal


def damaged_journal(state_dir: Path) -> list[str]:
    """A failover that promoted and failed (awaiting its ack), then a pause; the
    failover_finished line (4) damaged on disk."""
    j = journal.Journal(state_dir)
    for rec in (
        journal.sequence_started(
            "failover",
            id="F1",
            trigger="automatic",
            kind="failover",
            reason="down",
            from_node="a",
            to_node="b",
            steps=["promote"],
            at=1,
        ),
        journal.step_started(
            "failover", id="F1", step="promote", action="promote", attempt=1, at=2
        ),
        journal.step_finished(
            "failover", id="F1", step="promote", action="promote", outcome="ok", at=3
        ),
        journal.sequence_finished("failover", id="F1", outcome="failed", error="later step", at=4),
        journal.pause(reason="investigating", by="ops", at=5),
    ):
        j.append(rec)
    j.close()
    path = state_dir / "journal.jsonl"
    lines = path.read_text().splitlines()
    lines[3] = lines[3].replace('"outcome":"failed"', '"outcome":"fai1ed"')
    path.write_text("".join(line + "\n" for line in lines))
    return lines


def test_a_damaged_journal_refuses_start_with_one_line(tmp_path: Path) -> None:
    path = config(tmp_path)
    damaged_journal(tmp_path / "state")
    result = run(path)
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"watchdogd: journal {tmp_path / 'state' / 'journal.jsonl'} line 4 ")
    assert "watchdogd journal repair" in line
    assert not (tmp_path / "run" / "control.sock").exists()
    # Nothing was resumed or appended.
    assert len((tmp_path / "state" / "journal.jsonl").read_text().splitlines()) == 5


def test_an_unwritable_journal_refuses_start_with_one_line(
    tmp_path: Path, tiny_tmpfs: Path
) -> None:
    path = config(tmp_path)
    cfg = yaml.safe_load(path.read_text())
    cfg["state_dir"] = str(tiny_tmpfs)
    path.write_text(yaml.safe_dump(cfg))
    (tiny_tmpfs / "filler").write_bytes(b"\0" * 9000)  # the disk is (nearly) full
    result = run(path)
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"watchdogd: journal {tiny_tmpfs / 'journal.jsonl'} is not writable")
    assert "No space left on device" in line
    assert not (tmp_path / "run" / "control.sock").exists()


def test_journal_check_clean_and_damaged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = config(tmp_path)
    assert cli.main(["journal", "check", "--config", str(path)]) == 0
    assert "ok (0 lines" in capsys.readouterr().out
    damaged_journal(tmp_path / "state")
    assert cli.main(["journal", "check", "--config", str(path)]) == 1
    out = capsys.readouterr().out
    assert "journal.jsonl line 4: damaged line: checksum mismatch" in out
    assert "fai1ed" in out  # the line itself is shown
    assert "watchdogd journal repair" in out


def test_journal_repair_refuses_an_unsafe_drop_then_closes_it_deliberately(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = config(tmp_path)
    lines = damaged_journal(tmp_path / "state")
    jpath = tmp_path / "state" / "journal.jsonl"
    before = jpath.read_bytes()
    assert cli.main(["journal", "repair", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert "repair refused" in err and "failover F1 looks unfinished" in err
    assert jpath.read_bytes() == before  # nothing changed, no copy needed

    assert cli.main(["journal", "repair", "--config", str(path), "--close-unfinished"]) == 0
    out = capsys.readouterr().out
    (backup,) = [p for p in jpath.parent.iterdir() if p.name.endswith(".damaged")]
    assert (
        backup.read_bytes() == before and f"kept a copy of the damaged journal at {backup}" in out
    )
    assert f"dropped line 4 (checksum mismatch): {lines[3]!r}" in out
    assert "appended: failover_finished F1 failed" in out
    state = journal.Journal(tmp_path / "state").load()  # starts again
    assert state.damaged == [] and state.unfinished is None and state.paused
    fo = state.awaiting_ack
    assert fo is not None and fo.promoted and fo.outcome == "failed"
    assert cli.main(["journal", "check", "--config", str(path)]) == 0
    assert cli.main(["journal", "repair", "--config", str(path)]) == 0
    assert "nothing to repair" in capsys.readouterr().out


def test_journal_repair_refuses_while_the_daemon_holds_the_lock(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = config(tmp_path)
    damaged_journal(tmp_path / "state")
    holder = journal.Journal(tmp_path / "state")
    holder.lock()
    try:
        assert cli.main(["journal", "repair", "--config", str(path)]) == 1
    finally:
        holder.close()
    assert "stop it before repairing its journal" in capsys.readouterr().err
