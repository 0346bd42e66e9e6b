"""Prometheus metrics: the worker hook's task counters, queue depth read at most every few
seconds, storage requests counted at the one place every op passes, a real worker scraped over
HTTP, and no prometheus import when metrics are off."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from omniq.backend.file import FileBackend
from omniq.backend.file._metrics import (
    REQUESTS,
    QueueCollector,
    WorkerMetrics,
    count_storage_requests,
    exposition,
)
from omniq.core import fs
from omniq.core.errors import ConfigurationError
from omniq.core.sync import run_sync

TESTS = Path(__file__).resolve().parent
OMNIQ = Path(sys.executable).parent / "omniq"
SECRET = "PLANTED-METRICS-SECRET-789"


def _samples(body: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def _value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_worker_hook_counts_each_outcome_by_queue_and_function():
    with FileBackend("memory://metrics-hook") as backend:
        metrics = WorkerMetrics(backend, registry=CollectorRegistry())
        for i in range(3):
            backend.enqueue("worker_tasks:add", [i, 1])
        backend.enqueue("worker_tasks:always_fail", ["x"], max_retries=0)
        backend.enqueue(
            "worker_tasks:always_fail", ["x"], queue="other", max_retries=1, retry_backoff=0.01
        )
        stats = backend.worker(
            ["default", "other"], hooks=[metrics], burst=True, idle_timeout=0.2
        ).run()
    get = metrics.registry.get_sample_value
    add = {"queue": "default", "function": "worker_tasks:add"}
    boom = {"queue": "default", "function": "worker_tasks:always_fail"}
    other = {"queue": "other", "function": "worker_tasks:always_fail"}
    assert get("omniq_tasks_claimed_total", add) == 3
    assert get("omniq_tasks_succeeded_total", add) == 3
    assert get("omniq_task_duration_seconds_count", add) == 3
    assert get("omniq_tasks_failed_total", boom) == 1 and get("omniq_tasks_dead_total", boom) == 1
    assert get("omniq_tasks_retried_total", boom) is None
    assert get("omniq_tasks_claimed_total", other) == 2  # the first attempt and its retry
    assert (
        get("omniq_tasks_retried_total", other) == 1 and get("omniq_tasks_dead_total", other) == 1
    )
    claimed = sum(get("omniq_tasks_claimed_total", labels) or 0 for labels in (add, boom, other))
    assert claimed == stats["claimed"]  # the same counts as worker.stats


def test_queue_depth_is_listed_at_most_once_per_interval():
    with FileBackend("memory://metrics-depth") as backend:
        backend.enqueue("worker_tasks:add", [1, 2])
        backend.enqueue("worker_tasks:add", [1, 2], queue="slow", delay=3600)
        fs.set_request_hook(REQUESTS)
        cached = QueueCollector(backend, interval=3600)
        assert cached.depth() == {
            "default": {"ready": 1, "scheduled": 0, "running": 0, "dead": 0},
            "slow": {"ready": 0, "scheduled": 1, "running": 0, "dead": 0},
        }
        before = REQUESTS.snapshot()[0]
        for _ in range(20):  # a tight scrape loop
            cached.depth()
        assert REQUESTS.snapshot()[0] == before  # no storage request at all
        backend.enqueue("worker_tasks:add", [1, 2])
        assert cached.depth()["default"]["ready"] == 1  # the reading is reused...
        fresh = QueueCollector(backend, interval=0)
        assert fresh.depth()["default"]["ready"] == 2  # ...until it is old enough
        assert REQUESTS.snapshot()[0] != before


def test_exposition_for_a_dashboard_has_depth_and_storage_requests():
    with FileBackend("memory://metrics-expo") as backend:
        # Counting starts with a worker's metrics or a dashboard's first scrape; started here,
        # the figure does not depend on which test of this process ran first.
        count_storage_requests()
        backend.enqueue("worker_tasks:add", [1, 2], queue="q1")
        body, content_type = exposition(backend)
    assert content_type.startswith("text/plain") and "version=" in content_type
    samples = _samples(body)
    assert _value(samples, "omniq_queue_depth", queue="q1", state="ready") == 1
    assert _value(samples, "omniq_storage_requests_total", operation="create") >= 1


def test_storage_errors_are_counted_by_operation():
    fs.set_request_hook(REQUESTS)
    store = fs.Store("memory://metrics-errors")

    def program():
        return (yield fs.take("a", "b", 0.0, "me"))  # a local-only op: memory has none

    before = REQUESTS.snapshot()[1].get("take", 0)
    with pytest.raises(AttributeError):
        run_sync(lambda: store.run(program()), "test")
    assert REQUESTS.snapshot()[1]["take"] == before + 1


def test_request_hook_is_off_by_default_and_removable():
    previous = fs.set_request_hook(None)
    try:
        assert fs.request_hook is None
        seen: list[tuple[str, bool]] = []
        fs.set_request_hook(lambda op, error: seen.append((op, error is None)))
        with FileBackend("memory://metrics-hook-off") as backend:
            backend.enqueue("worker_tasks:add", [1, 2])
        assert ("create", True) in seen and all(op != "now" for op, _ in seen)
    finally:
        fs.set_request_hook(previous)


def test_a_taken_metrics_port_is_a_clear_error():
    with FileBackend("memory://metrics-port") as backend:
        first = WorkerMetrics(backend, registry=CollectorRegistry())
        port = first.serve(0)
        try:
            with pytest.raises(ConfigurationError, match=f"127.0.0.1:{port}"):
                backend.worker(metrics_port=port)
        finally:
            first.close()


# -- a real worker, scraped over HTTP ------------------------------------------------------------
def _scrape(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        body = response.read()
    assert SECRET not in body.decode()
    return _samples(body)


def _wait(predicate, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_scrape_a_running_worker_and_see_the_counters_move(tmp_path):
    base = tmp_path / "q"
    log_path = tmp_path / "worker.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNIQ_")}
    # A local directory ignores storage options: the planted secret must not reach a label.
    env["OMNIQ_STORAGE_OPTIONS"] = json.dumps({"secret": SECRET})
    with FileBackend(str(base)) as backend:
        backend.enqueue("cli_tasks:add", [1, 2])
    with open(log_path, "w") as log:
        worker = subprocess.Popen(
            [str(OMNIQ), "worker", str(base), "--path", str(TESTS), "--metrics-port", "0"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,
        )
    try:
        line = _wait(
            lambda: next(
                (x for x in log_path.read_text().splitlines() if "metrics on http://" in x), None
            ),
            "the metrics address in the log",
        )
        url = line.split("metrics on ", 1)[1].strip()
        add = {"queue": "default", "function": "cli_tasks:add"}
        first = _wait(
            lambda: (
                (s := _scrape(url)) and _value(s, "omniq_tasks_succeeded_total", **add) == 1 and s
            ),
            "the first task",
        )
        assert _value(first, "omniq_tasks_claimed_total", **add) == 1
        requests = _value(first, "omniq_storage_requests_total", operation="create")
        assert requests >= 1
        with FileBackend(str(base)) as backend:
            for i in range(3):
                backend.enqueue("cli_tasks:add", [i, i])
            backend.enqueue("cli_tasks:boom", max_retries=0)
        later = _wait(
            lambda: (
                (s := _scrape(url))
                and _value(s, "omniq_tasks_succeeded_total", **add) == 4
                and _value(s, "omniq_tasks_dead_total", queue="default", function="cli_tasks:boom")
                == 1
                and s
            ),
            "the next four tasks",
        )
        assert _value(later, "omniq_storage_requests_total", operation="create") > requests
        assert _value(later, "omniq_task_duration_seconds_count", **add) == 4
        _wait(  # the depth gauge catches up within its refresh interval
            lambda: _value(_scrape(url), "omniq_queue_depth", queue="default", state="dead") == 1,
            "the dead task in the depth gauge",
        )
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
    assert worker.returncode == 0, log_path.read_text()
    assert SECRET not in log_path.read_text()


# -- metrics off ------------------------------------------------------------------------------------
def test_metrics_off_never_imports_prometheus(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["prometheus_client"] = None  # any import of it fails
        sys.path.insert(0, {str(TESTS)!r})
        from omniq.backend.file import FileBackend
        from omniq.core.errors import MissingDependencyError
        with FileBackend({str(tmp_path / "q")!r}) as backend:
            backend.enqueue("worker_tasks:add", [1, 2])
            stats = backend.worker(burst=True, idle_timeout=0.1).run()
            assert stats["succeeded"] == 1, stats
            try:
                backend.worker(metrics_port=0)
            except MissingDependencyError as exc:
                assert "omniq-backend-file[metrics]" in str(exc), exc
            else:
                raise AssertionError("metrics without prometheus-client")
        assert "omniq.backend.file._metrics" not in sys.modules
        from omniq.core import fs
        assert fs.request_hook is None
        print("ok")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_first_scrapes_at_once_share_one_registry(monkeypatch) -> None:
    """Two first scrapes of a backend in two threads (the dashboard serves /metrics from a
    thread pool) get the same registry: a slow registry constructor widens the race."""
    import threading

    from omniq.backend.file import _metrics

    class Slow(CollectorRegistry):
        def __init__(self) -> None:
            time.sleep(0.05)
            super().__init__()

    monkeypatch.setattr(_metrics, "CollectorRegistry", Slow)
    with FileBackend("memory://metrics-race") as backend:
        got: list[CollectorRegistry] = []
        threads = [
            threading.Thread(target=lambda: got.append(_metrics.registry_for(backend)))
            for _ in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(got) == 4 and all(r is got[0] for r in got)
