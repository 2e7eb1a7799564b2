"""Database engines: one module per engine, each knowing one database.

An engine module ``watchdogd/engines/<name>.py`` defines::

    def validate(section: Section) -> Mapping[str, Any]   # extra keys of `database:`
    def create(db: DatabaseConfig, secrets: set[str]) -> Engine

and the engine name in config is the module name (``engine: postgres``).
Adding an engine is adding that module; nothing else changes.

Positions (``current_pos``, ``receive_pos``, ``replay_pos``) are integers an
engine can subtract to get a byte-like lag: PostgreSQL LSNs, Redis replication
offsets, MySQL binlog byte offsets. They are only compared within one cluster.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

from watchdogd.core.errors import WatchdogdError

if TYPE_CHECKING:
    from watchdogd.core.model import DatabaseConfig
    from watchdogd.core.section import Section


class EngineError(WatchdogdError):
    """A database operation failed; the message is one clear line."""


@dataclass(frozen=True)
class DbStatus:
    """What one probe of one database saw. ``None`` means 'not known / not applicable'."""

    # False when the server is a standby (in recovery / replica).
    is_primary: bool
    # Accepts writes right now (a primary not fenced read-only).
    writable: bool
    # Primary: its current write position. Standby: None.
    current_pos: int | None = None
    # Standby: last position received from the primary / replayed locally.
    receive_pos: int | None = None
    replay_pos: int | None = None
    # Standby: its replication link to the primary is up and recently heard from.
    streaming: bool | None = None
    # Standby: seconds since it last heard from the primary (None: never / unknown).
    last_receive_age: float | None = None
    # Standby: the replica's own rule for a silent link, read from the server: after
    # this many seconds without a word from the primary the replica itself gives the
    # link up (PostgreSQL wal_receiver_timeout, Redis repl-timeout, MySQL/MariaDB
    # slave_net_timeout). 0: never; None: not readable. Silence up to it is normal.
    link_timeout: float | None = None
    # Standby: seconds of replay lag as the standby measures it (0 when caught up).
    lag_seconds: float | None = None
    # Standby: replay is paused (PostgreSQL pg_wal_replay_pause()).
    replay_paused: bool | None = None
    # Short human text for status and logs.
    detail: str = ""


@dataclass(frozen=True)
class Divergence:
    """What the old primary holds that the new primary never got: the writes a
    rejoin throws away. ``lost == 0`` is the proof that a failover lost nothing."""

    # False: could not be computed; ``detail`` says why.
    known: bool
    # Amount in ``unit``; 0 = nothing diverged; None when not known.
    lost: int | None
    # "bytes" (PostgreSQL, Redis) or "transactions" (MySQL/MariaDB GTIDs).
    unit: str
    # GTID set difference / transaction ids where readable (capped; ``detail`` says so).
    items: tuple[str, ...] = ()
    # One line for humans.
    detail: str = ""

    @property
    def diverged(self) -> bool | None:
        """None when not known, else whether anything was lost."""
        if not self.known or self.lost is None:
            return None
        return self.lost > 0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Divergence:
        """The inverse of ``as_dict`` (journal replay); ``diverged`` is derived."""
        lost = data.get("lost")
        return cls(
            known=bool(data.get("known")),
            lost=int(lost) if lost is not None else None,
            unit=str(data.get("unit", "")),
            items=tuple(str(i) for i in data.get("items") or ()),
            detail=str(data.get("detail", "")),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "known": self.known,
            "diverged": self.diverged,
            "lost": self.lost,
            "unit": self.unit,
            "items": list(self.items),
            "detail": self.detail,
        }


# At most this many transaction ids / GTIDs are listed in Divergence.items.
DIVERGENCE_ITEMS_CAP = 100


class Engine(Protocol):
    """One database server. Every method is bounded by ``timeout`` (seconds) and
    raises EngineError with one clear line on failure; never hangs longer."""

    name: str

    async def status(self, timeout: float) -> DbStatus:
        """Health, role and replication position. Raises EngineError when unreachable."""
        ...

    async def stop_replication(self, timeout: float) -> str:
        """Standby: stop following the primary (idempotent). Returns what was done."""
        ...

    async def promote(self, timeout: float) -> str:
        """Standby: apply everything already received, become a writable primary,
        and verify it accepts a write. Idempotent: an already-promoted server is
        verified, not promoted again. Returns what was done."""
        ...

    async def fence(self, timeout: float) -> str:
        """Old primary: refuse writes from now on (read-only) and end client sessions.
        Idempotent. Returns what was done."""
        ...

    async def advise(self, outage_threshold: float, timeout: float) -> list[str]:
        """Settings of this server that would weaken the daemon's decisions (e.g. a
        standby that confirms a hung primary only after the outage threshold). One
        line each, naming the exact setting and the value that fixes it; the daemon
        logs them at start and after a reload."""
        ...

    # Rejoin: ``self`` is always the OLD primary (the node failed away from) and
    # ``new_primary`` the engine of the node failed over to.

    async def divergence(self, new_primary: Engine, timeout: float) -> Divergence:
        """What self wrote that new_primary never got. Read-only on both servers.
        Never raises for 'cannot tell' (``known=False``, ``detail`` says why);
        raises EngineError only when self is unreachable."""
        ...

    async def rejoin(self, new_primary: Engine, timeout: float) -> str:
        """Make self a replica of new_primary, throwing away what diverged (the
        daemon has already refused unless accepted). Idempotent: already a replica
        of it is verified and returned. Waits until the link is up. Returns what
        was done; EngineError with one clear line otherwise. An engine that cannot
        throw diverged writes away refuses with EngineError saying so, accepted or
        not: MySQL/MariaDB (SQL cannot take a committed transaction back) unless
        its ``rejoin_fallback: dump`` resyncs the server from the new primary."""
        ...

    async def distinct_from(self, new_primary: Engine, timeout: float) -> None:
        """EngineError when new_primary is this very server under another name (a VIP,
        localhost for 127.0.0.1): asked before the old primary is fenced for a rejoin.
        A server that cannot tell (it does not answer) is taken as distinct."""
        ...

    async def replica_of(self, new_primary: Engine, timeout: float) -> str:
        """Verification: a detail when self is a replica connected to new_primary
        (that very server, not just any primary) and has replayed up to
        new_primary's position read at the start of the call, waiting for that
        within ``timeout`` while it streams (a busy new_primary's current position
        is always ahead); EngineError saying why not otherwise, at once when it does
        not stream from new_primary. The daemon calls it in a loop until
        failover.rejoin_timeout."""
        ...

    async def close(self) -> None:
        """Release connections; never raises."""
        ...

    def on_connection_lost(self, callback: Callable[[], None] | None) -> None:
        """Call ``callback()`` as soon as the server or the network closes the probing
        connection (a crash does at once); never when the engine closes it itself."""
        ...


async def standby_reply_mark(
    engine: Engine, timeout: float, addresses: Sequence[str]
) -> float | None:
    """A value that grows with every reply the standby streaming from ``engine`` from
    one of ``addresses`` sends (PostgreSQL: the newest ``pg_stat_replication.reply_time``
    of a physical replication connection from there); None when it does not stream or
    the engine cannot tell (only PostgreSQL can today). The guard beside a primary
    reads it as a sign of life. Raises EngineError when unreachable."""
    probe: Callable[[float, Sequence[str]], Awaitable[float | None]] | None = getattr(
        engine, "standby_reply_mark", None
    )
    if probe is None:
        return None
    return await probe(timeout, addresses)


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def _module(name: str) -> ModuleType:
    if name not in available():
        raise KeyError(name)
    return importlib.import_module(f"{__name__}.{name}")


def validate_database(section: Section, engine: str) -> Mapping[str, Any]:
    """Called by config for each ``database:`` section: checks the engine name and
    lets the engine module read (and so accept) its extra keys."""
    try:
        module = _module(engine)
    except KeyError:
        section.error(f"unknown engine {engine!r}; known: {', '.join(available())}", "engine")
        return {}
    result: Mapping[str, Any] = module.validate(section)
    return result


def create(db: DatabaseConfig, secrets: set[str]) -> Engine:
    engine: Engine = _module(db.engine).create(db, secrets)
    return engine
