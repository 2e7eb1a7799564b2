"""Running the readiness checks (``watchdogd.readiness`` decides what they mean).

The cheap checks are evaluated after every probe cycle from what it observed; the ones
that touch other systems (each step's target, the engines' settings advice) run every
``EXPENSIVE_INTERVAL`` seconds, each bounded by ``CHECK_TIMEOUT``, and again at once
after a reload or a change of roles. ``check_online`` runs all of them once, for
``watchdogd check-config --online``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from watchdogd import actions, engines, policy, readiness
from watchdogd.actions import ActionError, StepContext
from watchdogd.core.model import Config, NodeConfig
from watchdogd.engines import Engine
from watchdogd.policy import Policy
from watchdogd.probes import Observation, Probe
from watchdogd.probes.database import DatabaseProbe
from watchdogd.readiness import Check, Readiness
from watchdogd.state.journal import Journal, JournalError, JournalState

if TYPE_CHECKING:
    from watchdogd.daemon.lifecycle import Daemon

# The checks that touch other systems: how often, and how long each may take.
EXPENSIVE_INTERVAL = 60.0
CHECK_TIMEOUT = 5.0
MAINTENANCE_PAGE_MAX = 64 * 1024


def context(config: Config, primary: NodeConfig, standby: NodeConfig, engines: Any) -> StepContext:
    """The context a failover started now would give its steps."""
    return StepContext(
        config=config,
        primary=primary,
        standby=standby,
        engines=engines,
        failover_id="readiness-check",
        reason="readiness check",
        trigger="automatic",
    )


async def step_checks(ctx: StepContext) -> list[Check]:
    """Every step's target, checked side-effect free, concurrently, each bounded."""

    async def one(kind: str, step: Any) -> Check:
        name = readiness.step_check_name(kind, step)
        severity = readiness.step_severity(step)
        timeout = min(step.timeout, CHECK_TIMEOUT)
        try:
            detail = await actions.check_ready(actions.build(step, ctx.config), ctx, timeout)
        except ActionError as exc:
            return Check(name, False, str(exc), severity)
        except Exception as exc:  # a bug in one check is that check's failure
            text = ctx.config.mask(" ".join(str(exc).split())[:200])
            return Check(name, False, f"check error: {type(exc).__name__}: {text}", severity)
        return Check(name, True, detail, severity)

    steps = readiness.configured_steps(ctx.config)
    return list(await asyncio.gather(*(one(kind, step) for kind, step in steps)))


async def settings_checks(config: Config, engines: Mapping[str, Engine]) -> list[Check]:
    """The engines' advice about settings that slow detection, as warnings."""

    async def one(node: NodeConfig) -> Check:
        try:
            async with asyncio.timeout(CHECK_TIMEOUT):
                advice = await engines[node.name].advise(
                    config.failover.outage_threshold, CHECK_TIMEOUT
                )
        except TimeoutError:
            return readiness.settings_check(node.name, None, f"no answer within {CHECK_TIMEOUT:g}s")
        except Exception as exc:  # advice is best effort: a warning, never an outage
            return readiness.settings_check(node.name, None, config.mask(str(exc)))
        return readiness.settings_check(node.name, [config.mask(a) for a in advice])

    return list(await asyncio.gather(*(one(n) for n in config.nodes)))


