"""Where the fleet's views live: one ballot per watcher, on that watcher's own lease.

Each watcher publishes its view (``watchdogd.fleet.View``, encoded) every probe cycle;
the leader reads every ballot with one linearizable read and judges them
(``watchdogd.fleet.tally``). A watcher cut off from the store stops renewing its lease,
so its ballot disappears: an isolated watcher loses its vote.

``EtcdVoteBox`` keeps the ballots under ``<prefix>/views/<instance>`` (``prefix`` is the
cluster's, e.g. ``/watchdogd/<cluster>``), JSON values on the box's own lease of
``ttl`` seconds (rounded up, at least 1): granted at the first publish, renewed with a
keepalive by a publish when more than a third of the ttl passed since the last one, and
granted again when etcd says it is gone. A put always makes a new store revision, so an
identical view published again still counts as a sign of life. Store trouble is
``StoreUnavailable``. A value that is not a JSON object is skipped by ``ballots`` (a bad
peer never breaks the tally; ``problems`` says which); the leader decodes each ballot
with ``View.decode`` and skips the ones that fail.

``MemoryVoteBox`` is the same on a ``VirtualClock`` for property tests: ballots expire
``ttl`` after their last publish; ``unavailable`` makes every call raise
``StoreUnavailable``; boxes made with ``shared_with`` share one board (one store seen
by several watchers, each of which can be cut off on its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from watchdogd.core import clock as core_clock
from watchdogd.state.etcd import EtcdClient, Lease, LeaseNotFound
from watchdogd.state.store import StoreUnavailable, VirtualClock

# A ballot's instance name: short, no slash (it is a key's last part).
_MAX_NAME = 128


@dataclass(frozen=True)
class Ballot:
    instance: str
    data: dict[str, Any]
    revision: int  # the store's revision of this publish (etcd mod_revision)


class VoteBox(Protocol):
    async def publish(self, instance: str, data: Mapping[str, Any]) -> None: ...

    async def ballots(self) -> dict[str, Ballot]: ...

    async def close(self) -> None: ...


def _check_instance(instance: str) -> None:
    if not instance or "/" in instance or len(instance) > _MAX_NAME or not instance.isprintable():
        raise ValueError(
            f"vote box: instance name {instance[:_MAX_NAME]!r} must be 1-{_MAX_NAME} "
            "printable characters without '/'"
        )


def _encode(data: Mapping[str, Any]) -> bytes:
    try:
        return json.dumps(dict(data), sort_keys=True, separators=(",", ":"),
                          allow_nan=False).encode()  # fmt: skip
    except (TypeError, ValueError) as exc:
        raise ValueError(f"vote box: a view must be plain JSON ({exc})") from None


def _lease_ttl(ttl: float) -> int:
    if not math.isfinite(ttl) or ttl <= 0:
        raise ValueError(f"vote box: ttl must be a positive number of seconds, not {ttl!r}")
    return max(1, math.ceil(ttl))


# --------------------------------------------------------------------------- etcd


class EtcdVoteBox:
    """Ballots in etcd under ``<prefix>/views/``; this box's own views on its own lease."""

    def __init__(self, client: EtcdClient, prefix: str, ttl: float) -> None:
        self.client = client
        self.prefix = f"{prefix.rstrip('/')}/views/".encode()
        self.ttl = _lease_ttl(ttl)
        self.lease: Lease | None = None
        self.problems: list[str] = []  # why values were skipped by the last ballots()
        self._lock = asyncio.Lock()

    def key(self, instance: str) -> bytes:
        return self.prefix + instance.encode()

    async def publish(self, instance: str, data: Mapping[str, Any]) -> None:
        """Write this instance's view on the box's lease: the lease is granted if there
        is none, renewed when more than ttl/3 passed since its last renewal, granted anew
        when etcd says it is gone. ``StoreUnavailable`` when the store does not answer."""
        _check_instance(instance)
        value = _encode(data)
        async with self._lock:
            lease = await self._fresh_lease()
            try:
                await self.client.put(self.key(instance), value, lease=lease.id)
            except LeaseNotFound:
                # Gone between the keepalive and the put (expired, revoked): once more,
                # on a new lease.
                self.lease = None
                lease = await self._fresh_lease()
                try:
                    await self.client.put(self.key(instance), value, lease=lease.id)
                except LeaseNotFound as exc:  # a lease granted a moment ago: not an answer
                    self.lease = None
                    raise StoreUnavailable(f"etcd: a new lease vanished at once ({exc})") from None

    async def _fresh_lease(self) -> Lease:
        lease = self.lease
        if lease is not None and core_clock.now() - lease.last.sent_at > self.ttl / 3:
            try:
                await lease.renew()
            except LeaseNotFound:
                lease = self.lease = None
        if lease is None:
            lease = self.lease = await self.client.lease_grant(self.ttl)
        return lease

    async def ballots(self) -> dict[str, Ballot]:
        """Every published view, from one linearizable read of the prefix. Values that
        are not JSON objects, and keys that are no instance name, are skipped (named in
        ``problems``)."""
        result = await self.client.get_prefix(self.prefix)
        found: dict[str, Ballot] = {}
        problems: list[str] = []
        for kv in result.kvs:
            raw_name = kv.key[len(self.prefix) :]
            try:
                instance = raw_name.decode()
                _check_instance(instance)
            except (UnicodeDecodeError, ValueError):
                problems.append(f"key {kv.key[:200]!r} skipped: not an instance's view")
                continue
            try:
                data = json.loads(kv.value)
            except (ValueError, RecursionError):
                problems.append(f"view of {instance!r} skipped: not JSON")
                continue
            if not isinstance(data, dict):
                problems.append(f"view of {instance!r} skipped: not a JSON object")
                continue
            found[instance] = Ballot(instance, data, kv.mod_revision)
        self.problems = problems
        return found

    async def close(self) -> None:
        """Revoke the lease (its views go with it); best effort."""
        lease, self.lease = self.lease, None
        if lease is not None:
            with contextlib.suppress(StoreUnavailable, LeaseNotFound):
                await lease.revoke()


