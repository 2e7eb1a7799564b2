"""Redis engine (redis-py asyncio): status, stop_replication, promote and fence.

Owns everything the daemon knows about Redis 6.2+ (and protocol-compatible
servers): the ``database:`` keys for it (``password`` / ``password_file``,
merged into the connection at connect time; or the password in
``redis://[[user]:password@]host:6379/0``), and the failover operations with
their verifications.

Definitions (what ``status()`` reports, from ``INFO replication``):

* **primary** (``is_primary=True``): ``role:master``. ``current_pos`` is its
  ``master_repl_offset``.
* **standby**: ``role:slave``. ``receive_pos`` is ``slave_read_repl_offset``
  (Redis 7; ``slave_repl_offset`` before), ``replay_pos`` is
  ``slave_repl_offset``: both in the primary's offset space, so
  ``current_pos - replay_pos`` is the byte lag. ``streaming`` is
  ``master_link_status:up``; ``last_receive_age`` is
  ``master_last_io_seconds_ago`` while the link is up and
  ``master_link_down_since_seconds`` while it is down (whole seconds; the
  primary pings every ``repl-ping-replica-period``, 10 s by default: lower it
  for a timelier view). ``lag_seconds`` is 0 while streaming (a replica
  applies the stream as it reads it: it has no replay backlog to measure) and
  unknown otherwise. ``replay_paused`` does not apply (None).
* **writable**: a primary whose writes are not refused by
  ``min-replicas-to-write`` (the fence, below), i.e. not
  ``min-replicas-to-write > good replicas`` with ``min-replicas-max-lag > 0``.
  A replica is never reported writable (``detail`` says when
  ``replica-read-only`` is off).

Fencing: ``CONFIG SET min-replicas-to-write 2147483647`` (and
``min-replicas-max-lag`` to 10 if it was 0, which would disable the check).
Chosen over ``CLIENT PAUSE WRITE``, whose state cannot be read back and whose
paused writers hang instead of failing, and over ``REPLICAOF <new primary>``,
which needs an address ``Engine.fence()`` is not given: every client's writes
fail at once with ``NOREPLICAS``, the state is visible to ``status()`` (so
``writable`` is derived, not remembered), and it survives a watchdogd restart.
It is persisted with ``CONFIG REWRITE`` when the server has a config file (the
result says whether it could). Then normal and pub/sub client connections
other than ours are killed and a write is checked to be refused. ``promote``
undoes exactly this fence (``min-replicas-to-write`` back to 0 when it holds
the fence value; an operator's own setting is left alone, and promotion then
fails its write check with the server's reason).

``stop_replication`` and ``promote`` both run ``REPLICAOF NO ONE`` on a
replica (Redis has no "stopped but not promoted" state); ``promote`` then
verifies ``role:master`` and that ``SET watchdogd:promoted`` is accepted. Both
are idempotent.

With ACLs the watchdogd user needs ``+ping +info +config|get +config|set
+config|rewrite +client|kill +client|setname +replicaof +set ~watchdogd:*``.

Every call is bounded by ``asyncio.timeout`` around the whole method (connect
included), with redis-py's own retries off. Probing reuses one lazily
(re)opened connection; the failover operations use a connection of their
own, one at a time. Any failure drops the connection and becomes one
EngineError line without secrets.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import redis.asyncio as aioredis
from redis import exceptions as rexc
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from watchdogd.engines import DbStatus, Divergence, Engine, EngineError
from watchdogd.engines._common import (
    ConnectionTemplate,
    confirm_within,
    host_port,
    keepalive_for,
    split_dsn,
    validate_password,
)

if TYPE_CHECKING:
    from watchdogd.core.model import DatabaseConfig
    from watchdogd.core.section import Section

DEFAULT_PORT = 6379
EXAMPLE = "redis://:password@host:6379/0"
# min-replicas-to-write while fenced: no server ever has this many replicas,
# and no operator picks it, so it also marks the fence as ours.
FENCE_MIN_REPLICAS = 2_147_483_647
FENCE_MAX_LAG = 10
PROMOTED_KEY = "watchdogd:promoted"
FENCE_CHECK_KEY = "watchdogd:fence-check"


# --------------------------------------------------------------------------- DSN


@dataclass(frozen=True)
class RedisDsn:
    host: str
    port: int
    db: int
    username: str | None
    password: str | None

    def __repr__(self) -> str:
        return f"RedisDsn({self.where!r}, db={self.db})"

    @property
    def where(self) -> str:
        return host_port(self.host, self.port)


def parse_dsn(dsn: str) -> RedisDsn:
    """``redis://[[user]:password@]host[:6379][/db]``. The ValueError's message
    never repeats the DSN (it may hold a password)."""
    parts, host, port = split_dsn(dsn, ("redis",), "Redis", EXAMPLE)
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError(f"expected a database number after the host, e.g. {EXAMPLE}")
    return RedisDsn(
        host=host,
        port=port or DEFAULT_PORT,
        db=int(path) if path else 0,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
    )


# --------------------------------------------------------------------------- module contract


def validate(section: Section) -> Mapping[str, Any]:
    """Extra keys of a ``database:`` section with ``engine: redis``."""
    return validate_password(section, lambda dsn: parse_dsn(dsn).password)


def create(db: DatabaseConfig, secrets: set[str]) -> RedisEngine:
    try:
        dsn = parse_dsn(db.dsn)
    except ValueError as exc:
        raise EngineError(f"redis: database.dsn: {exc}") from None
    password = db.options.get("password")
    return RedisEngine(dsn, password=str(password) if password else None, secrets=secrets)


# --------------------------------------------------------------------------- server facts


def _int(value: Any, default: int | None = None) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, rexc.AuthenticationError) and "auth" not in text.lower():
        text = f"authentication failed ({text})"
    return text


def _is_stale(exc: BaseException) -> bool:
    """A dead connection (server restarted, or fence() killed it), as opposed to
    a refusal: worth one retry on a fresh connection."""
    if isinstance(exc, rexc.AuthenticationError | rexc.AuthorizationError | rexc.BusyLoadingError):
        return False
    return isinstance(exc, rexc.ConnectionError | ConnectionError)


@dataclass(frozen=True)
class MinReplicas:
    """The two settings behind the fence, or None where CONFIG is not allowed."""

    to_write: int
    max_lag: int

    @property
    def fenced(self) -> bool:
        return self.to_write == FENCE_MIN_REPLICAS


async def _min_replicas(client: aioredis.Redis) -> MinReplicas | None:
    try:
        got = await client.config_get("min-replicas-*")
    except rexc.ResponseError:
        return None  # CONFIG renamed away or denied by ACL
    return MinReplicas(
        to_write=_int(got.get("min-replicas-to-write"), 0) or 0,
        max_lag=_int(got.get("min-replicas-max-lag"), 0) or 0,
    )


async def _repl_timeout(client: aioredis.Redis) -> int | None:
    """The replica's ``repl-timeout`` (seconds of silence before it drops its link to
    the primary), or None where CONFIG is not allowed."""
    try:
        got = await client.config_get("repl-timeout")
    except rexc.ResponseError:
        return None
    return _int(got.get("repl-timeout"))


def _good_replicas(info: Mapping[str, Any], max_lag: int) -> int:
    if "min_slaves_good_slaves" in info:
        return _int(info["min_slaves_good_slaves"], 0) or 0
    good = 0
    for key, value in info.items():
        if key.startswith("slave") and key[5:].isdigit() and isinstance(value, Mapping):
            lag = _int(value.get("lag"), None)
            if value.get("state") == "online" and lag is not None and lag <= max_lag:
                good += 1
    return good


def _writes_refused(info: Mapping[str, Any], mr: MinReplicas | None) -> bool:
    if mr is None or mr.to_write <= 0 or mr.max_lag <= 0:
        return False
    return _good_replicas(info, mr.max_lag) < mr.to_write


# --------------------------------------------------------------------------- engine


class RedisEngine(ConnectionTemplate[aioredis.Redis]):
    """One Redis server."""

    def __init__(
        self,
        dsn: RedisDsn,
        *,
        password: str | None = None,
        secrets: set[str] | frozenset[str] = frozenset(),
    ) -> None:
        self._password = password if password is not None else dsn.password
        super().__init__("redis", dsn.where, secrets, self._password)
        self.dsn = dsn

    def __repr__(self) -> str:
        return f"RedisEngine({self.where}/{self.dsn.db})"

    # -- plumbing (the rest is ConnectionTemplate's)

    _is_stale = staticmethod(_is_stale)

    async def _open(self, deadline: float, limit: float) -> aioredis.Redis:
        # Connects on its first command, within the caller's bound.
        return aioredis.Redis(
            host=self.dsn.host,
            port=self.dsn.port,
            db=self.dsn.db,
            username=self.dsn.username,
            password=self._password,
            socket_connect_timeout=limit,
            socket_timeout=None,  # asyncio.timeout bounds every call instead
            retry=Retry(NoBackoff(), 0),
            single_connection_client=True,
            decode_responses=True,
            client_name="watchdogd",
            # RESP2: no HELLO handshake, whose error for a missing password is
            # confusing, and the oldest servers speak it.
            protocol=2,
        )

    def _watch(self, client: aioredis.Redis, lost: Callable[[], None]) -> None:
        writer = getattr(client.connection, "_writer", None)  # redis-py has no callback
        self._watch_stream(writer, lost)

    async def _discard(self, client: aioredis.Redis) -> None:
        # Never waits for a hung server: close the socket without a goodbye.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                if client.connection is not None:
                    await client.connection.disconnect(nowait=True)
                await client.aclose()

    def _reason(self, exc: BaseException) -> str:
        reason = _reason(exc)
        if isinstance(exc, rexc.AuthenticationError) and not self._password:
            reason += " (no password configured: give one in the dsn or database.password)"
        return reason

    async def _info(self, client: aioredis.Redis) -> dict[str, Any]:
        info: dict[str, Any] = await client.info("replication")
        if info.get("role") not in ("master", "slave"):
            raise EngineError(self._line(f"unexpected role {info.get('role')!r}"))
        return info

    # -- Engine: status

    async def status(self, timeout: float) -> DbStatus:
        async def query(client: aioredis.Redis, _: float) -> DbStatus:
            info = await self._info(client)
            if info["role"] == "master":
                return self._primary_status(info, await _min_replicas(client))
            return self._standby_status(info, await _repl_timeout(client))

        return await self._probe("status", timeout, query)

    @staticmethod
    def _primary_status(info: Mapping[str, Any], mr: MinReplicas | None) -> DbStatus:
        refused = _writes_refused(info, mr)
        current = _int(info.get("master_repl_offset"))
        parts = [f"primary at offset {current}", f"{info.get('connected_slaves', 0)} replica(s)"]
        if mr is not None and mr.fenced:
            parts.append("fenced by watchdogd (min-replicas-to-write), writes refused")
        elif refused and mr is not None:
            parts.append(
                f"writes refused: fewer than min-replicas-to-write={mr.to_write} good replicas"
            )
        elif mr is None:
            parts.append("CONFIG not allowed: fence state unknown")
        return DbStatus(
            is_primary=True,
            writable=not refused,
            current_pos=current,
            detail=", ".join(parts),
        )

    @staticmethod
    def _standby_status(info: Mapping[str, Any], repl_timeout: int | None = None) -> DbStatus:
        up = info.get("master_link_status") == "up"
        syncing = bool(_int(info.get("master_sync_in_progress"), 0))
        replay = _int(info.get("slave_repl_offset"))
        receive = _int(info.get("slave_read_repl_offset"), replay)
        age_key = "master_last_io_seconds_ago" if up else "master_link_down_since_seconds"
        age = _int(info.get(age_key))
        source = f"{info.get('master_host')}:{info.get('master_port')}"
        parts = [f"replica of {source}", f"link {'up' if up else 'down'}"]
        if syncing:
            parts.append("full sync in progress")
        parts.append(f"offset {replay}")
        if not _int(info.get("slave_read_only"), 1):
            parts.append("replica-read-only is off")
        return DbStatus(
            is_primary=False,
            writable=False,
            receive_pos=receive,
            replay_pos=replay,
            streaming=up and not syncing,
            last_receive_age=float(age) if age is not None and age >= 0 else None,
            link_timeout=float(repl_timeout) if repl_timeout is not None else None,
            lag_seconds=0.0 if up and not syncing else None,
            replay_paused=None,
            detail=", ".join(parts),
        )

    async def advise(self, outage_threshold: float, timeout: float) -> list[str]:
        """A replica gives up on a silent link only after its ``repl-timeout``, so a
        hung primary (SIGSTOP, a cut path without RST) is confirmed only then: say so
        at start when that is later than the outage threshold, with the settings that
        make it fast. A crashed primary is fast on any setting."""
        status = await self.status(timeout)
        if status.is_primary:
            return []
        value = confirm_within(outage_threshold)
        fix = (
            f"To confirm it in time: CONFIG SET repl-timeout {value} on the replica and "
            f"CONFIG SET repl-ping-replica-period {keepalive_for(value)} on the primary "
            "(the ping must come well within the timeout), then CONFIG REWRITE on both."
        )
        seconds = status.link_timeout
        if seconds is None:
            return [
                "repl-timeout cannot be read on this replica (CONFIG not allowed): a hung "
                "primary is confirmed only after it (60s by default), perhaps later than "
                f"the outage threshold ({outage_threshold:g}s). {fix}"
            ]
        if seconds <= outage_threshold:
            return []
        return [
            f"repl-timeout is {seconds:g}s on this replica: a hung primary is confirmed only "
            f"after {seconds:g}s, not within the outage threshold ({outage_threshold:g}s). {fix}"
        ]

    # -- Engine: failover operations

    async def stop_replication(self, timeout: float) -> str:
        async def action(client: aioredis.Redis, _: float) -> str:
            info = await self._info(client)
            if info["role"] == "master":
                return "not a replica: nothing to stop"
            await client.replicaof("NO", "ONE")
            if (await self._info(client))["role"] != "master":
                raise EngineError(self._line("stop_replication: still a replica after REPLICAOF"))
            return (
                f"stopped replicating from {info.get('master_host')}:{info.get('master_port')}"
                f" at offset {info.get('slave_repl_offset')} (REPLICAOF NO ONE): now a primary"
            )

        return await self._admin("stop_replication", timeout, action)

    async def promote(self, timeout: float) -> str:
        async def action(client: aioredis.Redis, _: float) -> str:
            done: list[str] = []
            info = await self._info(client)
            if info["role"] == "slave":
                await client.replicaof("NO", "ONE")
                done.append(
                    f"stopped replicating from {info.get('master_host')}:"
                    f"{info.get('master_port')} (REPLICAOF NO ONE)"
                )
            mr = await _min_replicas(client)
            if mr is not None and mr.fenced:
                await client.config_set("min-replicas-to-write", 0)
                done.append("cleared the watchdogd fence" + await self._persist(client))
            if (await self._info(client))["role"] != "master":
                raise EngineError(self._line("promote: still a replica after REPLICAOF NO ONE"))
            try:
                await client.set(PROMOTED_KEY, str(time.time()))
            except rexc.ResponseError as exc:
                raise EngineError(
                    self._line(f"promote: a write to {PROMOTED_KEY} was refused: {_reason(exc)}")
                ) from None
            if not done:
                return "already a writable primary: write verified, nothing changed"
            return "promoted: " + "; ".join(done) + "; write verified"

        return await self._admin("promote", timeout, action)

    async def fence(self, timeout: float) -> str:
        async def action(client: aioredis.Redis, _: float) -> str:
            mr = await _min_replicas(client)
            if mr is None:
                raise EngineError(
                    self._line("fence: CONFIG GET is not allowed, so writes cannot be refused")
                )
            persisted = ""
            if mr.max_lag <= 0:
                await client.config_set("min-replicas-max-lag", FENCE_MAX_LAG)
            if not mr.fenced:
                await client.config_set("min-replicas-to-write", FENCE_MIN_REPLICAS)
            if not mr.fenced or mr.max_lag <= 0:
                persisted = await self._persist(client)
            killed = 0
            for kind in ("normal", "pubsub"):
                killed += await client.client_kill_filter(_type=kind, skipme=True)
            try:
                await client.set(FENCE_CHECK_KEY, str(time.time()))
            except rexc.ResponseError:
                pass  # NOREPLICAS (or READONLY on a replica): refused, as it should be
            else:
                raise EngineError(self._line("fence: a write was still accepted"))
            head = "already fenced" if mr.fenced else "fenced"
            return (
                f"{head}: writes refused (min-replicas-to-write={FENCE_MIN_REPLICAS}{persisted});"
                f" {killed} client connection(s) killed"
            )

        return await self._admin("fence", timeout, action)

    @staticmethod
    async def _persist(client: aioredis.Redis) -> str:
        """CONFIG REWRITE, so the change survives a restart; says how it went."""
        try:
            await client.config_rewrite()
        except rexc.ResponseError as exc:
            return f"; not persisted: {_reason(exc)}"
        return "; persisted with CONFIG REWRITE"

    # -- Engine: rejoin (self is the old primary)

    async def _identity(self, timeout: float) -> str:
        async def query(client: aioredis.Redis, _: float) -> str:
            info: dict[str, Any] = await client.info("server")
            return f"run_id {info.get('run_id')}"

        return await self._probe("reading its run_id", timeout, query)

    async def divergence(self, new_primary: Engine, timeout: float) -> Divergence:
        new = await self._distinct_peer(new_primary, "divergence", min(timeout / 4, 2.0))
        deadline = asyncio.get_running_loop().time() + timeout

        async def info(client: aioredis.Redis, _: float) -> dict[str, Any]:
            return await self._info(client)

        mine = await self._probe("divergence", timeout, info)
        try:
            theirs = await new._probe("divergence", self._remaining(deadline), info)
        except EngineError as exc:
            return Divergence(False, None, "bytes", detail=f"cannot read the new primary: {exc}")
        return offset_divergence(mine, theirs, new.dsn)

    async def rejoin(self, new_primary: Engine, timeout: float) -> str:
        new = await self._distinct_peer(new_primary, "rejoin", min(timeout / 4, 2.0))

        async def action(client: aioredis.Redis, deadline: float) -> str:
            info = await self._info(client)
            if _follows(info, new.dsn):
                await self._until("rejoin", deadline, lambda: self._not_synced(client, new.dsn))
                return f"already a replica of {new.where}: link up"
            theirs = await new.status(self._remaining(deadline))
            if not theirs.is_primary:
                raise EngineError(self._line(f"rejoin: {new.where} is not a primary"))
            # The old primary authenticates to the new one as the watcher does.
            if new._password:
                await client.config_set("masterauth", new._password)
            if new.dsn.username:
                await client.config_set("masteruser", new.dsn.username)
            await client.replicaof(new.dsn.host, str(new.dsn.port))
            await self._until("rejoin", deadline, lambda: self._not_synced(client, new.dsn))
            offset = (await self._info(client)).get("slave_repl_offset")
            return (
                f"now a replica of {new.where} (was {info['role']} at offset "
                f"{info.get('master_repl_offset')}): link up, synced to offset {offset}"
                + await self._persist(client)
            )

        return await self._admin("rejoin", timeout, action)

    async def _not_synced(self, client: aioredis.Redis, dsn: RedisDsn) -> str | None:
        info = await self._info(client)
        if not _follows(info, dsn):
            return f"not a replica of {dsn.where} ({_role_text(info)})"
        if info.get("master_link_status") != "up":
            return f"link to {dsn.where} is down"
        if _int(info.get("master_sync_in_progress"), 0):
            return f"still syncing from {dsn.where}"
        return None

    async def replica_of(self, new_primary: Engine, timeout: float) -> str:
        new, target, deadline = await self._replica_target(new_primary, timeout)

        async def query(client: aioredis.Redis, _: float) -> int:
            info = await self._info(client)
            why = await self._not_synced(client, new.dsn)
            if why is not None:
                raise EngineError(self._line(f"replica_of: {why}"))
            return _int(info.get("slave_repl_offset"), 0) or 0

        offset = await self._caught_up(
            deadline,
            target,
            query,
            lambda at: f"at offset {at}, {target - (at or 0)} bytes behind {new.where}",
        )
        return f"replica of {new.where}, link up, at offset {offset} (target {target})"


def _follows(info: Mapping[str, Any], dsn: RedisDsn) -> bool:
    return (
        info.get("role") == "slave"
        and str(info.get("master_host")) == dsn.host
        and _int(info.get("master_port")) == dsn.port
    )


def _role_text(info: Mapping[str, Any]) -> str:
    if info.get("role") == "slave":
        return f"replica of {info.get('master_host')}:{info.get('master_port')}"
    return "a primary"


def offset_divergence(
    mine: Mapping[str, Any], theirs: Mapping[str, Any], new: RedisDsn
) -> Divergence:
    """The old primary's replication stream past the point where the new primary's
    history left it. Redis keeps, on a promoted replica, the replication id it
    followed (``master_replid2``) and the offset where it stopped following it
    (``second_repl_offset`` - 1): the fork. Every byte the old primary's stream
    holds beyond the fork, under that id, the new primary never got."""
    if _follows(mine, new):
        return Divergence(
            True, 0, "bytes", detail=f"already a replica of {new.where}: nothing to throw away"
        )
    my_id, my_offset = mine.get("master_replid"), _int(mine.get("master_repl_offset"))
    if my_offset is None or not my_id:
        return Divergence(
            False, None, "bytes", detail="the old primary shows no replication offset"
        )
    second = _int(theirs.get("second_repl_offset"), -1) or -1
    if my_id == theirs.get("master_replid"):
        fork = _int(theirs.get("master_repl_offset"), 0) or 0
        where = f"the new primary's offset {fork} (same history)"
    elif my_id == theirs.get("master_replid2") and second > 0:
        fork = second - 1
        where = f"the fork at offset {fork}"
    else:
        return Divergence(
            False,
            None,
            "bytes",
            detail=(
                f"the old primary's replication id {str(my_id)[:12]} is not in the new "
                "primary's history (it restarted, or its backlog was freed, and it began "
                "a new one): what diverged cannot be told"
            ),
        )
    lost = max(my_offset - fork, 0)
    if lost:
        detail = f"old primary wrote {lost} bytes of replication stream past {where}"
    else:
        detail = f"nothing past {where}: the new primary has everything the old one wrote"
    return Divergence(True, lost, "bytes", detail=detail)
