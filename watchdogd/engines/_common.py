"""What every engine module shares: a password type that never shows, the
``host:port`` label of a server, the one way a database call is bounded and its
failure turned into a single EngineError line, and the connection template
(``ConnectionTemplate``) every engine class builds on."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast
from urllib.parse import SplitResult, urlsplit

from watchdogd.core.secrets import mask
from watchdogd.engines import Engine, EngineError

if TYPE_CHECKING:
    from watchdogd.core.section import Section

T = TypeVar("T")
C = TypeVar("C")
S = TypeVar("S", bound="ConnectionTemplate[Any]")


class Secret(str):
    """A password: compares and serialises like the string, never shows in a repr."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "'***'"


def validate_password(
    section: Section, dsn_password: Callable[[str], str | None]
) -> Mapping[str, Any]:
    """The ``password``/``password_file`` keys of a ``database:`` section, checked
    against a password written inside the DSN (also a secret; not both).
    ``dsn_password(dsn)`` returns the DSN's password or raises ValueError with a
    message that never repeats the DSN."""
    password = section.secret("password")
    # Config already read (and reported problems with) `dsn`; read it again for
    # its shape only, without repeating its ${VAR} errors.
    before = len(section.errors)
    dsn = section.raw("dsn")
    del section.errors[before:]
    if isinstance(dsn, str) and dsn:
        try:
            inline = dsn_password(dsn)
        except ValueError as exc:
            section.error(str(exc), "dsn")
        else:
            if inline:
                section.secrets.add(inline)
                if password:
                    section.error(
                        "give the password either in dsn or in password/password_file, not both",
                        "password",
                    )
    return {"password": Secret(password)} if password else {}


def split_dsn(
    dsn: str, schemes: tuple[str, ...], kind: str, example: str
) -> tuple[SplitResult, str, int | None]:
    """``urlsplit`` plus the checks every URL-style DSN shares (scheme, host, no query);
    returns the parts, the host and the port (None: the engine's default).
    A ValueError's message never repeats the DSN: it may hold a password."""
    try:
        parts = urlsplit(dsn.strip())
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"not a valid {kind} URL ({exc}); expected {example}") from None
    if parts.scheme not in schemes:
        raise ValueError(f"expected a URL like {example}, got scheme {parts.scheme or 'none'!r}")
    if not parts.hostname:
        raise ValueError(f"expected a host, e.g. {example}")
    if parts.query or parts.fragment:
        raise ValueError(f"query parameters are not supported; expected {example}")
    return parts, parts.hostname, port


def host_port(host: str, port: int) -> str:
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{port}"


def remaining(deadline: float) -> float:
    return max(deadline - asyncio.get_running_loop().time(), 0.001)


async def bounded(
    op: str,
    limit: float,
    body: Callable[[float], Awaitable[T]],
    line: Callable[[str], str],
    reason: Callable[[BaseException], str],
) -> T:
    """Run ``body(deadline)`` within ``limit`` seconds; every failure becomes one
    EngineError line (``line`` adds the engine and server and masks secrets)."""
    deadline = asyncio.get_running_loop().time() + limit
    try:
        async with asyncio.timeout(limit):
            return await body(deadline)
    except TimeoutError:
        raise EngineError(line(f"{op} timed out after {limit:g}s")) from None
    except EngineError:
        raise
    except Exception as exc:
        raise EngineError(line(f"{op}: {reason(exc)}")) from None


def confirm_within(outage_threshold: float) -> int:
    """The replica link timeout, in whole seconds, that lets a replica give up on a
    hung primary within the outage threshold: the threshold rounded down, at least
    one second (the granularity every engine's setting accepts)."""
    return max(1, int(outage_threshold))


