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

Rejoin (the old primary after a failover): ``divergence`` is the old primary's
WAL past the fork the new primary's timeline history names, with the commits in
it read by pg_waldump; ``rejoin`` works on the server's host (``data_dir``,
``stop_command``, ``start_command``, ``run_as``, ``bin_dir``): stop, pg_rewind
(or a base backup with ``rewind_fallback: basebackup``), standby configuration,
start, wait for streaming. pg_rewind's prerequisites are checked before stopping.

The role needs superuser, or: pg_monitor (pg_stat_wal_receiver details,
primary_conninfo), EXECUTE on pg_promote / pg_wal_replay_resume / pg_reload_conf,
ALTER SYSTEM on primary_conninfo and default_transaction_read_only, and
pg_signal_backend (the README has the GRANT lines).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import SplitResult, parse_qsl, unquote, urlsplit, urlunsplit

import asyncpg

from watchdogd.engines import DIVERGENCE_ITEMS_CAP, DbStatus, Divergence, Engine, EngineError
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


# The WAL position and role of a server, and its WAL receiver: what rejoin compares.
WAL_STATE_SQL = """
SELECT
  r.rec,
  pg_wal_lsn_diff(
    CASE WHEN r.rec THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END, '0/0') AS pos,
  CASE WHEN r.rec THEN coalesce(w.received_tli, (SELECT timeline_id FROM pg_control_checkpoint()))
    ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END AS tli,
  w.status, w.sender_host, w.sender_port
FROM (SELECT pg_is_in_recovery() AS rec) AS r
LEFT JOIN pg_stat_wal_receiver AS w ON true
"""


@dataclass(frozen=True)
class WalState:
    in_recovery: bool
    position: int  # primary: current WAL position; standby: replayed up to
    timeline: int
    receiver: str  # the WAL receiver's status, "absent" without one
    sender: tuple[str, int] | None

    @classmethod
    def from_row(cls, row: Any) -> WalState:
        sender = (
            (str(row["sender_host"]), int(row["sender_port"]))
            if row["sender_host"] is not None and row["sender_port"] is not None
            else None
        )
        return cls(
            in_recovery=bool(row["rec"]),
            position=int(row["pos"] or 0),
            timeline=int(row["tli"] or 0),
            receiver=str(row["status"] or "absent"),
            sender=sender,
        )

    @property
    def streaming(self) -> bool:
        return self.receiver == "streaming"


def parse_history(text: str) -> dict[int, int]:
    """A timeline history file: {parent timeline: the LSN where it was left}."""
    switches: dict[int, int] = {}
    for line in text.splitlines():
        m = re.match(r"\s*(\d+)\s+([0-9A-Fa-f]+)/([0-9A-Fa-f]+)", line)
        if m:
            switches[int(m.group(1))] = (int(m.group(2), 16) << 32) + int(m.group(3), 16)
    return switches


GROUP_GRACE = 2.0  # seconds a host program's group has to end on SIGTERM before SIGKILL


async def _end_group(proc: asyncio.subprocess.Process) -> None:
    """End a host program cut off by a timeout, with everything it started: its whole
    process group (its own session), not only the direct child. As root that child is
    ``runuser``, which cannot pass SIGKILL on: pg_rewind or pg_basebackup would go on
    writing the data directory while a retry starts on it. SIGTERM, a short grace, then
    SIGKILL; the child is always reaped. (A server started by ``pg_ctl start`` is in a
    session of its own and is not touched.)"""

    def signal_group(sig: int) -> bool:
        """Whether any process of the group is left (signal 0 only asks)."""
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        signal_group(sig)
        until = loop.time() + GROUP_GRACE
        while (proc.returncode is None or signal_group(0)) and loop.time() < until:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(proc.wait()), 0.05)
        if proc.returncode is not None and not signal_group(0):
            break
    await proc.wait()


