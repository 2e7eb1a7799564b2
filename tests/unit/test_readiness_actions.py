"""Each action's readiness check (``ready``), side-effect free: the Cloud 66 API mocked
(aioresponses, as in test_cloud66), everything else real (ports, files, PATH, a
database port nobody serves). HAProxy and BIND are in tests/integration/test_readiness."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aioresponses import aioresponses
from yarl import URL

from tests.support import bound_socket, port_of
from tests.unit.test_cloud66 import STACK, TOKEN, _action, _ctx, api
from watchdogd import engines
from watchdogd.actions import ActionError, StepContext, check_ready
from watchdogd.actions.builtin import ACTIONS as BUILTIN
from watchdogd.actions.cloud66 import API_BASE
from watchdogd.actions.command import CommandAction
from watchdogd.actions.http import HttpAction
from watchdogd.core.model import DatabaseConfig
from watchdogd.core.section import Section

__all__ = ["api"]  # the mocked API fixture, shared with test_cloud66

SERVER = "srv-42"


def ctx(**kw: Any) -> StepContext:
    return _ctx(**kw)


# --------------------------------------------------------------------------- cloud66


async def test_cloud66_ready_reads_the_stack_and_server_with_the_token(api: aioresponses) -> None:
    api.get(f"{API_BASE}/stacks/{STACK}", payload={"response": {"uid": STACK}})
    api.get(f"{API_BASE}/stacks/{STACK}/servers/{SERVER}", payload={"response": {"uid": SERVER}})
    action = _action(operation="promote_replica", stack=STACK, server=SERVER, db_type="postgresql")
    detail = await check_ready(action, ctx(), 5)
    assert detail == (
        f"token accepted; stack /stacks/{STACK} exists, server /stacks/{STACK}/servers/{SERVER}"
        " exists"
    )
    calls = [c for key, cs in api.requests.items() for c in cs]
    assert {key[0] for key in api.requests} == {"GET"}  # read-only: nothing else was called
    assert all(c.kwargs["headers"]["Authorization"] == f"Bearer {TOKEN}" for c in calls)


async def test_cloud66_ready_names_a_refused_token_without_showing_it(api: aioresponses) -> None:
    body = {"error": "invalid_token", "error_description": f"token {TOKEN} is not valid"}
    api.get(f"{API_BASE}/stacks/{STACK}", status=401, payload=body)
    with pytest.raises(ActionError) as err:
        await check_ready(_action(operation="maintenance", stack=STACK, enabled=False), ctx(), 5)
    assert str(err.value) == (
        f"cloud66 GET /stacks/{STACK}: HTTP 401: token *** is not valid (the token was refused)"
    )


async def test_cloud66_ready_says_which_object_does_not_exist(api: aioresponses) -> None:
    api.get(f"{API_BASE}/stacks/{STACK}", payload={"response": {"uid": STACK}})
    api.get(
        f"{API_BASE}/stacks/{STACK}/servers/{SERVER}",
        status=404,
        payload={"error": "not_found", "error_description": "Server not found"},
    )
    action = _action(operation="promote_replica", stack=STACK, server=SERVER, db_type="mysql")
    with pytest.raises(ActionError, match=r"HTTP 404: Server not found \(no such server"):
        await check_ready(action, ctx(), 5)


async def test_cloud66_ready_checks_the_failover_group_shape(api: aioresponses) -> None:
    url = f"{API_BASE}/failover_groups/fg-1"
    api.get(url, payload={"response": {"uid": "fg-1", "current_stack": 7}})
    action = _action(operation="switch_failover_group", failover_group="fg-1", to="primary")
    with pytest.raises(ActionError, match="expected a failover group with current_stack 1 or 2"):
        await check_ready(action, ctx(), 5)
    assert len(api.requests[("GET", URL(url))]) == 1


async def test_cloud66_ready_without_a_token_section_fails_at_once() -> None:
    action = _action(operation="maintenance", stack=STACK, enabled=True)
    with pytest.raises(ActionError, match="no top-level cloud66 section"):
        await check_ready(action, ctx(token=None), 5)


# --------------------------------------------------------------------------- http


def _http(url: str) -> HttpAction:
    return HttpAction(method="POST", url=url)


async def test_http_ready_connects_and_sends_nothing(closed_port: int) -> None:
    with bound_socket() as listener:
        listener.listen()
        url = f"http://127.0.0.1:{port_of(listener)}/maintenance?token={TOKEN}"
        detail = await check_ready(_http(url), ctx(), 2)
        assert detail == f"127.0.0.1:{port_of(listener)} accepts connections"
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(1)
            assert conn.recv(100) == b""  # connected and closed: no request was sent
    with pytest.raises(ActionError) as err:
        await check_ready(_http(f"http://127.0.0.1:{closed_port}/x"), ctx(), 2)
    assert str(err.value) == (
        f"127.0.0.1:{closed_port} does not accept connections: Connection refused"
    )


async def test_http_ready_is_bounded_by_its_timeout() -> None:
    # A listener with a full backlog leaves a SYN unanswered.
    with bound_socket() as listener:
        listener.listen(0)
        port = port_of(listener)
        fillers = []
        try:
            for _ in range(8):
                s = socket.socket()
                s.setblocking(False)
                try:
                    s.connect(("127.0.0.1", port))
                except BlockingIOError:
                    pass
                fillers.append(s)
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(ActionError, match=r"no connection within 0\.3s"):
                await check_ready(_http(f"http://127.0.0.1:{port}/"), ctx(), 0.3)
            assert loop.time() - started < 2
        finally:
            for s in fillers:
                s.close()


# --------------------------------------------------------------------------- command


def _command(argv: list[str], cwd: str | None = None) -> CommandAction:
    return CommandAction(argv=argv, cwd=cwd)


async def test_command_ready_finds_a_bare_name_in_the_steps_path() -> None:
    detail = await check_ready(_command(["sh", "-c", "exit 1"]), ctx(), 2)
    assert detail.startswith("sh is /") and detail.endswith("/sh")
    with pytest.raises(ActionError, match="no-such-program-here: no executable of that name"):
        await check_ready(_command(["no-such-program-here"]), ctx(), 2)


async def test_command_ready_checks_a_path_as_the_runner_would(tmp_path: Path) -> None:
    script = tmp_path / "switch.sh"
    with pytest.raises(ActionError, match=r"switch.sh: no such file"):
        await check_ready(_command([str(script)]), ctx(), 2)
    script.write_text("#!/bin/sh\ntouch ran\n")
    script.chmod(0o644)
    with pytest.raises(ActionError, match="is not executable"):
        await check_ready(_command([str(script)]), ctx(), 2)
    script.chmod(0o755)
    assert await check_ready(_command([str(script)]), ctx(), 2) == f"{script} is executable"
    # relative to cwd, as the runner starts it
    assert await check_ready(_command(["./switch.sh"], cwd=str(tmp_path)), ctx(), 2) == (
        "./switch.sh is executable"
    )
    with pytest.raises(ActionError, match=r"cwd .* is not an existing directory"):
        await check_ready(_command(["./switch.sh"], cwd=str(tmp_path / "gone")), ctx(), 2)
    assert not (tmp_path / "ran").exists()  # nothing ran


# --------------------------------------------------------------------------- built-ins


@pytest.fixture
def refused_engine(closed_port: int) -> Iterator[dict[str, Any]]:
    dsn = f"postgresql://watchdogd@127.0.0.1:{closed_port}/postgres"
    yield {"failover": engines.create(DatabaseConfig(engine="postgres", dsn=dsn), set())}


async def test_engine_step_ready_asks_its_database(refused_engine: dict[str, Any]) -> None:
    c = ctx()
    c.engines = refused_engine
    promote = BUILTIN["promote"](Section({}, "failover.steps[1]", [], set()))
    with pytest.raises(ActionError, match=r"^failover does not answer: "):
        await check_ready(promote, c, 2)
    for engine in refused_engine.values():
        await engine.close()


async def test_an_action_without_a_ready_check_says_so() -> None:
    class Bare:
        idempotent = True

    assert await check_ready(Bare(), ctx(), 1) == "this action has no readiness check"  # type: ignore[arg-type]
