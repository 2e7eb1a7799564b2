"""MySQL / MariaDB engine (aiomysql): status, stop_replication, promote and fence.

Owns everything the daemon knows about MySQL 8 and MariaDB 10.6+: the
``database:`` keys for it (``password`` / ``password_file``, merged into the
connection at connect time; or the password in ``mysql://user:password@host:3306/``),
flavour and version detection (``SHOW REPLICA STATUS`` or ``SHOW SLAVE STATUS``,
``SHOW BINARY LOG STATUS`` or ``SHOW MASTER STATUS``, ``super_read_only`` where
it exists), and the failover operations with their verifications.

Definitions (what ``status()`` reports):

* **standby** (``is_primary=False``): the server has a configured replication
  channel (a ``SHOW REPLICA STATUS`` row with a source host), running or not.
  A server without one is a **primary**, even when read-only (a fenced old
  primary, or one not opened for writes yet). More than one channel
  (multi-source) is refused with a clear error: watchdogd manages one pair.
* **writable**: a primary with ``read_only`` off (and ``super_read_only`` off
  where it exists). A replica is never reported writable; when its
  ``read_only`` is off anyway, ``detail`` says so.
* **positions** are binlog coordinates of the primary folded into one integer,
  ``file index * 2**32 + byte offset`` (``binlog.000007:1934`` is
  ``7 * 2**32 + 1934``): ``current_pos`` from the primary's binlog status,
  ``receive_pos`` from the replica's ``Master_Log_File``/``Read_Master_Log_Pos``,
  ``replay_pos`` from ``Relay_Master_Log_File``/``Exec_Master_Log_Pos``. Within
  one binlog file the difference is exact bytes; across a rotation it
  overstates the lag by up to 4 GiB minus the earlier file's size (the size of
  a finished file is not known to the replica).
* **streaming**: the IO thread is connected (``Slave_IO_Running = Yes``).
* **last_receive_age**: how long since this engine saw the replica's receive
  state (received position, heartbeat count) change; ``None`` until it has
  changed once while watched, and always ``None`` where the heartbeat count
  cannot be read (MySQL without a readable performance_schema): an idle
  primary's silence then proves nothing. It is accurate to one probe interval, and on an
  idle primary it only changes once per ``MASTER_HEARTBEAT_PERIOD`` (default
  half of ``slave_net_timeout``, 30 s): set the period to about the probe
  interval (``CHANGE MASTER TO MASTER_HEARTBEAT_PERIOD = 1``).
* **lag_seconds**: ``Seconds_Behind_Master`` / ``Seconds_Behind_Source``
  (``None`` while a replication thread is stopped).
* **replay_paused**: the SQL thread is stopped while the IO thread runs.

Operations:

* ``stop_replication``: ``STOP REPLICA IO_THREAD``; wait (bounded by the
  timeout) until the SQL thread has applied everything received (restarting
  it if it was merely stopped; a SQL thread stopped by an error fails the step
  with that error); ``STOP REPLICA``; ``RESET REPLICA ALL``.
* ``promote``: the same when a channel is still configured; then
  ``read_only`` (and ``super_read_only``) off, and a verified write:
  ``REPLACE INTO watchdogd.heartbeat`` (schema and table created if missing).
  A real table write is the only check that fails on a server still refusing
  writes (a temporary table is allowed even under ``read_only``). Idempotent:
  an already writable primary is only verified.
* ``fence``: ``read_only`` on (``super_read_only`` too where it exists); if
  an open write transaction blocks that, client connections are killed first
  and it is retried; then every client connection but ours and replication
  threads is killed and the settings are read back. On MySQL 8 both ``fence``
  and ``promote`` use ``SET PERSIST`` so the setting survives a restart;
  MariaDB has no such thing (keep ``read_only`` in the server's config file
  in step with your failover).

Rejoin (the old primary, after a failover): ``divergence`` is the GTID
difference (MariaDB: the old primary's binlog GTIDs past the new primary's
``gtid_slave_pos``; MySQL: ``GTID_SUBTRACT``); ``rejoin`` turns ``read_only`` on
and replicates from the new primary with GTID positioning (MariaDB
``current_pos``, MySQL auto-positioning), as ``replication_user`` when given. When
transactions diverged, SQL cannot take them back: it refuses, naming the option
``rejoin_fallback: dump`` (MariaDB), with which it resyncs instead: ``read_only``
on, client sessions ended, replication stopped, the schemas the new primary lacks
dropped, a ``mariadb-dump --single-transaction --master-data=2 --gtid`` of every
schema but ``SYSTEM_SCHEMAS`` streamed through the watcher into the ``mariadb``
client (``sql_log_bin=0``; logins in 0600 option files in a private directory,
removed after), then ``gtid_slave_pos`` set to the dump's position, ``RESET
MASTER`` (the diverged GTIDs go), and replication with ``MASTER_USE_GTID =
slave_pos``. The same fallback applies when the new primary refuses the GTID
position of a rejoin that diverged in nothing known (error 1236: its binary logs
from there are purged). The ``mysql`` schema is not copied: the old primary
keeps its own accounts (the one loading the dump, the replication account) and
replication state. The account then needs the grants the docs list for it.

On MariaDB, accounts holding ``READ_ONLY ADMIN`` (``ALL PRIVILEGES`` includes
it) may still write under ``read_only``: applications must not use them. The
watchdogd account needs, on MariaDB 10.6+: ``REPLICA MONITOR, BINLOG MONITOR,
REPLICATION SLAVE ADMIN, READ_ONLY ADMIN, RELOAD, CONNECTION ADMIN, PROCESS ON
*.*`` and ``ALL ON watchdogd.*``; on MySQL 8: ``REPLICATION CLIENT,
REPLICATION_SLAVE_ADMIN, SYSTEM_VARIABLES_ADMIN, RELOAD, CONNECTION_ADMIN,
PROCESS ON *.*`` and ``ALL ON watchdogd.*`` (``RELOAD`` is for ``RESET
REPLICA``).

Every call is bounded by ``asyncio.timeout`` around the whole method (connect
included) and ``lock_wait_timeout`` on the server for statements that wait for
locks. Probing reuses one lazily (re)opened connection; the failover
operations use a connection of their own, one at a time. Any failure drops
the connection and becomes one EngineError line without secrets.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote

import aiomysql

from watchdogd.core.secrets import mask
from watchdogd.engines import DIVERGENCE_ITEMS_CAP, DbStatus, Divergence, Engine, EngineError
from watchdogd.engines._common import (
    ConnectionTemplate,
    Secret,
    confirm_within,
    host_port,
    keepalive_for,
    split_dsn,
    validate_password,
)

if TYPE_CHECKING:
    from watchdogd.core.model import DatabaseConfig
    from watchdogd.core.section import Section

T = TypeVar("T")

DEFAULT_PORT = 3306
EXAMPLE = "mysql://watchdogd:password@host:3306/"
# promote()'s proof of writability: created when missing (checked first, as
# IF NOT EXISTS on an existing object leaves a warning), then one row replaced.
HEARTBEAT_EXISTS_SQL = (
    "SELECT COUNT(*) AS n FROM information_schema.TABLES"
    " WHERE TABLE_SCHEMA = 'watchdogd' AND TABLE_NAME = 'heartbeat'"
)
HEARTBEAT_CREATE_SQL = (
    "CREATE DATABASE IF NOT EXISTS watchdogd",
    "CREATE TABLE IF NOT EXISTS watchdogd.heartbeat ("
    " id TINYINT UNSIGNED NOT NULL PRIMARY KEY,"
    " server_id INT UNSIGNED NOT NULL,"
    " written_at TIMESTAMP(6) NOT NULL) ENGINE=InnoDB",
)
HEARTBEAT_WRITE_SQL = (
    "REPLACE INTO watchdogd.heartbeat (id, server_id, written_at) VALUES (1, @@server_id, NOW(6))"
)
# Threads fence() must not kill: replication (ours to replicas, or a replica's
# own threads) and the server's own.
_SYSTEM_COMMANDS = frozenset(
    {"Binlog Dump", "Binlog Dump GTID", "Daemon", "Slave_IO", "Slave_SQL", "Slave_worker"}
)
_SYSTEM_USERS = frozenset({"system user", "event_scheduler"})
# Client-side errors meaning "this connection is dead" (server restarted, or
# fence() killed it): a reused probing connection is retried once, fresh.
_STALE_CODES = frozenset({0, 2006, 2013, 2014, 2055, 1927, 4031})
_LOCK_WAIT_TIMEOUT = 1205
_POLL = 0.05
# How long an idle SQL thread must stay put before a relay log that ends inside
# a transaction counts as fully applied (see MySQLEngine._drain).
IDLE_SETTLE = 1.0
# rejoin_fallback values: "dump" resyncs a divergent old primary with mariadb-dump.
REJOIN_FALLBACKS = ("dump", "none")
# Schemas a resync neither copies nor drops. ``mysql`` holds this server's own
# accounts (the one loading the dump, the replication account) and its replication
# state (mysql.gtid_slave_pos, set with SET GLOBAL instead); the others are views of
# the running server.
SYSTEM_SCHEMAS = frozenset({"mysql", "information_schema", "performance_schema", "sys"})
# The dump's last bytes kept while streaming: mariadb-dump prints its (commented)
# GTID position after the data, a few hundred bytes before the end.
_DUMP_TAIL = 16384
# Global privileges a resync needs of the dsn account (docs/engines/mysql.md#grants),
# checked before anything changes: on the new primary to dump every schema, on the
# old one to load it under read_only (views and routines of other definers, outside
# the binary log) on top of the failover grants.
DUMP_PRIVILEGES = ("SELECT", "SHOW VIEW", "TRIGGER", "EVENT", "SHOW DATABASES")
LOAD_PRIVILEGES = (
    *DUMP_PRIVILEGES,
    *("INSERT", "UPDATE", "DELETE", "CREATE", "DROP", "ALTER", "INDEX", "REFERENCES"),
    *("CREATE VIEW", "CREATE ROUTINE", "ALTER ROUTINE", "LOCK TABLES", "BINLOG ADMIN"),
    "SET USER",
)
_OWN_PRIVILEGES_SQL = (
    "SELECT PRIVILEGE_TYPE AS p FROM information_schema.USER_PRIVILEGES WHERE GRANTEE ="
    " CONCAT(QUOTE(SUBSTRING_INDEX(CURRENT_USER(), '@', 1)), '@',"
    " QUOTE(SUBSTRING_INDEX(CURRENT_USER(), '@', -1)))"
)
_DUMP_GTID = re.compile(rb"^-- SET GLOBAL gtid_slave_pos='([0-9,\- ]*)';\s*$", re.MULTILINE)


# --------------------------------------------------------------------------- DSN


@dataclass(frozen=True)
class MySQLDsn:
    host: str
    port: int
    user: str
    password: str | None
    database: str | None

    def __repr__(self) -> str:
        return f"MySQLDsn({self.where!r}, user={self.user!r})"

    @property
    def where(self) -> str:
        return host_port(self.host, self.port)


def parse_dsn(dsn: str) -> MySQLDsn:
    """``mysql://user:password@host:3306/[database]``. The ValueError's message
    never repeats the DSN (it may hold a password)."""
    parts, host, port = split_dsn(dsn, ("mysql", "mariadb"), "MySQL", EXAMPLE)
    if not parts.username:
        raise ValueError(f"expected a user, e.g. {EXAMPLE}")
    database = unquote(parts.path.strip("/")) or None
    if database is not None and "/" in database:
        raise ValueError(f"expected at most a database name after the host, e.g. {EXAMPLE}")
    return MySQLDsn(
        host=host,
        port=port or DEFAULT_PORT,
        user=unquote(parts.username),
        password=unquote(parts.password) if parts.password else None,
        database=database,
    )


# --------------------------------------------------------------------------- module contract


def validate(section: Section) -> Mapping[str, Any]:
    """Extra keys of a ``database:`` section with ``engine: mysql``."""
    options = dict(validate_password(section, lambda dsn: parse_dsn(dsn).password))
    # The account a rejoined old primary replicates with (REPLICATION SLAVE on the
    # new primary); without it, the new primary's own dsn login.
    user = section.str("replication_user", None)
    password = section.secret("replication_password")
    if password and not user:
        section.error("needs replication_user as well", "replication_password")
    if user:
        options["replication_user"] = user
    if password:
        options["replication_password"] = Secret(password)
    # Named like PostgreSQL's rewind_fallback: what a rejoin falls back to when its
    # own method (here GTID positioning) cannot take this server back.
    if section.choice("rejoin_fallback", REJOIN_FALLBACKS, "none") == "dump":
        options["rejoin_fallback"] = "dump"
    return options


def create(db: DatabaseConfig, secrets: set[str]) -> MySQLEngine:
    try:
        dsn = parse_dsn(db.dsn)
    except ValueError as exc:
        raise EngineError(f"mysql: database.dsn: {exc}") from None
    password = db.options.get("password")
    repl_user, repl_password = (
        db.options.get("replication_user"),
        db.options.get("replication_password"),
    )
    return MySQLEngine(
        dsn,
        password=str(password) if password else None,
        secrets=secrets,
        replication=(str(repl_user), str(repl_password) if repl_password else None)
        if repl_user
        else None,
        resync=db.options.get("rejoin_fallback") == "dump",
    )


# --------------------------------------------------------------------------- server facts


def binlog_pos(file: Any, pos: Any) -> int | None:
    """``("binlog.000007", 1934)`` → ``7 * 2**32 + 1934``; None when unknown."""
    if not isinstance(file, str) or pos is None:
        return None
    m = re.search(r"\.(\d+)$", file)
    if not m:
        return None
    return int(m.group(1)) * 2**32 + int(pos)


def format_pos(pos: int | None) -> str:
    return "?" if pos is None else f"{pos >> 32:06d}:{pos & 0xFFFFFFFF}"


@dataclass(frozen=True)
class Flavour:
    """Which server this is, and so which statements it speaks."""

    mariadb: bool
    version: tuple[int, int, int]
    super_read_only: bool

    @classmethod
    def detect(cls, version_text: str, comment: str, super_read_only: bool) -> Flavour:
        m = re.match(r"(\d+)\.(\d+)\.(\d+)", version_text)
        version = (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else (0, 0, 0)
        mariadb = "mariadb" in f"{version_text} {comment}".lower()
        return cls(mariadb=mariadb, version=version, super_read_only=super_read_only)

    @property
    def label(self) -> str:
        return f"{'MariaDB' if self.mariadb else 'MySQL'} {'.'.join(map(str, self.version))}"

    @property
    def replica(self) -> str:
        """``REPLICA`` where the server knows it (MariaDB 10.5.1, MySQL 8.0.22)."""
        new = self.version >= ((10, 5, 1) if self.mariadb else (8, 0, 22))
        return "REPLICA" if new else "SLAVE"

    @property
    def replica_status_sql(self) -> str:
        # MariaDB's ALL form lists every connection and adds the heartbeat count.
        if self.mariadb:
            return f"SHOW ALL {self.replica}S STATUS"
        return f"SHOW {self.replica} STATUS"

    @property
    def binlog_status_sql(self) -> str:
        if not self.mariadb and self.version >= (8, 2, 0):
            return "SHOW BINARY LOG STATUS"
        return "SHOW MASTER STATUS"

    @property
    def set_scope(self) -> str:
        return "PERSIST" if not self.mariadb and self.version >= (8, 0, 0) else "GLOBAL"

    def keep_relay_log_sql(self, ch: Channel) -> str:
        """MariaDB: leave GTID mode but keep the relay log, at the SQL thread's position."""
        name = " '" + aiomysql.escape_string(ch.name) + "'" if ch.name else ""
        relay = aiomysql.escape_string(ch.relay_file or "")
        return (
            f"CHANGE MASTER{name} TO MASTER_USE_GTID = no, RELAY_LOG_FILE = '{relay}',"
            f" RELAY_LOG_POS = {int(ch.relay_pos or 4)}"
        )

    def change_source_sql(
        self,
        dsn: MySQLDsn,
        user: str,
        password: str | None,
        heartbeat: int | None,
        maria_gtid: str = "current_pos",
    ) -> tuple[str, tuple[Any, ...]]:
        """Point the default channel at ``dsn`` with GTID positioning: MariaDB from
        ``current_pos`` (its own binlog's GTIDs, which a never-replica's slave_pos
        lacks) or ``slave_pos`` (after a resync), MySQL with auto-positioning."""
        new = not self.mariadb and self.version >= (8, 0, 23)
        word = "SOURCE" if new else "MASTER"
        head = "CHANGE REPLICATION SOURCE TO" if new else "CHANGE MASTER TO"
        parts = [
            f"{word}_HOST = %s",
            f"{word}_PORT = %s",
            f"{word}_USER = %s",
            f"{word}_PASSWORD = %s",
        ]
        args: list[Any] = [dsn.host, dsn.port, user, password or ""]
        parts.append(
            f"MASTER_USE_GTID = {maria_gtid}" if self.mariadb else f"{word}_AUTO_POSITION = 1"
        )
        if heartbeat:
            parts.append(f"{word}_HEARTBEAT_PERIOD = %s")
            args.append(heartbeat)
        return f"{head} " + ", ".join(parts), tuple(args)

    def channel_sql(self, verb: str, channel: str, thread: str = "", tail: str = "") -> str:
        """``STOP REPLICA IO_THREAD`` and friends, for one named or default channel."""
        name = "'" + aiomysql.escape_string(channel) + "'" if channel else ""
        if self.mariadb:
            words = [verb, self.replica, name, thread, tail]
        else:
            words = [verb, self.replica, thread, tail, f"FOR CHANNEL {name}" if name else ""]
        return " ".join(w for w in words if w)


