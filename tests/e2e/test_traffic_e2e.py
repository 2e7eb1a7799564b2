"""Issue 7's proof for the traffic and platform actions: a real PostgreSQL pair, the
application stand-ins, a real HAProxy and a real BIND zone driven by the daemon as a
real process; and the Cloud 66 sequence, whose vendor API cannot be reached from here,
driven by the daemon in-process against a mocked API (aioresponses) and the real pair."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aioresponses import aioresponses

from tests.support import timing
from tests.support.apps import DemoApps
from tests.support.bind import Bind, bind_server
from tests.support.daemon import DaemonProcess, ctl, lab_config
from tests.support.haproxy import Haproxy, Server, haproxy
from tests.support.vendor import VendorAPI
from watchdogd import config as configmod
from watchdogd.actions.cloud66 import API_BASE
from watchdogd.control import Peer
from watchdogd.daemon import Daemon
from watchdogd.demo.lab import PgPair
from watchdogd.logging import reset_logging

Factory = Callable[..., DaemonProcess]
CHECK = "check inter 100ms rise 1 fall 1"
ZONE = "example.test"
# Both stacks share loopback here; the record carries TEST-NET stand-ins for the
# stacks' public addresses.
PRIMARY_ADDRESS, STANDBY_ADDRESS = "192.0.2.10", "192.0.2.20"
APP_KEY = "maint-api-key-5d1c0e"
TRAFFIC_STEPS = [
    "primary_maintenance_on",
    "stop_replication",
    "promote_standby",
    "standby_maintenance_off",
    "switch_lb",
    "point_dns",
]


# --------------------------------------------------------------------------- helpers


async def through(lb: Haproxy, method: str, path: str) -> tuple[int, dict[str, Any]]:
    """One request through HAProxy's frontend; the app stand-in answers JSON."""
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s,
        s.request(method, lb.frontend + path) as r,
    ):
        body: dict[str, Any] = await r.json(content_type=None)
        return r.status, body


def answer(bind: Bind, name: str) -> tuple[set[str], int | None]:
    """The record's values and TTL as any resolver would get them (unsigned query)."""
    reply = bind.query(f"{name}.{ZONE}.", "A")
    if not reply.answer:
        return set(), None
    rrset = reply.answer[0]
    return {r.to_text() for r in rrset}, rrset.ttl


def step_order(records: list[dict[str, Any]]) -> list[str]:
    return [r["step"] for r in records if r["type"] == "step_finished" and r["outcome"] == "ok"]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def bind() -> Iterator[Bind]:
    with bind_server(ZONE, f"app IN A {PRIMARY_ADDRESS}") as server:
        yield server


@pytest_asyncio.fixture
async def lb(demo_apps: DemoApps, tmp_path: Path) -> AsyncIterator[Haproxy]:
    """Servers named after the nodes: main serving, failover in maintenance."""
    servers = [
        Server("main", demo_apps.primary.port, CHECK),
        Server("failover", demo_apps.standby.port, f"{CHECK} disabled"),
    ]
    async with haproxy(tmp_path, servers) as proxy:
        yield proxy


# --------------------------------------------------------------------------- HAProxy + DNS


def traffic_config(
    pair: PgPair, apps: DemoApps, lb: Haproxy, bind: Bind, tmp: Path
) -> dict[str, Any]:
    cfg = lab_config(pair, tmp, apps, interval="500ms", timeout="300ms", threshold="1500ms")
    steps = cfg["failover"]["steps"]
    assert [s["name"] for s in steps][:4] == TRAFFIC_STEPS[:4]
    # A maintenance API wants a key: a secret the dry run must show as ***.
    steps[0]["headers"] = {"X-Api-Key": "${APP_API_KEY}"}
    steps[4:] = [
        {
            "name": "switch_lb",
            "action": "haproxy",
            "socket": lb.admin_socket,
            "backend": "app",
            "activate": "{standby.name}",
            "deactivate": ["{primary.name}"],
            "timeout": "5s",
        },
        {
            "name": "point_dns",
            "action": "dns",
            "server": bind.server,
            "zone": ZONE,
            "record": "app",
            "type": "A",
            "value": STANDBY_ADDRESS,
            "ttl": 30,
            "timeout": "5s",
            "tsig": {"name": bind.key_name, "algorithm": "hmac-sha256", "secret": "${DNS_TSIG}"},
        },
    ]
    return cfg


