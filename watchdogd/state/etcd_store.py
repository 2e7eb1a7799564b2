"""The store seam on etcd: a journal and a leader key under one prefix.

Keys under ``prefix`` (e.g. ``/watchdogd/<cluster>``):

- ``<prefix>/leader``: the holder's name, on the holder's lease. Created only if absent
  (``create_revision == 0``); its ``create_revision`` is the fencing ``Token``.
- ``<prefix>/journal/<seq, 16 digits>``: one record each, in the local journal's own
  checksummed line format (``encode_line``/``decode_line``). Written once, never
  changed; a record's position is its etcd revision. Other keys under the prefix are
  not records and are skipped; a record that does not decode is ``JournalDamaged``.

``append`` is one transaction: the leader key still has the token's create_revision AND
the record's key does not exist yet, then put the record. When the compare fails, the
failure branch's reads tell why: the leader key gone or re-created is ``TokenLost``; the
record's key already holding this very record is our own earlier attempt whose reply was
lost (success, same position); anything else is ``StoreUnavailable``. After an
ambiguous append (``maybe_applied``), and after winning a campaign (another leader may
have written since this watcher last read), the next append re-reads where the journal
ends.

A campaign whose reply was lost (``maybe_applied``) is settled by the next campaign: a
linearizable read shows whether the leader key sits on that campaign's lease; an adopted
leadership's deadline counts from that lease's grant, before the lost reply. A campaign
whose lease ran out before its transaction (a watcher frozen in between) is
``StoreUnavailable``: nothing of it stands, and nobody else is known to lead.

``renew`` keeps the lease alive and returns the holder's deadline (monotonic: the send
time of the last acknowledged renewal plus its ttl). A lease that etcd says is gone is
``TokenLost`` only once a linearizable read confirms the leader key is no longer ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Mapping
from typing import Any

from watchdogd.state.etcd import (
    Compare,
    CompareFailed,
    Delete,
    EtcdClient,
    Get,
    KeyValue,
    Lease,
    LeaseNotFound,
    Put,
    RangeResult,
    prefix_end,
)
from watchdogd.state.journal import Damaged, JournalDamaged, decode_line, encode_line
from watchdogd.state.store import Entry, StoreUnavailable, Token, TokenLost


class EtcdStore:
    """``RecordStore`` and ``Leadership`` on etcd for one watcher (one holder at a time).
    Appends are made one after another under a lock: two at once would race for the
    same sequence number. A read of the journal beside an append does not wait for it
    (each call stays within its own retry budget) and does not move where the next
    append goes."""

    def __init__(self, client: EtcdClient, prefix: str) -> None:
        prefix = prefix.rstrip("/")
        self.client = client
        self.leader_key = f"{prefix}/leader".encode()
        self.journal_prefix = f"{prefix}/journal/".encode()
        self.lease: Lease | None = None
        self._token: Token | None = None
        self._next_seq: int | None = None
        self._pending: tuple[str, Lease] | None = None  # a campaign whose answer was lost
        self._journal_lock = asyncio.Lock()  # one append at a time
        self._appends = 0  # appends begun: a read that overlapped one leaves _next_seq be

    # ----------------------------------------------------------------- leadership

    async def campaign(self, holder: str, ttl: float) -> Token | None:
        """Become leader if nobody is: the leader key on a new lease of ``ttl``. A
        campaign whose answer was lost is settled by the next one, which reads whether
        the key is on that campaign's lease (then it is ours) before trying afresh."""
        if self._pending is not None:
            adopted = await self._settle_pending(holder)
            if adopted is not None:
                return adopted
        lease = await self.client.lease_grant(max(1, math.ceil(ttl)))
        try:
            won = await self.client.txn(
                [Compare(self.leader_key, "create", "=", 0)],
                [Put(self.leader_key, holder.encode(), lease=lease.id)],
            )
        except CompareFailed:
            await self._drop(lease)
            return None
        except LeaseNotFound:
            # The lease ran out before the txn (this watcher was frozen or slow): no key
            # can stand on it. Failed, not lost, and nobody else is known to lead.
            raise StoreUnavailable(
                f"etcd: campaign's lease {lease.id:x} expired before its transaction"
            ) from None
        except StoreUnavailable as exc:
            if exc.maybe_applied:
                self._pending = (holder, lease)  # perhaps we won: the next campaign reads
            else:
                await self._drop(lease)
            raise
        self.lease, self._token = lease, Token(holder, won.revision)
        self._next_seq = None  # records may have come since this watcher last read
        return self._token

    @property
    def pending_campaign(self) -> bool:
        """A campaign's reply was lost: the leader key may be this watcher's (the next
        ``campaign`` settles it)."""
        return self._pending is not None

    async def _settle_pending(self, holder: str) -> Token | None:
        assert self._pending is not None
        pending_holder, lease = self._pending
        kv = await self.client.get(self.leader_key)  # unavailable: still pending
        self._pending = None
        if kv is not None and kv.lease == lease.id and pending_holder == holder:
            # Ours; its deadline still counts from the grant (the lease's first renewal).
            self.lease, self._token = lease, Token(holder, kv.create_revision)
            self._next_seq = None
            return self._token
        await self._drop(lease)
        return None

    async def renew(self, token: Token) -> float:
        """One keepalive; returns the monotonic deadline of the leadership."""
        lease = self._lease_of(token)
        try:
            await lease.renew()
        except LeaseNotFound:
            await self._confirm_lost(token, "its lease is gone")
            raise StoreUnavailable(
                f"etcd: lease {lease.id:x} not found, yet the leader key still has token "
                f"{token.revision}"
            ) from None
        return lease.deadline()

    async def resign(self, token: Token) -> None:
        """Delete the leader key if it is still ours, and end the lease."""
        lease = self._lease_of(token)
        with contextlib.suppress(CompareFailed):
            await self.client.txn(
                [Compare(self.leader_key, "create", "=", token.revision)],
                [Delete(self.leader_key)],
            )
        await self.client.lease_revoke(lease.id)
        self.lease = self._token = None

    async def leader(self) -> Token | None:
        kv = await self.client.get(self.leader_key)
        return None if kv is None else Token(_text(kv.value), kv.create_revision)

    # ----------------------------------------------------------------- records

    async def append(self, token: Token, record: Mapping[str, Any]) -> int:
        line = encode_line(dict(record))
        async with self._journal_lock:
            return await self._append(token, line)

    async def _append(self, token: Token, line: bytes) -> int:
        self._appends += 1
        if self._next_seq is None:
            await self._entries()  # finds where the journal ends
        seq = self._next_seq
        assert seq is not None
        key = self.journal_prefix + f"{seq:016d}".encode()
        try:
            done = await self.client.txn(
                [
                    Compare(self.leader_key, "create", "=", token.revision),
                    Compare(key, "create", "=", 0),
                ],
                [Put(key, line)],
                [Get(self.leader_key), Get(key)],
            )
        except CompareFailed as failed:
            return self._after_compare_failed(token, key, line, failed)
        except StoreUnavailable as exc:
            if exc.maybe_applied:
                self._next_seq = None  # re-read where the journal ends
            raise
        if self._next_seq == seq:  # None: something asked for a re-read meanwhile
            self._next_seq = seq + 1
        return done.revision

    def _after_compare_failed(
        self, token: Token, key: bytes, line: bytes, failed: CompareFailed
    ) -> int:
        leader, existing = (r for r in failed.result.responses if isinstance(r, RangeResult))
        if not leader.kvs or leader.kvs[0].create_revision != token.revision:
            raise TokenLost(_lost(token, leader.kvs[0] if leader.kvs else None)) from None
        self._next_seq = None
        if existing.kvs and existing.kvs[0].value == line:
            return existing.kvs[0].mod_revision  # our own earlier append; its reply was lost
        raise StoreUnavailable(
            f"etcd: journal key {_text(key)} already holds another record; re-reading the journal"
        ) from None

    async def entries(self, after: int = 0) -> list[Entry]:
        return await self._entries(after, appending=False)

    async def _entries(self, after: int = 0, *, appending: bool = True) -> list[Entry]:
        appends, idle = self._appends, not self._journal_lock.locked()
        result = await self.client.get_prefix(self.journal_prefix)
        # Only keys of 16 digits are records (what append writes); anything else under
        # the prefix is not this journal's and is skipped, as ballots skip stray keys.
        kvs = sorted(
            (kv for kv in result.kvs if _is_seq(kv.key[len(self.journal_prefix) :])),
            key=lambda kv: kv.key,
        )
        if appending or (idle and not self._journal_lock.locked() and appends == self._appends):
            self._next_seq = int(kvs[-1].key[len(self.journal_prefix) :]) + 1 if kvs else 1
        return [(kv.mod_revision, self._decode(kv)) for kv in kvs if kv.mod_revision > after]

    async def watch(self, after: int = 0) -> AsyncIterator[Entry]:
        watch = self.client.watch(
            self.journal_prefix, prefix_end(self.journal_prefix), start_revision=after + 1
        )
        async with watch:
            async for event in watch:
                if event.type == "put":
                    yield event.revision, self._decode(event.kv)

    # ----------------------------------------------------------------- helpers

    def _decode(self, kv: KeyValue) -> dict[str, Any]:
        try:
            return decode_line(kv.value.decode("utf-8", "surrogateescape"))
        except Damaged as exc:
            raise JournalDamaged(f"etcd journal key {_text(kv.key)} is damaged ({exc})") from None

    def _lease_of(self, token: Token) -> Lease:
        if self.lease is None or self._token != token:
            raise TokenLost(f"token {token.revision} is not this watcher's leadership")
        return self.lease

    async def _confirm_lost(self, token: Token, why: str) -> None:
        """Raise TokenLost when a linearizable read shows the leader key is not ours."""
        kv = await self.client.get(self.leader_key)
        if kv is None or kv.create_revision != token.revision:
            self.lease = self._token = None
            raise TokenLost(f"{_lost(token, kv)} ({why})")

    async def _drop(self, lease: Lease) -> None:
        with contextlib.suppress(StoreUnavailable, LeaseNotFound):
            await lease.revoke()


def _lost(token: Token, now: KeyValue | None) -> str:
    holder = "nobody" if now is None else f"{_text(now.value)!r} (token {now.create_revision})"
    return f"leadership with token {token.revision} lost: the leader key is held by {holder}"


def _is_seq(name: bytes) -> bool:
    return len(name) == 16 and name.isdigit()


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")
