"""Fixtures shared by unit tests: a real (small) filesystem, a control socket directory."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import REQUIRE, closed_port
from tests.support.fakes import open_dir, sockdir

__all__ = ["closed_port", "open_dir", "sockdir", "tiny_tmpfs"]


@pytest.fixture
def tiny_tmpfs() -> Iterator[Path]:
    """A real 12 KiB filesystem, to fill up for real (needs root and mount)."""
    mountpoint = Path(tempfile.mkdtemp(prefix="wd-tmpfs-"))
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=12k,mode=0700", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        mountpoint.rmdir()
        message = f"cannot mount a tmpfs to fill up ({done.stderr.strip()}): run as root"
        if REQUIRE:
            pytest.fail(message + " [WATCHDOGD_REQUIRE_INTEGRATION=1]")
        pytest.skip(message)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)
        mountpoint.rmdir()
