"""PostgreSQL engine (asyncpg): status, stop_replication, promote and fence.

Owns everything the daemon knows about PostgreSQL: the ``database:`` keys for
it (``password`` / ``password_file``, merged into the DSN at connect time), the
one-round-trip status query, and the failover operations with their
verifications. Every call is bounded three ways: ``timeout=`` on connect and on
each query, ``statement_timeout`` on the server (so a query we gave up on does
not keep running there), and ``asyncio.timeout`` around the whole method. Any
failure drops the connection and becomes one EngineError line with the DSN's
password masked and no secret in it.

Probing (``status``, ``setting``) reuses one lazily (re)opened connection so
idle probing costs one round trip; the failover operations use a connection of
their own, so a long promote never blocks a probe and vice versa.

The role needs superuser, or: pg_monitor (pg_stat_wal_receiver details,
primary_conninfo), EXECUTE on pg_promote / pg_wal_replay_resume / pg_reload_conf,
ALTER SYSTEM on primary_conninfo and default_transaction_read_only, and
pg_signal_backend (the README has the GRANT lines).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import SplitResult, urlsplit, urlunsplit

import asyncpg

from watchdogd.engines import DbStatus, EngineError
from watchdogd.engines._common import ConnectionTemplate, confirm_within, validate_password

if TYPE_CHECKING:
    from watchdogd.core.model import DatabaseConfig
    from watchdogd.core.section import Section

# Errors meaning "this connection is dead", as opposed to "the server said no":
# a reused connection failing this way is retried once on a fresh one (the
# server restarted, or fence() ended our session).
_STALE = (
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.InterfaceError,
    asyncpg.AdminShutdownError,
    # A session the server ended (fence terminates every client, our probing one
    # too) can surface as this while asyncpg is still catching up with the FATAL.
    asyncpg.InternalClientError,
    ConnectionError,
)

STATUS_SQL = """
SELECT
  r.in_recovery,
  current_setting('default_transaction_read_only') AS read_only,
  CASE WHEN NOT r.in_recovery THEN pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0') END
    AS current_pos,
  pg_wal_lsn_diff(pg_last_wal_receive_lsn(), '0/0') AS receive_pos,
  pg_wal_lsn_diff(pg_last_wal_replay_lsn(), '0/0') AS replay_pos,
  CASE WHEN r.in_recovery THEN pg_is_wal_replay_paused() END AS replay_paused,
  w.pid AS receiver_pid,
  w.status AS receiver_status,
  EXTRACT(EPOCH FROM clock_timestamp() - w.last_msg_receipt_time)::float8 AS receive_age,
  CASE WHEN r.in_recovery THEN current_setting('wal_receiver_timeout') END AS receiver_timeout,
  CASE
    WHEN NOT r.in_recovery THEN NULL
    WHEN pg_last_wal_receive_lsn() IS NULL
      OR pg_last_wal_replay_lsn() >= pg_last_wal_receive_lsn() THEN 0
    ELSE EXTRACT(EPOCH FROM clock_timestamp() - pg_last_xact_replay_timestamp())::float8
  END AS lag_seconds