def _col(row: Mapping[str, Any], *names: str) -> Any:
    for name in names:
        if name in row:
            return row[name]
    return None


def _one_line(text: Any, limit: int = 160) -> str:
    line = " ".join(str(text or "").split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


@dataclass(frozen=True)
class Channel:
    """One replication channel as SHOW REPLICA STATUS describes it (either naming)."""

    name: str
    host: str
    port: int | None
    io: str
    sql: str
    recv_file: str | None
    recv_pos: int | None
    exec_file: str | None
    exec_pos: int | None
    behind: int | None
    sql_state: str
    relay_file: str | None
    relay_pos: int | None
    using_gtid: str
    sql_errno: int
    sql_error: str
    io_error: str
    heartbeats: int | None
    io_errno: int = 0

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Channel:
        def num(*names: str) -> int | None:
            value = _col(row, *names)
            return None if value is None or value == "" else int(value)

        return cls(
            name=str(_col(row, "Connection_name", "Channel_Name", "Channel_name") or ""),
            host=str(_col(row, "Master_Host", "Source_Host") or ""),
            port=num("Master_Port", "Source_Port"),
            io=str(_col(row, "Slave_IO_Running", "Replica_IO_Running") or "No"),
            sql=str(_col(row, "Slave_SQL_Running", "Replica_SQL_Running") or "No"),
            recv_file=_col(row, "Master_Log_File", "Source_Log_File") or None,
            recv_pos=num("Read_Master_Log_Pos", "Read_Source_Log_Pos"),
            exec_file=_col(row, "Relay_Master_Log_File", "Relay_Source_Log_File") or None,
            exec_pos=num("Exec_Master_Log_Pos", "Exec_Source_Log_Pos"),
            behind=num("Seconds_Behind_Master", "Seconds_Behind_Source"),
            sql_state=str(
                _col(row, "Slave_SQL_Running_State", "Replica_SQL_Running_State", "Slave_SQL_State")
                or ""
            ),
            relay_file=_col(row, "Relay_Log_File") or None,
            relay_pos=num("Relay_Log_Pos"),
            using_gtid=str(_col(row, "Using_Gtid") or ""),
            sql_errno=num("Last_SQL_Errno") or 0,
            sql_error=_one_line(_col(row, "Last_SQL_Error")),
            io_error=_one_line(_col(row, "Last_IO_Error")),
            heartbeats=num("Slave_received_heartbeats"),
            io_errno=num("Last_IO_Errno") or 0,
        )

    @property
    def source(self) -> str:
        return f"{self.host}:{self.port}" if self.port else self.host

    @property
    def receive_pos(self) -> int | None:
        return binlog_pos(self.recv_file, self.recv_pos)

    @property
    def replay_pos(self) -> int | None:
        return binlog_pos(self.exec_file, self.exec_pos)

    @property
    def applied_all(self) -> bool:
        return (self.exec_file, self.exec_pos) == (self.recv_file, self.recv_pos)


def _reason(exc: BaseException) -> str:
    args: tuple[Any, ...] = getattr(exc, "args", ())
    if len(args) == 2 and isinstance(args[0], int):
        text = f"{_one_line(args[1], 300)} (error {args[0]})"
    else:
        text = _one_line(exc, 300) or type(exc).__name__
    cause = exc.__cause__
    if cause is not None and str(cause) and str(cause) not in text:
        text += f": {_one_line(cause, 200)}"
    return text


def _code(exc: BaseException) -> int | None:
    args: tuple[Any, ...] = getattr(exc, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


def _is_stale(exc: BaseException) -> bool:
    if isinstance(exc, aiomysql.InterfaceError | ConnectionError):
        return True
    return isinstance(exc, aiomysql.OperationalError) and _code(exc) in _STALE_CODES


# --------------------------------------------------------------------------- engine


class _QuietCursor(aiomysql.Cursor):  # type: ignore[misc]
    """A cursor that does not turn server notes ("replica already stopped") into
    Python warnings, nor spend a SHOW WARNINGS round trip on them."""

    async def _show_warnings(self, conn: Any) -> None:
        return None


class _QuietDictCursor(_QuietCursor, aiomysql.DictCursor):  # type: ignore[misc]
    pass


class _Conn:
    """An aiomysql connection plus what we learnt about its server."""

    def __init__(self, raw: Any, flavour: Flavour) -> None:
        self.raw = raw
        self.flavour = flavour

    async def rows(self, sql: str, args: Any = None) -> list[dict[str, Any]]:
        async with self.raw.cursor(_QuietDictCursor) as cur:
            await cur.execute(sql, args)
            return list(await cur.fetchall())

    async def execute(self, sql: str, args: Any = None) -> None:
        async with self.raw.cursor(_QuietCursor) as cur:
            await cur.execute(sql, args)

    def close(self) -> None:
        # Closes the transport without a goodbye: never blocks on a hung server.
        self.raw.close()


class MySQLEngine(ConnectionTemplate[_Conn]):
    """One MySQL or MariaDB server."""

    def __init__(
        self,
        dsn: MySQLDsn,
        *,
        password: str | None = None,
        secrets: set[str] | frozenset[str] = frozenset(),
        replication: tuple[str, str | None] | None = None,
        resync: bool = False,
    ) -> None:
        self._password = password if password is not None else dsn.password
        super().__init__(
            "mysql", dsn.where, secrets, self._password, replication[1] if replication else None
        )
        self.dsn = dsn
        self._replication = replication
        # rejoin_fallback: dump: a divergent rejoin resyncs from the new primary.
        self._resync = resync
        # last_receive_age bookkeeping: the receive state last seen and when it changed.
        self._receive_state: tuple[Any, ...] | None = None
        self._receive_changed: float | None = None

    def __repr__(self) -> str:
        return f"MySQLEngine({self.dsn.user}@{self.where})"

    # -- plumbing (the rest is ConnectionTemplate's)

    _reason = staticmethod(_reason)
    _is_stale = staticmethod(_is_stale)

    async def _open(self, deadline: float, limit: float) -> _Conn:
        raw = aiomysql.Connection(
            host=self.dsn.host,
            port=self.dsn.port,
            user=self.dsn.user,
            password=self._password or "",
            db=self.dsn.database,
            connect_timeout=self._remaining(deadline),
            autocommit=True,
            charset="utf8mb4",
            program_name="watchdogd",
        )
        try:
            # The private step behind aiomysql.connect(): called directly so the
            # socket is closed when a hung handshake is cancelled by our timeout
            # (aiomysql only cleans up after an Exception, not a cancellation).
            await raw._connect()
            conn = _Conn(raw, await self._flavour(raw))
        except BaseException:
            raw.close()
            raise
        return conn

    @staticmethod
    async def _flavour(raw: Any) -> Flavour:
        async with raw.cursor() as cur:
            await cur.execute("SELECT @@version, @@version_comment")
            version, comment = await cur.fetchone()
            await cur.execute("SHOW GLOBAL VARIABLES LIKE 'super_read_only'")
            has_sro = bool(await cur.fetchall())
        return Flavour.detect(str(version), str(comment), has_sro)

    async def _discard(self, conn: _Conn) -> None:
        conn.close()

    def _watch(self, conn: _Conn, lost: Callable[[], None]) -> None:
        writer = getattr(conn.raw, "_writer", None)  # aiomysql has no callback
        self._watch_stream(writer, lost)

    async def _admin(
        self, op: str, limit: float, action: Callable[[_Conn, float], Awaitable[T]]
    ) -> T:
        """Statements of a failover operation that wait for a lock give up in time."""

        async def bounded_action(conn: _Conn, deadline: float) -> T:
            await conn.execute(
                "SET SESSION lock_wait_timeout = %s",
                (max(1, math.floor(self._remaining(deadline))),),
            )
            return await action(conn, deadline)

        return await super()._admin(op, limit, bounded_action)

    async def _channel(self, conn: _Conn) -> Channel | None:
        rows = await conn.rows(conn.flavour.replica_status_sql)
        channels = [c for c in map(Channel.from_row, rows) if c.host]
        if len(channels) > 1:
            names = ", ".join(repr(c.name) for c in channels)
            raise EngineError(
                self._line(
                    f"{len(channels)} replication channels ({names}): multi-source replication "
                    "is not supported"
                )
            )
        if not channels:
            return None
        channel = channels[0]
        if channel.heartbeats is None and not conn.flavour.mariadb:
            channel = await self._with_mysql_heartbeats(conn, channel)
        return channel

    @staticmethod
    async def _with_mysql_heartbeats(conn: _Conn, channel: Channel) -> Channel:
        try:
            rows = await conn.rows(
                "SELECT COUNT_RECEIVED_HEARTBEATS AS n FROM"
                " performance_schema.replication_connection_status WHERE CHANNEL_NAME = %s",
                (channel.name,),
            )
        except aiomysql.Error:
            return channel  # performance_schema off or not readable: positions only
        if not rows or rows[0]["n"] is None:
            return channel
        return dataclasses.replace(channel, heartbeats=int(rows[0]["n"]))

    async def _read_only(self, conn: _Conn) -> tuple[bool, bool]:
        """(read_only, super_read_only); the latter False where it does not exist."""
        sro = ", @@global.super_read_only AS sro" if conn.flavour.super_read_only else ""
        row = (await conn.rows(f"SELECT @@global.read_only AS ro{sro}"))[0]
        return bool(int(row["ro"])), bool(int(row.get("sro") or 0))

    # -- Engine: status

    async def status(self, timeout: float) -> DbStatus:
        async def query(conn: _Conn, deadline: float) -> DbStatus:
            channel = await self._channel(conn)
            read_only, super_ro = await self._read_only(conn)
            if channel is None:
                self._receive_state = self._receive_changed = None
                rows = await conn.rows(conn.flavour.binlog_status_sql)
                current = binlog_pos(rows[0].get("File"), rows[0].get("Position")) if rows else None
                return self._primary_status(conn.flavour, read_only or super_ro, current)
            net_timeout = await self._net_timeout(conn)
            return self._standby_status(conn.flavour, channel, read_only or super_ro, net_timeout)

        return await self._probe("status", timeout, query)

    @staticmethod
    async def _net_timeout(conn: _Conn) -> int | None:
        """The replica's ``slave_net_timeout`` (``replica_net_timeout`` on newer MySQL):
        seconds of silence after which its IO thread gives up on the link."""
        rows = await conn.rows(
            "SHOW GLOBAL VARIABLES WHERE Variable_name IN"
            " ('slave_net_timeout', 'replica_net_timeout')"
        )
        for row in rows:
            value = _col(row, "Value", "VARIABLE_VALUE")
            if value is not None and str(value).isdigit():
                return int(value)
        return None

    @staticmethod
    def _primary_status(flavour: Flavour, read_only: bool, current: int | None) -> DbStatus:
        where = f" at {format_pos(current)}" if current is not None else ", binary log off"
        return DbStatus(
            is_primary=True,
            writable=not read_only,
            current_pos=current,
            detail=f"{flavour.label} primary, {'read-only' if read_only else 'read-write'}{where}",
        )

    def _standby_status(
        self, flavour: Flavour, ch: Channel, read_only: bool, net_timeout: int | None = None
    ) -> DbStatus:
        streaming = ch.io == "Yes"
        paused = ch.sql != "Yes" and streaming
        state = (ch.recv_file, ch.recv_pos, ch.heartbeats)
        now = asyncio.get_running_loop().time()
        if state != self._receive_state:
            # A first sighting says nothing about when it last heard from the primary.
            self._receive_changed = now if self._receive_state is not None else None
            self._receive_state = state
        age = now - self._receive_changed if self._receive_changed is not None else None
        if ch.heartbeats is None:
            # Without the heartbeat count (MySQL with performance_schema off or hidden)
            # an idle primary's healthy link never changes what we can see: its silence
            # is no evidence, and only the IO thread letting go says the link is lost.
            age = None
        parts = [f"{flavour.label} replica of {ch.source}", f"IO {ch.io}", f"SQL {ch.sql}"]
        if ch.behind is not None:
            parts.append(f"{ch.behind}s behind")
        parts.append(f"applied {format_pos(ch.replay_pos)} of {format_pos(ch.receive_pos)}")
        if not streaming and ch.io_error:
            parts.append(f"IO error: {ch.io_error}")
        if ch.sql_errno:
            parts.append(f"SQL error {ch.sql_errno}: {ch.sql_error}")
        if not read_only:
            parts.append("read_only is OFF on this replica")
        return DbStatus(
            is_primary=False,
            writable=False,
            receive_pos=ch.receive_pos,
            replay_pos=ch.replay_pos,
            streaming=streaming,
            last_receive_age=age,
            link_timeout=float(net_timeout) if net_timeout is not None else None,
            lag_seconds=float(ch.behind) if ch.behind is not None else None,
            replay_paused=paused,
            detail=", ".join(parts),
        )

    async def advise(self, outage_threshold: float, timeout: float) -> list[str]:
        """A replica's IO thread gives up on a silent link only after its
        ``slave_net_timeout``, so a hung primary (SIGSTOP, a cut path without RST) is
        confirmed only then: say so at start when that is later than the outage
        threshold, with the settings that make it fast. A crash is fast on any setting."""
        status = await self.status(timeout)
        seconds = status.link_timeout
        if status.is_primary or seconds is None or 0 < seconds <= outage_threshold:
            return []
        value = confirm_within(outage_threshold)
        beat = keepalive_for(value)
        mariadb = self._conn is None or self._conn.flavour.mariadb
        change = (
            f"CHANGE MASTER TO MASTER_HEARTBEAT_PERIOD = {beat}"
            if mariadb
            else f"CHANGE REPLICATION SOURCE TO SOURCE_HEARTBEAT_PERIOD = {beat}"
        )
        after = "never" if seconds == 0 else f"only after {seconds:g}s"
        return [
            f"slave_net_timeout is {seconds:g}s on this replica: a hung primary is confirmed "
            f"{after}, not within the outage threshold ({outage_threshold:g}s). To confirm it "
            f"in time, on the replica: SET GLOBAL slave_net_timeout = {value}; STOP REPLICA; "
            f"{change}; START REPLICA; (and slave_net_timeout in its config file)"
        ]

    # -- Engine: failover operations

    async def stop_replication(self, timeout: float) -> str:
        async def action(conn: _Conn, deadline: float) -> str:
            return await self._stop(conn, deadline, "stop_replication")

        return await self._admin("stop_replication", timeout, action)

    async def _stop(self, conn: _Conn, deadline: float, op: str) -> str:
        ch = await self._channel(conn)
        if ch is None:
            return "no replication configured: nothing to stop"
        f = conn.flavour
        positions_trusted = True
        notes: list[str] = []
        if ch.sql != "Yes":
            self._check_sql_error(ch, op)
            # A paused SQL thread must still apply what was received. Start it
            # while the IO thread still runs where possible: MariaDB discards the
            # relay log of a GTID channel when a thread starts with both stopped,
            # unless told a relay log position (which makes the reported source
            # positions meaningless until it has caught up).
            if f.mariadb and ch.io == "No" and ch.using_gtid not in ("", "No"):
                await conn.execute(f.keep_relay_log_sql(ch))
                positions_trusted = False
            await conn.execute(f.channel_sql("START", ch.name, "SQL_THREAD"))
            notes.append("started the stopped SQL thread")
        await conn.execute(f.channel_sql("STOP", ch.name, "IO_THREAD"))
        applied = await self._drain(conn, deadline, op, positions_trusted)
        await conn.execute(f.channel_sql("STOP", ch.name))
        await conn.execute(f.channel_sql("RESET", ch.name, tail="ALL"))
        if await self._channel(conn) is not None:
            raise EngineError(
                self._line(
                    f"{op}: a replication channel is still configured after RESET REPLICA ALL"
                )
            )
        if positions_trusted and not applied.applied_all:
            notes.append(
                f"applied {format_pos(applied.replay_pos)} of {format_pos(applied.receive_pos)}:"
                " the rest is an incomplete transaction the source never finished sending"
            )
        else:
            notes.append(f"applied everything received (up to {format_pos(applied.replay_pos)})")
        return (
            f"stopped replication from {ch.source}; " + "; ".join(notes) + "; replica "
            "configuration removed"
        )

    def _check_sql_error(self, ch: Channel, op: str) -> None:
        if ch.sql != "Yes" and ch.sql_errno:
            raise EngineError(
                self._line(
                    f"{op}: SQL thread stopped by error {ch.sql_errno} ({ch.sql_error}); "
                    f"applied {format_pos(ch.replay_pos)} of {format_pos(ch.receive_pos)}"
                    " received: fix or skip it, then retry"
                )
            )

    async def _drain(self, conn: _Conn, deadline: float, op: str, positions: bool) -> Channel:
        """With the IO thread stopped, wait until the SQL thread applied the relay log.

        Done when the applied source position reaches the received one, or when
        the SQL thread says it has read all of the relay log and its relay log
        position has not moved for IDLE_SETTLE seconds: the two differ for good
        when the relay log ends inside a transaction (the source died mid-send).
        """
        loop = asyncio.get_running_loop()
        idle: tuple[Any, ...] | None = None
        idle_since = 0.0
        while True:
            ch = await self._channel(conn)
            if ch is None:
                raise EngineError(self._line(f"{op}: the replication channel disappeared"))
            self._check_sql_error(ch, op)
            if ch.sql != "Yes":
                raise EngineError(self._line(f"{op}: the SQL thread was stopped by someone else"))
            if positions and ch.applied_all:
                return ch
            now = loop.time()
            if "read all relay log" in ch.sql_state.lower():
                marker = (ch.relay_file, ch.relay_pos)
                if marker != idle:
                    idle, idle_since = marker, now
                elif now - idle_since >= IDLE_SETTLE:
                    return ch
            else:
                idle = None
            if now + _POLL >= deadline:
                raise EngineError(
                    self._line(
                        f"{op}: still applying received events: applied {format_pos(ch.replay_pos)}"
                        f" of {format_pos(ch.receive_pos)}"
                    )
                )
            await asyncio.sleep(_POLL)

    async def promote(self, timeout: float) -> str:
        async def action(conn: _Conn, deadline: float) -> str:
            done: list[str] = []
            if await self._channel(conn) is not None:
                done.append(await self._stop(conn, deadline, "promote"))
            read_only, super_ro = await self._read_only(conn)
            if read_only or super_ro:
                scope = conn.flavour.set_scope
                if conn.flavour.super_read_only:
                    await conn.execute(f"SET {scope} super_read_only = OFF")
                await conn.execute(f"SET {scope} read_only = OFF")
                done.append("read_only turned off")
            await self._verify_write(conn)
            if not done:
                return "already a writable primary: write verified, nothing changed"
            return "promoted: " + "; ".join(done) + "; write verified"

        return await self._admin("promote", timeout, action)

    async def _verify_write(self, conn: _Conn) -> None:
        read_only, super_ro = await self._read_only(conn)
        if read_only or super_ro:
            raise EngineError(self._line("promote: the server is still read-only"))
        try:
            if not (await conn.rows(HEARTBEAT_EXISTS_SQL))[0]["n"]:
                for statement in HEARTBEAT_CREATE_SQL:
                    await conn.execute(statement)
            await conn.execute(HEARTBEAT_WRITE_SQL)
        except aiomysql.Error as exc:
            raise EngineError(
                self._line(f"promote: a write to watchdogd.heartbeat was refused: {_reason(exc)}")
            ) from None

    async def fence(self, timeout: float) -> str:
        async def action(conn: _Conn, deadline: float) -> str:
            before = await self._read_only(conn)
            killed = 0
            # Leave time to kill the blocker and try again if the first attempt waits.
            await conn.execute(
                "SET SESSION lock_wait_timeout = %s",
                (max(1, math.floor(self._remaining(deadline) / 3)),),
            )
            try:
                await self._set_read_only(conn)
            except aiomysql.OperationalError as exc:
                if _code(exc) != _LOCK_WAIT_TIMEOUT:
                    raise
                # An open write transaction blocks read_only: end the sessions first.
                killed += await self._kill_clients(conn)
                await self._set_read_only(conn)
            killed += await self._kill_clients(conn)
            read_only, super_ro = await self._read_only(conn)
            if not read_only or (conn.flavour.super_read_only and not super_ro):
                raise EngineError(self._line("fence: read_only did not stay on"))
            was = before[0] and (before[1] or not conn.flavour.super_read_only)
            head = "already read-only" if was else "fenced: now read-only"
            what = "super_read_only" if conn.flavour.super_read_only else "read_only"
            return f"{head} ({what}=ON); {killed} client connection(s) killed"

        return await self._admin("fence", timeout, action)

    @staticmethod
    async def _set_read_only(conn: _Conn) -> None:
        scope = conn.flavour.set_scope
        await conn.execute(f"SET {scope} read_only = ON")
        if conn.flavour.super_read_only:
            await conn.execute(f"SET {scope} super_read_only = ON")

    @staticmethod
    async def _kill_clients(conn: _Conn) -> int:
        own = (await conn.rows("SELECT CONNECTION_ID() AS id"))[0]["id"]
        killed = 0
        for row in await conn.rows("SHOW PROCESSLIST"):
            if (
                row["Id"] == own
                or row["Command"] in _SYSTEM_COMMANDS
                or row["User"] in _SYSTEM_USERS
                or row["Command"] == "Killed"
            ):
                continue
            try:
                await conn.execute("KILL CONNECTION %s", (int(row["Id"]),))
                killed += 1
            except aiomysql.OperationalError as exc:
                if _code(exc) != 1094:  # ER_NO_SUCH_THREAD: it ended meanwhile
                    raise
        return killed

    # -- Engine: rejoin (self is the old primary)

    async def _gtid_state(self, conn: _Conn, _: float) -> GtidState:
        f = conn.flavour
        channel = await self._channel(conn)
        if f.mariadb:
            row = (
                await conn.rows(
                    "SELECT @@global.gtid_binlog_pos AS b, @@global.gtid_slave_pos AS s,"
                    " @@server_id AS id"
                )
            )[0]
            return GtidState(f, channel, str(row["b"] or ""), str(row["s"] or ""), int(row["id"]))
        row = (await conn.rows("SELECT @@global.gtid_executed AS e, @@server_id AS id"))[0]
        return GtidState(f, channel, str(row["e"] or "").replace("\n", ""), "", int(row["id"]))

    async def _identity(self, timeout: float) -> str:
        # MariaDB has no @@server_uuid: server_id (unique in a replication set) with
        # where the server says it is.
        async def query(conn: _Conn, _: float) -> str:
            row = (
                await conn.rows(
                    "SELECT @@server_id AS id, @@hostname AS h, @@port AS p, @@datadir AS d"
                )
            )[0]
            return f"server_id {row['id']} on {row['h']}:{row['p']} in {row['d']}"

        return await self._probe("reading its server_id", timeout, query)

    async def divergence(self, new_primary: Engine, timeout: float) -> Divergence:
        new = await self._distinct_peer(new_primary, "divergence", min(timeout / 4, 2.0))
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            mine = await self._probe("divergence", timeout, self._gtid_state)
        except EngineError as exc:
            await self.status(self._remaining(deadline))  # raises when unreachable
            return Divergence(False, None, TRANSACTIONS, detail=f"cannot read its GTIDs: {exc}")
        if mine.channel is not None and _same_source(mine.channel, new.dsn):
            return Divergence(
                True,
                0,
                TRANSACTIONS,
                detail=f"already a replica of {new.where}: nothing to throw away",
            )
        try:
            theirs = await new._probe("divergence", self._remaining(deadline), new._gtid_state)
        except EngineError as exc:
            return Divergence(
                False, None, TRANSACTIONS, detail=f"cannot read the new primary: {exc}"
            )
        if mine.flavour.mariadb != theirs.flavour.mariadb:
            return Divergence(
                False,
                None,
                TRANSACTIONS,
                detail="one server is MariaDB, the other MySQL: GTIDs differ",
            )
        if mine.flavour.mariadb:
            return await self._maria_divergence(mine, theirs, deadline)
        return await self._mysql_divergence(mine, theirs, deadline)

    async def _maria_divergence(
        self, mine: GtidState, theirs: GtidState, deadline: float
    ) -> Divergence:
        """MariaDB GTIDs are domain-server-seq, one sequence per domain. The new primary's
        ``gtid_slave_pos`` is the last transaction it applied from the old one in each
        domain: the fork. Every GTID of the old primary's binary log past it (a higher
        seq in its domain) is a transaction the new primary never got."""
        head, fork = maria_pos(mine.binlog_pos), maria_pos(theirs.slave_pos)
        if not head:
            return Divergence(
                True, 0, TRANSACTIONS, detail="the old primary's binary log holds no GTID"
            )
        if not fork:
            return Divergence(
                False,
                None,
                TRANSACTIONS,
                detail="the new primary never applied a GTID (gtid_slave_pos is empty): "
                "what diverged cannot be told",
            )
        fork_text = theirs.slave_pos
        counted = sum(
            max(seq - fork.get(domain, (0, 0))[1], 0) for domain, (_, seq) in head.items()
        )

        async def scan(conn: _Conn, _: float) -> tuple[list[str], bool]:
            return await _maria_gtids_after(conn, fork)

        try:
            found, complete = await self._probe(
                "listing the diverged GTIDs", max(self._remaining(deadline) - 0.05, 0.01), scan
            )
        except EngineError as exc:
            found, complete, note = [], False, f" (GTIDs not listed: {exc})"
        else:
            note = (
                "" if complete else " (binary logs before the fork are gone: count from positions)"
            )
        lost = len(found) if complete else counted
        return _gtid_report(lost, found, f"gtid_slave_pos {fork_text} of the new primary", note)

    async def _mysql_divergence(
        self, mine: GtidState, theirs: GtidState, deadline: float
    ) -> Divergence:
        """MySQL GTIDs are sets: the old primary's gtid_executed minus the new primary's."""
        if not mine.binlog_pos:
            return Divergence(
                False,
                None,
                TRANSACTIONS,
                detail="gtid_executed is empty on the old primary (GTIDs off?)",
            )

        async def subtract(conn: _Conn, _: float) -> str:
            rows = await conn.rows(
                "SELECT GTID_SUBTRACT(%s, %s) AS d", (mine.binlog_pos, theirs.binlog_pos)
            )
            return str(rows[0]["d"] or "").replace("\n", "")

        diff = await self._probe("divergence", self._remaining(deadline), subtract)
        items = [part.strip() for part in diff.split(",") if part.strip()]
        return _gtid_report(mysql_gtid_count(diff), items, "the new primary's gtid_executed", "")

    async def rejoin(self, new_primary: Engine, timeout: float) -> str:
        new = await self._distinct_peer(new_primary, "rejoin", min(timeout / 4, 2.0))
        deadline = asyncio.get_running_loop().time() + timeout
        report = await self.divergence(new, timeout / 2)
        if report.diverged and not self._resync:
            raise EngineError(
                self._line(
                    f"rejoin: {report.detail}; SQL cannot take transactions back: set "
                    f"rejoin_fallback: dump on this node to resync it from {new.where} with "
                    f"mariadb-dump, or rebuild it from a backup of {new.where}, then rejoin"
                )
            )
        if report.diverged:
            why = f"{report.lost} diverged transaction(s) thrown away"
            return await self._resync_from(new, why, deadline)
        user, password = self._replication_login(new)

        async def action(conn: _Conn, deadline: float) -> str:
            f = conn.flavour
            if report.diverged is None and not f.mariadb:
                # MySQL has no dump fallback here: an unknown divergence is not a zero one.
                raise EngineError(
                    self._line(
                        f"rejoin: divergence unknown ({report.detail}); refusing to rejoin"
                        f" blind: rebuild it from a backup of {new.where}, then rejoin"
                    )
                )
            ch = await self._channel(conn)
            if ch is not None and _same_source(ch, new.dsn):
                if ch.io != "Yes" or ch.sql != "Yes":
                    self._check_sql_error(ch, "rejoin")
                    await conn.execute(f.channel_sql("START", ch.name))
                await self._until("rejoin", deadline, lambda: self._not_replicating(conn, new.dsn))
                return f"already a replica of {new.where}: replicating"
            done = []
            if ch is not None:
                await conn.execute(f.channel_sql("STOP", ch.name))
                await conn.execute(f.channel_sql("RESET", ch.name, tail="ALL"))
                done.append(f"left {ch.source}")
            if await self._read_only(conn) != (True, f.super_read_only):
                await self._set_read_only(conn)
                done.append("read_only turned on")
            net_timeout = await self._net_timeout(conn)
            heartbeat = keepalive_for(net_timeout) if net_timeout else None
            sql, args = f.change_source_sql(new.dsn, user, password, heartbeat)
            await conn.execute(sql, args)
            await conn.execute(f.channel_sql("START", ""))
            await self._until("rejoin", deadline, lambda: self._not_replicating(conn, new.dsn))
            mode = "GTID current_pos" if f.mariadb else "GTID auto-positioning"
            done.append(f"now a replica of {new.where} as {user} ({mode}), replicating")
            return "; ".join(done)

        try:
            return await self._admin("rejoin", self._remaining(deadline), action)
        except _GtidRefused as exc:
            # Nothing (known to have) diverged, yet the new primary cannot serve this
            # server's GTID position: its binary logs from there are purged, or the
            # divergence could not be told. The same fallback applies.
            if not self._resync:
                raise EngineError(
                    f"{exc}; set rejoin_fallback: dump on this node to resync it from"
                    f" {new.where} with mariadb-dump"
                ) from None
            why = "the new primary refused this server's GTID position (error 1236)"
            return await self._resync_from(new, why, deadline)

    def _replication_login(self, new: MySQLEngine) -> tuple[str, str | None]:
        return self._replication or new._replication or (new.dsn.user, new._password)

    async def _resync_from(self, new: MySQLEngine, why: str, deadline: float) -> str:
        """rejoin_fallback: dump. GTID positioning cannot take this server back (it
        diverged, or the new primary refused its position): replace its data with a
        consistent dump of the new primary, streamed from mariadb-dump into the mariadb
        client, and replicate from the dump's GTID position. Read-only first; every
        schema but SYSTEM_SCHEMAS is replaced. MariaDB only, checked first."""
        dump, client = _tool("mariadb-dump", "mysqldump"), _tool("mariadb", "mysql")
        if dump is None or client is None:
            missing = "mariadb-dump" if dump is None else "the mariadb client"
            raise EngineError(
                self._line(f"rejoin: rejoin_fallback: dump needs {missing} on this host (PATH)")
            )

        async def theirs(conn: _Conn, _: float) -> set[str]:
            self._check_mariadb(conn.flavour, new)
            await self._check_privileges(conn, DUMP_PRIVILEGES, new.where, "dump it")
            return await _schemas(conn)

        keep = await new._probe("listing schemas to copy", self._remaining(deadline), theirs)
        user, password = self._replication_login(new)

        async def action(conn: _Conn, deadline: float) -> str:
            f = conn.flavour
            self._check_mariadb(f, new)
            await self._check_privileges(conn, LOAD_PRIVILEGES, self.where, "load the dump")
            done = [why]
            if await self._read_only(conn) != (True, f.super_read_only):
                await self._set_read_only(conn)
                done.append("read_only turned on")
            killed = await self._kill_clients(conn)
            if killed:
                done.append(f"{killed} client connection(s) ended")
            ch = await self._channel(conn)
            if ch is not None:
                await conn.execute(f.channel_sql("STOP", ch.name))
                await conn.execute(f.channel_sql("RESET", ch.name, tail="ALL"))
                done.append(f"left {ch.source}")
            # Nothing of the resync goes to this server's binary log: the diverged
            # GTIDs stay there until RESET MASTER, so an interrupted resync is seen
            # as diverged again and redone from the start.
            await conn.execute("SET SESSION sql_log_bin = 0")
            dropped = sorted((await _schemas(conn)) - keep)
            for schema in dropped:
                await conn.execute(f"DROP DATABASE {_ident(schema)}")
            if dropped:
                done.append(f"dropped schema(s) the new primary lacks: {', '.join(dropped)}")
            gtid = await self._stream_dump(new, dump, client, deadline)
            done.append(
                f"copied {len(keep)} schema(s) from {new.where} with mariadb-dump"
                f" (GTID position {gtid or 'empty'})"
            )
            # The position first, then the binary log: until RESET MASTER the diverged
            # GTIDs still count (a retry resyncs again); after it, gtid_current_pos
            # is the dump's position (a retry is a plain GTID rejoin from there).
            await conn.execute("SET GLOBAL gtid_slave_pos = %s", (gtid,))
            await conn.execute("RESET MASTER")
            done.append("binary log reset")
            net_timeout = await self._net_timeout(conn)
            heartbeat = keepalive_for(net_timeout) if net_timeout else None
            sql, args = f.change_source_sql(new.dsn, user, password, heartbeat, "slave_pos")
            await conn.execute(sql, args)
            await conn.execute(f.channel_sql("START", ""))
            await self._until("rejoin", deadline, lambda: self._not_replicating(conn, new.dsn))
            done.append(f"now a replica of {new.where} as {user} (GTID slave_pos), replicating")
            return "resynced: " + "; ".join(done)

        return await self._admin("rejoin", self._remaining(deadline), action)

    def _check_mariadb(self, flavour: Flavour, new: MySQLEngine) -> None:
        if not flavour.mariadb:
            raise EngineError(
                self._line(
                    f"rejoin: rejoin_fallback: dump is implemented for MariaDB only (this is"
                    f" {flavour.label}): rebuild this server from a backup of {new.where},"
                    " then rejoin"
                )
            )

    async def _check_privileges(
        self, conn: _Conn, needed: tuple[str, ...], where: str, what: str
    ) -> None:
        """Global privileges the account lacks become one line, before anything changed:
        a dump that cannot see every schema would leave the rest behind or dropped."""
        have = {str(r["p"]) for r in await conn.rows(_OWN_PRIVILEGES_SQL)}
        missing = [p for p in needed if p not in have]
        if missing:
            raise EngineError(
                self._line(
                    f"rejoin: rejoin_fallback: dump needs {', '.join(missing)} ON *.* for"
                    f" the watchdogd account on {where} to {what}; nothing was changed"
                )
            )

    async def _stream_dump(self, new: MySQLEngine, dump: str, client: str, deadline: float) -> str:
        """``mariadb-dump`` of ``new`` piped through us into ``mariadb`` on this server
        (no copy of the data on disk); the dump's GTID position. Logins go in option
        files in a private directory, removed after: never on a command line."""
        secrets = self._secrets | new._secrets
        with tempfile.TemporaryDirectory(prefix="watchdogd-resync-") as private:
            source = _option_file(private, "source.cnf", new.dsn, new._password)
            target = _option_file(
                private,
                "target.cnf",
                self.dsn,
                self._password,
                init_command="SET SESSION sql_log_bin = 0",
            )
            dump_argv = [
                dump, f"--defaults-extra-file={source}", "--single-transaction",
                "--master-data=2", "--gtid", "--all-databases", "--add-drop-database",
                *(f"--ignore-database={s}" for s in sorted(SYSTEM_SCHEMAS)),
                "--routines", "--events", "--triggers",
            ]  # fmt: skip
            load_argv = [client, f"--defaults-extra-file={target}", "--batch"]
            procs: list[asyncio.subprocess.Process] = []
            errors: list[asyncio.Future[str]] = []
            try:
                dumper = await _spawn(dump_argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
                procs.append(dumper)
                loader = await _spawn(load_argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
                procs.append(loader)
                assert dumper.stdout and dumper.stderr and loader.stdin and loader.stderr
                errors += [
                    asyncio.ensure_future(_tail(dumper.stderr)),
                    asyncio.ensure_future(_tail(loader.stderr)),
                ]
                tail = await _relay(dumper.stdout, loader.stdin)
                if tail is None:  # the loader stopped reading: it failed
                    dumper.kill()
                dump_code, load_code = await dumper.wait(), await loader.wait()
                dump_err, load_err = [await e for e in errors]
            except OSError as exc:
                raise EngineError(
                    self._line(f"rejoin: cannot run {exc.filename or dump}: {exc.strerror}")
                ) from None
            finally:
                for proc in procs:
                    if proc.returncode is None:
                        with contextlib.suppress(ProcessLookupError):
                            proc.kill()
                for error in errors:
                    error.cancel()

        def failed(what: str, code: int, err: str) -> EngineError:
            return EngineError(
                self._line(f"rejoin: {what} failed (exit {code}): {mask(err, secrets) or '?'}")
            )

        if load_code != 0:
            raise failed(f"loading the dump into {self.where} with {client}", load_code, load_err)
        if dump_code != 0 or tail is None:
            raise failed(f"mariadb-dump of {new.where}", dump_code, dump_err)
        found = _DUMP_GTID.findall(tail)
        if not found:
            raise EngineError(
                self._line(f"rejoin: the dump of {new.where} did not say its GTID position")
            )
        return str(found[-1].decode().replace(" ", ""))

    async def _not_replicating(self, conn: _Conn, dsn: MySQLDsn) -> str | None:
        """None when replicating from ``dsn``; why not otherwise. A stopped thread
        with an error fails at once: it will not fix itself."""
        ch = await self._channel(conn)
        if ch is None or not _same_source(ch, dsn):
            return f"not a replica of {dsn.where}"
        if ch.io == "No" and ch.io_error:
            refused = _GtidRefused if ch.io_errno == _GTID_REFUSED else EngineError
            raise refused(self._line(f"replication from {dsn.where} failed: {ch.io_error}"))
        self._check_sql_error(ch, "replication")
        if ch.io != "Yes" or ch.sql != "Yes":
            why = f"replication from {dsn.where} not running: IO {ch.io}, SQL {ch.sql}"
            return why + (f" ({ch.io_error})" if ch.io_error else "")
        if not ch.recv_file:
            # The IO thread shows Yes while the source still checks the position it
            # asked for (and may refuse it, error 1236); the source's first event
            # (a rotate naming its binary log) says it accepted.
            return f"connected to {dsn.where}, waiting for its first event"
        return None

    async def replica_of(self, new_primary: Engine, timeout: float) -> str:
        new, target, deadline = await self._replica_target(
            new_primary, timeout, "a primary with a binary log"
        )

        async def query(conn: _Conn, _: float) -> int | None:
            why = await self._not_replicating(conn, new.dsn)
            if why is not None:
                raise EngineError(self._line(f"replica_of: {why}"))
            read_only, super_ro = await self._read_only(conn)
            if not (read_only or super_ro):
                raise EngineError(
                    self._line(
                        f"replica_of: replicating from {new.where} but read_only is off:"
                        " clients can still write to it"
                    )
                )
            ch = await self._channel(conn)
            assert ch is not None
            return ch.replay_pos

        applied = await self._caught_up(
            deadline,
            target,
            query,
            lambda at: f"applied {format_pos(at)} of {new.where}'s {format_pos(target)}",
        )
        return f"replica of {new.where}, applied up to {format_pos(applied)}"


TRANSACTIONS = "transactions"
# ER_MASTER_FATAL_ERROR_READING_BINLOG: the source cannot serve the requested position.
_GTID_REFUSED = 1236


class _GtidRefused(EngineError):
    """The new primary refused the replica's GTID position (error 1236)."""


def _tool(*names: str) -> str | None:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    return None


def _ident(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


async def _schemas(conn: _Conn) -> set[str]:
    """The server's schemas but SYSTEM_SCHEMAS."""
    rows = await conn.rows("SHOW DATABASES")
    return {str(next(iter(r.values()))) for r in rows} - SYSTEM_SCHEMAS


def _option_value(value: str) -> str:
    """A value of a MySQL option file, quoted (the readers unescape these)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\n", "\\n").replace("\r", "\\r") + '"'


def _option_file(
    directory: str, name: str, dsn: MySQLDsn, password: str | None, **extra: str
) -> str:
    """A ``[client]`` option file with a login, mode 0600: the password never
    appears in a command line (``ps``) or the environment."""
    lines = [
        "[client]",
        f"host={_option_value(dsn.host)}",
        f"port={dsn.port}",
        "protocol=TCP",
        f"user={_option_value(dsn.user)}",
    ]
    if password:
        lines.append(f"password={_option_value(password)}")
    lines += [f"{key.replace('_', '-')}={_option_value(v)}" for key, v in extra.items()]
    path = os.path.join(directory, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


async def _spawn(argv: list[str], **streams: Any) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *argv, stderr=subprocess.PIPE, start_new_session=True, **streams
    )


async def _tail(stream: asyncio.StreamReader) -> str:
    """A program's stderr, read to the end; its last non-empty line."""
    data = await stream.read()
    lines = [ln.strip() for ln in data.decode(errors="replace").splitlines() if ln.strip()]
    return _one_line(lines[-1], 300) if lines else ""


async def _relay(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> bytes | None:
    """Copy ``src`` into ``dst`` until ``src`` ends; the last bytes copied, or None when
    ``dst`` stopped reading first (its program ended)."""
    tail = b""
    try:
        while chunk := await src.read(65536):
            tail = (tail + chunk)[-_DUMP_TAIL:]
            dst.write(chunk)
            await dst.drain()
        dst.close()
        await dst.wait_closed()
    except (BrokenPipeError, ConnectionResetError):
        return None
    return tail


@dataclass(frozen=True)
class GtidState:
    """A server's GTID position: MariaDB ``gtid_binlog_pos`` and ``gtid_slave_pos``,
    MySQL ``gtid_executed`` (in ``binlog_pos``)."""

    flavour: Flavour
    channel: Channel | None
    binlog_pos: str
    slave_pos: str
    server_id: int


def _same_source(ch: Channel, dsn: MySQLDsn) -> bool:
    return ch.host == dsn.host and (ch.port or DEFAULT_PORT) == dsn.port


def maria_pos(text: str) -> dict[int, tuple[int, int]]:
    """``'0-1-12,1-3-7'`` as {domain: (server_id, seq_no)}."""
    out: dict[int, tuple[int, int]] = {}
    for part in text.replace("\n", "").split(","):
        m = re.fullmatch(r"\s*(\d+)-(\d+)-(\d+)\s*", part)
        if m:
            out[int(m.group(1))] = (int(m.group(2)), int(m.group(3)))
    return out


BINLOG_PAGE = 1000  # events per SHOW BINLOG EVENTS: a whole binary log can be 1 GB


async def _binlog_events(conn: _Conn, name: str) -> AsyncIterator[dict[str, Any]]:
    """The events of binary log ``name``, read a page at a time (``FROM`` the end of
    the last one read, ``LIMIT BINLOG_PAGE``), not the whole file into memory."""
    pos: int | None = None
    while True:
        if pos is None:
            rows = await conn.rows("SHOW BINLOG EVENTS IN %s LIMIT %s", (name, BINLOG_PAGE))
        else:
            rows = await conn.rows(
                "SHOW BINLOG EVENTS IN %s FROM %s LIMIT %s", (name, pos, BINLOG_PAGE)
            )
        for row in rows:
            yield row
        if len(rows) < BINLOG_PAGE:
            return
        pos = int(rows[-1]["End_log_pos"])


async def _maria_gtids_after(
    conn: _Conn, fork: Mapping[int, tuple[int, int]]
) -> tuple[list[str], bool]:
    """The GTIDs of this server's binary logs past ``fork``, oldest first; and whether
    the scan reached back to the fork (the logs from then on are all still there).
    Newest log first, stopping at a log whose starting GTID list is not past the fork."""
    files = [str(r["Log_name"]) for r in await conn.rows("SHOW BINARY LOGS")]
    chunks: list[list[str]] = []
    for name in reversed(files):
        gtids: list[str] = []
        start: dict[int, tuple[int, int]] | None = None
        async for row in _binlog_events(conn, name):
            if row["Event_type"] == "Gtid_list" and start is None:
                start = maria_pos(str(row["Info"]).strip("[]"))
            elif row["Event_type"] == "Gtid":
                gtid = str(row["Info"]).split()[-1]
                parsed = maria_pos(gtid)
                if any(seq > fork.get(d, (0, 0))[1] for d, (_, seq) in parsed.items()):
                    gtids.append(gtid)
        chunks.append(gtids)
        if start is not None and all(
            seq <= fork.get(d, (0, 0))[1] for d, (_, seq) in start.items()
        ):
            return [g for chunk in reversed(chunks) for g in chunk], True
    # Reached the oldest log: complete only if it starts from nothing.
    return [g for chunk in reversed(chunks) for g in chunk], bool(files) and start == {}


def mysql_gtid_count(gtid_set: str) -> int:
    """Transactions in a MySQL GTID set (``uuid:1-5:7,uuid2:3``)."""
    total = 0
    for member in gtid_set.split(","):
        for interval in member.strip().split(":")[1:]:
            if re.fullmatch(r"\d+-\d+", interval):
                lo, hi = map(int, interval.split("-"))
                total += hi - lo + 1
            elif interval.isdigit():
                total += 1
    return total


def _gtid_report(lost: int, found: list[str], fork: str, note: str) -> Divergence:
    items = tuple(found[:DIVERGENCE_ITEMS_CAP])
    if len(found) > DIVERGENCE_ITEMS_CAP:
        note += f" (first {DIVERGENCE_ITEMS_CAP} listed)"
    if not lost:
        return Divergence(
            True,
            0,
            TRANSACTIONS,
            detail=f"nothing past {fork}: the new primary has every transaction{note}",
        )
    shown = ", ".join(items[:5]) + (", ..." if len(items) > 5 else "")
    listed = f" ({shown})" if shown else ""
    return Divergence(
        True,
        lost,
        TRANSACTIONS,
        items=items,
        detail=(
            f"old primary wrote {lost} transaction(s) past {fork} that the new primary"
            f" never got{listed}{note}"
        ),
    )
