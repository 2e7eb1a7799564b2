"""A thin asyncio etcd v3 client over etcd's JSON gateway (``/v3/...``) on aiohttp.

It owns the transport to a consensus store for a fleet of watchers: key-value reads and
writes, transactions, leases with keepalive, watches and authentication, against several
endpoints with a timeout per attempt and failover to the next endpoint. It decides
nothing: the fleet (leadership, votes, the journal in the store) builds on it.

The error classification is the heart of its safety, and has exactly three outcomes
besides success:

- ``CompareFailed``: a transaction's compare was explicitly false (``succeeded`` false in
  a well-formed reply carrying the failure branch's responses). It is the ONLY answer
  that means "lost" (leadership, a token): somebody else changed the key.
- ``LeaseNotFound``: etcd said the lease does not exist (expired or revoked). Renewing it
  again cannot help; a fleet member confirms what it lost with a guarded transaction.
- ``StoreUnavailable``: everything else. Timeouts, refused connections, TLS failures,
  "etcdserver: no leader", "leader changed", "request timed out", HTTP 5xx, unknown
  errors, malformed or truncated replies. It never means "lost": the caller resolves it
  later with a fresh linearizable read. Its message is one line naming each endpoint
  tried and why it failed.

A transaction retried on another endpoint after an attempt that may have reached a
server (a timeout, a reply lost, a server error) is ambiguous: if the retry's compare
fails, the first attempt may have been the one that changed the key. That case is a
``StoreUnavailable`` (``maybe_applied``), never a ``CompareFailed``. Puts and deletes are
idempotent and retried freely; a retried lease grant may leave an unused lease behind,
which etcd expires after its ttl.

Reads are linearizable, always: the client never sends ``serializable``, since a
serializable read is served from a member's possibly stale copy (without quorum it still
answers in milliseconds).

``Lease`` records the time each keepalive was *sent* and the ttl etcd acknowledged, so
a holder's authority ends at ``Lease.deadline(margin)``: the send time of the last
acknowledged renewal plus its ttl minus a margin (etcd renewed it no earlier than we
sent the request). ``Watch`` is an async iterator of events that resumes from the
revision after the last one it delivered when its stream breaks or its member stops
answering: etcd cancels the stream when its member has no leader (gRPC metadata
``hasleader``), and an idle stream is checked with a linearizable read on its member
(a SIGSTOPped member keeps the TCP connection open and says nothing).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, NoReturn, TypeVar

import aiohttp
import yarl

from watchdogd.core import clock
from watchdogd.core.errors import WatchdogdError
from watchdogd.state.store import StoreUnavailable as StoreUnavailable  # the seam's error

T = TypeVar("T")

DEFAULT_TIMEOUT = 2.0
# A reason quoted from a server or an exception is cut here: errors stay one line.
_REASON_CHARS = 200
# A watch stream's line longer than this is not etcd talking (events are batched far
# below it); it is refused instead of filling memory.
_MAX_LINE = 64 * 1024 * 1024
# etcd cancels a watch (and a keepalive stream) on a member that has lost its leader
# when the request carries this gRPC metadata; the gateway forwards Grpc-Metadata-*.
_REQUIRE_LEADER = {"Grpc-Metadata-hasleader": "true"}
# Answers that a new token cures: none sent, expired, or issued before users or roles
# changed ("revision of auth store is old"; etcd's own client authenticates again too).
_AUTH_AGAIN = ("auth token", "user name is empty", "auth store is old")


class EtcdConfigError(WatchdogdError):
    """The client's settings are unusable (an endpoint's form, unreadable TLS files)."""


class CompareFailed(WatchdogdError):
    """A transaction's compare was false: the only "lost" answer. ``responses`` are the
    failure branch's results (by default the current state of every compared key)."""

    def __init__(self, message: str, result: TxnResult) -> None:
        super().__init__(message)
        self.result = result


class LeaseNotFound(WatchdogdError):
    """etcd says the lease does not exist (expired or revoked)."""


class WatchCompacted(WatchdogdError):
    """A watch cannot resume: the revisions it missed were compacted away. The caller
    reads the current state afresh and watches from there."""

    def __init__(self, message: str, compact_revision: int) -> None:
        super().__init__(message)
        self.compact_revision = compact_revision


# --------------------------------------------------------------------------- values


Key = str | bytes


@dataclass(frozen=True)
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int


@dataclass(frozen=True)
class RangeResult:
    """A linearizable read: the store's revision when it was served, and the keys."""

    revision: int
    kvs: tuple[KeyValue, ...]
    count: int


