"""The guard beside the primary (``watchdogd guard --config FILE --node NAME``).

It runs on the primary's host with the fleet's config file and fences its local database
(the engine's ``fence``, the very code of the ``fence`` action) in two cases only:

- an ORDER from the fleet leader that is valid: the leader key exists and its
  ``create_revision`` equals the order's token, in one linearizable read
  (``state.guard_keys.order_verdict``). It fences, checks that the database now refuses
  writes, and writes its ACK; stale or invalid orders are ignored with a log line;
- ISOLATION: no sign of life from any source for ``guard.isolation_timeout``. Sources:
  an acknowledged renewal of its own lease (the store answers; counted from the time the
  renewal was sent) and a standby streaming from the local primary whose replies keep
  coming (PostgreSQL: ``pg_stat_replication.reply_time`` grew between two reads, so the
  two hosts' clocks never matter; other engines cannot tell: no sign). An idle standby
  replies only every ``wal_receiver_status_interval`` (10 s on stock settings), so its
  last reply counts for its reply window (that interval plus two polls and four reads)
  when longer than the timeout; the guard publishes the longer one in ``guard/settings``
  for the leader to wait out (see ``standby_window``). With ``guard.watchers``, a
  strict majority of the voters vouching for this node (``GET <url>/vouch``, asked
  every poll; ``watchdogd.fleet.Vouching`` says when a watcher does) is a sign too,
  counted from when they were asked, once ``guard/settings`` says so. It fences once per isolation,
  logs it, and keeps trying to reach the store. A started guard counts its start as a
  sign of life.

On a valid order it cannot carry out because its database is DOWN (not running: every
address of the node's DSN is this host's and refuses the connection, or its unix
socket is missing, and with ``data_dir`` configured no live postmaster holds the data
directory; and the database did answer this guard before, so a wrong DSN is never
"down") it acks
``{fenced: false, down: true}``: a promise to fence the database the moment it answers
again. It then tries the fence every ``DOWN_POLL`` and re-acks ``fenced: true`` once it
holds. For PostgreSQL with ``data_dir`` it first writes
``default_transaction_read_only = 'on'`` into ``postgresql.auto.conf`` (what the fence's
ALTER SYSTEM writes), so the server comes back read-only from its first session. A
database that does not answer in time (a hang: connect or query timeout) is never
"down": a hung primary may wake up writable.

Its ``guard/alive`` key lives on its own lease (renewed every ttl/3), so the leader sees
it vanish ttl after the guard's last acknowledged renewal. A guard cut off fences by
``last sign + isolation_timeout`` (+ one poll + its fence timeout, both under ttl); the
leader, counting ``isolation_timeout`` from when it first saw the key absent, clears no
earlier than ``last renewal + ttl + isolation_timeout``: the ttl is the guard's margin.

``SignsOfLife`` is the pure bookkeeping (injected clock), ``GuardSettings`` the settings
(from a ``Config`` with ``store``/``guard`` sections, or built directly), ``Guard`` the
runner.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import math
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import parse_qs, urlsplit

import structlog

from watchdogd import engines
from watchdogd.core import clock as core_clock
from watchdogd.core.errors import WatchdogdError
from watchdogd.core.model import DatabaseConfig
from watchdogd.engines import Engine, EngineError
from watchdogd.engines.postgres import pg_duration_seconds
from watchdogd.probes import BodyTooLarge, read_capped
from watchdogd.state.etcd import (
    EtcdClient,
    EtcdConfigError,
    Lease,
    LeaseNotFound,
    TlsFiles,
    endpoints_of,
)
from watchdogd.state.guard_keys import (
    DEFAULT_REPLY_INTERVAL,
    Ack,
    Alive,
    GuardKeys,
    Order,
    Published,
    order_verdict,
    read_snapshot,
    reply_window,
)
from watchdogd.state.guard_keys import GUARD_DB_TIMEOUT as DB_TIMEOUT
from watchdogd.state.guard_keys import GUARD_POLL_DEFAULT as DEFAULT_POLL
from watchdogd.state.store import StoreUnavailable

DOWN_POLL = 0.1  # how often a database answered "down" is tried again
_VOUCH_MAX = 4096  # a watcher's vouch is a hundred bytes; more is not one
_DEFAULT_PORTS = {"postgres": 5432, "mysql": 3306, "redis": 6379}
_READ_ONLY_LINE = "default_transaction_read_only = 'on'"
# Errors saying an address does not exist on this host (not a listener, not a hang).
_NOT_HERE = frozenset({errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT})


class GuardConfigError(WatchdogdError):
    """The guard cannot run with these settings; the message is one line."""


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class GuardSettings:
    """What the guard needs. ``prefix`` is ``<store.etcd.prefix>/<cluster>`` (the keys'
    root, as for ``EtcdStore``). ``database`` is the node's database (None when the
    caller hands the guard an engine itself, as tests do)."""

    node: str
    endpoints: tuple[str, ...]
    prefix: str
    ttl: float
    isolation_timeout: float
    database: DatabaseConfig | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    poll: float = DEFAULT_POLL
    request_timeout: float | None = None  # per etcd attempt; default min(2, ttl/6)
    secrets: frozenset[str] = field(default=frozenset(), repr=False)
    # The other node's database host(s): only replication from there is the standby's
    # sign of life (resolved at start; none: no such sign, so the guard fences sooner).
    standby_hosts: tuple[str, ...] = ()
    # (voter, base URL) of the watchers asked to vouch (guard.watchers), and how many
    # voters the fleet has: a strict majority of them vouching is a sign of life.
    watchers: tuple[tuple[str, str], ...] = ()
    voters: int = 0

    def __post_init__(self) -> None:
        problem = self.problem()
        if problem is not None:
            raise GuardConfigError(problem)

    def problem(self) -> str | None:
        if not self.endpoints:
            return "store.etcd.endpoints: none given"
        try:
            endpoints_of(self.endpoints)
        except EtcdConfigError as exc:
            return f"store.etcd.endpoints: {exc}"
        if not self.ttl >= 2:
            return f"store.etcd.ttl: at least 2s for the guard's lease, got {self.ttl:g}s"
        if not self.isolation_timeout > 0:
            return f"guard.isolation_timeout: must be positive, got {self.isolation_timeout:g}s"
        if not 0 < self.poll <= self.ttl / 4:
            return f"guard poll interval {self.poll:g}s: must be positive and at most ttl/4"
        if (self.username is None) != (self.password is None):
            return "store.etcd: username and password go together"
        if (self.cert_file is None) != (self.key_file is None):
            return "store.etcd.tls: cert_file and key_file go together"
        if self.watchers and len(self.watchers) < self.vouches_needed:
            return (
                f"guard.watchers: {len(self.watchers)} listed, but a strict majority of the "
                f"{self.voters} voters ({self.vouches_needed}) must vouch"
            )
        return None

    @property
    def vouches_needed(self) -> int:
        return self.voters // 2 + 1

    @property
    def timeout(self) -> float:
        """One etcd attempt's timeout."""
        return self.request_timeout or min(2.0, self.ttl / 6)

    @property
    def renew_interval(self) -> float:
        return self.ttl / 3

    @property
    def fence_timeout(self) -> float:
        """The fence must finish inside the ttl margin the leader leaves the guard."""
        return max(1.0, self.ttl / 2)

    def client(self) -> EtcdClient:
        tls = None
        if self.ca_file or self.cert_file or self.key_file:
            tls = TlsFiles(self.ca_file, self.cert_file, self.key_file)
        try:
            return EtcdClient(
                self.endpoints,
                timeout=self.timeout,
                tls=tls,
                username=self.username,
                password=self.password,
            )
        except EtcdConfigError as exc:
            raise GuardConfigError(str(exc)) from None


