"""A stand-in for one application stack (tests and ``watchdogd demo``).

Owns a tiny aiohttp service shaped like what the failover runbook drives: a
health endpoint that reflects its database, a maintenance switch, and an
``orders`` endpoint that writes to its database, so a test can see that writes
stop on the old primary and resume on the new one. Every request is recorded
in ``calls``; ``hang`` makes requests stall, to test bounded HTTP probes.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import asyncpg
from aiohttp import web

DB_TIMEOUT = 0.5
_ORDERS_DDL = (
    "CREATE TABLE IF NOT EXISTS orders ("
    " id bigserial PRIMARY KEY, created_at timestamptz NOT NULL DEFAULT now(), app text)"
)


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    at: float  # wall clock (time.time())


class DemoApp:
    """One application stack on 127.0.0.1:``port`` (0: any free port, see ``port``
    after ``start()``) using the PostgreSQL database at ``dsn``."""

    def __init__(
        self,
        name: str,
        dsn: str,
        port: int = 0,
        *,
        password: str | None = None,
        maintenance: bool = False,
        db_timeout: float = DB_TIMEOUT,
    ) -> None:
        self.name = name
        self.dsn = dsn
        self.port = port
        self.maintenance = maintenance
        self.calls: list[Call] = []
        self._password = password
        self._db_timeout = db_timeout
        self._conn: Any = None
        self._db_lock = asyncio.Lock()
        self._unhang = asyncio.Event()
        self._unhang.set()
        self._runner: web.AppRunner | None = None

    # -- control from tests

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def hang(self) -> bool:
        return not self._unhang.is_set()

    @hang.setter
    def hang(self, value: bool) -> None:
        if value:
            self._unhang.clear()
        else:
            self._unhang.set()

    def calls_to(self, method: str, path: str) -> list[Call]:
        return [c for c in self.calls if c.method == method and c.path == path]

    async def start(self) -> None:
        app = web.Application(middlewares=[self._record])
        app.add_routes(
            [
                web.get("/health", self._health),
                web.get("/maintenance", self._get_maintenance),
                web.post("/maintenance", self._set_maintenance),
                web.delete("/maintenance", self._clear_maintenance),
                web.post("/orders", self._create_order),
                web.get("/orders/count", self._count_orders),
            ]
        )
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=1.0
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        if self.port == 0:
            self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        self.hang = False  # let stalled requests finish so shutdown is quick
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        async with self._db_lock:
            self._drop()

    # -- HTTP

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.calls.append(Call(request.method, request.path, time.time()))
        await self._unhang.wait()
        response: web.StreamResponse = await handler(request)
        return response

    def _body(self, **extra: Any) -> dict[str, Any]:
        return {"app": self.name, "maintenance": self.maintenance, **extra}

    async def _health(self, request: web.Request) -> web.Response:
        try:
            await self._db("fetchval", "SELECT 1")
        except Exception as exc:
            return web.json_response(self._body(ok=False, db=self._reason(exc)), status=503)
        return web.json_response(self._body(ok=True, db="ok"))

    async def _get_maintenance(self, request: web.Request) -> web.Response:
        return web.json_response(self._body())

    async def _set_maintenance(self, request: web.Request) -> web.Response:
        enabled = True
        if request.can_read_body:
            try:
                data = await request.json()
            except ValueError:
                return web.json_response(self._body(error="body is not JSON"), status=400)
            if not isinstance(data, dict) or not isinstance(data.get("enabled", True), bool):
                return web.json_response(
                    self._body(error='expected {"enabled": true|false}'), status=400
                )
            enabled = data.get("enabled", True)
        self.maintenance = enabled
        return web.json_response(self._body())

    async def _clear_maintenance(self, request: web.Request) -> web.Response:
        self.maintenance = False
        return web.json_response(self._body())

    async def _create_order(self, request: web.Request) -> web.Response:
        if self.maintenance:
            return web.json_response(self._body(error="in maintenance"), status=503)
        insert = "INSERT INTO orders (app) VALUES ($1) RETURNING id"
        try:
            try:
                new_id = await self._db("fetchval", insert, self.name)
            except asyncpg.UndefinedTableError:
                # Created lazily, and only here: a read-only database refuses this
                # too, which is the point (no writes on a standby or fenced primary).
                await self._db("execute", _ORDERS_DDL)
                new_id = await self._db("fetchval", insert, self.name)
        except asyncpg.ReadOnlySQLTransactionError:
            return web.json_response(self._body(error="database is read-only"), status=503)
        except Exception as exc:
            return web.json_response(self._body(error=self._reason(exc)), status=503)
        return web.json_response(self._body(id=new_id), status=201)

    async def _count_orders(self, request: web.Request) -> web.Response:
        try:
            count = await self._db("fetchval", "SELECT count(*) FROM orders")
        except asyncpg.UndefinedTableError:
            count = 0
        except Exception as exc:
            return web.json_response(self._body(error=self._reason(exc)), status=503)
        return web.json_response(self._body(count=count))

    # -- database

    async def _db(self, method: str, sql: str, *args: Any) -> Any:
        """One statement on the app's connection, reconnecting lazily; bounded."""
        async with asyncio.timeout(self._db_timeout), self._db_lock:
            try:
                if self._conn is None or self._conn.is_closed():
                    self._conn = await asyncpg.connect(
                        self.dsn,
                        password=self._password,
                        timeout=self._db_timeout,
                        server_settings={"application_name": f"demoapp-{self.name}"},
                    )
                return await getattr(self._conn, method)(sql, *args)
            except asyncpg.PostgresError as exc:
                if not isinstance(
                    exc, asyncpg.PostgresConnectionError | asyncpg.AdminShutdownError
                ):
                    raise  # the server answered: the connection is fine
                self._drop()
                raise
            except BaseException:
                self._drop()
                raise

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()

    def _reason(self, exc: BaseException) -> str:
        if isinstance(exc, TimeoutError):
            return f"database did not answer within {self._db_timeout:g}s"
        return " ".join(str(exc).split()) or type(exc).__name__


