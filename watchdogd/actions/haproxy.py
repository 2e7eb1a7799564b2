"""The ``haproxy`` action: move traffic between servers of an HAProxy backend.

Owns the conversation with HAProxy's runtime API (the admin socket declared with
``stats socket ... level admin``, as a Unix path or ``host:port``): it sends
``set server BACKEND/SERVER state|weight`` and then reads ``show servers state
BACKEND`` back, so a step only succeeds once HAProxy really holds the wanted
state. Two ways to write a step::

    # the failover shape: the standby's server ready, the primary's in maintenance
    - {name: lb, action: haproxy, socket: /run/haproxy/admin.sock, backend: app,
       activate: "{standby.name}", deactivate: ["{primary.name}"]}
    # one or more servers to a state and/or weight
    - {name: drain, action: haproxy, socket: 127.0.0.1:9999, backend: app,
       servers: [web1, web2], state: drain, weight: 10}

``activate`` is done (and, with ``wait_up``, confirmed UP by HAProxy's health
checks) before anything is deactivated, so the backend is never left without a
server because of the step itself. Setting a state that is already held is a
no-op for HAProxy, so the step is idempotent.
"""

from __future__ import annotations

import asyncio
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from watchdogd.actions import ActionError, template_fields, templated
from watchdogd.core.units import format_duration

if TYPE_CHECKING:
    from watchdogd.actions import StepContext
    from watchdogd.core.section import Section

STATES = ("ready", "maint", "drain")

# srv_admin_state bits (HAProxy include/haproxy/server-t.h). CMAINT ("disabled" in the
# config) stays set after "state ready" although the server then serves traffic, so
# it is deliberately not part of the maintenance mask (HAProxy's SRV_ADMF_MAINT).
_ADMF_MAINT = 0x01 | 0x02 | 0x20  # forced, inherited, DNS resolution failure
_ADMF_DRAIN = 0x08 | 0x10  # forced, inherited
# srv_op_state values (enum srv_state).
_OP_STATES = {0: "DOWN", 1: "starting", 2: "UP", 3: "stopping"}
_OP_RUNNING = 2
# srv_check_state bit CHK_ST_ENABLED and srv_check_result values (check-t.h). HAProxy
# reports a server UP the moment it leaves maintenance, before any health check has
# run, so "up" for a checked server also needs a passed check result. (Checks pause
# during maintenance: a server that passed before it was put there shows that stale
# result until its next check, inter later.)
_CHK_ENABLED = 0x04
_CHK_RESULTS = {
    0: "check pending",
    1: "check neutral",
    2: "check failed",
    3: "check passed",
    4: "check passed (no new sessions)",
}
_CHK_PASSED = (3, 4)

# HAProxy's own rule for proxy and server names; it also keeps a rendered name from
# smuggling a second command (';' or a newline) onto the admin socket.
_NAME = re.compile(r"^[A-Za-z0-9_.:-]+$")
_HOST_PORT = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9_.-]+)):(?P<port>\d+)$")

# How often to re-read the state while waiting for health checks to mark a server UP.
_UP_POLL = 0.1


@dataclass(frozen=True)
class _Change:
    server: str  # may hold placeholders until rendered
    state: str | None
    weight: int | None

    def commands(self, backend: str, server: str) -> list[str]:
        out = []
        if self.state is not None:
            out.append(f"set server {backend}/{server} state {self.state}")
        if self.weight is not None:
            out.append(f"set server {backend}/{server} weight {self.weight}")
        return out


@dataclass(frozen=True)
class _Row:
    """One server's line of ``show servers state``."""

    admin: int
    op: int
    weight: int
    check_state: int = 0
    check_result: int = 0

    @property
    def admin_state(self) -> str:
        if self.admin & _ADMF_MAINT:
            return "maint"
        if self.admin & _ADMF_DRAIN:
            return "drain"
        return "ready"

    @property
    def checked(self) -> bool:
        return bool(self.check_state & _CHK_ENABLED)

    @property
    def up(self) -> bool:
        return self.op == _OP_RUNNING and (not self.checked or self.check_result in _CHK_PASSED)

    def text(self) -> str:
        parts = [self.admin_state, _OP_STATES.get(self.op, f"op state {self.op}")]
        if self.checked:
            parts.append(_CHK_RESULTS.get(self.check_result, f"check result {self.check_result}"))
        return ", ".join([*parts, f"weight {self.weight}"])