def settings_from_config(cfg: Any, node: str) -> GuardSettings:
    """The guard's settings from a loaded ``Config`` (its ``store:`` and ``guard:``
    sections) for ``node``; ``GuardConfigError`` (one line) when it cannot run."""
    store = getattr(cfg, "store", None)
    if store is None:
        raise GuardConfigError(
            "the config has no store: section: the guard needs the fleet's etcd (store.etcd)"
        )
    guard = getattr(cfg, "guard", None)
    if guard is None:
        raise GuardConfigError(
            "the config has no guard: section (guard.isolation_timeout): without it the "
            "leader does not wait for a guard, so running one would protect nothing"
        )
    nodes = {cfg.primary.name: cfg.primary, cfg.standby.name: cfg.standby}
    if node not in nodes:
        raise GuardConfigError(
            f"--node {node!r} is not a node of cluster {cfg.cluster!r} "
            f"(nodes: {', '.join(sorted(nodes))})"
        )
    etcd = store.etcd
    password = getattr(etcd, "password", None)
    return GuardSettings(
        node=node,
        endpoints=tuple(etcd.endpoints),
        prefix=f"{str(etcd.prefix).rstrip('/')}/{cfg.cluster}",
        ttl=float(etcd.ttl),
        isolation_timeout=float(guard.isolation_timeout),
        database=nodes[node].database,
        ca_file=getattr(etcd, "ca_file", None),
        cert_file=getattr(etcd, "cert_file", None),
        key_file=getattr(etcd, "key_file", None),
        username=getattr(etcd, "username", None),
        password=None if password is None else str(password),
        secrets=frozenset(getattr(cfg, "secrets", frozenset())),
        watchers=tuple(getattr(guard, "watchers", ())),
        voters=len(store.voters),
        standby_hosts=tuple(
            host
            for name, other in nodes.items()
            if name != node
            and (address := address_of(other.database)) is not None
            and (host := address.host) is not None
        ),
    )


