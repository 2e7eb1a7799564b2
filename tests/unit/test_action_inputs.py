"""Issue 15: what an operator's reason, a step's output and a redirect can do to steps.

Real processes for ``command`` steps, a real local aiohttp server for ``http`` steps."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web

from watchdogd import actions, config
from watchdogd.actions import ActionError, StepContext
from watchdogd.actions.command import OUTPUT_LIMIT, _tail, code_arguments
from watchdogd.core.model import Config


def make_config(steps: list[dict[str, Any]]) -> Config:
    return config.parse(
        {
            "cluster": "orders",
            "primary": {
                "name": "main",
                "database": {"engine": "postgres", "dsn": "postgresql://u@127.0.0.1:1/x"},
            },
            "standby": {
                "name": "failover",
                "database": {"engine": "postgres", "dsn": "postgresql://u@127.0.0.1:2/x"},
            },
            "failover": {"steps": steps},
        }
    )


def problems(steps: list[dict[str, Any]]) -> list[str]:
    with pytest.raises(config.ConfigError) as info:
        make_config(steps)
    return info.value.problems


def context(cfg: Config, reason: str) -> StepContext:
    return StepContext(
        config=cfg,
        primary=cfg.primary,
        standby=cfg.standby,
        engines={},
        failover_id="20261202-abcd",
        reason=reason,
        trigger="manual",
    )


async def run_step(cfg: Config, reason: str, index: int = 0) -> str:
    step = cfg.failover.steps[index]
    return await actions.build(step, cfg).run(context(cfg, reason), 5.0)


def command(argv: list[str], **kw: Any) -> dict[str, Any]:
    return {"name": "hook", "action": "command", "argv": argv, **kw}


# --------------------------------------------------------------------------- {reason}


@pytest.mark.parametrize(
    ("argv", "index"),
    [
        (["sh", "-c", "echo {reason}"], 2),
        (["/bin/bash", "-ec", "logger '{reason}'"], 2),
        (["env", "X=1", "dash", "-o", "errexit", "-c", "echo {reason}"], 6),
        (["python3.11", "-c", "print('{reason}')"], 2),
        (["perl", "-e", "print '{reason}'"], 2),
    ],
)
def test_reason_inside_a_script_is_refused(argv: list[str], index: int) -> None:
    assert problems([command(argv)]) == [
        f"failover.steps[0].argv[{index}]: {{reason}} inside a script would run the "
        'operator\'s text as code; read it from "$WATCHDOGD_REASON" instead'
    ]


@pytest.mark.parametrize(
    "argv",
    [
        ["/bin/echo", "{reason}"],  # one argv element, no shell: data
        ["sh", "-c", 'echo "$1"', "sh", "{reason}"],  # a positional parameter: data
        ["sh", "-c", 'echo "$WATCHDOGD_REASON" {standby.name}'],
    ],
)
def test_reason_as_data_is_accepted(argv: list[str]) -> None:
    make_config([command(argv)])


def test_code_arguments() -> None:
    assert code_arguments(["sh", "-c", "x", "y"]) == [2]
    assert code_arguments(["sudo", "-u", "app", "bash", "-xc", "x"]) == [5]
    assert code_arguments(["/usr/bin/env", "echo", "-c", "x"]) == []


async def test_reason_reaches_the_command_as_env_and_never_as_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    out = tmp_path / "out"
    cfg = make_config([command(["sh", "-c", f'printf %s "$WATCHDOGD_REASON" > {out}'])])
    reason = f"a; touch {marker} # $(touch {marker}) `touch {marker}`"
    await run_step(cfg, reason)
    assert out.read_text() == reason
    assert not marker.exists()


async def test_command_gets_a_minimal_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGPASSWORD", "daemon-only-s3cret")
    monkeypatch.setenv("LANG", "C.UTF-8")
    out = tmp_path / "env"
    cfg = make_config([command(["sh", "-c", f"env > {out}"], env={"MY_VAR": "{standby.name}"})])
    await run_step(cfg, "planned maintenance")
    seen = dict(line.split("=", 1) for line in out.read_text().splitlines() if "=" in line)
    assert "PGPASSWORD" not in seen
    assert seen["PATH"] == os.environ["PATH"] and seen["LANG"] == "C.UTF-8"
    assert seen["MY_VAR"] == "failover"
    assert seen["WATCHDOGD_REASON"] == "planned maintenance"
    assert seen["WATCHDOGD_TRIGGER"] == "manual"
    assert seen["WATCHDOGD_FAILOVER_ID"] == "20261202-abcd"
    allowed = {"PATH", "LANG", "LC_ALL", "HOME", "MY_VAR", "PWD", "SHLVL", "_", "OLDPWD"}
    assert {k for k in seen if not k.startswith("WATCHDOGD_")} <= allowed, seen


async def test_step_output_is_capped_in_memory() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(b"x" * (5 * OUTPUT_LIMIT) + b"\nlast line\n")
    reader.feed_eof()
    kept = await _tail(reader)
    assert len(kept) == OUTPUT_LIMIT and kept.endswith(b"\nlast line\n")


async def test_chatty_step_reports_its_last_line() -> None:
    cfg = make_config(
        [command(["sh", "-c", "head -c 3000000 /dev/zero | tr '\\0' x; echo; echo done"])]
    )
    assert await run_step(cfg, "r") == "sh exited 0: done"


def test_check_config_checks_program_and_cwd(tmp_path: Path) -> None:
    script = tmp_path / "switch"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o644)
    found = problems([command([str(script)], cwd=str(tmp_path / "nowhere"))])
    assert found == [
        f"failover.steps[0].argv[0]: {script} is not executable",
        f"failover.steps[0].cwd: {tmp_path / 'nowhere'} is not an existing directory",
    ]
    assert problems([command([str(tmp_path)])]) == [
        f"failover.steps[0].argv[0]: {tmp_path} is not a file"
    ]
    script.chmod(0o755)
    make_config([command([str(script)], cwd=str(tmp_path))])


# --------------------------------------------------------------------------- http


@pytest_asyncio.fixture
async def server() -> AsyncIterator[tuple[str, list[web.Request], dict[str, str]]]:
    seen: list[web.Request] = []
    where: dict[str, str] = {}

    async def record(request: web.Request) -> web.StreamResponse:
        seen.append(request)
        if request.path.startswith("/redirect"):
            raise web.HTTPFound(where["elsewhere"])
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}", seen, where
    await runner.cleanup()


async def test_placeholders_are_url_encoded(
    server: tuple[str, list[web.Request], dict[str, str]],
) -> None:
    url, seen, _ = server
    step = {
        "name": "announce",
        "action": "http",
        "method": "GET",
        "url": url + "/note/{standby.name}?reason={reason}&by=watchdogd",
    }
    cfg = make_config([step])
    reason = "db down & disk full #2 ?x=1/.."
    await run_step(cfg, reason)
    request = seen[-1]
    assert request.path == "/note/failover"
    assert request.query["reason"] == reason
    assert request.query["by"] == "watchdogd" and list(request.query) == ["reason", "by"]
    described = actions.describe(
        cfg.failover.steps[0], actions.build(cfg.failover.steps[0], cfg), context(cfg, reason)
    )
    assert "reason=db%20down%20%26%20disk%20full%20%232%20%3Fx%3D1%2F.." in described["url"]


async def test_http_step_does_not_follow_redirects(
    server: tuple[str, list[web.Request], dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, seen, where = server
    where["elsewhere"] = url.replace("127.0.0.1", "localhost") + "/stolen"
    monkeypatch.setenv("TOKEN_T", "bearer-s3cret")
    step = {
        "name": "maint",
        "action": "http",
        "method": "POST",
        "url": url + "/redirect",
        "headers": {"Authorization": "Bearer ${TOKEN_T}"},
    }
    cfg = make_config([step])
    with pytest.raises(ActionError, match=r"POST .*/redirect: HTTP 302"):
        await run_step(cfg, "r")
    assert [r.path for r in seen] == ["/redirect"]
