"""The guard's keys in etcd, and the leader's side of the guard protocol.

A guard (``watchdogd guard``, ``watchdogd/guard.py``) runs beside the primary and fences
its database on a valid order or when it has been cut off from everything. The keys live
beside the leader key, under ``<prefix>/<cluster>/`` (the ``prefix`` every function here
takes is that, as for ``EtcdStore``):

- ``guard/alive``: on the guard's own lease, JSON ``{node, pid, at, self_fenced}``. It
  exists while the guard renews its lease; etcd deletes it ttl after the last renewal.
- ``guard/order``: written by the fleet leader (``order_fence``) in one transaction
  guarded by the leader key's ``create_revision`` (the token), JSON ``{token, holder,
  failover_id, action: "fence"}``. Its ``mod_revision`` names the order.
- ``guard/ack``: written by the guard after fencing, JSON ``{order_revision, token,
  fenced, down, detail}`` (``down``: the database does not run; the guard fences it the
  moment it answers). Not on a lease: it outlives a guard that dies right after.

The rules are pure (no I/O, no clock reads) so they are tested with injected clocks:
``order_verdict`` (is an order valid for the guard to execute) and ``ClearanceRule`` (may
the leader promote). ``read_snapshot`` reads the leader key and every guard key in one
linearizable transaction, so a verdict never mixes two moments of the store.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from watchdogd.state.etcd import (
    Compare,
    CompareFailed,
    EtcdClient,
    Get,
    KeyValue,
    Put,
    RangeResult,
    prefix_end,
)
from watchdogd.state.store import StoreUnavailable, Token, TokenLost

FENCE = "fence"
# Orders and acks are a few hundred bytes; anything far larger is not ours.
_MAX_VALUE = 64 * 1024
_DETAIL_CHARS = 300


@dataclass(frozen=True)
class GuardKeys:
    """The keys under ``prefix`` (``<store prefix>/<cluster>``)."""

    prefix: str

    @classmethod
    def under(cls, prefix: str) -> GuardKeys:
        return cls(prefix.rstrip("/"))

    @property
    def leader(self) -> bytes:
        return f"{self.prefix}/leader".encode()

    @property
    def directory(self) -> bytes:
        return f"{self.prefix}/guard/".encode()

    @property
    def alive(self) -> bytes:
        return self.directory + b"alive"

    @property
    def order(self) -> bytes:
        return self.directory + b"order"

    @property
    def ack(self) -> bytes:
        return self.directory + b"ack"

    @property
    def settings(self) -> bytes:
        return self.directory + b"settings"


# --------------------------------------------------------------------------- values


def _object(raw: bytes, what: str) -> dict[str, Any]:
    if len(raw) > _MAX_VALUE:
        raise ValueError(f"{what}: {len(raw)} bytes, more than a guard key ever holds")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ValueError(f"{what}: not JSON") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what}: not a JSON object")
    return data


def _get(data: Mapping[str, Any], what: str, name: str, kind: type) -> Any:
    value = data.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{what}: {name!r} missing or not a {kind.__name__}")
    return value


@dataclass(frozen=True)
class Order:
    """A fence order. ``revision`` is the order key's ``mod_revision`` (0 before it is
    written): the ack names it."""

    token: int
    holder: str
    failover_id: str
    action: str = FENCE
    revision: int = 0
    node: str | None = None  # the node to fence; None: whichever node the guard guards

    def encode(self) -> bytes:
        data: dict[str, Any] = {
            "token": self.token,
            "holder": self.holder,
            "failover_id": self.failover_id,
            "action": self.action,
        }
        if self.node is not None:
            data["node"] = self.node
        return json.dumps(data, sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes, revision: int) -> Order:
        data = _object(raw, "guard order")
        node = data.get("node")
        if node is not None and not isinstance(node, str):
            raise ValueError("guard order: 'node' is not a str")
        return cls(
            token=_get(data, "guard order", "token", int),
            holder=_get(data, "guard order", "holder", str),
            failover_id=_get(data, "guard order", "failover_id", str),
            action=_get(data, "guard order", "action", str),
            revision=revision,
            node=node,
        )


@dataclass(frozen=True)
class Ack:
    """The guard's answer to one order. ``fenced``: the database now refuses writes.
    ``down`` (with ``fenced`` false): the database does not run (its address refuses
    connections, no live server holds its data directory); the guard fences it the
    moment it answers again, before anything else, and re-acknowledges ``fenced``."""

    order_revision: int
    token: int
    fenced: bool
    detail: str
    down: bool = False

    def encode(self) -> bytes:
        return json.dumps(
            {
                "order_revision": self.order_revision,
                "token": self.token,
                "fenced": self.fenced,
                "down": self.down,
                "detail": self.detail[:_DETAIL_CHARS],
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Ack:
        data = _object(raw, "guard ack")
        down = data.get("down", False)
        if not isinstance(down, bool):
            raise ValueError("guard ack: 'down' is not a bool")
        return cls(
            order_revision=_get(data, "guard ack", "order_revision", int),
            token=_get(data, "guard ack", "token", int),
            fenced=_get(data, "guard ack", "fenced", bool),
            detail=str(data.get("detail", ""))[:_DETAIL_CHARS],
            down=down,
        )

    @property
    def promised(self) -> bool:
        """The guard answered "down": it owes a fence the moment the database answers."""
        return self.down and not self.fenced


@dataclass(frozen=True)
class Alive:
    node: str
    pid: int
    at: float  # wall clock, for humans only: nothing decides on it
    self_fenced: bool = False

    def encode(self) -> bytes:
        return json.dumps(
            {"node": self.node, "pid": self.pid, "at": self.at, "self_fenced": self.self_fenced},
            sort_keys=True,
        ).encode()


@dataclass(frozen=True)
class Published:
    """What the guard runs with, written at its start on no lease (it outlives the guard):
    a leader whose own ``guard.isolation_timeout`` is shorter than the guard's would
    otherwise count the guard's silence as a fence too early."""

    node: str
    isolation_timeout: float
    vouching: bool = False  # it counts the watchers vouching as a sign of life
    watchers: tuple[str, ...] = ()  # the watchers it asks
    needed: int = 0  # how many of them vouching it counts as a sign of life

    def encode(self) -> bytes:
        data: dict[str, Any] = {"node": self.node, "isolation_timeout": self.isolation_timeout}
        if self.vouching:
            data.update(vouching=True, watchers=list(self.watchers), needed=self.needed)
        return json.dumps(data, sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Published:
        data = _object(raw, "guard settings")
        timeout = data.get("isolation_timeout")
        if (
            not isinstance(timeout, int | float)
            or isinstance(timeout, bool)
            or not 0 < timeout < 10**6
        ):
            raise ValueError("guard settings: 'isolation_timeout' missing or not a duration")
        vouching = data.get("vouching", False)
        if not isinstance(vouching, bool):
            raise ValueError("guard settings: 'vouching' is not a bool")
        watchers: tuple[str, ...] = ()
        needed = 0
        if vouching:
            names = data.get("watchers")
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError("guard settings: 'watchers' is not a list of names")
            if len(set(names)) != len(names):
                raise ValueError("guard settings: 'watchers' names one twice")
            needed = _get(data, "guard settings", "needed", int)
            if not 1 <= needed <= len(names):
                raise ValueError(f"guard settings: 'needed' {needed} is not 1..{len(names)}")
            watchers = tuple(names)
        return cls(
            node=_get(data, "guard settings", "node", str),
            isolation_timeout=timeout,
            vouching=vouching,
            watchers=watchers,
            needed=needed,
        )


@dataclass(frozen=True)
class GuardSnapshot:
    """The leader key and the guard's keys at one store revision (a linearizable read)."""

    revision: int
    leader_token: int | None  # the leader key's create_revision; None: no leader key
    leader_holder: str | None
    order: Order | None
    ack: Ack | None
    alive: bool
    problems: tuple[str, ...] = ()  # keys that did not decode (treated as absent)
    published: Published | None = None  # the guard's own settings, if it wrote them


def snapshot_of(revision: int, leader: KeyValue | None, guard: tuple[KeyValue, ...],
                keys: GuardKeys) -> GuardSnapshot:  # fmt: skip
    """Decode one read; a key that does not decode counts as absent, with a problem."""
    problems: list[str] = []
    order: Order | None = None
    ack: Ack | None = None
    alive = False
    published: Published | None = None
    for kv in guard:
        try:
            if kv.key == keys.settings:
                published = Published.decode(kv.value)
            elif kv.key == keys.order:
                order = Order.decode(kv.value, kv.mod_revision)
            elif kv.key == keys.ack:
                ack = Ack.decode(kv.value)
            elif kv.key == keys.alive:
                alive = True  # its existence is what counts, whatever it holds
        except ValueError as exc:
            problems.append(str(exc))
    return GuardSnapshot(
        revision=revision,
        leader_token=None if leader is None else leader.create_revision,
        leader_holder=None if leader is None else leader.value.decode("utf-8", "replace"),
        order=order,
        ack=ack,
        alive=alive,
        problems=tuple(problems),
        published=published,
    )


async def read_snapshot(client: EtcdClient, prefix: str) -> GuardSnapshot:
    """One linearizable transaction reading the leader key and every guard key.
    ``StoreUnavailable`` when the store gives no answer."""
    keys = GuardKeys.under(prefix)
    result = await client.txn(
        [], [Get(keys.leader), Get(keys.directory, prefix_end(keys.directory))], []
    )
    leader, guard = result.responses
    assert isinstance(leader, RangeResult) and isinstance(guard, RangeResult)
    return snapshot_of(result.revision, leader.kvs[0] if leader.kvs else None, guard.kvs, keys)


# --------------------------------------------------------------------------- the guard's rule

GUARD_POLL_DEFAULT = 0.5  # the guard's poll (guard.poll)
GUARD_DB_TIMEOUT = 1.0  # each read of its database
# An idle PostgreSQL standby replies every wal_receiver_status_interval: 10 s unless set.
DEFAULT_REPLY_INTERVAL = 10.0


def reply_window(interval: float, poll: float) -> float:
    """How long after the standby's last reply the guard still counts it as alive: its
    reply ``interval`` plus two polls and four reads (watchdogd.guard standby_window)."""
    return interval + 2 * poll + 4 * GUARD_DB_TIMEOUT


# The window beside an idle standby on stock settings with the default poll (15 s): the
# least a leader's guard_fence step covers, however short the isolation_timeout.
STOCK_REPLY_WINDOW = reply_window(DEFAULT_REPLY_INTERVAL, GUARD_POLL_DEFAULT)


def order_verdict(snapshot: GuardSnapshot, node: str | None = None) -> tuple[Order | None, str]:
    """The order the guard must carry out now, or None and why not.

    Valid only when the leader key exists and its ``create_revision`` equals the order's
    token, in the same linearizable read: an order from a leader that has since lost its
    key (a stale token) is never executed. An order already acknowledged as fenced is
    not executed again (a human may have lifted the fence since). An order naming
    another node than this guard's ``node`` is not for it."""
    order = snapshot.order
    if order is None:
        return None, "no order"
    if order.action != FENCE:
        return None, f"order {order.revision}: unknown action {order.action!r}"
    if order.node is not None and node is not None and order.node != node:
        return None, f"order {order.revision} is for node {order.node!r}, this guard's is {node!r}"
    ack = snapshot.ack
    if ack is not None and ack.order_revision == order.revision and ack.token == order.token:
        if ack.promised:
            # The leader may have failed over on this "down" answer: the promise to
            # fence the database when it answers holds whoever leads now.
            return order, f"order {order.revision}: answered down, fence when it answers"
    if snapshot.leader_token is None:
        return None, f"order {order.revision} (token {order.token}) is stale: no leader key"
    if snapshot.leader_token != order.token:
        return None, (
            f"order {order.revision} (token {order.token}) is stale: the leader key has "
            f"token {snapshot.leader_token}"
        )
    if ack is not None and ack.order_revision == order.revision and ack.fenced:
        return None, f"order {order.revision} already acknowledged as fenced"
    return order, f"order {order.revision} from {order.holder} (token {order.token}) is valid"


# --------------------------------------------------------------------------- the leader's rule


# (watchers asked, how many needed) -> the latest time that many may have vouched, or
# None and why that cannot be told (``Fleet.vouch_end``).
Vouches = Callable[[tuple[str, ...], int], tuple[float | None, str]]


@dataclass(frozen=True)
class Clearance:
    """May the leader promote? ``via``: "ack" (the guard fenced on our order), "down"
    (the guard found the database not running and fences it when it answers) or
    "expired" (its key absent long enough); None when not cleared."""

    cleared: bool
    reason: str
    via: Literal["ack", "down", "expired"] | None = None


class ClearanceRule:
    """The leader's rule, fed with successive linearizable reads and its own monotonic
    clock (``now``, taken after each read returned).

    Cleared when the guard acknowledged OUR order (the order key holds our token and
    failover id, the ack names that order's revision) with ``fenced`` true, or with
    ``down`` true (the database does not run: a refused connection, no live server; the
    guard fences it before anything else when it answers; a HUNG database is never
    "down": it may wake up writable, so it waits for the fence or the rule below); or when the
    ``guard/alive`` key was absent in consecutive reads for at least
    ``isolation_timeout``, counted from the first read that saw it absent. Any read that
    failed or saw the key resets that count. Never otherwise.

    ``quiet_since`` (optional): when the leader saw the standby stop streaming from the
    old primary (e.g. after ``stop_replication``). A standby streaming from it is a sign
    of life that keeps the guard from fencing itself, so the expired path also needs
    ``now - quiet_since >= isolation_timeout + margin`` (``margin``: the guard's time to
    notice and fence; the store ttl is a safe value).

    ``vouching`` (or a guard that published it counts vouches): ``vouches_needed`` of
    the watchers ``vouchers`` vouching for the primary is a sign of life too, so the
    expired path also needs the latest time that many may have vouched (``observe``'s
    ``vouches``, from ``fleet.vouch_end``) to lie ``isolation_timeout + margin`` in the
    past. The guard's own list and count, once it published them, take the place of
    ours (a guard run with another config file asks whom it asks).
    """

    def __init__(
        self,
        token: Token,
        failover_id: str,
        isolation_timeout: float,
        *,
        quiet_since: float | None = None,
        margin: float = 0.0,
        vouching: bool = False,
        ordered_at: float | None = None,
        vouchers: tuple[str, ...] = (),
        vouches_needed: int = 0,
    ) -> None:
        self.token = token
        self.failover_id = failover_id
        self.isolation_timeout = isolation_timeout
        self.quiet_since = quiet_since
        self.margin = margin
        self.vouching = vouching
        self.vouchers, self.vouches_needed = vouchers, vouches_needed
        # When the order was written (a failover was journaled before it): the watchers'
        # views that bound their vouching must be read after it.
        self.ordered_at = ordered_at if ordered_at is not None else (quiet_since or 0.0)
        self.absent_since: float | None = None
        self.guard_isolation: float | None = None  # the guard's own, as it published it

    def observe(
        self,
        snapshot: GuardSnapshot | None,
        now: float,
        why: str = "",
        *,
        vouches: Vouches | None = None,
    ) -> Clearance:
        """``snapshot`` None: the read failed (``why`` says how). ``vouches(asked,
        needed)``: the latest time ``needed`` of the watchers ``asked`` may have vouched
        for the primary, or None and why that cannot be told (asked on the expired path
        when the guard counts them)."""
        if snapshot is None:
            self.absent_since = None
            return Clearance(False, f"store unavailable: {why}" if why else "store unavailable")
        if snapshot.leader_token != self.token.revision:
            self.absent_since = None
            return Clearance(False, f"leadership with token {self.token.revision} is lost")
        order, ack = snapshot.order, snapshot.ack
        ours = (
            order is not None
            and order.token == self.token.revision
            and order.failover_id == self.failover_id
        )
        refused = ""
        if ours and ack is not None and order is not None and ack.order_revision == order.revision:
            if ack.fenced and ack.token == self.token.revision:
                return Clearance(True, f"the guard fenced the primary: {ack.detail}", "ack")
            if ack.down and ack.token == self.token.revision:
                return Clearance(
                    True,
                    f"the guard found the primary's database down and fences it the moment "
                    f"it answers: {ack.detail}",
                    "down",
                )
            refused = f"; the guard could not fence: {ack.detail}"
        if snapshot.alive:
            self.absent_since = None
            waiting = "no ack of our order yet" if ours else "no order of ours"
            return Clearance(False, f"the guard is alive, {waiting}{refused}")
        if self.absent_since is None:
            self.absent_since = now
        absent = now - self.absent_since
        # The guard fences by ITS isolation timeout: a longer one than ours (a guard run
        # with another config) is waited out too.
        if snapshot.published is not None:
            self.guard_isolation = max(
                self.guard_isolation or 0.0, snapshot.published.isolation_timeout
            )
        isolation = max(self.isolation_timeout, self.guard_isolation or 0.0)
        if absent < isolation:
            return Clearance(
                False,
                f"the guard's key absent for {absent:.1f}s of isolation_timeout "
                f"{isolation:g}s{refused}",
            )
        if self.quiet_since is not None:
            quiet = now - self.quiet_since
            if quiet < isolation + self.margin:
                return Clearance(
                    False,
                    f"the standby stopped streaming {quiet:.1f}s ago, less than "
                    f"{isolation + self.margin:g}s",
                )
        published = snapshot.published
        if published is not None and published.vouching:
            self.vouching = True
            self.vouchers, self.vouches_needed = published.watchers, published.needed
        if self.vouching:
            end, unknown = (
                vouches(self.vouchers, self.vouches_needed)
                if vouches is not None
                else (None, "not counted")
            )
            if end is None:
                return Clearance(
                    False, f"the watchers may still vouch for the primary to its guard: {unknown}"
                )
            if now - end < isolation + self.margin:
                return Clearance(
                    False,
                    f"{self.vouches_needed} watchers may have vouched for the primary "
                    f"{now - end:.1f}s ago, less than {isolation + self.margin:g}s",
                )
        return Clearance(
            True,
            f"the guard's key absent for {absent:.1f}s (isolation_timeout "
            f"{isolation:g}s): an isolated guard has fenced by now",
            "expired",
        )


# --------------------------------------------------------------------------- leader I/O


async def order_fence(
    client: EtcdClient, prefix: str, token: Token, failover_id: str, *, node: str | None = None
) -> int:
    """Write the fence order, guarded by the leader key's create_revision; returns the
    order's revision. ``TokenLost`` when the compare failed (no longer the leader),
    ``StoreUnavailable`` when the store gave no answer (perhaps written: ask again).
    ``node``: the node to fence (the old primary); a guard of another node ignores it."""
    keys = GuardKeys.under(prefix)
    order = Order(token.revision, token.holder, failover_id, node=node)
    try:
        result = await client.txn(
            [Compare(keys.leader, "create", "=", token.revision)],
            [Put(keys.order, order.encode())],
            [Get(keys.leader)],
        )
    except CompareFailed as failed:
        leader = failed.result.responses[0] if failed.result.responses else None
        now = (
            leader.kvs[0].create_revision
            if isinstance(leader, RangeResult) and leader.kvs
            else None
        )
        held = "no leader key" if now is None else f"the leader key has token {now}"
        raise TokenLost(
            f"guard order refused: leadership with token {token.revision} lost ({held})"
        ) from None
    return result.revision


async def guard_clearance(
    client: EtcdClient,
    prefix: str,
    token: Token,
    failover_id: str,
    isolation_timeout: float,
    clock: Callable[[], float],
    wait: float,
    *,
    poll: float = 0.25,
    quiet_since: float | None = None,
    margin: float = 0.0,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    rule: ClearanceRule | None = None,
    vouches: Vouches | None = None,
) -> Clearance:
    """Poll (linearizable reads, every ``poll`` seconds, ``poll`` well below the store
    ttl) until ``ClearanceRule`` clears or ``wait`` seconds of ``clock`` (the leader's
    monotonic clock) have passed; then the last verdict, not cleared. ``rule``: one
    kept across calls (a step's attempts), so the guard's silence counts on.
    ``vouches``: asked after each read, see ``ClearanceRule.observe``."""
    if rule is None:
        rule = ClearanceRule(
            token, failover_id, isolation_timeout, quiet_since=quiet_since, margin=margin
        )
    end = clock() + wait
    while True:
        try:
            snapshot: GuardSnapshot | None = await read_snapshot(client, prefix)
            why = ""
        except StoreUnavailable as exc:
            snapshot, why = None, str(exc)
        now = clock()  # after the read: an absence is counted from its latest possible start
        verdict = rule.observe(snapshot, now, why, vouches=vouches)
        if verdict.cleared or now + poll > end:
            return verdict
        await sleep(poll)