def resolve_hosts(hosts: Sequence[str]) -> tuple[str, ...]:
    """The IP addresses of ``hosts`` (names resolved once; an unknown one is left out)."""
    found: list[str] = []
    for host in hosts:
        try:
            infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        except (OSError, UnicodeError):
            continue
        for info in infos:
            address = str(info[4][0])
            if address not in found:
                found.append(address)
    return tuple(found)


# --------------------------------------------------------------------------- the pure rule


class SignsOfLife:
    """When the guard last had proof it is not cut off (monotonic seconds).

    ``store_renewed(sent_at)``: an acknowledged lease renewal (or grant), counted from
    the time its request was sent (etcd renewed it no earlier). ``vouched(sent_at)``: a
    strict majority of the voters vouched for the primary (``guard.watchers``), asked
    at ``sent_at``. ``standby_mark(mark,
    polled_at)``: one read of the standby's reply mark (None: no standby streams); a
    mark larger than the previous read's proves a reply arrived after that read was
    sent, so the previous read's send time counts. ``standby_unread()``: a read that
    failed: it proves nothing and keeps the previous mark (a later, larger mark still
    proves a reply after that earlier read). ``start``: the guard's start counts as a
    sign of every source, so a guard started while cut off waits a whole timeout (the
    standby's window, when longer: the first reply it can count may be that far off).

    A standby replies only so often: an idle one every ``wal_receiver_status_interval``
    (PostgreSQL's default: 10 s), a busy one at every flush. So its proof is judged
    fresh for ``standby_window`` seconds when that is longer than the timeout (None:
    the timeout, as for the other sources); the store's and the start's for the
    timeout. ``longest_gap``: the longest time between two replies seen in one unbroken
    run of reads (by the standby's own clock, so only its rate matters), from which
    the guard derives that window. ``gap_limit`` (the primary's ``wal_sender_timeout``):
    a longer gap is not learned (the mark still proves a reply): the primary drops a
    connection silent that long, so it is the standby's clock that stepped, and learning
    it would stretch the window (and the leader's wait) by the step.
    """

    def __init__(self, start: float, gap_limit: float | None = None) -> None:
        self.last = start
        self.source = "start"
        self.standby_window: float | None = None
        self.longest_gap = 0.0
        # A longer gap is no reply interval: the primary drops a connection silent for
        # wal_sender_timeout, so such a jump in the mark is the standby's clock stepped.
        self.gap_limit = gap_limit
        self._other = start  # the last store sign (or the start)
        self._standby = start  # the last standby proof (the start counts for every source)
        self._mark: float | None = None
        self._mark_polled: float | None = None
        self._run_mark: float | None = None  # the mark when it last grew, in this run

    def _saw(self, at: float, source: str) -> None:
        if at >= self.last:
            self.last, self.source = at, source

    def store_renewed(self, sent_at: float) -> None:
        self._other = max(self._other, sent_at)
        self._saw(sent_at, "store")

    def vouched(self, sent_at: float) -> None:
        """A strict majority of the voters vouched for the primary, each asked no earlier
        than ``sent_at`` (counted from then, as a renewal is)."""
        self._other = max(self._other, sent_at)
        self._saw(sent_at, "watchers")

    def standby_mark(self, mark: float | None, polled_at: float) -> None:
        previous, previous_at = self._mark, self._mark_polled
        if mark is not None and previous is not None and previous_at is not None:
            if mark > previous:
                self._standby = max(self._standby, previous_at)
                self._saw(previous_at, "standby")
                if self._run_mark is not None:
                    gap = mark - self._run_mark
                    if self.gap_limit is None or gap <= self.gap_limit:
                        self.longest_gap = max(self.longest_gap, gap)
                self._run_mark = mark
        elif mark is not None:
            self._run_mark = None  # a new run: its first growth has nothing to measure from
        if mark is None:
            self._run_mark = None
        self._mark, self._mark_polled = mark, (polled_at if mark is not None else None)

    def standby_unread(self) -> None:
        self._run_mark = None  # the next growth may span unseen replies: no gap measured

    def silent_for(self, now: float) -> float:
        return max(0.0, now - self.last)

    def isolated(self, now: float, timeout: float) -> bool:
        if now - self._other < timeout:
            return False
        return now - self._standby >= max(timeout, self.standby_window or 0.0)


# --------------------------------------------------------------------------- "down"


@dataclass(frozen=True)
class DbAddress:
    """Where the database listens, from its DSN: TCP host and port, or a unix socket."""

    host: str | None = None
    port: int | None = None
    socket_path: str | None = None

    def __str__(self) -> str:
        return self.socket_path or f"{self.host}:{self.port}"