async def maintenance_checks(standby: NodeConfig) -> list[Check]:
    """The standby's app is in maintenance (when its ``app.maintenance`` says how to
    tell): one GET, bounded, not redirected (its headers go to that host only), a page
    of at most 64 KiB read whole."""
    app = standby.app
    if app is None or app.maintenance is None:
        return []
    import aiohttp  # only a standby app with a maintenance page loads the HTTP client

    from watchdogd.probes import BodyTooLarge, read_capped

    try:
        async with (
            asyncio.timeout(CHECK_TIMEOUT),
            aiohttp.ClientSession() as session,
            session.get(
                app.maintenance.url, headers=dict(app.headers), allow_redirects=False
            ) as resp,
        ):
            body = (await read_capped(resp.content, MAINTENANCE_PAGE_MAX)).decode(errors="replace")
            return [readiness.maintenance_check(standby, resp.status, body)]
    except TimeoutError:
        error = f"no answer within {CHECK_TIMEOUT:g}s"
    except BodyTooLarge as exc:
        error = str(exc)
    except Exception as exc:  # a bug or a hostile reply is this check's failure only
        error = " ".join(str(exc).split())[:200] or type(exc).__name__
    return [readiness.maintenance_check(standby, None, None, error)]


async def expensive_checks(ctx: StepContext, engines: Mapping[str, Engine]) -> list[Check]:
    steps, settings, maintenance = await asyncio.gather(
        step_checks(ctx), settings_checks(ctx.config, engines), maintenance_checks(ctx.standby)
    )
    return steps + settings + maintenance


class ReadinessRunner:
    """The daemon's readiness: cheap checks after each cycle, the others every minute."""

    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        self.current: Readiness | None = None
        self._expensive: list[Check] | None = None
        self._checked_for: tuple[Config, str, str] | None = None
        self._lock = asyncio.Lock()
        self._kicked: set[asyncio.Task[None]] = set()  # runs started by after_cycle

    def _key(self) -> tuple[Config, str, str]:
        primary, standby = self.d.roles()
        return self.d.config, primary.name, standby.name

    def _busy(self) -> bool:
        """A failover, a fence or a rejoin (its report included) is running: its steps own
        their targets until it ends (and the roles it changes are checked afterwards)."""
        s = self.d.sequences
        return s.running or s.fencing or s.rejoin_running

    async def job(self) -> None:
        """The scheduled run of the expensive checks (never raises)."""
        try:
            await self._run()
        except Exception as exc:  # a report must never take the daemon down
            self.d.emit("cycle_error", error=f"readiness: {type(exc).__name__}: {exc}")

    async def _run(self) -> None:
        if self._lock.locked() or self._busy():
            return  # a run kicked off by a reload is under way, or a sequence runs
        async with self._lock:
            key = self._key()
            config, (primary, standby) = self.d.config, self.d.roles()
            ctx = context(config, primary, standby, self.d.engines)
            try:
                async with asyncio.timeout(CHECK_TIMEOUT + 5.0):
                    checks = await expensive_checks(ctx, self.d.engines)
            except TimeoutError:
                checks = [
                    Check(c.name, False, "the readiness checks overran their bound", c.severity)
                    for c in readiness.pending(config)
                ]
            self._expensive, self._checked_for = checks, key
        self.update()

    def after_cycle(self) -> None:
        """After a probe cycle: the cheap checks, and a new run of the others when the
        config or the roles changed since their last one. Never raises: the cycle that
        watches the primary must not stop over a report."""
        try:
            self._after_cycle()
        except Exception as exc:
            self.d.emit("cycle_error", error=f"readiness: {type(exc).__name__}: {exc}")

    def _after_cycle(self) -> None:
        stale = self._checked_for is not None and self._checked_for != self._key()
        if stale and not self._busy():
            self._checked_for = None
            self._expensive = None
            task = asyncio.create_task(self.job(), name="readiness")
            self._kicked.add(task)  # a reference until it ends
            task.add_done_callback(self._kicked.discard)
        self.update()

    def close(self) -> None:
        """At stop: a run started after a reload or a failover ends with the daemon."""
        for task in list(self._kicked):
            task.cancel()

    def update(self) -> None:
        d = self.d
        latest = d.latest
        standby = d.roles()[1]
        cheap = readiness.cycle_checks(
            d.policy,
            standby,
            _of(standby.name, latest.standby_db, latest.primary_db),
            _of(standby.name, latest.standby_app, latest.primary_app),
            latest.last_primary_pos,
            d.wall(),
        )
        expensive = self._expensive
        if expensive is None:
            expensive = readiness.pending(d.config)
        self.current = readiness.combine(cheap, expensive, d.wall())
        d.metrics.set_readiness(self.current.ready, {c.name: c.ok for c in self.current.checks})

    def view(self) -> dict[str, Any] | None:
        return self.current.as_dict() if self.current is not None else None


