"""One primary + standby of any engine, behind one interface, for the chaos matrix
(issue 10): PostgreSQL (watchdogd.demo.lab), MariaDB (tests/support/mysql.py) and Redis
(tests/support/redis.py), each on a server profile, ``stock`` or ``tuned``.

A :class:`Cluster` gives a scenario what it needs and nothing engine-specific:
the two servers (kill, SIGSTOP, SIGCONT), the ``database:`` section the daemon
uses for each (optionally through a proxy port), re-pointing the standby's
replication at a proxy, writes as an application would make them, the keys a
server holds, the standby's own view of its link, whether a server refuses an
application's writes, and the number of promotions, counted from the servers
(never from what watchdogd says):

- PostgreSQL: timeline history files in either data dir (each promotion writes one);
- MariaDB: the replica has no replication channel left and accepts writes;
- Redis: ``MASTER MODE enabled`` lines in the servers' own logs (written on
  ``REPLICAOF NO ONE``).

:class:`Load` is the steady write load: one small insert / SET every ``every``
seconds on the original primary, each bounded, counting what was acknowledged.

Everything that blocks runs in a thread (``asyncio.to_thread``): the fault proxies
live in the test's event loop and must keep forwarding meanwhile. Servers are
created from the main thread, though: MariaDB and Redis die with the thread that
forked them (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiomysql
import asyncpg
import pymysql  # type: ignore[import-untyped]  # no stubs in the test extras
import redis
import redis.asyncio as aioredis

from tests.support import free_port, timing
from tests.support import mysql as mysql_support
from tests.support import pg as pg_support
from tests.support import redis as redis_support
from watchdogd.demo.lab import LabError, PgPair, PgServer

POSTGRES, MARIADB, REDIS = "postgres", "mariadb", "redis"
ENGINES = (POSTGRES, MARIADB, REDIS)
STOCK, TUNED = "stock", "tuned"
PROFILES = (STOCK, TUNED)


@dataclass(frozen=True)
class LinkTiming:
    """How the standby's replication link behaves on a profile (the servers' own
    settings, see each support module): ``timeout`` is the silence after which
    the replica itself gives the link up; ``keepalive`` the longest silence of a
    healthy link on an idle primary."""

    timeout: float
    keepalive: float
    settings: str


TIMING: dict[tuple[str, str], LinkTiming] = {
    (POSTGRES, STOCK): LinkTiming(
        60, 30, "wal_receiver_timeout 60s (the receiver asks for a reply after 30s of silence)"
    ),
    (POSTGRES, TUNED): LinkTiming(
        2, 1, "wal_receiver_timeout 2s, wal_receiver_status_interval 1s, wal_sender_timeout 5s"
    ),
    (MARIADB, STOCK): LinkTiming(
        60, 30, "slave_net_timeout 60s, MASTER_HEARTBEAT_PERIOD 30s (its default)"
    ),
    (MARIADB, TUNED): LinkTiming(2, 1, "slave_net_timeout 2s, MASTER_HEARTBEAT_PERIOD 1s"),
    (REDIS, STOCK): LinkTiming(60, 10, "repl-timeout 60s, repl-ping-replica-period 10s"),
    (REDIS, TUNED): LinkTiming(2, 1, "repl-timeout 2s, repl-ping-replica-period 1s"),
}

WRITE_TIMEOUT = 1.0


class Node(Protocol):
    name: str
    port: int

    def kill(self) -> None: ...
    def sigstop(self) -> None: ...
    def sigcont(self) -> None: ...


@dataclass
class Cluster(abc.ABC):
    """A primary and a standby of one engine on one profile (see the module doc)."""

    engine: str  # postgres | mariadb | redis
    profile: str
    env: dict[str, str] = field(default_factory=dict)  # for the daemon's environment

    watchdogd_engine: str = ""  # the engine's name in watchdogd's config

    @property
    def timing(self) -> LinkTiming:
        return TIMING[(self.engine, self.profile)]

    @property
    @abc.abstractmethod
    def primary(self) -> Node: ...

    @property
    @abc.abstractmethod
    def standby(self) -> Node: ...

    @abc.abstractmethod
    def database(self, node: Node, port: int | None = None) -> dict[str, Any]:
        """The daemon's ``database:`` section for ``node``, through ``port`` if given."""

    def rejoin_options(self, node: Node) -> dict[str, Any]:
        """Extra ``database:`` keys ``node`` needs to be rejoined as a replica (issue 16)."""
        return {}

    @abc.abstractmethod
    def _repoint(self, port: int | None) -> None: ...

    async def repoint_standby(self, port: int | None) -> None:
        """Replicate through ``port`` (a proxy; None: the primary directly) and wait
        until the standby's link is up there."""
        await asyncio.to_thread(self._repoint, port)

    @abc.abstractmethod
    async def write(self, key: str) -> None:
        """One application write of ``key`` on the original primary (its own
        connection, reopened after a failure). Unbounded: callers bound it."""

    @abc.abstractmethod
    async def reset_writer(self) -> None:
        """Drop the writer's connection (after a failed or timed-out write)."""

    @abc.abstractmethod
    def _keys(self, node: Node) -> set[str]: ...

    async def keys(self, node: Node) -> set[str]:
        """Every key written by ``write`` that ``node`` holds, read from it directly."""
        return await asyncio.to_thread(self._keys, node)

    @abc.abstractmethod
    def _caught_up(self, timeout: float) -> None: ...

    async def wait_caught_up(self, timeout: float = 15.0) -> None:
        await asyncio.to_thread(self._caught_up, timeout)

    async def seed(self, tag: str, n: int = 20) -> set[str]:
        """``n`` acknowledged writes, then wait until the standby applied them all."""
        keys = [f"{tag}-{i}" for i in range(n)]
        for key in keys:
            async with asyncio.timeout(10):
                await self.write(key)
        await self.wait_caught_up()
        return set(keys)

    @abc.abstractmethod
    def promotions(self) -> int:
        """Promotions so far, counted from the servers themselves."""

    @abc.abstractmethod
    def _link_up(self) -> bool: ...

    async def link_up(self) -> bool:
        """The standby's own view: it holds a working replication link."""
        return await asyncio.to_thread(self._link_up)

    @abc.abstractmethod
    def _refuses_writes(self, node: Node) -> bool:
        """True: refused as read-only; False: accepted; raises on any other failure."""

    async def refuses_writes(self, node: Node, within: float = 10.0) -> bool:
        """An application's write to ``node`` is refused as read-only (fenced): True;
        accepted: False. Any other failure (a connection refused, killed, or turned
        away while a burst of connections the fault proxy held is let through) is
        retried for ``within`` seconds, never taken for an answer."""
        deadline = time.monotonic() + timing.within(within)
        while True:
            try:
                return await asyncio.to_thread(self._refuses_writes, node)
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise AssertionError(f"no answer to a write on {node.name}: {exc}") from exc
            await asyncio.sleep(0.2)

    @abc.abstractmethod
    def close(self) -> None:
        """Kill both servers and remove their files; safe after any failure."""

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self.reset_writer()
        for node in (self.primary, self.standby):
            with contextlib.suppress(Exception):
                node.sigcont()
        self.close()


