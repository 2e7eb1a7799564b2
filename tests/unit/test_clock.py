"""Leases and a fleet leader's authority are timed on CLOCK_BOOTTIME (watchdogd.core.clock):
a host that slept past its lease must wake with its authority over, as etcd counts it."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from tests.unit.test_fleet_daemon import raw
from watchdogd import config
from watchdogd.core import clock
from watchdogd.daemon.lifecycle import Daemon


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="CLOCK_BOOTTIME is Linux's")
def test_the_clock_is_boottime_on_linux() -> None:
    before = time.clock_gettime(time.CLOCK_BOOTTIME)
    now = clock.now()
    after = time.clock_gettime(time.CLOCK_BOOTTIME)
    assert before <= now <= after


def test_the_daemon_times_its_authority_on_that_clock(tmp_path: Path) -> None:
    d = Daemon(config.parse(raw(tmp_path, "dc1", tmp_path / "steps.log")))
    try:
        assert d.clock is clock.now
    finally:
        d.journal.close()
