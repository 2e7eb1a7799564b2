"""The state-store seam: where durable records live, behind three verbs.

- ``append(token, record)``: write one record, guarded by a token; the record's
  position comes back. The write lands only while ``token`` still holds; otherwise
  ``TokenLost`` (an explicit refusal, the only "lost"). ``StoreUnavailable`` means the
  store gave no answer (``maybe_applied``: the write may have landed all the same);
  it never means lost.
- ``entries(after)``: the records after a position, in order (``replay`` folds them into
  a ``JournalState`` with the journal's own ``apply``).
- ``watch(after)``: the records appended after a position, as they come.

Two stores implement it today: ``LocalJournalStore``, the fsync'd local journal (one
writer, guaranteed by the state_dir's lock: its token is ``LOCAL``), and
``MemoryStore``, an in-memory store with leadership on a ``VirtualClock`` and injected
faults, for property tests of leadership, votes and resume without sockets or sleeps.
A consensus store on ``watchdogd.state.etcd`` is the next (issue 12): its token is the
leader key's ``create_revision``, ``append`` one transaction comparing it.

``Leadership`` is the other half a fleet needs: ``campaign`` (create the leader key if
absent, on a lease of ``ttl``), ``renew``, ``resign``, ``leader``. The local store has no
leadership (it is the only writer); ``MemoryStore`` models it the way etcd behaves: the
leader key dies with its lease, a new leader gets a larger token.

Nothing here changes how the daemon journals today: it still writes through
``Journal.append`` (``LocalJournalStore`` writes the very same bytes through it).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from watchdogd.core.errors import WatchdogdError
from watchdogd.state.journal import (
    Journal,
    JournalDamaged,
    JournalState,
    apply,
    decode_line,
)


class StoreUnavailable(WatchdogdError):
    """The store gave no usable answer: never a sign that anything was lost.

    ``maybe_applied`` is true when a write may have taken effect all the same (an
    attempt reached a server and its answer was lost or ambiguous)."""

    def __init__(self, message: str, *, maybe_applied: bool = False) -> None:
        super().__init__(message)
        self.maybe_applied = maybe_applied


class TokenLost(WatchdogdError):
    """The store refused a guarded write: the token no longer holds (another leader,
    or the lease ended). The only answer that means "lost"."""


@dataclass(frozen=True)
class Token:
    """Who may write: the holder's name and a fencing number that only grows from one
    leader to the next (etcd: the leader key's ``create_revision``)."""

    holder: str
    revision: int


LOCAL = Token("local", 0)

Entry = tuple[int, dict[str, Any]]  # (position, record); positions only grow


class RecordStore(Protocol):
    async def append(self, token: Token, record: Mapping[str, Any]) -> int: ...

    async def entries(self, after: int = 0) -> list[Entry]: ...

    def watch(self, after: int = 0) -> AsyncIterator[Entry]: ...


class Leadership(Protocol):
    async def campaign(self, holder: str, ttl: float) -> Token | None: ...

    async def renew(self, token: Token) -> float: ...

    async def resign(self, token: Token) -> None: ...

    async def leader(self) -> Token | None: ...


async def replay(store: RecordStore) -> JournalState:
    """Every record of ``store`` folded into a state, with the journal's own ``apply``."""
    return fold_entries(await store.entries())


def fold_entries(entries: Iterable[Entry]) -> JournalState:
    """Records read from a store folded into a state; one that does not apply is left
    out, with a problem line naming its position."""
    state = JournalState()
    for position, record in entries:
        try:
            apply(state, record)
        except (ValueError, KeyError, TypeError, OverflowError) as exc:
            state.problems.append(f"record at {position} ignored: {exc}")
    return state


class _Notifying:
    """``watch`` for a store that calls ``_notify()`` after each append."""

    _changed: asyncio.Event

    async def entries(self, after: int = 0) -> list[Entry]:
        raise NotImplementedError

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def watch(self, after: int = 0) -> AsyncIterator[Entry]:
        while True:
            changed = self._changed
            for entry in await self.entries(after):
                after = entry[0]
                yield entry
            await changed.wait()


# --------------------------------------------------------------------------- local


class LocalJournalStore(_Notifying):
    """The local journal behind the seam. Positions are record numbers (1-based); the one
    token is ``LOCAL`` (the state_dir's flock makes this daemon the only writer).
    ``append`` is ``Journal.append`` (same bytes, same fsync, same ``JournalWriteError``)."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self._count: int | None = None
        self._changed = asyncio.Event()

    async def append(self, token: Token, record: Mapping[str, Any]) -> int:
        if token != LOCAL:
            raise TokenLost(f"the local journal takes only its own token, not {token}")
        if self._count is None:
            self._count = len(self._lines())
        self.journal.append(dict(record))
        self._count += 1
        self._notify()
        return self._count

    async def entries(self, after: int = 0) -> list[Entry]:
        lines = self._lines()
        self._count = len(lines)
        return [(n, record) for n, record in enumerate(lines, 1) if n > after]

    def _lines(self) -> list[dict[str, Any]]:
        """The journal's records; a damaged line before the end refuses, as at start
        (``Journal.load``); a torn last line was never acted on and is left out."""
        data, state = self.journal.read()
        inner = [d for d in state.damaged if not d.last]
        if inner:
            raise JournalDamaged(
                f"journal {self.journal.path} line {inner[0].line} is damaged ({inner[0].reason})"
            )
        # Lines the replay found sound decode as they are (a line without a checksum
        # after lines with one was counted damaged there).
        damaged = {d.line for d in state.damaged}
        text = data.decode("utf-8", "surrogateescape").split("\n")
        return [
            decode_line(line)
            for number, line in enumerate(text, 1)
            if line.strip() and number not in damaged
        ]


# --------------------------------------------------------------------------- memory


class VirtualClock:
    """Time that moves only when told to (``advance``): leases expire on it."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start

    def __call__(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a virtual clock does not go back")
        self._now += seconds


@dataclass
class _Leader:
    token: Token
    ttl: float
    expires: float


@dataclass
class MemoryStore(_Notifying):
    """Records and leadership in memory, on a virtual clock, with faults to inject:
    ``unavailable`` (every call raises ``StoreUnavailable``), ``ambiguous_appends``
    (that many next appends land, then raise ``StoreUnavailable(maybe_applied=True)``,
    like a reply lost after the commit) and ``ambiguous_campaigns`` (the same for
    campaigns: the key is created on a lease nobody renews, so it blocks every campaign
    until it expires). Positions are store revisions, shared with leadership changes:
    they grow but skip, as etcd's do."""

    clock: VirtualClock = field(default_factory=VirtualClock)
    unavailable: bool = False
    ambiguous_appends: int = 0
    ambiguous_campaigns: int = 0
    revision: int = 0
    _leader: _Leader | None = None
    _entries: list[Entry] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def _check(self) -> None:
        if self.unavailable:
            raise StoreUnavailable("memory store unavailable (injected)")
        if self._leader is not None and self.clock() >= self._leader.expires:
            self._leader = None  # the lease ran out: the key goes with it

    def _current(self, token: Token) -> _Leader:
        if self._leader is None or self._leader.token != token:
            now = self._leader.token if self._leader else None
            raise TokenLost(f"token {token} no longer holds (leader: {now})")
        return self._leader

    async def campaign(self, holder: str, ttl: float) -> Token | None:
        self._check()
        if self._leader is not None:
            return None
        self.revision += 1
        token = Token(holder, self.revision)
        self._leader = _Leader(token, ttl, self.clock() + ttl)
        if self.ambiguous_campaigns > 0:
            self.ambiguous_campaigns -= 1
            raise StoreUnavailable(
                "memory store: campaign reply lost (injected)", maybe_applied=True
            )
        return token

    async def renew(self, token: Token) -> float:
        self._check()
        leader = self._current(token)
        leader.expires = self.clock() + leader.ttl
        return leader.expires

    async def resign(self, token: Token) -> None:
        self._check()
        if self._leader is not None and self._leader.token == token:
            self._leader = None
            self.revision += 1

    async def leader(self) -> Token | None:
        self._check()
        return self._leader.token if self._leader else None

    def held(self) -> tuple[Token, float] | None:
        """The leader's token and when its lease ends on the clock (None: no leader), as
        the store itself knows it: what a test compares a holder's own belief and deadline
        with. Not a store verb: injected faults do not apply."""
        if self._leader is None or self.clock() >= self._leader.expires:
            return None
        return self._leader.token, self._leader.expires

    async def append(self, token: Token, record: Mapping[str, Any]) -> int:
        self._check()
        self._current(token)
        self.revision += 1
        self._entries.append((self.revision, dict(record)))
        self._notify()
        if self.ambiguous_appends > 0:
            self.ambiguous_appends -= 1
            raise StoreUnavailable("memory store: reply lost (injected)", maybe_applied=True)
        return self.revision

    async def entries(self, after: int = 0) -> list[Entry]:
        self._check()
        return [(p, dict(r)) for p, r in self._entries if p > after]
