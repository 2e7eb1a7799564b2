"""Readiness against real parts: a PostgreSQL pair, the app stand-ins, a real HAProxy, a
real BIND, real programs and ports, and the Cloud 66 API mocked (the one peer that
cannot run here). Each check is made to fail for real and is seen in the three places
an operator looks: the metric, ``status`` and ``watchdogd check-config --online``."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from aioresponses import CallbackResult, aioresponses

from tests.support.apps import DemoApps, running_apps
from tests.support.bind import Bind, bind_server
from tests.support.haproxy import Haproxy, Server, admin, haproxy, http_app
from tests.support.pg import SECRET, eventually, pg_template, require_pg_bin
from tests.support.vendor import CompatResponse, VendorAPI
from watchdogd import cli
from watchdogd import config as configmod
from watchdogd.actions import ActionError, check_ready, registry
from watchdogd.actions.cloud66 import API_BASE
from watchdogd.control import Peer
from watchdogd.core.section import Section
from watchdogd.daemon import Daemon
from watchdogd.daemon.readiness import context
from watchdogd.demo.lab import PgPair

pytestmark = pytest.mark.integration

TOKEN = "c66-readiness-token-77ab"
GROUP = "fg-ready"
TRUE = "/bin/true"
CHEAP = ("standby_database", "replication", "lag", "standby_app", "armed")
STEPS = [
    "step:primary_maintenance_on",
    "step:stop_replication",
    "step:promote_standby",
    "step:standby_maintenance_off",
    "step:load_balancer",
    "step:dns",
    "step:failover_group",
    "step:switch_traffic",
]


@dataclass
class Lab:
    pair: PgPair
    apps: DemoApps
    lb: Haproxy
    bind: Bind
    tmp: Path


@pytest.fixture(params=["stock", "tuned"])
def profile(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


@pytest.fixture
def pair(request: pytest.FixtureRequest, profile: str) -> Iterator[PgPair]:
    created = PgPair.create(
        bin_dir=require_pg_bin(),
        password=SECRET,
        template=pg_template(request.config),
        profile=profile,
    )
    try:
        yield created
    finally:
        created.destroy()


@pytest.fixture
async def lab(pair: PgPair, tmp_path: Path) -> AsyncIterator[Lab]:
    async with running_apps(pair) as apps:
        servers = [Server("main", apps.primary.port), Server("failover", apps.standby.port)]
        async with haproxy(tmp_path, servers) as lb:
            with bind_server() as bind:
                yield Lab(pair, apps, lb, bind, tmp_path)


@pytest.fixture
def cloud66(monkeypatch: pytest.MonkeyPatch) -> Iterator[aioresponses]:
    """The API answers GET /failover_groups/GROUP to the right bearer token only."""
    monkeypatch.setenv("C66_TOKEN", TOKEN)

    def group(url: Any, **kwargs: Any) -> CallbackResult:
        if kwargs.get("headers", {}).get("Authorization") != f"Bearer {TOKEN}":
            body = {"error": "invalid_token", "error_description": "The access token is invalid"}
            return CallbackResult(status=401, payload=body, response_class=CompatResponse)
        found = {"uid": GROUP, "current_stack": 1, "busy_toggling": False}
        return CallbackResult(payload={"response": found}, response_class=CompatResponse)

    with VendorAPI(passthrough=["http://127.0.0.1"]) as api:
        api.get(f"{API_BASE}/failover_groups/{GROUP}", callback=group, repeat=True)
        yield api


def config(lab: Lab, port: int | None = None, **broken: Any) -> dict[str, Any]:
    """The five-step runbook with a step of every kind; ``broken`` replaces a step's keys."""
    apps, bind = lab.apps, lab.bind
    steps: list[dict[str, Any]] = [
        {
            "name": "primary_maintenance_on",
            "action": "http",
            "url": f"{apps.primary.url}/maintenance",
            "required": False,
        },
        {"name": "stop_replication", "action": "stop_replication"},
        {"name": "promote_standby", "action": "promote"},
        {"name": "standby_maintenance_off", "action": "http", "method": "DELETE"},
        {
            "name": "load_balancer",
            "action": "haproxy",
            "socket": lab.lb.admin_socket,
            "backend": "app",
            "activate": "{standby.name}",
            "deactivate": ["{primary.name}"],
        },
        {
            "name": "dns",
            "action": "dns",
            "server": bind.server,
            "zone": bind.zone,
            "record": "app",
            "type": "A",
            "value": "127.0.0.2",
            "tsig": {"name": bind.key_name, "secret": bind.secret},
        },
        {
            "name": "failover_group",
            "action": "cloud66",
            "operation": "switch_failover_group",
            "failover_group": GROUP,
            "to": "secondary",
        },
        {"name": "switch_traffic", "action": "command", "argv": [TRUE]},
    ]
    steps[3]["url"] = f"{apps.standby.url}/maintenance"
    for step in steps:
        step.update(broken.get(step["name"], {}))
    return {
        "cluster": "orders",
        "primary": {
            "name": "main",
            "database": {"engine": "postgres", "dsn": lab.pair.primary.dsn},
            "app": {"health_url": f"{apps.primary.url}/health"},
        },
        "standby": {
            "name": "failover",
            "database": {"engine": "postgres", "dsn": lab.pair.standby.dsn},
            "app": {"health_url": f"{apps.standby.url}/health"},
        },
        "probe": {"interval": "500ms", "timeout": "400ms"},
        "failover": {"outage_threshold": "2s", "max_lag_seconds": "1s", "steps": steps},
        "cloud66": {"token": "${C66_TOKEN}"},
        "metrics": {"enabled": False},
        "control": {"socket": str(lab.tmp / "run" / "control.sock")},
        "log": {"format": "json", "level": "warning"},
        "state_dir": str(lab.tmp / "state"),
    }


