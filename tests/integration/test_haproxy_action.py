"""The haproxy action against a real HAProxy: traffic really moves to the standby."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.haproxy import Haproxy, Server, admin, haproxy, http_app
from watchdogd.actions import ActionError, StepContext
from watchdogd.actions.haproxy import HaproxyAction, parse
from watchdogd.core.model import AppConfig, Config, DatabaseConfig, NodeConfig
from watchdogd.core.section import Section

pytestmark = pytest.mark.integration

CHECK = "check inter 100ms rise 1 fall 1"


def _ctx() -> StepContext:
    def node(name: str) -> NodeConfig:
        return NodeConfig(
            name=name,
            database=DatabaseConfig(engine="postgres", dsn=f"postgresql://{name}/db"),
            app=AppConfig(health_url=f"http://{name}/health"),
        )

    config = Config(cluster="shop", primary=node("primary"), standby=node("standby"))
    return StepContext(
        config=config,
        primary=config.primary,
        standby=config.standby,
        engines={},
        failover_id="fo-1",
        reason="test",
        trigger="manual",
    )


def _action(**keys: Any) -> HaproxyAction:
    errors: list[str] = []
    section = Section(keys, "failover.steps[0]", errors, set())
    action = parse(section)
    section.finish()
    assert errors == []
    return action


async def _get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status, await resp.text()


async def _states(lb: Haproxy) -> dict[str, tuple[str, str]]:
    """server -> (srv_op_state, srv_admin_state) as HAProxy reports them."""
    lines = (await admin(lb.admin_socket, "show servers state app")).splitlines()
    columns = next(line for line in lines if line.startswith("# "))[2:].split()
    rows = [dict(zip(columns, line.split(), strict=False)) for line in lines[2:] if line.strip()]
    return {r["srv_name"]: (r["srv_op_state"], r["srv_admin_state"]) for r in rows}


@pytest.fixture
async def lb(tmp_path: Path) -> AsyncIterator[Haproxy]:
    """primary serving, standby declared ``disabled`` (the usual passive standby)."""
    async with (
        http_app("primary") as p1,
        http_app("standby") as p2,
        haproxy(
            tmp_path,
            [Server("primary", p1, CHECK), Server("standby", p2, f"{CHECK} disabled")],
        ) as lb,
    ):
        yield lb


async def test_failover_step_moves_real_traffic_to_the_standby(lb: Haproxy) -> None:
    # Wait until health checks have seen the primary, so the "before" is real.
    for _ in range(50):
        if (await _states(lb))["primary"][0] == "2":
            break
        await asyncio.sleep(0.02)
    assert await _get(lb.frontend) == (200, "primary")

    action = _action(
        socket=lb.admin_socket,
        backend="app",
        activate="{standby.name}",
        deactivate=["{primary.name}"],
    )
    ctx = _ctx()
    detail = await action.run(ctx, timeout=5)

    assert detail == "app/standby ready (UP), app/primary maint (DOWN)"
    # srv_op_state 2 = running; srv_admin_state: 0x04 (config "disabled") may remain on
    # the standby, 0x01 (forced maintenance) is now on the primary.
    states = await _states(lb)
    assert states["standby"][0] == "2" and int(states["standby"][1]) & 0x01 == 0
    assert int(states["primary"][1]) & 0x01
    for _ in range(5):
        assert await _get(lb.frontend) == (200, "standby")

    # Idempotent: running it again changes nothing and still succeeds.
    assert await action.run(ctx, timeout=5) == detail
    assert await _get(lb.frontend) == (200, "standby")


async def test_tcp_admin_socket_state_and_weight(lb: Haproxy) -> None:
    action = _action(
        socket=lb.admin_tcp, backend="app", servers=["primary"], weight=7, state="drain"
    )
    detail = await action.run(_ctx(), timeout=5)
    assert detail.startswith("app/primary drain")
    lines = (await admin(lb.admin_socket, "show servers state app")).splitlines()
    columns = lines[1][2:].split()
    row = dict(zip(columns, next(ln for ln in lines if " primary " in ln).split(), strict=False))
    assert row["srv_uweight"] == "7"
    assert int(row["srv_admin_state"]) & 0x08  # forced drain


async def test_unknown_server_fails_with_haproxy_message(lb: Haproxy) -> None:
    action = _action(socket=lb.admin_socket, backend="app", activate="nosuch")
    with pytest.raises(ActionError) as err:
        await action.run(_ctx(), timeout=5)
    assert str(err.value) == (
        f"haproxy {lb.admin_socket}: 'set server app/nosuch state ready' failed: No such server."
    )


async def test_standby_that_never_comes_up_fails_the_step(tmp_path: Path, closed_port: int) -> None:
    # The standby's address has nothing listening: HAProxy takes it out of maintenance
    # but its health checks keep it DOWN, so traffic could not move; the step must say so.
    async with http_app("primary") as p1:
        dead = Server("standby", closed_port, f"{CHECK} disabled")
        async with haproxy(tmp_path, [Server("primary", p1, CHECK), dead]) as lb:
            action = _action(
                socket=lb.admin_socket, backend="app", activate="standby", deactivate="primary"
            )
            started = time.monotonic()
            with pytest.raises(ActionError) as err:
                await action.run(_ctx(), timeout=0.6)
            assert time.monotonic() - started < 2
            message = str(err.value)
            assert message.startswith(f"haproxy {lb.admin_socket}: timed out after 600ms")
            assert "waiting for health checks to mark app/standby UP" in message
            assert "(HAProxy reports ready, DOWN, check failed, weight 1)" in message
            # The primary was not touched: it still serves.
            assert await _get(lb.frontend) == (200, "primary")


async def test_unreachable_socket_is_one_clear_line(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.sock")
    action = _action(socket=missing, backend="app", activate="standby")
    with pytest.raises(ActionError) as err:
        await action.run(_ctx(), timeout=1)
    assert str(err.value) == (
        f"haproxy {missing}: cannot connect to the admin socket: No such file or directory"
    )


async def test_describe_lists_the_rendered_commands() -> None:
    action = _action(
        socket="/run/haproxy/admin.sock",
        backend="app",
        activate="{standby.name}",
        deactivate=["{primary.name}", "old"],
    )
    assert action.idempotent is True
    assert action.describe(_ctx()) == {
        "socket": "/run/haproxy/admin.sock",
        "backend": "app",
        "commands": [
            "set server app/standby state ready",
            "set server app/primary state maint",
            "set server app/old state maint",
        ],
        "verify": "show servers state app",
        "wait_up": True,
    }


@pytest.mark.parametrize(
    ("keys", "error"),
    [
        (
            {"socket": "localhost", "backend": "app", "activate": "s"},
            "failover.steps[0].socket: expected an absolute Unix socket path or host:port, "
            "got 'localhost'",
        ),
        (
            {"socket": "/s", "backend": "app", "activate": "s", "state": "ready"},
            "failover.steps[0].state: cannot be combined with activate/deactivate",
        ),
        (
            {"socket": "/s", "backend": "app", "server": "s", "state": "up"},
            "failover.steps[0].state: expected one of ready, maint, drain, got 'up'",
        ),
        (
            {"socket": "/s", "backend": "app", "server": "s"},
            "failover.steps[0]: give state and/or weight for the server(s)",
        ),
        (
            {"socket": "/s", "backend": "app"},
            "failover.steps[0]: give activate/deactivate, or server (or servers) with state "
            "and/or weight",
        ),
        (
            {"socket": "/s", "backend": "app", "server": "a", "servers": ["b"], "state": "maint"},
            "failover.steps[0]: give either server or servers, not both",
        ),
        (
            {"socket": "/s", "backend": "app", "activate": "a", "deactivate": ["b", "x;y"]},
            "failover.steps[0].deactivate[1]: 'x;y' is not a valid HAProxy server name "
            "(letters, digits, '-', '_', '.', ':')",
        ),
        (
            {"socket": "/s", "backend": "app", "activate": "a", "deactivate": "a"},
            "failover.steps[0].activate: 'a' is also in deactivate",
        ),
        (
            {"socket": "/s", "backend": "app", "server": "a", "weight": 300},
            "failover.steps[0].weight: must be at most 256, got 300",
        ),
        (
            {"socket": "/s", "backend": "{nope}", "activate": "a"},
            "failover.steps[0].backend: unknown placeholder {nope}; known: {cluster}, "
            "{failover_id}, {primary.name}, {reason}, {standby.name}, {trigger}",
        ),
        (
            {"socket": "/s", "backend": "app", "activate": "a", "flip": True},
            "failover.steps[0].flip: unknown key",
        ),
    ],
)
def test_bad_keys_are_reported_with_their_path(keys: dict[str, Any], error: str) -> None:
    errors: list[str] = []
    section = Section(keys, "failover.steps[0]", errors, set())
    parse(section)
    section.finish()
    assert errors == [error]
