"""MariaDB test servers: a primary and a replica on free loopback ports in temp dirs.

``mariadb_template()`` runs ``mariadb-install-db`` once (about a second); each
``mariadb_pair()`` copies that datadir twice, starts both servers, creates the
users on the primary (they reach the replica through replication) and starts
replication. Every server is SIGKILLed and its directory removed on the way
out, whatever happened in between; the servers also die with the test process
(PR_SET_PDEATHSIG) so an interrupted run leaks nothing.

Users, all on ``127.0.0.1`` (``--skip-name-resolve``):

* ``watchdogd``: the grants the engine documents, random password;
* ``app``: an application account (reads and writes ``app.*`` only);
* ``repl``: the replication account.

Root has no password and is reached over the unix socket only (fixture use).

Profiles (issue 10), for the replication link only: ``tuned`` (what the docs
recommend for a 2 s outage threshold: ``MASTER_HEARTBEAT_PERIOD=1`` and
``MASTER_CONNECT_RETRY=1``, plus ``slave_net_timeout=2`` on the replica) and
``stock`` (MariaDB's defaults: heartbeat every ``slave_net_timeout / 2`` = 30 s,
``slave_net_timeout`` 60 s, connect retry 60 s). Without a profile the pair is the
lab's as before (tuned, but the stock ``slave_net_timeout``). All keep the lab's
speed settings (small InnoDB files, ``innodb_flush_log_at_trx_commit=2``,
``sync_binlog=0``, no performance schema), none of which touches the link's timing.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pymysql  # type: ignore[import-untyped]  # no stubs in the test extras
import pytest

from tests.support import free_port, need, retry_if_port_taken, timing, which

# Kept in step with the grants documented in watchdogd/engines/mysql.py.
WATCHDOGD_GRANTS = (
    "REPLICA MONITOR, BINLOG MONITOR, REPLICATION SLAVE ADMIN, READ_ONLY ADMIN, RELOAD,"
    " CONNECTION ADMIN, PROCESS ON *.*",
    "ALL PRIVILEGES ON watchdogd.*",
)
# What ``rejoin_fallback: dump`` needs on top (docs/engines/mysql.md#grants): dump any
# schema of the new primary, and load it into the old one under read_only.
RESYNC_GRANTS = (
    "SELECT, INSERT, UPDATE, DELETE, CREATE, DROP, ALTER, INDEX, REFERENCES, CREATE VIEW,"
    " SHOW VIEW, CREATE ROUTINE, ALTER ROUTINE, EVENT, TRIGGER, LOCK TABLES, SHOW DATABASES,"
    " BINLOG ADMIN, SET USER ON *.*"
)
START_TIMEOUT = 20.0
STOCK, TUNED, LAB = "stock", "tuned", "lab"
# Per profile: the replica's extra server options and its CHANGE MASTER options.
_KEEPALIVE = ", MASTER_CONNECT_RETRY=1, MASTER_HEARTBEAT_PERIOD=1"
REPLICA_OPTIONS = {STOCK: (), TUNED: ("--slave-net-timeout=2",), LAB: ()}
CHANGE_MASTER = {STOCK: "", TUNED: _KEEPALIVE, LAB: _KEEPALIVE}


def _server_user() -> tuple[str | None, int | None, int | None]:
    """MariaDB refuses to run as root: run it as ``mysql`` when we are root."""
    if os.geteuid() != 0:
        return None, None, None
    import pwd

    entry = pwd.getpwnam("mysql")
    return "mysql", entry.pw_uid, entry.pw_gid


# Looked up once in the parent: the forked child only calls it (no dlopen there).
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl


def _die_with_parent() -> None:
    # Runs in the child after the uid switch, so the setting survives exec.
    _PRCTL(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def binaries() -> tuple[str, str]:
    mariadbd = need("mariadbd (MariaDB server)", which("mariadbd", "/usr/sbin"))
    install = need("mariadb-install-db", which("mariadb-install-db", "/usr/bin"))
    return mariadbd, install


def _tempdir(prefix: str) -> Path:
    # Not under pytest's tmp_path: its parents are 0700 root, which the
    # mysql user cannot traverse.
    # tmpfs when there is one: copying and starting datadirs is several times faster.
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=shm))
    _, uid, gid = _server_user()
    if uid is not None and gid is not None:
        os.chown(path, uid, gid)
    return path


def _chown_tree(path: Path) -> None:
    _, uid, gid = _server_user()
    if uid is None or gid is None:
        return
    os.chown(path, uid, gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(root, name), uid, gid)


@contextlib.contextmanager
def mariadb_template() -> Iterator[Path]:
    """A freshly initialised datadir to copy (never started itself)."""
    _, install = binaries()
    base = _tempdir("watchdogd-mariadb-template-")
    user, _, _ = _server_user()
    try:
        cmd = [
            install,
            "--no-defaults",
            f"--datadir={base / 'data'}",
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
            "--innodb-log-file-size=8M",
            "--innodb-buffer-pool-size=32M",
            # Not /tmp: a starting mariadbd deletes every #sql* file in its tmpdir, so
            # concurrent bootstraps (xdist workers, other suites) wreck each other's
            # temporary tables ("Unknown table 'mysql.tmp_user_nopasswd'").
            f"--tmpdir={base}",
        ]
        if user:
            cmd.append(f"--user={user}")
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"mariadb-install-db failed: {done.stderr.strip()[-500:]}")
        yield base / "data"
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def mariadb_template_dir() -> Iterator[Path]:
    """``mariadb_template()`` once per test process, for every test that needs one."""
    with mariadb_template() as template:
        yield template


@dataclass
class MariaDB:
    """One running mariadbd; ``sql()`` talks to it as root over the unix socket."""

    name: str
    port: int
    base: Path
    process: subprocess.Popen[bytes]
    _alive: bool = field(default=True, repr=False)

    @property
    def socket(self) -> str:
        return str(self.base / "mysqld.sock")

    @property
    def pid(self) -> int:
        return self.process.pid

    def connect(self, **kwargs: Any) -> pymysql.connections.Connection[Any]:
        return pymysql.connect(
            unix_socket=self.socket,
            user="root",
            autocommit=True,
            connect_timeout=5,
            read_timeout=10,
            write_timeout=10,
            **kwargs,
        )

    def sql(self, statement: str, args: Sequence[Any] | None = None) -> list[dict[str, Any]]:
        conn = self.connect(cursorclass=pymysql.cursors.DictCursor)
        try:
            with conn.cursor() as cur:
                cur.execute(statement, args)
                return list(cur.fetchall())
        finally:
            conn.close()

    def script(self, *statements: str) -> None:
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                for statement in statements:
                    cur.execute(statement)
        finally:
            conn.close()

    def tcp(self, user: str, password: str, **kwargs: Any) -> pymysql.connections.Connection[Any]:
        return pymysql.connect(
            host="127.0.0.1",
            port=self.port,
            user=user,
            password=password,
            autocommit=True,
            connect_timeout=5,
            read_timeout=10,
            write_timeout=10,
            **kwargs,
        )

    def log_tail(self) -> str:
        try:
            return (self.base / "error.log").read_text(errors="replace")[-1500:]
        except OSError:
            return "(no error log)"

    def kill(self) -> None:
        """SIGKILL (works on a SIGSTOPped server too) and reap."""
        if self._alive:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
            self._alive = False

    def sigstop(self) -> None:
        """Hang the server (one process: every thread stops), like a frozen machine."""
        self.process.send_signal(signal.SIGSTOP)

    def sigcont(self) -> None:
        if self._alive and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)


def spawn_mariadb(
    name: str, template: Path, base: Path, server_id: int, extra: Sequence[str] = ()
) -> MariaDB:
    """Start mariadbd on a copy of ``template``; ``wait_ready()`` before use."""
    mariadbd, _ = binaries()
    user, uid, gid = _server_user()
    shutil.copytree(template, base / "data", symlinks=True)
    _chown_tree(base)
    port = free_port()
    cmd = [
        mariadbd, "--no-defaults", f"--datadir={base / 'data'}", f"--tmpdir={base}",
        f"--port={port}", "--bind-address=127.0.0.1", f"--socket={base / 'mysqld.sock'}",
        f"--pid-file={base / 'mysqld.pid'}", f"--log-error={base / 'error.log'}",
        "--skip-name-resolve", "--innodb-log-file-size=8M", "--innodb-buffer-pool-size=32M",
        "--performance-schema=OFF", "--innodb-flush-log-at-trx-commit=2", "--sync-binlog=0",
        f"--server-id={server_id}", f"--log-bin={base / 'data' / 'binlog'}",
        f"--relay-log={base / 'data' / 'relay'}", "--max-connections=50", *extra,
    ]  # fmt: skip
    process = subprocess.Popen(
        cmd,
        user=user,
        group=gid if uid is not None else None,
        extra_groups=[] if uid is not None else None,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=_die_with_parent,
    )
    return MariaDB(name=name, port=port, base=base, process=process)


def wait_ready(server: MariaDB) -> None:
    deadline = time.monotonic() + timing.within(START_TIMEOUT)
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"{server.name} mariadbd exited {server.process.returncode}: {server.log_tail()}"
            )
        if os.path.exists(server.socket):
            try:
                server.connect().close()
                return
            except pymysql.err.OperationalError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{server.name} mariadbd not ready after {timing.within(START_TIMEOUT):g}s: "
                f"{server.log_tail()}"
            )
        time.sleep(0.02)


@dataclass
class MariaDBPair:
    primary: MariaDB
    replica: MariaDB
    password: str  # the watchdogd user's
    app_password: str
    repl_password: str = ""
    profile: str = LAB

    def change_master(self, port: int) -> str:
        return (
            f"CHANGE MASTER TO MASTER_HOST='127.0.0.1', MASTER_PORT={port},"
            f" MASTER_USER='repl', MASTER_PASSWORD='{self.repl_password}',"
            f" MASTER_USE_GTID=slave_pos{CHANGE_MASTER[self.profile]}"
        )

    def repoint_replica(self, port: int, timeout: float = 15.0) -> None:
        """Replicate through ``port`` (a proxy in front of the primary) and wait until
        the IO thread is connected there again."""
        self.replica.sql("STOP REPLICA")
        self.replica.sql(self.change_master(port))
        self.replica.sql("START REPLICA")
        wait_replicating(self.replica, timeout)
        st = replica_status(self.replica)
        if st.get("Master_Port") != port:
            raise RuntimeError(f"replica follows port {st.get('Master_Port')}, not {port}")

    def grant_resync(self, *servers: MariaDB, grants: str = RESYNC_GRANTS) -> None:
        """``grants`` to the watchdogd account on each server, outside the binary log
        (no GTID of its own: a split pair stays split by exactly what a test wrote)."""
        for server in servers or (self.primary, self.replica):
            server.script("SET SESSION sql_log_bin = 0", f"GRANT {grants} TO watchdogd@'127.0.0.1'")

    def dsn(self, server: MariaDB, password: str | None = None) -> str:
        pw = self.password if password is None else password
        return f"mysql://watchdogd:{pw}@127.0.0.1:{server.port}/"

    def wait_replica_caught_up(self, timeout: float = 10.0) -> None:
        """Until the replica has applied the primary's whole binlog. Binlog
        coordinates, not GTIDs: gtid_slave_pos moves before Exec_Master_Log_Pos."""
        head = self.primary.sql("SHOW MASTER STATUS")[0]
        target = (head["File"], head["Position"])
        deadline = time.monotonic() + timeout
        while True:
            st = replica_status(self.replica)
            got = (st.get("Relay_Master_Log_File"), st.get("Exec_Master_Log_Pos"))
            if got == target:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"replica applied up to {got!r}, primary at {target!r}")
            time.sleep(0.02)


def replica_status(server: MariaDB) -> dict[str, Any]:
    rows = server.sql("SHOW REPLICA STATUS")
    return rows[0] if rows else {}


def wait_replicating(server: MariaDB, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        st = replica_status(server)
        if st.get("Slave_IO_Running") == "Yes" and st.get("Slave_SQL_Running") == "Yes":
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"replication not running after {timeout:g}s: IO={st.get('Slave_IO_Running')} "
                f"SQL={st.get('Slave_SQL_Running')} {st.get('Last_IO_Error')}"
                f" {st.get('Last_SQL_Error')}"
            )
        time.sleep(0.02)


def _start_both(template: Path, base: Path, profile: str) -> tuple[MariaDB, MariaDB]:
    """A fresh primary and replica under ``base``, started side by side and ready;
    both killed if either fails."""
    servers: list[MariaDB] = []
    try:
        for name, server_id, extra in (
            ("primary", 1, []),
            ("replica", 2, ["--read-only", *REPLICA_OPTIONS[profile]]),
        ):
            shutil.rmtree(base / name, ignore_errors=True)  # what a failed try left
            (base / name).mkdir()
            servers.append(spawn_mariadb(name, template, base / name, server_id, extra))
        for server in servers:
            wait_ready(server)
    except BaseException:
        for server in servers:
            server.kill()
        raise
    return servers[0], servers[1]


@contextlib.contextmanager
def mariadb_pair(template: Path, profile: str = LAB) -> Iterator[MariaDBPair]:
    """A primary and a replicating, read-only replica; both SIGKILLed on exit."""
    password = secrets.token_urlsafe(12)
    app_password = secrets.token_urlsafe(12)
    repl_password = secrets.token_urlsafe(12)
    with contextlib.ExitStack() as stack:
        base = _tempdir("watchdogd-mariadb-")
        stack.callback(shutil.rmtree, base, True)
        primary, replica = retry_if_port_taken(lambda: _start_both(template, base, profile))
        stack.callback(primary.kill)
        stack.callback(replica.kill)
        primary.script(
            f"CREATE USER watchdogd@'127.0.0.1' IDENTIFIED BY '{password}'",
            *(f"GRANT {g} TO watchdogd@'127.0.0.1'" for g in WATCHDOGD_GRANTS),
            f"CREATE USER app@'127.0.0.1' IDENTIFIED BY '{app_password}'",
            "CREATE DATABASE app",
            "CREATE TABLE app.t (id INT AUTO_INCREMENT PRIMARY KEY, v VARCHAR(100))",
            "GRANT SELECT, INSERT, UPDATE, DELETE ON app.* TO app@'127.0.0.1'",
            f"CREATE USER repl@'127.0.0.1' IDENTIFIED BY '{repl_password}'",
            "GRANT REPLICATION SLAVE ON *.* TO repl@'127.0.0.1'",
        )
        pair = MariaDBPair(primary, replica, password, app_password, repl_password, profile)
        replica.sql(pair.change_master(primary.port))
        replica.sql("START REPLICA")
        wait_replicating(replica)
        pair.wait_replica_caught_up()
        yield pair
