"""OpenTelemetry spans for enqueue and for each run of a task (the ``[tracing]`` extra).

When ``opentelemetry-api`` is importable, ``enqueue`` opens a PRODUCER span and stores its
context in the task's metadata (``metadata["otel"]``, the W3C ``traceparent`` written by the
configured propagator); the worker's ``TracingHooks`` opens a CONSUMER span per attempt, a
child of that context, current while the function runs (so spans the function opens nest
under it). Without the package, or without an SDK configured (the API's no-op provider),
nothing is recorded and nothing is stored: ``enqueue`` opens no span, and a worker that
starts then leaves its ``TracingHooks`` out (no-op spans and two hook calls per task cost a
no-op task 12-16 % of the worker's CPU on tmpfs).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from omniq.core.context import TaskContext
    from omniq.core.models import Task

try:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace

    ENABLED = True
except ImportError:  # the [tracing] extra is not installed: every function below is a no-op
    ENABLED = False

METADATA_KEY = "otel"
"""Key of the task metadata holding the propagated trace context (``traceparent``, ...)."""
TRACER_NAME = "omniq"


def recording() -> bool:
    """Whether spans are recorded: the API is installed and a tracer provider was set (an
    SDK, or ``OTEL_PYTHON_TRACER_PROVIDER``), not the API's default no-op proxy."""
    return ENABLED and not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def _attributes(task: Task | TaskContext, task_id: str) -> dict[str, Any]:
    return {
        "messaging.system": "omniq",
        "messaging.destination.name": task.queue,
        "messaging.message.id": task_id,
        "omniq.function": task.func,
    }


@contextlib.contextmanager
def enqueue_span(task: Task) -> Iterator[None]:
    """Around storing ``task``: a span, whose context is put in ``task.metadata`` first."""
    if not recording():
        yield
        return
    tracer = trace.get_tracer(TRACER_NAME)
    with tracer.start_as_current_span(
        f"enqueue {task.func}",
        kind=trace.SpanKind.PRODUCER,
        attributes=_attributes(task, task.id),
    ):
        carrier: dict[str, str] = {}
        propagate.inject(carrier)  # nothing when the span is not recorded (no SDK)
        if carrier:
            task.metadata[METADATA_KEY] = carrier
        yield


class TracingHooks:
    """Worker hooks: a span per attempt, child of the enqueue span found in the metadata,
    ended with the attempt's outcome (``omniq.outcome``; an error status when it failed)."""

    def __init__(self) -> None:
        self._open: weakref.WeakKeyDictionary[Any, tuple[Any, Any]] = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        return "TracingHooks()"

    @property
    def active(self) -> bool:
        """Read when a worker starts: without an SDK it leaves this hook out of that run."""
        return recording()

    def before_task(self, ctx: TaskContext) -> None:
        if not ENABLED:
            return
        carrier = ctx.metadata.get(METADATA_KEY)
        parent = propagate.extract(carrier) if isinstance(carrier, dict) else None
        span = trace.get_tracer(TRACER_NAME).start_span(
            f"run {ctx.func}",
            context=parent,
            kind=trace.SpanKind.CONSUMER,
            attributes={
                **_attributes(ctx, ctx.task_id),
                "omniq.attempt": ctx.attempt,
                "omniq.worker_id": ctx.worker_id,
            },
        )
        # Sync, so attached in the worker's own task: the function (inline or in a thread,
        # which copies the context) sees the span as current.
        token = otel_context.attach(trace.set_span_in_context(span))
        self._open[ctx] = (span, token)

    def after_task(self, ctx: TaskContext, result: Any) -> None:
        self._end(ctx, None)

    def on_failure(self, ctx: TaskContext, error: BaseException) -> None:
        self._end(ctx, error)

    def _end(self, ctx: TaskContext, error: BaseException | None) -> None:
        opened = self._open.pop(ctx, None)
        if opened is None:
            return
        span, token = opened
        span.set_attribute("omniq.outcome", ctx.outcome or "lost")
        if error is not None:
            span.record_exception(error)
            span.set_status(trace.Status(trace.StatusCode.ERROR, type(error).__name__))
        span.end()
        with contextlib.suppress(Exception):  # attached in another context: nothing to undo
            otel_context.detach(token)


def worker_hooks() -> tuple[Any, ...]:
    """The hooks ``backend.worker()`` adds by default: ``TracingHooks`` when OTel is there."""
    return (TracingHooks(),) if ENABLED else ()
