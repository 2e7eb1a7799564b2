"""One place for how long a test waits on a real server.

Every wait against a real server (a daemon reaching a state, a replica catching up, a
server starting) takes its bound through :func:`within`. On a slow or loaded machine
set ``WATCHDOGD_TEST_SLACK`` (a factor, e.g. ``2``) to widen every such bound at once;
it never shrinks one (factors below 1 count as 1).
"""

from __future__ import annotations

import os

ENV = "WATCHDOGD_TEST_SLACK"


def slack() -> float:
    """The factor from ``WATCHDOGD_TEST_SLACK`` (at least 1; 1 when unset or unreadable)."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return 1.0
    try:
        factor = float(raw)
    except ValueError:
        raise ValueError(f"{ENV}={raw!r}: expected a number such as 2") from None
    return factor if factor > 1.0 else 1.0  # nan and anything below 1: no scaling


def within(seconds: float) -> float:
    """``seconds`` widened by the slack factor: the bound to wait for a real server."""
    return seconds * slack()
