"""Prometheus metrics of a worker and of the queues it sees (the ``[metrics]`` extra).

``WorkerMetrics(backend)`` is a worker hook (``before_task`` / ``after_task`` /
``on_failure``) counting tasks by queue and function, plus a collector that reports, at
scrape time, queue depth by state (refreshed at most every ``depth_interval`` seconds, so a
tight scrape loop does not list the queues each time), the lease take-overs of this process's
reaper and every storage request of this process by operation. ``serve(port)`` exposes them
over HTTP; ``exposition(backend)`` renders them for another server (the dashboard's
``/metrics``). Labels are queue and function names only: never a URL or a storage option.

Importing this module imports ``prometheus_client``; nothing else in OmniQ imports this module
unless metrics are asked for (``omniq worker --metrics-port``, ``backend.worker(metrics_port=)``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from omniq.core import fs
from omniq.core.context import TaskContext
from omniq.core.errors import ConfigurationError
from omniq.core.models import utcnow
from omniq.core.sync import shared_loop

log = logging.getLogger("omniq.metrics")

DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
DEPTH_INTERVAL = 5.0  # seconds a queue-depth reading is reused
REFRESH_TIMEOUT = 30.0  # seconds a scrape waits for a depth refresh before serving the last one
TASK_LABELS = ("queue", "function")


# -- storage requests: one process-wide count, fed by omniq.core.fs's request hook -----------
class _RequestCounts:
    """Ops and failed ops by op name, counted by ``fs.request_hook`` (a dict increment under
    a lock: the prometheus objects are only touched at scrape time)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[str, int] = {}
        self.errors: dict[str, int] = {}

    def __call__(self, op: str, error: BaseException | None) -> None:
        with self.lock:
            self.requests[op] = self.requests.get(op, 0) + 1
            if error is not None:
                self.errors[op] = self.errors.get(op, 0) + 1

    def snapshot(self) -> tuple[dict[str, int], dict[str, int]]:
        with self.lock:
            return dict(self.requests), dict(self.errors)


REQUESTS = _RequestCounts()


def count_storage_requests() -> None:
    """Start counting this process's storage requests (idempotent)."""
    if fs.request_hook is not REQUESTS:
        previous = fs.set_request_hook(REQUESTS)
        if previous is not None:
            log.warning("replaced another storage request hook (%r)", previous)


# -- queue depth, take-overs and storage requests, read at scrape time -----------------------
class QueueCollector(Collector):
    """Collects ``omniq_queue_depth``, ``omniq_lease_takeovers_total`` and the storage request
    counters for ``backend`` (an ``AsyncFileBackend`` or its ``FileBackend`` twin)."""

    def __init__(self, backend: Any, interval: float = DEPTH_INTERVAL) -> None:
        self.backend = getattr(backend, "async_api", backend)
        self.interval = interval
        self._lock = threading.Lock()
        self._depth: dict[str, dict[str, int]] = {}
        self._read_at: float | None = None

    def depth(self) -> dict[str, dict[str, int]]:
        """Queue sizes by queue and state; listed again only when the last reading is over
        ``interval`` seconds old (concurrent scrapes share one refresh)."""
        with self._lock:
            if self._read_at is None or time.monotonic() - self._read_at >= self.interval:
                try:
                    self._depth = self._refresh()
                except Exception as exc:  # a scrape still answers, with the last reading
                    log.warning("queue depth not refreshed: %s: %s", type(exc).__name__, exc)
                self._read_at = time.monotonic()
            return self._depth

    def _refresh(self) -> dict[str, dict[str, int]]:
        loop = shared_loop()
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:  # called on OmniQ's own loop thread: waiting would deadlock
            return self._depth
        future = asyncio.run_coroutine_threadsafe(self._sizes(), loop)
        return future.result(REFRESH_TIMEOUT)

    async def _sizes(self) -> dict[str, dict[str, int]]:
        queue = self.backend.queue
        depth = {}
        for name in await queue.list_queues():
            size = await queue.size(name)
            depth[name] = {
                "ready": size.ready,
                "scheduled": size.scheduled,
                "running": size.running,
                "dead": size.dead,
            }
        return depth

    def collect(self) -> Iterable[Metric]:
        gauge = GaugeMetricFamily(
            "omniq_queue_depth", "Tasks in each queue by state.", labels=["queue", "state"]
        )
        for name, states in sorted(self.depth().items()):
            for state, count in states.items():
                gauge.add_metric([name, state], count)
        yield gauge
        takeovers = CounterMetricFamily(
            "omniq_lease_takeovers",
            "Expired leases this process's reaper took over (the attempt requeued).",
            labels=["queue"],
        )
        for name, count in sorted(getattr(self.backend.queue, "takeovers", {}).items()):
            takeovers.add_metric([name], count)
        yield takeovers
        requests, errors = REQUESTS.snapshot()
        for metric, help_text, counts in (
            (
                "omniq_storage_requests",
                "Storage operations by operation (not HTTP requests: a listing of any "
                "length counts one).",
                requests,
            ),
            ("omniq_storage_errors", "Storage operations that failed, by operation.", errors),
        ):
            family = CounterMetricFamily(metric, help_text, labels=["operation"])
            for op, count in sorted(counts.items()):
                family.add_metric([op], count)
            yield family


