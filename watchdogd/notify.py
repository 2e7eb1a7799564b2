"""Webhook notifications: turning daemon events into JSON POSTs, without ever slowing
the daemon down.

``Notifier.notify()`` only renders the body and puts it on a bounded queue per webhook;
one background task per webhook delivers that queue in order, retrying each message with
exponential backoff a bounded number of times. A dead receiver costs warnings in the log,
never a blocked probe loop or failover. When a queue is full the oldest message is
dropped (with a warning): the newest state of the cluster matters most.

Bodies are ``{"event", "cluster", "ts", ...facts}``; facts are masked with the daemon's
secrets. Header values (tokens) are sent as configured but never logged, and logs name a
webhook by its origin (``https://hooks.example.com``) because URL paths often hold tokens.

Its own log events are ``notify.<what>`` (``notify.retrying``, ``notify.gave_up``), in the
style of ``control.<what>``; bare names (``failover_started``) are the daemon's events.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from watchdogd.core.events import NOTIFICATIONS
from watchdogd.core.model import WebhookConfig
from watchdogd.core.secrets import Secrets, as_secrets

if TYPE_CHECKING:
    import aiohttp

# The names an ``events:`` filter may use; watchdogd.core.events owns them.
EVENTS = NOTIFICATIONS

# Receivers that answer these may accept the same request later; other 4xx will not.
_RETRYABLE_4XX = frozenset({408, 425, 429})


class _Log(Protocol):
    def debug(self, event: str, /, **kw: Any) -> Any: ...
    def info(self, event: str, /, **kw: Any) -> Any: ...
    def warning(self, event: str, /, **kw: Any) -> Any: ...


def origin(url: str) -> str:
    """``https://hooks.example.com/T0/B0/secret`` → ``https://hooks.example.com``."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}"


def unknown_events(webhooks: Iterable[WebhookConfig]) -> list[str]:
    """One line per ``events`` filter entry that names no event (a typo never fires)."""
    problems = []
    for i, hook in enumerate(webhooks):
        for name in sorted(hook.events - EVENTS):
            problems.append(
                f"notify.webhooks[{i}].events: unknown event {name!r}; "
                f"known: {', '.join(sorted(EVENTS))}"
            )
    return problems


class _Delivery:
    """One webhook: its queue and its worker."""

    def __init__(self, index: int, config: WebhookConfig, queue_size: int) -> None:
        self.index = index
        self.config = config
        self.name = origin(config.url)
        self.queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(queue_size)
        self.task: asyncio.Task[None] | None = None
        self.busy = False  # a message taken off the queue is being delivered

    def undelivered(self) -> int:
        return self.queue.qsize() + (1 if self.busy else 0)

    def wants(self, event: str) -> bool:
        return not self.config.events or event in self.config.events