@dataclass(frozen=True)
class Written:
    """The result of a put or a delete inside a transaction."""

    kind: Literal["put", "delete"]
    deleted: int = 0


OpResult = RangeResult | Written


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    revision: int
    responses: tuple[OpResult, ...]


_TARGETS = {
    "create": ("CREATE", "create_revision"),
    "mod": ("MOD", "mod_revision"),
    "version": ("VERSION", "version"),
    "value": ("VALUE", "value"),
    "lease": ("LEASE", "lease"),
}
_RESULTS = {"=": "EQUAL", "!=": "NOT_EQUAL", "<": "LESS", ">": "GREATER"}


@dataclass(frozen=True)
class Compare:
    """One compare of a transaction: ``Compare(key, "create", "=", 0)`` (the key does not
    exist), ``Compare(key, "value", "=", b"x")``; targets create, mod, version, value,
    lease; operators ``= != < >``."""

    key: Key
    target: Literal["create", "mod", "version", "value", "lease"]
    op: Literal["=", "!=", "<", ">"]
    operand: int | bytes

    def encode(self) -> dict[str, Any]:
        target, name = _TARGETS[self.target]
        if self.target == "value":
            if not isinstance(self.operand, bytes):
                raise TypeError("a value compare takes bytes")
            operand: Any = _b64(self.operand)
        else:
            if not isinstance(self.operand, int):
                raise TypeError(f"a {self.target} compare takes an int")
            operand = str(self.operand)
        return {"key": _b64(self.key), "target": target, "result": _RESULTS[self.op], name: operand}


@dataclass(frozen=True)
class Put:
    key: Key
    value: bytes
    lease: int = 0

    def encode(self) -> dict[str, Any]:
        body: dict[str, Any] = {"key": _b64(self.key), "value": _b64(self.value)}
        if self.lease:
            body["lease"] = str(self.lease)
        return {"request_put": body}


@dataclass(frozen=True)
class _Ranged:
    key: Key
    range_end: Key | None = None
    request: ClassVar[str]

    def encode(self) -> dict[str, Any]:
        return {self.request: _range_body(self.key, self.range_end)}


@dataclass(frozen=True)
class Get(_Ranged):
    request = "request_range"


@dataclass(frozen=True)
class Delete(_Ranged):
    request = "request_delete_range"


Op = Put | Get | Delete
_RESPONSE_OF = {Put: "response_put", Get: "response_range", Delete: "response_delete_range"}


def prefix_end(prefix: Key) -> bytes:
    """The ``range_end`` that makes a range cover every key starting with ``prefix``."""
    raw = bytearray(_bytes(prefix))
    while raw and raw[-1] == 0xFF:
        raw.pop()
    if not raw:
        return b"\0"  # every key
    raw[-1] += 1
    return bytes(raw)


@dataclass(frozen=True)
class TlsFiles:
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


@dataclass(frozen=True)
class WatchEvent:
    type: Literal["put", "delete"]
    kv: KeyValue

    @property
    def revision(self) -> int:
        return self.kv.mod_revision


# --------------------------------------------------------------------------- the client


class _AttemptFailed(Exception):
    """One endpoint gave no usable answer; the reason is one line."""

    def __init__(self, reason: str, *, reached: bool = True) -> None:
        super().__init__(reason)
        self.reached = reached  # whether the request may have reached a server


class _AuthRejected(Exception):
    """The server refused our token (absent or expired)."""


class BadReply(ValueError):
    """A reply that is not what etcd sends: the reason is one line."""


