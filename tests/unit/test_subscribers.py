"""The daemon's metrics and webhook subscribers: which events they count or send."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from watchdogd import config
from watchdogd.control import Peer
from watchdogd.core.events import Event
from watchdogd.daemon import Daemon
from watchdogd.daemon.subscribers import metrics_subscriber
from watchdogd.metrics import Metrics


def failovers(m: Metrics, trigger: str, outcome: str) -> float | None:
    labels = {"cluster": "orders", "trigger": trigger, "outcome": outcome}
    return m.registry.get_sample_value("watchdogd_failovers_total", labels)


def step_count(m: Metrics, step: str, outcome: str) -> float | None:
    labels = {"cluster": "orders", "step": step, "outcome": outcome}
    return m.registry.get_sample_value("watchdogd_failover_step_duration_seconds_count", labels)


def test_the_metrics_count_steps_and_failover_outcomes_but_not_fences() -> None:
    m = Metrics("orders")
    observe = metrics_subscriber(m, lambda: 1000.0)
    observe(Event("step_completed", {"step": "promote", "seconds": 0.2}))
    observe(Event("step_failed", {"step": "promote", "outcome": "interrupted", "seconds": 1}))
    observe(Event("step_failed", {"step": "traffic"}))
    observe(Event("failover_completed", {"trigger": "manual"}))
    observe(Event("failover_aborted", {}))
    observe(Event("failover_blocked", {"reason": "lag guard"}))
    for fence in ("fence_step_completed", "fence_step_failed", "fence_completed", "fence_failed"):
        observe(Event(fence, {"step": "fence_old_primary", "trigger": "split_brain"}))
    assert step_count(m, "promote", "ok") == 1
    assert step_count(m, "promote", "interrupted") == 1
    assert step_count(m, "traffic", "failed") == 1
    assert step_count(m, "fence_old_primary", "ok") is None
    assert failovers(m, "manual", "completed") == 1
    assert failovers(m, "automatic", "aborted") == 1
    assert failovers(m, "automatic", "blocked") == 1
    last = m.registry.get_sample_value(
        "watchdogd_last_failover_timestamp_seconds", {"cluster": "orders"}
    )
    assert last == 1000.0


class Recorder:
    """Stands in for the notifier or the logger: records the event names it is given."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    def notify(self, event: str, **facts: Any) -> None:
        self.sent.append(event)

    def __getattr__(self, level: str) -> Any:
        return lambda event, **facts: self.sent.append(event)


def daemon(tmp_path: Path, webhooks: list[dict[str, Any]]) -> Daemon:
    raw: dict[str, Any] = {
        "cluster": "orders",
        "primary": {"name": "main", "database": {"engine": "postgres", "dsn": "postgresql://a/x"}},
        "standby": {
            "name": "failover",
            "database": {"engine": "postgres", "dsn": "postgresql://b/x"},
        },
        "failover": {"steps": [{"name": "promote_standby", "action": "promote"}]},
        "metrics": {"enabled": False},
        "state_dir": str(tmp_path / "state"),
    }
    if webhooks:
        raw["notify"] = {"webhooks": webhooks}
    return Daemon(config.parse(raw), log=Recorder())


def test_webhooks_get_notifications_and_fence_news_only_when_configured(tmp_path: Path) -> None:
    for hooks, expected in (
        ([], ["primary_down", "paused"]),
        (
            [{"url": "http://127.0.0.1:9/hook"}],
            ["primary_down", "paused", "fence_failed", "journal_write_failed"],
        ),
    ):
        d = daemon(tmp_path, hooks)
        d.notifier = Recorder()  # type: ignore[assignment]
        for name in ("primary_down", "state_changed", "paused", "fence_failed", "acked"):
            d.emit(name)
        d.emit("journal_write_failed", error="disk full", record="pause")
        assert d.notifier.sent == expected  # type: ignore[attr-defined]


async def test_a_raising_subscriber_never_stops_a_command(tmp_path: Path) -> None:
    d = daemon(tmp_path, [])
    heard: list[str] = []

    def broken(event: Event) -> None:
        raise RuntimeError("subscriber bug")

    d.bus.subscribe(broken)
    d.bus.subscribe(lambda e: heard.append(e.name))
    d.state = d.journal.load()
    d.policy.journal = d.state
    try:
        reply = await d.handle_command("pause", {"reason": "x"}, Peer(1, 0, 0, "root"))
    finally:
        d.journal.close()
    assert reply == {"paused": True, "reason": "x"} and d.state.paused
    assert "paused" in heard
    assert "event_subscriber_failed" in d.log.sent
