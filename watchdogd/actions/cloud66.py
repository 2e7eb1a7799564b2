"""The ``cloud66`` action and the top-level ``cloud66:`` section: Cloud 66 API v3 calls.

Owns the three Cloud 66 operations a failover uses, each started with one call
and then polled until Cloud 66 reports it finished, all within the step timeout:

- ``maintenance``: ``PUT /stacks/{stack}/settings/maintenance-mode.json``
  ``{"value": true|false}``; the reply is a stack action, polled at
  ``GET /stacks/{stack}/actions/{id}``.
- ``promote_replica``: ``POST /stacks/{stack}/actions.json``
  ``{"command": "promote_slave_db", "server_uid": ..., "db_type": ...}``; the
  reply is a stack action, polled the same way.
- ``switch_failover_group``: ``GET /failover_groups/{uid}`` (nothing to do when it
  already points at the wanted stack), ``PUT /failover_groups/{uid}``
  ``{"current_stack": 1|2}`` (primary → 1, secondary → 2), then
  ``GET /failover_groups/{uid}`` until it is no longer toggling.

Response shapes assumed (Cloud 66 API v3 docs and its Go client, cloud66-oss/cloud66):
every reply wraps its object as ``{"response": {...}}``; a stack action is
``{"id": 10, "finished_at": null | "<time>", "finished_success": null | bool,
"finished_message": null | "<text>", ...}`` and is done once ``finished_at`` is
set; a failover group is ``{"uid": ..., "current_stack": 1 | 2, "busy_toggling":
bool, ...}``; an error is ``{"error": "<code>", "error_description": "<text>"}``
(sometimes ``"details"``). While polling, 5xx replies and connection errors are
tolerated until the step's deadline (the operation is already running on Cloud
66's side); any other error fails the step at once.

The bearer token comes from ``cloud66: {token: "${C66_TOKEN}"}`` or
``cloud66: {token_file: PATH}``; it is never part of describe() or of an error,
even when the API echoes it back.
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.parse
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from watchdogd.actions import ActionError, template_fields, templated
from watchdogd.core.secrets import mask
from watchdogd.core.units import format_duration

if TYPE_CHECKING:
    import aiohttp

    from watchdogd.actions import StepContext
    from watchdogd.core.model import Config
    from watchdogd.core.section import Section

SECTION = "cloud66"
API_BASE = "https://app.cloud66.com/api/3"
OPERATIONS = ("maintenance", "promote_replica", "switch_failover_group")
DB_TYPES = ("mysql", "postgresql", "redis", "mongodb")
DEFAULT_POLL_INTERVAL = 3.0
# API replies are small JSON envelopes; a larger one is cut (and then fails to parse).
REPLY_LIMIT = 1024 * 1024

# Which step keys belong to which operation (``poll_interval`` goes with all).
_KEYS = {
    "maintenance": ("stack", "enabled"),
    "promote_replica": ("stack", "server", "db_type"),
    "switch_failover_group": ("failover_group", "to"),
}
_CURRENT_STACK = {"primary": 1, "secondary": 2}
# Path segments are UIDs; this also keeps a rendered placeholder from escaping the path.
_UID = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class Cloud66Settings:
    """The parsed top-level ``cloud66:`` section (``ctx.config.providers["cloud66"]``)."""

    token: str = field(repr=False)


def parse_section(s: Section) -> Cloud66Settings:
    token = s.secret("token", required=True)
    return Cloud66Settings(token=token if isinstance(token, str) else "")


class _ApiError(Exception):
    def __init__(self, message: str, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


class _Api:
    """One run's calls: bearer auth, the ``response`` envelope, one-line errors."""

    def __init__(self, session: aiohttp.ClientSession, token: str, secrets: set[str]) -> None:
        self.session = session
        self.token = token
        self.secrets = secrets | {token}

    async def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        import aiohttp

        what = f"cloud66 {method} {path}"
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        try:
            # Not following redirects: the bearer token must reach the API and nothing else.
            async with self.session.request(
                method, API_BASE + path, json=body, headers=headers, allow_redirects=False
            ) as resp:
                status = resp.status
                text = (await resp.content.read(REPLY_LIMIT)).decode("utf-8", "replace")
        except aiohttp.ClientError as exc:
            raise _ApiError(self.mask(f"{what}: {_exc_text(exc)}"), transient=True) from None
        try:
            data = json.loads(text) if text.strip() else None
        except ValueError:
            data = None
        if 300 <= status < 400:
            raise _ApiError(
                f"{what}: HTTP {status} redirect to {_origin(resp.headers.get('Location'))}, "
                "not followed (the token goes to the API only)",
                transient=False,
            )
        if status >= 400:
            message = _error_message(data)
            raise _ApiError(
                self.mask(f"{what}: HTTP {status}" + (f": {message}" if message else "")),
                transient=status >= 500 or status == 429,
            )
        if not isinstance(data, dict) or "response" not in data:
            raise _ApiError(
                f"{what}: unexpected reply (HTTP {status}, expected JSON with a 'response' field)",
                transient=False,
            )
        return data["response"]

    def mask(self, text: str) -> str:
        return mask(text, self.secrets)