class EtcdClient:
    """An etcd v3 client for several endpoints.

    Every call tries the endpoints in turn, starting with the one that answered last,
    each attempt bounded by ``timeout`` (authentication included), and raises
    ``StoreUnavailable`` when none gave a usable answer. ``retry_budget`` is the longest
    a call can take. Use it as an async context manager (or call ``close()``).
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        tls: TlsFiles | None = None,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        if not endpoints:
            raise EtcdConfigError("etcd: no endpoints")
        self._endpoints = tuple(_endpoint(e) for e in endpoints)
        if not timeout > 0:
            raise EtcdConfigError(f"etcd: timeout must be positive, not {timeout!r}")
        self._timeout = timeout
        if (username is None) != (password is None):
            raise EtcdConfigError("etcd: username and password go together")
        self._credentials = (username, password) if username is not None else None
        self._token: str | None = None
        self._current = 0
        ssl_context: ssl.SSLContext | None = None
        if any(e.scheme == "https" for e in self._endpoints):
            ssl_context = _ssl_context(tls or TlsFiles())
        self._ssl = ssl_context
        self._session: aiohttp.ClientSession | None = None

    @property
    def endpoints(self) -> tuple[str, ...]:
        return tuple(str(e) for e in self._endpoints)

    @property
    def timeout(self) -> float:
        return self._timeout

    @property
    def retry_budget(self) -> float:
        """The longest one call takes: one attempt per endpoint."""
        return self._timeout * len(self._endpoints)

    async def __aenter__(self) -> EtcdClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl if self._ssl else True),
                timeout=aiohttp.ClientTimeout(total=None),
                raise_for_status=False,
            )
        return self._session

    # ----------------------------------------------------------------- key-value

    async def range(self, key: Key, range_end: Key | None = None, *, limit: int = 0) -> RangeResult:
        """A linearizable read of ``key`` (or ``[key, range_end)``)."""
        body = _range_body(key, range_end)
        if limit:
            body["limit"] = str(limit)
        return await self._call("kv/range", body, _parse_range_reply)

    async def get(self, key: Key) -> KeyValue | None:
        result = await self.range(key)
        return result.kvs[0] if result.kvs else None

    async def get_prefix(self, prefix: Key) -> RangeResult:
        return await self.range(prefix, prefix_end(prefix))

    async def put(self, key: Key, value: bytes, *, lease: int = 0) -> int:
        """Write ``key``; returns the store's revision after the write."""
        body = Put(key, value, lease).encode()["request_put"]
        return await self._call("kv/put", body, _parse_header_revision)

    async def delete(self, key: Key, range_end: Key | None = None) -> int:
        """Delete ``key`` (or the range); returns how many keys were deleted."""

        def parse(reply: Any) -> int:
            _parse_header_revision(reply)
            return _int(reply, "deleted")

        return await self._call("kv/deleterange", _range_body(key, range_end), parse)

    async def txn(
        self,
        compare: Sequence[Compare],
        success: Sequence[Op] = (),
        failure: Sequence[Op] | None = None,
    ) -> TxnResult:
        """Run a transaction; return its result when every compare held.

        Raises ``CompareFailed`` when etcd explicitly answered that a compare was false
        (the only "lost"), ``StoreUnavailable`` otherwise. Without a ``failure`` branch,
        the failure branch reads every compared key, so a ``CompareFailed`` carries their
        current state.
        """
        if failure is None:
            seen: dict[bytes, None] = {}
            for c in compare:
                seen.setdefault(_bytes(c.key))
            failure = [Get(k) for k in seen]
        body = {
            "compare": [c.encode() for c in compare],
            "success": [op.encode() for op in success],
            "failure": [op.encode() for op in failure],
        }
        success_ops, failure_ops = tuple(success), tuple(failure)
        result = await self._call(
            "kv/txn",
            body,
            lambda reply: _parse_txn_reply(reply, success_ops, failure_ops),
            ambiguous_if=lambda r: not r.succeeded,
        )
        if not result.succeeded:
            raise CompareFailed("etcd: transaction compare failed", result)
        return result

    # ----------------------------------------------------------------- leases

    async def lease_grant(self, ttl: int) -> Lease:
        """A new lease of ``ttl`` seconds, with its grant recorded as its first renewal."""
        if ttl < 1:
            raise ValueError("a lease ttl is at least 1 s")

        def parse(reply: Any) -> tuple[int, int]:
            _parse_header_revision(reply)
            return _int(reply, "ID"), _int(reply, "TTL")

        (lease_id, granted), sent_at = await self._call_timed(
            "lease/grant", {"TTL": str(ttl)}, parse
        )
        if lease_id <= 0 or granted <= 0:
            raise StoreUnavailable(f"etcd: lease grant answered ID {lease_id}, TTL {granted}")
        return Lease(self, lease_id, granted, Renewal(sent_at, granted))

    async def lease_keepalive(self, lease_id: int) -> Renewal:
        """Renew ``lease_id`` once; the renewal carries the send time of the attempt that
        etcd acknowledged and the ttl it acknowledged."""

        def parse(reply: Any) -> int:
            result = _field(reply, "result", dict)
            _parse_header_revision(result)
            ttl = _int(result, "TTL")
            if ttl <= 0:
                raise _LeaseGone()
            return ttl

        try:
            ttl, sent_at = await self._call_timed(
                "lease/keepalive", {"ID": str(lease_id)}, parse, first_line=True
            )
        except _LeaseGone:
            raise LeaseNotFound(
                f"etcd: lease {lease_id:x} not found (expired or revoked)"
            ) from None
        return Renewal(sent_at, ttl)

    async def lease_time_to_live(self, lease_id: int) -> int:
        """The lease's remaining ttl in seconds (as etcd counts it)."""

        def parse(reply: Any) -> int:
            _parse_header_revision(reply)
            ttl = _int(reply, "TTL")
            if ttl < 0:
                raise _LeaseGone()
            return ttl

        try:
            return await self._call("lease/timetolive", {"ID": str(lease_id)}, parse)
        except _LeaseGone:
            raise LeaseNotFound(
                f"etcd: lease {lease_id:x} not found (expired or revoked)"
            ) from None

    async def lease_revoke(self, lease_id: int) -> None:
        """Revoke the lease (deleting its keys). A lease already gone counts as revoked:
        a retried revoke finds its own earlier success."""
        try:
            await self._call("lease/revoke", {"ID": str(lease_id)}, _parse_header_revision)
        except LeaseNotFound:
            return

    # ----------------------------------------------------------------- watch

    def watch(
        self,
        key: Key,
        range_end: Key | None = None,
        *,
        start_revision: int | None = None,
        idle_check: float = 5.0,
    ) -> Watch:
        """Events on ``key`` (or the range) from ``start_revision`` (default: from now).
        A stream idle for ``idle_check`` seconds is checked with a linearizable read on
        its member; a broken stream or a silent member is left for the next endpoint,
        resuming after the last event delivered."""
        return Watch(self, _bytes(key), None if range_end is None else _bytes(range_end),
                     start_revision, idle_check)  # fmt: skip

    # ----------------------------------------------------------------- plumbing

    async def _call(
        self,
        path: str,
        body: dict[str, Any],
        parse: Callable[[Any], T],
        *,
        ambiguous_if: Callable[[T], bool] | None = None,
    ) -> T:
        result, _ = await self._call_timed(path, body, parse, ambiguous_if=ambiguous_if)
        return result

    async def _call_timed(
        self,
        path: str,
        body: dict[str, Any],
        parse: Callable[[Any], T],
        *,
        first_line: bool = False,
        ambiguous_if: Callable[[T], bool] | None = None,
    ) -> tuple[T, float]:
        """The parsed reply and when (``clock.now()``) its successful attempt was sent."""
        failures: list[str] = []
        reached = False
        n = len(self._endpoints)
        start = self._current
        for i in range(n):
            index = (start + i) % n
            endpoint = self._endpoints[index]
            sent_at = clock.now()
            try:
                async with asyncio.timeout(self._timeout):
                    reply = await self._authorized(endpoint, path, body, first_line)
                    result = parse(reply)
            except TimeoutError:
                failures.append(f"{endpoint}: no answer within {self._timeout:g}s")
                reached = True
            except _AttemptFailed as exc:
                failures.append(f"{endpoint}: {exc}")
                reached = reached or exc.reached
            except BadReply as exc:
                failures.append(f"{endpoint}: bad reply: {exc}")
                reached = True
            else:
                self._current = index
                if reached and ambiguous_if is not None and ambiguous_if(result):
                    failures.append(f"{endpoint}: compare failed after an earlier attempt")
                    raise StoreUnavailable(
                        f"etcd {path}: outcome unknown (an earlier attempt may have applied): "
                        + "; ".join(failures),
                        maybe_applied=True,
                    )
                return result, sent_at
            self._current = (index + 1) % n
        raise StoreUnavailable(
            f"etcd {path} unavailable: " + "; ".join(failures), maybe_applied=reached
        )

    async def _authorized(
        self, endpoint: yarl.URL, path: str, body: dict[str, Any], first_line: bool
    ) -> Any:
        if self._credentials is not None and self._token is None:
            await self._authenticate(endpoint)
        try:
            return await self._post(endpoint, path, body, first_line)
        except _AuthRejected as exc:
            if self._credentials is None:
                raise _AttemptFailed(
                    f"etcd requires authentication ({exc}): no username configured"
                ) from None
        await self._authenticate(endpoint)
        try:
            return await self._post(endpoint, path, body, first_line)
        except _AuthRejected as exc:
            raise _AttemptFailed(f"authentication refused after a new token: {exc}") from None

    async def _authenticate(self, endpoint: yarl.URL) -> None:
        assert self._credentials is not None
        name, password = self._credentials
        self._token = None
        try:
            reply = await self._post(
                endpoint, "auth/authenticate", {"name": name, "password": password}, False
            )
        except _AuthRejected as exc:
            raise _AttemptFailed(f"authentication failed: {exc}") from None
        try:
            token = _field(reply, "token", str)
        except BadReply as exc:
            raise _AttemptFailed(f"bad authenticate reply: {exc}") from None
        self._token = token

    async def _post(
        self, endpoint: yarl.URL, path: str, body: dict[str, Any], first_line: bool
    ) -> Any:
        headers = {"Content-Type": "application/json"}
        if self._token is not None:
            headers["Authorization"] = self._token
        url = endpoint / "v3" / path
        try:
            async with self._http().post(url, data=json.dumps(body), headers=headers) as resp:
                raw = await (_read_first_line(resp) if first_line else resp.read())
                status = resp.status
        except aiohttp.ClientConnectorError as exc:
            # Refused, unreachable, TLS handshake: the request never reached a server.
            raise _AttemptFailed(_one_line(exc), reached=False) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise _AttemptFailed(_one_line(exc) or type(exc).__name__) from None
        return _decode_reply(status, raw)


