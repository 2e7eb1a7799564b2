"""A throwaway local PostgreSQL primary + streaming standby, for tests and ``watchdogd demo``.

Owns finding the PostgreSQL server binaries, building a pair in a temporary
directory (initdb, pg_basebackup, standby configuration), starting, stopping,
crashing (SIGKILL), hanging (SIGSTOP) and resuming the servers, and the few
SQL helpers chaos tests need (pause replay, detach the standby). Everything is
synchronous (subprocess), every wait is bounded, and every failure is a
:class:`LabError` with one line. No pytest here: the demo uses it too.

When run as root the server binaries run as the ``postgres`` user (PostgreSQL
refuses root): one-shot tools via ``runuser -u postgres --``, the postmaster
itself by dropping privileges in the child, so that the postmaster is our direct
child (its real pid, reaped by us; ``runuser`` would stop itself when its child
is SIGSTOPped and hide the pid).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SERVICE_USER = "postgres"
# pg_hba.conf asks this role (only) for a password on loopback TCP, so tests can
# exercise password handling; everyone else is trusted on loopback.
PASSWORD_ROLE = "watchdogd"

_PR_SET_PDEATHSIG = 1
_SETPRIV = ("setpriv", "--clear-groups", "--pdeathsig=keep")
_IPC_RMID = 0

# Server profiles (issue 10). ``stock``: PostgreSQL's shipped defaults for everything
# that times the replication link (wal_receiver_timeout 60s, wal_sender_timeout 60s,
# wal_receiver_status_interval 10s, wal_retrieve_retry_interval 5s, and no libpq
# connect_timeout in primary_conninfo): only what replication itself needs is set.
# ``tuned``: the link settings the docs recommend, so a standby gives up on a hung
# primary within a 2 s outage threshold. Both keep the lab's speed settings (fsync
# off, small buffers and WAL segments), none of which touches the link's timing.
STOCK, TUNED = "stock", "tuned"
PROFILES: dict[str, dict[str, str]] = {
    STOCK: {},
    TUNED: {
        "wal_receiver_timeout": "2s",
        "wal_retrieve_retry_interval": "100ms",
        "wal_receiver_status_interval": "1s",
        "wal_sender_timeout": "5s",
        # What the docs recommend for rejoin: pg_rewind needs it (or data checksums).
        "wal_log_hints": "on",
    },
}


class LabError(Exception):
    """Building or driving the lab failed; the message is one line."""


def find_pg_bin() -> Path | None:
    """The directory holding ``postgres``, ``initdb`` and ``pg_basebackup``: on PATH
    first, then ``/usr/lib/postgresql/*/bin``, newest version first."""
    on_path = shutil.which("postgres")
    if on_path:
        d = Path(on_path).resolve().parent
        if _complete(d):
            return d
    candidates = []
    for d in Path("/usr/lib/postgresql").glob("*/bin"):
        version = d.parent.name
        if version.isdigit() and _complete(d):
            candidates.append((int(version), d))
    if candidates:
        return max(candidates)[1]
    return None