# -- the worker hook -----------------------------------------------------------------------
class WorkerMetrics:
    """A worker hook counting tasks, with its own registry that also collects the queues of
    ``backend``: ``backend.worker(hooks=[metrics])``, then ``metrics.serve(port)``."""

    def __init__(
        self,
        backend: Any,
        *,
        registry: CollectorRegistry | None = None,
        depth_interval: float = DEPTH_INTERVAL,
    ) -> None:
        self.registry = CollectorRegistry() if registry is None else registry
        count_storage_requests()

        def counter(name: str, text: str) -> Counter:
            return Counter(name, text, TASK_LABELS, registry=self.registry)

        self.claimed = counter("omniq_tasks_claimed", "Attempts this worker claimed.")
        self.succeeded = counter("omniq_tasks_succeeded", "Attempts that returned.")
        self.failed = counter(
            "omniq_tasks_failed", "Attempts that raised or timed out (then retried or dead)."
        )
        self.retried = counter("omniq_tasks_retried", "Failed attempts scheduled for a retry.")
        self.dead = counter("omniq_tasks_dead", "Failed attempts dead-lettered (no retry left).")
        self.cancelled = counter("omniq_tasks_cancelled", "Attempts stopped by a cancel.")
        self.released = counter(
            "omniq_tasks_released", "Attempts given back unfinished when the worker stopped."
        )
        self.lost = counter(
            "omniq_tasks_lost", "Attempts whose lease another worker took over (result dropped)."
        )
        self.duration = Histogram(
            "omniq_task_duration_seconds",
            "Run time of finished attempts, from claim to outcome.",
            TASK_LABELS,
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.collector = QueueCollector(backend, depth_interval)
        self.registry.register(self.collector)
        with _REGISTRIES_LOCK:
            _REGISTRIES[self.collector.backend] = self.registry
        self._server: Any = None

    def __repr__(self) -> str:
        return "WorkerMetrics()"

    def before_task(self, ctx: TaskContext) -> None:
        self.claimed.labels(ctx.queue, ctx.func).inc()

    def after_task(self, ctx: TaskContext, result: Any) -> None:
        self._finished(ctx)

    def on_failure(self, ctx: TaskContext, error: BaseException) -> None:
        self._finished(ctx)

    def _finished(self, ctx: TaskContext) -> None:
        labels = (ctx.queue, ctx.func)
        outcome = ctx.outcome
        if outcome == "done":
            self.succeeded.labels(*labels).inc()
        elif outcome in ("retried", "dead"):
            self.failed.labels(*labels).inc()
            (self.retried if outcome == "retried" else self.dead).labels(*labels).inc()
        elif outcome == "cancelled":
            self.cancelled.labels(*labels).inc()
        elif outcome == "released":
            self.released.labels(*labels).inc()
        else:  # None or "lost": the lease was taken over, nothing was recorded by this worker
            self.lost.labels(*labels).inc()
        elapsed = (utcnow() - ctx.started_at).total_seconds()
        self.duration.labels(*labels).observe(max(0.0, elapsed))

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` on ``host:port`` from a daemon thread (port 0: any free port);
        returns the port."""
        server, _thread = start_http_server(port, host, registry=self.registry)
        self._server = server
        return int(server.server_address[1])

    def close(self) -> None:
        """Stop the HTTP server of ``serve``."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


# -- for other servers (the dashboard) ------------------------------------------------------
_REGISTRIES: weakref.WeakKeyDictionary[Any, CollectorRegistry] = weakref.WeakKeyDictionary()
_REGISTRIES_LOCK = threading.Lock()


def registry_for(backend: Any) -> CollectorRegistry:
    """The registry of ``backend``: its worker's (with the task counters) when a
    ``WorkerMetrics`` of this process watches it, else one with the queue collector only."""
    key = getattr(backend, "async_api", backend)
    with _REGISTRIES_LOCK:  # two first scrapes at once must not make two registries
        registry = _REGISTRIES.get(key)
        if registry is None:
            count_storage_requests()
            registry = CollectorRegistry()
            registry.register(QueueCollector(key))
            _REGISTRIES[key] = registry
    return registry


def exposition(backend: Any) -> tuple[bytes, str]:
    """The metrics of ``backend`` in the Prometheus text format: ``(body, content type)``.
    Blocks for a queue-depth refresh at most every few seconds; from an async server, call it
    in a worker thread (``anyio.to_thread.run_sync``)."""
    return generate_latest(registry_for(backend)), CONTENT_TYPE_LATEST


def worker_hooks(backend: Any, port: int | None, host: str = "127.0.0.1") -> Sequence[Any]:
    """The hooks ``backend.worker(metrics_port=...)`` adds: a served ``WorkerMetrics``."""
    if port is None:
        return ()
    metrics = WorkerMetrics(backend)
    try:
        bound = metrics.serve(port, host)
    except OSError as exc:  # port taken, host not local: a setting to fix, not a storage error
        raise ConfigurationError(f"cannot serve metrics on {host}:{port}: {exc}") from None
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return (metrics,)
