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
  two hosts' clocks never matter; other engines cannot tell: no sign). It fences once per
  isolation, logs it, and keeps trying to reach the store. A started guard counts its
  start as a sign of life.

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
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import structlog

from watchdogd import engines
from watchdogd.core.errors import WatchdogdError
from watchdogd.core.model import DatabaseConfig
from watchdogd.engines import Engine, EngineError
from watchdogd.state.etcd import (
    EtcdClient,
    EtcdConfigError,
    Lease,
    LeaseNotFound,
    TlsFiles,
    endpoints_of,
)
from watchdogd.state.guard_keys import (
    Ack,
    Alive,
    GuardKeys,
    Order,
    order_verdict,
    read_snapshot,
)
from watchdogd.state.store import StoreUnavailable

DEFAULT_POLL = 0.5
DB_TIMEOUT = 1.0


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
        return None

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
    )


# --------------------------------------------------------------------------- the pure rule


class SignsOfLife:
    """When the guard last had proof it is not cut off (monotonic seconds).

    ``store_renewed(sent_at)``: an acknowledged lease renewal (or grant), counted from
    the time its request was sent (etcd renewed it no earlier). ``standby_mark(mark,
    polled_at)``: one read of the standby's reply mark (None: no standby streams, or the
    read failed); a mark larger than the previous read's proves a reply arrived after
    that read was sent, so the previous read's send time counts. ``start``: the guard's
    start counts as a sign, so a guard started while cut off waits a whole timeout.
    """

    def __init__(self, start: float) -> None:
        self.last = start
        self.source = "start"
        self._mark: float | None = None
        self._mark_polled: float | None = None

    def _saw(self, at: float, source: str) -> None:
        if at >= self.last:
            self.last, self.source = at, source

    def store_renewed(self, sent_at: float) -> None:
        self._saw(sent_at, "store")

    def standby_mark(self, mark: float | None, polled_at: float) -> None:
        previous, previous_at = self._mark, self._mark_polled
        if mark is not None and previous is not None and previous_at is not None:
            if mark > previous:
                self._saw(previous_at, "standby")
        self._mark, self._mark_polled = mark, (polled_at if mark is not None else None)

    def silent_for(self, now: float) -> float:
        return max(0.0, now - self.last)

    def isolated(self, now: float, timeout: float) -> bool:
        return self.silent_for(now) >= timeout


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
        clock: Callable[[], float] = time.monotonic,
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
        self._store_down: str | None = None
        self._ignored: set[tuple[int, str]] = set()
        self._last_ack: Ack | None = None
        self._isolation_trouble: str | None = None

    async def run(self) -> NoReturn:
        self.signs = SignsOfLife(self.clock())  # the start counts from now, not construction
        self.log.info(
            "guard started",
            node=self.settings.node,
            prefix=self.settings.prefix,
            ttl=self.settings.ttl,
            isolation_timeout=self.settings.isolation_timeout,
        )
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._keep_alive())
            tasks.create_task(self._follow_orders())
            tasks.create_task(self._watch_isolation())
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
        if not self._key_written:
            alive = Alive(self.settings.node, os.getpid(), self.wall(), self.self_fences > 0)
            await self.client.put(self.keys.alive, alive.encode(), lease=self.lease.id)
            self._key_written = True
            self.signs.store_renewed(self.lease.last.sent_at)
            return
        renewal = await self.lease.renew()
        self.signs.store_renewed(renewal.sent_at)

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
                    await self.execute(order)
                elif snapshot.order is not None:
                    self._note_ignored(snapshot.order.revision, why)
            await asyncio.sleep(self.settings.poll)

    def _note_ignored(self, revision: int, why: str) -> None:
        if (revision, why) in self._ignored:
            return  # logged once per order and reason
        self._ignored.add((revision, why))
        if "already acknowledged" not in why:
            self.log.warning("guard order ignored", node=self.settings.node, reason=why)

    async def execute(self, order: Order) -> Ack:
        """Fence on a valid order, verify, and acknowledge (the ack is retried by the
        next poll when the store does not take it: the order is still unacknowledged).
        A failed fence is tried again every poll; the same outcome is logged and
        acknowledged once."""
        retry = self._last_ack is not None and self._last_ack.order_revision == order.revision
        if not retry:
            self.log.warning(
                "guard fencing on order",
                node=self.settings.node,
                order=order.revision,
                holder=order.holder,
                token=order.token,
                failover_id=order.failover_id,
            )
        fenced, detail = await self._fence()
        ack = Ack(order.revision, order.token, fenced, detail)
        if ack == self._last_ack:
            return ack
        try:
            await self.client.put(self.keys.ack, ack.encode())
        except StoreUnavailable as exc:
            self._store_trouble(str(exc))
            return ack
        self.acks.append(ack)
        self._last_ack = ack
        self.log.info(
            "guard acknowledged the order", node=self.settings.node, fenced=fenced, detail=detail
        )
        return ack

    async def _fence(self) -> tuple[bool, str]:
        """The engine's fence, then a probe: fenced only when it no longer accepts writes."""
        try:
            done = await self.engine.fence(self.settings.fence_timeout)
            status = await self.engine.status(DB_TIMEOUT)
        except EngineError as exc:
            return False, f"fence failed: {exc}"
        if status.writable:
            return False, f"{done}; yet it still accepts writes ({status.detail})"
        return True, f"{done}; verified: {status.detail}"

    # ----------------------------------------------------------------- isolation

    async def _watch_isolation(self) -> NoReturn:
        timeout = self.settings.isolation_timeout
        while True:
            polled_at = self.clock()
            try:
                mark = await engines.standby_reply_mark(self.engine, DB_TIMEOUT)
            except EngineError:
                mark = None
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