class Notifier:
    """Deliver daemon events to the configured webhooks in the background.

    ``notify`` must be called from the event loop's thread; it never awaits and never
    raises. Call ``start()`` inside the running loop (messages queued before are kept)
    and ``close()`` on shutdown.
    """

    def __init__(
        self,
        webhooks: Sequence[WebhookConfig],
        cluster: str,
        log: _Log,
        secrets: Secrets | Iterable[str] = (),
        *,
        queue_size: int = 100,
        max_attempts: int = 5,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if queue_size < 1 or max_attempts < 1:
            raise ValueError("queue_size and max_attempts must be at least 1")
        self.cluster = cluster
        self.log = log
        self.secrets = as_secrets(secrets)
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.clock = clock
        self._deliveries = [_Delivery(i, w, queue_size) for i, w in enumerate(webhooks)]
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        for problem in unknown_events(webhooks):
            log.warning("notify.unknown_filter_event", problem=problem)

    # ----------------------------------------------------------------------- API

    def notify(self, event: str, **facts: Any) -> None:
        """Queue ``event`` for every webhook that wants it; returns at once."""
        try:
            self._notify(event, facts)
        except Exception as exc:  # a notification must never take a caller down
            self.log.warning(
                "notify.dropped",
                notify_event=event,
                error=self.secrets.mask(f"{type(exc).__name__}: {exc}"),
            )

    async def start(self) -> None:
        if self._session is not None or self._closed or not self._deliveries:
            return
        import aiohttp  # only with webhooks: the client is heavy for a daemon without

        self._session = aiohttp.ClientSession()
        for d in self._deliveries:
            d.task = asyncio.create_task(self._run(d), name=f"webhook-{d.index}")

    async def close(self, timeout: float = 2.0) -> None:
        """Give queued messages up to ``timeout`` seconds, then cancel what is left."""
        self._closed = True
        tasks = [d.task for d in self._deliveries if d.task is not None]
        joins = [asyncio.ensure_future(d.queue.join()) for d in self._deliveries if tasks]
        if joins:
            _, pending = await asyncio.wait(joins, timeout=timeout)
            for fut in pending:
                fut.cancel()
        left = [d.undelivered() for d in self._deliveries]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, *joins, return_exceptions=True)
        for d, count in zip(self._deliveries, left, strict=True):
            if count:
                self.log.warning("notify.undelivered_at_shutdown", webhook=d.name, count=count)
            d.task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def pending(self) -> int:
        """Messages queued and not yet delivered or given up (all webhooks)."""
        return sum(d.undelivered() for d in self._deliveries)

    # ----------------------------------------------------------------------- internals

    def _notify(self, event: str, facts: Mapping[str, Any]) -> None:
        targets = [d for d in self._deliveries if d.wants(event)]
        if event not in EVENTS:
            # Still sent: losing a notification is worse than an odd event name.
            self.log.warning("notify.unknown_event", notify_event=event)
        if not targets:
            return
        if self._closed:
            self.log.warning("notify.dropped_after_shutdown", notify_event=event)
            return
        now = self.clock()
        ts = datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds")
        ts = ts.replace("+00:00", "Z")
        body: dict[str, Any] = {"event": event, "cluster": self.cluster, "ts": ts}
        for key, value in self.secrets.mask_value(dict(facts)).items():
            body.setdefault(key, value)
        # Objects JSON does not know are sent as their (masked) text.
        payload = json.dumps(body, default=lambda o: self.secrets.mask(str(o))).encode()
        for d in targets:
            if d.queue.full():
                dropped, _ = d.queue.get_nowait()
                d.queue.task_done()
                self.log.warning(
                    "notify.queue_full_dropped_oldest",
                    webhook=d.name,
                    dropped_event=dropped,
                    queue_size=d.queue.maxsize,
                )
            d.queue.put_nowait((event, payload))

    async def _run(self, d: _Delivery) -> None:
        while True:
            event, payload = await d.queue.get()
            d.busy = True
            try:
                await self._deliver(d, event, payload)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep the worker alive whatever happens
                self.log.warning(
                    "notify.delivery_crashed",
                    webhook=d.name,
                    notify_event=event,
                    error=self.secrets.mask(f"{type(exc).__name__}: {exc}"),
                )
            finally:
                d.busy = False
                d.queue.task_done()

    async def _deliver(self, d: _Delivery, event: str, payload: bytes) -> None:
        import aiohttp  # loaded by start()

        headers = {"Content-Type": "application/json", **d.config.headers}
        for attempt in range(1, self.max_attempts + 1):
            retry_after: float | None = None
            try:
                assert self._session is not None
                async with self._session.post(
                    d.config.url,
                    data=payload,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=d.config.timeout),
                    allow_redirects=False,
                ) as resp:
                    status = resp.status
                    if 200 <= status < 300:
                        self.log.debug(
                            "notify.delivered",
                            webhook=d.name,
                            notify_event=event,
                            attempt=attempt,
                        )
                        return
                    retry_after = _retry_after(resp.headers.get("Retry-After"))
                error = f"HTTP {status}"
                if 400 <= status < 500 and status not in _RETRYABLE_4XX:
                    self.log.warning(
                        "notify.rejected",
                        webhook=d.name,
                        notify_event=event,
                        error=error,
                    )
                    return
            except TimeoutError:
                error = f"no answer within {d.config.timeout:g}s"
            except aiohttp.ClientError as exc:
                error = self._describe(d, exc)
            if attempt == self.max_attempts:
                self.log.warning(
                    "notify.gave_up",
                    webhook=d.name,
                    notify_event=event,
                    attempts=attempt,
                    error=error,
                )
                return
            delay = self._backoff(attempt, retry_after)
            self.log.warning(
                "notify.retrying",
                webhook=d.name,
                notify_event=event,
                attempt=attempt,
                error=error,
                retry_in=round(delay, 3),
            )
            await asyncio.sleep(delay)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        delay = min(self.backoff_cap, self.backoff_base * 2.0 ** (attempt - 1))
        # Up to 10% jitter so several daemons do not hammer a recovering receiver in step.
        delay *= 1 + random.random() * 0.1
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.backoff_cap))
        return min(delay, self.backoff_cap)

    def _describe(self, d: _Delivery, exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        # aiohttp puts the full URL in some messages; its path may be a token.
        text = text.replace(d.config.url, d.name)
        return self.secrets.mask(" ".join(text.split()))


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    with contextlib.suppress(ValueError):
        return max(float(value), 0.0)
    return None