def _complete(d: Path) -> bool:
    return all((d / tool).exists() for tool in ("postgres", "initdb", "pg_basebackup", "psql"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _running_as_root() -> bool:
    return os.geteuid() == 0


def _run_as() -> list[str]:
    return ["runuser", "-u", SERVICE_USER, "--"] if _running_as_root() else []


def _chown(path: Path) -> None:
    if _running_as_root():
        pw = pwd.getpwnam(SERVICE_USER)
        os.chown(path, pw.pw_uid, pw.pw_gid)


def _run(argv: Sequence[str], what: str, timeout: float, *, as_service: bool = True) -> str:
    cmd = [*_run_as(), *argv] if as_service else list(argv)
    try:
        done = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise LabError(f"{what}: no answer within {timeout:g}s") from None
    except OSError as exc:
        raise LabError(f"{what}: cannot run {cmd[0]}: {exc.strerror}") from None
    if done.returncode != 0:
        raise LabError(f"{what} failed: {_last_line(done.stderr or done.stdout)}")
    return done.stdout


def _last_line(text: str) -> str:
    """The line that says what went wrong (psql and initdb add HINT/DETAIL lines)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if re.search(r"\b(ERROR|FATAL|PANIC|error)\b", line):
            return line
    return lines[-1] if lines else "(no output)"


# Fatal messages whose reason the server logged on an earlier line.
_SEE_PREVIOUS = ("contains errors", "could not create any TCP/IP sockets")
_SEVERITY = re.compile(r"\b(FATAL|PANIC|ERROR):")
_PREFIX = re.compile(r"^.*?\b(?:LOG|FATAL|PANIC|ERROR|WARNING):\s+")


def _strip_prefix(line: str) -> str:
    return _PREFIX.sub("", line).strip()


def _wait(check: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (PostgreSQL backends make themselves group
    leaders, so signalling the postmaster's process group would miss them)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command name: state, ppid, ...
        fields = text[text.rfind(")") + 2 :].split()
        if len(fields) > 1 and fields[1] == str(pid) and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def pid_alive(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.rfind(")") + 2 :].split()[0] != "Z"


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


@dataclass
class PgServer:
    """One PostgreSQL server of the lab: its data dir, port, socket dir and log.

    ``host``: the address it listens on and is reached at (loopback by default).
    ``prefix``: an argv prefix the postmaster is started through (e.g. ``ip netns exec
    NS``, to run it in a network namespace); as root, the prefix runs as root and the
    postmaster drops to the service user after it (``setpriv``)."""

    name: str
    bin_dir: Path
    base: Path
    port: int
    host: str = "127.0.0.1"
    prefix: tuple[str, ...] = ()
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _stopped: bool = field(default=False, repr=False)

    @property
    def data_dir(self) -> Path:
        return self.base / "data"

    @property
    def socket_dir(self) -> Path:
        return self.base / "sock"

    @property
    def log_file(self) -> Path:
        return self.base / "postgres.log"

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/postgres"

    def user_dsn(self, user: str) -> str:
        """A DSN for ``user`` without a password (give that separately)."""
        return f"postgresql://{user}@{self.host}:{self.port}/postgres"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def is_running(self) -> bool:
        return self.pid is not None

    # -- lifecycle

    def start(self, timeout: float = 15.0, *, may_move: bool = False) -> None:
        """Start the postmaster and wait until it accepts connections (a standby:
        read-only ones). With ``may_move`` (a new server nobody knows the port of
        yet), retries on another port if this one was taken meanwhile."""
        if self.is_running():
            return
        for attempt in range(3):
            self._spawn()
            if self._wait_ready(timeout):
                return
            log = self._log_tail()
            self.kill()
            if may_move and attempt < 2 and "already in use" in log:
                self.port = free_port()
                continue
            raise LabError(f"{self.name}: postgres did not start on port {self.port}: {log}")

    def _spawn(self) -> None:
        self.socket_dir.mkdir(exist_ok=True)
        _chown(self.socket_dir)
        argv = [
            str(self.bin_dir / "postgres"),
            "-D",
            str(self.data_dir),
            "-p",
            str(self.port),
            "-k",
            str(self.socket_dir),
            "-c",
            f"listen_addresses={self.host}",
        ]
        # Logs append across restarts so a test failure shows the whole story.
        with self.log_file.open("ab") as log:
            _chown(self.log_file)
            kwargs: dict[str, object] = {}
            if self.prefix:
                # The prefix may need root (setns); setpriv then drops to the service
                # user without a fork (the postmaster keeps our child's pid) and keeps
                # the parent-death signal that the credential change would clear.
                drop = [*_SETPRIV, f"--reuid={SERVICE_USER}", f"--regid={SERVICE_USER}"]
                argv = [*self.prefix, *(drop if _running_as_root() else []), *argv]
            elif _running_as_root():
                pw = pwd.getpwnam(SERVICE_USER)
                kwargs.update(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.base,
                start_new_session=True,
                preexec_fn=die_with_parent(),
                **kwargs,  # type: ignore[call-overload]
            )
        self._stopped = False

    def _wait_ready(self, timeout: float) -> bool:
        pid_file = self.data_dir / "postmaster.pid"

        def ready() -> bool:
            if self._proc is None or self._proc.poll() is not None:
                raise _Exited
            try:
                lines = pid_file.read_text().splitlines()
            except OSError:
                return False
            # Line 1 is the pid (a killed server leaves a stale file behind); line 8
            # the status: "ready" (primary) or "standby" (hot standby, read-only).
            return (
                len(lines) >= 8
                and lines[0].strip() == str(self._proc.pid)
                and lines[7].strip() in ("ready", "standby")
            )

        try:
            return _wait(ready, timeout)
        except _Exited:
            return False

    def _log_tail(self) -> str:
        """The server log's last fatal message, as one line without the log prefix."""
        try:
            lines = [ln for ln in self.log_file.read_text(errors="replace").splitlines() if ln]
        except OSError:
            return "(no log)"
        fatal = [i for i, ln in enumerate(lines) if _SEVERITY.search(ln)]
        if not fatal:
            return _strip_prefix(lines[-1]) if lines else "(empty log)"
        i = fatal[-1]
        message = _strip_prefix(lines[i])
        if message.endswith(_SEE_PREVIOUS):
            # The reason was logged just before, at LOG level (HINTs in between).
            reason = next((ln for ln in reversed(lines[:i]) if " LOG: " in ln), None)
            if reason is not None:
                message = f"{_strip_prefix(reason)} ({message})"
        return message

    def stop(self, timeout: float = 10.0) -> None:
        """Fast shutdown (SIGINT); falls back to kill() if it does not finish."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            self._proc = None
            return
        if self._stopped:
            self.sigcont()
        _signal(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return
        self._proc = None

    def detached_pid(self) -> int | None:
        """The postmaster of this data dir when someone else started it (``pg_ctl
        start``, e.g. after a rejoin): from postmaster.pid, checked against the
        process's command line so a stale file never names a stranger."""
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().split()[0])
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            return None
        return pid if str(self.data_dir).encode() in argv and pid_alive(pid) else None

    def kill(self) -> None:
        """Crash the server like a power cut: SIGKILL the postmaster and its children
        (also one that ``pg_ctl start`` started, see detached_pid)."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            self._proc, self._stopped = None, False
            pid = self.detached_pid()
            if pid is not None:
                _signal(pid, signal.SIGSTOP)
                children = child_pids(pid)
                for victim in (pid, *children):
                    _signal(victim, signal.SIGKILL)
                # Not our children: wait until init has reaped them too, or a restart
                # finds the zombie postmaster's pid alive and refuses its lock file.
                _wait(lambda: not any(Path(f"/proc/{p}").exists() for p in (pid, *children)), 5.0)
            self.release_shared_memory()
            return
        if proc.poll() is None:
            # Stop it first so it forks nothing new while we collect its children.
            _signal(proc.pid, signal.SIGSTOP)
            children = child_pids(proc.pid)
            _signal(proc.pid, signal.SIGKILL)
            for child in children:
                _signal(child, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5.0)
            # Orphaned children are reaped by init; wait so a restart finds no
            # process still attached to the old shared memory.
            _wait(lambda: not any(pid_alive(c) for c in children), 5.0)
        self._proc = None
        self._stopped = False
        self.release_shared_memory()

    def release_shared_memory(self) -> bool:
        """Remove the System V segment a killed postmaster leaves behind, as a power
        cut would. PostgreSQL removes it itself on a clean stop, or on the next
        start in the same data dir; a lab removes the data dir instead, so every
        crashed server leaked one, until shmget() failed with "No space left on
        device" (kernel.shmmni) for every later server on the machine. Only the
        segment postmaster.pid names, and only once nothing is attached to it.
        True when one was removed."""
        segment = pid_file_segment(self.data_dir)
        if segment is None or shm_attached(*segment) != 0:
            return False
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.shmctl(segment[1], _IPC_RMID, None) == 0)

    def sigstop(self) -> None:
        """Hang the server (postmaster and every backend), like a frozen machine:
        TCP connects still complete in the kernel, nothing answers."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            raise LabError(f"{self.name}: cannot SIGSTOP, server is not running")
        _signal(proc.pid, signal.SIGSTOP)
        for child in child_pids(proc.pid):
            _signal(child, signal.SIGSTOP)
        self._stopped = True

    def sigcont(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            self._stopped = False
            return
        for child in child_pids(proc.pid):
            _signal(child, signal.SIGCONT)
        _signal(proc.pid, signal.SIGCONT)
        self._stopped = False

    def restart(self, timeout: float = 15.0) -> None:
        self.stop()
        self.start(timeout)

    # -- SQL

    def execute(self, sql: str, timeout: float = 10.0) -> str:
        """Run SQL with psql as the superuser; returns unaligned, tuples-only output."""
        out = _run(
            [
                str(self.bin_dir / "psql"),
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                self.host,
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-c",
                sql,
            ],
            f"{self.name}: psql",
            timeout,
            as_service=False,
        )
        return out.strip()

    def is_in_recovery(self) -> bool:
        return self.execute("SELECT pg_is_in_recovery()") == "t"


class _Exited(Exception):
    pass


def pid_file_segment(data_dir: Path) -> tuple[int, int] | None:
    """(key, shmid) of the System V segment from postmaster.pid's seventh line."""
    try:
        line = (data_dir / "postmaster.pid").read_text().splitlines()[6]
        key, shmid = (int(field) for field in line.split())
    except (OSError, IndexError, ValueError):
        return None
    return key, shmid


def shm_attached(key: int, shmid: int) -> int | None:
    """How many processes are attached to System V segment ``shmid`` with ``key``
    (from /proc/sysvipc/shm), or None when there is no such segment."""
    try:
        rows = Path("/proc/sysvipc/shm").read_text().splitlines()[1:]
    except OSError:
        return None
    for row in rows:
        cols = row.split()
        if len(cols) > 6 and cols[0] == str(key) and cols[1] == str(shmid):
            return int(cols[6])
    return None


def die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn asking the kernel to SIGKILL the server when this process dies,
    so a crashed test run leaks no postmaster. Only from the main thread: the
    signal fires when the *thread* that forked exits (a worker thread would
    take the server down with it)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))

    return preexec


