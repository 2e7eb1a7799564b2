"""The daemon's events: every name in one place, with its log level and whether it is a
webhook notification, and the tiny in-process bus that hands each event to subscribers.

The daemon (and the runner it drives) only ``emit``; the log, the metrics and the
webhooks are subscribers. A subscriber that raises is logged and skipped: it never stops
the daemon, nor the subscribers after it. Names and facts are the daemon's public
interface (logs, webhooks and tests read them): add names here, never rename them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any


class Level(StrEnum):
    """The logger method an event is written with (``exception`` adds the traceback)."""

    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
    EXCEPTION = "exception"


class Notify(StrEnum):
    NO = "no"
    # A notification: sent to webhooks, and a name their ``events:`` filter accepts.
    YES = "yes"
    # Sent to webhooks when any is configured (a filterable name too): fence news a receiver
    # used to get as ``step_failed`` (fence=True), and a journal that refuses records.
    UNLISTED = "unlisted"


@dataclass(frozen=True)
class Spec:
    level: Level
    notify: Notify = Notify.NO


_I, _W, _E = Spec(Level.INFO), Spec(Level.WARNING), Spec(Level.ERROR)
_CRASH = Spec(Level.EXCEPTION)

SPECS: Mapping[str, Spec] = MappingProxyType(
    {
        # lifecycle
        "started": _I,
        "stopping": _I,
        "waiting_for_step": _I,
        "stopped": _I,
        "reloaded": _I,
        "reload_refused": _E,
        "journal_problem": _W,
        "journal_roles_ignored": _W,
        "journal_write_failed": Spec(Level.ERROR, Notify.UNLISTED),
        "journal_writable_again": _I,
        "engine_advice": _W,
        "advice_unavailable": Spec(Level.DEBUG),
        "watchdog_interval": _W,
        "event_subscriber_failed": _E,
        # the probe cycle
        "cycle_timeout": _E,
        "cycle_error": _CRASH,
        "primary_connection_lost": _I,
        # Each probe's observation, every cycle (the demo's timeline reads the first failing
        # one): debug, so a stock log does not grow by a line per probe per interval.
        "probe_observed": Spec(Level.DEBUG),
        "state_changed": _I,
        "primary_down": Spec(Level.WARNING, Notify.YES),
        "primary_still_down": _I,
        "primary_recovered": Spec(Level.INFO, Notify.YES),
        "partition_suspected": Spec(Level.WARNING, Notify.YES),
        "stall_detected": _W,
        "split_brain": Spec(Level.WARNING, Notify.YES),
        # failovers (and switchovers)
        "failover_blocked": Spec(Level.WARNING, Notify.YES),
        "failover_started": Spec(Level.INFO, Notify.YES),
        "failover_resumed": _I,
        "failover_unfinished": _W,
        "step_started": _I,
        "step_completed": _I,
        "step_retry": _W,
        "step_interrupted": _I,
        "step_failed": Spec(Level.WARNING, Notify.YES),
        "failover_completed": Spec(Level.INFO, Notify.YES),
        "failover_failed": Spec(Level.WARNING, Notify.YES),
        "failover_aborted": Spec(Level.WARNING, Notify.YES),
        "failover_interrupted": _I,
        "failover_stopped": _E,
        "failover_crashed": _CRASH,
        # fences: the runner's twins of the failover events
        "fence_started": _I,
        "fence_step_started": _I,
        "fence_step_completed": _I,
        "fence_step_retry": _W,
        "fence_step_interrupted": _I,
        "fence_step_failed": Spec(Level.WARNING, Notify.UNLISTED),
        "fence_completed": _I,
        "fence_failed": Spec(Level.WARNING, Notify.UNLISTED),
        "fence_aborted": _W,
        "fence_interrupted": _I,
        "fence_unfinished": _W,
        "fence_crashed": _CRASH,
        "fence_skipped": _I,
        # rejoins: the old primary back as the standby (the runner's twins of the failover
        # events), and the divergence report
        "writes_diverged": Spec(Level.WARNING, Notify.YES),
        "rejoin_refused": _W,
        "rejoin_waiting": Spec(Level.WARNING, Notify.YES),
        "rejoin_started": Spec(Level.INFO, Notify.YES),
        "rejoin_resumed": _I,
        "rejoin_unfinished": _W,
        "rejoin_step_started": _I,
        "rejoin_step_completed": _I,
        "rejoin_step_retry": _W,
        "rejoin_step_interrupted": _I,
        "rejoin_step_failed": Spec(Level.WARNING, Notify.YES),
        "rejoin_completed": Spec(Level.INFO, Notify.YES),
        "rejoin_failed": Spec(Level.WARNING, Notify.YES),
        "rejoin_aborted": _W,
        "rejoin_interrupted": _I,
        "rejoin_stopped": _E,
        "rejoin_crashed": _CRASH,
        # operators
        "paused": Spec(Level.INFO, Notify.YES),
        "resumed": Spec(Level.INFO, Notify.YES),
        "abort_requested": _W,
        "acked": _I,
        # a fleet of watchers (store:)
        "fleet_leader": _I,
        "fleet_leader_seen": _I,
        "fleet_leadership_lost": _W,
        "fleet_view_refused": _W,
        "store_unavailable": _W,
        "store_available": _I,
        "guard_fence_ordered": _I,
        "guard_order_withdrawn": _I,
        "fleet_journal_repaired": _I,
    }
)

# What a webhook's ``events:`` filter may name (notify.EVENTS is this set).
NOTIFICATIONS = frozenset(name for name, spec in SPECS.items() if spec.notify is not Notify.NO)
# An unregistered name is still logged, at info, and never notified.
_UNKNOWN = _I


def spec(name: str) -> Spec:
    return SPECS.get(name, _UNKNOWN)


@dataclass(frozen=True)
class Event:
    name: str
    facts: Mapping[str, Any] = field(default_factory=dict)

    @property
    def level(self) -> Level:
        return spec(self.name).level

    @property
    def notify(self) -> Notify:
        return spec(self.name).notify


Subscriber = Callable[[Event], None]


class Bus:
    """Synchronous, in-process, in subscription order. ``log`` reports a subscriber
    that raised (it must be a structlog-like logger, not a subscriber)."""

    def __init__(self, log: Any) -> None:
        self.log = log
        self._subscribers: list[Subscriber] = []

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Add a subscriber; returns the function that removes it."""
        self._subscribers.append(subscriber)

        def unsubscribe() -> None:
            if subscriber in self._subscribers:
                self._subscribers.remove(subscriber)

        return unsubscribe

    def emit(self, name: str, /, **facts: Any) -> None:
        self.publish(Event(name, facts))

    def publish(self, event: Event) -> None:
        for subscriber in tuple(self._subscribers):
            try:
                subscriber(event)
            except Exception as exc:
                # Never let one consumer of the news stop the daemon or the others.
                # A broken logger has nowhere to report to.
                with contextlib.suppress(Exception):
                    self.log.error(
                        "event_subscriber_failed",
                        event_name=event.name,
                        subscriber=getattr(subscriber, "__qualname__", repr(subscriber)),
                        error=f"{type(exc).__name__}: {exc}",
                    )


def log_subscriber(log: Any) -> Subscriber:
    """Writes each event to ``log`` at its level, with its facts as keys."""

    def write(event: Event) -> None:
        getattr(log, event.level.value)(event.name, **event.facts)

    return write
