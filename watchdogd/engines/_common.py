"""What every engine module shares: a password type that never shows, the
``host:port`` label of a server, and the one way a database call is bounded and
its failure turned into a single EngineError line."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from watchdogd.engines import EngineError

T = TypeVar("T")


class Secret(str):
    """A password: compares and serialises like the string, never shows in a repr."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "'***'"


def host_port(host: str, port: int) -> str:
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{port}"


def remaining(deadline: float) -> float:
    return max(deadline - asyncio.get_running_loop().time(), 0.001)


async def bounded(
    op: str,
    limit: float,
    body: Callable[[float], Awaitable[T]],
    line: Callable[[str], str],
    reason: Callable[[BaseException], str],
) -> T:
    """Run ``body(deadline)`` within ``limit`` seconds; every failure becomes one
    EngineError line (``line`` adds the engine and server and masks secrets)."""
    deadline = asyncio.get_running_loop().time() + limit
    try:
        async with asyncio.timeout(limit):
            return await body(deadline)
    except TimeoutError:
        raise EngineError(line(f"{op} timed out after {limit:g}s")) from None
    except EngineError:
        raise
    except Exception as exc:
        raise EngineError(line(f"{op}: {reason(exc)}")) from None
