"""How the daemon's events reach the metrics and the webhooks (the log's subscriber is
``events.log_subscriber``). Each is one function of an event; the bus keeps a raising
one from stopping the daemon."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from watchdogd.core.events import Event, Notify, Subscriber
from watchdogd.metrics import Metrics

if TYPE_CHECKING:
    from watchdogd.daemon.lifecycle import Daemon

_RUN_ENDS = frozenset({"failover_completed", "failover_failed", "failover_aborted"})


def metrics_subscriber(metrics: Metrics, wall: Callable[[], float]) -> Subscriber:
    """Step durations and outcomes; failover (and switchover) outcomes, including a
    blocked automatic failover; whether the journal can be written. A fence's events
    are its own and count as neither."""

    def observe(event: Event) -> None:
        facts = event.facts
        if event.name in ("step_completed", "step_failed"):
            metrics.step_finished(
                facts["step"],
                "ok" if event.name == "step_completed" else facts.get("outcome", "failed"),
                float(facts.get("seconds", 0.0)),
            )
        elif event.name in _RUN_ENDS:
            metrics.failover_finished(
                facts.get("trigger", "automatic"), event.name.removeprefix("failover_"), wall()
            )
        elif event.name == "failover_blocked":
            metrics.failover_finished("automatic", "blocked", wall())
        elif event.name in ("journal_write_failed", "journal_writable_again"):
            metrics.set_journal_writable(event.name == "journal_writable_again")

    return observe


def notify_subscriber(d: Daemon) -> Subscriber:
    """Notifications to the webhooks of the config in force (a reload replaces the
    notifier). Unlisted ones only when a webhook exists: the notifier warns about them."""

    def notify(event: Event) -> None:
        kind = event.notify
        if kind is Notify.YES or (kind is Notify.UNLISTED and d.config.webhooks):
            d.notifier.notify(event.name, **event.facts)

    return notify
