"""Prometheus metrics: the metric names and labels (a contract with config/alerts.yml and
config/grafana-dashboard.json), one ``CollectorRegistry`` per daemon instance, and the small
server (``watchdogd.core.httpd``: no aiohttp, issue 13) that exposes ``/metrics`` and
``/healthz``.

Conventions chosen here (documented because alerts depend on them):

- Unknown values are ``NaN``, never "the last value seen": ``set_lag(..., None)`` and
  ``set_streaming(..., None)`` write NaN, so a dashboard shows a gap instead of a stale
  figure and ``lag > x`` comparisons stay false while ``streaming != 1`` is true.
- Label sets that rate()/increase() are taken over are created at zero up front
  (``watchdogd_failovers_total`` for every trigger x outcome, a probe's failure counter on its
  first observation), so the first increment is visible as an increase.
- ``watchdogd_last_failover_timestamp_seconds`` is the time the last *completed* failover
  finished (when the standby last became the primary); 0 until then.
- ``watchdogd_config_last_reload_timestamp_seconds`` is the time of the last *successful*
  load or reload (like Prometheus' own ``..._last_reload_success_timestamp_seconds``).
- ``watchdogd_failover_ready`` starts at 0: unknown is not ready (the readiness checks
  run with the first probe cycle); ``watchdogd_readiness_check_ok`` has one series per
  check the config names, and a check a reload removed is removed from it.
- ``watchdogd_journal_writable`` starts at 1 (a daemon whose journal fails its write-test
  at start does not start) and follows every journal write after that.

The HTTP port is reachable by whoever can reach the host (witnesses make it so), so it
cannot be allowed to take the daemon's file descriptors (and with them probes, the
control socket and the journal): at most ``MAX_HTTP_CONNECTIONS`` at once (a new one
sheds the oldest idle one), idle ones closed after ``KEEPALIVE_TIMEOUT``, and
``raise_fd_limit`` lifts the soft descriptor limit to the hard one. Every response body
is masked with the daemon's current secrets by one middleware.
"""

from __future__ import annotations

import contextlib
import math
import resource
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from watchdogd import __version__
from watchdogd.core import httpd as web
from watchdogd.core.errors import WatchdogdError
from watchdogd.core.secrets import Secrets, as_secrets

Handler = web.Handler

STATES = ("watching", "suspect", "failing_over", "failed_over", "paused", "blocked", "failed")
# A fleet watcher's extra state (issue 12): exported only with ``store:`` configured.
FLEET_STATES = (*STATES, "store_unavailable")
TRIGGERS = ("automatic", "manual", "switchover")
OUTCOMES = ("completed", "failed", "aborted", "blocked")

PROBE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# A step is an HTTP call (tens of ms) up to a promotion waiting for WAL replay (minutes).
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


# A scrape, a few witnesses and health checks need a handful; the cap is what an
# unauthenticated peer can hold of the daemon's descriptors.
MAX_HTTP_CONNECTIONS = 64
# A scraper reconnecting every 15s costs nothing; an idle peer must not hold a descriptor.
KEEPALIVE_TIMEOUT = 5.0


class MetricsServerError(WatchdogdError):
    """The metrics endpoint could not be started; the message is one clear line."""


def _flag(value: bool | None) -> float:
    if value is None:
        return math.nan
    return 1.0 if value else 0.0