@pytest.fixture
async def daemons() -> AsyncIterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        await d.stop(quiet=True)


async def start(daemons: list[Daemon], cfg: dict[str, Any], tmp: Path) -> Daemon:
    path = tmp / "daemon.yml"  # a file, so that the daemon can reload it
    path.write_text(yaml.safe_dump(cfg))
    d = Daemon(configmod.load(path))
    daemons.append(d)
    await d.start()
    # the expensive checks have run once
    await eventually(lambda: _checked(d), within=15)
    return d


def _checked(d: Daemon) -> bool:
    r = d.status()["readiness"]
    return r is not None and all(c["detail"] != "not checked yet" for c in r["checks"])


def checks(d: Daemon) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in d.status()["readiness"]["checks"]}


def metric(d: Daemon, check: str | None = None) -> float | None:
    if check is None:
        return d.metrics.registry.get_sample_value(
            "watchdogd_failover_ready", {"cluster": "orders"}
        )
    return d.metrics.registry.get_sample_value(
        "watchdogd_readiness_check_ok", {"cluster": "orders", "check": check}
    )


async def online(
    cfg: dict[str, Any], tmp: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[int, list[str]]:
    """``watchdogd check-config --online`` on the config, as an operator runs it."""
    path = tmp / "watchdogd.yml"
    path.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    code = await asyncio.to_thread(cli.main, ["check-config", "--online", "--config", str(path)])
    out = capsys.readouterr().out
    return code, out.splitlines()


def line_of(lines: list[str], check: str) -> str:
    found = [line.strip() for line in lines if line.strip().startswith(f"{check}:")]
    assert len(found) == 1, (check, lines)
    return found[0]


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("profile", ["tuned"], indirect=True)
async def test_every_unreachable_step_target_fails_its_check_everywhere(
    lab: Lab,
    cloud66: aioresponses,
    closed_port: int,
    daemons: list[Daemon],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    unknown_key = base64.b64encode(os.urandom(32)).decode()
    broken = config(
        lab,
        standby_maintenance_off={"url": f"http://127.0.0.1:{closed_port}/maintenance"},
        load_balancer={"backend": "no_such_backend"},
        dns={"tsig": {"name": "not-a-key-bind-knows", "secret": unknown_key}},
        switch_traffic={"argv": [str(lab.tmp / "bin" / "switch-traffic")]},
    )
    monkeypatch.setenv("C66_TOKEN", "c66-some-revoked-token")  # the API refuses it
    expected = {
        "step:standby_maintenance_off": f"127.0.0.1:{closed_port} does not accept connections",
        "step:load_balancer": "Can't find backend",
        "step:dns": "PeerBadKey: The peer didn't know the key we used",
        "step:failover_group": "HTTP 401",
        "step:switch_traffic": "switch-traffic: no such file",
    }
    d = await start(daemons, broken, lab.tmp)
    now = checks(d)
    assert d.status()["readiness"]["ready"] is False and metric(d) == 0.0
    for name, words in expected.items():
        assert now[name]["ok"] is False and now[name]["severity"] == "error", now[name]
        assert words in now[name]["detail"], now[name]
        assert metric(d, name) == 0.0, name
    assert "the token was refused" in now["step:failover_group"]["detail"]
    # what still works is said to work: the rest of the runbook, and the pair itself
    for name in set(STEPS) - set(expected):
        assert now[name]["ok"] is True and metric(d, name) == 1.0, now[name]
    # (a probe may miss its bound on a loaded machine: wait for a cycle that did not)
    await eventually(lambda: all(checks(d)[name]["ok"] for name in CHEAP), within=5)
    assert all(metric(d, name) == 1.0 for name in CHEAP)
    assert "c66-some-revoked-token" not in str(d.status())  # a secret, even a wrong one

    code, lines = await online(broken, lab.tmp, capsys)
    assert code == 1, lines
    assert lines[1] == f"not ready: {len(expected)} of {len(now)} checks failed"
    for name, words in expected.items():
        assert words in line_of(lines, name)
    assert "c66-some-revoked-token" not in "\n".join(lines)

    # Fixed, one by one as an operator would: the same command says ready.
    program = lab.tmp / "bin" / "switch-traffic"
    program.parent.mkdir()
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(0o755)
    monkeypatch.setenv("C66_TOKEN", TOKEN)
    fixed = config(lab, switch_traffic={"argv": [str(program)]}, load_balancer={"backend": "app"})
    code, lines = await online(fixed, lab.tmp, capsys)
    assert code == 0, lines
    assert lines[1] == f"ready: {len(now)} checks passed", lines

    # The daemon reloads the fixed config without its dns step: the steps are checked
    # again at once, and the check the config no longer has leaves the metrics.
    fixed["failover"]["steps"] = [s for s in fixed["failover"]["steps"] if s["name"] != "dns"]
    (lab.tmp / "daemon.yml").write_text(yaml.safe_dump(fixed))
    await d.reload("test")
    await eventually(lambda: d.status()["readiness"]["ready"], within=10)
    assert metric(d) == 1.0 and metric(d, "step:failover_group") == 1.0
    assert metric(d, "step:dns") is None and "step:dns" not in checks(d)


async def test_each_pair_check_fails_for_real_on_a_real_pair(
    lab: Lab,
    cloud66: aioresponses,
    daemons: list[Daemon],
    capsys: pytest.CaptureFixture[str],
    profile: str,
) -> None:
    cfg = config(lab)
    d = await start(daemons, cfg, lab.tmp)
    await eventually(lambda: d.status()["readiness"]["ready"], within=10)
    assert metric(d) == 1.0
    assert all(metric(d, name) == 1.0 for name in STEPS)
    settings = checks(d)["settings:failover"]
    if profile == "stock":
        # wal_receiver_timeout 60s confirms a hung primary long after the 2s threshold:
        # a warning naming the setting, and still ready.
        assert settings["ok"] is False and settings["severity"] == "warning"
        assert "wal_receiver_timeout" in settings["detail"]
        assert metric(d, "settings:failover") == 0.0
    else:
        assert settings["ok"] is True and metric(d, "settings:failover") == 1.0
    code, lines = await online(cfg, lab.tmp, capsys)
    assert code == 0, lines
    total = len(checks(d))
    assert lines[1] == (
        f"ready: {total - 1} of {total} checks passed, the others warn"
        if profile == "stock"
        else f"ready: {total} checks passed"
    )
    assert any("warning settings:failover: wal_receiver_timeout" in x for x in lines) == (
        profile == "stock"
    )

    # Replication stopped on the real standby: it stays a standby, but nothing streams.
    await asyncio.to_thread(lab.pair.detach_standby)
    await eventually(lambda: metric(d, "replication") == 0.0, within=5)
    assert metric(d) == 0.0
    replication = checks(d)["replication"]
    assert replication["ok"] is False and replication["detail"].startswith("not streaming")
    assert d.status()["readiness"]["ready"] is False
    assert checks(d)["standby_database"]["ok"] is True  # still answers, still a standby
    code, lines = await online(cfg, lab.tmp, capsys)
    assert code == 1, lines
    assert line_of(lines, "replication").startswith("replication: not streaming")

    await asyncio.to_thread(lab.pair.reattach_standby)
    await eventually(lambda: d.status()["readiness"]["ready"], within=10)
    assert metric(d) == 1.0 and metric(d, "replication") == 1.0

    # Replay paused on the real standby while the primary writes: the lag guard
    # (max_lag_seconds 1s) would refuse a failover, and readiness says so.
    # (a commit replayed first: the standby measures its lag from the last one it replayed)
    await asyncio.to_thread(lab.pair.primary.execute, "CREATE TABLE replayed AS SELECT 1 AS x")
    await asyncio.to_thread(lab.pair.wait_replayed)
    await asyncio.to_thread(lab.pair.pause_replay)
    await asyncio.to_thread(lab.pair.primary.execute, "CREATE TABLE behind AS SELECT 1 AS x")
    await eventually(lambda: metric(d, "lag") == 0.0, within=10)
    assert metric(d) == 0.0
    lag = checks(d)["lag"]
    assert lag["ok"] is False and "more than max_lag_seconds 1s" in lag["detail"], lag
    assert checks(d)["replication"]["ok"] is True  # still streaming: only replay waits
    code, lines = await online(cfg, lab.tmp, capsys)
    assert code == 1, lines
    assert "more than max_lag_seconds 1s" in line_of(lines, "lag")
    await asyncio.to_thread(lab.pair.resume_replay)
    await eventually(lambda: d.status()["readiness"]["ready"], within=10)

    # The standby's application down: its health check is refused.
    await lab.apps.standby.stop()
    await eventually(lambda: metric(d, "standby_app") == 0.0, within=5)
    assert metric(d) == 0.0
    app = checks(d)["standby_app"]
    assert app["ok"] is False and "Cannot connect" in app["detail"], app
    code, lines = await online(cfg, lab.tmp, capsys)
    assert code == 1, lines
    assert "Cannot connect" in line_of(lines, "standby_app")

    # Paused by an operator: the daemon is disarmed, and the command line reads the
    # pause from the journal the daemon wrote.
    peer = Peer(pid=os.getpid(), uid=0, gid=0, user="root")
    await d.handle_command("pause", {"reason": "db upgrade"}, peer)
    assert metric(d, "armed") == 0.0
    paused = "automatic failover is not armed: paused by an operator (db upgrade)"
    assert checks(d)["armed"]["detail"] == paused
    code, lines = await online(cfg, lab.tmp, capsys)
    assert code == 1 and line_of(lines, "armed") == f"armed: {paused}", lines

    # The standby database killed: it no longer answers.
    await asyncio.to_thread(lab.pair.standby.kill)
    await eventually(lambda: metric(d, "standby_database") == 0.0, within=5)
    assert "failover does not answer" in checks(d)["standby_database"]["detail"]
    code, lines = await online(cfg, lab.tmp, capsys)
    assert code == 1, lines
    assert line_of(lines, "standby_database").startswith(
        "standby_database: failover does not answer: "
    )


async def test_an_invalid_config_exits_2_before_any_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.yml"
    path.write_text("cluster: orders\nprimary: {}\n")
    assert cli.main(["check-config", "--online", "--config", str(path)]) == 2
    out = capsys.readouterr()
    assert "standby: is required" in out.err and out.out == ""


def _step(keys: dict[str, Any]) -> Any:
    errors: list[str] = []
    section = Section(keys, "failover.steps[0]", errors, set())
    section.templates = True
    action = registry()[keys["action"]](section)
    assert errors == []
    return action


async def test_haproxy_and_dns_ready_say_exactly_what_is_missing(tmp_path: Path) -> None:
    node = {"database": {"engine": "postgres", "dsn": "postgresql://127.0.0.1/x"}}
    cfg = configmod.parse(
        {
            "cluster": "orders",
            "primary": {"name": "main", **node},
            "standby": {"name": "failover", **node},
            "state_dir": str(tmp_path / "state"),
        }
    )
    ctx = context(cfg, cfg.primary, cfg.standby, {})
    async with http_app("main") as port, haproxy(tmp_path, [Server("main", port)]) as lb:
        lb_step = {"action": "haproxy", "socket": lb.admin_tcp, "backend": "app"}
        moving = _step({**lb_step, "activate": "{standby.name}", "deactivate": "{primary.name}"})
        with pytest.raises(ActionError) as err:
            await check_ready(moving, ctx, 2)
        assert str(err.value) == (
            f"haproxy {lb.admin_tcp}: backend app has no server 'failover' (has: main)"
        )
        draining = _step({**lb_step, "server": "main", "state": "drain"})
        assert (
            await check_ready(draining, ctx, 2) == f"haproxy {lb.admin_tcp}: backend app has main"
        )
        assert (await _get_state(lb)) == "main 2 0"  # nothing was changed by the checks

    with bind_server() as bind:
        tsig = {"name": bind.key_name, "secret": bind.secret}
        dns_step = {"action": "dns", "server": bind.server, "type": "A", "value": "127.0.0.2"}
        served = _step({**dns_step, "zone": bind.zone, "record": "app", "tsig": tsig})
        assert await check_ready(served, ctx, 2) == (
            f"{bind.server} serves {bind.zone}. to key {bind.key_name}"
        )
        elsewhere = _step({**dns_step, "zone": "other.test", "record": "app", "tsig": tsig})
        with pytest.raises(ActionError) as err:
            await check_ready(elsewhere, ctx, 2)
        assert str(err.value).startswith(
            f"dns {bind.server}: SOA other.test. signed with key {bind.key_name}: answered "
        )
        assert bind.query(f"app.{bind.zone}.", "A").answer == []  # nothing was updated


async def _get_state(lb: Haproxy) -> str:
    lines = (await admin(lb.admin_socket, "show servers state app")).splitlines()
    columns = next(line for line in lines if line.startswith("# "))[2:].split()
    row = dict(zip(columns, lines[2].split(), strict=False))
    return f"{row['srv_name']} {row['srv_op_state']} {row['srv_admin_state']}"


async def test_the_standby_apps_maintenance_page_says_whether_it_is_in_maintenance(
    pg_pair: PgPair, demo_apps: DemoApps, tmp_path: Path
) -> None:
    """``app.maintenance`` (issue 14: the standby app is in maintenance when the runbook
    expects to take it out): a warning when it is not, or when its page does not
    answer; no check for a node without it."""
    from tests.support.daemon import lab_config
    from watchdogd.daemon.readiness import maintenance_checks
    from watchdogd.readiness import STANDBY_MAINTENANCE, WARNING

    raw = lab_config(pg_pair, tmp_path)
    page = f"{demo_apps.standby.url}/maintenance"
    raw["standby"]["app"] = {
        "health_url": f"{demo_apps.standby.url}/health",
        "maintenance": {"url": page, "contains": '"maintenance": true'},
    }
    cfg = configmod.parse(raw)
    (check,) = await maintenance_checks(cfg.standby)
    assert check.name == STANDBY_MAINTENANCE and check.severity == WARNING
    assert check.ok and check.detail == "failover's app is in maintenance", check.detail

    demo_apps.standby.maintenance = False  # somebody took it out by hand
    (check,) = await maintenance_checks(cfg.standby)
    assert not check.ok
    assert check.detail.startswith(f"failover's app is not in maintenance: {page} answered 200")

    await demo_apps.standby.stop()
    (check,) = await maintenance_checks(cfg.standby)
    assert not check.ok and check.detail.startswith(f"{page} does not answer: "), check.detail
    assert await maintenance_checks(cfg.primary) == []  # no maintenance page configured