def _origin(location: str | None) -> str:
    """Where a redirect points, without path or query (they may carry anything)."""
    if not location:
        return "nowhere"
    parts = urllib.parse.urlsplit(location)
    return f"{parts.scheme}://{parts.netloc}" if parts.netloc else "a path on the API"


def _error_message(data: Any) -> str:
    if not isinstance(data, dict):
        return ""
    for key in ("details", "error_description", "message", "error"):
        value = data.get(key)
        if isinstance(value, str) and value.strip():
            return " ".join(value.split())[:300]
    return ""


def _exc_text(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Cloud66Action:
    def __init__(
        self,
        operation: str,
        params: dict[str, Any],
        poll_interval: float,
    ) -> None:
        self.operation = operation
        self.params = params  # string values may hold placeholders
        self.poll_interval = poll_interval
        # Promoting twice is not safe to assume harmless; the other two converge.
        self.idempotent = operation != "promote_replica"

    # -- Action protocol

    def describe(self, ctx: StepContext) -> dict[str, Any]:
        p = ctx.render(self.params)
        every = format_duration(self.poll_interval)
        if self.operation == "maintenance":
            stack = p["stack"]
            return {
                "operation": self.operation,
                "request": f"PUT {API_BASE}/stacks/{stack}/settings/maintenance-mode.json",
                "body": {"value": p["enabled"]},
                "then": f"poll GET {API_BASE}/stacks/{stack}/actions/{{id}} every {every} "
                "until finished",
            }
        if self.operation == "promote_replica":
            stack = p["stack"]
            return {
                "operation": self.operation,
                "request": f"POST {API_BASE}/stacks/{stack}/actions.json",
                "body": self._promote_body(p),
                "then": f"poll GET {API_BASE}/stacks/{stack}/actions/{{id}} every {every} "
                "until finished",
            }
        group = p["failover_group"]
        return {
            "operation": self.operation,
            "request": f"PUT {API_BASE}/failover_groups/{group}",
            "body": {"current_stack": _CURRENT_STACK[p["to"]]},
            "then": f"poll GET {API_BASE}/failover_groups/{group} every {every} "
            f"until it points at the {p['to']} stack and is not toggling",
        }

    async def run(self, ctx: StepContext, timeout: float) -> str:
        import aiohttp

        settings = ctx.config.providers.get(SECTION)
        if not isinstance(settings, Cloud66Settings) or not settings.token:
            raise ActionError(
                "cloud66: the config has no top-level cloud66 section with a token (or token_file)"
            )
        p = ctx.render(self.params)
        for key in ("stack", "failover_group", "server"):
            if key in p and not _UID.match(p[key]):
                raise ActionError(f"cloud66 {self.operation}: {key} {p[key]!r} is not a UID")
        progress = _Progress(f"starting {self.operation}")
        try:
            async with asyncio.timeout(timeout), aiohttp.ClientSession() as session:
                api = _Api(session, settings.token, set(ctx.config.secrets))
                if self.operation == "maintenance":
                    return await self._maintenance(api, p, progress)
                if self.operation == "promote_replica":
                    return await self._promote(api, p, progress)
                return await self._switch(api, p, progress)
        except TimeoutError:
            raise ActionError(
                mask(
                    f"cloud66 {self.operation}: timed out after {format_duration(timeout)} "
                    f"{progress.doing}" + (f" (last: {progress.last})" if progress.last else ""),
                    {settings.token, *ctx.config.secrets},
                )
            ) from None
        except _ApiError as exc:
            raise ActionError(str(exc)) from None

    async def ready(self, ctx: StepContext, timeout: float) -> str:
        """Read-only calls that the step's own would need: the token is accepted and
        the stack (and its server), or the failover group, exists."""
        import aiohttp

        settings = ctx.config.providers.get(SECTION)
        if not isinstance(settings, Cloud66Settings) or not settings.token:
            raise ActionError("cloud66: the config has no top-level cloud66 section with a token")
        p = ctx.render(self.params)
        for key in ("stack", "failover_group", "server"):
            if key in p and not _UID.match(p[key]):
                raise ActionError(f"cloud66 {self.operation}: {key} {p[key]!r} is not a UID")
        if self.operation == "switch_failover_group":
            paths = [(f"/failover_groups/{p['failover_group']}", "failover group")]
        else:
            paths = [(f"/stacks/{p['stack']}", "stack")]
            if self.operation == "promote_replica":
                paths.append((f"/stacks/{p['stack']}/servers/{p['server']}", "server"))
        try:
            async with asyncio.timeout(timeout), aiohttp.ClientSession() as session:
                api = _Api(session, settings.token, set(ctx.config.secrets))
                for path, what in paths:
                    reply = await api.call("GET", path)
                    if what == "failover group":
                        _group_state(reply, path)
                    elif not isinstance(reply, dict):
                        raise ActionError(
                            f"cloud66 GET {path}: unexpected reply: expected a {what}"
                        )
        except _ApiError as exc:
            hint = ""
            if " HTTP 401" in str(exc):
                hint = " (the token was refused)"
            elif " HTTP 404" in str(exc):
                hint = f" (no such {what}, or the token cannot see it)"
            raise ActionError(f"{exc}{hint}") from None
        return "token accepted; " + ", ".join(f"{w} {path} exists" for path, w in paths)

    # -- operations

    async def _maintenance(self, api: _Api, p: dict[str, Any], progress: _Progress) -> str:
        stack, enabled = p["stack"], p["enabled"]
        path = f"/stacks/{stack}/settings/maintenance-mode.json"
        progress.doing = f"setting maintenance mode on stack {stack}"
        reply = await api.call("PUT", path, {"value": enabled})
        message = await self._wait_action(api, stack, reply, f"PUT {path}", progress)
        state = "on" if enabled else "off"
        return f"stack {stack} maintenance mode {state}" + (f": {message}" if message else "")

    def _promote_body(self, p: dict[str, Any]) -> dict[str, Any]:
        return {"command": "promote_slave_db", "server_uid": p["server"], "db_type": p["db_type"]}

    async def _promote(self, api: _Api, p: dict[str, Any], progress: _Progress) -> str:
        stack = p["stack"]
        path = f"/stacks/{stack}/actions.json"
        progress.doing = f"asking stack {stack} to promote server {p['server']}"
        reply = await api.call("POST", path, self._promote_body(p))
        message = await self._wait_action(api, stack, reply, f"POST {path}", progress)
        return f"stack {stack} promoted {p['db_type']} replica {p['server']}" + (
            f": {message}" if message else ""
        )

    async def _wait_action(
        self, api: _Api, stack: str, action: Any, call: str, progress: _Progress
    ) -> str:
        """Poll a stack action until it finishes; its finished_message (or "")."""
        if not isinstance(action, dict) or not isinstance(action.get("id"), int | str):
            raise ActionError(
                f"cloud66 {call}: unexpected reply: expected a stack action with an id"
            )
        action_id = action["id"]
        path = f"/stacks/{stack}/actions/{action_id}"
        progress.doing = f"waiting for stack action {action_id} to finish"
        while True:
            if action.get("finished_at") is not None:
                message = action.get("finished_message")
                message = " ".join(message.split()) if isinstance(message, str) else ""
                if action.get("finished_success") is not True:
                    raise ActionError(
                        api.mask(
                            f"cloud66 {self.operation}: stack action {action_id} failed"
                            + (f": {message}" if message else " (no message)")
                        )
                    )
                return message
            await asyncio.sleep(self.poll_interval)
            fresh = await self._poll(api, "GET", path, progress)
            if fresh is None:
                continue
            if not isinstance(fresh, dict):
                raise ActionError(f"cloud66 GET {path}: unexpected reply: expected an action")
            action = fresh
            progress.last = "still running" + (
                f" (started {action['started_at']})" if action.get("started_at") else ""
            )

    async def _switch(self, api: _Api, p: dict[str, Any], progress: _Progress) -> str:
        uid, to = p["failover_group"], p["to"]
        want = _CURRENT_STACK[to]
        path = f"/failover_groups/{uid}"
        progress.doing = f"reading failover group {uid}"
        current, busy = _group_state(await api.call("GET", path), path)
        if current == want and not busy:
            return f"failover group {uid} already points at the {to} stack"
        progress.doing = f"switching failover group {uid} to the {to} stack"
        await api.call("PUT", path, {"current_stack": want})
        progress.doing = f"waiting for failover group {uid} to point at the {to} stack"
        seen_busy = False
        while True:
            await asyncio.sleep(self.poll_interval)
            reply = await self._poll(api, "GET", path, progress)
            if reply is None:
                continue
            current, busy = _group_state(reply, path)
            progress.last = f"current_stack {current}" + (", toggling" if busy else "")
            if busy:
                seen_busy = True
                continue
            if current == want:
                return f"failover group {uid} now points at the {to} stack"
            if seen_busy:
                raise ActionError(
                    f"cloud66 switch_failover_group: failover group {uid} finished toggling "
                    f"but points at current_stack {current}, not {want} ({to})"
                )

    async def _poll(self, api: _Api, method: str, path: str, progress: _Progress) -> Any:
        """A polling call; None after a transient failure (retried on the next tick)."""
        try:
            return await api.call(method, path)
        except _ApiError as exc:
            if not exc.transient:
                raise
            progress.last = str(exc)
            return None


@dataclass
class _Progress:
    """Where a run is, for the timeout message (one per run, not shared)."""

    doing: str
    last: str = ""


def _group_state(group: Any, path: str) -> tuple[int, bool]:
    if (
        not isinstance(group, dict)
        or group.get("current_stack") not in (1, 2)
        or not isinstance(group.get("busy_toggling", False), bool)
    ):
        raise ActionError(
            f"cloud66 GET {path}: unexpected reply: expected a failover group with "
            "current_stack 1 or 2"
        )
    return int(group["current_stack"]), bool(group.get("busy_toggling", False))


# --------------------------------------------------------------------------- config


def _uid(s: Section, key: str) -> Any:
    value = s.str(key)
    if isinstance(value, str):
        templated(s, key, value)
        try:
            has_fields = bool(template_fields(value))
        except ValueError:
            has_fields = True  # reported by templated()
        if not has_fields and not _UID.match(value):
            s.error(f"expected a Cloud 66 UID (letters, digits, '-', '_', '.'), got {value!r}", key)
    return value


def parse(s: Section) -> Cloud66Action:
    operation = s.choice("operation", OPERATIONS)
    poll_interval = s.duration("poll_interval", DEFAULT_POLL_INTERVAL, minimum=0.01)
    params: dict[str, Any] = {}
    if operation == "maintenance":
        params = {"stack": _uid(s, "stack"), "enabled": s.bool("enabled")}
    elif operation == "promote_replica":
        params = {
            "stack": _uid(s, "stack"),
            "server": _uid(s, "server"),
            "db_type": s.choice("db_type", DB_TYPES),
        }
    elif operation == "switch_failover_group":
        params = {
            "failover_group": _uid(s, "failover_group"),
            "to": s.choice("to", tuple(_CURRENT_STACK)),
        }
    if operation is None:
        # Unknown operation: its error says it all; do not also call every key unknown.
        for key in {k for keys in _KEYS.values() for k in keys}:
            s.raw(key)
    else:
        for key in sorted({k for keys in _KEYS.values() for k in keys} - set(_KEYS[operation])):
            if s.has(key):
                s.raw(key)  # reported here, not again as an unknown key
                users = [op for op, keys in _KEYS.items() if key in keys]
                s.error(
                    f"does not apply to operation {operation} (only to {', '.join(users)})", key
                )
    return Cloud66Action(
        operation=operation or "maintenance",
        params=params,
        poll_interval=poll_interval or DEFAULT_POLL_INTERVAL,
    )


ACTIONS = {"cloud66": parse}


def check(config: Config) -> list[str]:
    """A cloud66 step needs the top-level section with the token: say so at config time,
    not at 3 a.m. when the step runs."""
    if SECTION in config.providers:
        return []
    problems = []
    for key, steps in (
        ("steps", config.failover.steps),
        ("fence_steps", config.failover.fence_steps),
        ("rejoin_steps", config.failover.rejoin_steps),
    ):
        for i, step in enumerate(steps):
            if step.action == "cloud66":
                problems.append(
                    f"failover.{key}[{i}]: action cloud66 needs a top-level "
                    "cloud66 section with token (or token_file)"
                )
    return problems
