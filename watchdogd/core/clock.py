"""The clock that times leases and a fleet leader's authority.

``now()`` reads ``CLOCK_BOOTTIME`` where the platform has it: like ``time.monotonic()``
it never jumps with the wall clock, and unlike it (``CLOCK_MONOTONIC`` stops while the
host is suspended) it counts the time a host slept. etcd counts a lease's ttl in its own
time, so a watcher whose host slept past its lease must find its authority over when it
wakes, not "a moment ago renewed". Elsewhere it is ``time.monotonic``.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def _boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


now: Callable[[], float] = _boottime if hasattr(time, "CLOCK_BOOTTIME") else time.monotonic
