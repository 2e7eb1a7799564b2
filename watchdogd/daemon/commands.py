"""The operator commands the control socket hands over (already validated and
permission-checked there): status, history, pause, resume, failover, switchover, abort,
ack, rejoin, reload. Each journals its change before acting on it, so a journal that refuses the
record refuses the command and nothing is done.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from watchdogd import policy
from watchdogd.control import CommandError, Peer
from watchdogd.daemon.cycle import Latest
from watchdogd.detector import HEALTHY, Verdict
from watchdogd.state import journal as records
from watchdogd.state.journal import FailoverRecord, JournalError

if TYPE_CHECKING:
    from watchdogd.daemon.lifecycle import Daemon


# Commands that change the pair or the journal: in a fleet only the leader runs them.
MUTATING = frozenset({"pause", "resume", "failover", "switchover", "abort", "ack", "rejoin"})


def who(peer: Peer) -> str:
    return f"{peer.user or 'uid ' + str(peer.uid)} (pid {peer.pid})"


class Commands:
    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon

    async def handle(self, command: str, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        handler = getattr(self, f"_cmd_{command}", None)
        if handler is None:
            raise CommandError(f"unknown command {command!r}")
        fleet = self.d.fleet
        # Stopping a sequence this watcher runs is always allowed: it only stops (the
        # flag is read before the next step), journaling nothing, whatever the store says.
        stops_own = command == "abort" and self.d.sequences.runner is not None
        if fleet is not None and command in MUTATING and not args.get("dry_run") and not stops_own:
            # Refused with the leader's name rather than forwarded (docs/fleet.md).
            if (refusal := fleet.command_refusal()) is not None:
                raise CommandError(f"{command} refused: {refusal}")
        try:
            result: dict[str, Any] = await handler(args, peer)
        except JournalError as exc:
            # Nothing was done: every change is journaled before it is acted on.
            raise CommandError(f"{command} refused: {exc}") from None
        return result

    def _verdict(self) -> Verdict:
        return self.d.latest.verdict or Verdict(HEALTHY, "not probed yet")

    async def _cmd_status(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        return self.d.views.status()

    async def _cmd_history(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        n = int(args.get("n", 10))
        return {"failovers": [f.as_dict() for f in reversed(self.d.state.failovers[-n:])]}

    async def _cmd_pause(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        d = self.d
        # Masked at intake: the reason is journaled and shown back in status/history.
        reason = d.config.mask(args.get("reason") or f"paused by {who(peer)}")
        await d.record(records.pause(reason=reason, by=who(peer), at=d.wall()))
        d.emit("paused", reason=reason, by=who(peer))
        d.cycle.refresh_state()
        return {"paused": True, "reason": reason}

    async def _cmd_resume(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        d = self.d
        if not d.state.paused:
            raise CommandError("automatic failover is not paused")
        await d.record(records.resume(by=who(peer), at=d.wall()))
        d.emit("resumed", by=who(peer))
        d.cycle.refresh_state()
        return {"paused": False}

    async def _cmd_failover(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        d = self.d
        force, dry_run = bool(args.get("force")), bool(args.get("dry_run"))
        refusal = d.policy.refuse_manual_failover(
            self._verdict(), d.cycle.standby_facts(), force, d.sequences.rejoin_running
        )
        if refusal is not None:
            raise CommandError(f"failover refused: {refusal}")
        reason = args.get("reason") or f"manual failover by {who(peer)}" + (
            " (forced)" if force else ""
        )
        # Masked at intake: the reason is journaled and shown back in status/history.
        reason = d.config.mask(reason)
        return await self._start_or_describe("failover", "manual", reason, force, dry_run)

    async def _cmd_switchover(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        d = self.d
        pdb = d.latest.primary_db
        refusal = d.policy.refuse_switchover(
            bool(pdb and pdb.ok), d.cycle.standby_facts(), d.sequences.rejoin_running
        )
        if refusal is not None:
            raise CommandError(f"switchover refused: {refusal}")
        timeout = args.get("timeout")
        return await self._start_or_describe(
            "switchover",
            "switchover",
            f"switchover by {who(peer)}",
            False,
            bool(args.get("dry_run")),
            float(timeout) if timeout is not None else None,
        )

    async def _start_or_describe(
        self,
        kind: str,
        trigger: str,
        reason: str,
        forced: bool,
        dry_run: bool,
        catchup_timeout: float | None = None,
    ) -> dict[str, Any]:
        d, seq = self.d, self.d.sequences
        if dry_run:
            plan = seq.plan(kind, trigger, reason, forced=forced, catchup_timeout=catchup_timeout)
            return {"dry_run": True, "plan": seq.describe(plan)}
        if seq.stopping:
            raise CommandError(f"{kind} refused: watchdogd is stopping")
        if (fo := d.state.awaiting_ack) is not None:
            # A failed failover being retried by hand: the new one supersedes it.
            primary, standby = d.base_roles()
            await d.record(
                records.ack(
                    id=fo.id,
                    primary=primary.name,
                    standby=standby.name,
                    at=d.wall(),
                    note="superseded by a manual retry",
                )
            )
        plan = await seq.start_failover(
            kind, trigger, reason, forced=forced, catchup_timeout=catchup_timeout
        )
        return {"started": plan.id, "plan": seq.describe(plan)}

    async def _cmd_abort(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        d, by = self.d, who(peer)
        runner, verdict = d.sequences.runner, self._verdict()
        target = policy.abort_target(runner is not None, d.policy.pending_outage(verdict))
        if target == "nothing":
            raise CommandError("nothing to abort: no failover is running or pending")
        if runner is not None:
            runner.abort(by=f"operator ({by})")
            d.emit(
                "abort_requested",
                failover_id=runner.plan.id,
                by=by,
                current_step=runner.current_step,
            )
            return {"aborting": runner.plan.id, "note": "the sequence stops before its next step"}
        # Pending: journal an automatic failover that was aborted before it started, so
        # none starts until an operator acks.
        primary, standby = d.base_roles()
        fid = d.sequences.new_id()
        await d.record(
            records.sequence_started(
                "failover",
                id=fid,
                trigger="automatic",
                kind="failover",
                reason=verdict.reason,
                from_node=primary.name,
                to_node=standby.name,
                steps=[],
                at=d.wall(),
                pending=True,
            )
        )
        await d.record(
            records.sequence_finished(
                "failover",
                id=fid,
                outcome="aborted",
                error=f"aborted by operator ({by}) before it started",
                at=d.wall(),
            )
        )
        d.emit(
            "failover_aborted",
            failover_id=fid,
            trigger="automatic",
            by=by,
            error="aborted by operator before it started",
        )
        d.cycle.refresh_state()
        return {"aborted": fid, "note": "no automatic failover until an operator acks"}

    async def _cmd_ack(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        try:
            return await self.acknowledge(by=who(peer))
        except ValueError as exc:
            raise CommandError(str(exc)) from None

    async def acknowledge(self, *, by: str, **extra: Any) -> dict[str, Any]:
        """The effect of an ack (the operator's, or a verified rejoin's): journal it, swap
        the roles the failover left and re-arm. ValueError when nothing awaits an ack."""
        d = self.d
        primary, standby = d.policy.ack_roles()
        fo = d.state.awaiting_ack
        assert fo is not None
        await d.record(
            records.ack(id=fo.id, primary=primary, standby=standby, at=d.wall(), by=by, **extra)
        )
        d.emit("acked", failover_id=fo.id, by=by, primary=primary, standby=standby, **extra)
        self.watch_afresh(primary, fo)
        return {
            "acked": fo.id,
            "roles": {"primary": primary, "standby": standby},
            "armed": d.policy.armed(d.wall()),
        }

    def watch_afresh(self, primary: str | None = None, fo: FailoverRecord | None = None) -> None:
        """After an ack (this daemon's, or the fleet leader's read from the store): the
        pair is watched in its new roles from a clean slate."""
        d = self.d
        if primary is None:
            primary = d.roles()[0].name
        d.detector.reset()
        pos = d.latest.last_primary_pos
        d.latest = Latest(
            last_primary_pos=policy.kept_primary_pos(primary, fo, pos) if fo else None
        )
        d.cycle.forget_episode()
        d.sequences.rejoin_waiting = None
        d.metrics.set_rejoin_waiting(False)
        d.cycle.refresh_state()

    async def _cmd_rejoin(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        """Rejoin the node failed away from as the standby: the divergence report first,
        refused when writes would be thrown away (or it cannot tell) unless accepted."""
        d, seq = self.d, self.d.sequences
        dry_run, accept = bool(args.get("dry_run")), bool(args.get("accept_divergence"))
        refusal = policy.refuse_rejoin(d.state, seq.rejoin_running, seq.fencing)
        fo = d.state.awaiting_ack
        if refusal is not None or fo is None:
            raise CommandError(f"rejoin refused: {refusal}")
        # Until the rejoin's start record is written, no cycle fences or rejoins the same
        # old primary, and no second rejoin command starts.
        seq.rejoin_starting = True
        try:
            return await self._rejoin_starting(fo, dry_run, accept, peer)
        finally:
            seq.rejoin_starting = False

    async def _rejoin_starting(
        self, fo: FailoverRecord, dry_run: bool, accept: bool, peer: Peer
    ) -> dict[str, Any]:
        d, seq = self.d, self.d.sequences
        # A real rejoin fences the old primary first: a write landing between the
        # report and the rewind would be thrown away unreported. A dry run only looks.
        div = await seq.measure(fo, fence=not dry_run)
        if d.state.awaiting_ack is not fo or seq.rejoin_task is not None:
            raise CommandError("rejoin refused: the failover was acked or rejoined meanwhile")
        # A fence or a failover may have started during the report: the same rules again.
        refusal = policy.refuse_rejoin(d.state, seq.rejoin_task is not None, seq.fencing)
        if seq.stopping and not dry_run:
            refusal = "watchdogd is stopping"
        if refusal is not None:
            raise CommandError(f"rejoin refused: {refusal}")
        report = seq.report_divergence(fo, div, "dry_run" if dry_run else "manual")
        blocked = policy.refuse_divergence(div, accept, fo.from_node, fo.to_node)
        reason = f"rejoin by {who(peer)}"
        if accept and div.diverged is not False:
            reason += f", accepting the divergence ({report['summary']})"
        if dry_run:
            plan = seq.rejoin_plan(fo, "manual", reason)
            return {
                "dry_run": True,
                "note": f"the real run fences {fo.from_node} first (read-only, client "
                "sessions ended), then measures the divergence again",
                "divergence": report,
                "refused": blocked,
                "plan": seq.describe(plan, failover_id=fo.id),
            }
        if blocked is not None:
            d.emit("rejoin_refused", failover_id=fo.id, old_primary=fo.from_node, reason=blocked)
            raise CommandError(f"rejoin refused: {blocked}")
        plan = await seq.start_rejoin(fo, report, accepted=accept, trigger="manual", reason=reason)
        return {
            "started": plan.id,
            "divergence": report,
            "plan": seq.describe(plan, failover_id=fo.id),
        }

    async def _cmd_reload(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        return await self.d.reload(by=who(peer))
