"""Engine built-ins: steps that act on the pair's databases through their engines.

``stop_replication`` and ``promote`` act on the standby (the node failed over to),
``fence`` on the old primary (the node failed away from), ``catch_up`` waits until
the standby has replayed everything the old primary wrote (switchover), ``rejoin``
makes the old primary a replica of the new one (in a rejoin sequence ``primary``
is the node failed away from, ``standby`` the new primary). All are idempotent:
the engines check before they act, so a resumed failover never promotes twice.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from watchdogd.actions import Action, ActionError, StepContext
from watchdogd.core.model import NodeConfig
from watchdogd.core.section import Section
from watchdogd.engines import Engine, EngineError


@dataclass
class EngineCall:
    verb: str  # stop_replication | promote | fence
    target: str  # primary | standby (role within the failover)
    idempotent: bool = True

    def _node(self, ctx: StepContext) -> Any:
        return ctx.primary if self.target == "primary" else ctx.standby

    async def run(self, ctx: StepContext, timeout: float) -> str:
        engine = ctx.engine(self._node(ctx))
        call: Callable[[float], Awaitable[str]] = getattr(engine, self.verb)
        try:
            return await call(timeout)
        except EngineError as exc:
            raise ActionError(f"{self.verb} on {self._node(ctx).name}: {exc}") from None

    def describe(self, ctx: StepContext) -> dict[str, Any]:
        node = self._node(ctx)
        return {"node": node.name, "engine": node.database.engine}

    async def ready(self, ctx: StepContext, timeout: float) -> str:
        """The target database answers (its role is the cheap checks' business)."""
        return await _answers(ctx, self._node(ctx), timeout)


@dataclass
class CatchUp:
    """Wait until the standby has replayed up to the old primary's current position."""

    poll: float = 0.1
    idempotent: bool = True

    async def run(self, ctx: StepContext, timeout: float) -> str:
        primary, standby = ctx.engine(ctx.primary), ctx.engine(ctx.standby)
        deadline = time.monotonic() + timeout
        try:
            target = await _position(primary, "current_pos", deadline)
        except EngineError as exc:
            raise ActionError(
                f"catch_up: cannot read {ctx.primary.name}'s position: {exc}"
            ) from None
        behind = None
        while True:
            try:
                replayed = await _position(standby, "replay_pos", deadline)
                behind = target - replayed
                if behind <= 0:
                    return f"{ctx.standby.name} replayed everything {ctx.primary.name} wrote"
            except EngineError as exc:
                behind_text = str(exc)
            else:
                behind_text = f"{behind} bytes behind"
            if time.monotonic() + self.poll >= deadline:
                raise ActionError(
                    f"catch_up: {ctx.standby.name} still {behind_text} after {timeout:g}s"
                )
            await asyncio.sleep(self.poll)

    def describe(self, ctx: StepContext) -> dict[str, Any]:
        return {"wait_until": f"{ctx.standby.name} replayed all of {ctx.primary.name}'s WAL"}

    async def ready(self, ctx: StepContext, timeout: float) -> str:
        """Both databases answer: the old primary's position is read, the standby's polled."""
        primary = await _answers(ctx, ctx.primary, timeout)
        return f"{primary}; {await _answers(ctx, ctx.standby, timeout)}"


async def _answers(ctx: StepContext, node: Any, timeout: float) -> str:
    try:
        await ctx.engine(node).status(timeout)
    except EngineError as exc:
        raise ActionError(f"{node.name} does not answer: {exc}") from None
    return f"{node.name} answers"


@dataclass
class Rejoin:
    """The old primary (``target``, default ``primary``) becomes a replica of the other node."""

    target: str = "primary"
    idempotent: bool = True

    def _nodes(self, ctx: StepContext) -> tuple[NodeConfig, NodeConfig]:
        if self.target == "primary":
            return ctx.primary, ctx.standby
        return ctx.standby, ctx.primary

    async def run(self, ctx: StepContext, timeout: float) -> str:
        old, new = self._nodes(ctx)
        try:
            return await ctx.engine(old).rejoin(ctx.engine(new), timeout)
        except EngineError as exc:
            raise ActionError(f"rejoin of {old.name} to {new.name}: {exc}") from None

    def describe(self, ctx: StepContext) -> dict[str, Any]:
        old, new = self._nodes(ctx)
        return {
            "node": old.name,
            "replica_of": new.name,
            "engine": old.database.engine,
            "method": rejoin_method(old),
        }


def rejoin_method(node: NodeConfig) -> str:
    """How the engine rejoins ``node`` as a replica, from its configuration."""
    db = node.database
    if db.engine == "postgres":
        if not db.options.get("data_dir"):
            return f"none: database.data_dir is not set on {node.name} (the step will fail)"
        method = "stop, pg_rewind against the new primary, standby.signal, start"
        if db.options.get("rewind_fallback") == "basebackup":
            method += "; a fresh pg_basebackup if pg_rewind cannot"
        return method
    if db.engine == "mysql":
        method = (
            "CHANGE MASTER TO the new primary with GTID auto-positioning, START REPLICA,"
            " read_only=ON"
        )
        if db.options.get("rejoin_fallback") == "dump":
            method += "; if transactions diverged: resync with mariadb-dump (divergent)"
        return method
    if db.engine == "redis":
        return "REPLICAOF the new primary, wait for the link and the sync"
    return f"the {db.engine} engine's rejoin"


async def _position(engine: Engine, field: str, deadline: float) -> int:
    status = await engine.status(max(0.05, deadline - time.monotonic()))
    value = getattr(status, field)
    if value is None:
        raise EngineError(f"{field} unknown ({status.detail})")
    result: int = value
    return result


class GuardLink(Protocol):
    """The fleet leader's side of the guard beside the primary (``guard:``)."""

    async def clear(self, failover_id: str, node: str, timeout: float) -> str: ...


@dataclass
class GuardFence:
    """Have the old primary's guard fence it, and wait until promoting is safe: the
    guard fenced it, found its database down (it fences it the moment it answers), or
    has been silent past its isolation timeout. Not cleared within the step's timeout:
    the step fails, and its retries ask again (the order stands). The fleet inserts it
    before the promotion when ``guard:`` is configured."""

    idempotent: bool = True

    async def run(self, ctx: StepContext, timeout: float) -> str:
        link: GuardLink | None = ctx.extra.get("guard")
        if link is None:
            raise ActionError("guard_fence runs only on a fleet's leader with guard: configured")
        return await link.clear(ctx.failover_id, ctx.primary.name, timeout)

    def describe(self, ctx: StepContext) -> dict[str, Any]:
        return {"node": ctx.primary.name, "via": "the guard beside it"}


def _guard_fence(s: Section) -> Action:
    return GuardFence()


def _engine_call(verb: str, default_target: str) -> Callable[[Section], Action]:
    def parse(s: Section) -> Action:
        target = s.choice("target", ("primary", "standby"), default_target)
        return EngineCall(verb=verb, target=target)

    return parse


def _rejoin(s: Section) -> Action:
    return Rejoin(target=s.choice("target", ("primary", "standby"), "primary"))


def _catch_up(s: Section) -> Action:
    return CatchUp(poll=s.duration("poll_interval", 0.1, minimum=0.01))


ACTIONS: dict[str, Callable[[Section], Action]] = {
    "stop_replication": _engine_call("stop_replication", "standby"),
    "promote": _engine_call("promote", "standby"),
    "fence": _engine_call("fence", "primary"),
    "catch_up": _catch_up,
    "rejoin": _rejoin,
    "guard_fence": _guard_fence,
}
