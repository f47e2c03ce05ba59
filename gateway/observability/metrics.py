"""Prometheus metrics, from the finished request's context and the limiter's and reloader's state.

``Metrics`` is an observer of finished requests (``pipeline/lifecycle.py``), like the access log,
plus a gauge of open streams the relay moves. The metric objects belong to one ``Metrics``
(its own registry, never prometheus_client's global one).

Names follow the OpenTelemetry GenAI semantic conventions where they name the thing, translated
to Prometheus (dots become underscores, the unit is a suffix): ``gen_ai_client_token_usage``
(``gen_ai_token_type`` = input/output), ``gen_ai_server_time_to_first_token_seconds``,
``gen_ai_client_operation_duration_seconds``, with their advised bucket boundaries; the rest
are the gateway's own (``gateway_*``).

Labels are bounded by the config: route, upstream and key names as configured ("none" when the
request never got that far), a model name only when the config lists it (a model alias, a key's
or a limit's model), else "other": a client cannot mint label values. No label ever carries a
key, a hash, a prompt or a URL.

**Several workers** (``gateway serve --workers N``): prometheus_client's multiprocess mode. The
supervisor gives every worker one directory (``PROMETHEUS_MULTIPROC_DIR``, wiped at start, see
``prepare_multiprocess_directory``); each worker writes its values there and a scrape, answered
by any worker, sums the files, so the figures are the whole server's. A dead worker's gauges are
dropped (``mark_process_dead``); its counters stay, so totals never go down.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from gateway.context import RequestContext
from gateway.upstream.health import TargetHealth

if TYPE_CHECKING:
    from gateway.limits import LimiterStats
    from gateway.reload import ReloadStatus

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST

# OpenTelemetry GenAI semantic conventions, advised explicit bucket boundaries.
TOKEN_BUCKETS = tuple(float(4**i) for i in range(14))  # 1, 4, 16, ... 67108864
TTFT_BUCKETS = (
    *(0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1),
    *(0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0),
)
OPERATION_BUCKETS = (
    *(0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28),
    *(2.56, 5.12, 10.24, 20.48, 40.96, 81.92),
)
# A whole request: from milliseconds (a refusal) to minutes (a long generation).
REQUEST_BUCKETS = (
    *(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
    *(1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0),
)
# What the gateway itself adds: tens of microseconds to milliseconds.
OVERHEAD_BUCKETS = (
    *(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025),
    *(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
# Waiting for capacity (limits.max_wait): from a few milliseconds to its 600 s ceiling.
QUEUE_WAIT_BUCKETS = (
    *(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
    *(2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0),
)
NONE = "none"
OTHER = "other"

# gen_ai.operation.name by the upstream path's ending: the APIs the gateway knows.
_OPERATIONS = (
    ("/chat/completions", "chat"),
    ("/completions", "text_completion"),
    ("/embeddings", "embeddings"),
    ("/responses", "chat"),
    ("/messages", "chat"),
)


def operation_of(path: str) -> str:
    for ending, operation in _OPERATIONS:
        if path.endswith(ending):
            return operation
    return OTHER


class Metrics:
    """Every metric of one gateway process, and how a finished request moves them."""

    def __init__(self, *, multiprocess_dir: str | None = None) -> None:
        self.multiprocess_dir = multiprocess_dir
        # Metrics are registered here in one process; with several, a scrape reads the
        # directory instead (values are in the files, whatever registry holds the objects).
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.requests = Counter(
            "gateway_requests",
            "Requests answered, by route, upstream, key name and status class.",
            ("route", "upstream", "key", "status_class"),
            registry=registry,
        )
        self.duration = Histogram(
            "gateway_request_duration_seconds",
            "The whole request, from its head to the last byte of the response.",
            ("route",),
            buckets=REQUEST_BUCKETS,
            registry=registry,
        )
        self.upstream_ttfb = Histogram(
            "gateway_upstream_time_to_first_byte_seconds",
            "From sending a request upstream to the upstream's response head.",
            ("upstream",),
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.overhead = Histogram(
            "gateway_overhead_seconds",
            "What the gateway adds: the request's time minus the upstream exchange's.",
            ("route",),
            buckets=OVERHEAD_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "Streamed responses: from sending the request upstream to the first event.",
            ("gen_ai_operation_name", "gen_ai_request_model"),
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.operation = Histogram(
            "gen_ai_client_operation_duration_seconds",
            "GenAI operations (requests naming a model), end to end.",
            ("gen_ai_operation_name", "gen_ai_request_model"),
            buckets=OPERATION_BUCKETS,
            registry=registry,
        )
        self.tokens = Histogram(
            "gen_ai_client_token_usage",
            "Tokens per request as the upstream reported them, by key and model.",
            ("gen_ai_token_type", "gen_ai_request_model", "key"),
            buckets=TOKEN_BUCKETS,
            registry=registry,
        )
        self.spend = Counter(
            "gateway_spend_usd",
            "What requests cost at the configured prices (prices), in US dollars, by key and "
            "model, as their usage was reported.",
            ("key", "model"),
            registry=registry,
        )
        self.refusals = Counter(
            "gateway_limit_refusals",
            "Requests refused by a limit, by reason: requests, tokens, concurrency, budget, "
            "unavailable.",
            ("reason",),
            registry=registry,
        )
        self.queue_wait = Histogram(
            "gateway_queue_wait_seconds",
            "Time requests waited for capacity (limits.max_wait) before going upstream, or "
            "before their client left; only requests that waited.",
            ("route",),
            buckets=QUEUE_WAIT_BUCKETS,
            registry=registry,
        )
        self.degraded = Counter(
            "gateway_limit_degraded_decisions",
            "Limit decisions made without Redis (it failed, or its breaker was open).",
            registry=registry,
        )
        self.upstream_errors = Counter(
            "gateway_upstream_errors",
            "Upstream failures by kind: connect, timeout, protocol (before the response head), "
            "stream (after it), client (a fault in the gateway's HTTP client).",
            ("upstream", "kind"),
            registry=registry,
        )
        self.attempts = Counter(
            "gateway_upstream_attempts",
            "Attempts at upstream targets by outcome: ok (its answer was relayed), connect, "
            "timeout, protocol, client (failed before the head), status_<code> or "
            "fallback_<code> (answered, then retried or moved down the fallback chain).",
            ("upstream", "target", "outcome"),
            registry=registry,
        )
        self.retries = Counter(
            "gateway_upstream_retries",
            "Attempts after a request's first, by why the one before was left.",
            ("upstream", "reason"),
            registry=registry,
        )
        self.target_in_service = Gauge(
            "gateway_upstream_target_in_service",
            "1 while a target takes traffic; 0 while ejected or down by its health check "
            "(the lowest over workers).",
            ("upstream", "target"),
            registry=registry,
            multiprocess_mode="livemin",
        )
        self.ejections = Counter(
            "gateway_upstream_target_ejections",
            "Times a target was ejected for failing (outlier detection).",
            ("upstream", "target"),
            registry=registry,
        )
        self.open_streams = Gauge(
            "gateway_open_streams",
            "Event streams being relayed now.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.redis_errors = Counter(
            "gateway_redis_errors",
            "Redis calls of the limiter that failed.",
            registry=registry,
        )
        self.breaker_open = Gauge(
            "gateway_redis_breaker_open",
            "1 while the Redis breaker is open or half-open (limits decided without Redis).",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.config_generation = Gauge(
            "gateway_config_generation",
            "The config generation each worker serves (1 at start, +1 per applied reload).",
            registry=registry,
            multiprocess_mode="liveall",
        )
        self.reload_failures = Counter(
            "gateway_config_reload_failures",
            "Config reloads refused (the previous config kept serving).",
            registry=registry,
        )
        self.jobs_submitted = Counter(
            "gateway_jobs_submitted",
            "Jobs accepted (a resubmission with the same Idempotency-Key not counted).",
            registry=registry,
        )
        self.jobs_finished = Counter(
            "gateway_jobs_finished",
            "Jobs that ended, by status (completed, failed, cancelled, expired), as stored by "
            "this process's workers.",
            ("status",),
            registry=registry,
        )
        self.jobs_running = Gauge(
            "gateway_jobs_running",
            "Jobs running now (their upstream request under way or waiting for capacity).",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.jobs_queued = Gauge(
            "gateway_jobs_queued",
            "Jobs waiting in the queue, as the store counts them (shared by replicas with Redis).",
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.config_generation.set(1)
        # The limiter's and reloader's counters as last seen, to add only what is new.
        self._seen_redis_errors = 0
        self._seen_reload_failures = 0
        self._known_models: Callable[[], frozenset[str]] = frozenset
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._seen_ejections: dict[tuple[str, str], int] = {}

    def watch_models(self, known: Callable[[], frozenset[str]]) -> None:
        """Where the current config's listed model names come from (label values)."""
        self._known_models = known

    # -- per request ------------------------------------------------------------------------

    def __call__(self, context: RequestContext) -> None:
        if context.own:
            return  # probes and scrapes are not API traffic
        route = context.route or NONE
        upstream = context.upstream or NONE
        key = context.key or NONE
        child = self._child
        child(self.requests, (route, upstream, key, context.status_class)).inc()
        elapsed = context.elapsed
        child(self.duration, (route,)).observe(elapsed)
        upstream_time = context.upstream_total_seconds
        child(self.overhead, (route,)).observe(
            elapsed if upstream_time is None else max(0.0, elapsed - upstream_time)
        )
        if context.upstream_seconds is not None:
            child(self.upstream_ttfb, (upstream,)).observe(context.upstream_seconds)
        if context.upstream_error is not None:
            child(self.upstream_errors, (upstream, context.upstream_error)).inc()
        tries = context.tries
        if tries:
            for attempt in tries:
                child(self.attempts, (attempt.upstream, attempt.target, attempt.outcome)).inc()
            for attempt in tries[:-1]:
                child(self.retries, (attempt.upstream, attempt.outcome)).inc()
        if context.limit is not None:
            if context.limit_reason is not None:
                child(self.refusals, (context.limit_reason,)).inc()
            elif context.limit == "degraded":
                self.degraded.inc()
            if context.queue_wait_ms is not None:
                child(self.queue_wait, (route,)).observe(context.queue_wait_ms / 1000)
        if context.model is not None:
            model = context.model if context.model in self._known_models() else OTHER
            operation = operation_of(context.path)
            if context.upstream_seconds is not None:
                child(self.operation, (operation, model)).observe(elapsed)
            if context.event_stream and context.first_chunk_seconds is not None:
                child(self.ttft, (operation, model)).observe(context.first_chunk_seconds)
            if context.tokens_in is not None:
                child(self.tokens, ("input", model, key)).observe(context.tokens_in)
            if context.tokens_out is not None:
                child(self.tokens, ("output", model, key)).observe(context.tokens_out)
        if context.cost_micro_usd:
            model = context.model if context.model in self._known_models() else OTHER
            child(self.spend, (key, model)).inc(context.cost_micro_usd / 1_000_000)

    def _child(self, metric: Any, labels: tuple[str, ...]) -> Any:
        """``metric.labels(*labels)``, remembered: prometheus_client validates and locks on
        every ``labels()`` call (~3 us each, measured), which would double the metrics' cost.
        The cache holds one entry per label set, and label values are configured names."""
        found = self._children.get((id(metric), labels))
        if found is None:
            found = self._children[(id(metric), labels)] = metric.labels(*labels)
        return found

    # -- state kept elsewhere ---------------------------------------------------------------

    def stream_opened(self) -> None:
        self.open_streams.inc()

    def stream_closed(self) -> None:
        self.open_streams.dec()

    def target_state(self, targets: Iterable[TargetHealth]) -> None:
        """Each target's health as this process sees it (read at scrape time)."""
        for health in targets:
            labels = (health.upstream, health.target)
            self._child(self.target_in_service, labels).set(1 if health.in_service() else 0)
            seen = self._seen_ejections.get(labels, 0)
            if health.ejected_total < seen:
                seen = 0  # a new target under this name (its URL changed on a reload)
            if health.ejected_total > seen:
                self._child(self.ejections, labels).inc(health.ejected_total - seen)
                self._seen_ejections[labels] = health.ejected_total

    def limiter_state(self, stats: LimiterStats) -> None:
        """Bring the Redis counters and the breaker gauge up to ``stats``."""
        new = stats.redis_errors - self._seen_redis_errors
        if new > 0:
            self.redis_errors.inc(new)
            self._seen_redis_errors = stats.redis_errors
        self.breaker_open.set(0 if stats.breaker == "closed" else 1)

    def reload_state(self, status: ReloadStatus) -> None:
        self.config_generation.set(status.generation)
        new = status.failures - self._seen_reload_failures
        if new > 0:
            self.reload_failures.inc(new)
            self._seen_reload_failures = status.failures

    def job_finished(self, status: str) -> None:
        self._child(self.jobs_finished, (status,)).inc()

    def jobs_state(self, running: int, queued: int | None) -> None:
        """The jobs running in this process, and the queue's depth (read at scrape time)."""
        self.jobs_running.set(running)
        if queued is not None:
            self.jobs_queued.set(queued)

    # -- exposition -------------------------------------------------------------------------

    def exposition(self) -> bytes:
        """The text format of every metric: this process's, or with several workers, the sum
        of every worker's files."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        return generate_latest(registry)


def multiprocess_directory() -> str | None:
    """The directory of multiprocess mode, when this process runs in it."""
    return os.environ.get(MULTIPROCESS_ENV) or None


def prepare_multiprocess_directory(existing: str | None = None) -> str:
    """Before any worker starts: a fresh directory for the workers' metric files. One named by
    ``PROMETHEUS_MULTIPROC_DIR`` is emptied (files left by an earlier run would be summed with
    this one's); otherwise a private temporary directory is made. Set the variable for the
    workers before they start: prometheus_client picks its mode when it is imported."""
    if existing:
        os.makedirs(existing, exist_ok=True)
        for name in os.listdir(existing):
            path = os.path.join(existing, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        return existing
    return tempfile.mkdtemp(prefix="gateway-metrics-")


def forget_workers(directory: str, pids: Iterable[int]) -> None:
    """Drop the live gauges of workers that exited (their counters stay in the totals)."""
    for pid in pids:
        mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]