class HostError(Exception):
    """A program on the server's host (pg_ctl, pg_rewind, ...) failed; one line."""


@dataclass(frozen=True)
class HostSide:
    """The server's host, for rejoin: its data directory, the PostgreSQL programs,
    how to stop and start it, and the user they run as."""

    data_dir: Path
    bin_dir: Path | None = None
    stop_command: tuple[str, ...] = ()
    start_command: tuple[str, ...] = ()
    run_as: str | None = None
    basebackup: bool = False

    def as_user(self) -> list[str]:
        """``runuser`` to the data directory's owner (or ``run_as``) when we are root:
        PostgreSQL's programs refuse to run as root."""
        if os.geteuid() != 0:
            return []
        user = self.run_as
        if user is None:
            try:
                uid = self.data_dir.stat().st_uid
            except OSError:
                return []
            user = pwd.getpwuid(uid).pw_name if uid != 0 else None
        return ["runuser", "-u", user, "--"] if user and user != "root" else []

    def tool(self, name: str) -> str:
        """A PostgreSQL program: in bin_dir, else of the data directory's version, else on PATH."""
        candidates = []
        if self.bin_dir is not None:
            candidates.append(self.bin_dir / name)
        else:
            with contextlib.suppress(OSError):
                version = (self.data_dir / "PG_VERSION").read_text().strip()
                candidates.append(Path(f"/usr/lib/postgresql/{version}/bin") / name)
            on_path = shutil.which(name)
            if on_path:
                candidates.append(Path(on_path))
        for path in candidates:
            if path.exists():
                return str(path)
        raise HostError(f"{name} not found: set database.bin_dir")

    def stop(self, timeout: float) -> list[str]:
        if self.stop_command:
            return list(self.stop_command)
        pg_ctl, wait = self.tool("pg_ctl"), str(max(1, int(timeout)))
        return [*self.as_user(), pg_ctl, "stop", "-D", str(self.data_dir), "-m", "fast", "-w",
                "-t", wait]  # fmt: skip

    def start(self, timeout: float) -> list[str]:
        if self.start_command:
            return list(self.start_command)
        log = str(self.data_dir / "watchdogd-start.log")
        pg_ctl, wait = self.tool("pg_ctl"), str(max(1, int(timeout)))
        return [*self.as_user(), pg_ctl, "start", "-D", str(self.data_dir), "-w", "-t", wait,
                "-l", log]  # fmt: skip

    def running(self) -> bool:
        """A live postmaster holds the data directory (its pid file names a live process)."""
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return False
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            return False
        except OSError:
            return True  # cannot tell: assume it runs, so it gets stopped properly
        return stat[stat.rfind(")") + 2 :].split()[0] != "Z"  # a zombie holds nothing

    async def run(
        self,
        argv: Sequence[str],
        what: str,
        timeout: float,
        *,
        env: Mapping[str, str] | None = None,
        check: bool = True,
    ) -> str:
        """Run ``argv`` within ``timeout``; its output. Output goes to a file, not a
        pipe: a server started by ``pg_ctl start`` keeps its inherited descriptors."""
        with tempfile.TemporaryFile() as out:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, **(env or {})},
                    start_new_session=True,
                )
            except OSError as exc:
                raise HostError(f"{what}: cannot run {argv[0]}: {exc.strerror}") from None
            try:
                async with asyncio.timeout(timeout):
                    code = await proc.wait()
            except BaseException:
                await _end_group(proc)
                raise
            out.seek(0)
            text = out.read().decode(errors="replace")
        if check and code != 0:
            raise HostError(f"{what} failed (exit {code}): {_last_line(text)}")
        return text

    async def controldata(self, timeout: float) -> dict[str, str]:
        out = await self.run(
            [*self.as_user(), self.tool("pg_controldata"), "-D", str(self.data_dir)],
            "pg_controldata",
            timeout,
        )
        return {
            key.strip(): value.strip()
            for key, sep, value in (line.partition(":") for line in out.splitlines())
            if sep
        }

    def _owned_like_data_dir(self, path: Path) -> None:
        if os.geteuid() == 0:
            st = self.data_dir.stat()
            os.chown(path, st.st_uid, st.st_gid)

    def standby_of(self, host: str, port: int) -> bool:
        """The data directory is set up as a standby of ``host:port`` (standby.signal,
        and the last primary_conninfo of postgresql.auto.conf names it)."""
        if not (self.data_dir / "standby.signal").exists():
            return False
        try:
            lines = (self.data_dir / "postgresql.auto.conf").read_text().splitlines()
        except OSError:
            return False
        conninfo = [ln for ln in lines if ln.strip().startswith("primary_conninfo")]
        if not conninfo:
            return False
        words = dict(re.findall(r"(\w+)=([^\s']+)", conninfo[-1]))
        return words.get("host") == host and words.get("port", "5432") == str(port)

    def write_standby_config(self, conninfo: str) -> None:
        """standby.signal, and primary_conninfo in postgresql.auto.conf (replacing any)."""
        signal = self.data_dir / "standby.signal"
        signal.touch()
        self._owned_like_data_dir(signal)
        auto = self.data_dir / "postgresql.auto.conf"
        try:
            lines = auto.read_text().splitlines()
        except FileNotFoundError:
            lines = []
        kept = [ln for ln in lines if not ln.strip().startswith("primary_conninfo")]
        value = conninfo.replace("\\", "\\\\").replace("'", "''")
        existed = auto.exists()
        with auto.open("w") as f:  # in place: the file keeps its owner
            f.writelines(f"{ln}\n" for ln in kept)
            f.write(f"primary_conninfo = '{value}'\n")
        if not existed:
            auto.chmod(0o600)  # it holds a password
            self._owned_like_data_dir(auto)

    async def basebackup_from(self, conninfo: str, env: Mapping[str, str], timeout: float) -> None:
        """Replace the data directory with a fresh base backup of the new primary,
        taken beside it first so a failed backup leaves the old one in place."""
        fresh = self.data_dir.with_name(self.data_dir.name + ".rejoin-new")
        stale = self.data_dir.with_name(self.data_dir.name + ".rejoin-old")
        for leftover in (fresh, stale):
            await asyncio.to_thread(shutil.rmtree, leftover, True)
        await self.run(
            [*self.as_user(), self.tool("pg_basebackup"), "-D", str(fresh), "-d", conninfo,
             "-X", "stream", "-c", "fast"],
            "pg_basebackup", timeout, env=env,
        )  # fmt: skip
        self.data_dir.rename(stale)
        fresh.rename(self.data_dir)
        await asyncio.to_thread(shutil.rmtree, stale, True)


