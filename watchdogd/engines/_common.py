"""What every engine module shares: a password type that never shows, the
``host:port`` label of a server, and the one way a database call is bounded and
its failure turned into a single EngineError line."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import SplitResult, urlsplit

from watchdogd.engines import EngineError

if TYPE_CHECKING:
    from watchdogd.config import Section

T = TypeVar("T")


class Secret(str):
    """A password: compares and serialises like the string, never shows in a repr."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "'***'"


def validate_password(
    section: Section, dsn_password: Callable[[str], str | None]
) -> Mapping[str, Any]:
    """The ``password``/``password_file`` keys of a ``database:`` section, checked
    against a password written inside the DSN (also a secret; not both).
    ``dsn_password(dsn)`` returns the DSN's password or raises ValueError with a
    message that never repeats the DSN."""
    password = section.secret("password")
    # Config already read (and reported problems with) `dsn`; read it again for
    # its shape only, without repeating its ${VAR} errors.
    before = len(section.errors)
    dsn = section.raw("dsn")
    del section.errors[before:]
    if isinstance(dsn, str) and dsn:
        try:
            inline = dsn_password(dsn)
        except ValueError as exc:
            section.error(str(exc), "dsn")
        else:
            if inline:
                section.secrets.add(inline)
                if password:
                    section.error(
                        "give the password either in dsn or in password/password_file, not both",
                        "password",
                    )
    return {"password": Secret(password)} if password else {}


def split_dsn(
    dsn: str, schemes: tuple[str, ...], kind: str, example: str
) -> tuple[SplitResult, str, int | None]:
    """``urlsplit`` plus the checks every URL-style DSN shares (scheme, host, no query);
    returns the parts, the host and the port (None: the engine's default).
    A ValueError's message never repeats the DSN: it may hold a password."""
    try:
        parts = urlsplit(dsn.strip())
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"not a valid {kind} URL ({exc}); expected {example}") from None
    if parts.scheme not in schemes:
        raise ValueError(f"expected a URL like {example}, got scheme {parts.scheme or 'none'!r}")
    if not parts.hostname:
        raise ValueError(f"expected a host, e.g. {example}")
    if parts.query or parts.fragment:
        raise ValueError(f"query parameters are not supported; expected {example}")
    return parts, parts.hostname, port


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


def confirm_within(outage_threshold: float) -> int:
    """The replica link timeout, in whole seconds, that lets a replica give up on a
    hung primary within the outage threshold: the threshold rounded down, at least
    one second (the granularity every engine's setting accepts)."""
    return max(1, int(outage_threshold))


def keepalive_for(link_timeout: int) -> int:
    """A keepalive period that keeps a healthy idle link from reaching ``link_timeout``:
    about a third of it (two keepalives may be lost), at least one second."""
    return max(1, link_timeout // 3)