async def test_kill_primary_moves_http_and_dns_traffic_to_the_standby(
    pg_pair: PgPair,
    demo_apps: DemoApps,
    lb: Haproxy,
    bind: Bind,
    daemon_factory: Factory,
    tmp_path: Path,
) -> None:
    cfg = traffic_config(pg_pair, demo_apps, lb, bind, tmp_path)
    d = daemon_factory(cfg, env={"DNS_TSIG": bind.secret, "APP_API_KEY": APP_KEY})
    await d.start()
    await d.wait_state("watching")
    assert (await through(lb, "GET", "/maintenance"))[1]["app"] == "primary"
    assert answer(bind, "app") == ({PRIMARY_ADDRESS}, 300)

    # The operator's preview: every step rendered, the secrets masked or absent.
    human = await ctl("--socket", d.socket, "failover", "--dry-run", "--force")
    assert human.code == 0, human
    assert re.findall(r"^ *\d+\. (\S+) \[", human.out, re.MULTILINE) == TRAFFIC_STEPS
    assert "set server app/failover state ready" in human.out
    assert "set server app/main state maint" in human.out
    assert f"replace app.{ZONE}. 30 IN A {STANDBY_ADDRESS}" in human.out
    assert f"tsig_key: {bind.key_name}" in human.out
    assert '"X-Api-Key": "***"' in human.out
    raw = await ctl("--socket", d.socket, "failover", "--dry-run", "--force", "--json")
    assert raw.code == 0, raw
    steps = {s["name"]: s for s in json.loads(raw.out)["plan"]["steps"]}
    assert steps["switch_lb"]["commands"] == [
        "set server app/failover state ready",
        "set server app/main state maint",
    ]
    assert steps["point_dns"]["update"] == f"replace app.{ZONE}. 30 IN A {STANDBY_ADDRESS}"
    assert steps["primary_maintenance_on"]["headers"] == {"X-Api-Key": "***"}
    for text in (human.out, human.err, raw.out, raw.err):
        assert bind.secret not in text and APP_KEY not in text
    assert answer(bind, "app") == ({PRIMARY_ADDRESS}, 300)  # the dry run changed nothing

    pg_pair.primary.kill()
    status = await d.wait_state("failed_over", within=20)

    assert step_order(d.journal()) == TRAFFIC_STEPS
    assert status["roles"] == {"primary": "failover", "standby": "main"}
    # HTTP through the load balancer lands on the standby's app, out of maintenance,
    # whose database (the promoted standby) takes the write.
    code, body = await through(lb, "GET", "/maintenance")
    assert (code, body["app"], body["maintenance"]) == (200, "standby", False)
    code, body = await through(lb, "POST", "/orders")
    assert (code, body["app"]) == (201, "standby"), body
    assert not demo_apps.primary.calls_to("POST", "/orders")
    # The record answers the standby's address with the new TTL.
    assert answer(bind, "app") == ({STANDBY_ADDRESS}, 30)
    logs = d.logs()
    assert bind.secret not in logs and APP_KEY not in logs
    assert bind.secret not in json.dumps(status)


# --------------------------------------------------------------------------- Cloud 66

TOKEN = "c66-e2e-token-0b7d3f2a"
MAIN_STACK, STANDBY_STACK, GROUP = "stk-main-4e1", "stk-failover-9a2", "fg-orders-1"
C66_STEPS = [
    "primary_maintenance_on",
    "stop_replication",
    "promote_standby",
    "standby_maintenance_off",
    "switch_failover_group",
]