def address_of(database: DatabaseConfig | None) -> DbAddress | None:
    """The database's address from its DSN URL; None when it cannot be told (then the
    guard never answers "down": without an address it cannot tell down from hung)."""
    if database is None:
        return None
    try:
        parts = urlsplit(database.dsn)
        port = parts.port or _DEFAULT_PORTS.get(database.engine)
        query = parse_qs(parts.query)
    except ValueError:
        return None
    if database.engine == "redis" and parts.scheme == "unix":
        return DbAddress(socket_path=parts.path) if parts.path else None
    if database.engine == "postgres" and "host" in query and query["host"][0].startswith("/"):
        return DbAddress(socket_path=f"{query['host'][0]}/.s.PGSQL.{port or 5432}")
    if database.engine == "mysql" and "unix_socket" in query:
        return DbAddress(socket_path=query["unix_socket"][0])
    if not parts.hostname or port is None:
        return None
    return DbAddress(host=parts.hostname, port=port)


def _local(family: int, where: Any) -> bool:
    """``where`` is an address of this host (binding a socket to it works): a refusal
    from it means nothing listens here. A remote refusal may be a firewall's."""
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((where[0], 0, *where[2:]))
    except OSError:
        return False
    return True


async def refused(address: DbAddress, timeout: float) -> str | None:
    """Why nothing listens at ``address`` (every resolved address refused the
    connection, or the unix socket is missing or refuses), else None: it accepted, it
    did not answer within ``timeout`` (a hang is never "down"), an address is not this
    host's (the guard runs beside its database; a remote refusal proves nothing), or
    another error."""
    try:
        async with asyncio.timeout(timeout):
            if address.socket_path is not None:
                _, writer = await asyncio.open_unix_connection(address.socket_path)
                writer.close()
                return None
            loop = asyncio.get_running_loop()
            infos = await loop.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
            refusals = 0
            for family, kind, proto, _, where in infos:
                if not _local(family, where):
                    return None
                try:
                    sock = socket.socket(family, kind, proto)
                except OSError as exc:
                    if exc.errno in _NOT_HERE:
                        continue
                    raise
                sock.setblocking(False)
                try:
                    await loop.sock_connect(sock, where)
                except ConnectionRefusedError:
                    refusals += 1
                    continue
                except OSError as exc:
                    if exc.errno in _NOT_HERE:
                        continue  # e.g. ::1 on a host without IPv6: no listener there
                    raise
                finally:
                    sock.close()
                return None  # something accepts there
            return f"connection to {address} refused" if refusals else None
    except FileNotFoundError:
        return f"no socket at {address}"
    except ConnectionRefusedError:
        return f"connection to {address} refused"
    except (TimeoutError, OSError):
        return None


def postmaster_running(data_dir: Path) -> bool:
    """A live (non-zombie) process is named by ``data_dir``'s postmaster.pid. No pid
    file, or a dead pid: False. Anything unreadable: True (cannot tell: not down)."""
    try:
        pid = int((data_dir / "postmaster.pid").read_text().split()[0])
    except FileNotFoundError:
        return False
    except (OSError, ValueError, IndexError):
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return stat[stat.rfind(")") + 2 :].split()[0] != "Z"