class HaproxyAction:
    idempotent = True

    def __init__(self, socket: str, backend: str, changes: list[_Change], wait_up: bool) -> None:
        self.socket = socket
        self.backend = backend
        self.changes = changes
        self.wait_up = wait_up

    # -- Action protocol

    def describe(self, ctx: StepContext) -> dict[str, Any]:
        backend = ctx.render(self.backend)
        commands = [c for ch in self.changes for c in ch.commands(backend, ctx.render(ch.server))]
        return {
            "socket": self.socket,
            "backend": backend,
            "commands": commands,
            "verify": f"show servers state {backend}",
            "wait_up": self.wait_up,
        }

    async def run(self, ctx: StepContext, timeout: float) -> str:
        backend = ctx.render(self.backend)
        _check_name(backend, "backend")
        changes = [(ch, ctx.render(ch.server)) for ch in self.changes]
        for _, server in changes:
            _check_name(server, "server")
        doing = ["connecting"]  # what the step was at, for the timeout message
        try:
            async with asyncio.timeout(timeout):
                done = [await self._apply(backend, ch, server, doing) for ch, server in changes]
        except TimeoutError:
            raise ActionError(
                f"haproxy {self.socket}: timed out after {format_duration(timeout)} {doing[0]}"
            ) from None
        return ", ".join(done)

    async def ready(self, ctx: StepContext, timeout: float) -> str:
        """The admin socket answers ``show servers state`` for the backend (read-only)
        and lists every server the step would change."""
        backend = ctx.render(self.backend)
        _check_name(backend, "backend")
        servers = [ctx.render(ch.server) for ch in self.changes]
        for server in servers:
            _check_name(server, "server")
        for server in servers:
            await self._read(backend, server)
        return f"haproxy {self.socket}: backend {backend} has {', '.join(servers)}"

    # -- the work

    async def _apply(self, backend: str, ch: _Change, server: str, doing: list[str]) -> str:
        target = f"{backend}/{server}"
        for command in ch.commands(backend, server):
            doing[0] = f"running '{command}'"
            reply = (await self._send(command)).strip()
            if reply:  # HAProxy answers a successful "set server" with an empty line
                raise ActionError(f"haproxy {self.socket}: '{command}' failed: {_one_line(reply)}")
        doing[0] = f"verifying {target}"
        row = await self._read(backend, server)
        if ch.state is not None and row.admin_state != ch.state:
            raise ActionError(
                f"haproxy {self.socket}: {target} did not become {ch.state}: "
                f"HAProxy reports {row.text()} "
                f"(srv_admin_state {row.admin:#04x})"
            )
        if ch.weight is not None and row.weight != ch.weight:
            raise ActionError(
                f"haproxy {self.socket}: {target} weight did not become "
                f"{ch.weight}: HAProxy reports {row.text()}"
            )
        if ch.state == "ready" and self.wait_up:
            doing[0] = (
                f"waiting for health checks to mark {target} UP (HAProxy reports {row.text()})"
            )
            while not row.up:
                await asyncio.sleep(_UP_POLL)
                row = await self._read(backend, server)
                doing[0] = (
                    f"waiting for health checks to mark {target} UP (HAProxy reports {row.text()})"
                )
        return f"{target} {row.admin_state} ({_OP_STATES.get(row.op, row.op)})"

    async def _read(self, backend: str, server: str) -> _Row:
        command = f"show servers state {backend}"
        rows = _parse_servers_state(await self._send(command), command, self.socket)
        if server not in rows:
            raise ActionError(
                f"haproxy {self.socket}: backend {backend} has no server "
                f"{server!r} (has: {', '.join(sorted(rows)) or 'none'})"
            )
        return rows[server]

    async def _send(self, command: str) -> str:
        """One command per connection: HAProxy answers and closes (non-interactive mode)."""
        try:
            if self.socket.startswith("/"):
                reader, writer = await asyncio.open_unix_connection(self.socket)
            else:
                host, port = _split_host_port(self.socket)
                reader, writer = await asyncio.open_connection(host, port)
        except OSError as exc:
            raise ActionError(
                f"haproxy {self.socket}: cannot connect to the admin socket: {_os_error(exc)}"
            ) from None
        try:
            writer.write(command.encode() + b"\n")
            await writer.drain()
            data = await reader.read()
        except OSError as exc:
            raise ActionError(
                f"haproxy {self.socket}: '{command}' failed: {_os_error(exc)}"
            ) from None
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass
        return data.decode("utf-8", "replace")


def _parse_servers_state(text: str, command: str, socket: str) -> dict[str, _Row]:
    lines = text.splitlines()
    header = next((line for line in lines if line.startswith("# ")), None)
    if header is None:
        first = next((line for line in lines if line.strip()), "an empty reply")
        raise ActionError(f"haproxy {socket}: '{command}' failed: {first.strip()}")
    columns = header[2:].split()
    wanted = ("srv_name", "srv_op_state", "srv_admin_state", "srv_uweight")
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise ActionError(
            f"haproxy {socket}: '{command}' has no {missing[0]} column; "
            "is this HAProxy 1.6 or later?"
        )
    at = {
        c: columns.index(c)
        for c in (*wanted, "srv_check_state", "srv_check_result")
        if c in columns
    }
    rows: dict[str, _Row] = {}
    for line in lines[lines.index(header) + 1 :]:
        fields = line.split()
        if not fields or line.startswith("#"):
            continue
        try:
            rows[fields[at["srv_name"]]] = _Row(
                admin=int(fields[at["srv_admin_state"]]),
                op=int(fields[at["srv_op_state"]]),
                weight=int(fields[at["srv_uweight"]]),
                check_state=int(fields[at["srv_check_state"]]) if "srv_check_state" in at else 0,
                check_result=(
                    int(fields[at["srv_check_result"]]) if "srv_check_result" in at else 0
                ),
            )
        except (IndexError, ValueError):
            raise ActionError(
                f"haproxy {socket}: cannot parse a line of '{command}': {line.strip()[:120]!r}"
            ) from None
    return rows


