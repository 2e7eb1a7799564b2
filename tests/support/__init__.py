"""Shared test helpers: finding server binaries, free ports, running as a service user."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

REQUIRE = os.environ.get("WATCHDOGD_REQUIRE_INTEGRATION") == "1"


def need(what: str, path: str | None) -> str:
    """Return ``path`` or skip loudly (fail when WATCHDOGD_REQUIRE_INTEGRATION=1)."""
    if path and Path(path).exists():
        return path
    message = f"{what} not found: install it (see .ci/run) to run this test"
    if REQUIRE:
        pytest.fail(message + " [WATCHDOGD_REQUIRE_INTEGRATION=1]")
    pytest.skip(message)


def which(name: str, *extra_dirs: str) -> str | None:
    for d in extra_dirs:
        candidate = Path(d) / name
        if candidate.exists():
            return str(candidate)
    return shutil.which(name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