# --------------------------------------------------------------------------- PostgreSQL

PG_TABLE = "matrix_rows"
_HISTORY = re.compile(r"[0-9A-F]{8}\.history")


@dataclass
class PgCluster(Cluster):
    pair: PgPair | None = None
    _conn: Any = None

    def __post_init__(self) -> None:
        self.watchdogd_engine = "postgres"

    @property
    def _pair(self) -> PgPair:
        assert self.pair is not None
        return self.pair

    @property
    def primary(self) -> Node:
        return self._pair.primary

    @property
    def standby(self) -> Node:
        return self._pair.standby

    def database(self, node: Node, port: int | None = None) -> dict[str, Any]:
        dsn = f"postgresql://postgres@127.0.0.1:{port or node.port}/postgres"
        return {"engine": "postgres", "dsn": dsn}

    def rejoin_options(self, node: Node) -> dict[str, Any]:
        # The lab starts its servers with command-line settings pg_ctl must repeat.
        assert isinstance(node, PgServer)
        return {
            "data_dir": str(node.data_dir),
            "start_command": pg_support.start_command(self._pair, node),
        }

    def _repoint(self, port: int | None) -> None:
        self._pair.repoint_standby(port)

    async def write(self, key: str) -> None:
        if self._conn is None:
            self._conn = await asyncpg.connect(self._pair.primary.dsn)
        await self._conn.execute(f"INSERT INTO {PG_TABLE} VALUES ($1)", key)

    async def reset_writer(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()  # no goodbye: the server may be hung

    def _keys(self, node: Node) -> set[str]:
        out = self._pair.execute(node, f"SELECT note FROM {PG_TABLE}")  # type: ignore[arg-type]
        return set(out.split()) if out else set()

    def _caught_up(self, timeout: float) -> None:
        self._pair.wait_replayed(timeout)

    def promotions(self) -> int:
        pair = self._pair
        return sum(
            1
            for server in (pair.primary, pair.standby)
            for f in (server.data_dir / "pg_wal").iterdir()
            if _HISTORY.fullmatch(f.name)
        )

    def _link_up(self) -> bool:
        return self._pair.standby_streaming()

    def _refuses_writes(self, node: Node) -> bool:
        try:
            self._pair.execute(node, f"INSERT INTO {PG_TABLE} VALUES ('fence-check')")  # type: ignore[arg-type]
        except LabError as exc:
            if "read-only transaction" in str(exc):
                return True
            raise
        return False

    def close(self) -> None:
        if self.pair is not None:
            self.pair.destroy()


def pg_cluster(
    profile: str,
    bin_dir: Path,
    template: Path,
    password: str,
    settings: dict[str, str] | None = None,
) -> PgCluster:
    """``settings``: extra postgresql.conf lines, e.g. ``{"full_page_writes": "on"}``
    for a rejoin (pg_rewind needs it on the source; the lab turns it off for speed)."""
    pair = PgPair.create(
        bin_dir=bin_dir, password=password, template=template, profile=profile, settings=settings
    )
    try:
        pair.primary.execute(f"CREATE TABLE {PG_TABLE} (note text PRIMARY KEY)")
        pair.wait_replayed()
    except BaseException:
        pair.destroy()
        raise
    return PgCluster(engine=POSTGRES, profile=profile, pair=pair)


# --------------------------------------------------------------------------- MariaDB


@dataclass
class MariaCluster(Cluster):
    pair: mysql_support.MariaDBPair | None = None
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    _conn: Any = None

    def __post_init__(self) -> None:
        self.watchdogd_engine = "mysql"

    @property
    def _pair(self) -> mysql_support.MariaDBPair:
        assert self.pair is not None
        return self.pair

    @property
    def primary(self) -> Node:
        return self._pair.primary

    @property
    def standby(self) -> Node:
        return self._pair.replica

    def database(self, node: Node, port: int | None = None) -> dict[str, Any]:
        dsn = f"mysql://watchdogd:{self._pair.password}@127.0.0.1:{port or node.port}/"
        return {"engine": "mysql", "dsn": dsn}

    def rejoin_options(self, node: Node) -> dict[str, Any]:
        # The watchdogd account has no REPLICATION SLAVE; the fixture's repl account does.
        return {"replication_user": "repl", "replication_password": self._pair.repl_password}

    def _repoint(self, port: int | None) -> None:
        self._pair.repoint_replica(port or self._pair.primary.port)

    async def write(self, key: str) -> None:
        if self._conn is None:
            self._conn = await aiomysql.connect(
                host="127.0.0.1",
                port=self._pair.primary.port,
                user="app",
                password=self._pair.app_password,
                autocommit=True,
            )
        async with self._conn.cursor() as cur:
            await cur.execute("INSERT INTO app.t (v) VALUES (%s)", (key,))

    async def reset_writer(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()  # closes the socket, no goodbye: the server may be hung

    def _server(self, node: Node) -> mysql_support.MariaDB:
        assert isinstance(node, mysql_support.MariaDB)
        return node

    def _keys(self, node: Node) -> set[str]:
        return {r["v"] for r in self._server(node).sql("SELECT v FROM app.t")}

    def _caught_up(self, timeout: float) -> None:
        self._pair.wait_replica_caught_up(timeout)

    def promotions(self) -> int:
        replica = self._pair.replica
        if mysql_support.replica_status(replica):
            return 0  # still has its replication channel: not promoted
        return int(replica.sql("SELECT @@read_only AS ro")[0]["ro"] == 0)

    def _link_up(self) -> bool:
        st = mysql_support.replica_status(self._pair.replica)
        return st.get("Slave_IO_Running") == "Yes"

    def _refuses_writes(self, node: Node) -> bool:
        server = self._server(node)
        try:
            conn = server.tcp("app", self._pair.app_password)
            try:
                with conn.cursor() as cur:
                    cur.execute("INSERT INTO app.t (v) VALUES ('fence-check')")
            finally:
                conn.close()
        except pymysql.err.MySQLError as exc:
            if exc.args and exc.args[0] == 1290:  # ER_OPTION_PREVENTS_STATEMENT: --read-only
                return True
            raise
        return False

    def close(self) -> None:
        self.stack.close()


def maria_cluster(profile: str, template: Path) -> MariaCluster:
    stack = contextlib.ExitStack()
    try:
        pair = stack.enter_context(mysql_support.mariadb_pair(template, profile))
    except BaseException:
        stack.close()
        raise
    return MariaCluster(engine=MARIADB, profile=profile, pair=pair, stack=stack)


# --------------------------------------------------------------------------- Redis

REDIS_PREFIX = "chaos:"


@dataclass
class RedisCluster(Cluster):
    pair: redis_support.RedisPair | None = None
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    _client: Any = None

    def __post_init__(self) -> None:
        self.watchdogd_engine = "redis"

    @property
    def _pair(self) -> redis_support.RedisPair:
        assert self.pair is not None
        return self.pair

    @property
    def primary(self) -> Node:
        return self._pair.primary

    @property
    def standby(self) -> Node:
        return self._pair.replica

    def database(self, node: Node, port: int | None = None) -> dict[str, Any]:
        dsn = f"redis://:{self._pair.password}@127.0.0.1:{port or node.port}/0"
        return {"engine": "redis", "dsn": dsn}

    def _repoint(self, port: int | None) -> None:
        self._pair.repoint_replica(port or self._pair.primary.port)

    async def write(self, key: str) -> None:
        if self._client is None:
            self._client = aioredis.Redis(
                host="127.0.0.1", port=self._pair.primary.port, password=self._pair.password
            )
        await self._client.set(REDIS_PREFIX + key, "1")

    async def reset_writer(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.aclose(), 1.0)

    def _server(self, node: Node) -> redis_support.RedisServer:
        assert isinstance(node, redis_support.RedisServer)
        return node

    def _keys(self, node: Node) -> set[str]:
        with self._server(node).client() as c:
            return {k.removeprefix(REDIS_PREFIX) for k in c.scan_iter(f"{REDIS_PREFIX}*")}

    def _caught_up(self, timeout: float) -> None:
        self._pair.wait_caught_up(timeout)

    def promotions(self) -> int:
        return sum(
            self._server(node).log().count("MASTER MODE enabled")
            for node in (self.primary, self.standby)
        )

    def _link_up(self) -> bool:
        return self._pair.replica.info().get("master_link_status") == "up"

    def _refuses_writes(self, node: Node) -> bool:
        try:
            self._server(node).call("SET", REDIS_PREFIX + "fence-check", "1")
        except redis.ResponseError as exc:  # NOREPLICAS (the fence) or READONLY
            if str(exc).startswith(("NOREPLICAS", "READONLY", "Not enough good replicas")):
                return True
            raise
        return False

    def close(self) -> None:
        self.stack.close()


def redis_cluster(profile: str) -> RedisCluster:
    stack = contextlib.ExitStack()
    try:
        pair = stack.enter_context(redis_support.redis_pair(profile))
    except BaseException:
        stack.close()
        raise
    return RedisCluster(engine=REDIS, profile=profile, pair=pair, stack=stack)


# --------------------------------------------------------------------------- load


class Load:
    """A steady, light write load on the original primary: one write every
    ``every`` seconds, each bounded by WRITE_TIMEOUT; ``acked`` holds every key the
    primary acknowledged, in order."""

    def __init__(self, cluster: Cluster, every: float = 0.075, tag: str = "load") -> None:
        self.cluster = cluster
        self.every = every
        self.tag = tag
        self.acked: list[str] = []
        self.failed = 0

    async def _loop(self) -> None:
        n = 0
        while True:
            key = f"{self.tag}-{n}"
            n += 1
            t0 = time.monotonic()
            try:
                async with asyncio.timeout(WRITE_TIMEOUT):
                    await self.cluster.write(key)
            except (Exception, TimeoutError):
                self.failed += 1
                await self.cluster.reset_writer()
            else:
                self.acked.append(key)
            await asyncio.sleep(max(0.0, self.every - (time.monotonic() - t0)))

    @contextlib.asynccontextmanager
    async def running(self, enabled: bool = True) -> AsyncIterator[Load]:
        """Write in the background while inside (nothing when not ``enabled``)."""
        if not enabled:
            yield self
            return
        task = asyncio.create_task(self._loop())
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await self.cluster.reset_writer()


# --------------------------------------------------------------------------- daemon config


def daemon_config(
    cluster: Cluster,
    tmp: Path,
    *,
    primary_port: int | None = None,
    standby_port: int | None = None,
    interval: str = "500ms",
    timeout: str = "300ms",
    threshold: str = "2s",
) -> dict[str, Any]:
    """The daemon's config for the matrix: the databases (through proxy ports where
    given), a best-effort fence of the old primary first (it may be dead or cut
    off), the engine built-ins, a traffic switch, and the fence for split brain."""
    traffic = tmp / "traffic.log"
    return {
        "cluster": "orders",
        "primary": {"name": "main", "database": cluster.database(cluster.primary, primary_port)},
        "standby": {
            "name": "failover",
            "database": cluster.database(cluster.standby, standby_port),
        },
        "probe": {"interval": interval, "timeout": timeout, "recovery_successes": 3},
        "failover": {
            "mode": "automatic",
            "outage_threshold": threshold,
            "max_lag": "16MB",
            "cooldown": "1h",
            "steps": [
                {
                    "name": "fence_old_primary",
                    "action": "fence",
                    "required": False,
                    "timeout": "1s",
                },
                {"name": "stop_replication", "action": "stop_replication", "timeout": "10s"},
                {"name": "promote_standby", "action": "promote", "timeout": "10s"},
                {
                    "name": "switch_traffic",
                    "action": "command",
                    "timeout": "5s",
                    "argv": ["sh", "-c", f'echo "{{standby.name}} {{failover_id}}" >> {traffic}'],
                },
            ],
            "fence_steps": [{"name": "fence_split_brain", "action": "fence", "timeout": "5s"}],
        },
        "metrics": {"listen": f"127.0.0.1:{free_port()}"},
        "control": {"socket": str(tmp / "run" / "control.sock")},
        "log": {"format": "json", "level": "info"},
        "state_dir": str(tmp / "state"),
    }