def _rewind_refusal(control: Mapping[str, str], source: Mapping[str, str]) -> str | None:
    """Why pg_rewind cannot rewind this data directory from that source, or None."""
    checksums = control.get("Data page checksum version", "0") not in ("", "0")
    if not checksums and control.get("wal_log_hints setting") != "on":
        return (
            "pg_rewind needs wal_log_hints = on or data checksums on this server, and both"
            " are off: ALTER SYSTEM SET wal_log_hints = on; then restart it"
        )
    if source.get("full_page_writes") != "on":
        return "pg_rewind needs full_page_writes = on on the new primary"
    return None


def _rewind_summary(out: str) -> str:
    lines = [ln.removeprefix("pg_rewind: ").strip() for ln in out.splitlines() if ln.strip()]
    for line in lines:
        if "diverged" in line or "no rewind required" in line:
            return line
    return lines[-1] if lines else "done"


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for line in lines:
        if re.search(r"\b(error|fatal|FATAL|ERROR)\b", line):
            return line
    return lines[-1] if lines else "(no output)"


def _conninfo_word(key: str, value: str) -> str:
    if re.fullmatch(r"[\w.:/@-]+", value):
        return f"{key}={value}"
    return f"{key}='" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _conninfo_with(conninfo: str, password: str | None) -> str:
    return f"{conninfo} {_conninfo_word('password', password)}" if password else conninfo


