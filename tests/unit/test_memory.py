"""Freed heap memory goes back to the kernel (watchdogd.core.memory), measured on a real
heap in a fresh interpreter: the soak's RSS drift was free memory inside glibc's arenas."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from typing import Any

import pytest

from watchdogd.core import memory

# Fragments the heap like a long run does: 40 MB in 4 kB blocks (above pymalloc's 512
# bytes, below malloc's mmap threshold: from the heap), every 50th kept so the free runs
# sit between live blocks and the heap's top cannot simply shrink on free().
FRAGMENT = """
import json, sys
from watchdogd.core import memory

def rss_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

blocks = [bytearray(4000) for _ in range(10_000)]
kept = blocks[::50]
del blocks
freed = rss_kb()
released = memory.release()
print(json.dumps({"released": released, "freed": freed, "after": rss_kb(), "kept": len(kept)}))
"""


def test_release_hands_the_freed_heap_back_to_the_kernel() -> None:
    done = subprocess.run(
        [sys.executable, "-c", FRAGMENT], capture_output=True, text=True, timeout=60, check=True
    )
    got = json.loads(done.stdout)
    if not got["released"]:
        pytest.skip("this C library has no malloc_trim (not glibc): nothing to release")
    # About 39 MB of the 40 were freed but stayed resident until release().
    assert got["freed"] - got["after"] > 20_000, got


async def test_release_periodically_keeps_releasing_until_cancelled() -> None:
    task = asyncio.create_task(memory.release_periodically(0.01))
    await asyncio.sleep(0.1)
    # Still looping after several periods on glibc (it stops only where nothing can be
    # released), and a cancel ends it.
    assert not task.done() or not memory.release()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# 20 MB in 100 kB blocks (under glibc's default 128 kB mmap threshold: from the heap),
# every 10th kept so the freed ones sit between live blocks.
LARGE = """
import json, sys
from watchdogd.core import memory

def rss_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

tuned = memory.tune() if sys.argv[1] == "tune" else False
blocks = [bytearray(100_000) for _ in range(200)]
kept = blocks[::10]
full = rss_kb()
del blocks
print(json.dumps({"tuned": tuned, "full": full, "after": rss_kb(), "kept": len(kept)}))
"""


def large_blocks(mode: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", LARGE, mode], capture_output=True, text=True, timeout=60, check=True
    )
    got: dict[str, Any] = json.loads(done.stdout)
    return got


def test_tuned_large_blocks_go_back_to_the_kernel_when_freed() -> None:
    tuned = large_blocks("tune")
    if not tuned["tuned"]:
        pytest.skip("this C library has no mallopt (not glibc): nothing to tune")
    # 18 of the 20 MB freed: with the fixed threshold each block was its own mapping.
    assert tuned["full"] - tuned["after"] > 12_000, tuned
    untuned = large_blocks("default")
    assert untuned["full"] - untuned["after"] < 4_000, untuned  # what tune() avoids
