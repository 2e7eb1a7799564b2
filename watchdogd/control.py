"""The control socket: how operators steer the daemon (``watchdogctl`` is its client).

Owns the wire protocol, the command table and argument validation, authorisation
from peer credentials, the safety of the socket file, per-connection limits, and
``request()``, the client helper.

Protocol: a Unix stream socket carrying JSON lines. A request is
``{"command": "failover", "args": {"force": true}}``; the reply is
``{"ok": true, "result": {...}}`` or ``{"ok": false, "error": "one clear sentence"}``.
A connection may send several requests; each newline-terminated line gets exactly
one reply, in order.

Validation happens here, before the daemon's handler is called: the handler gets
a known command name and an args dict holding every declared argument (defaults
filled in, optional ones without a default as ``None``).

Authorisation, from the kernel's view of the peer at connect time (SO_PEERCRED for
uid/gid, SO_PEERGROUPS for its supplementary groups: no user-database lookup, so
nothing blocks the event loop per connection; names in the config are resolved once,
at start):

- full access: root, the daemon's own uid, ``allow_users``, members (primary or
  supplementary) of ``allow_groups``;
- read-only commands (status, history, events): members of ``read_groups``; when
  ``read_groups`` is empty, anyone who can connect. The socket's mode (0660 by
  default; config forbids bits for others) already limits who can connect to
  the socket's owner and group (``control.group``, else the daemon's own), so an
  empty ``read_groups`` means "the socket's group may look";
- everyone else gets ``permission denied``, a warning is logged, and the
  connection is closed.

Nobody without full access can lock operators out: such peers share at most
``max_connections - reserved`` slots, each uid at most ``per_uid`` of them, and
every connection is closed after ``max_lifetime`` seconds (between requests).
Every reply is masked with the daemon's current secrets, here, in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno as errno_codes
import grp
import json
import math
import os
import pwd
import socket
import stat
import struct
import traceback
from collections import Counter
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, Protocol

# Not watchdogd.logging: watchdogctl imports this module and must not need structlog.
from watchdogd.core.errors import WatchdogdError
from watchdogd.core.feed import EventFeed, Item
from watchdogd.core.secrets import mask, mask_value

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

    from watchdogd.core.model import ControlConfig

MAX_LINE = 64 * 1024
IDLE_TIMEOUT = 10.0
MAX_CONNECTIONS = 64
# Slots only full-access peers (root, the daemon's user, allow_users/allow_groups) may
# take, and what one uid without full access may hold: an operator can always get in.
RESERVED_FOR_FULL = 16
MAX_PER_UID = 8
# A connection is closed after this long (checked between requests): a client sending a
# line every few seconds cannot keep its slot forever.
MAX_LIFETIME = 300.0
# linux/socket.h; Python's socket module does not name it.
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
# Generous, so a burst of clients queues instead of being refused by the kernel.
BACKLOG = 1024
# Replies (a long history) may be far larger than requests.
REPLY_LIMIT = 64 * 1024 * 1024
# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
MAX_TEXT = 1000
# How many recent events ``events`` returns unless asked (the feed's ring holds 100).
EVENTS_SHOWN = 20

Access = Literal["full", "read", "none"]


class SecretsHolder(Protocol):
    """The daemon's ``watchdogd.logging.Secrets``: the secrets of the config loaded now."""

    @property
    def values(self) -> frozenset[str]: ...


Handler = Callable[[str, dict[str, Any], "Peer"], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class Peer:
    """Who is on the other end of a connection (from SO_PEERCRED).

    ``groups`` are its supplementary groups as the kernel saw them at connect time;
    None when unknown (then group checks fall back to the user database)."""

    pid: int
    uid: int
    gid: int
    user: str | None
    groups: frozenset[int] | None = None


class CommandError(WatchdogdError):
    """A request is refused; the message (one sentence) is sent to the client as is.

    The daemon's handler raises it to refuse a command ("already paused")."""


class ControlSocketError(WatchdogdError):
    """The control socket cannot be set up safely; the message is one line."""


class ControlUnavailable(WatchdogdError):
    """``request()`` could not get a reply from the daemon."""

    def __init__(self, path: str, reason: str, errno: int | None = None) -> None:
        super().__init__(f"cannot reach watchdogd at {path}: {reason}")
        self.path = path
        self.reason = reason
        self.errno = errno


# --------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class Arg:
    """One argument: ``kind`` is bool, int, number (seconds) or text (one line)."""

    kind: Literal["bool", "int", "number", "text"]
    default: Any = None
    minimum: float | None = None
    maximum: float | None = None


@dataclass(frozen=True)
class Command:
    name: str
    mutating: bool
    help: str
    args: Mapping[str, Arg] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "args", MappingProxyType(dict(self.args)))