# --------------------------------------------------------------------------- module contract


def validate(section: Section) -> Mapping[str, Any]:
    """Extra keys of a ``database:`` section with ``engine: postgres``: the password,
    and for rejoin the server's host side (data_dir and how to stop and start it)."""
    options = dict(validate_password(section, _dsn_password))
    for key in ("data_dir", "bin_dir"):
        path = section.str(key, None)
        if path is not None and not path.startswith("/"):
            section.error(f"expected an absolute path, got {path!r}", key)
        elif path is not None:
            options[key] = path
    for key in ("stop_command", "start_command"):
        argv = section.str_list(key, None)
        if argv is not None and (not argv or not argv[0]):
            verb = key.split("_")[0]
            section.error(
                f"expected a program and its arguments, e.g. [systemctl, {verb}, postgresql]", key
            )
        elif argv is not None:
            options[key] = tuple(argv)
    run_as = section.str("run_as", None)
    if run_as is not None:
        options["run_as"] = run_as
    if section.choice("rewind_fallback", ("basebackup", "none"), "none") == "basebackup":
        options["rewind_fallback"] = "basebackup"
    host_keys = ("bin_dir", "stop_command", "start_command", "run_as")
    if "data_dir" not in options and any(k in options for k in host_keys):
        section.error(
            "is required with bin_dir, stop_command, start_command and run_as", "data_dir"
        )
    return options


def _dsn_password(dsn: str) -> str | None:
    problem = _dsn_problem(dsn)
    if problem:
        raise ValueError(problem)
    return urlsplit(dsn).password


