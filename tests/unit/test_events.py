"""The event spine: one registry of names (level, notification), and a bus whose
subscribers cannot stop the daemon or each other."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from watchdogd import notify
from watchdogd.core import events
from watchdogd.core.events import Bus, Event, Level, Notify

SOURCE = Path(notify.__file__).parent  # the watchdogd package


class Log:
    def __init__(self) -> None:
        self.entries: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        def log(event: str, **facts: Any) -> None:
            self.entries.append((level, event, facts))

        return log


def test_the_documented_notifications_are_exactly_the_webhook_filter_names() -> None:
    assert events.NOTIFICATIONS == notify.EVENTS


def test_levels_are_as_the_daemon_logged_them() -> None:
    warning = {
        "primary_down", "step_failed", "step_retry", "failover_failed", "failover_aborted",
        "failover_blocked", "split_brain", "partition_suspected", "stall_detected",
        "fence_step_failed", "fence_step_retry", "fence_failed", "fence_aborted",
        "fence_unfinished", "journal_problem", "journal_roles_ignored", "failover_unfinished",
        "watchdog_interval", "engine_advice", "abort_requested",
        "writes_diverged", "rejoin_refused", "rejoin_waiting", "rejoin_unfinished",
        "rejoin_step_retry", "rejoin_step_failed", "rejoin_failed", "rejoin_aborted",
        "fleet_leadership_lost", "fleet_view_refused", "store_unavailable",
    }  # fmt: skip
    error = {
        "journal_write_failed", "cycle_timeout", "failover_stopped", "reload_refused",
        "event_subscriber_failed", "rejoin_stopped",
    }  # fmt: skip
    crash = {"cycle_error", "failover_crashed", "fence_crashed", "rejoin_crashed"}
    for name, spec in events.SPECS.items():
        expected = (
            Level.WARNING
            if name in warning
            else Level.ERROR
            if name in error
            else Level.EXCEPTION
            if name in crash
            else Level.DEBUG
            if name in ("advice_unavailable", "probe_observed")
            else Level.INFO
        )
        assert spec.level is expected, name
    assert {n for n, s in events.SPECS.items() if s.notify is Notify.UNLISTED} == {
        "fence_step_failed",
        "fence_failed",
        "journal_write_failed",
    }


def names_in(path: Path) -> set[str]:
    text = path.read_text()
    found = set(re.findall(r'emit\(\s*"([a-z_]+)"', text))  # emit("name", ...)
    found |= set(re.findall(r'_event\(\s*"([a-z_]+)"', text))  # the runner's _event("name")
    found |= set(re.findall(r'event_name\(\s*"([a-z_]+)"', text))  # ... called by the daemon
    found |= set(re.findall(r'event = "([a-z_]+)"', text))
    return found


def test_every_event_the_daemon_and_runner_emit_is_registered() -> None:
    daemon: set[str] = set()
    for path in sorted((SOURCE / "daemon").glob("*.py")):
        daemon |= names_in(path)
    # What verdict_news returns, emitted by name.
    daemon |= {"primary_down", "primary_still_down", "primary_recovered"}
    daemon |= {"partition_suspected", "stall_detected"}
    runner = names_in(SOURCE / "failover" / "runner.py")
    runner |= {f"failover_{o}" for o in ("completed", "failed", "aborted", "interrupted")}
    # A fence's events are the runner's, renamed (Runner._event); it is never resumed.
    fence = {"fence_" + n.removeprefix("failover_") for n in runner - {"failover_resumed"}}
    # So are a rejoin's (and the daemon's stopped/crashed, renamed the same way); a rejoin
    # is resumed.
    driven = daemon & {"failover_stopped", "failover_crashed"}
    rejoin = {"rejoin_" + n.removeprefix("failover_") for n in runner | driven}
    emitted = daemon | runner | fence | rejoin
    assert emitted - set(events.SPECS) == set()
    assert set(events.SPECS) - emitted == {"event_subscriber_failed"}  # the bus's own
    assert len(emitted) > 40


def test_an_unknown_name_is_logged_at_info_and_never_notified() -> None:
    e = Event("something_new", {"x": 1})
    assert e.level is Level.INFO and e.notify is Notify.NO


def test_subscribers_get_each_event_in_order_and_can_leave() -> None:
    bus = Bus(Log())
    seen: list[tuple[str, str, dict[str, Any]]] = []
    bus.subscribe(lambda e: seen.append(("a", e.name, dict(e.facts))))
    leave = bus.subscribe(lambda e: seen.append(("b", e.name, dict(e.facts))))
    bus.emit("paused", reason="window", by="root")
    leave()
    leave()  # twice is harmless
    bus.publish(Event("resumed", {"by": "root"}))
    assert seen == [
        ("a", "paused", {"reason": "window", "by": "root"}),
        ("b", "paused", {"reason": "window", "by": "root"}),
        ("a", "resumed", {"by": "root"}),
    ]


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyError("step"), RecursionError()])
def test_a_subscriber_that_raises_is_logged_and_the_others_still_hear(exc: Exception) -> None:
    log = Log()
    bus = Bus(log)
    seen: list[str] = []

    def broken(event: Event) -> None:
        raise exc

    bus.subscribe(broken)
    bus.subscribe(lambda e: seen.append(e.name))
    bus.emit("primary_down", reason="r")
    bus.emit("primary_recovered")
    assert seen == ["primary_down", "primary_recovered"]
    failures = [f for level, name, f in log.entries if name == "event_subscriber_failed"]
    assert [lvl for lvl, n, _ in log.entries] == ["error", "error"]
    assert failures[0]["event_name"] == "primary_down"
    assert "broken" in failures[0]["subscriber"]
    assert failures[0]["error"].startswith(type(exc).__name__)


def test_a_broken_logger_does_not_break_the_bus_either() -> None:
    class Broken:
        def error(self, *a: Any, **kw: Any) -> None:
            raise OSError("stderr closed")

    bus = Bus(Broken())
    seen: list[str] = []

    def broken(e: Event) -> None:
        raise ZeroDivisionError("division by zero")

    bus.subscribe(broken)
    bus.subscribe(lambda e: seen.append(e.name))
    bus.emit("paused")
    assert seen == ["paused"]


def test_the_log_subscriber_writes_the_level_the_name_and_the_facts() -> None:
    with capture_logs() as logs:
        import structlog

        write = events.log_subscriber(structlog.get_logger())
        write(Event("primary_down", {"reason": "r", "outage_seconds": 6}))
        write(Event("journal_write_failed", {"error": "disk full"}))
        write(Event("acked", {"by": "root"}))
    assert [(e["log_level"], e["event"]) for e in logs] == [
        ("warning", "primary_down"),
        ("error", "journal_write_failed"),
        ("info", "acked"),
    ]
    assert logs[0]["reason"] == "r" and logs[0]["outage_seconds"] == 6
