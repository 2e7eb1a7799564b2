"""The ``http`` step: one HTTP request (maintenance switches, webhooks of a platform).

Placeholders in the URL are percent-encoded: an operator's ``{reason}`` holding ``#`` or
``&`` stays one value instead of rewriting the query. Redirects are not followed: the
step's headers often carry a token, and a redirect could carry it to another origin (or
from https to http); a 3xx is reported like any other unexpected status.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from watchdogd.actions import Action, ActionError, StepContext, render_template, templated
from watchdogd.core.section import Section

_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD")
_IDEMPOTENT = frozenset({"GET", "PUT", "DELETE", "HEAD"})
# Only the first line of an error body is shown: read no more than this of it.
BODY_LIMIT = 64 * 1024


@dataclass
class HttpAction:
    method: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    json_body: Any = None
    body: str | None = None
    expect_status: tuple[int, ...] = ()
    idempotent: bool = False

    def _rendered(self, ctx: StepContext) -> dict[str, Any]:
        return {
            "method": self.method,
            "url": render_template(
                self.url,
                {k: urllib.parse.quote(v, safe="") for k, v in ctx.placeholders.items()},
            ),
            "headers": ctx.render(self.headers),
            "json": ctx.render(self.json_body),
            "body": ctx.render(self.body),
        }

    async def run(self, ctx: StepContext, timeout: float) -> str:
        r = self._rendered(ctx)
        kwargs: dict[str, Any] = {"headers": r["headers"]}
        if self.json_body is not None:
            kwargs["json"] = r["json"]
        elif self.body is not None:
            kwargs["data"] = r["body"].encode()
        where = f"{self.method} {r['url']}"
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
                async with s.request(
                    self.method, r["url"], allow_redirects=False, **kwargs
                ) as resp:
                    raw = await resp.content.read(BODY_LIMIT)
                    text = _decode(raw, resp.charset)[:200]
                    ok = (
                        resp.status in self.expect_status
                        if self.expect_status
                        else 200 <= resp.status < 300
                    )
                    if not ok:
                        first = text.strip().splitlines()[0] if text.strip() else ""
                        raise ActionError(f"{where}: HTTP {resp.status} {first}".strip())
                    return f"{where}: HTTP {resp.status}"
        except TimeoutError:
            raise ActionError(f"{where}: no answer within {timeout:g}s") from None
        except aiohttp.ClientError as exc:
            raise ActionError(f"{where}: {type(exc).__name__}: {exc}") from None

    def describe(self, ctx: StepContext) -> dict[str, Any]:
        r = self._rendered(ctx)
        return {k: v for k, v in r.items() if v not in (None, {})}

    async def ready(self, ctx: StepContext, timeout: float) -> str:
        """The URL's host accepts a TCP connection (nothing is sent: the request may
        not be safe to repeat)."""
        import asyncio
        import contextlib
        import os

        parts = urllib.parse.urlsplit(self._rendered(ctx)["url"])
        try:
            host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as exc:  # a port that is not a number
            raise ActionError(f"{self.method} {parts.netloc}: bad URL ({exc})") from None
        if not host:
            raise ActionError(f"{self.method}: the URL has no host")
        where = f"{host}:{port}"
        try:
            async with asyncio.timeout(timeout):
                _, writer = await asyncio.open_connection(host, port)
        except TimeoutError:
            raise ActionError(f"{where}: no connection within {timeout:g}s") from None
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise ActionError(f"{where} does not accept connections: {reason}") from None
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return f"{where} accepts connections"


def _decode(raw: bytes, charset: str | None) -> str:
    try:
        return raw.decode(charset or "utf-8", "replace")
    except LookupError:  # a charset Python does not know
        return raw.decode("utf-8", "replace")


def parse(s: Section) -> Action:
    method = s.choice("method", _METHODS, "POST")
    url = s.str("url")
    if isinstance(url, str):
        templated(s, "url", url)
    headers = s.str_map("headers")
    templated(s, "headers", headers)
    json_body = s.raw("json")
    body = s.str("body", None, allow_empty=True)
    if json_body is not None and body is not None:
        s.error("give either json or body, not both")
    if json_body is not None:
        templated(s, "json", json_body)
        try:
            json.dumps(json_body)
        except (TypeError, ValueError):
            s.error("must be JSON-serialisable", "json")
    if body is not None:
        templated(s, "body", body)
    statuses = s.raw("expect_status", [])
    if isinstance(statuses, int):
        statuses = [statuses]
    if not isinstance(statuses, list) or not all(
        isinstance(x, int) and not isinstance(x, bool) and 100 <= x <= 599 for x in statuses
    ):
        s.error(f"expected HTTP status codes, got {statuses!r}", "expect_status")
        statuses = []
    return HttpAction(
        method=method or "POST",
        url=url or "",
        headers=headers,
        json_body=json_body,
        body=body,
        expect_status=tuple(statuses),
        idempotent=(method or "POST") in _IDEMPOTENT,
    )


ACTIONS: dict[str, Callable[[Section], Action]] = {"http": parse}