def persist_read_only(data_dir: Path) -> None:
    """Write ``default_transaction_read_only = 'on'`` into ``postgresql.auto.conf`` of a
    server that does not run (what ``ALTER SYSTEM`` writes), so it starts read-only: a
    new file beside it with the old one's owner and mode, flushed, then renamed over it.
    ``OSError`` when it cannot."""
    auto = data_dir / "postgresql.auto.conf"
    try:
        lines = auto.read_text().splitlines()
        st = auto.stat()
    except FileNotFoundError:
        lines, st = [], data_dir.stat()
    kept = [ln for ln in lines if not ln.strip().startswith("default_transaction_read_only")]
    fresh = data_dir / "postgresql.auto.conf.watchdogd-guard"
    with fresh.open("w") as f:
        f.writelines(f"{ln}\n" for ln in kept)
        f.write(f"{_READ_ONLY_LINE}\n")
        f.flush()
        os.fsync(f.fileno())
    fresh.chmod(0o600)
    if os.geteuid() == 0:
        os.chown(fresh, st.st_uid, st.st_gid)
    fresh.rename(auto)
    directory = os.open(data_dir, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


# --------------------------------------------------------------------------- the runner


class Guard:
    """The guard for one node: ``await Guard(...).run()`` runs until cancelled.

    Cancelling it is a crash as far as the fleet can tell: the lease is not revoked,
    its key expires ttl after the last renewal."""

    def __init__(
        self,
        settings: GuardSettings,
        client: EtcdClient,
        engine: Engine,
        *,
        log: Any = None,
        clock: Callable[[], float] = core_clock.now,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.client = client
        self.engine = engine
        self.keys = GuardKeys.under(settings.prefix)
        self.log: Any = log if log is not None else structlog.stdlib.get_logger("watchdogd")
        self.clock = clock
        self.wall = wall
        self.signs = SignsOfLife(clock())
        self.lease: Lease | None = None
        self.self_fenced_at: float | None = None  # this isolation's fence (None: not fenced)
        self.self_fences = 0
        self.acks: list[Ack] = []  # acks written, in order (status and tests)
        self._key_written = False
        self._published: float | None = None  # the isolation_timeout in guard/settings
        # guard/settings says this guard counts vouches: only then may it count them (a
        # leader reading it waits for the watchers' silence too).
        self.vouches_count = False
        self.vouching: tuple[str, ...] = ()  # the watchers that vouched in the last round
        self._unasked: dict[str, str] = {}  # watchers that could not be asked, and why
        self.reply_interval: float | None = None  # the standby's, as its server says (start)
        self.sender_timeout: float | None = None  # the primary's wal_sender_timeout (start)
        self._store_down: str | None = None
        self._ignored: set[tuple[int, str]] = set()
        self._last_ack: Ack | None = None
        self._isolation_trouble: str | None = None
        database = settings.database
        self.address = address_of(database)
        self.data_dir: Path | None = None
        if database is not None and database.engine == "postgres":
            data_dir = database.options.get("data_dir")
            self.data_dir = Path(data_dir) if data_dir else None
        self.db_answered = False  # it answered this guard once: its DSN is right
        self.standby_addresses: tuple[str, ...] = ()  # settings.standby_hosts, resolved
        self.promise: Order | None = None  # answered "down": fence it when it answers
        self._lock = asyncio.Lock()  # one fence and ack at a time (orders, promise)

    async def run(self) -> NoReturn:
        self.log.info(
            "guard started",
            node=self.settings.node,
            prefix=self.settings.prefix,
            ttl=self.settings.ttl,
            isolation_timeout=self.settings.isolation_timeout,
        )
        self.standby_addresses = await asyncio.to_thread(resolve_hosts, self.settings.standby_hosts)
        # Its database first (bounded): once its key says it is alive, a crash of a
        # database that was up can be answered "down" (see db_answered).
        with contextlib.suppress(EngineError):
            await self.engine.status(DB_TIMEOUT)
            self.db_answered = True
        sender = await self._setting_seconds("wal_sender_timeout")
        # 0: the primary never drops a silent connection, so no gap is too long to learn
        self.sender_timeout = sender if sender is not None and sender > 0 else None
        self.reply_interval = await self._reply_interval()
        # The start counts from here, not construction: once the guard watches (the reads
        # above may have taken seconds, and a standby's first countable reply can be its
        # whole window after the guard's first look at it).
        self.signs = SignsOfLife(self.clock(), gap_limit=self.sender_timeout)
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._keep_alive())
            tasks.create_task(self._follow_orders())
            tasks.create_task(self._watch_isolation())
            tasks.create_task(self._keep_promise())
            if self.settings.watchers:
                tasks.create_task(self._ask_watchers())
        raise AssertionError("the guard's loops never end")  # pragma: no cover

    # ----------------------------------------------------------------- the lease

    async def _keep_alive(self) -> NoReturn:
        interval = self.settings.renew_interval
        while True:
            try:
                await self._renew_once()
            except LeaseNotFound:
                self.log.warning("guard lease gone; taking a new one", node=self.settings.node)
                self.lease, self._key_written = None, False
                continue
            except StoreUnavailable as exc:
                self._store_trouble(str(exc))
                await asyncio.sleep(min(interval, self.settings.poll))
                continue
            if self._store_down is not None:
                self.log.info("guard reaches the store again", node=self.settings.node)
                self._store_down = None
            await asyncio.sleep(interval)

    async def _renew_once(self) -> None:
        if self.lease is None:
            self.lease = await self.client.lease_grant(max(1, math.ceil(self.settings.ttl)))
            self._key_written = False
        await self._publish()
        if not self._key_written:
            alive = Alive(self.settings.node, os.getpid(), self.wall(), self.self_fences > 0)
            await self.client.put(self.keys.alive, alive.encode(), lease=self.lease.id)
            self._key_written = True
            self.signs.store_renewed(self.lease.last.sent_at)
            return
        renewal = await self.lease.renew()
        self.signs.store_renewed(renewal.sent_at)

    async def _publish(self) -> None:
        """Write ``guard/settings`` when what it says changed: at start, before the alive
        key (a leader that ever saw the guard alive can read what it runs with, also
        once it is gone: see guard_keys.Published), and whenever the standby's replies
        turn out to be further apart than the guard knew. The isolation timeout it
        publishes is the longest silence it waits before fencing: the configured one, or
        the standby's reply window when longer. Only a published window is used
        (``signs.standby_window``): the leader then waits it out too."""
        window = self.standby_window()
        effective = max(self.settings.isolation_timeout, window or 0.0)
        if self._published == effective:
            return
        mine = Published(
            self.settings.node,
            effective,
            vouching=bool(self.settings.watchers),
            watchers=tuple(name for name, _ in self.settings.watchers),
            needed=self.settings.vouches_needed if self.settings.watchers else 0,
        )
        await self.client.put(self.keys.settings, mine.encode())
        self.vouches_count = mine.vouching
        if self._published is not None:
            self.log.warning(
                "guard: the standby replies further apart than it knew; it waits longer",
                node=self.settings.node,
                isolation_timeout=self.settings.isolation_timeout,
                standby_window=window,
                longest_gap=round(self.signs.longest_gap, 1),
            )
        self._published = effective
        self.signs.standby_window = window

    def standby_window(self) -> float | None:
        """How long after the standby's last reply the guard still counts it as alive
        (None: the guard never sees a standby): its reply interval (the server's
        ``wal_receiver_status_interval``, or the longest gap seen between its replies
        when longer), plus two polls and four reads: a reply is counted from the send
        time of the read before it, which may have taken a read to answer, the reply may
        come as the next read is under way, and the next reply is seen only by a read
        sent a poll after the one under way at its arrival, once it answered."""
        if not self.standby_addresses or not hasattr(self.engine, "standby_reply_mark"):
            return None
        interval = max(self.reply_interval or DEFAULT_REPLY_INTERVAL, self.signs.longest_gap)
        return reply_window(interval, self.settings.poll)

    async def _setting_seconds(self, name: str) -> float | None:
        """This primary's duration setting ``name`` in seconds (0 when off). None: no
        standby to watch, an engine without settings, or unreadable. The primary's
        ``wal_sender_timeout`` is read at start into ``sender_timeout``: it ends a
        replication connection silent that long, so no real gap between two replies
        is longer (None: disabled, or unknown)."""
        setting = getattr(self.engine, "setting", None)
        if setting is None or not self.standby_addresses:
            return None
        try:
            return pg_duration_seconds(await setting(name, DB_TIMEOUT))
        except EngineError:
            return None

    async def _reply_interval(self) -> float | None:
        """The standby's reply interval as this server's ``wal_receiver_status_interval``
        (the standby's own is not readable from here; a copy of the primary's config
        usually has the same, and the longest gap seen raises it); 0 (no periodic
        replies): half the ``wal_sender_timeout``, when the primary asks for one. None:
        cannot tell (the default, 10 s, is assumed)."""
        status = await self._setting_seconds("wal_receiver_status_interval")
        if status == 0:
            status = self.sender_timeout / 2 if self.sender_timeout else None
        return status if status is not None and status > 0 else None

    def _store_trouble(self, why: str) -> None:
        if self._store_down is None:
            self.log.warning("guard cannot reach the store", node=self.settings.node, error=why)
        self._store_down = why

    # ----------------------------------------------------------------- orders

    async def _follow_orders(self) -> NoReturn:
        while True:
            try:
                snapshot = await read_snapshot(self.client, self.settings.prefix)
            except StoreUnavailable as exc:
                self._store_trouble(str(exc))
            else:
                for problem in snapshot.problems:
                    self._note_ignored(0, problem)
                order, why = order_verdict(snapshot, self.settings.node)
                if order is not None:
                    ack = snapshot.ack
                    promised = (
                        ack is not None and ack.order_revision == order.revision and ack.promised
                    )
                    await self.execute(order, promised=promised)
                elif snapshot.order is not None:
                    self._note_ignored(snapshot.order.revision, why)
            await asyncio.sleep(self.settings.poll)

    def _note_ignored(self, revision: int, why: str) -> None:
        if (revision, why) in self._ignored:
            return  # logged once per order and reason
        self._ignored.add((revision, why))
        if "already acknowledged" not in why:
            self.log.warning("guard order ignored", node=self.settings.node, reason=why)

    async def execute(self, order: Order, *, promised: bool = False) -> Ack:
        """Fence on a valid order, verify, and acknowledge (the ack is retried by the
        next poll when the store does not take it: the order is still unacknowledged).
        A failed fence is tried again every poll; the same outcome is logged and
        acknowledged once. A database that is down is answered ``down`` (a promise,
        kept by ``_keep_promise``); ``promised``: the store already holds that answer
        for this order, so it stays ``down`` until the fence holds."""
        async with self._lock:
            return await self._execute(order, promised)

    async def _execute(self, order: Order, promised: bool) -> Ack:
        owed = self.promise is not None and self.promise.revision == order.revision
        promised = promised or owed
        retry = self._last_ack is not None and self._last_ack.order_revision == order.revision
        if not retry and not promised:
            self.log.warning(
                "guard fencing on order",
                node=self.settings.node,
                order=order.revision,
                holder=order.holder,
                token=order.token,
                failover_id=order.failover_id,
            )
        fenced, detail = await self._fence()
        down = False
        if fenced:
            if owed:  # the order follower got to it before _keep_promise did
                detail = self._kept_promise(order, detail)
            self.promise = None
        else:
            why = await self._down()
            if why is not None or promised:
                down = True
                if self.promise is None or self.promise.revision != order.revision:
                    if why is not None:  # it does not run: safe to edit its config
                        detail = f"database down: {why}; {await self._persist()}"
                    else:  # answered down before this guard (re)started
                        detail = f"database still not answering ({detail})"
                    detail += "; fenced the moment it answers"
                    self.promise = order
                    self.log.warning(
                        "guard: the database is down; it is fenced the moment it answers",
                        node=self.settings.node,
                        order=order.revision,
                        detail=detail,
                    )
                elif self._last_ack is not None and self._last_ack.down:
                    detail = self._last_ack.detail
        ack = Ack(order.revision, order.token, fenced, detail, down)
        return await self._acknowledge(ack)

    async def _acknowledge(self, ack: Ack) -> Ack:
        last = self._last_ack
        same = (ack.order_revision, ack.token, ack.fenced, ack.down)
        if last is not None and same == (last.order_revision, last.token, last.fenced, last.down):
            return ack
        try:
            await self.client.put(self.keys.ack, ack.encode())
        except StoreUnavailable as exc:
            self._store_trouble(str(exc))
            return ack
        self.acks.append(ack)
        self._last_ack = ack
        self.log.info(
            "guard acknowledged the order",
            node=self.settings.node,
            fenced=ack.fenced,
            down=ack.down,
            detail=ack.detail,
        )
        return ack

    async def _down(self) -> str | None:
        """Why the database is down (not running), or None (it runs, hangs, or the guard
        cannot tell). Needs: it answered this guard before (the DSN is right), every
        address refuses, and with ``data_dir`` no live postmaster holds it."""
        if not self.db_answered or self.address is None:
            return None
        why = await refused(self.address, DB_TIMEOUT)
        if why is None:
            return None
        if self.data_dir is not None:
            if await asyncio.to_thread(postmaster_running, self.data_dir):
                return None
            why += f"; no server runs in {self.data_dir}"
        return why

    async def _persist(self) -> str:
        """PostgreSQL with ``data_dir``: make the fence survive the restart (see
        ``persist_read_only``); what was done, for the ack."""
        if self.data_dir is None:
            return "no data_dir: it may accept writes until the guard fences it"
        try:
            await asyncio.to_thread(persist_read_only, self.data_dir)
        except OSError as exc:
            self.log.error(
                "guard could not make the fence survive the restart",
                node=self.settings.node,
                error=str(exc),
            )
            return f"could not write postgresql.auto.conf ({exc.strerror or exc})"
        return "postgresql.auto.conf set read-only: it starts read-only"

    async def _keep_promise(self) -> NoReturn:
        """While a "down" answer is outstanding, try the fence every ``DOWN_POLL``: the
        database is fenced as soon as it answers, then the order re-acknowledged."""
        while True:
            await asyncio.sleep(DOWN_POLL)
            if self.promise is None:
                continue
            async with self._lock:
                order = self.promise
                if order is None:
                    continue
                fenced, detail = await self._fence()
                if not fenced:
                    continue
                # Not taken by the store: the order follower sees the "down" ack still
                # there and carries the order out again (already fenced: acks it).
                await self._acknowledge(
                    Ack(order.revision, order.token, True, self._kept_promise(order, detail))
                )

    def _kept_promise(self, order: Order, detail: str) -> str:
        """A database answered "down" came back and is fenced now, by whichever loop
        got to it first: said once, the same way; the ack's detail."""
        self.promise = None
        self.log.warning(
            "guard fenced its database as it came back",
            node=self.settings.node,
            order=order.revision,
            detail=detail,
        )
        return f"back and fenced: {detail}"

    async def _fence(self) -> tuple[bool, str]:
        """The engine's fence, then a probe: fenced only when it no longer accepts writes."""
        try:
            done = await self.engine.fence(self.settings.fence_timeout)
            status = await self.engine.status(DB_TIMEOUT)
        except EngineError as exc:
            return False, f"fence failed: {exc}"
        self.db_answered = True
        if status.writable:
            return False, f"{done}; yet it still accepts writes ({status.detail})"
        return True, f"{done}; verified: {status.detail}"

    # ----------------------------------------------------------------- vouches

    async def _ask_watchers(self) -> NoReturn:
        """Every poll, ask each watcher of ``guard.watchers`` whether it vouches for this
        node (``GET <url>/vouch``, bounded by one database read's time). Each yes is
        dated at its round's send time; once a strict majority of the voters each said
        yes at or after some time, that time is a sign of life (the majority-th latest
        of their last yeses: a majority need not answer in the very same round, and the
        leader's bound, after which fewer than a majority can vouch, still holds).
        Counted only once ``guard/settings`` says so (``vouches_count``)."""
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=DB_TIMEOUT)
        last_yes: dict[str, float] = {}
        needed = self.settings.vouches_needed
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                sent = self.clock()
                answers = await asyncio.gather(
                    *(self._vouches(session, name, url) for name, url in self.settings.watchers)
                )
                yes = tuple(
                    name
                    for (name, _), ok in zip(self.settings.watchers, answers, strict=True)
                    if ok
                )
                for name in yes:
                    last_yes[name] = sent
                latest = sorted(last_yes.values(), reverse=True)
                counted = False
                if self.vouches_count and len(latest) >= needed:
                    self.signs.vouched(latest[needed - 1])
                    counted = latest[needed - 1] == sent  # a sign of life as of this round
                if yes != self.vouching:
                    self.log.info(
                        "guard: the watchers vouching for its primary changed",
                        node=self.settings.node,
                        vouching=list(yes),
                        needed=self.settings.vouches_needed,
                        counted=counted,
                    )
                    self.vouching = yes
                await asyncio.sleep(self.settings.poll)

    async def _vouches(self, session: Any, name: str, url: str) -> bool:
        """Watcher ``name`` at ``url`` vouches for this node now: a 200 answer that names
        it and this node and says yes. Anything else (no answer, another status, a
        redirect, a wrong or oversized reply, any error) is no vouch."""
        try:
            async with session.get(f"{url}/vouch", allow_redirects=False) as reply:
                self._ask_trouble(name, None)  # it answers (a no is an answer)
                if reply.status != 200:
                    return False
                raw = await read_capped(reply.content, _VOUCH_MAX)
        except BodyTooLarge:
            return False
        except Exception as exc:  # one watcher's answer never ends the guard
            self._ask_trouble(name, f"{type(exc).__name__}: {exc}")
            return False
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            return False
        return (
            isinstance(data, dict)
            and data.get("instance") == name
            and data.get("node") == self.settings.node
            and data.get("vouch") is True
        )

    def _ask_trouble(self, name: str, why: str | None) -> None:
        """A watcher that cannot be asked is logged once, and again once it answers."""
        before = self._unasked.get(name)
        if why is None:
            if before is not None:
                del self._unasked[name]
                self.log.info("guard reaches the watcher again", node=self.settings.node,
                              watcher=name)  # fmt: skip
            return
        if before is None:
            self.log.warning("guard cannot ask the watcher", node=self.settings.node,
                             watcher=name, error=why[:200])  # fmt: skip
        self._unasked[name] = why

    # ----------------------------------------------------------------- isolation

    async def _watch_isolation(self) -> NoReturn:
        timeout = self.settings.isolation_timeout
        while True:
            if not self.db_answered:
                with contextlib.suppress(EngineError):
                    await self.engine.status(DB_TIMEOUT)
                    self.db_answered = True
            polled_at = self.clock()
            try:
                mark = await engines.standby_reply_mark(
                    self.engine, DB_TIMEOUT, self.standby_addresses
                )
            except EngineError:
                self.signs.standby_unread()
            else:
                self.signs.standby_mark(mark, polled_at)
            now = self.clock()
            if not self.signs.isolated(now, timeout):
                self._isolation_trouble = None
                if self.self_fenced_at is not None:
                    self.log.info(
                        "guard sees signs of life again; the database stays fenced",
                        node=self.settings.node,
                        source=self.signs.source,
                    )
                    self.self_fenced_at = None
            elif self.self_fenced_at is None:
                await self._fence_self(now)
            await asyncio.sleep(self.settings.poll)

    async def _fence_self(self, now: float) -> None:
        silent = self.signs.silent_for(now)
        try:
            status = await self.engine.status(DB_TIMEOUT)
            self.db_answered = True
        except EngineError as exc:
            self._trouble_once("guard isolated but cannot reach its database; retrying", str(exc))
            return
        if not status.is_primary or not status.writable:
            self.log.warning(
                "guard isolated; its database accepts no writes, nothing to fence",
                node=self.settings.node,
                detail=status.detail,
            )
            self.self_fenced_at = now
            return
        fenced, detail = await self._fence()
        if not fenced:
            self._trouble_once("guard isolated; fencing failed, retrying", detail)
            return
        self.self_fenced_at = now
        self.self_fences += 1
        self.log.error(
            "guard fenced its database: isolated",
            node=self.settings.node,
            silent_for=round(silent, 1),
            isolation_timeout=self.settings.isolation_timeout,
            last_sign=self.signs.source,
            detail=detail,
        )

    def _trouble_once(self, event: str, detail: str) -> None:
        """One error line per isolation and cause, not one per poll."""
        if self._isolation_trouble != event:
            self._isolation_trouble = event
            self.log.error(event, node=self.settings.node, detail=detail)


async def run_guard(settings: GuardSettings, log: Any = None) -> NoReturn:
    """Run the guard for ``settings.database`` until cancelled."""
    if settings.database is None:
        raise GuardConfigError("the guard has no database to fence")
    engine = engines.create(settings.database, set(settings.secrets))
    async with settings.client() as client:
        try:
            await Guard(settings, client, engine, log=log).run()
        finally:
            await engine.close()