def _decode_reply(status: int, raw: bytes) -> Any:
    """The reply's JSON object, or the attempt's failure (server errors, junk)."""
    text = raw.decode("utf-8", errors="replace").strip()
    try:
        reply = json.loads(text) if text else None
    except (ValueError, RecursionError):  # junk, or nested deeper than the parser goes
        reply = None
    if not isinstance(reply, dict):
        what = f"HTTP {status}" if status != 200 else "not a JSON object"
        raise _AttemptFailed(f"{what}: {_one_line(text) or '(empty body)'}")
    error = reply.get("error")
    if error is not None or status != 200:
        message = _error_message(reply)
        code = reply.get("code")
        if isinstance(error, dict):
            code = error.get("grpc_code", code)
        lowered = message.lower()
        if code == 16 or any(words in lowered for words in _AUTH_AGAIN):
            raise _AuthRejected(message)
        if "requested lease not found" in lowered:
            raise LeaseNotFound(f"etcd: {message}")
        raise _AttemptFailed(f"HTTP {status}: {message}" if status != 200 else message)
    return reply


def _error_message(reply: dict[str, Any]) -> str:
    error = reply.get("error")
    if isinstance(error, dict):  # a stream's error: {"error": {"grpc_code", "message"}}
        error = error.get("message", error)
    message = reply.get("message") or error or reply
    return _one_line(str(message))