@dataclass(frozen=True)
class ApiCall:
    method: str
    url: str
    body: Any
    authorization: str | None


class Cloud66Stub:
    """Canned Cloud 66 replies, each answered once in order, recording every call."""

    def __init__(self, api: aioresponses) -> None:
        self.api = api
        self.calls: list[ApiCall] = []

    def reply(self, method: str, path: str, response: dict[str, Any]) -> None:
        def record(url: Any, **kwargs: Any) -> None:
            auth = (kwargs.get("headers") or {}).get("Authorization")
            self.calls.append(ApiCall(method, str(url), kwargs.get("json"), auth))

        self.api.add(
            API_BASE + path, method=method, payload={"response": response}, callback=record
        )

    def stack_action(self, stack: str, method: str, path: str, action_id: int, polls: int) -> None:
        """A call answered with a running stack action, finished after ``polls`` polls."""
        self.reply(method, path, _action(action_id, finished=False))
        for i in range(polls):
            done = i == polls - 1
            self.reply("GET", f"/stacks/{stack}/actions/{action_id}", _action(action_id, done))


def _action(action_id: int, finished: bool) -> dict[str, Any]:
    return {
        "id": action_id,
        "started_at": "2026-11-28T02:00:00Z",
        "finished_at": "2026-11-28T02:00:04Z" if finished else None,
        "finished_success": True if finished else None,
        "finished_message": "done" if finished else None,
    }


def _group(current: int, busy: bool) -> dict[str, Any]:
    return {"uid": GROUP, "current_stack": current, "busy_toggling": busy}


def cloud66_config(pair: PgPair, apps: DemoApps, tmp: Path) -> dict[str, Any]:
    def c66(name: str, **keys: Any) -> dict[str, Any]:
        return {"name": name, "action": "cloud66", "timeout": "5s", "poll_interval": "50ms", **keys}

    return {
        "cluster": "orders",
        "primary": {
            "name": "main",
            "database": {"engine": "postgres", "dsn": pair.primary.dsn},
            "app": {"health_url": f"{apps.primary.url}/health"},
        },
        "standby": {
            "name": "failover",
            "database": {"engine": "postgres", "dsn": pair.standby.dsn},
            "app": {"health_url": f"{apps.standby.url}/health"},
        },
        "probe": {"interval": "500ms", "timeout": "300ms", "recovery_successes": 3},
        "failover": {
            "mode": "automatic",
            "outage_threshold": "1500ms",
            "max_lag": "16MB",
            "cooldown": "1h",
            "steps": [
                c66(
                    "primary_maintenance_on",
                    operation="maintenance",
                    stack=MAIN_STACK,
                    enabled=True,
                    required=False,
                ),
                {"name": "stop_replication", "action": "stop_replication"},
                {"name": "promote_standby", "action": "promote"},
                c66(
                    "standby_maintenance_off",
                    operation="maintenance",
                    stack=STANDBY_STACK,
                    enabled=False,
                ),
                c66(
                    "switch_failover_group",
                    operation="switch_failover_group",
                    failover_group=GROUP,
                    to="secondary",
                ),
            ],
        },
        "cloud66": {"token": "${C66_TOKEN}"},
        "metrics": {"enabled": False},
        "control": {"socket": str(tmp / "run" / "control.sock")},
        "log": {"format": "json", "level": "info"},
        "state_dir": str(tmp / "state"),
    }


async def wait_for(d: Daemon, *states: str, within: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timing.within(within)
    status = d.status()
    while status["state"] not in states or status["last_cycle_at"] is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"state {status['state']!r} ({status['reason']}) never {states}")
        await asyncio.sleep(0.1)
        status = d.status()
    return status