def _check_name(name: str, what: str) -> None:
    if not _NAME.match(name):
        raise ActionError(
            f"haproxy: {what} name {name!r} is not a valid HAProxy name "
            "(letters, digits, '-', '_', '.', ':')"
        )


def _split_host_port(text: str) -> tuple[str, int]:
    m = _HOST_PORT.match(text)
    if m is None or not 0 < int(m.group("port")) < 65536:
        raise ValueError(text)
    return m.group("v6") or m.group("host"), int(m.group("port"))


def _os_error(exc: OSError) -> str:
    # asyncio's connect errors read "Connect call failed (...)"; the errno says why.
    return os.strerror(exc.errno) if exc.errno else str(exc)


def _one_line(text: str) -> str:
    return " ".join(text.split())[:200]


# --------------------------------------------------------------------------- config


def _name(s: Section, key: str, value: Any, what: str, path: str | None = None) -> str | None:
    """A backend or server name; placeholders are allowed and checked after rendering."""
    if not isinstance(value, str) or not value:
        return None
    where = path or s.sub(key)
    try:
        has_fields = bool(template_fields(value))
    except ValueError:
        has_fields = True  # templated() reports the bad syntax
    if not has_fields and not _NAME.match(value):
        s.errors.append(
            f"{where}: {value!r} is not a valid HAProxy {what} name "
            "(letters, digits, '-', '_', '.', ':')"
        )
        return None
    return value


def _names(s: Section, key: str, what: str) -> list[str] | None:
    """A name or a non-empty list of names."""
    if not s.has(key):
        return None
    raw = s.raw(key)
    if isinstance(raw, str):
        items = [(s.sub(key), raw)]
    elif isinstance(raw, list) and raw and all(isinstance(v, str) for v in raw):
        items = [(f"{s.sub(key)}[{i}]", v) for i, v in enumerate(raw)]
    else:
        s.error(f"expected a {what} name or a non-empty list of them, got {raw!r}", key)
        return None
    templated(s, key, raw)
    return [n for path, v in items if (n := _name(s, key, v, what, path)) is not None]


def parse(s: Section) -> HaproxyAction:
    socket = s.str("socket")
    if isinstance(socket, str) and not socket.startswith("/"):
        try:
            _split_host_port(socket)
        except ValueError:
            s.error(f"expected an absolute Unix socket path or host:port, got {socket!r}", "socket")
    backend = s.str("backend")
    if isinstance(backend, str):
        templated(s, "backend", backend)
        backend = _name(s, "backend", backend, "backend")

    activate = s.str("activate", None)
    if isinstance(activate, str):
        templated(s, "activate", activate)
        activate = _name(s, "activate", activate, "server")
    deactivate = _names(s, "deactivate", "server")
    server = s.str("server", None)
    if isinstance(server, str):
        templated(s, "server", server)
        server = _name(s, "server", server, "server")
    servers = _names(s, "servers", "server")
    state = s.choice("state", STATES, None)
    weight = s.int("weight", None, minimum=0, maximum=256)
    wait_up = s.bool("wait_up", True)

    changes: list[_Change] = []
    if s.has("activate") or s.has("deactivate"):
        for key in ("server", "servers", "state", "weight"):
            if s.has(key):
                s.error("cannot be combined with activate/deactivate", key)
        if activate and deactivate and activate in deactivate:
            s.error(f"{activate!r} is also in deactivate", "activate")
        if activate:
            changes.append(_Change(activate, "ready", None))
        changes.extend(_Change(name, "maint", None) for name in deactivate or ())
    else:
        if s.has("server") and s.has("servers"):
            s.error("give either server or servers, not both")
        elif not s.has("server") and not s.has("servers"):
            s.error("give activate/deactivate, or server (or servers) with state and/or weight")
        elif not s.has("state") and not s.has("weight"):
            s.error("give state and/or weight for the server(s)")
        targets = [server] if server else (servers or [])
        changes.extend(_Change(name, state, weight) for name in targets)
    return HaproxyAction(
        socket=socket or "", backend=backend or "", changes=changes, wait_up=bool(wait_up)
    )


ACTIONS = {"haproxy": parse}
