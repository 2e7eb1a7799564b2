"""Probes: each checks one thing and returns an Observation; they never decide.

A probe is an object with ``name`` and ``async def check() -> Observation``; the
daemon bounds every call with ``probe.timeout`` on top of the probe's own
timeouts, so a hung peer costs one failed observation, never a stuck loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from watchdogd.engines import DbStatus


# Probes read at most this much of a reply: a health answer or a witness's vote is a few
# bytes, and a peer must not make the watcher buffer (or parse) megabytes every cycle.
MAX_BODY = 64 * 1024


class BodyTooLarge(Exception):
    pass


async def read_capped(content: Any, limit: int = MAX_BODY) -> bytes:
    """Read an aiohttp body up to ``limit`` bytes; BodyTooLarge beyond."""
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk: bytes = await content.read(limit + 1 - size)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"reply larger than {limit // 1024} KiB")


@dataclass(frozen=True)
class Observation:
    target: str  # node or witness name
    probe: str  # "database", "app" or "witness"
    ok: bool
    latency: float  # seconds
    detail: str
    at: float  # monotonic seconds (the daemon's clock)
    # Database probes: what the server reported (None when unreachable).
    db: DbStatus | None = None
    # Witness probes: the witness's vote on the primary (None: abstains).
    sees_primary: bool | None = None


class Probe(Protocol):
    target: str
    probe: str

    async def check(self) -> Observation: ...
