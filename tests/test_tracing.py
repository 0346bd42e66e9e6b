"""OpenTelemetry: enqueue opens a span and stores its context in the task's metadata; the
worker's run span is its child (same trace), current while the function runs; without the
package (or without an SDK) nothing is stored."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from omniq.backend.file import FileBackend
from omniq.backend.file._tracing import METADATA_KEY, TracingHooks

TESTS = Path(__file__).resolve().parent
_EXPORTER = InMemorySpanExporter()


def current_trace_id() -> str:
    """A task: the trace id of the span current while it runs."""
    return format(trace.get_current_span().get_span_context().trace_id, "032x")


@pytest.fixture
def spans():
    # The global provider can be set once per process: every test shares it, and its exporter.
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    if not getattr(provider, "_omniq_test_exporter", False):  # set by another test module?
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        provider._omniq_test_exporter = True  # type: ignore[attr-defined]
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


def _one(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, [s.name for s in spans]
    return found[0]


def test_enqueue_and_run_spans_are_linked_through_the_metadata(spans):
    with FileBackend("memory://tracing-linked") as backend:
        task_id = backend.enqueue("test_tracing:current_trace_id", queue="traced")
        stored = backend.get_task(task_id).task
        assert stored is not None
        traceparent = stored.metadata[METADATA_KEY]["traceparent"]
        stats = backend.worker("traced", burst=True, idle_timeout=0.1).run()
        result = backend.result(task_id, wait=10)
    assert stats["succeeded"] == 1
    finished = spans.get_finished_spans()
    enqueue = _one(finished, "enqueue test_tracing:current_trace_id")
    run = _one(finished, "run test_tracing:current_trace_id")
    assert enqueue.kind is SpanKind.PRODUCER and run.kind is SpanKind.CONSUMER
    assert run.context.trace_id == enqueue.context.trace_id
    assert run.parent is not None and run.parent.span_id == enqueue.context.span_id
    trace_id = format(enqueue.context.trace_id, "032x")
    assert traceparent.split("-")[1] == trace_id  # W3C: version-traceid-spanid-flags
    assert result is not None and result.value == trace_id  # current inside the function
    assert run.attributes is not None and enqueue.attributes is not None
    assert run.attributes["messaging.destination.name"] == "traced"
    assert run.attributes["messaging.message.id"] == task_id
    assert run.attributes["omniq.outcome"] == "done"
    assert enqueue.attributes["omniq.function"] == "test_tracing:current_trace_id"


def test_a_failed_run_span_has_an_error_status_and_the_exception(spans):
    with FileBackend("memory://tracing-failed") as backend:
        backend.enqueue("worker_tasks:always_fail", ["broken"], max_retries=0)
        backend.worker(burst=True, idle_timeout=0.1).run()
    run = _one(spans.get_finished_spans(), "run worker_tasks:always_fail")
    assert run.status.status_code is StatusCode.ERROR
    assert run.attributes is not None and run.attributes["omniq.outcome"] == "dead"
    assert any(e.name == "exception" for e in run.events)


def test_a_task_without_trace_context_gets_a_root_run_span(spans):
    with FileBackend("memory://tracing-root") as backend:
        task = backend.make_task("worker_tasks:add", [1, 2])
        backend.queue.enqueue(task)  # straight to the queue: no enqueue span, no metadata
        worker = backend.worker(burst=True, idle_timeout=0.1)
        (hooks,) = worker._async.hooks.hooks  # installed by default
        assert isinstance(hooks, TracingHooks)
        worker.run()
    run = _one(spans.get_finished_spans(), "run worker_tasks:add")
    assert run.parent is None
    assert not hooks._open  # every span it opened was ended


def _run(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=120
    )


def test_without_opentelemetry_nothing_is_traced_or_stored(tmp_path):
    proc = _run(
        f"""
        import sys
        sys.modules["opentelemetry"] = None  # any import of it fails
        sys.path.insert(0, {str(TESTS)!r})
        from omniq.backend.file import FileBackend, _tracing
        assert not _tracing.ENABLED and _tracing.worker_hooks() == ()
        with FileBackend({str(tmp_path / "q")!r}) as backend:
            task_id = backend.enqueue("worker_tasks:add", [1, 2])
            assert backend.get_task(task_id).task.metadata == {{}}
            worker = backend.worker(burst=True, idle_timeout=0.1)
            assert worker._async.hooks.hooks == [], worker._async.hooks.hooks
            assert worker.run()["succeeded"] == 1
        print("ok")
        """
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_with_the_api_but_no_sdk_the_metadata_stays_clean(tmp_path):
    proc = _run(
        f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        from omniq.backend.file import FileBackend, _tracing
        assert _tracing.ENABLED and not _tracing.recording()
        calls = []
        _tracing.TracingHooks.before_task = lambda self, ctx: calls.append(ctx.task_id)
        with FileBackend({str(tmp_path / "q")!r}) as backend:
            task_id = backend.enqueue("worker_tasks:add", [1, 2])
            assert backend.get_task(task_id).task.metadata == {{}}  # no span: no context
            worker = backend.worker(burst=True, idle_timeout=0.1)
            assert isinstance(worker._async.hooks.hooks[0], _tracing.TracingHooks)
            assert worker.run()["succeeded"] == 1
        assert calls == [], calls  # left out of the run: no SDK when it started
        print("ok")
        """
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_an_sdk_configured_after_the_worker_is_made_is_used_when_it_runs(tmp_path):
    proc = _run(
        f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        from omniq.backend.file import FileBackend
        with FileBackend({str(tmp_path / "q")!r}) as backend:
            backend.enqueue("worker_tasks:add", [1, 2])
            worker = backend.worker(burst=True, idle_timeout=0.1)
            exporter = InMemorySpanExporter()
            provider = TracerProvider()
            provider.add_span_processor(SimpleSpanProcessor(exporter))
            trace.set_tracer_provider(provider)
            assert worker.run()["succeeded"] == 1
        print([s.name for s in exporter.get_finished_spans()])
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['run worker_tasks:add']", proc.stdout