async def test_cloud66_five_steps_in_process_against_a_mocked_api(
    pg_pair: PgPair,
    demo_apps: DemoApps,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("C66_TOKEN", TOKEN)
    cfg = configmod.parse(cloud66_config(pg_pair, demo_apps, tmp_path))
    peer = Peer(pid=os.getpid(), uid=os.getuid(), gid=os.getgid(), user="operator")
    maint = "/stacks/{}/settings/maintenance-mode.json"
    with VendorAPI(passthrough=["http://127.0.0.1"]) as api:
        # The readiness check reads the group once at start (read-only, no part of the
        # failover, so not in the stub's record); later reads find no reply and fail.
        api.get(f"{API_BASE}/failover_groups/{GROUP}", payload={"response": _group(1, False)})
        stub = Cloud66Stub(api)
        stub.stack_action(MAIN_STACK, "PUT", maint.format(MAIN_STACK), 11, polls=1)
        stub.stack_action(STANDBY_STACK, "PUT", maint.format(STANDBY_STACK), 12, polls=2)
        stub.reply("GET", f"/failover_groups/{GROUP}", _group(1, busy=False))
        stub.reply("PUT", f"/failover_groups/{GROUP}", _group(1, busy=True))
        stub.reply("GET", f"/failover_groups/{GROUP}", _group(2, busy=True))
        stub.reply("GET", f"/failover_groups/{GROUP}", _group(2, busy=False))

        d = Daemon(cfg)  # logs JSON to stderr, with its own masking, as in production
        try:
            await d.start()
            await wait_for(d, "watching")
            # the app probes reached the real stand-ins through the mock's passthrough
            assert all(n["app"]["ok"] for n in d.status()["nodes"]), d.status()["nodes"]

            preview = await d.handle_command("failover", {"dry_run": True, "force": True}, peer)
            plan = preview["plan"]
            assert [s["name"] for s in plan["steps"]] == C66_STEPS
            assert plan["steps"][0]["request"] == f"PUT {API_BASE}{maint.format(MAIN_STACK)}"
            assert plan["steps"][3]["body"] == {"value": False}
            assert plan["steps"][4]["body"] == {"current_stack": 2}
            assert TOKEN not in json.dumps(preview)
            assert stub.calls == []  # a dry run calls nothing

            pg_pair.primary.kill()
            status = await wait_for(d, "failed_over")
            journal = [
                json.loads(line)
                for line in (tmp_path / "state" / "journal.jsonl").read_text().splitlines()
            ]
        finally:
            await d.stop()
            reset_logging()

    assert step_order(journal) == C66_STEPS
    assert status["roles"] == {"primary": "failover", "standby": "main"}
    assert not pg_pair.standby.is_in_recovery()
    group = f"{API_BASE}/failover_groups/{GROUP}"
    assert [(c.method, c.url, c.body) for c in stub.calls] == [
        ("PUT", API_BASE + maint.format(MAIN_STACK), {"value": True}),
        ("GET", f"{API_BASE}/stacks/{MAIN_STACK}/actions/11", None),
        ("PUT", API_BASE + maint.format(STANDBY_STACK), {"value": False}),
        ("GET", f"{API_BASE}/stacks/{STANDBY_STACK}/actions/12", None),
        ("GET", f"{API_BASE}/stacks/{STANDBY_STACK}/actions/12", None),
        ("GET", group, None),
        ("PUT", group, {"current_stack": 2}),
        ("GET", group, None),
        ("GET", group, None),
    ]
    assert {c.authorization for c in stub.calls} == {f"Bearer {TOKEN}"}
    logged = [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.startswith("{")]
    completed = [e["step"] for e in logged if e.get("event") == "step_completed"]
    assert completed == C66_STEPS  # the daemon's own log output was captured ...
    assert not [e for e in logged if TOKEN in json.dumps(e)]  # ... and never holds the token
    assert TOKEN not in json.dumps(journal) and TOKEN not in json.dumps(status)
