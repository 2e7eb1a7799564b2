"""Webhook notifications against a real local aiohttp receiver: order and body, filters,
retries with backoff, timeouts, a dead receiver that never blocks the caller, the bounded
queue, and secrets that never reach the log."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import pytest
import structlog
from aiohttp import web
from structlog.testing import capture_logs

from watchdogd.core.model import WebhookConfig
from watchdogd.core.secrets import Secrets
from watchdogd.notify import EVENTS, Notifier, origin, unknown_events

TOKEN = "tok-6f1d2a9c"


@dataclass
class Receiver:
    url: str
    # Status to answer for each request, in order; 200 once exhausted.
    statuses: list[int] = field(default_factory=list)
    # Seconds to stall before answering, per request, in order.
    delays: list[float] = field(default_factory=list)
    requests: list[tuple[str, dict[str, str], dict[str, Any]]] = field(default_factory=list)

    def bodies(self, path: str | None = None) -> list[MutableMapping[str, Any]]:
        return [b for p, _, b in self.requests if path is None or p == path]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver(url="")

    async def handle(request: web.Request) -> web.Response:
        body = await request.json()
        index = len(rec.requests)
        rec.requests.append((request.path, dict(request.headers), body))
        if index < len(rec.delays) and rec.delays[index]:
            await asyncio.sleep(rec.delays[index])
        status = rec.statuses[index] if index < len(rec.statuses) else 200
        return web.Response(status=status, text="ok" if status < 300 else "nope")

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    rec.url = f"http://127.0.0.1:{port}"
    try:
        yield rec
    finally:
        await runner.cleanup()


@pytest.fixture
def logs() -> Iterator[list[MutableMapping[str, Any]]]:
    # Start from structlog's defaults: capture_logs() swaps only the processors, so a level
    # filter left configured by another test would hide the warnings asserted here.
    structlog.reset_defaults()
    with capture_logs() as captured:
        yield captured


async def until(predicate: Any, within: float = 3.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def hook(url: str, **kw: Any) -> WebhookConfig:
    return WebhookConfig(url=url, **kw)


def notifier(hooks: list[WebhookConfig], **kw: Any) -> Notifier:
    kw.setdefault("backoff_base", 0.02)
    return Notifier(hooks, "shop", structlog.get_logger(), kw.pop("secrets", ()), **kw)


async def test_events_arrive_in_order_with_body_and_headers(
    receiver: Receiver, logs: list[MutableMapping[str, Any]]
) -> None:
    n = notifier(
        [
            hook(f"{receiver.url}/all", headers={"Authorization": f"Bearer {TOKEN}"}),
            hook(f"{receiver.url}/done", events=frozenset({"failover_completed"})),
        ],
        clock=lambda: 1_700_000_000.25,
    )
    await n.start()
    try:
        n.notify("primary_down", node="pg1", down_for=31.5)
        n.notify("failover_started", failover_id="f-1", trigger="automatic")
        n.notify("step_failed", step="dns", error="timeout", attempt=2)
        n.notify("failover_completed", failover_id="f-1", new_primary="pg2")
        await until(lambda: len(receiver.requests) == 5)
    finally:
        await n.close()

    all_bodies = receiver.bodies("/all")
    assert [b["event"] for b in all_bodies] == [
        "primary_down",
        "failover_started",
        "step_failed",
        "failover_completed",
    ]
    assert all_bodies[0] == {
        "event": "primary_down",
        "cluster": "shop",
        "ts": "2023-11-14T22:13:20.250Z",
        "node": "pg1",
        "down_for": 31.5,
    }
    assert receiver.bodies("/done") == [
        {
            "event": "failover_completed",
            "cluster": "shop",
            "ts": "2023-11-14T22:13:20.250Z",
            "failover_id": "f-1",
            "new_primary": "pg2",
        }
    ]
    headers = {p: h for p, h, _ in receiver.requests}
    assert headers["/all"]["Authorization"] == f"Bearer {TOKEN}"
    assert headers["/all"]["Content-Type"] == "application/json"
    assert "Authorization" not in headers["/done"]
    assert [e for e in logs if e["log_level"] == "warning"] == []


async def test_receiver_failing_twice_then_accepting_gets_it(
    receiver: Receiver, logs: list[MutableMapping[str, Any]]
) -> None:
    receiver.statuses = [503, 500]
    n = notifier([hook(receiver.url)])
    await n.start()
    try:
        n.notify("failover_failed", step="promote", error="still in recovery")
        n.notify("paused", by="alice")
        await until(lambda: len(receiver.requests) == 4)
    finally:
        await n.close()
    # The retried message keeps its body (and ts) and still precedes the next one.
    events = [b["event"] for b in receiver.bodies()]
    assert events == ["failover_failed"] * 3 + ["paused"]
    assert receiver.bodies()[0] == receiver.bodies()[2]
    retries = [e for e in logs if e["event"] == "notify.retrying"]
    assert [(e["attempt"], e["error"]) for e in retries] == [(1, "HTTP 503"), (2, "HTTP 500")]
    assert all(e["log_level"] == "warning" for e in retries)
    assert not [e for e in logs if e["event"] == "notify.gave_up"]


async def test_slow_receiver_hits_per_request_timeout_then_retry_succeeds(
    receiver: Receiver, logs: list[MutableMapping[str, Any]]
) -> None:
    receiver.delays = [0.3]
    n = notifier([hook(receiver.url, timeout=0.1)])
    await n.start()
    try:
        n.notify("resumed")
        await until(lambda: len(receiver.requests) == 2)
        await until(lambda: n.pending() == 0)
    finally:
        await n.close()
    [retry] = [e for e in logs if e["event"] == "notify.retrying"]
    assert retry["error"] == "no answer within 0.1s"


async def test_rejected_message_is_not_retried(
    receiver: Receiver, logs: list[MutableMapping[str, Any]]
) -> None:
    receiver.statuses = [400]
    n = notifier([hook(receiver.url)])
    await n.start()
    try:
        n.notify("split_brain", writable=["pg1", "pg2"])
        n.notify("primary_recovered")
        await until(lambda: len(receiver.requests) == 2)
    finally:
        await n.close()
    assert [b["event"] for b in receiver.bodies()] == ["split_brain", "primary_recovered"]
    [warning] = [e for e in logs if e["log_level"] == "warning"]
    assert warning["event"] == "notify.rejected"
    assert warning["error"] == "HTTP 400"


async def test_dead_receiver_never_blocks_and_only_warns(
    logs: list[MutableMapping[str, Any]], closed_port: int
) -> None:
    url = f"http://127.0.0.1:{closed_port}/hooks/{TOKEN}"
    n = notifier(
        [hook(url, headers={"X-Token": TOKEN})], max_attempts=3, backoff_base=0.01, queue_size=200
    )
    await n.start()
    try:
        started = time.perf_counter()
        for i in range(100):
            n.notify("primary_down", seq=i)
        elapsed = time.perf_counter() - started
        assert elapsed < 0.05, f"100 notify() calls took {elapsed * 1000:.1f} ms"
        # The worker really tries (and fails) in the background meanwhile.
        await until(lambda: any(e["event"] == "notify.gave_up" for e in logs))
    finally:
        started = time.perf_counter()
        await n.close(timeout=0.2)
        assert time.perf_counter() - started < 1.0
    assert logs, "a dead receiver must be reported"
    assert {e["log_level"] for e in logs} == {"warning"}
    given_up = [e for e in logs if e["event"] == "notify.gave_up"]
    assert given_up[0]["notify_event"] == "primary_down"
    assert given_up[0]["attempts"] == 3
    assert given_up[0]["webhook"] == url.split("/hooks")[0]
    assert "Connect" in given_up[0]["error"]
    [left] = [e for e in logs if e["event"] == "notify.undelivered_at_shutdown"]
    assert 0 < left["count"] < 100
    # Neither the token in the URL path nor the header value ever reaches the log.
    assert TOKEN not in json.dumps(logs, default=str)


async def test_full_queue_drops_oldest(
    receiver: Receiver, logs: list[MutableMapping[str, Any]]
) -> None:
    n = notifier([hook(receiver.url)], queue_size=3)
    for i in range(5):  # before start(): queued, nothing delivered yet
        n.notify("primary_down", seq=i)
    assert n.pending() == 3
    dropped = [e for e in logs if e["event"] == "notify.queue_full_dropped_oldest"]
    assert len(dropped) == 2 and all(e["log_level"] == "warning" for e in dropped)
    await n.start()
    try:
        await until(lambda: len(receiver.requests) == 3)
    finally:
        await n.close()
    assert [b["seq"] for b in receiver.bodies()] == [2, 3, 4]


async def test_secrets_in_facts_are_masked(receiver: Receiver) -> None:
    secrets = Secrets(["pa55word"])
    n = notifier([hook(receiver.url)], secrets=secrets)
    await n.start()
    try:
        n.notify("step_failed", error="psql: password pa55word rejected", env={"PW": "pa55word"})
        secrets.replace(["rotated-1"])  # a reload adds the new secrets, keeps masking old ones
        n.notify("step_failed", error="token rotated-1 and pa55word")
        await until(lambda: len(receiver.requests) == 2)
    finally:
        await n.close()
    first, second = receiver.bodies()
    assert first["error"] == "psql: password *** rejected"
    assert first["env"] == {"PW": "***"}
    assert second["error"] == "token *** and ***"


async def test_notify_never_raises(
    receiver: Receiver, logs: list[MutableMapping[str, Any]]
) -> None:
    n = notifier([hook(receiver.url)])
    loop: list[Any] = []
    loop.append(loop)
    n.notify("paused", state=loop)  # cannot be serialised
    n.notify("paused", when=object())  # odd objects are sent as text
    n.notify("made_up_event")
    await n.start()
    try:
        await until(lambda: len(receiver.requests) == 2)
    finally:
        await n.close()
    assert [b["event"] for b in receiver.bodies()] == ["paused", "made_up_event"]
    assert receiver.bodies()[0]["when"].startswith("<object object")
    warnings = [e["event"] for e in logs if e["log_level"] == "warning"]
    assert warnings == ["notify.dropped", "notify.unknown_event"]
    n.notify("paused")  # after close: logged, not raised
    assert logs[-1]["event"] == "notify.dropped_after_shutdown"


def test_unknown_event_filters_are_reported() -> None:
    hooks = [hook("http://127.0.0.1:1/x", events=frozenset({"failover_complete", "paused"}))]
    assert unknown_events(hooks) == [
        "notify.webhooks[0].events: unknown event 'failover_complete'; known: "
        + ", ".join(sorted(EVENTS))
    ]
    with capture_logs() as captured:
        notifier(hooks)
    assert captured[0]["problem"].startswith("notify.webhooks[0].events: unknown event")


def test_origin_hides_paths() -> None:
    assert origin("https://hooks.slack.com/services/T0/B0/secret") == "https://hooks.slack.com"
    assert origin("http://user:pw@[::1]:8080/x?token=1") == "http://[::1]:8080"
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", origin("http://127.0.0.1:9/a"))