async def _read_first_line(resp: aiohttp.ClientResponse) -> bytes:
    """The first line of a streamed reply (a keepalive answers one message per line)."""
    buffer = b""
    while b"\n" not in buffer:
        chunk = await resp.content.readany()
        if not chunk:
            break
        buffer += chunk
        if len(buffer) > _MAX_LINE:
            raise _AttemptFailed("reply line too long")
    if resp.status == 200 and b"\n" not in buffer and not buffer.strip():
        raise _AttemptFailed("stream ended without a reply")
    return buffer.split(b"\n", 1)[0] if b"\n" in buffer else buffer


class _LeaseGone(Exception):
    pass


def _lease_not_found(lease_id: int) -> LeaseNotFound:
    return LeaseNotFound(f"etcd: lease {lease_id:x} not found (expired or revoked)")


# --------------------------------------------------------------------------- leases


@dataclass(frozen=True)
class Renewal:
    """One acknowledged renewal: when its request was sent (``clock.now()``) and the
    ttl etcd acknowledged."""

    sent_at: float
    ttl: int

    def deadline(self, margin: float = 0.0) -> float:
        return self.sent_at + self.ttl - margin


@dataclass
class Lease:
    """A granted lease and its renewals. ``deadline(margin)`` is the ``clock.now()`` time until
    which the lease is certainly alive (less ``margin``), as far as this process knows."""

    client: EtcdClient
    id: int
    ttl: int
    last: Renewal
    last_error: str | None = None
    renewals: int = field(default=0)

    def deadline(self, margin: float = 0.0) -> float:
        return self.last.deadline(margin)

    def remaining(self, margin: float = 0.0, now: float | None = None) -> float:
        return self.deadline(margin) - (clock.now() if now is None else now)

    async def renew(self) -> Renewal:
        """One keepalive. Raises ``StoreUnavailable`` (the deadline stays where it was) or
        ``LeaseNotFound``."""
        try:
            renewal = await self.client.lease_keepalive(self.id)
        except StoreUnavailable as exc:
            self.last_error = str(exc)
            raise
        # A later renewal can be acknowledged before an earlier one (a retry on another
        # member): the deadline never moves back.
        if renewal.deadline() > self.last.deadline():
            self.last = renewal
        self.last_error = None
        self.renewals += 1
        return renewal

    async def keep(self, interval: float) -> NoReturn:
        """Renew every ``interval`` seconds until cancelled. An unavailable store is
        retried at once (the deadline tells the holder how long it may still act);
        raises ``LeaseNotFound`` when etcd says the lease is gone."""
        while True:
            try:
                await self.renew()
            except StoreUnavailable:
                await asyncio.sleep(min(interval, 0.2))
                continue
            await asyncio.sleep(interval)

    async def revoke(self) -> None:
        await self.client.lease_revoke(self.id)


