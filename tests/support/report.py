"""A pytest plugin: at the end of the run, the seconds the chaos matrix cells measured
(``record_property("seconds_<what>", ...)``), one line per cell, so a CI log shows the
fault→failover times per engine and profile.

Under pytest-xdist the controller never loads tests/chaos/conftest.py (only the
workers collect), so ``make test`` loads this with ``-p tests.support.report``; the
chaos conftest imports it too, for runs that name tests/chaos directly. It prints once.
"""

from __future__ import annotations

from typing import Any

import pytest

_PRINTED = pytest.StashKey[bool]()


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    if config.stash.get(_PRINTED, False):
        return
    config.stash[_PRINTED] = True
    rows = []
    for reports in terminalreporter.stats.values():
        for report in reports:
            if getattr(report, "when", None) != "call":
                continue
            for key, value in getattr(report, "user_properties", ()):
                if key.startswith("seconds_"):
                    test = report.nodeid.split("::")[-1]
                    rows.append((test, key.removeprefix("seconds_"), value))
    if rows:
        terminalreporter.section("chaos matrix: measured seconds from fault to event")
        for test, what, value in sorted(rows):
            terminalreporter.write_line(f"{test:<60} {what:<28} {value:7.1f}")
