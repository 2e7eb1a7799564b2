"""A fleet of watchers (``store:`` in the config, issue 12): this watcher's part in it.

Built and owned by the ``Daemon`` when ``store:`` is set; without it nothing here runs.

- **Leadership.** A background task campaigns for the leader key when nobody holds it
  and renews the lease every ttl/3. The leader's *authority* ends at the send time of its
  last acknowledged renewal plus ttl minus a margin (``fleet.authority_deadline``).
  ``TokenLost`` (the only "lost") stops it at once: running sequences are cancelled and
  stay unfinished in the store for the next leader. ``StoreUnavailable`` keeps the token
  but the authority ends at its deadline.
- **Votes.** After every probe cycle this watcher publishes its ``View``; the leader
  reads every ballot (one linearizable read; a second within the cycle when it is short
  of "down" votes) and tallies them with its own receive times
  (``fleet.Freshness``); its own view counts as its vote.
- **The journal** is the store's: the leader appends (guarded by its token) and folds
  the record into its state; a follower re-reads what was appended since it last looked,
  every cycle, so pause, cooldown and acks are cluster-wide. A new leader replays the
  whole journal and resumes an unfinished failover with today's rules.
- **The gate.** An automatic failover starts only on the leader, with authority left
  for its first step, and when the tally allows it; otherwise the state is ``blocked``
  with the refusal. While the store does not answer the state is ``store_unavailable``
  and nothing is failed over, fenced or rejoined.
- **Commands** that change anything are refused on a follower, naming the leader.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

from watchdogd import fleet as votes
from watchdogd.config import fleet_timing, step_room
from watchdogd.core.model import Config, StepConfig
from watchdogd.detector import DOWN, Verdict
from watchdogd.fleet import Freshness, Tally, View, Vouching
from watchdogd.policy import BLOCKED, GUARD_STEP, Decision, State
from watchdogd.state.journal import JournalError, apply
from watchdogd.state.store import StoreUnavailable, Token, TokenLost, fold_entries

if TYPE_CHECKING:
    # The etcd client (aiohttp) is loaded only by a daemon with ``store:``.
    from watchdogd.daemon.lifecycle import Daemon
    from watchdogd.state.etcd import EtcdClient
    from watchdogd.state.guard_keys import ClearanceRule
    from watchdogd.state.store import Entry
    from watchdogd.state.votes import VoteBox


class FleetStore(Protocol):
    """What the fleet needs of a store: ``EtcdStore`` (or ``MemoryStore`` in tests)."""

    async def campaign(self, holder: str, ttl: float) -> Token | None: ...
    async def renew(self, token: Token) -> float: ...
    async def resign(self, token: Token) -> None: ...
    async def leader(self) -> Token | None: ...
    async def append(self, token: Token, record: Any) -> int: ...
    async def entries(self, after: int = 0) -> list[Entry]: ...


class StoreWriteError(JournalError):
    """The fleet's journal did not take a record (not the leader, no authority left,
    leadership lost, or the store did not answer): nothing is acted on."""


GUARD_POLL = 0.25  # a linearizable read of the guard's keys, well below the lease ttl
RECOUNT_PAUSE = 0.25  # the leader's second look at the votes when it is short of "down"


def guard_step(cfg: Config) -> StepConfig | None:
    """The step a fleet with ``guard:`` runs before the promotion (``policy.build_plan``):
    attempts that fit the leader's authority (``check-config``'s step rule), retried for
    as long as the guard's silence takes to count (its isolation timeout, or the stock
    standby reply window when longer, after its key expired, plus a ttl for the guard to
    notice and fence) and a little more."""
    if cfg.store is None or cfg.guard is None:
        return None
    from watchdogd.state.guard_keys import STOCK_REPLY_WINDOW

    timing = fleet_timing(cfg.store.etcd)
    attempt = max(0.5, min(5.0, step_room(cfg.store.etcd) - 0.5))
    delay = GUARD_POLL
    # A guard may wait longer than its isolation_timeout: it counts the standby's last
    # reply for its reply window and publishes the longer wait, which the leader's rule
    # waits out. The attempts cover at least the stock window, so a short
    # isolation_timeout does not run out of them.
    silence = max(cfg.guard.isolation_timeout, STOCK_REPLY_WINDOW)
    needed = silence + 2 * timing.ttl + timing.budget
    retries = math.ceil(needed / (attempt + delay)) + 1
    return StepConfig(
        name=GUARD_STEP,
        action=GUARD_STEP,
        timeout=attempt,
        retries=retries,
        retry_delay=delay,
        idempotent=True,
    )


class GuardLink:
    """The leader's side of the guard (``watchdogd.state.guard_keys``): the first attempt
    of a failover's ``guard_fence`` step writes the fence order (guarded by the leader's
    token); every attempt then reads the guard's keys until ``ClearanceRule`` clears or
    the attempt's time is up. The rule lives across attempts (the guard's silence is
    counted from the first read that saw its key gone), one per failover and token: a
    new leader orders afresh with its own token."""

    def __init__(
        self,
        fleet: Fleet,
        isolation_timeout: float,
        vouchers: tuple[str, ...] = (),
        vouches_needed: int = 0,
    ) -> None:
        self.fleet = fleet
        self.isolation_timeout = isolation_timeout
        # guard.watchers: the guard counts vouches_needed of them vouching
        self.vouchers, self.vouches_needed = vouchers, vouches_needed
        # (failover id, token) -> its rule and the order key's revision
        self._orders: dict[tuple[str, int], tuple[ClearanceRule, int]] = {}

    async def clear(self, failover_id: str, node: str, timeout: float) -> str:
        from watchdogd.actions import ActionError
        from watchdogd.state.guard_keys import ClearanceRule, guard_clearance, order_fence

        fleet = self.fleet
        token, client = fleet.token, fleet.client
        if token is None or client is None:
            raise ActionError(f"guard_fence: {fleet._not_leader()}")
        clock = fleet.d.clock
        end = clock() + max(0.0, timeout - GUARD_POLL)
        key = (failover_id, token.revision)
        rule = self._orders[key][0] if key in self._orders else None
        if rule is None:
            try:
                ordered = await order_fence(client, fleet.prefix, token, failover_id, node=node)
            except TokenLost as exc:
                fleet._lost_soon(str(exc))
                raise ActionError(f"guard_fence: {exc}") from None
            except StoreUnavailable as exc:
                raise ActionError(f"guard_fence: the fence order was not written: {exc}") from None
            # Replication was stopped before this step: the standby's stream, a sign of
            # life that keeps an isolated guard from fencing, ended at the latest now.
            rule = ClearanceRule(
                token,
                failover_id,
                self.isolation_timeout,
                quiet_since=clock(),
                margin=fleet.timing.ttl,
                vouching=bool(self.vouchers),
                vouchers=self.vouchers,
                vouches_needed=self.vouches_needed,
            )
            self._orders = {k: o for k, o in self._orders.items() if k[0] == failover_id}
            self._orders[key] = (rule, ordered)
            fleet.d.emit("guard_fence_ordered", failover_id=failover_id, node=node)
        verdict = await guard_clearance(
            client,
            fleet.prefix,
            token,
            failover_id,
            self.isolation_timeout,
            clock,
            max(0.0, end - clock()),  # the order's write came out of this attempt's time
            poll=GUARD_POLL,
            rule=rule,
            vouches=lambda asked, needed: fleet.vouch_end(rule.ordered_at, asked, needed),
        )
        if not verdict.cleared:
            raise ActionError(f"guard_fence: not cleared yet: {verdict.reason}")
        return f"cleared ({verdict.via}): {verdict.reason}"

    async def withdraw(self, failover_id: str) -> None:
        """A failover that ordered a fence and ended without completing (failed,
        aborted) takes its order back: left standing, the guard would fence the old
        primary when its database answers again, and the pair would have no writable
        node. Only our own order, only while our token holds (one transaction); best
        effort, bounded: a guard that already fenced stays fenced (never lifted here),
        and a "down" promise it made is kept."""
        from watchdogd.state.etcd import Compare, Delete
        from watchdogd.state.guard_keys import GuardKeys

        fleet = self.fleet
        token, client = fleet.token, fleet.client
        mine = None if token is None else self._orders.get((failover_id, token.revision))
        self._orders = {k: o for k, o in self._orders.items() if k[0] != failover_id}
        if token is None or client is None or mine is None:
            return
        revision = mine[1]
        keys = GuardKeys.under(fleet.prefix)
        try:
            async with asyncio.timeout(2 * fleet.timing.budget):
                await client.txn(
                    [
                        Compare(keys.leader, "create", "=", token.revision),
                        Compare(keys.order, "mod", "=", revision),
                    ],
                    [Delete(keys.order)],
                    [],
                )
        except Exception as exc:  # CompareFailed: not ours any more; else: unanswered
            fleet.d.emit(
                "guard_order_withdrawn", failover_id=failover_id, withdrawn=False, why=str(exc)
            )
            return
        fleet.d.emit("guard_order_withdrawn", failover_id=failover_id, withdrawn=True)


class Fleet:
    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        cfg = daemon.config
        assert cfg.store is not None
        self.settings = cfg.store
        self.instance = cfg.instance
        self.timing = fleet_timing(cfg.store.etcd)
        # Built by start() unless a test put in-memory ones here first.
        self.store: FleetStore | None = None
        self.box: VoteBox | None = None
        self.client: EtcdClient | None = None
        self.token: Token | None = None
        self.synced = False  # the leader has replayed the store's journal
        # An append whose answer was lost and whose record the next read did not show
        # (it may land yet): no new failover, fence, rejoin or command until the
        # journal is replayed, once nothing runs. Running steps keep their authority.
        self.needs_replay = False
        # The store's journal holds a record that does not decode: nobody acts on a
        # journal with a hole in it (a hidden failover start?) until an operator fixes it.
        self.journal_damaged: str | None = None
        self.unapplied = False  # a record read from the store's journal did not apply
        self.deadline: float | None = None  # the leader's authority ends (d.clock)
        self.leader: str | None = None  # who leads, as last read
        self.up = False  # the store answered the last call
        self.error: str | None = "not asked yet"
        self.position = 0  # the last journal position folded into the state
        self.seq = 0
        self.views: dict[str, View] = {}
        self.tally: Tally | None = None
        self.freshness = self._new_freshness()
        self._last_read: float | None = None  # the leader's last good read of the ballots
        self._read_sent: float | None = None  # ... and when it was sent
        self._seen_at: dict[str, float] = {}  # the read that first showed each view
        self._seen_revision: dict[str, int] = {}
        # Vouching for the primary to its guard (``GET /vouch``), bounded by our views.
        probe = cfg.probe
        self.vouching = Vouching(daemon.clock(), 2 * probe.interval + probe.timeout)
        self._task: asyncio.Task[None] | None = None
        self._lost_tasks: set[asyncio.Task[None]] = set()
        self._renew_now = asyncio.Event()  # renew_soon(): the next round at once
        # One journal call at a time (runner, fence, rejoin, commands and the take-over
        # all append): the store numbers records one after another.
        self._journal = asyncio.Lock()
        self.prefix = f"{cfg.store.etcd.prefix.rstrip('/')}/{cfg.cluster}"
        self.guard = (
            GuardLink(
                self,
                cfg.guard.isolation_timeout,
                tuple(name for name, _ in cfg.guard.watchers),
                len(cfg.store.voters) // 2 + 1,
            )
            if cfg.guard
            else None
        )
        # This watcher vouches (and says since when it last did) only where the fleet
        # runs its guard with guard.watchers: a fleet without it sends no new field.
        self.vouches = cfg.guard is not None and bool(cfg.guard.watchers)
        self._digest: tuple[Config, str] | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self.store is None or self.box is None:
            self._build()
        self._export()
        with contextlib.suppress(StoreUnavailable, JournalError):
            await self.follow()  # a follower's state, when the store answers now
        self._task = asyncio.create_task(self._lead_loop(), name="fleet-leadership")

    def _build(self) -> None:
        from watchdogd.state.etcd import EtcdClient, TlsFiles
        from watchdogd.state.etcd_store import EtcdStore
        from watchdogd.state.votes import EtcdVoteBox

        etcd = self.settings.etcd
        self.client = EtcdClient(
            etcd.endpoints,
            timeout=etcd.timeout,
            tls=TlsFiles(etcd.ca_file, etcd.cert_file, etcd.key_file),
            username=etcd.username,
            password=etcd.password,
        )
        self.store = EtcdStore(self.client, self.prefix)
        self.box = EtcdVoteBox(self.client, self.prefix, etcd.ttl)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None
        bound = self.timing.budget
        if self.token is not None and self.store is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(bound):
                    await self.store.resign(self.token)  # the next leader need not wait
        self.token = None
        if self.box is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(bound):
                    await self.box.close()
        if self.client is not None:
            await self.client.close()

    # ------------------------------------------------------------------ leadership

    @property
    def is_leader(self) -> bool:
        return self.token is not None

    @property
    def leading(self) -> bool:
        """Holds the leader key with its lease's time left (the deadline not passed):
        what status and the ``watchdogd_is_leader`` gauge say. A watcher cut off from
        the store keeps its token until an explicit compare failure, but past its
        deadline it leads nothing: reporting it as leader then showed two leaders beside
        the new one and kept WatchdogdNoFleetLeader from firing while no watcher could
        act."""
        # Not authority_left(), which is 0 until the journal is read: a leader still
        # reading it, or facing a damaged one, holds the key with time left and is the
        # only one that may act once it can (status says why it does not yet).
        return self.is_leader and self.deadline is not None and self.deadline > self.d.clock()

    def authority_left(self) -> float:
        """Seconds this watcher may still act as the leader (0 when it may not)."""
        if self.token is None or not self.synced or self.deadline is None:
            return 0.0
        return max(0.0, self.deadline - self.d.clock())

    def may_act(self) -> bool:
        """May this watcher start a fence or a rejoin now."""
        return (
            self.authority_left() > 0
            and self.up
            and not self.needs_replay
            and self.journal_damaged is None
        )

    def renew_soon(self) -> None:
        """Renew the lease now rather than at its turn: a failover (or its next step)
        that needs more authority than is left then waits one store call, not up to a
        renew interval (the authority dips to ttl - margin - renew before each turn)."""
        if self.token is not None:
            self._renew_now.set()

    async def _lead_loop(self) -> None:
        while True:
            self._renew_now.clear()  # a request made during this round gets one more
            try:
                pause = await self._lead_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug or a hostile reply must not end leadership work
                self._down(f"unexpected {type(exc).__name__}: {exc}")
                pause = self.timing.renew
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await self._renew_now.wait()

    async def _lead_once(self) -> float:
        """One campaign or renewal; returns how long to wait before the next."""
        assert self.store is not None
        ttl, margin = self.timing.ttl, self.timing.margin
        retry = min(self.timing.renew, 0.25)  # an unanswered renewal is retried soon
        sent = self.d.clock()
        if self.token is None:
            # A read first: a campaign grants (and drops) a lease, which a follower
            # need not cost the store every round while a leader holds the key.
            token = None
            try:
                holder = await self.store.leader()
                # A campaign whose reply was lost may have put the key on our own lease:
                # it names us, so nobody else campaigns; settle it now, not after a ttl.
                ours = holder is not None and holder.holder == self.instance
                if holder is None or (ours and getattr(self.store, "pending_campaign", False)):
                    sent = self.d.clock()
                    token = await self.store.campaign(self.instance, ttl)
                    if token is None:
                        holder = await self.store.leader()
                if token is None:
                    self._set_leader(holder.holder if holder is not None else None)
            except StoreUnavailable as exc:
                self._down(str(exc))
                return retry
            self._up()
            if token is None:
                # A follower looks again soon: a leader's key that expired is taken
                # over within about a second, not a renew interval.
                self._export()
                return min(self.timing.renew, 1.0)
            if token is not None:
                self.token, self.synced = token, False
                self.reset_votes()  # nothing seen before this term counts in it
                self.deadline = votes.authority_deadline(sent, ttl, margin)
                # A campaign whose reply was lost is adopted by the next one: its lease
                # was granted before this round's send time, so its deadline counts from
                # that grant (the store's lease knows when it was asked for).
                lease = getattr(self.store, "lease", None)
                if lease is not None:
                    self.deadline = min(self.deadline, lease.deadline(margin))
                self._set_leader(self.instance)
                self.d.emit("fleet_leader", instance=self.instance, token=token.revision)
        else:
            try:
                await self.store.renew(self.token)
            except TokenLost as exc:
                await self._lost(str(exc))
                return 0.0
            except StoreUnavailable as exc:
                self._down(str(exc))
                return retry
            self._up()
            renewed = votes.authority_deadline(sent, ttl, margin)
            self.deadline = max(self.deadline or renewed, renewed)
        if self.token is not None and self.needs_replay and self._idle():
            self.needs_replay, self.synced = False, False  # replay now that nothing runs
        if self.token is not None and not self.synced:
            await self._take_over()
        self._export()
        return max(0.0, self.timing.renew - (self.d.clock() - sent))

    async def _take_over(self) -> None:
        """A new leader: replay the whole journal from the store, then act on it with
        today's rules (resume an unfinished failover, close a cut-off fence)."""
        assert self.store is not None
        try:
            async with self._journal:
                entries = await self.store.entries()
        except StoreUnavailable as exc:
            self._down(str(exc))
            return  # not synced: the next round reads again; nothing acts meanwhile
        except JournalError as exc:
            self._damaged(str(exc))
            return  # not synced: no failover, no command, until the record is repaired
        self._repaired()
        state = fold_entries(entries)
        self.position = max((p for p, _ in entries), default=0)
        self.d.adopt(state)
        for problem in state.problems:
            self.d.emit("journal_problem", problem=problem, path="store")
        self.synced, self.needs_replay = True, False
        self.unapplied = False  # the whole journal, folded afresh
        if self._idle():
            # A new leader (or one that re-read the journal after an ambiguous append
            # while nothing ran): act on the journal as a restart would.
            await self.d.take_over()
        self.d.cycle.refresh_state()

    async def _lost(self, why: str) -> None:
        """The store said our token no longer holds: stop acting at once."""
        if self.token is None:
            return
        self.token, self.synced, self.deadline = None, False, None
        self.needs_replay = False
        self.reset_votes()
        self.d.emit("fleet_leadership_lost", instance=self.instance, reason=why)
        self._set_leader(None)
        await self.d.sequences.abandon()
        self._export()

    def resync(self) -> None:
        """Re-read the journal and act on it (resume) at the next leadership round."""
        self.synced = False

    def _lost_soon(self, why: str) -> None:
        """``_lost`` from inside a sequence's own task (it cannot await its own end)."""
        task = asyncio.create_task(self._lost(why), name="fleet-lost")
        self._lost_tasks.add(task)
        task.add_done_callback(self._lost_tasks.discard)

    def _set_leader(self, holder: str | None) -> None:
        if holder != self.leader:
            self.d.emit("fleet_leader_seen", leader=holder, instance=self.instance)
        self.leader = holder

    def _up(self) -> None:
        if not self.up:
            self.d.emit("store_available", instance=self.instance, after=self.error)
        self.up, self.error = True, None
        self._export()

    def _down(self, why: str) -> None:
        why = self.d.config.mask(why)
        if self.up or self.error is None:
            self.d.emit("store_unavailable", instance=self.instance, error=why)
        self.up, self.error = False, why
        self._export()

    def _export(self) -> None:
        counted = self.tally if self.is_leader else None
        self.d.metrics.set_fleet(
            up=self.up,
            leader=self.leading,
            fresh=None if counted is None else len(counted.fresh),
            mismatched=None if counted is None else len(counted.mismatched),
        )

    # ------------------------------------------------------------------ the journal

    async def append(self, record: dict[str, Any]) -> None:
        """The leader's record into the store, guarded by its token (``Daemon.record``)."""
        if self.token is None or not self.synced:
            raise StoreWriteError(self._not_leader())
        if self.authority_left() <= 0:
            raise StoreWriteError("the store does not answer and this leader's authority has ended")
        assert self.store is not None
        try:
            async with self._journal:
                position = await self.store.append(self.token, record)
        except TokenLost as exc:
            self._lost_soon(str(exc))
            raise StoreWriteError(f"leadership lost: {exc}") from None
        except JournalError as exc:  # where the journal ends could not be read
            self._damaged(str(exc))
            raise StoreWriteError(f"the store's journal is damaged: {exc}") from None
        except StoreUnavailable as exc:
            self._down(str(exc))
            if exc.maybe_applied and await self._landed(record):
                return  # the reply was lost, the record is in the store: taken
            raise StoreWriteError(f"the store did not take the record: {exc}") from None
        self.position = max(self.position, position)

    async def _landed(self, record: dict[str, Any]) -> bool:
        """After an append whose answer was lost: one linearizable read of what follows
        ``position`` settles it at once. This very record and nothing else there: it
        landed (True). Anything else (not there, something unexpected, no answer): it
        may land yet, so ``needs_replay``; running steps are not cut short for it."""
        assert self.store is not None
        try:
            async with self._journal:
                entries = await self.store.entries(self.position)
        except (StoreUnavailable, JournalError):
            entries = None
        if entries is not None and len(entries) == 1 and entries[0][1] == record:
            self._up()
            self.position = max(self.position, entries[0][0])
            return True
        self.needs_replay = True
        return False

    def _damaged(self, why: str) -> None:
        """A record in the store's journal does not decode: a visible failed state, not
        "store down". The leader stops acting (it replays the journal once it reads
        whole again) and nobody fails over on a journal with a hole in it."""
        why = self.d.config.mask(why)
        self._up()  # the store answered
        if why != self.journal_damaged:
            self.d.emit("journal_problem", problem=why, path="store")
        self.journal_damaged = why
        if self.token is not None and self.synced and self._idle():
            self.synced = False  # re-read the whole journal before acting again

    def _repaired(self) -> None:
        if self.journal_damaged is not None:
            self.d.emit("fleet_journal_repaired", after=self.journal_damaged)
            self.journal_damaged = None

    def _idle(self) -> bool:
        seq = self.d.sequences
        return not seq.running and not seq.fencing and not seq.rejoin_running

    async def follow(self) -> bool:
        """A follower folds in what the leader appended since it last looked; True when
        the journal was read (a linearizable read) and every record it ever read
        applied (``unapplied``: one did not, so its state may miss a failover's start;
        only a whole replay, on becoming the leader, clears that)."""
        if self.is_leader or self.store is None:
            return False
        async with self._journal:
            try:
                entries = await self.store.entries(self.position)
            except JournalError as exc:
                self._damaged(str(exc))
                return False
        self._repaired()
        acked: dict[str, Any] | None = None
        for position, record in entries:
            self.position = max(self.position, position)
            try:
                apply(self.d.state, record)
            except (ValueError, KeyError, TypeError, OverflowError) as exc:
                self.d.emit("journal_problem", problem=f"record at {position}: {exc}")
                self.unapplied = True
                continue
            if record.get("type") == "ack":
                acked = record
        if acked is not None:
            # The roles changed: the pair is watched from scratch, as after our own ack.
            fo = next((f for f in self.d.state.failovers if f.id == acked.get("id")), None)
            primary = acked.get("primary")
            self.d.commands.watch_afresh(primary if isinstance(primary, str) else None, fo)
        return not self.unapplied

    # ------------------------------------------------------------------ votes

    def view(self, verdict: Verdict) -> View:
        d = self.d
        primary = d.roles()[0].name
        # Before the view is built: a DOWN verdict stops vouching before it is published.
        self.vouching.cycle(d.clock(), verdict.status, primary)
        pdb, sdb = d.latest.primary_db, d.latest.standby_db
        writable: bool | None = None
        if pdb is not None:
            writable = bool(pdb.ok and pdb.db is not None and pdb.db.is_primary and pdb.db.writable)
        standby_ok: bool | None = None
        if sdb is not None:
            standby_ok = bool(sdb.ok and sdb.db is not None and not sdb.db.is_primary)
        self.seq += 1
        return View(
            instance=self.instance,
            seq=self.seq,
            primary=primary,
            primary_down=verdict.status == DOWN,
            primary_writable=writable,
            outage=round(max(0.0, verdict.outage_seconds), 3),
            standby_ok=standby_ok,
            config=self.digest(),
            vouch_age=self.vouching.age(d.clock()) if self.vouches else None,
        )

    async def after_probe(self, verdict: Verdict, started: float | None = None) -> None:
        """After a probe cycle (``started`` at that ``d.clock`` time): publish this
        watcher's view; the leader reads every ballot and tallies; a follower follows
        the journal. Bounded by what is left of the cycle's interval (``store_bound``)."""
        assert self.box is not None
        own = self.view(verdict)
        self.tally = None
        deadline = self.d.clock() + self.store_bound(started)
        try:
            async with asyncio.timeout(deadline - self.d.clock()):
                await self.box.publish(self.instance, own.encode())
                if self.is_leader:
                    sent = self.d.clock()
                    ballots = await self.box.ballots()
                    self._count(own, ballots, sent)
                    # The leader's state is the journal, once read, while its lease
                    # certainly holds (no other leader can have appended since).
                    read = self.synced and not self.needs_replay and self.authority_left() > 0
                else:
                    read = await self.follow()
                    self.views = {}
        except (StoreUnavailable, TimeoutError) as exc:
            self._down(str(exc) or "no answer within the probe interval")
        else:
            self._up()
            if read:  # our view is in the store and the journal was read after it
                unfinished = self.d.state.unfinished is not None or self.d.sequences.running
                self.vouching.confirm(not own.primary_down, unfinished)
            if self._short_of_down(own):
                await self._recount(own, deadline)
        self._export()

    def _short_of_down(self, own: View) -> bool:
        """The leader sees the primary down, and so far too few others do, with nothing
        else in the way (no veto, no other config, nothing running)."""
        t = self.tally
        return (
            self.is_leader
            and self.synced
            and self.authority_left() > 0
            and t is not None
            and own.primary_down
            and len(t.down) < t.needed
            and not t.vetoes
            and not t.mismatched
            and not self.d.sequences.running
        )

    async def _recount(self, own: View, deadline: float) -> None:
        """Read the ballots once more, ``RECOUNT_PAUSE`` later (a quarter interval when
        shorter), before ``deadline`` (the cycle's time on the store, ``store_bound``)
        and only with at least 0.1 s left for the read. Woken by the same lost
        connection, the watchers cross the threshold together, and a voter's "down"
        often lands a few milliseconds after the leader's read, which then waited a
        whole interval (one failover in five took a second longer). A failed read
        keeps the first count."""
        pause = min(RECOUNT_PAUSE, self.d.config.probe.interval / 4)
        left = deadline - self.d.clock() - pause
        if left < 0.1:
            return
        await asyncio.sleep(pause)
        assert self.box is not None
        try:
            async with asyncio.timeout(left):
                sent = self.d.clock()
                ballots = await self.box.ballots()
        except (StoreUnavailable, TimeoutError):
            return
        if self.is_leader:
            self._count(own, ballots, sent)

    def store_bound(self, started: float | None) -> float:
        """How long the cycle may wait on the store: what is left of its probe interval,
        less a tenth, and at least half of the full bound (the interval, at most 1.5 s):
        a store across sites needs round trips even when the probes took their whole
        timeout. A store that does not answer made every cycle outlast its interval:
        the scheduler skipped the next tick (and the detector read that as a stalled
        loop, before it allowed one skipped tick), so no vouch for the guard then."""
        interval = self.d.config.probe.interval
        full = min(1.5, interval)
        if started is None:
            return full
        left = 0.9 * interval - (self.d.clock() - started)
        return max(full / 2, min(0.2, interval), min(full, left))

    def _new_freshness(self) -> Freshness:
        # A view counts as fresh while the leader saw it change within this: a live
        # voter republishes every probe interval; a publish may take a retry budget.
        cfg = self.d.config
        return Freshness(3 * cfg.probe.interval + cfg.probe.timeout + self.timing.budget)

    def digest(self) -> str:
        """``config_digest`` of the running config: computed once per config (a reload
        replaces the object), not every probe cycle and every voter in status."""
        cfg = self.d.config
        if self._digest is None or self._digest[0] is not cfg:
            self._digest = (cfg, votes.config_digest(cfg))
        return self._digest[1]

    def reset_votes(self, rebuild: bool = False) -> None:
        """Forget the receive times of every other view: each is a baseline again (a new
        or lost token, a gap in the leader's reads). A leader never counts a change it
        saw in an earlier term or before a gap. ``rebuild``: a new window as well (a
        reload that changed ``probe``); then the leader's own view starts afresh too."""
        if rebuild:
            self.freshness = self._new_freshness()
            probe = self.d.config.probe
            self.vouching.stale_after = 2 * probe.interval + probe.timeout
        else:
            self.freshness.forget_others(self.instance)
        self._last_read = self._read_sent = None
        self.views, self.tally = {}, None

    def _count(self, own: View, ballots: dict[str, Any], sent: float | None = None) -> None:
        now = self.d.clock()
        since = self._read_sent
        if (
            self._last_read is None
            or since is None
            or now - self._last_read > self.freshness.max_age
        ):
            # The first read of a term, or after reads failed for longer than a view
            # stays fresh: when anything changed is unknown, so nothing is fresh yet.
            self.reset_votes()
            since = now
        # A change seen now was published after the previous good read (linearizable
        # reads), not necessarily now: it is dated at that read's send time (its
        # linearization point came no earlier), never later.
        self._last_read = now
        self._read_sent = now if sent is None else sent
        views: dict[str, View] = {}
        for name, ballot in ballots.items():
            if name == self.instance:
                continue  # our own view is put in below, as it is now
            try:
                views[name] = View.decode(ballot.data)
            except (ValueError, TypeError, OverflowError) as exc:  # one bad ballot, not the count
                self.d.emit("fleet_view_refused", voter=name, error=str(exc))
                continue
            self.freshness.saw(name, ballot.revision, since)
            if self._seen_revision.get(name) != ballot.revision:
                self._seen_revision[name], self._seen_at[name] = ballot.revision, now
        for name in list(self.views):
            if name not in ballots and name != self.instance:
                self.freshness.forget(name)
        views[self.instance] = own
        self.freshness.saw(self.instance, own.seq, now)
        self._seen_at[self.instance] = now
        self.views = views
        self.tally = votes.tally(
            views,
            self.freshness,
            self.settings.voters,
            own.config,
            now,
            primary=own.primary,
        )

    # ------------------------------------------------------------------ vouching

    def vouch(self, node: str) -> dict[str, Any]:
        """``GET /vouch``: whether this watcher vouches for ``node`` (its primary) to the
        guard beside it now (``fleet.Vouching``); never without ``guard.watchers``."""
        if not self.vouches:
            yes, why = False, "this watcher's config has no guard.watchers"
        else:
            yes, why = self.vouching.ask(node, self.d.clock())
        return {"instance": self.instance, "node": node, "vouch": yes, "detail": why}

    def vouch_end(
        self, since: float, asked: tuple[str, ...], needed: int
    ) -> tuple[float | None, str]:
        """The latest time (``d.clock``) ``needed`` of the watchers ``asked`` may have
        vouched for the primary to its guard (``fleet.vouch_end``), judged on a read of
        the views sent at or after ``since`` (the fence order: a failover was journaled
        before it)."""
        if not self.is_leader:
            return None, self._not_leader()
        if not self.vouches:
            return None, (
                "the guard counts the watchers' vouches, but this fleet's config has no "
                "guard.watchers, so no watcher vouches or says when it last did: give "
                "the fleet the guard's guard.watchers"
            )
        if self._read_sent is None or self._read_sent < since:
            return None, "no read of the watchers' views since the fence order yet"
        return votes.vouch_end(
            self.views,
            self._seen_at,
            self.freshness,
            asked,
            needed,
            self.d.clock(),
            self.d.roles()[0].name,
        )

    # ------------------------------------------------------------------ the gate

    def gate(self, decision: Decision) -> Decision:
        """The policy's decision as the fleet allows it (see the module docstring)."""
        running = self.d.sequences.running
        if self.journal_damaged is not None and not running:
            return Decision(
                State.FAILED,
                f"the fleet's journal in the store is damaged ({self.journal_damaged}); "
                "nothing is failed over, fenced or rejoined until an operator repairs or "
                f"deletes that record; {decision.reason}",
            )
        if not self.up and not running:
            return Decision(
                State.STORE_UNAVAILABLE,
                f"the store does not answer ({self.error}); nothing is failed over or "
                f"fenced until it does; {decision.reason}",
            )
        if decision.start is None:
            return decision
        if not self.is_leader:
            who = self.leader or "no watcher"
            return Decision(State.SUSPECT, f"{decision.reason}; {who} leads the fleet and decides")
        refusal = self.refusal()
        if refusal is not None:
            if self.authority_left() <= self._first_step_need():
                self.renew_soon()  # so that the next cycle has the authority it needs
            return replace(
                decision, state=BLOCKED, reason=f"{decision.reason}; {refusal}", start=None
            )
        return decision

    def refusal(self) -> str | None:
        """Why the leader may not start an automatic failover now, or None."""
        first = self._first_step_need()
        left = self.authority_left()
        if self.journal_damaged is not None:
            return f"the fleet's journal in the store is damaged: {self.journal_damaged}"
        if not self.synced:
            return "the leader has not read the fleet's journal yet"
        if self.needs_replay:
            return "a journal record's fate is unknown: the leader re-reads the journal first"
        # What the fleet sees comes before the authority's timing: just before each
        # renewal the authority left dips below a step's length for a moment, and that
        # passing dip must not hide a veto or a minority from the status.
        if self.tally is None:
            return "no fresh read of the fleet's votes this cycle"
        refused = self.tally.refusal()
        if refused is not None:
            return refused
        if left <= first:
            return (
                f"the leader's authority ({left:.1f}s left) would end before the first "
                "step could finish"
            )
        return None

    def _first_step_need(self) -> float:
        """The authority the first failover step needs to start (the runner's rule)."""
        steps = self.d.config.failover.steps
        return steps[0].timeout + 1.0 if steps else 0.0

    def command_refusal(self) -> str | None:
        """Why a command that changes anything is refused here, or None (the leader)."""
        if self.is_leader:
            if self.journal_damaged is not None:
                return (
                    f"the fleet's journal in the store is damaged ({self.journal_damaged}); "
                    "repair or delete that record first"
                )
            if not self.synced:
                return "this watcher just became the leader and is reading the journal; retry"
            if self.needs_replay:
                return (
                    "a journal record's fate is unknown: this leader re-reads the journal "
                    "once nothing runs; retry"
                )
            if self.authority_left() <= 0:
                return "the store does not answer: this leader's authority has ended; retry"
            return None
        return self._not_leader()

    def _not_leader(self) -> str:
        if self.leader is None:
            why = "" if self.up else f" (the store does not answer: {self.error})"
            return f"not the leader: no watcher leads right now{why}"
        return f"not the leader: {self.leader} leads; run it there"

    # ------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        now = self.d.clock()
        voters: dict[str, Any] = {}
        for name in self.settings.voters:
            view = self.views.get(name)
            age = self.freshness.age(name, now) if self.is_leader else None
            voters[name] = {
                "fresh": self.freshness.fresh(name, now) if self.is_leader else None,
                "age": None if age is None else round(age, 1),
                "primary_down": view.primary_down if view else None,
                "primary_writable": view.primary_writable if view else None,
                "config_matches": (view.config == self.digest() if view else None),
            }
        return {
            "instance": self.instance,
            "leader": self.leader,
            "is_leader": self.leading,
            "holds_token": self.is_leader,
            "up": self.up,
            "error": self.error,
            "journal_damaged": self.journal_damaged,
            "deadline_in": round(self.authority_left(), 1) if self.is_leader else None,
            "voters": voters,
            "refusal": self.refusal() if self.is_leader else self._not_leader(),
            "vouching": self.vouches and self.vouching.would(self.d.roles()[0].name, now)[0],
        }
