"""Giving freed heap memory back to the kernel, so a daemon that runs for months stays flat.

Objects above 512 bytes (log lines, replies, /metrics expositions, driver buffers) come
from glibc's malloc, which keeps what was freed: a free chunk in the middle of the heap
stays resident once touched, and the free space grows slowly with fragmentation. The
soak (``bench/idle.py --soak``) measured it: the C heap in use flat, RSS still up about
1 MB per 10,000 cycles, all of it free memory inside malloc's arenas. glibc's
``malloc_trim(0)`` hands every free page of every arena back to the kernel; it takes
well under a millisecond here; ``tune()`` keeps large buffers out of the heap so that
fragmentation does not grow. Where they do not exist (musl, macOS) nothing is done.
"""

from __future__ import annotations

import asyncio

# Often enough that free pages never pile up for long; rarely enough to cost nothing.
RELEASE_EVERY = 60.0
# Blocks this large get their own mapping, unmapped on free. glibc starts at 128 kB and
# raises the threshold (up to 32 MB) each time such a block is freed, after which driver
# and HTTP buffers are carved from the heap and fragment it: the soak measured 3.8 MB
# free inside the arenas and growing; with a fixed 64 kB, 0.9 MB and flat.
MMAP_THRESHOLD = 64 * 1024
_M_MMAP_THRESHOLD = -3  # malloc.h; setting it also turns the dynamic threshold off


def tune() -> bool:
    """Fix malloc's mmap threshold (see MMAP_THRESHOLD); False where it cannot."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def release() -> bool:
    """Return free heap pages to the kernel; False where the C library cannot."""
    import ctypes  # only here: most runs never need it before the first release

    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    trim(0)
    return True


async def release_periodically(period: float = RELEASE_EVERY) -> None:
    """Run ``release()`` every ``period`` seconds until cancelled."""
    while True:
        await asyncio.sleep(period)
        if not release():
            return  # nothing to call on this C library; do not ask again