@dataclass
class PgPair:
    """A primary and a standby streaming from it, all under ``base``."""

    base: Path
    primary: PgServer
    standby: PgServer
    bin_dir: Path
    profile: str = TUNED
    # The port the standby dials for replication (the primary's, or a proxy's).
    upstream_port: int | None = None

    @classmethod
    def create(
        cls,
        base_dir: str | os.PathLike[str] | None = None,
        *,
        bin_dir: Path | None = None,
        fsync: bool = False,
        profile: str = TUNED,
        wal_receiver_timeout: str | None = None,
        wal_retrieve_retry_interval: str | None = None,
        password: str | None = None,
        settings: dict[str, str] | None = None,
        template: str | os.PathLike[str] | None = None,
        timeout: float = 30.0,
    ) -> PgPair:
        """Build, start and wait until the standby streams. ``password`` creates the
        superuser role ``watchdogd`` (see PASSWORD_ROLE) that must log in with it
        over TCP. ``settings`` are extra postgresql.conf lines for both servers.
        ``template`` is a data dir from make_template(), copied instead of running
        initdb (saves about a second per pair). ``profile`` picks the replication
        link settings (see PROFILES); ``wal_receiver_timeout`` and
        ``wal_retrieve_retry_interval`` override the profile's."""
        if profile not in PROFILES:
            raise LabError(f"unknown profile {profile!r}; known: {', '.join(PROFILES)}")
        link = dict(PROFILES[profile])
        if wal_receiver_timeout is not None:
            link["wal_receiver_timeout"] = wal_receiver_timeout
        if wal_retrieve_retry_interval is not None:
            link["wal_retrieve_retry_interval"] = wal_retrieve_retry_interval
        bin_dir = bin_dir or find_pg_bin()
        if bin_dir is None:
            raise LabError("PostgreSQL server binaries not found (PATH, /usr/lib/postgresql/*/bin)")
        base = _make_base(base_dir)
        pair = cls(
            base=base,
            primary=PgServer("primary", bin_dir, base / "primary", free_port()),
            standby=PgServer("standby", bin_dir, base / "standby", free_port()),
            bin_dir=bin_dir,
            profile=profile,
        )
        try:
            pair._build(
                fsync=fsync,
                link=link,
                password=password,
                settings=settings or {},
                template=Path(template) if template is not None else None,
                timeout=timeout,
            )
        except BaseException:
            pair.destroy()
            raise
        return pair

    def _build(
        self,
        *,
        fsync: bool,
        link: dict[str, str],
        password: str | None,
        settings: dict[str, str],
        template: Path | None,
        timeout: float,
    ) -> None:
        p, s = self.primary, self.standby
        for server in (p, s):
            server.base.mkdir(mode=0o755)
            _chown(server.base)
        if template is not None:
            # A copy of a cold, never-started initdb is what initdb would produce.
            _run(["cp", "-a", str(template), str(p.data_dir)], "copying the template", timeout)
        else:
            init_data_dir(self.bin_dir, p.data_dir, timeout)
        conf = {
            "wal_level": "replica",
            "max_wal_senders": "5",
            "max_replication_slots": "5",
            "wal_keep_size": "'64MB'",
            "hot_standby": "on",
            "fsync": "on" if fsync else "off",
            "full_page_writes": "on" if fsync else "off",
            "shared_buffers": "'16MB'",
            "max_connections": "40",
            **{name: _quote(value) for name, value in link.items()},
            "log_checkpoints": "off",
            # Segments as files in the data dir: a SIGKILLed server would otherwise
            # leak them in /dev/shm (posix), as nothing cleans up after it.
            "dynamic_shared_memory_type": "mmap",
            "min_wal_size": "'4MB'",
            "max_wal_size": "'64MB'",
            "log_line_prefix": "'%m [%p] %q%a '",
            **settings,
        }
        with (p.data_dir / "postgresql.conf").open("a") as f:
            f.write("\n# watchdogd lab\n")
            f.writelines(f"{k} = {v}\n" for k, v in conf.items())
        (p.data_dir / "pg_hba.conf").write_text(
            "local all all trust\n"
            "local replication all trust\n"
            f"host all {PASSWORD_ROLE} 127.0.0.1/32 scram-sha-256\n"
            "host all all 127.0.0.1/32 trust\n"
            "host replication all 127.0.0.1/32 trust\n"
        )
        p.start(timeout, may_move=True)
        if password is not None:
            p.execute(f"CREATE ROLE {PASSWORD_ROLE} LOGIN SUPERUSER PASSWORD {_quote(password)}")
        _run(
            [
                str(self.bin_dir / "pg_basebackup"),
                "-D",
                str(s.data_dir),
                "-h",
                "127.0.0.1",
                "-p",
                str(p.port),
                "-U",
                "postgres",
                "-X",
                "stream",
                "-c",
                "fast",
                "--no-sync",
                "--no-manifest",
            ],
            "pg_basebackup",
            timeout,
        )
        (s.data_dir / "standby.signal").touch()
        _chown(s.data_dir / "standby.signal")
        with (s.data_dir / "postgresql.auto.conf").open("a") as f:
            f.write(f"primary_conninfo = {_quote(self.primary_conninfo())}\n")
        s.start(timeout, may_move=True)
        if not _wait(self.standby_streaming, timeout, interval=0.05):
            raise LabError(f"standby did not start streaming within {timeout:g}s: {s._log_tail()}")

    def primary_conninfo(self) -> str:
        port = self.upstream_port or self.primary.port
        conninfo = f"host={self.primary.host} port={port} user=postgres application_name=standby"
        # libpq waits for a connection for ever by default; the tuned lab gives up after 2 s.
        return conninfo if self.profile == STOCK else conninfo + " connect_timeout=2"

    def repoint_standby(self, port: int | None, timeout: float = 20.0) -> None:
        """Replicate through ``port`` (a proxy in front of the primary; None: the
        primary itself) and wait until the standby streams from there. The standby
        restarts its WAL receiver on the new primary_conninfo (PostgreSQL 13+); on
        stock settings that may take wal_retrieve_retry_interval (5 s)."""
        self.upstream_port = port
        self.standby.execute(
            f"ALTER SYSTEM SET primary_conninfo = {_quote(self.primary_conninfo())}"
        )
        self.standby.execute("SELECT pg_reload_conf()")
        want = str(port or self.primary.port)
        sql = "SELECT status || ' ' || sender_port FROM pg_stat_wal_receiver"

        def there() -> bool:
            try:
                return self.standby.execute(sql, 5.0) == f"streaming {want}"
            except LabError:
                return False

        if not _wait(there, timeout, interval=0.05):
            raise LabError(f"standby did not stream through port {want} within {timeout:g}s")

    def destroy(self, *, keep_dir: bool = False) -> None:
        """Kill both servers and remove the directory (unless ``keep_dir``, to read
        the logs afterwards); safe to call twice."""
        for server in (self.standby, self.primary):
            with contextlib.suppress(Exception):
                server.kill()
        if not keep_dir:
            shutil.rmtree(self.base, ignore_errors=True)

    # -- helpers for chaos tests

    def execute(self, server: PgServer, sql: str, timeout: float = 10.0) -> str:
        return server.execute(sql, timeout)

    def standby_streaming(self) -> bool:
        try:
            status = self.standby.execute("SELECT status FROM pg_stat_wal_receiver", 5.0)
        except LabError:
            return False
        return status == "streaming"

    def pause_replay(self) -> None:
        """Standby keeps receiving WAL but stops applying it (replay lag grows)."""
        self.standby.execute("SELECT pg_wal_replay_pause()")
        if not _wait(
            lambda: self.standby.execute("SELECT pg_get_wal_replay_pause_state()") == "paused", 5.0
        ):
            raise LabError("standby: replay did not pause within 5s")

    def resume_replay(self) -> None:
        self.standby.execute("SELECT pg_wal_replay_resume()")

    def detach_standby(self, timeout: float = 5.0) -> None:
        """Clear primary_conninfo and reload: the standby stops receiving (stays a standby)."""
        self.standby.execute("ALTER SYSTEM SET primary_conninfo = ''")
        self.standby.execute("SELECT pg_reload_conf()")
        if not _wait(
            lambda: self.standby.execute("SELECT count(*) FROM pg_stat_wal_receiver") == "0",
            timeout,
        ):
            raise LabError(f"standby: WAL receiver still running {timeout:g}s after detach")

    def reattach_standby(self, timeout: float = 10.0) -> None:
        """Undo detach_standby(): follow the primary again and wait until streaming."""
        self.standby.execute(
            f"ALTER SYSTEM SET primary_conninfo = {_quote(self.primary_conninfo())}"
        )
        self.standby.execute("SELECT pg_reload_conf()")
        if not _wait(self.standby_streaming, timeout, interval=0.05):
            raise LabError(f"standby did not stream again within {timeout:g}s")

    def wait_replayed(self, timeout: float = 10.0) -> None:
        """Wait until the standby has replayed everything the primary wrote so far."""
        target = self.primary.execute("SELECT pg_current_wal_lsn()")
        sql = f"SELECT pg_last_wal_replay_lsn() >= {_quote(target)}::pg_lsn"
        if not _wait(lambda: self.standby.execute(sql) == "t", timeout, interval=0.02):
            raise LabError(f"standby did not replay up to {target} within {timeout:g}s")


