"""The worker contract: the same ``AsyncWorker`` runs tasks on any backend built on the
abstract classes of ``omniq.core.interfaces``.

Each test runs twice through the very same ``AsyncWorker``: on the file backend (a
``memory://`` base dir) and on ``memory_backend.MemoryBackend``, a tiny in-memory backend
written only against the ABCs (no file storage, no fsspec). Both backends offer the producer
calls these tests use (``enqueue_task``, ``cancel``, ``result``); everything else goes
through the contract (``backend.queue``, ``backend.results``, ``backend.events``).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest

from memory_backend import MemoryBackend
from omniq.backend.file import AsyncFileBackend, AsyncWorker
from omniq.core.interfaces import AsyncQueue, WorkerBackend
from omniq.core.models import EventType, ResultStatus, Task, TaskStatus, utcnow

pytestmark = pytest.mark.anyio

TESTS_DIR = Path(__file__).resolve().parent
BURST: dict[str, Any] = {"burst": True, "idle_timeout": 0.3, "poll": 0.1}
CANCELLED = "omniq.core.errors.TaskCancelledError"
Make = Callable[..., Any]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["file", "memory"])
async def make(request: pytest.FixtureRequest) -> AsyncIterator[Make]:
    """``make(events=False, **settings)``: a fresh backend of the parametrized kind (closed
    at the end of the test)."""
    made: list[Any] = []

    def build(*, events: bool = False, result_ttl: float | None = None) -> Any:
        backend: Any
        if request.param == "file":
            base = f"memory://omniq-contract-{uuid.uuid4().hex}"
            backend = AsyncFileBackend(base, environ={}, events=events, result_ttl=result_ttl)
        else:
            backend = MemoryBackend(events=events, result_ttl=result_ttl)
        made.append(backend)
        return backend

    yield build
    for backend in made:
        await backend.__aexit__(None, None, None)


def worker(backend: WorkerBackend, **options: Any) -> AsyncWorker:
    """The same worker class for every backend: constructed directly, not by the backend."""
    return AsyncWorker(backend, concurrency=2, **{**BURST, **options})


async def run(backend: WorkerBackend, **options: Any) -> dict[str, int]:
    with anyio.fail_after(30):
        return await worker(backend, **options).run()


def task(func: str, *args: Any, **fields: Any) -> Task:
    return Task(func=f"worker_tasks:{func}", args=list(args), **fields)


# -- the tests ---------------------------------------------------------------------------------
async def test_a_task_succeeds_and_its_result_is_stored(make: Make) -> None:
    backend = make()
    task_id = await backend.enqueue_task(task("add", 2, 3))
    stats = await run(backend)
    result = await backend.results.get(task_id)
    assert result is not None and result.status is ResultStatus.SUCCESS
    assert (result.value, result.attempt, result.func) == (5, 1, "worker_tasks:add")
    assert (await backend.queue.get_task(task_id)).status is TaskStatus.DONE
    assert (stats["claimed"], stats["succeeded"], stats["failed"]) == (1, 1, 0)


async def test_a_failing_task_is_retried_then_dead_lettered(make: Make) -> None:
    backend = make()
    failing = task("always_fail", "boom", max_retries=2, retry_backoff=0.05, retry_jitter=False)
    task_id = await backend.enqueue_task(failing)
    stats = await run(backend)
    assert (stats["claimed"], stats["retried"], stats["dead"]) == (3, 2, 1)
    info = await backend.queue.get_task(task_id)
    assert info.status is TaskStatus.DEAD
    assert [i.task.id for i in await backend.queue.list_dead() if i.task] == [task_id]
    result = await backend.results.get(task_id)
    assert result is not None and result.status is ResultStatus.FAILURE
    assert result.attempt == 3  # the first try and two retries
    assert result.error is not None
    assert (result.error.type, result.error.message) == ("builtins.ValueError", "boom")


async def test_async_functions_run_on_the_loop_and_plain_ones_in_a_thread(make: Make) -> None:
    backend = make()
    on_loop = await backend.enqueue_task(task("where_async"))
    in_thread = await backend.enqueue_task(task("where_sync"))
    product = await backend.enqueue_task(task("async_mul", 6, 7))
    stats = await run(backend)
    assert stats["succeeded"] == 3
    here = threading.get_ident()  # the event loop's thread: the worker runs on this loop
    async_where = (await backend.results.get(on_loop)).value
    sync_where = (await backend.results.get(in_thread)).value
    assert async_where == {"thread": here, "library": "asyncio", "pid": os.getpid()}
    assert sync_where["thread"] != here and sync_where["library"] is None
    assert (await backend.results.get(product)).value == 42


async def test_a_cancelled_pending_task_never_runs(make: Make, tmp_path: Path) -> None:
    backend = make(events=True)
    marker = tmp_path / "ran"
    task_id = await backend.enqueue_task(task("fail_once", str(marker)))
    kept = await backend.enqueue_task(task("add", 1, 1))
    assert await backend.cancel(task_id)
    stats = await run(backend)
    assert not marker.exists()  # fail_once creates it on its first run
    assert (stats["claimed"], stats["succeeded"]) == (1, 1)
    assert (await backend.results.get(kept)).value == 2
    result = await backend.results.get(task_id)
    assert result is not None and result.status is ResultStatus.FAILURE
    assert result.error is not None and result.error.type == CANCELLED
    assert (await backend.queue.get_task(task_id)).status is TaskStatus.CANCELLED
    types = [e.type for e in await backend.events.query(task_id)]
    assert types == [EventType.ENQUEUED, EventType.CANCELLED]
    assert not await backend.cancel(kept)  # finished: nothing left to cancel


async def test_burst_mode_exits_once_the_queues_are_empty(make: Make) -> None:
    backend = make()
    started = anyio.current_time()
    assert await run(backend) == dict.fromkeys(
        ("claimed", "succeeded", "failed", "retried", "dead", "released", "lost", "cancelled"), 0
    )
    assert anyio.current_time() - started < 10
    ids = [await backend.enqueue_task(task("add", i, i)) for i in range(5)]
    stats = await run(backend)  # exits after the work, not before
    assert stats["succeeded"] == 5
    assert [(await backend.results.get(i)).value for i in ids] == [0, 2, 4, 6, 8]
    assert (await backend.queue.size()).total == 0


async def test_events_are_emitted_in_order(make: Make) -> None:
    backend = make(events=True)
    task_id = await backend.enqueue_task(task("add", 1, 2))
    w = worker(backend)
    with anyio.fail_after(30):
        await w.run()
    events = await backend.events.query(task_id)
    assert [(e.type, e.attempt) for e in events] == [
        (EventType.ENQUEUED, None),
        (EventType.STARTED, 1),
        (EventType.SUCCEEDED, 1),
    ]
    assert [e.worker_id for e in events[1:]] == [w.worker_id, w.worker_id]
    assert events[0].time <= events[1].time <= events[2].time
    assert events[2].duration is not None and events[2].duration >= 0


async def test_no_events_when_events_are_off(make: Make) -> None:
    backend = make(events=False)
    assert backend.events is None
    task_id = await backend.enqueue_task(task("add", 1, 2))
    assert (await run(backend))["succeeded"] == 1
    assert (await backend.results.get(task_id)).value == 3


async def test_a_delayed_task_runs_after_its_eta(make: Make) -> None:
    backend = make()
    eta = utcnow() + timedelta(seconds=1.0)
    task_id = await backend.enqueue_task(task("add", 20, 22, eta=eta))
    assert (await backend.queue.get_task(task_id)).status is TaskStatus.SCHEDULED
    stats = await run(backend)  # burst: waits for a task due within burst_horizon
    assert stats["succeeded"] == 1
    result = await backend.results.get(task_id)
    assert result is not None and result.value == 42
    assert result.started_at is not None and result.started_at >= eta


async def test_cleanup_drops_expired_results_through_the_contract(make: Make) -> None:
    """``cleanup()`` with a sweep due: each storage's ``maintain``, the queue's ``repair``
    (the ABC defaults on the memory backend), then ``cleanup_expired``."""
    backend = make(events=True, result_ttl=2.0)
    task_id = await backend.enqueue_task(task("add", 1, 2))
    w = worker(backend, sweep_interval=0)
    with anyio.fail_after(30):
        await w.run()
    result = await backend.results.get(task_id)
    assert result is not None and result.value == 3 and result.expires_at is not None
    await anyio.sleep((result.expires_at - utcnow()).total_seconds() + 0.2)
    assert await backend.results.get(task_id) is None  # expired: hidden at once
    await w.cleanup()
    assert await backend.results.cleanup_expired() == 0  # cleanup() deleted it already
    assert len(await backend.events.query(task_id)) == 3  # within event_retention


# -- the memory backend is a real second backend -----------------------------------------------
def test_the_memory_backend_uses_only_the_core_contract() -> None:
    """It imports nothing of OmniQ but ``omniq.core``'s contract and models (no fsspec, no
    file storage), and running a task through it loads no file storage or file backend."""
    tree = ast.parse((TESTS_DIR / "memory_backend.py").read_text())
    imported = {
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    omniq = {name for name in imported if name and name.startswith("omniq")}
    assert omniq == {
        "omniq.core.errors",
        "omniq.core.interfaces",
        "omniq.core.models",
        "omniq.core.names",
    }
    assert not {n for n in imported if n and n.split(".")[0] in ("fsspec", "anyio")}
    code = (
        "import asyncio, sys\n"
        "import memory_backend as m\n"
        "from omniq.core.models import Task\n"
        "async def main():\n"
        "    b = m.MemoryBackend()\n"
        "    t = await b.enqueue_task(Task(func='x:y'))\n"
        "    c = await b.queue.dequeue(worker_id='w')\n"
        "    await b.queue.ack(c)\n"
        "    assert (await b.queue.get_task(t)).status.value == 'done'\n"
        "asyncio.run(main())\n"
        "print([n for n in sys.modules if n.startswith(('omniq.storage', 'omniq.backend'))])\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), *sys.path])}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_memory_queue_keeps_the_abc_defaults() -> None:
    """The memory backend is minimal: ``repair`` and ``maintain`` are the ABC's defaults."""
    from memory_backend import MemoryEventStorage, MemoryQueue, MemoryResultStorage

    assert MemoryQueue.repair is AsyncQueue.repair
    assert MemoryQueue.maintain is AsyncQueue.maintain
    assert MemoryResultStorage.maintain.__qualname__ == "AsyncResultStorage.maintain"
    assert MemoryEventStorage.maintain.__qualname__ == "AsyncEventStorage.maintain"
