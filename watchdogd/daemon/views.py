"""What the daemon shows: ``status`` (watchdogctl status and the control socket),
``/`` (the status page, rendered by ``page``), ``/healthz`` (systemd and load
balancers) and ``/primary`` (the witness view another
watcher asks: is the primary up from here?). Read-only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from watchdogd import __version__, policy
from watchdogd.core import httpd as web
from watchdogd.probes import Observation
from watchdogd.state.journal import FailoverRecord

if TYPE_CHECKING:
    from watchdogd.daemon.lifecycle import Daemon


class Views:
    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon

    def status(self) -> dict[str, Any]:
        d = self.d
        primary, standby = d.roles()
        latest = d.latest
        decision = d.cycle.last_decision
        running = None
        if (runner := d.sequences.runner) is not None:
            running = {
                "id": runner.plan.id,
                "step": runner.current_step,
                "started_at": runner.current_step_started,
            }
        last = d.state.last
        # Match observations by node, not by role: right after a failover the roles
        # have swapped but the last cycle observed them the other way round.
        observed = [
            o
            for o in (latest.primary_db, latest.standby_db, latest.primary_app, latest.standby_app)
            if o is not None
        ]
        nodes = []
        for node, role in ((primary, "primary"), (standby, "standby")):
            db = next(
                (o for o in observed if o.target == node.name and o.probe == "database"), None
            )
            app = next((o for o in observed if o.target == node.name and o.probe == "app"), None)
            nodes.append(
                {
                    "name": node.name,
                    "role": role,
                    "database": _obs(db),
                    "app": _obs(app) if node.app is not None else None,
                }
            )
        verdict = latest.verdict
        return {
            "cluster": d.config.cluster,
            "version": __version__,
            "state": d.policy.state,
            "reason": decision.reason if decision else "starting",
            "mode": d.config.failover.mode,
            "armed": d.policy.armed(d.wall()),
            "paused": d.state.paused,
            "pause_reason": d.state.pause_reason,
            "awaiting_ack": d.state.awaiting_ack is not None,
            "cooldown_left": round(d.policy.cooldown_left(d.wall()), 1),
            "roles": {"primary": primary.name, "standby": standby.name},
            "nodes": nodes,
            "outage_seconds": round(verdict.outage_seconds, 3) if verdict else 0.0,
            "verdict": verdict.facts() if verdict else None,
            "lag": {
                "bytes": latest.lag_bytes,
                "seconds": latest.lag_seconds,
                "streaming": _streaming(latest.standby_db),
            },
            "writable_primaries": latest.writable,
            "failover_in_progress": running,
            "last_failover": _summary(last) if last else None,
            "last_cycle_at": d.last_cycle_wall,
            "journal_error": d.journal_error,
            "readiness": d.readiness.view(),
            "rejoin": self.rejoin(),
            # Only with ``store:``: the fleet as this watcher sees it.
            **({"store": d.fleet.status()} if d.fleet is not None else {}),
        }

    def rejoin(self) -> dict[str, Any]:
        """The running rejoin, the last one, the last divergence report, and why
        auto_rejoin waits (if it does)."""
        seq, last = self.d.sequences, self.d.state.last_rejoin
        running = None
        if (runner := seq.rejoin_runner) is not None:
            running = {
                "id": runner.plan.id,
                "step": runner.current_step,
                "started_at": runner.current_step_started,
            }
        summary = None
        if last is not None:
            summary = {k: v for k, v in last.as_dict().items() if k not in ("steps", "divergence")}
        return {
            "running": running,
            "last": summary,
            "divergence": seq.last_divergence,
            "waiting": seq.rejoin_waiting,
        }

    def healthz(self) -> tuple[bool, str]:
        d = self.d
        limit = policy.stall_limit(d.config.probe)
        return policy.health(d.journal_error, d.last_cycle_wall, d.wall(), limit, d.policy.state)

    async def page(self, request: web.Request) -> web.Response:
        """``GET /``: the read-only status page (``page.render``), secrets masked."""
        # Loaded by the first visit: html's entity tables and the page's templates are
        # not paid for by a daemon nobody looks at (issue 13).
        from watchdogd.daemon import page

        d = self.d
        failovers = [f.as_dict() for f in reversed(d.state.failovers[-page.FAILOVERS_SHOWN :])]
        shown = d.secrets.mask_value({"status": self.status(), "failovers": failovers})
        body = page.render(shown["status"], shown["failovers"], d.wall())
        return web.Response(text=body, content_type="text/html", headers=page.HEADERS)

    async def witness(self, request: web.Request) -> web.Response:
        pdb = self.d.latest.primary_db
        up = bool(pdb is not None and pdb.ok)
        return web.json_response(
            {
                "primary_up": up,
                "primary": self.d.roles()[0].name,
                "detail": pdb.detail if pdb else "not probed yet",
            },
            status=200 if up else 503,
        )

    async def vouch(self, request: web.Request) -> web.Response:
        """``GET /vouch``: whether this watcher vouches for its primary to the guard
        beside it (``fleet.Vouching``); 404 outside a fleet. 200 when it vouches, 503
        when not, JSON ``{instance, node, vouch, detail}`` either way."""
        fleet = self.d.fleet
        if fleet is None:
            return web.Response(text="not a fleet watcher (no store: in the config)\n", status=404)
        answer = fleet.vouch(self.d.roles()[0].name)
        return web.json_response(answer, status=200 if answer["vouch"] else 503)


def _obs(obs: Observation | None) -> dict[str, Any] | None:
    if obs is None:
        return None
    out: dict[str, Any] = {"ok": obs.ok, "detail": obs.detail, "latency": round(obs.latency, 4)}
    if obs.db is not None:
        out["writable"] = obs.db.writable
        out["is_primary"] = obs.db.is_primary
    return out


def _streaming(obs: Observation | None) -> bool | None:
    if obs is None or obs.db is None or obs.db.is_primary:
        return None
    return bool(obs.db.streaming)


def _summary(fo: FailoverRecord) -> dict[str, Any]:
    return {
        "id": fo.id,
        "trigger": fo.trigger,
        "outcome": fo.outcome or "in progress",
        "reason": fo.reason,
        "from": fo.from_node,
        "to": fo.to_node,
        "started_at": fo.started_at,
        "finished_at": fo.finished_at,
        "error": fo.error,
        "acked": fo.acked_at is not None,
    }
