"""The cloud66 action against a mocked Cloud 66 API (the vendor API cannot be reached
here), plus the config contract of the cloud66, haproxy and dns steps."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aioresponses import aioresponses
from yarl import URL

from tests.support.vendor import VendorAPI
from watchdogd import config
from watchdogd.actions import ActionError, StepContext, validate_step
from watchdogd.actions import describe as describe_step
from watchdogd.actions.cloud66 import API_BASE, Cloud66Action, Cloud66Settings, parse
from watchdogd.config import ConfigError
from watchdogd.core.model import Config, DatabaseConfig, NodeConfig, StepConfig
from watchdogd.core.section import Section

TOKEN = "c66-secret-token-4f1e9a"
STACK = "5999b763474b0eafa5fafb64bff0ba80"
GROUP = "fg-7a1c"
POLL = "10ms"


def _ctx(token: str | None = TOKEN) -> StepContext:
    def node(name: str) -> NodeConfig:
        return NodeConfig(name=name, database=DatabaseConfig(engine="postgres", dsn="x"))

    providers = {} if token is None else {"cloud66": Cloud66Settings(token=token)}
    cfg = Config(
        cluster="shop",
        primary=node("main"),
        standby=node("failover"),
        providers=providers,
        secrets=frozenset({token} if token else ()),
    )
    return StepContext(
        config=cfg,
        primary=cfg.primary,
        standby=cfg.standby,
        engines={},
        failover_id="fo-1",
        reason="test",
        trigger="manual",
    )


def _action(**keys: Any) -> Cloud66Action:
    errors: list[str] = []
    section = Section({"poll_interval": POLL, **keys}, "failover.steps[4]", errors, set())
    action = parse(section)
    section.finish()
    assert errors == []
    return action


def _errors(keys: dict[str, Any]) -> list[str]:
    errors: list[str] = []
    section = Section(keys, "failover.steps[4]", errors, set())
    parse(section)
    section.finish()
    return errors


def _action_reply(
    finished: bool, success: bool | None = None, message: str | None = None, action_id: int = 7
) -> dict[str, Any]:
    return {
        "response": {
            "id": action_id,
            "user": "ops@example.com",
            "resource_type": "stack",
            "action": "stack-set: maintenance.mode",
            "started_via": "api",
            "started_at": "2026-11-28T02:00:00Z",
            "finished_at": "2026-11-28T02:00:09Z" if finished else None,
            "finished_success": success,
            "finished_message": message,
        }
    }


def _group(current: int, busy: bool) -> dict[str, Any]:
    return {
        "response": {
            "uid": GROUP,
            "address": "fg.example.c66.me",
            "primary_stack_uid": "stk-1",
            "secondary_stack_uid": "stk-2",
            "current_stack": current,
            "busy_toggling": busy,
        }
    }


def _calls(m: aioresponses, method: str, url: str) -> list[Any]:
    return list(m.requests.get((method, URL(url)), []))


@pytest.fixture
def api() -> Iterator[aioresponses]:
    with VendorAPI() as m:
        yield m


# --------------------------------------------------------------------------- operations


async def test_maintenance_on_puts_the_setting_and_polls_until_finished(api: aioresponses) -> None:
    put = f"{API_BASE}/stacks/{STACK}/settings/maintenance-mode.json"
    poll = f"{API_BASE}/stacks/{STACK}/actions/7"
    api.put(put, payload=_action_reply(finished=False))
    api.get(poll, payload=_action_reply(finished=False))
    api.get(poll, payload=_action_reply(finished=False))
    api.get(poll, payload=_action_reply(finished=True, success=True, message="done"))

    detail = await _action(operation="maintenance", stack=STACK, enabled=True).run(_ctx(), 5)

    assert detail == f"stack {STACK} maintenance mode on: done"
    [call] = _calls(api, "PUT", put)
    assert call.kwargs["json"] == {"value": True}
    assert call.kwargs["headers"]["Authorization"] == f"Bearer {TOKEN}"
    polls = _calls(api, "GET", poll)
    assert len(polls) == 3
    assert all(c.kwargs["headers"]["Authorization"] == f"Bearer {TOKEN}" for c in polls)


async def test_maintenance_off_sends_false_and_accepts_an_already_finished_reply(
    api: aioresponses,
) -> None:
    put = f"{API_BASE}/stacks/{STACK}/settings/maintenance-mode.json"
    api.put(put, payload=_action_reply(finished=True, success=True))

    detail = await _action(operation="maintenance", stack=STACK, enabled=False).run(_ctx(), 5)

    assert detail == f"stack {STACK} maintenance mode off"
    assert _calls(api, "PUT", put)[0].kwargs["json"] == {"value": False}
    assert _calls(api, "GET", f"{API_BASE}/stacks/{STACK}/actions/7") == []


async def test_promote_replica_posts_the_command_and_polls(api: aioresponses) -> None:
    post = f"{API_BASE}/stacks/{STACK}/actions.json"
    poll = f"{API_BASE}/stacks/{STACK}/actions/42"
    api.post(post, payload=_action_reply(finished=False, action_id=42))
    api.get(poll, payload=_action_reply(finished=False, action_id=42))
    api.get(poll, payload=_action_reply(finished=True, success=True, action_id=42))

    action = _action(operation="promote_replica", stack=STACK, server="srv-9", db_type="postgresql")
    assert action.idempotent is False
    detail = await action.run(_ctx(), 5)

    assert detail == f"stack {STACK} promoted postgresql replica srv-9"
    [call] = _calls(api, "POST", post)
    assert call.kwargs["json"] == {
        "command": "promote_slave_db",
        "server_uid": "srv-9",
        "db_type": "postgresql",
    }
    assert call.kwargs["headers"]["Authorization"] == f"Bearer {TOKEN}"
    assert len(_calls(api, "GET", poll)) == 2


async def test_failed_stack_action_fails_the_step_with_its_message(api: aioresponses) -> None:
    api.post(f"{API_BASE}/stacks/{STACK}/actions.json", payload=_action_reply(False, action_id=5))
    api.get(
        f"{API_BASE}/stacks/{STACK}/actions/5",
        payload=_action_reply(
            True, success=False, message="Server srv-9 is not a replica", action_id=5
        ),
    )
    action = _action(operation="promote_replica", stack=STACK, server="srv-9", db_type="mysql")
    with pytest.raises(ActionError) as err:
        await action.run(_ctx(), 5)
    assert str(err.value) == (
        "cloud66 promote_replica: stack action 5 failed: Server srv-9 is not a replica"
    )


async def test_switch_failover_group_puts_and_polls_until_not_toggling(api: aioresponses) -> None:
    url = f"{API_BASE}/failover_groups/{GROUP}"
    api.get(url, payload=_group(1, busy=False))  # the idempotence check
    api.put(url, payload=_group(1, busy=True))
    api.get(url, payload=_group(1, busy=True))
    api.get(url, payload=_group(2, busy=True))
    api.get(url, payload=_group(2, busy=False))

    action = _action(operation="switch_failover_group", failover_group=GROUP, to="secondary")
    detail = await action.run(_ctx(), 5)

    assert detail == f"failover group {GROUP} now points at the secondary stack"
    [put] = _calls(api, "PUT", url)
    assert put.kwargs["json"] == {"current_stack": 2}
    assert put.kwargs["headers"]["Authorization"] == f"Bearer {TOKEN}"
    assert len(_calls(api, "GET", url)) == 4


async def test_switch_to_where_the_group_already_points_does_nothing(api: aioresponses) -> None:
    url = f"{API_BASE}/failover_groups/{GROUP}"
    api.get(url, payload=_group(1, busy=False))
    action = _action(operation="switch_failover_group", failover_group=GROUP, to="primary")
    assert await action.run(_ctx(), 5) == (
        f"failover group {GROUP} already points at the primary stack"
    )
    assert _calls(api, "PUT", url) == []


async def test_switch_that_lands_on_the_wrong_stack_fails(api: aioresponses) -> None:
    url = f"{API_BASE}/failover_groups/{GROUP}"
    api.get(url, payload=_group(1, busy=False))
    api.put(url, payload=_group(1, busy=True))
    api.get(url, payload=_group(1, busy=True))
    api.get(url, payload=_group(1, busy=False))
    action = _action(operation="switch_failover_group", failover_group=GROUP, to="secondary")
    with pytest.raises(ActionError) as err:
        await action.run(_ctx(), 5)
    assert str(err.value) == (
        f"cloud66 switch_failover_group: failover group {GROUP} finished toggling but points "
        "at current_stack 1, not 2 (secondary)"
    )


async def test_polling_is_bounded_by_the_step_timeout(api: aioresponses) -> None:
    api.put(
        f"{API_BASE}/stacks/{STACK}/settings/maintenance-mode.json", payload=_action_reply(False)
    )
    api.get(f"{API_BASE}/stacks/{STACK}/actions/7", payload=_action_reply(False), repeat=True)
    action = _action(operation="maintenance", stack=STACK, enabled=True)

    started = time.monotonic()
    with pytest.raises(ActionError) as err:
        await action.run(_ctx(), 0.2)
    elapsed = time.monotonic() - started

    assert 0.2 <= elapsed < 2.0
    assert str(err.value) == (
        "cloud66 maintenance: timed out after 200ms waiting for stack action 7 to finish "
        "(last: still running (started 2026-11-28T02:00:00Z))"
    )


async def test_transient_poll_errors_are_tolerated(api: aioresponses) -> None:
    poll = f"{API_BASE}/stacks/{STACK}/actions/7"
    api.put(
        f"{API_BASE}/stacks/{STACK}/settings/maintenance-mode.json", payload=_action_reply(False)
    )
    api.get(poll, status=502, body="Bad Gateway")
    api.get(poll, status=503, payload={"error": "unavailable"})
    api.get(poll, payload=_action_reply(True, success=True))
    action = _action(operation="maintenance", stack=STACK, enabled=True)
    assert await action.run(_ctx(), 5) == f"stack {STACK} maintenance mode on"
    assert len(_calls(api, "GET", poll)) == 3


async def test_a_client_error_while_polling_fails_at_once(api: aioresponses) -> None:
    poll = f"{API_BASE}/stacks/{STACK}/actions/7"
    api.put(
        f"{API_BASE}/stacks/{STACK}/settings/maintenance-mode.json", payload=_action_reply(False)
    )
    api.get(poll, status=404, payload={"error": "not_found", "error_description": "No action"})
    action = _action(operation="maintenance", stack=STACK, enabled=True)
    with pytest.raises(ActionError) as err:
        await action.run(_ctx(), 5)
    assert str(err.value) == f"cloud66 GET /stacks/{STACK}/actions/7: HTTP 404: No action"


async def test_401_names_the_call_and_masks_an_echoed_token(api: aioresponses) -> None:
    api.put(
        f"{API_BASE}/stacks/{STACK}/settings/maintenance-mode.json",
        status=401,
        payload={
            "error": "invalid_token",
            "error_description": f"The access token {TOKEN} is invalid",
        },
    )
    action = _action(operation="maintenance", stack=STACK, enabled=True)
    with pytest.raises(ActionError) as err:
        await action.run(_ctx(), 5)
    assert str(err.value) == (
        f"cloud66 PUT /stacks/{STACK}/settings/maintenance-mode.json: HTTP 401: "
        "The access token *** is invalid"
    )


async def test_a_redirect_is_not_followed_with_the_token(api: aioresponses) -> None:
    # Issue 15: the bearer token must never travel to wherever a redirect points.
    elsewhere = "http://collector.example.net/steal?x=1"
    api.put(
        f"{API_BASE}/stacks/{STACK}/settings/maintenance-mode.json",
        status=302,
        headers={"Location": elsewhere},
    )
    api.put(elsewhere, payload=_action_reply(True, True))
    action = _action(operation="maintenance", stack=STACK, enabled=True)
    with pytest.raises(ActionError) as err:
        await action.run(_ctx(), 5)
    assert str(err.value) == (
        f"cloud66 PUT /stacks/{STACK}/settings/maintenance-mode.json: HTTP 302 redirect to "
        "http://collector.example.net, not followed (the token goes to the API only)"
    )
    assert not _calls(api, "PUT", elsewhere)


async def test_500_without_json_is_one_line(api: aioresponses) -> None:
    api.post(
        f"{API_BASE}/stacks/{STACK}/actions.json",
        status=500,
        body="<html>\n<h1>Internal Server Error</h1>\n</html>",
    )
    action = _action(operation="promote_replica", stack=STACK, server="s", db_type="redis")
    with pytest.raises(ActionError) as err:
        await action.run(_ctx(), 5)
    assert str(err.value) == f"cloud66 POST /stacks/{STACK}/actions.json: HTTP 500"


async def test_unexpected_success_reply_is_reported(api: aioresponses) -> None:
    api.put(f"{API_BASE}/stacks/{STACK}/settings/maintenance-mode.json", payload={"ok": True})
    action = _action(operation="maintenance", stack=STACK, enabled=True)
    with pytest.raises(ActionError) as err:
        await action.run(_ctx(), 5)
    assert str(err.value) == (
        f"cloud66 PUT /stacks/{STACK}/settings/maintenance-mode.json: unexpected reply "
        "(HTTP 200, expected JSON with a 'response' field)"
    )


async def test_missing_cloud66_section_is_a_clear_error() -> None:
    action = _action(operation="maintenance", stack=STACK, enabled=True)
    with pytest.raises(ActionError) as err:
        await action.run(_ctx(token=None), 5)
    assert str(err.value) == (
        "cloud66: the config has no top-level cloud66 section with a token (or token_file)"
    )


# --------------------------------------------------------------------------- describe


def test_describe_is_rendered_and_has_no_token() -> None:
    ctx = _ctx()
    maintenance = _action(operation="maintenance", stack="stk-{standby.name}", enabled=False)
    assert maintenance.describe(ctx) == {
        "operation": "maintenance",
        "request": f"PUT {API_BASE}/stacks/stk-failover/settings/maintenance-mode.json",
        "body": {"value": False},
        "then": f"poll GET {API_BASE}/stacks/stk-failover/actions/{{id}} every 10ms until finished",
    }
    promote = _action(operation="promote_replica", stack=STACK, server="srv", db_type="mysql")
    assert promote.describe(ctx)["body"] == {
        "command": "promote_slave_db",
        "server_uid": "srv",
        "db_type": "mysql",
    }
    switch = _action(operation="switch_failover_group", failover_group=GROUP, to="primary")
    assert switch.describe(ctx) == {
        "operation": "switch_failover_group",
        "request": f"PUT {API_BASE}/failover_groups/{GROUP}",
        "body": {"current_stack": 1},
        "then": f"poll GET {API_BASE}/failover_groups/{GROUP} every 10ms until it points at "
        "the primary stack and is not toggling",
    }
    for action in (maintenance, promote, switch):
        assert TOKEN not in repr(action.describe(ctx))
    assert TOKEN not in repr(Cloud66Settings(token=TOKEN))
    step = StepConfig(name="c66", action="cloud66")
    assert TOKEN not in repr(describe_step(step, switch, ctx))


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        (
            {"operation": "flip", "stack": STACK},
            "failover.steps[4].operation: expected one of maintenance, promote_replica, "
            "switch_failover_group, got 'flip'",
        ),
        (
            {"operation": "maintenance", "stack": STACK},
            "failover.steps[4].enabled: is required",
        ),
        (
            {"operation": "maintenance", "stack": STACK, "enabled": "yes"},
            "failover.steps[4].enabled: expected true or false, got 'yes'",
        ),
        (
            {"operation": "maintenance", "stack": STACK, "enabled": True, "to": "primary"},
            "failover.steps[4].to: does not apply to operation maintenance "
            "(only to switch_failover_group)",
        ),
        (
            {
                "operation": "switch_failover_group",
                "failover_group": GROUP,
                "to": "primary",
                "stack": STACK,
            },
            "failover.steps[4].stack: does not apply to operation switch_failover_group "
            "(only to maintenance, promote_replica)",
        ),
        (
            {"operation": "switch_failover_group", "failover_group": GROUP, "to": "standby"},
            "failover.steps[4].to: expected one of primary, secondary, got 'standby'",
        ),
        (
            {"operation": "promote_replica", "stack": STACK, "server": "s", "db_type": "pg"},
            "failover.steps[4].db_type: expected one of mysql, postgresql, redis, mongodb, "
            "got 'pg'",
        ),
        (
            {"operation": "promote_replica", "stack": "a/../b", "server": "s", "db_type": "mysql"},
            "failover.steps[4].stack: expected a Cloud 66 UID (letters, digits, '-', '_', '.'), "
            "got 'a/../b'",
        ),
        (
            {"operation": "maintenance", "stack": STACK, "enabled": True, "poll_interval": "1ms"},
            "failover.steps[4].poll_interval: must be at least 10ms, got '1ms'",
        ),
        (
            {"operation": "maintenance", "stack": "{stack}", "enabled": True},
            "failover.steps[4].stack: unknown placeholder {stack}; known: {cluster}, "
            "{failover_id}, {primary.name}, {reason}, {standby.name}, {trigger}",
        ),
        (
            {"operation": "maintenance", "stack": STACK, "enabled": True, "token": "x"},
            "failover.steps[4].token: unknown key",
        ),
    ],
)
def test_bad_step_keys_are_reported_with_their_path(keys: dict[str, Any], expected: str) -> None:
    assert _errors(keys) == [expected]


def test_missing_keys_of_promote_are_each_reported() -> None:
    assert _errors({"operation": "promote_replica"}) == [
        "failover.steps[4].stack: is required",
        "failover.steps[4].server: is required",
        "failover.steps[4].db_type: is required",
    ]


def _full_config(tmp_path: Path) -> dict[str, Any]:
    def node(name: str, port: int) -> dict[str, Any]:
        return {
            "name": name,
            "database": {"engine": "postgres", "dsn": f"postgresql://wd@127.0.0.1:{port}/app"},
            "app": {"health_url": f"http://127.0.0.1:{port + 1000}/health"},
        }

    key_file = tmp_path / "tsig.key"
    key_file.write_text("c2VjcmV0LXRzaWcta2V5LWZvci10ZXN0cw==\n")
    return {
        "cluster": "shop",
        "primary": node("main", 5433),
        "standby": node("failover", 5434),
        "cloud66": {"token": "${C66_TOKEN}"},
        "failover": {
            "steps": [
                {
                    "name": "primary_maintenance_on",
                    "action": "cloud66",
                    "operation": "maintenance",
                    "stack": "stk-main",
                    "enabled": True,
                    "required": False,
                    "timeout": "20s",
                },
                {"name": "stop_replication", "action": "stop_replication"},
                {
                    "name": "promote",
                    "action": "cloud66",
                    "operation": "promote_replica",
                    "stack": "stk-failover",
                    "server": "srv-db2",
                    "db_type": "postgresql",
                    "timeout": "10m",
                    "poll_interval": "5s",
                },
                {
                    "name": "standby_maintenance_off",
                    "action": "cloud66",
                    "operation": "maintenance",
                    "stack": "stk-failover",
                    "enabled": False,
                },
                {
                    "name": "switch_group",
                    "action": "cloud66",
                    "operation": "switch_failover_group",
                    "failover_group": "fg-1",
                    "to": "secondary",
                },
                {
                    "name": "lb",
                    "action": "haproxy",
                    "socket": "/run/haproxy/admin.sock",
                    "backend": "app",
                    "activate": "{standby.name}",
                    "deactivate": "{primary.name}",
                },
                {
                    "name": "dns",
                    "action": "dns",
                    "server": "127.0.0.1:53",
                    "zone": "example.com",
                    "record": "app",
                    "type": "A",
                    "value": "192.0.2.20",
                    "tsig": {"name": "failover-key", "secret_file": str(key_file)},
                },
            ]
        },
    }


def test_full_config_with_these_steps_validates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("C66_TOKEN", TOKEN)
    cfg = config.parse(_full_config(tmp_path))
    assert cfg.providers["cloud66"] == Cloud66Settings(token=TOKEN)
    assert TOKEN in cfg.secrets and "c2VjcmV0LXRzaWcta2V5LWZvci10ZXN0cw==" in cfg.secrets
    assert [s.action for s in cfg.failover.steps] == [
        "cloud66",
        "stop_replication",
        "cloud66",
        "cloud66",
        "cloud66",
        "haproxy",
        "dns",
    ]
    assert cfg.failover.steps[2].timeout == 600.0


def test_full_config_reports_bad_step_keys_by_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("C66_TOKEN", TOKEN)
    data = _full_config(tmp_path)
    data["failover"]["steps"][4]["operation"] = "flip"
    data["failover"]["steps"][5]["state"] = "ready"
    data["failover"]["steps"][6]["type"] = "MX"
    del data["cloud66"]["token"]
    with pytest.raises(ConfigError) as err:
        config.parse(data)
    assert err.value.problems == [
        "failover.steps[4].operation: expected one of maintenance, promote_replica, "
        "switch_failover_group, got 'flip'",
        "failover.steps[5].state: cannot be combined with activate/deactivate",
        "failover.steps[6].type: expected one of A, AAAA, CNAME, got 'MX'",
        "cloud66.token: is required (or token_file)",
    ]


def test_token_file_is_read_and_kept_secret(tmp_path: Path) -> None:
    token_file = tmp_path / "c66.token"
    token_file.write_text(TOKEN + "\n")
    errors: list[str] = []
    secrets: set[str] = set()
    section = Section({"token_file": str(token_file)}, "cloud66", errors, secrets)
    from watchdogd.actions.cloud66 import parse_section

    assert parse_section(section) == Cloud66Settings(token=TOKEN)
    section.finish()
    assert errors == [] and secrets == {TOKEN}


def test_step_validated_through_the_registry_keeps_its_params() -> None:
    errors: list[str] = []
    raw = {
        "name": "maint",
        "action": "cloud66",
        "operation": "maintenance",
        "stack": STACK,
        "enabled": True,
    }
    step = validate_step(Section(raw, "failover.steps[0]", errors, set()))
    assert errors == []
    assert step is not None and step.params == {
        "operation": "maintenance",
        "stack": STACK,
        "enabled": True,
    }


def test_cloud66_step_without_the_section_fails_at_config_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("C66_TOKEN", TOKEN)
    data = _full_config(tmp_path)
    del data["cloud66"]
    with pytest.raises(ConfigError) as err:
        config.parse(data)
    assert err.value.problems[0] == (
        "failover.steps[0]: action cloud66 needs a top-level cloud66 section with token "
        "(or token_file)"
    )
    assert len(err.value.problems) == 4  # one line per cloud66 step