# --------------------------------------------------------------------------- watch


@dataclass(eq=False)
class Watch:
    """An async iterator of ``WatchEvent``. ``next_revision`` is where it resumes (the
    revision after the last event delivered, or after the store's revision when the
    watch was created). Raises ``StoreUnavailable`` when every endpoint failed in a row
    (a new ``watch(start_revision=w.next_revision)`` resumes later) and
    ``WatchCompacted`` when the revisions to resume from are gone."""

    _client: EtcdClient
    _key: bytes
    _range_end: bytes | None
    next_revision: int | None
    _idle_check: float
    reconnects: int = 0
    _events: AsyncGenerator[WatchEvent, None] | None = field(default=None, repr=False)

    def __aiter__(self) -> AsyncIterator[WatchEvent]:
        if self._events is None:
            self._events = self._run()
        return self._events

    async def aclose(self) -> None:
        """Close the stream now (breaking out of ``async for`` leaves it to the loop's
        garbage collection of async generators)."""
        if self._events is not None:
            await self._events.aclose()

    async def __aenter__(self) -> Watch:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def _run(self) -> AsyncGenerator[WatchEvent, None]:
        client = self._client
        failures: list[str] = []
        while True:
            n = len(client._endpoints)
            index = client._current
            endpoint = client._endpoints[index]
            delivered = False
            try:
                async with contextlib.aclosing(self._stream(endpoint)) as events:
                    async for event in events:
                        delivered = True
                        failures.clear()
                        yield event
                raise _AttemptFailed("stream ended")
            except _AttemptFailed as exc:
                reason = f"{endpoint}: {exc}"
            except BadReply as exc:
                reason = f"{endpoint}: bad reply: {exc}"
            except TimeoutError:
                reason = f"{endpoint}: no answer within {client._timeout:g}s"
            if delivered:
                failures.clear()
            failures.append(reason)
            client._current = (index + 1) % n
            self.reconnects += 1
            if len(failures) >= n:
                raise StoreUnavailable("etcd watch unavailable: " + "; ".join(failures))

    async def _stream(self, endpoint: yarl.URL) -> AsyncGenerator[WatchEvent, None]:
        client = self._client
        create: dict[str, Any] = _range_body(self._key, self._range_end)
        if self.next_revision is not None:
            create["start_revision"] = str(self.next_revision)
        body = json.dumps({"create_request": create})
        async with asyncio.timeout(client._timeout):
            resp = await self._open(endpoint, body)
        lines: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue()
        reader = asyncio.create_task(_read_lines(resp, lines))
        try:
            created = False
            async with asyncio.timeout(client._timeout):
                while not created:
                    created, _ = self._handle(await _next_line(lines), expect_created=True)
            while True:
                try:
                    item = await asyncio.wait_for(_next_line(lines), self._idle_check)
                except TimeoutError:
                    await self._check_member(endpoint)
                    continue
                _, events = self._handle(item, expect_created=False)
                for event in events:
                    self.next_revision = event.revision + 1
                    yield event
        finally:
            reader.cancel()
            resp.close()

    async def _open(self, endpoint: yarl.URL, body: str) -> aiohttp.ClientResponse:
        """The watch's streaming response (status 200), authenticating again once when
        the server refuses our token."""
        client = self._client
        for retry in (False, True):
            if client._credentials is not None and client._token is None:
                await client._authenticate(endpoint)
            headers = {"Content-Type": "application/json", **_REQUIRE_LEADER}
            if client._token is not None:
                headers["Authorization"] = client._token
            try:
                resp = await client._http().post(
                    endpoint / "v3" / "watch", data=body, headers=headers
                )
                if resp.status == 200:
                    return resp
                async with resp:
                    raw = await resp.read()
            except aiohttp.ClientConnectorError as exc:
                raise _AttemptFailed(_one_line(exc), reached=False) from None
            except (aiohttp.ClientError, OSError) as exc:
                raise _AttemptFailed(_one_line(exc) or type(exc).__name__) from None
            try:
                _decode_reply(resp.status, raw)
            except _AuthRejected as exc:
                if client._credentials is None or retry:
                    raise _AttemptFailed(f"token refused ({exc})") from None
                client._token = None
                continue
            raise _AttemptFailed(f"HTTP {resp.status}")
        raise AssertionError("unreachable")

    async def _check_member(self, endpoint: yarl.URL) -> None:
        """An idle stream: is its member still there and part of a quorum?"""
        client = self._client
        async with asyncio.timeout(client._timeout):
            reply = await client._authorized(
                endpoint, "kv/range", {**_range_body(self._key, None), "count_only": True}, False
            )
            _parse_header_revision(reply)

    def _handle(self, item: Any, *, expect_created: bool) -> tuple[bool, list[WatchEvent]]:
        if not isinstance(item, dict):
            raise BadReply("a watch message is not a JSON object")
        if "error" in item:
            raise _AttemptFailed(_error_message(item))
        result = _field(item, "result", dict)
        header = _field(result, "header", dict)
        if result.get("canceled"):
            compact = _int(result, "compact_revision")
            if compact > 0:
                raise WatchCompacted(
                    f"etcd watch from revision {self.next_revision} impossible: compacted "
                    f"up to {compact}",
                    compact,
                )
            reason = result.get("cancel_reason") or "watch canceled by the server"
            raise _AttemptFailed(_one_line(str(reason)))
        if result.get("created"):
            if self.next_revision is None:
                self.next_revision = _int(header, "revision") + 1
            return True, []
        if expect_created:
            raise BadReply("the watch's first message does not confirm its creation")
        events = [_parse_event(e) for e in _list(result, "events")]
        if not events and "revision" in header and self.next_revision is not None:
            # A progress notification: everything up to this revision was sent.
            self.next_revision = max(self.next_revision, _int(header, "revision") + 1)
        return False, events