def _table(*commands: Command) -> Mapping[str, Command]:
    return MappingProxyType({c.name: c for c in commands})


COMMANDS: Mapping[str, Command] = _table(
    Command("status", False, "show the cluster's state"),
    Command(
        "history", False, "list recent failovers with their steps", {"n": Arg("int", 10, 1, 1000)}
    ),
    Command("pause", True, "stop automatic failover until resumed", {"reason": Arg("text")}),
    Command("resume", True, "resume automatic failover"),
    Command(
        "failover",
        True,
        "fail over from the primary to the standby now",
        {"force": Arg("bool", False), "dry_run": Arg("bool", False), "reason": Arg("text")},
    ),
    Command(
        "switchover",
        True,
        "planned switch to the standby once it has caught up",
        {"dry_run": Arg("bool", False), "timeout": Arg("number", None, 0.1, 86400)},
    ),
    Command("abort", True, "abort the failover in progress"),
    Command("ack", True, "acknowledge a finished or failed failover"),
    Command(
        "rejoin",
        True,
        "rejoin the old primary as the standby, then re-arm",
        {"dry_run": Arg("bool", False), "accept_divergence": Arg("bool", False)},
    ),
    Command("reload", True, "reload the configuration"),
    # Served by the control server itself from its EventFeed, not by the daemon's handler.
    Command(
        "events",
        False,
        "show the daemon's recent events; follow streams new ones as they happen",
        {
            "follow": Arg("bool", False),
            "n": Arg("int", EVENTS_SHOWN, 0, 1000),
            "after": Arg("int", None, 0, 2**53),
        },
    ),
)


def lookup(name: Any) -> Command:
    """The Command called ``name``; CommandError when there is none."""
    known = ", ".join(COMMANDS)
    if not isinstance(name, str):
        raise CommandError(f"'command' must be a string, got {_show(name)}; known: {known}")
    command = COMMANDS.get(name)
    if command is None:
        raise CommandError(f"unknown command {_show(name)}; known: {known}")
    return command


def validate_args(command: Command, args: Any) -> dict[str, Any]:
    """Check ``args`` against the command's schema; return it with defaults filled in."""
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise CommandError(f"{command.name}: 'args' must be an object, got {_show(args)}")
    for key in args:
        if key not in command.args:
            takes = (
                f"known: {', '.join(command.args)}"
                if command.args
                else f"{command.name} takes no arguments"
            )
            raise CommandError(f"unknown argument {_show(key)} for {command.name}; {takes}")
    checked: dict[str, Any] = {}
    for key, spec in command.args.items():
        value = args.get(key)
        checked[key] = spec.default if value is None else _check(command.name, key, spec, value)
    return checked


def _check(command: str, key: str, spec: Arg, value: Any) -> Any:
    where = f"{command}: argument '{key}'"
    if spec.kind == "bool":
        if not isinstance(value, bool):
            raise CommandError(f"{where} must be true or false, got {_show(value)}")
        return value
    if spec.kind == "text":
        if not isinstance(value, str):
            raise CommandError(f"{where} must be a string, got {_show(value)}")
        if not value.strip():
            raise CommandError(f"{where} must not be empty")
        if len(value) > MAX_TEXT:
            raise CommandError(f"{where} must be at most {MAX_TEXT} characters, got {len(value)}")
        # It ends up in logs, the journal and notifications: one printable line.
        if not value.isprintable():
            raise CommandError(f"{where} must be one line of printable text, got {_show(value)}")
        return value
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if spec.kind == "int":
        if not number or not isinstance(value, int):
            raise CommandError(
                f"{where} must be a whole number from {spec.minimum:g} "
                f"to {spec.maximum:g}, got {_show(value)}"
            )
    elif not number or (isinstance(value, float) and not math.isfinite(value)):
        # An int is finite however long; math.isfinite() would overflow converting it.
        raise CommandError(
            f"{where} must be a number of seconds from {spec.minimum:g} "
            f"to {spec.maximum:g}, got {_show(value)}"
        )
    if (spec.minimum is not None and value < spec.minimum) or (
        spec.maximum is not None and value > spec.maximum
    ):
        unit = " seconds" if spec.kind == "number" else ""
        raise CommandError(
            f"{where} must be from {spec.minimum:g} to {spec.maximum:g}{unit}, got {_show(value)}"
        )
    return value