FROM (SELECT pg_is_in_recovery() AS in_recovery) AS r
LEFT JOIN pg_stat_wal_receiver AS w ON true
"""


# --------------------------------------------------------------------------- module contract


def validate(section: Section) -> Mapping[str, Any]:
    """Extra keys of a ``database:`` section with ``engine: postgres``."""
    return validate_password(section, _dsn_password)


def _dsn_password(dsn: str) -> str | None:
    problem = _dsn_problem(dsn)
    if problem:
        raise ValueError(problem)
    return urlsplit(dsn).password


def create(db: DatabaseConfig, secrets: set[str]) -> PostgresEngine:
    password = db.options.get("password")
    return PostgresEngine(db.dsn, password=str(password) if password else None, secrets=secrets)


def _dsn_problem(dsn: str) -> str | None:
    try:
        parts = urlsplit(dsn)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        return f"not a valid PostgreSQL URL ({exc})"
    if parts.scheme not in ("postgres", "postgresql"):
        return (
            f"expected a URL like postgresql://user@host:5432/dbname, "
            f"got scheme {parts.scheme or 'none'!r}"
        )
    if not parts.hostname and "host=" not in parts.query:
        return "expected a host, e.g. postgresql://user@host:5432/dbname"
    return None


def mask_dsn(dsn: str) -> str:
    """The DSN with any password (userinfo or ``?password=``) replaced by ``***``."""
    try:
        parts = urlsplit(dsn)
    except ValueError:
        return re.sub(r"//[^@/]*@", "//***@", dsn)
    netloc = parts.netloc
    userinfo, at, hostport = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.split(':', 1)[0]}:***@{hostport}"
    query = re.sub(r"(?i)(^|&)(password=)[^&]*", r"\1\2***", parts.query)
    return urlunsplit(SplitResult(parts.scheme, netloc, parts.path, query, parts.fragment))


def _where(dsn: str) -> str:
    try:
        parts = urlsplit(dsn)
        host = parts.netloc.rpartition("@")[2] or "localhost"
        return f"{host}{parts.path}" if parts.path not in ("", "/") else host
    except ValueError:
        return mask_dsn(dsn)


_PG_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


def pg_duration_seconds(text: str) -> float | None:
    """A time setting as current_setting() shows it (``'2s'``, ``'1min'``, ``'0'``)
    in seconds; None when it is not one. 0 means disabled for the timeouts."""
    m = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*(us|ms|s|min|h|d)?\s*", text)
    if not m:
        return None
    return float(m.group(1)) * _PG_UNITS[m.group(2) or "ms"]


def _link_timeout(text: str | None) -> float | None:
    """wal_receiver_timeout in seconds (0: the receiver never gives up on silence)."""
    seconds = None if text is None else pg_duration_seconds(text)
    return None if seconds is None else max(seconds, 0.0)


def format_lsn(pos: int) -> str:
    return f"{pos >> 32:X}/{pos & 0xFFFFFFFF:X}"


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, ConnectionRefusedError) and "refused" not in text.lower():
        text = f"connection refused ({text})"
    return text


# --------------------------------------------------------------------------- engine


class PostgresEngine(ConnectionTemplate[Any]):
    """One PostgreSQL server, reached through an asyncpg URL DSN."""

    def __init__(
        self,
        dsn: str,
        *,
        password: str | None = None,
        secrets: set[str] | frozenset[str] = frozenset(),
    ) -> None:
        super().__init__("postgres", _where(dsn), secrets, password, _inline_password(dsn))
        self._dsn = dsn
        self._password = password
        self._conn_ms = 0  # the probing connection's statement_timeout
        self._listener: Callable[[Any], None] | None = None

    def __repr__(self) -> str:
        return f"PostgresEngine({mask_dsn(self._dsn)!r})"

    # -- plumbing (the rest is ConnectionTemplate's)

    _reason = staticmethod(_reason)

    def _is_stale(self, exc: BaseException) -> bool:
        return isinstance(exc, _STALE)

    async def _connect(self, deadline: float, statement_ms: int) -> Any:
        return await asyncpg.connect(
            self._dsn,
            password=self._password,
            timeout=self._remaining(deadline),
            server_settings={
                "application_name": "watchdogd",
                "statement_timeout": str(statement_ms),
            },
        )

    async def _open(self, deadline: float, limit: float) -> Any:
        return await self._connect(deadline, _ms(limit))

    def _reusable(self, conn: Any) -> bool:
        return not conn.is_closed()

    async def _prepare(self, conn: Any, deadline: float, limit: float, *, fresh: bool) -> None:
        # statement_timeout is kept per connection: set it again only when the limit changed.
        ms = _ms(limit)
        if not fresh and self._conn_ms != ms:
            await conn.execute(f"SET statement_timeout = {ms}", timeout=self._remaining(deadline))
        self._conn_ms = ms

    async def _discard(self, conn: Any) -> None:
        conn.terminate()

    def _watch(self, conn: Any, lost: Callable[[], None]) -> None:
        self._listener = lambda _conn: lost()
        conn.add_termination_listener(self._listener)

    def _unwatch(self, conn: Any) -> None:
        if self._listener is not None:
            conn.remove_termination_listener(self._listener)

    async def _release(self, conn: Any, deadline: float) -> None:
        # The work is done: a slow goodbye must not turn it into a timeout.
        remaining = self._remaining(deadline)
        try:
            if remaining > 0.1:
                with contextlib.suppress(Exception):
                    await conn.close(timeout=min(remaining - 0.05, 1.0))
        finally:
            conn.terminate()  # no-op once closed

    # -- Engine

    async def status(self, timeout: float) -> DbStatus:
        async def query(conn: Any, deadline: float) -> Any:
            return await conn.fetchrow(STATUS_SQL, timeout=self._remaining(deadline))

        return self._to_status(await self._probe("status", timeout, query))

    def _to_status(self, row: Any) -> DbStatus:
        in_recovery = bool(row["in_recovery"])
        if not in_recovery:
            writable = row["read_only"] == "off"
            current = _int(row["current_pos"])
            where = f" at {format_lsn(current)}" if current is not None else ""
            return DbStatus(
                is_primary=True,
                writable=writable,
                current_pos=current,
                detail=f"primary, {'read-write' if writable else 'read-only'}{where}",
            )
        receive, replay = _int(row["receive_pos"]), _int(row["replay_pos"])
        streaming: bool | None = row["receiver_status"] == "streaming"
        if row["receiver_pid"] is not None and row["receiver_status"] is None:
            # The row exists but its columns are hidden: the role lacks pg_monitor.
            streaming = None
        paused = bool(row["replay_paused"])
        parts = ["standby"]
        if streaming is None:
            parts.append("WAL receiver hidden (grant pg_monitor)")
        else:
            parts.append("streaming" if streaming else "not streaming")
        if receive is not None and replay is not None:
            parts.append(f"replay lag {max(receive - replay, 0)} bytes")
        if paused:
            parts.append("replay paused")
        return DbStatus(
            is_primary=False,
            writable=False,
            receive_pos=receive,
            replay_pos=replay,
            streaming=streaming,
            last_receive_age=_float(row["receive_age"]),
            link_timeout=_link_timeout(row["receiver_timeout"]),
            lag_seconds=_float(row["lag_seconds"]),
            replay_paused=paused,
            detail=", ".join(parts),
        )

    async def setting(self, name: str, timeout: float) -> str:
        """``current_setting(name)`` as the server reports it, e.g. ``'2s'``."""

        async def query(conn: Any, deadline: float) -> str:
            return str(
                await conn.fetchval(
                    "SELECT current_setting($1)", name, timeout=self._remaining(deadline)
                )
            )

        return await self._probe(f"reading setting {name}", timeout, query)

    async def advise(self, outage_threshold: float, timeout: float) -> list[str]:
        """The standby's wal_receiver_timeout decides when it gives up on a silent
        link, so a hung primary (SIGSTOP, a cut path without RST) is confirmed only
        after it: say so at start when that is later than the outage threshold, with
        the setting that makes it fast. A crashed primary is fast on any setting."""
        status = await self.status(timeout)
        if status.is_primary:
            return []
        text = await self.setting("wal_receiver_timeout", timeout)
        seconds = pg_duration_seconds(text)
        if seconds is None or 0 < seconds <= outage_threshold:
            return []
        after = "never" if seconds == 0 else f"only after {text}"
        value = confirm_within(outage_threshold)
        return [
            f"wal_receiver_timeout is {text} on this standby: a hung primary is confirmed "
            f"{after}, not within the outage threshold ({outage_threshold:g}s). To confirm "
            f"it in time, on the standby: ALTER SYSTEM SET wal_receiver_timeout = '{value}s'; "
            "SELECT pg_reload_conf();"
        ]

    async def stop_replication(self, timeout: float) -> str:
        async def action(conn: Any, deadline: float) -> str:
            row = await conn.fetchrow(
                "SELECT pg_is_in_recovery() AS rec,"
                " current_setting('primary_conninfo') AS conninfo,"
                " (SELECT count(*) FROM pg_stat_wal_receiver) AS receivers,"
                " CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() END AS paused",
                timeout=self._remaining(deadline),
            )
            if not row["rec"]:
                return "not a standby (already primary): no replication to stop"
            done = []
            if row["paused"]:
                await conn.execute(
                    "SELECT pg_wal_replay_resume()", timeout=self._remaining(deadline)
                )
                done.append("resumed paused replay")
            if row["conninfo"]:
                # ALTER SYSTEM refuses to run in a transaction block: own statement.
                await conn.execute(
                    "ALTER SYSTEM SET primary_conninfo = ''", timeout=self._remaining(deadline)
                )
                await conn.execute("SELECT pg_reload_conf()", timeout=self._remaining(deadline))
                done.append("cleared primary_conninfo")
            elif not row["receivers"] and not done:
                return "replication already stopped"
            await self._wait_receiver_gone(conn, deadline)
            return "replication stopped: " + ", ".join([*done, "WAL receiver gone"])

        return await self._admin("stop_replication", timeout, action)

    async def _wait_receiver_gone(self, conn: Any, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        while True:
            n = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_wal_receiver", timeout=self._remaining(deadline)
            )
            if not n:
                return
            if loop.time() + 0.1 >= deadline:
                conninfo = await conn.fetchval(
                    "SELECT current_setting('primary_conninfo')", timeout=self._remaining(deadline)
                )
                hint = (
                    " (primary_conninfo is still set: given on the command line?)"
                    if conninfo
                    else ""
                )
                raise EngineError(self._line(f"stop_replication: WAL receiver still running{hint}"))
            await asyncio.sleep(0.05)

    async def promote(self, timeout: float) -> str:
        async def action(conn: Any, deadline: float) -> str:
            row = await conn.fetchrow(
                "SELECT pg_is_in_recovery() AS rec,"
                " CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() END AS paused",
                timeout=self._remaining(deadline),
            )
            if not row["rec"]:
                await self._verify_write(conn, deadline)
                return "already primary; accepts writes" + await self._unfence(conn, deadline)
            if row["paused"]:
                # Promotion applies everything already received; paused replay would
                # leave it unapplied (and on some versions block the promotion).
                await conn.execute(
                    "SELECT pg_wal_replay_resume()", timeout=self._remaining(deadline)
                )
            wait = max(1, int(self._remaining(deadline)))
            try:
                promoted = await conn.fetchval(
                    "SELECT pg_promote(wait => true, wait_seconds => $1)",
                    wait,
                    timeout=self._remaining(deadline),
                )
            except asyncpg.ObjectNotInPrerequisiteStateError:
                promoted = True  # someone else finished promoting it meanwhile
            if not promoted:
                raise EngineError(self._line(f"promote: still in recovery after {wait}s"))
            await self._verify_write(conn, deadline)
            timeline = await conn.fetchval(
                "SELECT ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int",
                timeout=self._remaining(deadline),
            )
            note = await self._unfence(conn, deadline)
            return f"promoted to primary (timeline {timeline}); accepts writes{note}"

        return await self._admin("promote", timeout, action)

    async def _verify_write(self, conn: Any, deadline: float) -> None:
        # Assigning a transaction id and committing writes a commit record: a real
        # write, no table needed. READ WRITE so a read-only default does not hide it.
        if await conn.fetchval("SELECT pg_is_in_recovery()", timeout=self._remaining(deadline)):
            raise EngineError(self._line("promote: server is still in recovery"))
        await conn.execute(
            "BEGIN READ WRITE; SELECT pg_current_xact_id(); COMMIT",
            timeout=self._remaining(deadline),
        )

    async def _unfence(self, conn: Any, deadline: float) -> str:
        """A new primary must accept the application's writes: undo a read-only fence."""
        read_only = await conn.fetchval(
            "SELECT current_setting('default_transaction_read_only')",
            timeout=self._remaining(deadline),
        )
        if read_only != "on":
            return ""
        await conn.execute(
            "ALTER SYSTEM SET default_transaction_read_only = off",
            timeout=self._remaining(deadline),
        )
        await conn.execute("SELECT pg_reload_conf()", timeout=self._remaining(deadline))
        return "; cleared default_transaction_read_only (it was fenced)"

    async def fence(self, timeout: float) -> str:
        async def action(conn: Any, deadline: float) -> str:
            read_only = await conn.fetchval(
                "SELECT current_setting('default_transaction_read_only')",
                timeout=self._remaining(deadline),
            )
            if read_only != "on":
                await conn.execute(
                    "ALTER SYSTEM SET default_transaction_read_only = on",
                    timeout=self._remaining(deadline),
                )
                await conn.execute("SELECT pg_reload_conf()", timeout=self._remaining(deadline))
            await self._verify_fenced(deadline)
            # After the check: sessions opened from now on are read-only, so ending
            # the older ones (which may be mid-write, or SET themselves writable) is final.
            ended = await conn.fetchval(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
                timeout=self._remaining(deadline),
            )
            head = "already read-only" if read_only == "on" else "fenced: now read-only"
            return f"{head}; {ended} client session(s) ended"

        return await self._admin("fence", timeout, action)

    async def _verify_fenced(self, deadline: float) -> None:
        """A fresh session must refuse a write. pg_reload_conf() only signals: a
        session forked before the postmaster re-read its config would still be
        writable, so retry until the deadline."""
        loop = asyncio.get_running_loop()
        while True:
            check = await self._connect(deadline, _ms(self._remaining(deadline)))
            try:
                await check.execute(
                    "CREATE TEMP TABLE watchdogd_fence_check ()", timeout=self._remaining(deadline)
                )
            except asyncpg.ReadOnlySQLTransactionError:
                await check.close(timeout=self._remaining(deadline))
                return
            finally:
                check.terminate()
            if loop.time() + 0.1 >= deadline:
                raise EngineError(self._line("fence: a new session can still write"))
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        # A graceful goodbye where the server answers in time, terminate() otherwise.
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            await asyncio.wait_for(conn.close(), 0.5)
        except asyncio.CancelledError:
            conn.terminate()
            raise
        except Exception:
            conn.terminate()


def _inline_password(dsn: str) -> str | None:
    try:
        return urlsplit(dsn).password
    except ValueError:
        return None