class Metrics:
    """Every metric of one daemon instance, registered in its own registry."""

    def __init__(
        self,
        cluster: str,
        registry: CollectorRegistry | None = None,
        *,
        process_metrics: bool = True,
        fleet: bool = False,
    ) -> None:
        self.cluster = cluster
        self.states = FLEET_STATES if fleet else STATES
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        if process_metrics:
            # process_* (memory, fds, CPU) and python_*: cheap and what an operator checks
            # first when the daemon itself misbehaves.
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)

        c = ("cluster",)
        self.build_info = Gauge(
            "watchdogd_build_info",
            "Always 1; labels carry the version.",
            ("version", "cluster"),
            registry=r,
        )
        self.probe_success = Gauge(
            "watchdogd_probe_success",
            "1 if the last probe succeeded, else 0.",
            ("cluster", "node", "probe"),
            registry=r,
        )
        self.probe_duration = Histogram(
            "watchdogd_probe_duration_seconds",
            "Probe latency.",
            ("cluster", "node", "probe"),
            buckets=PROBE_BUCKETS,
            registry=r,
        )
        self.probe_failures = Counter(
            "watchdogd_probe_failures_total",
            "Failed probes.",
            ("cluster", "node", "probe"),
            registry=r,
        )
        self.primary_down = Gauge(
            "watchdogd_primary_down_seconds",
            "How long the primary has been judged down (0 while healthy).",
            c,
            registry=r,
        )
        self.outage_threshold = Gauge(
            "watchdogd_outage_threshold_seconds",
            "Configured outage threshold before an automatic failover.",
            c,
            registry=r,
        )
        self.lag_bytes = Gauge(
            "watchdogd_replication_lag_bytes",
            "Replication lag of a standby in bytes (NaN: unknown).",
            ("cluster", "standby"),
            registry=r,
        )
        self.lag_seconds = Gauge(
            "watchdogd_replication_lag_seconds",
            "Replication lag of a standby in seconds (NaN: unknown).",
            ("cluster", "standby"),
            registry=r,
        )
        self.max_lag_bytes = Gauge(
            "watchdogd_failover_max_lag_bytes",
            "Lag guard: above this byte lag an automatic failover is refused.",
            c,
            registry=r,
        )
        self.max_lag_seconds = Gauge(
            "watchdogd_failover_max_lag_seconds",
            "Lag guard in seconds (absent when not configured).",
            c,
            registry=r,
        )
        self.streaming = Gauge(
            "watchdogd_standby_streaming",
            "1 if the standby receives from the primary, 0 if not, NaN if unknown.",
            ("cluster", "standby"),
            registry=r,
        )
        self.state = Gauge(
            "watchdogd_state",
            "1 for the current state of the state machine, 0 for the others.",
            ("cluster", "state"),
            registry=r,
        )
        self.armed = Gauge(
            "watchdogd_automatic_failover_armed",
            "1 if an outage would trigger an automatic failover right now.",
            c,
            registry=r,
        )
        self.in_progress = Gauge(
            "watchdogd_failover_in_progress", "1 while a failover sequence runs.", c, registry=r
        )
        self.partition = Gauge(
            "watchdogd_partition_suspected",
            "1 if our probes fail but the standby still sees the primary.",
            c,
            registry=r,
        )
        self.split_brain = Gauge(
            "watchdogd_split_brain", "1 if more than one node accepts writes.", c, registry=r
        )
        self.writable_primaries = Gauge(
            "watchdogd_writable_primaries", "Number of nodes accepting writes.", c, registry=r
        )
        self.failovers = Counter(
            "watchdogd_failovers_total",
            "Failover sequences by trigger and outcome.",
            ("cluster", "trigger", "outcome"),
            registry=r,
        )
        self.step_duration = Histogram(
            "watchdogd_failover_step_duration_seconds",
            "Duration of failover steps.",
            ("cluster", "step", "outcome"),
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.last_failover = Gauge(
            "watchdogd_last_failover_timestamp_seconds",
            "When the last completed failover finished (0: never).",
            c,
            registry=r,
        )
        self.cycle_timestamp = Gauge(
            "watchdogd_probe_cycle_timestamp_seconds",
            "When the last probe cycle completed.",
            c,
            registry=r,
        )
        self.reload_success = Gauge(
            "watchdogd_config_reload_success",
            "1 if the last config load or reload succeeded.",
            c,
            registry=r,
        )
        self.journal_writable = Gauge(
            "watchdogd_journal_writable",
            "1 while the last journal write succeeded, 0 after a failed one.",
            c,
            registry=r,
        )
        self.reload_timestamp = Gauge(
            "watchdogd_config_last_reload_timestamp_seconds",
            "When the config was last loaded or reloaded successfully.",
            c,
            registry=r,
        )
        self.failover_ready = Gauge(
            "watchdogd_failover_ready",
            "1 if every readiness check that can stop a failover passes, else 0.",
            c,
            registry=r,
        )
        self.readiness_check = Gauge(
            "watchdogd_readiness_check_ok",
            "1 if this readiness check passed at its last run, else 0.",
            ("cluster", "check"),
            registry=r,
        )
        self._readiness_checks: set[str] = set()
        self.rejoin_waiting = Gauge(
            "watchdogd_rejoin_waiting",
            "1 while auto_rejoin waits for an operator (writes diverged, or unknown).",
            c,
            registry=r,
        )

        if fleet:
            self.store_up = Gauge(
                "watchdogd_store_up",
                "1 while the fleet's store (etcd) answers this watcher, else 0.",
                c,
                registry=r,
            )
            self.is_leader = Gauge(
                "watchdogd_is_leader",
                "1 while this watcher leads the fleet (holds the leader key), else 0.",
                c,
                registry=r,
            )
            self.voters_fresh = Gauge(
                "watchdogd_voters_fresh",
                "Voters whose view the leader received recently (leader only; -1 elsewhere).",
                c,
                registry=r,
            )
            self.voters_config_mismatched = Gauge(
                "watchdogd_voters_config_mismatched",
                "Fresh voters whose config differs from the leader's: while above 0 no "
                "automatic failover can happen (leader only; -1 elsewhere).",
                c,
                registry=r,
            )
            self.store_up.labels(cluster=cluster).set(0)
            self.is_leader.labels(cluster=cluster).set(0)
            self.voters_fresh.labels(cluster=cluster).set(-1)
            self.voters_config_mismatched.labels(cluster=cluster).set(-1)

        self.build_info.labels(version=__version__, cluster=cluster).set(1)
        for state in self.states:
            self.state.labels(cluster=cluster, state=state).set(0)
        for trigger in TRIGGERS:
            for outcome in OUTCOMES:
                self.failovers.labels(cluster=cluster, trigger=trigger, outcome=outcome)
        for gauge in (
            self.primary_down,
            self.outage_threshold,
            self.armed,
            self.in_progress,
            self.partition,
            self.split_brain,
            self.writable_primaries,
            self.last_failover,
            self.cycle_timestamp,
            self.failover_ready,
            self.rejoin_waiting,
        ):
            gauge.labels(cluster=cluster).set(0)
        self.journal_writable.labels(cluster=cluster).set(1)

    # ----------------------------------------------------------------------- sense

    def observe_probe(self, node: str, probe: str, ok: bool, seconds: float) -> None:
        labels = {"cluster": self.cluster, "node": node, "probe": probe}
        self.probe_success.labels(**labels).set(1 if ok else 0)
        self.probe_duration.labels(**labels).observe(max(seconds, 0.0))
        failures = self.probe_failures.labels(**labels)
        if not ok:
            failures.inc()

    def set_primary_down(self, seconds: float) -> None:
        self.primary_down.labels(cluster=self.cluster).set(max(seconds, 0.0))

    def set_outage_threshold(self, seconds: float) -> None:
        self.outage_threshold.labels(cluster=self.cluster).set(seconds)

    def set_lag(self, standby: str, lag_bytes: int | None, lag_seconds: float | None) -> None:
        """None means unknown and is exported as NaN (not the previous value)."""
        self.lag_bytes.labels(cluster=self.cluster, standby=standby).set(
            math.nan if lag_bytes is None else lag_bytes
        )
        self.lag_seconds.labels(cluster=self.cluster, standby=standby).set(
            math.nan if lag_seconds is None else lag_seconds
        )

    def set_lag_limits(self, max_bytes: int, max_seconds: float | None) -> None:
        """Export the configured lag guard so alerts compare against it."""
        self.max_lag_bytes.labels(cluster=self.cluster).set(max_bytes)
        if max_seconds is None:
            with contextlib.suppress(KeyError):  # older prometheus-client raise on a miss
                self.max_lag_seconds.remove(self.cluster)
        else:
            self.max_lag_seconds.labels(cluster=self.cluster).set(max_seconds)

    def set_streaming(self, standby: str, streaming: bool | None) -> None:
        """None means unknown (standby unreachable) and is exported as NaN."""
        self.streaming.labels(cluster=self.cluster, standby=standby).set(_flag(streaming))

    def set_writable_primaries(self, n: int) -> None:
        self.writable_primaries.labels(cluster=self.cluster).set(n)

    def set_split_brain(self, split: bool) -> None:
        self.split_brain.labels(cluster=self.cluster).set(_flag(split))

    def set_partition(self, suspected: bool) -> None:
        self.partition.labels(cluster=self.cluster).set(_flag(suspected))

    def cycle_completed(self, timestamp: float) -> None:
        self.cycle_timestamp.labels(cluster=self.cluster).set(timestamp)

    # ----------------------------------------------------------------------- decide / act

    def set_state(self, state: str) -> None:
        if state not in self.states:
            raise ValueError(f"unknown state {state!r}; known: {', '.join(self.states)}")
        for s in self.states:
            self.state.labels(cluster=self.cluster, state=s).set(1 if s == state else 0)

    def set_fleet(
        self, *, up: bool, leader: bool, fresh: int | None, mismatched: int | None
    ) -> None:
        """The fleet's gauges (only with ``store:``): store reachable, leading, how many
        voters the leader counts fresh and how many of those run another config (-1:
        not the leader, or no count this cycle)."""
        self.store_up.labels(cluster=self.cluster).set(_flag(up))
        self.is_leader.labels(cluster=self.cluster).set(_flag(leader))
        self.voters_fresh.labels(cluster=self.cluster).set(-1 if fresh is None else fresh)
        self.voters_config_mismatched.labels(cluster=self.cluster).set(
            -1 if mismatched is None else mismatched
        )

    def set_armed(self, armed: bool) -> None:
        self.armed.labels(cluster=self.cluster).set(_flag(armed))

    def set_readiness(self, ready: bool, checks: Mapping[str, bool]) -> None:
        """The readiness verdict and each check's result. A check the config no longer
        has (after a reload) is removed, not left at its last value."""
        self.failover_ready.labels(cluster=self.cluster).set(_flag(ready))
        for gone in self._readiness_checks - set(checks):
            with contextlib.suppress(KeyError):
                self.readiness_check.remove(self.cluster, gone)
        for name, ok in checks.items():
            self.readiness_check.labels(cluster=self.cluster, check=name).set(_flag(ok))
        self._readiness_checks = set(checks)

    def set_in_progress(self, in_progress: bool) -> None:
        self.in_progress.labels(cluster=self.cluster).set(_flag(in_progress))

    def set_rejoin_waiting(self, waiting: bool) -> None:
        self.rejoin_waiting.labels(cluster=self.cluster).set(_flag(waiting))

    def failover_finished(self, trigger: str, outcome: str, timestamp: float) -> None:
        if trigger not in TRIGGERS:
            raise ValueError(f"unknown failover trigger {trigger!r}; known: {', '.join(TRIGGERS)}")
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown failover outcome {outcome!r}; known: {', '.join(OUTCOMES)}")
        self.failovers.labels(cluster=self.cluster, trigger=trigger, outcome=outcome).inc()
        if outcome == "completed":
            self.last_failover.labels(cluster=self.cluster).set(timestamp)

    def step_finished(self, step: str, outcome: str, seconds: float) -> None:
        self.step_duration.labels(cluster=self.cluster, step=step, outcome=outcome).observe(
            max(seconds, 0.0)
        )

    def config_reloaded(self, ok: bool, timestamp: float) -> None:
        self.reload_success.labels(cluster=self.cluster).set(_flag(ok))
        if ok:
            self.reload_timestamp.labels(cluster=self.cluster).set(timestamp)

    def set_journal_writable(self, writable: bool) -> None:
        self.journal_writable.labels(cluster=self.cluster).set(_flag(writable))

    # ----------------------------------------------------------------------- exposition

    def exposition(self) -> bytes:
        """The text exposition format, as served on /metrics."""
        return generate_latest(self.registry)


def make_app(
    metrics: Metrics,
    healthz: Callable[[], tuple[bool, str]],
    extra_routes: Iterable[web.Route] | None = None,
    *,
    secrets: Secrets | Iterable[str] = (),
) -> web.App:
    """GET /metrics (Prometheus exposition) and GET /healthz (200 ``ok ...`` or 503).

    ``extra_routes`` are ``(method, path, handler)`` tuples (``web.get(path, handler)``);
    more can be attached to the returned app (``app.router.add_get(path, handler)``).
    Every response body is masked with ``secrets`` (best the daemon's holder, so a
    reload's new secrets are masked at once).
    """

    async def healthz_handler(request: web.Request) -> web.Response:
        try:
            alive, detail = healthz()
        except Exception as exc:  # a broken check must read as unhealthy, not as a 500
            alive, detail = False, f"health check raised {type(exc).__name__}"
        detail = " ".join(detail.split())
        if alive:
            return web.Response(text=f"ok {detail}".rstrip() + "\n")
        return web.Response(status=503, text=f"unhealthy {detail}".rstrip() + "\n")

    app = web.App(middlewares=[_masking(as_secrets(secrets))])
    app.router.add_get("/metrics", _metrics_handler(metrics))
    app.router.add_get("/healthz", healthz_handler)
    app.add_routes(extra_routes or ())
    return app


def _masking(secrets: Secrets) -> web.Middleware:
    """A middleware masking every response body: one place, whatever a route returns
    (``/primary`` echoing a probe's detail that echoed a token, say)."""

    async def mask_body(request: web.Request, handler: Handler) -> web.Response:
        response = await handler(request)
        if secrets.values and response.body:
            # surrogateescape: bytes that are not UTF-8 come back out unchanged.
            text = response.body.decode("utf-8", "surrogateescape")
            masked = secrets.mask(text)
            if masked != text:
                response.body = masked.encode("utf-8", "surrogateescape")
        return response

    return mask_body


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return (before, after).

    systemd starts services with a soft limit of 1024 (the hard one is far higher):
    enough to be exhausted by connections, not enough to matter for memory."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft >= hard:
        return soft, soft
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft, soft
    return soft, target


def _metrics_handler(metrics: Metrics) -> Handler:
    """The exposition as prometheus-client serves it: the format the Accept header asks
    for (OpenMetrics or text), ``name[]`` to restrict it, gzip when accepted."""

    async def handler(request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        registry: Any = metrics.registry
        if names := request.query_all.get("name[]"):
            registry = registry.restricted_registry(names)
        return web.Response(
            body=encoder(registry), headers={"Content-Type": content_type}, compress=True
        )

    return handler


async def start_http(
    app: web.App,
    host: str,
    port: int,
    *,
    max_connections: int = MAX_HTTP_CONNECTIONS,
    keepalive_timeout: float = KEEPALIVE_TIMEOUT,
) -> web.Server:
    """Serve ``app`` on host:port (port 0: any free port, see ``bound_port``), with at
    most ``max_connections`` connections, idle ones closed after ``keepalive_timeout``.

    Raises MetricsServerError with one line (e.g. the port is taken).
    """
    # Also done by the daemon at start; here too so nothing serves the port without it.
    raise_fd_limit()
    server = web.Server(app, max_connections=max_connections, keepalive_timeout=keepalive_timeout)
    try:
        await server.start(host, port)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise MetricsServerError(
            f"metrics.listen: cannot listen on {host}:{port}: {reason}"
        ) from None
    return server


def bound_port(server: web.Server) -> int:
    """The TCP port the server listens on (useful after ``start_http(..., port=0)``)."""
    port = server.port
    if port is None:
        raise MetricsServerError("metrics server is not listening")
    return port


async def stop_http(server: web.Server) -> None:
    await server.cleanup()