def init_data_dir(bin_dir: Path, data_dir: Path, timeout: float = 30.0) -> None:
    """initdb with what the lab needs: superuser ``postgres``, trust, UTF8, C locale."""
    _run(
        [
            str(bin_dir / "initdb"),
            "-D",
            str(data_dir),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
            # Small WAL segments: less to write, copy and stream for a throwaway lab.
            "--wal-segsize=1",
        ],
        "initdb",
        timeout,
    )


def make_template(
    base_dir: str | os.PathLike[str] | None = None, *, bin_dir: Path | None = None
) -> Path:
    """A fresh initdb data dir (never started) for ``PgPair.create(template=...)``.
    The caller removes ``result.parent`` when done."""
    bin_dir = bin_dir or find_pg_bin()
    if bin_dir is None:
        raise LabError("PostgreSQL server binaries not found (PATH, /usr/lib/postgresql/*/bin)")
    base = _make_base(base_dir)
    try:
        init_data_dir(bin_dir, base / "template")
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise
    return base / "template"


def lab_root() -> str:
    """Where labs go by default: ``$WATCHDOGD_LAB_DIR``, else /dev/shm when it is a
    world-writable tmpfs (initdb, copies and base backups are several times faster
    in memory than on a virtual disk), else /tmp."""
    if env := os.environ.get("WATCHDOGD_LAB_DIR"):
        return env
    shm = Path("/dev/shm")
    try:
        mode = shm.stat().st_mode
    except OSError:
        return "/tmp"
    if stat.S_ISDIR(mode) and mode & stat.S_ISVTX and mode & stat.S_IWOTH:
        return str(shm)
    return "/tmp"


def _make_base(base_dir: str | os.PathLike[str] | None) -> Path:
    """The pair's directory, reachable by the service user (its parents traversable)."""
    if base_dir is None:
        base = Path(tempfile.mkdtemp(prefix="watchdogd-pg-", dir=lab_root()))
    else:
        base = Path(base_dir).absolute()
        if base.exists() and any(base.iterdir()):
            raise LabError(f"{base}: lab directory exists and is not empty")
        base.mkdir(parents=True, exist_ok=True)
    base.chmod(0o755)
    if _running_as_root():
        for parent in base.parents:
            mode = parent.stat().st_mode
            if not mode & stat.S_IXOTH:
                shutil.rmtree(base, ignore_errors=True)
                raise LabError(
                    f"{parent}: not traversable by the {SERVICE_USER} user "
                    f"(mode {stat.filemode(mode)}); put the lab under /tmp"
                )
        _chown(base)
    return base