async def _read_lines(
    resp: aiohttp.ClientResponse, out: asyncio.Queue[bytes | BaseException | None]
) -> None:
    """Split the stream into lines into ``out`` (the reader owns the socket; the
    consumer's waits are cancelled safely on the queue, never mid-read); ``None`` at the
    end, an exception when reading failed."""
    buffer = b""
    try:
        while True:
            chunk = await resp.content.readany()
            if not chunk:
                break
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if line.strip():
                    out.put_nowait(line)
            if len(buffer) > _MAX_LINE:
                raise BadReply("watch line too long")
        if buffer.strip():
            out.put_nowait(buffer)
        out.put_nowait(None)
    except asyncio.CancelledError:
        raise
    except BaseException as exc:
        out.put_nowait(exc)


async def _next_line(lines: asyncio.Queue[bytes | BaseException | None]) -> Any:
    item = await lines.get()
    if item is None:
        raise _AttemptFailed("watch stream ended")
    if isinstance(item, BadReply):
        raise item
    if isinstance(item, BaseException):
        raise _AttemptFailed(_one_line(item) or type(item).__name__)
    try:
        return json.loads(item)
    except (ValueError, RecursionError):
        raise BadReply(
            f"watch message not JSON: {_one_line(item.decode(errors='replace'))}"
        ) from None


# --------------------------------------------------------------------------- parsing


def _parse_header_revision(reply: Any) -> int:
    if not isinstance(reply, dict):
        raise BadReply("not a JSON object")
    header = _field(reply, "header", dict)
    revision = _int(header, "revision")
    if revision <= 0:
        raise BadReply("header without a revision")
    return revision


def _parse_range_reply(reply: Any) -> RangeResult:
    revision = _parse_header_revision(reply)
    return _parse_range(reply, revision)


def _parse_range(body: dict[str, Any], revision: int) -> RangeResult:
    kvs = tuple(_parse_kv(kv) for kv in _list(body, "kvs"))
    return RangeResult(revision=revision, kvs=kvs, count=_int(body, "count"))


def _parse_kv(kv: Any) -> KeyValue:
    if not isinstance(kv, dict):
        raise BadReply("a key-value is not an object")
    return KeyValue(
        key=_b64field(kv, "key", required=True),
        value=_b64field(kv, "value"),
        create_revision=_int(kv, "create_revision"),
        mod_revision=_int(kv, "mod_revision"),
        version=_int(kv, "version"),
        lease=_int(kv, "lease"),
    )


def _parse_event(event: Any) -> WatchEvent:
    if not isinstance(event, dict):
        raise BadReply("a watch event is not an object")
    kind = event.get("type", "PUT")
    if kind not in ("PUT", "DELETE"):
        raise BadReply(f"unknown watch event type {_one_line(repr(kind))}")
    kv = _parse_kv(_field(event, "kv", dict))
    if kv.mod_revision <= 0:
        raise BadReply("a watch event without a revision")
    return WatchEvent("put" if kind == "PUT" else "delete", kv)