def _of(node: str, *observations: Observation | None) -> Observation | None:
    """The observation of ``node``: right after a failover the roles have swapped but
    the last cycle observed them the other way round."""
    return next((o for o in observations if o is not None and o.target == node), None)


# ---------------------------------------------------------------------- the command line


async def check_online(config: Config) -> Readiness:
    """Every readiness check once, from this host, as the daemon would see it now:
    connects to both databases, the standby's app and every step's target."""
    try:
        _, state = Journal(config.state_dir).read()
        journal_problem = None
    except JournalError as exc:
        state, journal_problem = JournalState(), str(exc)
    names = [n.name for n in config.nodes]
    base = policy.base_roles(state, (config.primary.name, config.standby.name), names)
    primary_name, standby_name = policy.current_roles(state, base)
    primary, standby = config.node(primary_name), config.node(standby_name)
    pol = Policy(config.failover, state)
    opened = {n.name: engines.create(n.database, set(config.secrets)) for n in config.nodes}
    # Here, not at the top: the daemon imports this module, and a pair watched through
    # its databases alone must not load an HTTP client (issue 13).
    import aiohttp

    from watchdogd.probes.app import AppProbe

    try:
        async with aiohttp.ClientSession() as session:
            probes: list[Probe] = [
                DatabaseProbe(primary.name, opened[primary.name], CHECK_TIMEOUT),
                DatabaseProbe(standby.name, opened[standby.name], CHECK_TIMEOUT),
            ]
            if standby.app is not None:
                probes.append(AppProbe(standby.name, standby.app, session, CHECK_TIMEOUT))
            observed = await asyncio.gather(*(_bounded(p) for p in probes))
        view = policy.observe_lag(observed[0], observed[1], None)
        cheap = readiness.cycle_checks(
            pol,
            standby,
            observed[1],
            observed[2] if len(observed) > 2 else None,
            view.last_primary_pos,
            time.time(),
        )
        if journal_problem is not None:
            cheap = [
                Check(c.name, False, f"unknown: {journal_problem}")
                if c.name == readiness.ARMED
                else c
                for c in cheap
            ]
        ctx = context(config, primary, standby, opened)
        expensive = await expensive_checks(ctx, opened)
    finally:
        for engine in opened.values():
            await engine.close()
    return readiness.combine(cheap, expensive, time.time())


async def _bounded(probe: Probe) -> Observation:
    try:
        async with asyncio.timeout(CHECK_TIMEOUT):
            return await probe.check()
    except TimeoutError:
        detail = f"no answer within {CHECK_TIMEOUT:g}s"
    except Exception as exc:
        detail = f"probe error: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    return Observation(probe.target, probe.probe, False, CHECK_TIMEOUT, detail, time.time())


def report(result: Readiness) -> list[str]:
    """What ``check-config --online`` prints: the verdict, then one line per problem."""
    errors = [c for c in result.problems if c.severity == readiness.ERROR]
    warnings = [c for c in result.problems if c.severity != readiness.ERROR]
    total = len(result.checks)
    if errors:
        lines = [f"not ready: {len(errors)} of {total} checks failed"]
    elif warnings:
        lines = [f"ready: {total - len(warnings)} of {total} checks passed, the others warn"]
    else:
        lines = [f"ready: {total} checks passed"]
    lines += [f"  {c.name}: {c.detail}" for c in errors]
    lines += [f"  warning {c.name}: {c.detail}" for c in warnings]
    return lines