# --------------------------------------------------------------------------- memory


@dataclass
class _Board:
    revision: int = 0
    views: dict[str, tuple[dict[str, Any], int, float]] = field(default_factory=dict)


class MemoryVoteBox:
    """Ballots in memory on a ``VirtualClock``: a view expires ``ttl`` after its last
    publish. ``unavailable`` makes every call raise ``StoreUnavailable`` (this box cut
    off from the store); ``shared_with`` another box: the same board (store)."""

    def __init__(
        self,
        clock: VirtualClock,
        ttl: float,
        unavailable: bool = False,
        *,
        shared_with: MemoryVoteBox | None = None,
    ) -> None:
        self.clock = clock
        _lease_ttl(ttl)  # the same validation as etcd's
        self.ttl = float(ttl)
        self.unavailable = unavailable
        self._board: _Board = shared_with._board if shared_with is not None else _Board()
        self._mine: set[str] = set()

    def _check(self) -> None:
        if self.unavailable:
            raise StoreUnavailable("memory vote box unavailable (injected)")
        now = self.clock()
        board = self._board
        for name in [n for n, (_, _, expires) in board.views.items() if now >= expires]:
            del board.views[name]

    async def publish(self, instance: str, data: Mapping[str, Any]) -> None:
        _check_instance(instance)
        value = json.loads(_encode(data))
        self._check()
        board = self._board
        board.revision += 1
        board.views[instance] = (value, board.revision, self.clock() + self.ttl)
        self._mine.add(instance)

    async def ballots(self) -> dict[str, Ballot]:
        self._check()
        return {
            name: Ballot(name, json.loads(json.dumps(data)), revision)
            for name, (data, revision, _) in self._board.views.items()
        }

    async def close(self) -> None:
        """Drop this box's views, like a revoked lease; best effort: a box cut off from
        the store leaves them to expire."""
        if self.unavailable:
            return
        for name in self._mine:
            self._board.views.pop(name, None)
        self._mine.clear()
