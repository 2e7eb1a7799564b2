"""The live event feed behind ``watchdogctl events``: a bounded ring of the daemon's
recent events, and one bounded queue per follower (``--follow``).

``publish`` is a bus subscriber, so it runs inside every ``emit``: it only appends to
deques (never awaits, never waits for a reader), whatever the followers do. A follower
that falls behind loses its *oldest* queued events and is told how many it missed with
the next ones it takes; the control server disconnects one that stops reading.

What goes in: every event logged at info or above, and a probe's observation
(``probe_observed``, a debug line per probe per interval) when that probe starts failing
or recovers. Every observation would push everything else out of the ring in seconds,
and so would a dead node's failures, one per interval, long after the failover.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from watchdogd.core.events import Event, Level

RING = 100
QUEUE = 256


@dataclass(frozen=True)
class Item:
    """One event in the feed: ``seq`` counts from 1 per daemon process; ``at`` is the
    wall-clock time it was emitted."""

    seq: int
    at: float
    name: str
    level: str
    facts: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "at": self.at,
            "name": self.name,
            "level": self.level,
            "facts": self.facts,
        }


class Follower:
    """One ``--follow`` client's queue: at most ``limit`` items, the oldest dropped first."""

    def __init__(self, limit: int = QUEUE) -> None:
        self.limit = max(1, limit)
        self._queue: deque[Item] = deque()
        self._missed = 0
        self._ready = asyncio.Event()
        self.missed_total = 0

    def put(self, item: Item) -> None:
        if len(self._queue) >= self.limit:
            self._queue.popleft()
            self._missed += 1
            self.missed_total += 1
        self._queue.append(item)
        self._ready.set()

    def missed_before(self, n: int) -> None:
        self._missed += n
        self.missed_total += n
        if n:
            self._ready.set()

    def take_nowait(self) -> tuple[list[Item], int]:
        """Everything queued and how many were dropped before it; empties the queue."""
        items, missed = list(self._queue), self._missed
        self._queue.clear()
        self._missed = 0
        self._ready.clear()
        return items, missed

    async def take(self) -> tuple[list[Item], int]:
        """Wait until something is queued, then ``take_nowait()``."""
        while not self._queue and not self._missed:
            self._ready.clear()
            await self._ready.wait()
        return self.take_nowait()

    @property
    def queued(self) -> int:
        return len(self._queue)


class EventFeed:
    def __init__(
        self,
        wall: Callable[[], float] = time.time,
        *,
        ring: int = RING,
        queue: int = QUEUE,
    ) -> None:
        self.wall = wall
        self.queue = queue
        self._ring: deque[Item] = deque(maxlen=max(1, ring))
        self._followers: list[Follower] = []
        self.seq = 0
        # Each probe's last result: (target, probe) -> ok.
        self._probes: dict[tuple[str, str], bool] = {}

    @property
    def followers(self) -> int:
        return len(self._followers)

    def wanted(self, event: Event) -> bool:
        """Whether ``event`` goes into the feed (see the module docstring)."""
        if event.name == "probe_observed":
            key = (str(event.facts.get("target")), str(event.facts.get("probe")))
            ok = event.facts.get("ok") is True
            before = self._probes.get(key, True)  # a first failure is news, a first success not
            self._probes[key] = ok
            return ok is not before
        return event.level is not Level.DEBUG

    def publish(self, event: Event) -> None:
        """The bus subscriber."""
        if not self.wanted(event):
            return
        self.seq += 1
        item = Item(self.seq, self.wall(), event.name, event.level.value, _plain(event.facts))
        self._ring.append(item)
        for follower in self._followers:
            follower.put(item)

    def recent(self, n: int, after: int | None = None) -> list[Item]:
        """The last ``n`` events in the ring (only those after seq ``after``), oldest first."""
        items = [i for i in self._ring if after is None or i.seq > after]
        return items[-n:] if n > 0 else []

    def follow(self, after: int | None = None) -> Follower:
        """A new follower; it first gets the ring's events after seq ``after`` (none
        when ``after`` is None), so a client that read up to ``after`` misses nothing
        the ring still holds."""
        follower = Follower(self.queue)
        if after is not None:
            items = self.recent(len(self._ring), after)
            # Events after ``after`` that the ring no longer holds count as missed.
            first = items[0].seq if items else self.seq + 1
            gone = max(0, first - after - 1) if after < self.seq else 0
            for item in items:
                follower.put(item)
            follower.missed_before(gone)
        self._followers.append(follower)
        return follower

    def unfollow(self, follower: Follower) -> None:
        if follower in self._followers:
            self._followers.remove(follower)


def _plain(facts: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON-shaped copy of an event's facts: any other object becomes its ``str()``,
    so the control socket's masking (which walks strings, lists and mappings) sees it."""
    out: dict[str, Any] = {str(k): _value(v, 0) for k, v in facts.items()}
    return out


def _value(value: Any, depth: int) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if depth > 16:
        return "..."
    if isinstance(value, Mapping):
        return {str(k): _value(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_value(v, depth + 1) for v in value]
    try:
        return str(value)
    except Exception:
        return f"<{type(value).__name__}>"
