"""`watchdogd run` refuses to start with one clear line and leaves nothing behind."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import yaml


def config(tmp: Path, metrics_port: int) -> Path:
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