class _BadConstant(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise _BadConstant(f"{name} is not a number JSON allows")


def parse_request(line: bytes) -> tuple[Any, Any]:
    """Decode one request line into (command, args), unvalidated; CommandError if malformed."""
    text = line.strip()
    if not text:
        raise CommandError(
            'empty request; send one JSON object per line, like {"command": "status"}'
        )
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError:
        raise CommandError("request is not valid UTF-8") from None
    try:
        data = json.loads(decoded, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise CommandError(f"request is not valid JSON: {exc.msg} at column {exc.colno}") from None
    except _BadConstant as exc:
        raise CommandError(f"request is not valid JSON: {exc}") from None
    except ValueError:  # an integer with more digits than Python will convert
        raise CommandError("request is not valid JSON: a number is too large") from None
    except RecursionError:
        raise CommandError("request is not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise CommandError(
            f'request must be a JSON object like {{"command": "status"}}, got {_show(data)}'
        )
    for key in data:
        if key not in ("command", "args"):
            raise CommandError(
                f"unknown field {_show(key)} in request; expected 'command' and optional 'args'"
            )
    if "command" not in data:
        raise CommandError(f"request has no 'command'; known: {', '.join(COMMANDS)}")
    return data["command"], data.get("args")


def _show(value: Any) -> str:
    """A short, safe rendering of a client-supplied value for an error message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, int) and value.bit_length() > 100:
        return "a very large number"
    text = repr(value)  # escapes control characters and lone surrogates
    return text if len(text) <= 40 else text[:37] + "..."


# --------------------------------------------------------------------------- server


class ControlServer:
    """Serves the control socket; ``handler(command, args, peer)`` is the daemon.

    The handler returns the result object or raises CommandError to refuse. It is
    cancelled if the server stops mid-request, so long work belongs in the
    daemon's own tasks, not inline in the handler.

    ``secrets`` is best the daemon's ``Secrets`` holder: replies are then masked with
    the secrets of the config loaded now, not those of the config at start.
    """

    def __init__(
        self,
        config: ControlConfig,
        handler: Handler,
        log: FilteringBoundLogger,
        *,
        max_line: int = MAX_LINE,
        idle_timeout: float = IDLE_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
        reserved: int = RESERVED_FOR_FULL,
        per_uid: int = MAX_PER_UID,
        max_lifetime: float = MAX_LIFETIME,
        secrets: SecretsHolder | Iterable[str] = (),
        feed: EventFeed | None = None,
    ) -> None:
        self.config = config
        self.feed = feed
        self.handler = handler
        self.log = log
        self.max_line = max_line
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.reserved = min(reserved, max_connections)
        self.per_uid = per_uid
        self.max_lifetime = max_lifetime
        self._secrets: SecretsHolder = (
            _Fixed(frozenset(secrets))
            if isinstance(secrets, set | frozenset | list | tuple)
            else secrets  # type: ignore[assignment]
        )
        self.path = config.socket
        self._server: asyncio.AbstractServer | None = None
        self._identity: tuple[int, int] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        # Connections of peers without full access, per uid (the reserve is theirs not).
        self._limited: Counter[int] = Counter()
        self._stopping = False
        self._own_uid = os.geteuid()
        # Config names resolved once, at start (a lookup may block: NSS, LDAP).
        self._allow_uids: frozenset[int] = frozenset()
        self._allow_gids: frozenset[int] = frozenset()
        self._read_gids: frozenset[int] = frozenset()
        self._names: dict[int, str | None] = {}

    @property
    def secrets(self) -> frozenset[str]:
        return self._secrets.values

    @property
    def connections(self) -> int:
        """Connections being served right now."""
        return len(self._tasks)

    async def start(self) -> None:
        """Bind and listen; ControlSocketError (one line) if that is not safe."""
        if self._server is not None:
            raise ControlSocketError("control server already started")
        self._stopping = False
        path = Path(self.path)
        if len(os.fsencode(self.path)) > MAX_SOCKET_PATH:
            raise ControlSocketError(
                f"control socket path {self.path} is too long (at most {MAX_SOCKET_PATH} bytes)"
            )
        gid = self._socket_group()
        self._resolve_names()
        _prepare_directory(path.parent, gid)
        if _clear_stale(path):
            self.log.info("control.stale_socket_replaced", socket=self.path)
        sock = _bind(path, self.config.mode, gid, self.config.group)
        try:
            st = os.stat(path)
            self._identity = (st.st_dev, st.st_ino)
            self._server = await asyncio.start_unix_server(
                self._on_client, sock=sock, limit=self.max_line, backlog=BACKLOG
            )
        except BaseException:
            sock.close()
            self._unlink()
            raise
        for problem in self._unknown_names():
            self.log.warning("control.config_name_unknown", problem=problem)
        self.log.info(
            "control.listening",
            socket=self.path,
            mode=f"{self.config.mode:04o}",
            group=self.config.group,
        )

    def _socket_group(self) -> int | None:
        """The gid ``control.group`` names; None to keep the daemon's own group."""
        name = self.config.group
        if name is None:
            return None
        try:
            gid = grp.getgrnam(name).gr_gid
        except KeyError:
            raise ControlSocketError(f"control.group: no such group {name!r}") from None
        if gid == os.getegid():
            # Operators would have to join the group that can read the config and the
            # *_file secrets: the very thing control.group exists to avoid.
            raise ControlSocketError(
                f"control.group: {name!r} is the daemon's own group; name a group for "
                "operators (e.g. watchdogctl) or leave control.group unset"
            )
        return gid

    def _resolve_names(self) -> None:
        cfg = self.config
        uids = set()
        for user in cfg.allow_users:
            with contextlib.suppress(KeyError):
                uids.add(pwd.getpwnam(user).pw_uid)
        self._allow_uids = frozenset(uids)
        self._allow_gids = _gids(cfg.allow_groups)
        self._read_gids = _gids(cfg.read_groups)

    async def stop(self) -> None:
        """Stop listening, drop open connections, remove the socket file."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping = True
        server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                await server.wait_closed()
        self._unlink()
        self.log.info("control.stopped", socket=self.path)

    def _unlink(self) -> None:
        # Only our own socket: a successor may already have replaced it.
        with contextlib.suppress(OSError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._identity:
                os.unlink(self.path)

    def _unknown_names(self) -> list[str]:
        problems = []
        for user in self.config.allow_users:
            try:
                pwd.getpwnam(user)
            except KeyError:
                problems.append(f"control.allow_users: no such user {user!r}")
        for key in ("allow_groups", "read_groups"):
            for group in getattr(self.config, key):
                try:
                    grp.getgrnam(group)
                except KeyError:
                    problems.append(f"control.{key}: no such group {group!r}")
        return problems

    # -- authorisation

    def access(self, peer: Peer) -> Access:
        """What ``peer`` may do: full, read (status/history) or none."""
        cfg = self.config
        if peer.uid in (0, self._own_uid):
            return "full"
        if peer.uid in self._allow_uids or (peer.user is not None and peer.user in cfg.allow_users):
            return "full"
        if self._member_of_any(peer, cfg.allow_groups, self._allow_gids):
            return "full"
        if not cfg.read_groups or self._member_of_any(peer, cfg.read_groups, self._read_gids):
            return "read"
        return "none"

    def _member_of_any(self, peer: Peer, names: tuple[str, ...], gids: frozenset[int]) -> bool:
        if not names:
            return False
        if peer.groups is not None:
            # The kernel's view at connect time: what the peer's process really holds.
            return bool(({peer.gid} | peer.groups) & gids)
        return _member_in_user_database(peer, names)

    # -- connections

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is None or self._stopping:  # accepted just before stop(): not served
            writer.close()
            return
        peer = _peer(writer)
        if peer is None:
            self.log.error("control.no_peer_credentials")
            writer.close()
            return
        level = self.access(peer)
        refusal = self._admit(peer, level)
        if refusal is not None:
            self.log.warning(
                "control.busy",
                connections=len(self._tasks),
                uid=peer.uid,
                pid=peer.pid,
                access=level,
            )
            with contextlib.suppress(OSError):
                writer.write(_encode(_error(refusal)))
            writer.close()
            return
        limited = level != "full"
        self._tasks.add(task)
        if limited:
            self._limited[peer.uid] += 1
        try:
            peer = await self._named(peer)
            await self._serve(reader, writer, peer, level)
        except _Gone:
            pass
        except asyncio.CancelledError:
            # stop() cancels open connections; ending quietly keeps asyncio's
            # stream callback from logging the cancellation as an error.
            if not self._stopping:
                raise
        except Exception as exc:
            self.log.error("control.connection_failed", error=self._mask(_one_line(exc)))
        finally:
            self._tasks.discard(task)
            if limited:
                self._limited[peer.uid] -= 1
                if self._limited[peer.uid] <= 0:
                    del self._limited[peer.uid]
            writer.close()

    def _admit(self, peer: Peer, level: Access) -> str | None:
        """None to serve this connection, else the one-line reason it is not served."""
        if len(self._tasks) >= self.max_connections:
            return (
                f"busy: too many control connections (limit {self.max_connections}); "
                "try again shortly"
            )
        if level == "full":
            return None
        if sum(self._limited.values()) >= self.max_connections - self.reserved:
            return (
                "busy: the remaining control connections are reserved for operators "
                "with full access; try again shortly"
            )
        if self._limited[peer.uid] >= self.per_uid:
            return (
                f"busy: too many control connections from uid {peer.uid} "
                f"(limit {self.per_uid}); close some and try again"
            )
        return None

    async def _named(self, peer: Peer) -> Peer:
        """``peer`` with its user name, looked up off the event loop (NSS may block)."""
        if peer.uid not in self._names:
            try:
                async with asyncio.timeout(2):
                    self._names[peer.uid] = await asyncio.to_thread(_user_name, peer.uid)
            except TimeoutError:
                return peer  # unnamed this time; asked again next connection
            if len(self._names) > 4096:  # bounded: uids are few, but not trusted to be
                self._names.pop(next(iter(self._names)))
        return Peer(peer.pid, peer.uid, peer.gid, self._names[peer.uid], peer.groups)

    async def _serve(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: Peer,
        level: Access = "full",
    ) -> None:
        loop = asyncio.get_running_loop()
        ends = loop.time() + self.max_lifetime
        while True:
            last = False
            left = ends - loop.time()
            try:
                if left <= 0:
                    raise _TooOld
                async with asyncio.timeout(min(self.idle_timeout, left)):
                    line = await reader.readuntil(b"\n")
            except asyncio.IncompleteReadError as exc:
                # The client half-closed: answer a final unterminated line, if any.
                line, last = exc.partial, True
                if not line.strip():
                    return
            except asyncio.LimitOverrunError:
                self.log.warning("control.line_too_long", uid=peer.uid, pid=peer.pid)
                await self._send(
                    writer,
                    _error(
                        f"request line longer than {self.max_line} bytes; closing the connection"
                    ),
                )
                return
            except (TimeoutError, _TooOld):
                if loop.time() >= ends:
                    message = (
                        f"connection open longer than {self.max_lifetime:g}s; "
                        "closing it (connect again)"
                    )
                else:
                    message = (
                        f"no complete request within {self.idle_timeout:g}s; closing the connection"
                    )
                await self._send(writer, _error(message))
                return
            except OSError:
                return
            reply, denied = await self._reply(line, peer, level)
            await self._send(writer, reply)
            if last or denied:
                # A refused peer gets nothing more here: it must not keep a slot.
                return
            if _following(reply):
                await self._stream(reader, writer, reply["result"]["seq"], ends)
                return

    async def _send(self, writer: asyncio.StreamWriter, reply: dict[str, Any]) -> None:
        try:
            writer.write(_encode(reply))
            # A client that never reads must not hold the connection forever.
            async with asyncio.timeout(self.idle_timeout):
                await writer.drain()
        except (OSError, TimeoutError):
            raise _Gone from None

    async def respond(self, line: bytes, peer: Peer) -> dict[str, Any]:
        """The reply to one request line from ``peer``, masked with the current secrets."""
        reply, _ = await self._reply(line, peer, None)
        return reply

    async def _reply(
        self, line: bytes, peer: Peer, level: Access | None
    ) -> tuple[dict[str, Any], bool]:
        """The masked reply, and whether it was a permission refusal."""
        reply = await self._respond(line, peer, level)
        if reply is _DENIED:
            return {"ok": False, "error": "permission denied"}, True
        # One place for every reply: a probe detail or handler error echoing a token (an
        # app health endpoint returning its Authorization header) never reaches a peer.
        masked: dict[str, Any] = mask_value(reply, self._secrets.values)
        return masked, False

    async def _respond(self, line: bytes, peer: Peer, level: Access | None) -> dict[str, Any]:
        try:
            name, raw_args = parse_request(line)
            command = lookup(name)
            if level is None:
                level = self.access(peer)
            if level == "none" or (level == "read" and command.mutating):
                self.log.warning(
                    "control.denied",
                    command=command.name,
                    uid=peer.uid,
                    user=peer.user,
                    pid=peer.pid,
                )
                return _DENIED
            args = validate_args(command, raw_args)
        except CommandError as exc:
            return _error(self._mask(_sentence(exc)))
        except Exception as exc:  # a check we did not foresee: still one line, a reply
            message = self._mask(_one_line(exc))
            self.log.error("control.request_check_failed", error=message, uid=peer.uid)
            return _error(f"bad request: {message}")
        who = {"uid": peer.uid, "user": peer.user, "pid": peer.pid}
        if command.mutating:
            self.log.info(
                "control.command", command=command.name, args=self._mask_value(args), **who
            )
        else:
            self.log.debug("control.command", command=command.name, args=args, **who)
        try:
            if command.name == "events":
                result = self._events(args)
            else:
                result = await self.handler(command.name, args, peer)
        except CommandError as exc:
            message = self._mask(_sentence(exc))
            self.log.info("control.refused", command=command.name, error=message, **who)
            return _error(message)
        except Exception as exc:
            message = self._mask(_one_line(exc))
            self.log.error(
                "control.handler_failed",
                command=command.name,
                error=message,
                traceback=self._mask("".join(traceback.format_exception(exc))),
            )
            return _error(f"internal error: {message}")
        if not isinstance(result, dict):
            self.log.error(
                "control.handler_failed",
                command=command.name,
                error=f"handler returned {type(result).__name__}, not a dict",
            )
            return _error(f"internal error: {command.name} returned no result object")
        return {"ok": True, "result": result}

    def _mask(self, text: str) -> str:
        return mask(text, self._secrets.values)

    # -- live events (``events``, ``events --follow``)

    def _events(self, args: dict[str, Any]) -> dict[str, Any]:
        feed = self.feed
        if feed is None:
            raise CommandError("events: this server has no event feed")
        items = feed.recent(int(args["n"]), args.get("after"))
        result: dict[str, Any] = {"events": [i.as_dict() for i in items], "seq": feed.seq}
        if args.get("follow"):
            # The stream starts after ``seq``: nothing between this reply and it is lost.
            result["following"] = True
        return result

    async def _stream(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        after: int,
        ends: float,
    ) -> None:
        """Send each new event as ``{"ok": true, "event": {...}}`` until the client
        leaves, sends anything, or the connection's lifetime is up. Not cut by the idle
        timeout (a quiet daemon is normal); ``_send`` drops a client that stops reading.
        Its queue drops the oldest events meanwhile and says so: ``{"ok": true,
        "missed": N}``."""
        assert self.feed is not None
        loop = asyncio.get_running_loop()
        follower = self.feed.follow(after)
        # Any input, or EOF, ends the stream: the connection carries no more requests.
        hangup: asyncio.Future[bytes] = asyncio.ensure_future(reader.read(1))
        taking: asyncio.Future[tuple[list[Item], int]] | None = None
        try:
            while True:
                left = ends - loop.time()
                if left <= 0:
                    await self._send(
                        writer,
                        _error(
                            f"connection open longer than {self.max_lifetime:g}s; "
                            "closing it (connect again with after=<last seq>)"
                        ),
                    )
                    return
                if taking is None:  # else still waiting from the last turn: the same one
                    taking = asyncio.ensure_future(follower.take())
                waiting: set[asyncio.Future[Any]] = {taking, hangup}
                done, _ = await asyncio.wait(
                    waiting, timeout=left, return_when=asyncio.FIRST_COMPLETED
                )
                if hangup in done:
                    if not hangup.exception() and hangup.result():
                        await self._send(
                            writer,
                            _error("events --follow: the stream takes no requests; closing it"),
                        )
                    return
                if taking not in done:
                    continue
                items, missed = taking.result()
                taking = None
                if missed:
                    await self._send(writer, {"ok": True, "missed": missed})
                for item in items:
                    await self._send(
                        writer, {"ok": True, "event": self._mask_value(item.as_dict())}
                    )
        finally:
            self.feed.unfollow(follower)
            for pending in (hangup, taking):
                if pending is not None:
                    pending.cancel()
                    if pending.done() and not pending.cancelled():
                        pending.exception()  # retrieved: a reset peer is no news

    def _mask_value(self, value: Any) -> Any:
        return mask_value(value, self._secrets.values)


@dataclass(frozen=True)
class _Fixed:
    """Secrets given as a plain collection: they never change."""

    values: frozenset[str]


class _Gone(Exception):
    """The client went away or stopped reading."""


class _TooOld(Exception):
    """The connection has been open longer than ``max_lifetime``."""


# Marks a permission refusal inside the server (compared by identity, never sent).
_DENIED: dict[str, Any] = {"ok": False, "error": "permission denied"}


def _following(reply: Mapping[str, Any]) -> bool:
    """Whether ``reply`` starts an ``events --follow`` stream."""
    result = reply.get("result")
    return (
        reply.get("ok") is True
        and isinstance(result, dict)
        and result.get("following") is True
        and isinstance(result.get("seq"), int)
    )


def _error(message: str) -> dict[str, Any]:
    return {"ok": False, "error": message}


def _sentence(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = "; ".join(lines) or type(exc).__name__
    return text if len(text) <= 2000 else text[:1997] + "..."


def _one_line(exc: BaseException) -> str:
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    name = type(exc).__name__
    text = f"{name}: {first}" if first else name
    return text if len(text) <= 500 else text[:497] + "..."


def _encode(reply: Mapping[str, Any]) -> bytes:
    """One JSON line, whatever odd values the result holds."""
    try:
        text = json.dumps(reply, default=str, allow_nan=False)
    except (ValueError, TypeError, RecursionError):
        try:
            text = json.dumps(_plain(reply, 0), allow_nan=False)
        except (ValueError, TypeError, RecursionError):
            text = json.dumps(_error("internal error: the reply could not be encoded"))
    return text.encode() + b"\n"


def _plain(value: Any, depth: int) -> Any:
    """``value`` made JSON-safe: non-finite floats, odd keys, cycles, huge ints."""
    if depth > 64:
        return "..."
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return value if value.bit_length() < 4000 else f"<integer of {value.bit_length()} bits>"
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {
            _safe_str(k) if not isinstance(k, str) else k: _plain(v, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(v, depth + 1) for v in value]
    return _safe_str(value)


def _safe_str(value: Any) -> str:
    try:
        return str(value)
    except Exception:
        return f"<{type(value).__name__}>"


def _peer(writer: asyncio.StreamWriter) -> Peer | None:
    sock = writer.get_extra_info("socket")
    if sock is None:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("=iII"))
    except OSError:
        return None
    pid, uid, gid = struct.unpack("=iII", raw)
    return Peer(pid=pid, uid=uid, gid=gid, user=None, groups=_peer_groups(sock, pid))


def _peer_groups(sock: socket.socket, pid: int) -> frozenset[int] | None:
    """The peer's supplementary groups as the kernel holds them (no user database)."""
    size = 64 * 4
    for _ in range(4):  # ERANGE: more groups than the buffer holds; NGROUPS_MAX is 65536
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
        except OSError as exc:
            if exc.errno == errno_codes.ERANGE:
                size *= 16
                continue
            break  # a kernel without SO_PEERGROUPS (before 4.13)
        return frozenset(struct.unpack(f"={len(raw) // 4}I", raw[: len(raw) // 4 * 4]))
    return _proc_groups(pid)


def _proc_groups(pid: int) -> frozenset[int] | None:
    """The ``Groups:`` line of /proc/<pid>/status (procfs: read from memory, no waiting)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for raw in f:
                if raw.startswith(b"Groups:"):
                    return frozenset(int(g) for g in raw.split()[1:])
    except (OSError, ValueError):
        pass
    return None


def _user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def _gids(names: Iterable[str]) -> frozenset[int]:
    gids = set()
    for name in names:
        with contextlib.suppress(KeyError):
            gids.add(grp.getgrnam(name).gr_gid)
    return frozenset(gids)


def _member_in_user_database(peer: Peer, groups: tuple[str, ...]) -> bool:
    """Membership from the user database: only for a Peer built without kernel groups."""
    try:
        primary = {peer.gid, pwd.getpwuid(peer.uid).pw_gid}
    except KeyError:
        primary = {peer.gid}
    for name in groups:
        try:
            group = grp.getgrnam(name)
        except KeyError:
            continue
        if group.gr_gid in primary or (peer.user is not None and peer.user in group.gr_mem):
            return True
    return False


def _prepare_directory(directory: Path, gid: int | None = None) -> None:
    if not directory.exists():
        try:
            directory.mkdir(mode=0o750, parents=True)
            os.chmod(directory, 0o750)
        except FileExistsError:
            pass  # created concurrently; checked below like any other
        except OSError as exc:
            raise ControlSocketError(
                f"cannot create control socket directory {directory}: {exc.strerror}"
            ) from None
    try:
        st = os.stat(directory)
    except OSError as exc:
        raise ControlSocketError(
            f"cannot use control socket directory {directory}: {exc.strerror}"
        ) from None
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISDIR(st.st_mode):
        raise ControlSocketError(f"control socket directory {directory} is not a directory")
    # Whoever may write there could put their own socket in place and impersonate the
    # daemon to watchdogctl, or remove ours.
    if st.st_mode & stat.S_IWOTH:
        raise ControlSocketError(
            f"control socket directory {directory} is world-writable "
            f"(mode {mode:04o}); use a private one like /run/watchdogd"
        )
    if st.st_mode & stat.S_IWGRP:
        raise ControlSocketError(
            f"control socket directory {directory} is group-writable "
            f"(mode {mode:04o}); use a private one like /run/watchdogd (mode 0750)"
        )
    if st.st_uid not in (0, os.geteuid()):
        raise ControlSocketError(
            f"control socket directory {directory} belongs to uid {st.st_uid}, not to "
            "the daemon's user or root; use one of the daemon's own like /run/watchdogd"
        )
    if gid is not None and st.st_uid == os.geteuid() and st.st_gid != gid:
        # Our own directory (/run/watchdogd, 0750): control.group must be able to reach
        # the socket inside it, without joining the daemon's group.
        try:
            os.chown(directory, -1, gid)
        except OSError as exc:
            raise ControlSocketError(
                f"cannot give control socket directory {directory} to control.group: "
                f"{exc.strerror} (the daemon's user must be a member of that group)"
            ) from None


def _clear_stale(path: Path) -> bool:
    """Remove a socket file nobody listens on; refuse if a live daemon answers."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise ControlSocketError(f"cannot check control socket {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlSocketError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        os.unlink(path)
        return True
    except TimeoutError:
        pass  # accepted into a full backlog: somebody is listening
    except OSError as exc:
        raise ControlSocketError(
            f"cannot check control socket {path} ({exc.strerror}); "
            "remove it if no watchdogd is running"
        ) from None
    finally:
        probe.close()
    raise ControlSocketError(
        f"another watchdogd is already listening on {path}; "
        "stop it first or set a different control.socket"
    )


def _bind(path: Path, mode: int, gid: int | None = None, group: str | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # The umask gives the socket its mode at bind(): there is no window in which
    # a looser mode exists. Nothing awaits in between, so no other task sees it.
    # With a group to give it to, it starts owner-only and gets its mode once chowned.
    old = os.umask(0o777 & ~(mode if gid is None else mode & 0o700))
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        if exc.errno == errno_codes.EADDRINUSE:
            raise ControlSocketError(
                f"control socket {path} was created by someone else "
                "while starting; is another watchdogd starting?"
            ) from None
        raise ControlSocketError(f"cannot create control socket {path}: {exc.strerror}") from None
    finally:
        os.umask(old)
    if gid is not None:
        try:
            os.chown(path, -1, gid)
            os.chmod(path, mode)
        except OSError as exc:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise ControlSocketError(
                f"cannot give control socket {path} to control.group {group}: {exc.strerror} "
                "(the daemon's user must be a member of that group: SupplementaryGroups=)"
            ) from None
    return sock


# --------------------------------------------------------------------------- client


async def request(
    socket_path: str,
    command: str,
    args: dict[str, Any] | None = None,
    timeout: float = 30,
) -> dict[str, Any]:
    """Send one request, return the reply (``{"ok": ..., "result"/"error": ...}``).

    Raises ControlUnavailable when there is no usable reply: no socket, nobody
    listening, no permission, timeout, or a reply that is not a JSON object.
    """
    replies = stream(socket_path, command, args, timeout)
    async with contextlib.aclosing(replies):
        async for reply in replies:
            return reply
    raise AssertionError("unreachable: stream() yields a reply or raises")


async def stream(
    socket_path: str, command: str, args: dict[str, Any] | None = None, timeout: float = 30
) -> AsyncGenerator[dict[str, Any], None]:
    """Send one request and yield every line the daemon sends back (one reply; for
    ``events`` with ``follow``, then one line per event) until it closes the connection.

    ``timeout`` bounds the connect and the first reply only: a quiet stream is normal.
    Raises ControlUnavailable like ``request()``.
    """
    message: dict[str, Any] = {"command": command}
    if args:
        message["args"] = args
    writer: asyncio.StreamWriter | None = None
    try:
        first = True
        while True:
            try:
                async with asyncio.timeout(timeout if first else None):
                    if writer is None:
                        reader, writer = await asyncio.open_unix_connection(
                            socket_path, limit=REPLY_LIMIT
                        )
                        writer.write(json.dumps(message).encode() + b"\n")
                        await writer.drain()
                    line = await reader.readline()
            except TimeoutError:
                raise ControlUnavailable(socket_path, f"no reply within {timeout:g}s") from None
            except ValueError:
                raise ControlUnavailable(socket_path, "the reply is too large") from None
            except OSError as exc:
                raise ControlUnavailable(socket_path, exc.strerror or str(exc), exc.errno) from None
            if not line:
                if first:
                    raise ControlUnavailable(socket_path, "the connection closed without a reply")
                return
            try:
                reply = json.loads(line)
            except ValueError:
                raise ControlUnavailable(
                    socket_path, "the reply is not JSON: is this a watchdogd control socket?"
                ) from None
            if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
                raise ControlUnavailable(socket_path, "the reply is not a watchdogd reply")
            first = False
            yield reply
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