def keepalive_for(link_timeout: int) -> int:
    """A keepalive period that keeps a healthy idle link from reaching ``link_timeout``:
    about a third of it (two keepalives may be lost), at least one second."""
    return max(1, link_timeout // 3)


class StreamWatch(asyncio.Protocol):
    """Stands between a stream transport and its driver's protocol, passing everything
    through, to tell at once when the peer closes the connection. For drivers that
    offer no such callback (redis-py, aiomysql): an idle connection is read by the
    event loop all the same, but the driver only looks at its next command."""

    def __init__(self, writer: asyncio.StreamWriter, lost: Callable[[], None]) -> None:
        self.transport = writer.transport
        self.inner: Any = self.transport.get_protocol()
        self.lost: Callable[[], None] | None = lost
        self.transport.set_protocol(self)

    def forget(self) -> None:
        """Before we close the connection ourselves: that is no loss."""
        self.lost = None

    def _fire(self) -> None:
        lost, self.lost = self.lost, None
        if lost is not None:
            asyncio.get_running_loop().call_soon(lost)  # after the driver saw it

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        self._fire()
        result: bool | None = self.inner.eof_received()
        return result

    def connection_lost(self, exc: Exception | None) -> None:
        self._fire()
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class ConnectionTemplate(ABC, Generic[C]):
    """How an engine talks to its server, written once; ``C`` is the driver's connection.

    Probing (``_probe``) reuses one lazily (re)opened connection, so idle probing
    costs one round trip. When a *reused* connection fails in a way ``_is_stale``
    calls dead (the server restarted, or fence() ended our session), the call is
    retried once on a fresh one; a fresh connection is never retried, and a refusal
    is never retried. Any failure drops the connection.

    Failover operations (``_admin``) run on a connection of their own, so a long
    promote never blocks a probe and vice versa, and one at a time per server: two
    concurrent promote() calls must not both see a standby and both promote, nor
    interleave their statements.

    Every call is bounded by ``limit`` (connect included) and fails as one
    EngineError line naming the engine and server, secrets masked.

    An engine supplies ``_open``, ``_discard`` (close without waiting on a hung
    server), ``_is_stale`` and ``_reason``; ``_reusable``, ``_prepare`` and
    ``_release`` are optional hooks."""

    def __init__(
        self, name: str, where: str, secrets: Iterable[str], *passwords: str | None
    ) -> None:
        self.name = name
        self.where = where
        self._secrets = set(secrets)
        self._secrets.update(p for p in passwords if p)
        self._conn: C | None = None  # the shared probing connection
        self._on_lost: Callable[[], None] | None = None
        self._stream_watch: StreamWatch | None = None
        self._probe_lock = asyncio.Lock()
        self._admin_lock = asyncio.Lock()

    # -- what an engine supplies

    @abstractmethod
    async def _open(self, deadline: float, limit: float) -> C:
        """A new connection, ready for use, within ``deadline`` (loop time)."""

    @abstractmethod
    async def _discard(self, conn: C) -> None:
        """Close ``conn`` at once, without a goodbye that could hang; never raises."""

    @abstractmethod
    def _is_stale(self, exc: BaseException) -> bool:
        """``exc`` means the connection is dead, as opposed to the server saying no."""

    @abstractmethod
    def _reason(self, exc: BaseException) -> str:
        """``exc`` as a short reason for the EngineError line."""

    def _reusable(self, conn: C) -> bool:
        """Whether the shared connection is worth trying (False: reopen at once)."""
        return True

    async def _prepare(self, conn: C, deadline: float, limit: float, *, fresh: bool) -> None:
        """Before each probe on the shared connection (``fresh``: just opened).
        A stale error raised here on a reused connection is retried like the probe's."""

    async def _release(self, conn: C, deadline: float) -> None:
        """After a failover operation succeeded: close its connection."""
        await self._discard(conn)

    def _watch(self, conn: C, lost: Callable[[], None]) -> None:
        """Call ``lost()`` when the server or the network closes ``conn`` (not when we
        do: ``_unwatch`` comes first). A driver without such a signal leaves it out."""

    def _unwatch(self, conn: C) -> None:
        """Forget ``_watch`` before we close ``conn`` ourselves."""
        if self._stream_watch is not None:
            self._stream_watch.forget()
            self._stream_watch = None

    def _watch_stream(self, writer: asyncio.StreamWriter | None, lost: Callable[[], None]) -> None:
        """``_watch`` for a driver built on asyncio streams: watch its transport."""
        self._stream_watch = StreamWatch(writer, lost) if writer is not None else None

    # -- connection loss

    def on_connection_lost(self, callback: Callable[[], None] | None) -> None:
        """Call ``callback()`` as soon as the probing connection is closed by the server
        or the network (a crash closes it at once), never when we close it. A hang
        sends no such signal; nor does a driver without one."""
        self._on_lost = callback

    def _connection_lost(self, conn: C) -> None:
        if conn is self._conn and self._on_lost is not None:
            self._on_lost()

    # -- the template

    def _line(self, message: str) -> str:
        return mask(f"{self.name} {self.where}: {message}", self._secrets)

    _remaining = staticmethod(remaining)

    async def _bounded(self, op: str, limit: float, body: Callable[[float], Awaitable[T]]) -> T:
        return await bounded(op, limit, body, self._line, self._reason)

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._unwatch(conn)
            await self._discard(conn)

    async def _probe(self, op: str, limit: float, query: Callable[[C, float], Awaitable[T]]) -> T:
        """``query(conn, deadline)`` on the shared probing connection."""

        async def body(deadline: float) -> T:
            async with self._probe_lock:
                try:
                    return await self._on_shared(deadline, limit, query)
                except BaseException:
                    await self._drop()
                    raise

        return await self._bounded(op, limit, body)

    async def _on_shared(
        self, deadline: float, limit: float, query: Callable[[C, float], Awaitable[T]]
    ) -> T:
        conn = self._conn
        if conn is not None and self._reusable(conn):
            try:
                await self._prepare(conn, deadline, limit, fresh=False)
                return await query(conn, deadline)
            except Exception as exc:
                if not self._is_stale(exc):
                    raise
        await self._drop()
        conn = self._conn = await self._open(deadline, limit)
        await self._prepare(conn, deadline, limit, fresh=True)
        result = await query(conn, deadline)
        # Watched once it is surely connected (some drivers connect on first use).
        self._watch(conn, lambda: self._connection_lost(conn))
        return result

    async def _admin(self, op: str, limit: float, action: Callable[[C, float], Awaitable[T]]) -> T:
        """``action(conn, deadline)`` on a connection of its own, one at a time."""

        async def body(deadline: float) -> T:
            async with self._admin_lock:
                conn = await self._open(deadline, limit)
                try:
                    result = await action(conn, deadline)
                except BaseException:
                    await self._discard(conn)
                    raise
                await self._release(conn, deadline)
                return result

        return await self._bounded(op, limit, body)

    def _peer(self: S, new_primary: object, op: str) -> S:
        """The rejoin partner as an engine of this same kind, and not this very server."""
        if not isinstance(new_primary, type(self)):
            kind = getattr(new_primary, "name", type(new_primary).__name__)
            raise EngineError(
                self._line(f"{op}: the new primary is a {kind} server, not {self.name}")
            )
        if new_primary is self or new_primary.where == self.where:
            raise EngineError(self._line(f"{op}: the new primary is this same server"))
        return new_primary

    async def _identity(self, timeout: float) -> str:
        """What tells this server from every other (per engine); EngineError when it
        cannot be read."""
        raise NotImplementedError

    async def _distinct_peer(self: S, new_primary: object, op: str, timeout: float) -> S:
        """``_peer``, and not the same server under another name either: a DSN that is a
        VIP or DNS name now pointing at the new primary, or localhost for 127.0.0.1,
        would make every destructive rejoin step act on the new primary itself. An old
        primary that does not answer is not the new primary (which answers)."""
        new = self._peer(new_primary, op)
        try:
            mine = await self._identity(timeout / 2)
            theirs = await new._identity(timeout / 2)
        except EngineError:
            return new
        if mine == theirs:
            raise EngineError(
                self._line(f"{op}: {self.where} and {new.where} are the same server ({mine})")
            )
        return new

    async def distinct_from(self, new_primary: object, timeout: float) -> None:
        """EngineError when ``new_primary`` is this very server (see ``_distinct_peer``):
        checked before the old primary is fenced for a rejoin, so that a DSN reaching
        the new primary never makes it read-only."""
        await self._distinct_peer(new_primary, "fence before rejoin", timeout)

    async def _replica_target(
        self: S, new_primary: object, timeout: float, what: str = "a primary"
    ) -> tuple[S, int, float]:
        """The start of ``replica_of``: the new primary, its current position (read now:
        the target to replay up to) and the call's deadline (loop time)."""
        new = self._peer(new_primary, "replica_of")
        deadline = asyncio.get_running_loop().time() + timeout
        theirs = await cast(Engine, new).status(timeout)
        if not theirs.is_primary or theirs.current_pos is None:
            raise EngineError(self._line(f"replica_of: {new.where} is not {what}"))
        return new, theirs.current_pos, deadline

    async def _caught_up(
        self,
        deadline: float,
        target: int,
        applied: Callable[[C, float], Awaitable[int | None]],
        behind: Callable[[int | None], str],
        poll: float = 0.1,
    ) -> int:
        """The verification's wait (``replica_of``): the query ``applied`` (the replica's
        applied position, read after checking that it streams from the new primary,
        raising EngineError at once when it does not) again and again until it reaches
        ``target``, the new primary's position read at the start of the call. A busy
        new primary moves on meanwhile: a replica that streams and applies reaches a
        position read earlier, however steadily it stays behind the current one.
        ``behind(applied)`` is the EngineError line when ``deadline`` comes first.
        Returns the position reached."""
        loop = asyncio.get_running_loop()
        while True:
            position = await self._probe("replica_of", self._remaining(deadline), applied)
            if position is not None and position >= target:
                return position
            if loop.time() + poll >= deadline:
                raise EngineError(self._line(f"replica_of: {behind(position)}"))
            await asyncio.sleep(poll)

    async def _until(
        self,
        op: str,
        deadline: float,
        check: Callable[[], Awaitable[str | None]],
        poll: float = 0.05,
    ) -> None:
        """Call ``check()`` until it returns None (done); it returns why not yet, which
        becomes the EngineError line when ``deadline`` (loop time) comes first."""
        loop = asyncio.get_running_loop()
        while True:
            why = await check()
            if why is None:
                return
            if loop.time() + poll >= deadline:
                raise EngineError(self._line(f"{op}: {why}"))
            await asyncio.sleep(poll)

    async def close(self) -> None:
        """Release the probing connection; never raises."""
        await self._drop()