def pair_config(
    cluster: str,
    primary: tuple[str, str, DemoApp],
    standby: tuple[str, str, DemoApp],
    route: str,
    *,
    interval: str,
    probe_timeout: str,
    threshold: str,
    promote_timeout: str = "5s",
) -> dict[str, Any]:
    """The part of a demo's config both demos share: the pair (each node as ``(name,
    database dsn, app stand-in)``), fast probes, and automatic failover by the
    ``runbook``. Each demo adds what is its own (fence or rejoin steps, store, ports)."""
    nodes = {
        role: {
            "name": name,
            "database": {"engine": "postgres", "dsn": dsn},
            "app": {"health_url": f"{app.url}/health"},
        }
        for role, (name, dsn, app) in (("primary", primary), ("standby", standby))
    }
    return {
        "cluster": cluster,
        **nodes,
        "probe": {"interval": interval, "timeout": probe_timeout, "recovery_successes": 3},
        "failover": {
            "mode": "automatic",
            "outage_threshold": threshold,
            "max_lag": "16MB",
            "cooldown": "1h",
            "steps": runbook(
                primary[2].url, standby[2].url, route, promote_timeout=promote_timeout
            ),
        },
    }


def runbook(
    primary_app: str, standby_app: str, route: str, *, promote_timeout: str = "5s"
) -> list[dict[str, Any]]:
    """The demo's five-step failover runbook against two app stand-ins (their base
    URLs) and a traffic switch (``route``: a server taking ``PUT /route``), as a config's
    ``failover.steps``: what the one-pair demo and the three-site demo both run."""
    return [
        {
            "name": "primary_maintenance_on",
            "action": "http",
            "method": "POST",
            "url": f"{primary_app}/maintenance",
            "json": {"enabled": True},
            # Best effort: the primary's stack may be gone with its machine.
            "required": False,
            "timeout": "1s",
        },
        {"name": "stop_replication", "action": "stop_replication", "timeout": "5s"},
        {"name": "promote_standby", "action": "promote", "timeout": promote_timeout},
        {
            "name": "standby_maintenance_off",
            "action": "http",
            "method": "DELETE",
            "url": f"{standby_app}/maintenance",
            "timeout": "2s",
        },
        {
            "name": "switch_traffic",
            "action": "http",
            "method": "PUT",
            "url": f"{route}/route",
            "json": {"to": "{standby.name}"},
            "timeout": "2s",
        },
    ]