def _parse_txn_reply(reply: Any, success: tuple[Op, ...], failure: tuple[Op, ...]) -> TxnResult:
    revision = _parse_header_revision(reply)
    succeeded = reply.get("succeeded", False)  # proto3 JSON leaves a false out
    if not isinstance(succeeded, bool):
        raise BadReply("succeeded is not a boolean")
    ops = success if succeeded else failure
    responses = _list(reply, "responses")
    # A compare failure is believed only from a reply that carries the failure branch's
    # responses, one of the right kind per op: a truncated or foreign reply that merely
    # lacks "succeeded" is junk, not "lost".
    if len(responses) != len(ops):
        raise BadReply(
            f"{len(responses)} responses for {len(ops)} ops in the "
            f"{'success' if succeeded else 'failure'} branch"
        )
    results: list[OpResult] = []
    for op, response in zip(ops, responses, strict=True):
        name = _RESPONSE_OF[type(op)]
        if not isinstance(response, dict) or set(response) != {name}:
            raise BadReply(f"expected {name} in the txn responses")
        body = _field(response, name, dict)
        if isinstance(op, Get):
            results.append(_parse_range(body, revision))
        elif isinstance(op, Put):
            results.append(Written("put"))
        else:
            results.append(Written("delete", _int(body, "deleted")))
    return TxnResult(succeeded=succeeded, revision=revision, responses=tuple(results))


def _field(obj: Any, name: str, kind: type[T]) -> T:
    if not isinstance(obj, dict):
        raise BadReply(f"expected an object holding {name!r}")
    value = obj.get(name)
    if not isinstance(value, kind):
        if value is None:
            raise BadReply(f"missing {name!r}")
        raise BadReply(f"{name!r} is a {type(value).__name__}, not a {kind.__name__}")
    return value


def _list(obj: dict[str, Any], name: str) -> list[Any]:
    value = obj.get(name, [])
    if not isinstance(value, list):
        raise BadReply(f"{name!r} is a {type(value).__name__}, not a list")
    return value


def _int(obj: dict[str, Any], name: str) -> int:
    """An int64 field: the gateway writes them as strings and leaves zeros out."""
    value = obj.get(name, 0)
    if isinstance(value, bool):
        raise BadReply(f"{name!r} is a boolean, not a number")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    raise BadReply(f"{name!r} is not an integer: {_one_line(repr(value))}")


def _b64field(obj: dict[str, Any], name: str, *, required: bool = False) -> bytes:
    value = obj.get(name)
    if value is None:
        if required:
            raise BadReply(f"missing {name!r}")
        return b""
    if not isinstance(value, str):
        raise BadReply(f"{name!r} is a {type(value).__name__}, not base64 text")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadReply(f"{name!r} is not base64") from None


def _bytes(key: Key) -> bytes:
    return key.encode() if isinstance(key, str) else key


def _b64(raw: Key) -> str:
    return base64.b64encode(_bytes(raw)).decode("ascii")


def _range_body(key: Key, range_end: Key | None) -> dict[str, Any]:
    body = {"key": _b64(key)}
    if range_end is not None:
        body["range_end"] = _b64(range_end)
    return body


def _one_line(value: object) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= _REASON_CHARS else text[: _REASON_CHARS - 1] + "…"


def _endpoint(raw: str) -> yarl.URL:
    try:
        url = yarl.URL(raw)
    except (ValueError, TypeError):
        raise EtcdConfigError(f"etcd endpoint {raw!r}: not a URL") from None
    if url.scheme not in ("http", "https") or not url.host or url.path not in ("", "/"):
        raise EtcdConfigError(
            f"etcd endpoint {raw!r}: expected http(s)://host:port, e.g. https://10.0.0.1:2379"
        )
    if url.query_string or url.fragment or url.user:
        raise EtcdConfigError(f"etcd endpoint {raw!r}: no query, fragment or user info")
    return url.with_path("")


def _ssl_context(tls: TlsFiles) -> ssl.SSLContext:
    if (tls.cert_file is None) != (tls.key_file is None):
        raise EtcdConfigError("etcd tls: cert_file and key_file go together")
    try:
        context = ssl.create_default_context(cafile=tls.ca_file)
        if tls.cert_file is not None and tls.key_file is not None:
            context.load_cert_chain(tls.cert_file, tls.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise EtcdConfigError(f"etcd tls: {_one_line(exc)}") from None
    return context


def endpoints_of(values: Iterable[str]) -> tuple[str, ...]:
    """The endpoints in their normal form; ``EtcdConfigError`` names the first bad one."""
    return tuple(str(_endpoint(v)) for v in values)