def create(db: DatabaseConfig, secrets: set[str]) -> PostgresEngine:
    password = db.options.get("password")
    o = db.options
    host = (
        HostSide(
            data_dir=Path(o["data_dir"]),
            bin_dir=Path(o["bin_dir"]) if o.get("bin_dir") else None,
            stop_command=tuple(o.get("stop_command", ())),
            start_command=tuple(o.get("start_command", ())),
            run_as=o.get("run_as"),
            basebackup=o.get("rewind_fallback") == "basebackup",
        )
        if o.get("data_dir")
        else None
    )
    return PostgresEngine(
        db.dsn, password=str(password) if password else None, secrets=secrets, host=host
    )


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
        host: HostSide | None = None,
    ) -> None:
        super().__init__("postgres", _where(dsn), secrets, password, _inline_password(dsn))
        self._dsn = dsn
        self._password = password
        self._host = host
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

    async def standby_reply_mark(
        self, timeout: float, addresses: Sequence[str] = ()
    ) -> float | None:
        """The guard's sign of life from the standby: the newest ``reply_time`` (epoch
        seconds, the standby's own clock) among physical replication connections
        streaming from ``addresses`` (the configured standby's), None when none does (or
        the role cannot see pg_stat_replication's columns). Another client of the WAL in
        the primary's own site (pg_receivewal, a backup tool, a second replica, a
        logical subscriber) is no sign that the primary is reachable from the standby's
        site: counting it kept an isolated guard from ever fencing. Only compared with
        itself: a value that grew between two reads proves a reply arrived between
        them, whatever the clocks of the two hosts say."""
        if not addresses:
            return None

        async def query(conn: Any, deadline: float) -> float | None:
            value = await conn.fetchval(
                "SELECT extract(epoch FROM max(r.reply_time))::float8"
                " FROM pg_stat_replication r"
                " WHERE r.state = 'streaming' AND r.client_addr = ANY($1::inet[])"
                " AND NOT EXISTS (SELECT 1 FROM pg_replication_slots s"
                " WHERE s.active_pid = r.pid AND s.slot_type = 'logical')",
                list(addresses),
                timeout=self._remaining(deadline),
            )
            return None if value is None else float(value)

        return await self._probe("reading pg_stat_replication", timeout, query)

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
        lines = await self._rewind_advice(timeout)
        if status.is_primary:
            return lines
        text = await self.setting("wal_receiver_timeout", timeout)
        seconds = pg_duration_seconds(text)
        if seconds is None or 0 < seconds <= outage_threshold:
            return lines
        after = "never" if seconds == 0 else f"only after {text}"
        value = confirm_within(outage_threshold)
        return [
            *lines,
            f"wal_receiver_timeout is {text} on this standby: a hung primary is confirmed "
            f"{after}, not within the outage threshold ({outage_threshold:g}s). To confirm "
            f"it in time, on the standby: ALTER SYSTEM SET wal_receiver_timeout = '{value}s'; "
            "SELECT pg_reload_conf();",
        ]

    async def _rewind_advice(self, timeout: float) -> list[str]:
        """With data_dir set this node may be rejoined with pg_rewind, which needs
        wal_log_hints or data checksums: say so now, not when a rejoin is refused."""
        if self._host is None:
            return []
        hints = await self.setting("wal_log_hints", timeout)
        checksums = await self.setting("data_checksums", timeout)
        if hints == "on" or checksums == "on":
            return []
        fallback = (
            "its rejoin falls back to a full base backup"
            if self._host.basebackup
            else "its rejoin will be refused"
        )
        return [
            "wal_log_hints and data checksums are both off on this server: pg_rewind cannot "
            f"rewind it after a failover, so {fallback}. To allow it: ALTER SYSTEM SET "
            "wal_log_hints = on; then restart the server"
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

    # -- Engine: rejoin (self is the old primary)

    async def _where_now(self, timeout: float) -> WalState:
        async def query(conn: Any, deadline: float) -> WalState:
            row = await conn.fetchrow(WAL_STATE_SQL, timeout=self._remaining(deadline))
            return WalState.from_row(row)

        return await self._probe("reading the WAL position", timeout, query)

    def _follows(self, state: WalState) -> bool:
        """``state`` (of a standby) streams from this server."""
        host, port = self._host_port()
        return state.in_recovery and state.sender == (host, port)

    def _host_port(self) -> tuple[str, int]:
        parts = urlsplit(self._dsn)
        host = parts.hostname or dict(parse_qsl(parts.query)).get("host") or "localhost"
        return host, parts.port or 5432

    async def _identity(self, timeout: float) -> str:
        # The system identifier is shared with every physical replica: the postmaster's
        # start time (to the microsecond) and port tell two servers apart instead.
        async def query(conn: asyncpg.Connection, deadline: float) -> str:
            row = await conn.fetchrow(
                "SELECT current_setting('port') AS port, pg_postmaster_start_time() AS up",
                timeout=self._remaining(deadline),
            )
            assert row is not None
            return f"port {row['port']}, up since {row['up'].isoformat()}"

        return await self._probe("reading its identity", timeout, query)

    async def divergence(self, new_primary: Engine, timeout: float) -> Divergence:
        new = await self._distinct_peer(new_primary, "divergence", min(timeout / 4, 2.0))
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            mine = await self._where_now(timeout)
        except EngineError as exc:
            await self.status(self._remaining(deadline))  # raises when unreachable
            return Divergence(False, None, "bytes", detail=f"cannot read its WAL position: {exc}")
        if new._follows(mine) and mine.streaming:
            return Divergence(
                True, 0, "bytes", detail=f"already a replica of {new.where}: nothing to throw away"
            )
        try:
            history = await new._history(self._remaining(deadline))
        except EngineError as exc:
            return Divergence(False, None, "bytes", detail=f"cannot read the new primary: {exc}")
        if isinstance(history, str):
            return Divergence(False, None, "bytes", detail=history)
        timeline, switches, new_pos = history
        if mine.timeline == timeline:
            fork, where = new_pos, f"the new primary's position {format_lsn(new_pos)}"
        elif mine.timeline in switches:
            fork = switches[mine.timeline]
            where = f"the fork at {format_lsn(fork)} on timeline {mine.timeline}"
        else:
            return Divergence(
                False,
                None,
                "bytes",
                detail=f"the old primary's timeline {mine.timeline} is not in the new primary's"
                f" history (timeline {timeline}): what diverged cannot be told",
            )
        lost = max(mine.position - fork, 0)
        if not lost:
            return Divergence(
                True, 0, "bytes", detail=f"nothing past {where}: the new primary has all of its WAL"
            )
        xids, note = await self._transactions(mine.timeline, fork, mine.position, deadline)
        if xids == []:
            # Checkpoints (a restart writes one), standby snapshots and the like: WAL
            # the new primary lacks, but no write anyone was told had committed.
            return Divergence(
                True,
                0,
                "bytes",
                detail=f"nothing past {where} but {lost} bytes of WAL without a committed"
                " transaction (checkpoints and bookkeeping, read with pg_waldump)",
            )
        return Divergence(
            True,
            lost,
            "bytes",
            items=tuple(f"xid {x}" for x in (xids or [])[:DIVERGENCE_ITEMS_CAP]),
            detail=f"old primary wrote {lost} bytes of WAL past {where} ({note})",
        )

    async def _history(self, timeout: float) -> tuple[int, dict[int, int], int] | str:
        """This (new) primary's timeline, where each earlier timeline of its history
        ended, and its current position; or why that cannot be read."""

        async def query(conn: Any, deadline: float) -> tuple[int, dict[int, int], int] | str:
            state = WalState.from_row(
                await conn.fetchrow(WAL_STATE_SQL, timeout=self._remaining(deadline))
            )
            if state.in_recovery:
                return "the new primary is still in recovery"
            if state.timeline == 1:
                return 1, {}, state.position
            try:
                text = await conn.fetchval(
                    "SELECT pg_read_file($1)",
                    f"pg_wal/{state.timeline:08X}.history",
                    timeout=self._remaining(deadline),
                )
            except asyncpg.PostgresError as exc:
                return (
                    f"cannot read the new primary's timeline history ({_reason(exc)}): grant"
                    " its role pg_read_server_files"
                )
            return state.timeline, parse_history(str(text)), state.position

        return await self._probe("reading the timeline history", timeout, query)

    async def _transactions(
        self, timeline: int, start: int, end: int, deadline: float
    ) -> tuple[list[int] | None, str]:
        """The transactions committed (or prepared) in ``start``..``end`` of ``timeline``,
        read with pg_waldump from the local data_dir; None, and why, when they cannot
        be read (optional: the bytes are the report, this is its detail)."""
        if self._host is None:
            return None, "transactions: count unknown without database.data_dir"
        try:
            tool = self._host.tool("pg_waldump")
            out = await self._host.run(
                [*self._host.as_user(), tool, "--path", str(self._host.data_dir / "pg_wal"),
                 "--timeline", str(timeline), "--start", format_lsn(start), "--end",
                 format_lsn(end), "--rmgr", "Transaction"],
                "pg_waldump", min(self._remaining(deadline), 10.0),
            )  # fmt: skip
        except HostError as exc:
            return None, f"transactions: count unknown ({exc})"
        xids = [
            int(m.group(1)) for m in re.finditer(r"tx:\s*(\d+),.*desc: (?:COMMIT|PREPARE)", out)
        ]
        capped = (
            f", first {DIVERGENCE_ITEMS_CAP} listed" if len(xids) > DIVERGENCE_ITEMS_CAP else ""
        )
        return xids, f"{len(xids)} transaction(s) committed{capped}"

    async def rejoin(self, new_primary: Engine, timeout: float) -> str:
        new = await self._distinct_peer(new_primary, "rejoin", min(timeout / 4, 2.0))
        if self._host is None:
            raise EngineError(
                self._line(
                    "rejoin on PostgreSQL needs database.data_dir on this node (the watcher must"
                    " run beside it); see the docs' PostgreSQL page for the SSH variant"
                )
            )
        host = self._host

        async def body(deadline: float) -> str:
            async with self._admin_lock:
                return await self._rejoin(new, host, deadline)

        return await self._bounded("rejoin", timeout, body)

    async def _rejoin(self, new: PostgresEngine, host: HostSide, deadline: float) -> str:
        source = await new._source_facts(self._remaining(deadline))
        conninfo, password = new.libpq_conninfo()
        try:
            mine: WalState | None = await self._where_now(min(self._remaining(deadline), 5.0))
        except EngineError:
            mine = None  # down: rewound from its data_dir alone
        if mine is not None and mine.in_recovery:
            if not new._follows(mine):
                await self._point_at(conninfo, password, deadline)
                await self._wait_streaming(new, deadline)
                return f"was a standby of another server: now streams from {new.where}"
            await self._wait_streaming(new, deadline)
            return f"already a replica of {new.where}: streaming"
        if mine is None and not host.running() and host.standby_of(*new._host_port()):
            # An earlier rejoin got as far as the standby configuration: only start it.
            await host.run(
                host.start(self._remaining(deadline)),
                "starting the server",
                self._remaining(deadline),
            )
            await self._wait_streaming(new, deadline)
            return f"started the configured standby; streaming from {new.where}"
        control = await host.controldata(self._remaining(deadline))
        if control.get("Database system identifier") != source["system_identifier"]:
            raise EngineError(
                self._line(f"rejoin: {new.where} is a different cluster (system identifier)")
            )
        why_not = _rewind_refusal(control, source)
        if why_not and not host.basebackup:
            raise EngineError(self._line(f"rejoin: {why_not} (or set rewind_fallback: basebackup)"))
        # Everything that can fail without touching the server, before it is stopped.
        rewind = None if why_not else host.tool("pg_rewind")
        if host.basebackup:
            host.tool("pg_basebackup")
        start = host.start(self._remaining(deadline))
        if rewind is not None:
            # A just-promoted primary's control file still names the old timeline until
            # its first checkpoint, and pg_rewind would then find nothing to rewind.
            await new._checkpoint(self._remaining(deadline))
        done = []
        if host.running():
            await host.run(
                host.stop(self._remaining(deadline)),
                "stopping the server",
                self._remaining(deadline),
            )
            done.append("stopped the server")
        await self._drop()
        env = {"PGPASSWORD": password} if password else {}
        rewound = False
        if rewind is None:
            done.append(f"pg_rewind impossible ({why_not})")
        else:
            try:
                out = await host.run(
                    [*host.as_user(), rewind, "--target-pgdata",
                     str(host.data_dir), "--source-server", conninfo],
                    "pg_rewind", self._remaining(deadline), env=env,
                )  # fmt: skip
            except HostError as exc:
                if not host.basebackup:
                    raise HostError(f"{exc}; the server is left stopped") from None
                done.append(f"pg_rewind failed ({exc})")
            else:
                rewound = True
                done.append(f"pg_rewind: {_rewind_summary(out)}")
        if not rewound:
            await host.basebackup_from(conninfo, env, self._remaining(deadline))
            done.append("replaced the data directory with a base backup of the new primary")
        await asyncio.to_thread(host.write_standby_config, _conninfo_with(conninfo, password))
        await host.run(start, "starting the server", self._remaining(deadline))
        await self._wait_streaming(new, deadline)
        done.append(f"started as a standby streaming from {new.where}")
        return "; ".join(done)

    async def _source_facts(self, timeout: float) -> dict[str, str]:
        """What pg_rewind needs of the new primary, checked before anything is stopped."""

        async def query(conn: Any, deadline: float) -> dict[str, str]:
            row = await conn.fetchrow(
                "SELECT pg_is_in_recovery() AS rec, current_setting('full_page_writes') AS fpw,"
                " (SELECT system_identifier FROM pg_control_system())::text AS sysid",
                timeout=self._remaining(deadline),
            )
            if row["rec"]:
                raise EngineError(self._line("rejoin: this server is not a primary (in recovery)"))
            return {"full_page_writes": str(row["fpw"]), "system_identifier": str(row["sysid"])}

        return await self._probe("rejoin", timeout, query)

    async def _checkpoint(self, timeout: float) -> None:
        async def action(conn: Any, deadline: float) -> None:
            await conn.execute("CHECKPOINT", timeout=self._remaining(deadline))

        await self._admin("CHECKPOINT", timeout, action)

    async def _point_at(self, conninfo: str, password: str | None, deadline: float) -> None:
        value = _conninfo_with(conninfo, password).replace("'", "''")

        async def action(conn: Any, deadline: float) -> None:
            await conn.execute(
                f"ALTER SYSTEM SET primary_conninfo = '{value}'", timeout=self._remaining(deadline)
            )
            await conn.execute("SELECT pg_reload_conf()", timeout=self._remaining(deadline))

        await self._open_and(deadline, action)

    async def _open_and(self, deadline: float, action: Any) -> None:
        conn = await self._open(deadline, self._remaining(deadline))
        try:
            await action(conn, deadline)
        finally:
            conn.terminate()

    async def _wait_streaming(self, new: PostgresEngine, deadline: float) -> None:
        async def check() -> str | None:
            try:
                state = await self._where_now(min(self._remaining(deadline), 2.0))
            except EngineError as exc:
                return f"not streaming from {new.where} yet ({exc})"
            if not state.in_recovery:
                return "the server is not in recovery"
            if not new._follows(state):
                return f"the WAL receiver does not stream from {new.where} ({state.receiver})"
            return None if state.streaming else f"WAL receiver {state.receiver} from {new.where}"

        await self._until("rejoin", deadline, check, poll=0.1)

    async def replica_of(self, new_primary: Engine, timeout: float) -> str:
        new, target, deadline = await self._replica_target(new_primary, timeout)

        async def replayed(conn: Any, until: float) -> int:
            row = await conn.fetchrow(WAL_STATE_SQL, timeout=self._remaining(until))
            mine = WalState.from_row(row)
            if not mine.in_recovery:
                raise EngineError(self._line("replica_of: not a standby (not in recovery)"))
            if not (new._follows(mine) and mine.streaming):
                raise EngineError(
                    self._line(
                        f"replica_of: WAL receiver {mine.receiver}, not streaming from {new.where}"
                    )
                )
            return mine.position

        position = await self._caught_up(
            deadline,
            target,
            replayed,
            lambda at: f"replayed {format_lsn(at or 0)} of {new.where}'s {format_lsn(target)}",
        )
        return f"replica of {new.where}, streaming, replayed up to {format_lsn(position)}"

    def libpq_conninfo(self) -> tuple[str, str | None]:
        """This server as a libpq conninfo (for pg_rewind, pg_basebackup and
        primary_conninfo), without the password, and the password."""
        parts = urlsplit(self._dsn)
        host, port = self._host_port()
        words = {"host": host, "port": str(port)}
        if parts.username:
            words["user"] = unquote(parts.username)
        if parts.path.strip("/"):
            words["dbname"] = unquote(parts.path.strip("/"))
        words.update((k, v) for k, v in parse_qsl(parts.query) if k != "password")
        password = self._password or (unquote(parts.password) if parts.password else None)
        return " ".join(_conninfo_word(k, v) for k, v in words.items()), password


def _inline_password(dsn: str) -> str | None:
    try:
        return urlsplit(dsn).password
    except ValueError:
        return None
