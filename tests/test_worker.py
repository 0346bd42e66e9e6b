"""AsyncWorker / Worker: concurrency, timeouts, retries, dead letters, where functions run,
graceful shutdown, a worker killed with SIGKILL, cancellation, events and logging.

Task functions live in ``worker_tasks`` (the worker imports ``"worker_tasks:name"``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import anyio
import pytest

import worker_tasks
from omniq.backend.file import AsyncFileBackend, FileBackend
from omniq.core.models import EventType, ResultStatus, TaskStatus

TESTS_DIR = Path(__file__).resolve().parent
MEMORY = pytest.mark.parametrize("storage", ["memory"], indirect=True)
QUICK = pytest.mark.parametrize("storage", ["memory", "local"], indirect=True)
BURST = {"burst": True, "idle_timeout": 0.3, "poll": 0.1}
IMPORT_ERROR = "omniq.backend.file._functions.FunctionImportError"
NOT_ALLOWED = "omniq.backend.file._functions.FunctionNotAllowedError"


@pytest.fixture
def anyio_backend():
    return "asyncio"


def make(storage, **settings) -> AsyncFileBackend:
    return AsyncFileBackend(storage.base_dir, storage.storage_options, environ={}, **settings)


async def wait_until(predicate, timeout: float = 10.0, step: float = 0.01) -> None:
    """Poll ``predicate`` (sync or async) until true; fail after ``timeout`` seconds."""
    with anyio.fail_after(timeout):
        while True:
            value = predicate()
            if hasattr(value, "__await__"):
                value = await value
            if value:
                return
            await anyio.sleep(step)


async def types_of(backend, task_id) -> list[tuple[EventType, int | None]]:
    return [(e.type, e.attempt) for e in await backend.events.query(task_id)]


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    points = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = peak = 0
    for _, step in points:  # at equal times an end (-1) sorts before a start (+1)
        running += step
        peak = max(peak, running)
    return peak


class ClaimCounter:
    """Counts the claims a worker holds in the queue (dequeued, not yet acked/nacked/released),
    independently of the worker's own bookkeeping."""

    def __init__(self, queue) -> None:
        self.held = self.peak = self.total = 0
        real_dequeue_many = queue.dequeue_many

        async def dequeue_many(*args, **kwargs):  # the worker claims a batch per call
            claimed = await real_dequeue_many(*args, **kwargs)
            self.held += len(claimed)
            self.total += len(claimed)
            self.peak = max(self.peak, self.held)
            return claimed

        queue.dequeue_many = dequeue_many
        for name in ("ack", "nack", "release"):
            setattr(queue, name, self._finishing(getattr(queue, name)))

    def _finishing(self, real):
        async def finish(*args, **kwargs):
            value = await real(*args, **kwargs)
            self.held -= 1
            return value

        return finish


# -- concurrency -------------------------------------------------------------------------------
@QUICK
@pytest.mark.parametrize(
    "func", [worker_tasks.record_async, worker_tasks.record_sync], ids=["async", "thread"]
)
@pytest.mark.anyio
async def test_concurrency_limit(storage, func):
    key = uuid.uuid4().hex
    async with make(storage) as backend:
        ids = [await backend.enqueue(func, (key, 0.2)) for _ in range(12)]
        claims = ClaimCounter(backend.queue)
        worker = backend.worker(concurrency=3, **BURST)
        stats = await worker.run()
        assert stats["succeeded"] == 12
        for task_id in ids:
            assert (await backend.result(task_id)).status is ResultStatus.SUCCESS
    intervals = worker_tasks.INTERVALS.pop(key)
    assert len(intervals) == 12
    assert max_overlap(intervals) == 3  # three at a time, never more
    assert worker.max_running == 3
    assert claims.total == 12 and claims.peak == 3 and claims.held == 0


# -- timeouts ----------------------------------------------------------------------------------
@MEMORY
@pytest.mark.parametrize(
    ("func", "seconds"),
    [(worker_tasks.async_sleep, 10.0), (worker_tasks.sync_sleep, 3.0)],
    ids=["async", "thread"],
)
@pytest.mark.anyio
async def test_timeout_is_enforced(storage, func, seconds):
    async with make(storage) as backend:
        task_id = await backend.enqueue(func, (seconds,), timeout=0.3)
        started = time.monotonic()
        stats = await backend.worker(**BURST).run()
        elapsed = time.monotonic() - started
        assert elapsed < seconds / 2  # the worker did not wait for the function
        result = await backend.result(task_id)
        assert result.status is ResultStatus.FAILURE
        assert result.error.type == "builtins.TimeoutError"
        assert "timeout of 0.3s" in result.error.message
        assert stats["failed"] == 1 and stats["dead"] == 1
        assert (await backend.get_task(task_id)).status is TaskStatus.DEAD


# -- retries and dead letters ------------------------------------------------------------------
@QUICK
@pytest.mark.anyio
async def test_retry_then_dead_letter(storage):
    async with make(storage, events=True) as backend:
        task_id = await backend.enqueue(
            worker_tasks.always_fail, ("boom",), max_retries=2, retry_backoff=0.01
        )
        stats = await backend.worker(concurrency=1, **BURST).run()
        assert await types_of(backend, task_id) == [
            (EventType.ENQUEUED, None),
            (EventType.STARTED, 1),
            (EventType.RETRIED, 1),
            (EventType.STARTED, 2),
            (EventType.RETRIED, 2),
            (EventType.STARTED, 3),
            (EventType.FAILED, 3),
            (EventType.DEAD_LETTERED, 3),
        ]
        assert (stats["claimed"], stats["failed"], stats["retried"], stats["dead"]) == (3, 3, 2, 1)

        dead = await backend.queue.list_dead()
        assert [info.task.id for info in dead] == [task_id]
        assert dead[0].error.type == "builtins.ValueError" and dead[0].error.message == "boom"
        result = await backend.result(task_id)
        assert result.status is ResultStatus.FAILURE and result.attempt == 3
        assert result.error.type == "builtins.ValueError" and result.error.message == "boom"
        assert "ValueError: boom" in result.error.traceback
        assert (await backend.get_task(task_id)).status is TaskStatus.DEAD


@QUICK
@pytest.mark.anyio
async def test_fail_once_then_succeed(storage, tmp_path):
    async with make(storage, events=True) as backend:
        task_id = await backend.enqueue(
            worker_tasks.fail_once, (str(tmp_path / "marker"),), max_retries=1, retry_backoff=0.01
        )
        stats = await backend.worker(concurrency=1, **BURST).run()
        result = await backend.result(task_id)
        assert result.status is ResultStatus.SUCCESS
        assert (result.value, result.attempt) == ("second time lucky", 2)
        assert await types_of(backend, task_id) == [
            (EventType.ENQUEUED, None),
            (EventType.STARTED, 1),
            (EventType.RETRIED, 1),
            (EventType.STARTED, 2),
            (EventType.SUCCEEDED, 2),
        ]
        assert (stats["succeeded"], stats["retried"], stats["dead"]) == (1, 1, 0)
        assert await backend.queue.list_dead() == []


@MEMORY
@pytest.mark.parametrize(
    ("path", "allow", "error_type", "message"),
    [
        ("omniq_no_such_module:func", None, IMPORT_ERROR, "cannot import omniq_no_such_module"),
        ("worker_tasks:does_not_exist", None, IMPORT_ERROR, "does_not_exist"),
        ("worker_tasks:NOT_CALLABLE", None, IMPORT_ERROR, "is a int, not a function"),
        (
            "worker_tasks:add",
            ["worker_tasks:shout", "worker_tasks_other"],
            NOT_ALLOWED,
            "worker_tasks:add is not in this worker's allow-list",
        ),
    ],
    ids=["no-module", "no-attribute", "not-callable", "not-allowed"],
)
@pytest.mark.anyio
async def test_bad_function_fails_at_once_without_retry(storage, path, allow, error_type, message):
    async with make(storage, events=True) as backend:
        task_id = await backend.enqueue(path, (1, 2), max_retries=3, retry_backoff=0.01)
        allowed = await backend.enqueue(worker_tasks.shout, ("ok",))
        stats = await backend.worker(allow=allow, **BURST).run()
        result = await backend.result(task_id)
        assert result.status is ResultStatus.FAILURE and result.attempt == 1
        assert result.error.type == error_type
        assert message in result.error.message
        assert await types_of(backend, task_id) == [
            (EventType.ENQUEUED, None),
            (EventType.STARTED, 1),
            (EventType.FAILED, 1),
            (EventType.DEAD_LETTERED, 1),
        ]
        assert [info.task.id for info in await backend.queue.list_dead()] == [task_id]
        assert (stats["retried"], stats["dead"], stats["succeeded"]) == (0, 1, 1)
        assert (await backend.result(allowed)).value == "OK!"


@MEMORY
@pytest.mark.anyio
async def test_allow_list_module_prefix(storage):
    async with make(storage) as backend:
        ok = await backend.enqueue(worker_tasks.add, (1, 2))
        await backend.worker(allow=["worker_tasks"], **BURST).run()
        assert (await backend.result(ok)).value == 3


# -- where functions run -----------------------------------------------------------------------
@MEMORY
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
@pytest.mark.anyio
async def test_async_on_the_loop_plain_in_a_thread(storage, anyio_backend):
    loop_thread = threading.get_ident()
    async with make(storage) as backend:
        on_loop = await backend.enqueue(worker_tasks.where_async)
        in_thread = await backend.enqueue(worker_tasks.where_sync)
        await backend.worker(**BURST).run()
        async_seen = (await backend.result(on_loop)).value
        sync_seen = (await backend.result(in_thread)).value
    assert async_seen["thread"] == loop_thread
    assert async_seen["library"] == anyio_backend  # it saw the running event loop
    assert sync_seen["thread"] != loop_thread
    assert sync_seen["library"] is None  # no event loop in the worker thread
    assert async_seen["pid"] == sync_seen["pid"] == os.getpid()


@MEMORY
@pytest.mark.anyio
async def test_processes_run_plain_functions_in_other_processes(storage):
    async with make(storage) as backend:
        cpu = [await backend.enqueue(worker_tasks.cpu_bound, (200_000,)) for _ in range(2)]
        coro = await backend.enqueue(worker_tasks.where_async)
        await backend.worker(concurrency=2, processes=2, **BURST).run()
        for task_id in cpu:
            result = await backend.result(task_id)
            assert result.status is ResultStatus.SUCCESS, result.error
            assert result.value["pid"] != os.getpid()
        # async functions still run on the event loop, in this process
        assert (await backend.result(coro)).value["pid"] == os.getpid()


# -- graceful shutdown -------------------------------------------------------------------------
@MEMORY
@pytest.mark.anyio
async def test_stop_lets_the_running_task_finish_and_takes_nothing_new(storage):
    async with make(storage) as backend:
        running = await backend.enqueue(worker_tasks.async_sleep, (1.0,), priority=5)
        waiting = await backend.enqueue(worker_tasks.add, (1, 2))
        # A long poll: the worker is still waiting for its only slot when the task ends.
        worker = backend.worker(concurrency=1, poll=5.0, grace=30.0)
        stats = {}
        async with anyio.create_task_group() as tg:

            async def run():
                stats.update(await worker.run())

            tg.start_soon(run)
            await wait_until(lambda: running in worker.running)
            worker.stop()
        result = await backend.result(running)
        assert result is not None and result.status is ResultStatus.SUCCESS
        assert (await backend.get_task(running)).status is TaskStatus.DONE
        assert (stats["claimed"], stats["succeeded"], stats["released"]) == (1, 1, 0)
        # stop() means no new task, even though a slot became free before the loop noticed
        assert (await backend.get_task(waiting)).status is TaskStatus.PENDING
        assert await backend.result(waiting) is None


@pytest.fixture
def storage_local_dir(tmp_path) -> str:
    return str(tmp_path / "store")


def test_sync_worker_stop_from_another_thread(storage_local_dir):
    with FileBackend(storage_local_dir) as backend:
        task_id = backend.enqueue(worker_tasks.sync_sleep, (0.5,))
        worker = backend.worker(poll=0.1)

        def stop_when_running():
            deadline = time.monotonic() + 10
            while not worker.async_api.running and time.monotonic() < deadline:
                time.sleep(0.01)
            worker.stop()

        stopper = threading.Thread(target=stop_when_running)
        stopper.start()
        stats = worker.run()  # blocks the main thread until stopped
        stopper.join()
        assert stats["succeeded"] == 1
        assert backend.result(task_id).value == "slept"


@MEMORY
@pytest.mark.anyio
async def test_short_grace_releases_the_task_to_another_worker(storage, tmp_path):
    marker = tmp_path / "first-run"
    # The default lease (60 s) and clock_skew (5 s): only a release lets worker 2 in now.
    async with make(storage, events=True) as backend:
        task_id = await backend.enqueue(worker_tasks.slow_first_run, (str(marker), 10.0))
        first = backend.worker(poll=0.1, grace=0.2)
        async with anyio.create_task_group() as tg:
            stats: dict = {}

            async def run():
                stats.update(await first.run())

            tg.start_soon(run)
            await wait_until(marker.exists)
            stopped_at = time.monotonic()
            first.stop()
        assert time.monotonic() - stopped_at < 5  # well before the task's 10 s
        assert (stats["released"], stats["succeeded"], stats["failed"]) == (1, 0, 0)
        info = await backend.get_task(task_id)
        assert (info.status, info.attempt) == (TaskStatus.PENDING, 2)
        assert await backend.result(task_id) is None

        second = backend.worker(**BURST)
        assert (await second.run())["succeeded"] == 1
        result = await backend.result(task_id)
        assert (result.value, result.attempt) == ("quick rerun", 2)
        assert result.worker_id == second.worker_id
        assert await types_of(backend, task_id) == [
            (EventType.ENQUEUED, None),
            (EventType.STARTED, 1),
            (EventType.STARTED, 2),
            (EventType.SUCCEEDED, 2),
        ]


@MEMORY
@pytest.mark.anyio
async def test_slow_claim_is_not_dropped_by_the_poll_timeout(storage):
    """A dequeue that takes longer than ``poll`` (a slow object store finishing the claim)
    must not be cancelled half-way: the task would be claimed by no one until its lease ran
    out (regression: it was run under the poll's ``move_on_after``)."""
    async with make(storage) as backend:
        ids = [await backend.enqueue(worker_tasks.add, (i, i)) for i in range(3)]
        real_dequeue_many = backend.queue.dequeue_many

        async def slow_dequeue_many(*args, **kwargs):
            claimed = await real_dequeue_many(*args, **kwargs)
            if claimed:
                await anyio.sleep(0.3)  # longer than poll (0.1)
            return claimed

        backend.queue.dequeue_many = slow_dequeue_many
        stats = await backend.worker(**BURST).run()
        assert stats["claimed"] == 3
        for i, task_id in enumerate(ids):
            assert (await backend.result(task_id)).value == 2 * i


# -- a worker killed with SIGKILL --------------------------------------------------------------
WORKER_SCRIPT = """
import sys
from omniq.backend.file import FileBackend

FileBackend(sys.argv[1], lease=1.0, clock_skew=0.2).worker(concurrency=3, poll=0.1).run()
"""


@pytest.mark.anyio
async def test_sigkilled_worker_tasks_are_completed_by_another(local_storage, tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    base = local_storage.base_dir
    async with AsyncFileBackend(base, lease=1.0, clock_skew=0.2, environ={}) as backend:
        names = [f"t{i}" for i in range(3)]
        ids = [
            await backend.enqueue(worker_tasks.sleep_first_run, (str(markers), name, 2.0))
            for name in names
        ]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(TESTS_DIR), *filter(None, [env.get("PYTHONPATH")])]
        )
        proc = subprocess.Popen([sys.executable, "-c", WORKER_SCRIPT, base], env=env)
        try:
            await wait_until(
                lambda: all((markers / n).exists() for n in names) or proc.poll() is not None,
                timeout=30,
            )
            assert proc.poll() is None, "the worker subprocess died on its own"
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL
        for task_id in ids:  # killed mid-task: claimed by a dead worker, nothing finished
            assert (await backend.get_task(task_id)).status is TaskStatus.RUNNING
            assert await backend.result(task_id) is None

        worker = backend.worker(concurrency=3, poll=0.1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            results = [await backend.result(task_id, wait=20) for task_id in ids]
            worker.stop()
        for name, result in zip(names, results, strict=True):
            assert result.status is ResultStatus.SUCCESS
            assert result.value == f"{name} rerun in {os.getpid()}"
            assert result.attempt == 2
            assert result.worker_id == worker.worker_id


# -- cancellation ------------------------------------------------------------------------------
@MEMORY
@pytest.mark.anyio
async def test_cancel_a_running_task(storage):
    # lease 0.6 s: the heartbeat (every lease/3) learns of the cancel within ~0.2 s
    async with make(storage, lease=0.6, events=True) as backend:
        task_id = await backend.enqueue(worker_tasks.async_sleep, (10.0,))
        worker = backend.worker(poll=0.1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            await wait_until(lambda: task_id in worker.running)
            assert (await backend.get_task(task_id)).status is TaskStatus.RUNNING
            cancelled_at = time.monotonic()
            assert await backend.cancel(task_id) is True
            await wait_until(lambda: worker.stats["cancelled"] == 1)
            assert time.monotonic() - cancelled_at < 5  # the 10 s sleep was interrupted
            assert not worker.running
            worker.stop()
        assert (await backend.get_task(task_id)).status is TaskStatus.CANCELLED
        assert await types_of(backend, task_id) == [
            (EventType.ENQUEUED, None),
            (EventType.STARTED, 1),
            (EventType.CANCELLED, 1),
        ]
        result = await backend.result(task_id, wait=5)  # waiters learn it was cancelled
        assert result is not None and result.status is ResultStatus.FAILURE
        assert result.error is not None and result.error.type.endswith("TaskCancelledError")
        assert (worker.stats["succeeded"], worker.stats["failed"]) == (0, 0)
        assert await backend.cancel(task_id) is False  # already finished


@MEMORY
@pytest.mark.anyio
async def test_cancel_a_pending_task(storage):
    async with make(storage, events=True) as backend:
        task_id = await backend.enqueue(worker_tasks.add, (1, 2))
        other = await backend.enqueue(worker_tasks.add, (3, 4))
        assert await backend.cancel(task_id) is True
        assert (await backend.get_task(task_id)).status is TaskStatus.CANCELLED
        stats = await backend.worker(**BURST).run()
        assert (stats["claimed"], stats["succeeded"]) == (1, 1)
        assert (await backend.result(other)).value == 7
        result = await backend.result(task_id)
        assert result is not None and result.status is ResultStatus.FAILURE
        assert result.error is not None and result.error.type.endswith("TaskCancelledError")
        assert (await backend.get_task(task_id)).status is TaskStatus.CANCELLED
        assert await types_of(backend, task_id) == [
            (EventType.ENQUEUED, None),
            (EventType.CANCELLED, 1),
        ]


@MEMORY
@pytest.mark.anyio
async def test_unstorable_return_value_is_a_failure_without_retry(storage):
    async with make(storage, events=True) as backend:
        task_id = await backend.enqueue(worker_tasks.returns_a_set, max_retries=3)
        stats = await backend.worker(**BURST).run()
        assert (stats["claimed"], stats["succeeded"], stats["dead"]) == (1, 0, 1)
        result = await backend.result(task_id)
        assert result is not None and result.status is ResultStatus.FAILURE
        assert result.error is not None and "SerializationError" in result.error.type
        assert "set" in result.error.message
        assert (await backend.get_task(task_id)).status is TaskStatus.DEAD


@MEMORY
@pytest.mark.anyio
async def test_burst_waits_for_a_retry_that_comes_due(storage, tmp_path):
    async with make(storage) as backend:
        task_id = await backend.enqueue(
            worker_tasks.fail_once, (str(tmp_path / "m"),), max_retries=1, retry_backoff=0.8
        )
        stats = await backend.worker(burst=True, idle_timeout=0.3, poll=0.1).run()
        assert (stats["retried"], stats["succeeded"]) == (1, 1)
        result = await backend.result(task_id)
        assert result is not None and result.value == "second time lucky"
        assert result.attempt == 2


@MEMORY
@pytest.mark.anyio
async def test_stop_before_run_is_honoured(storage):
    async with make(storage) as backend:
        await backend.enqueue(worker_tasks.add, (1, 2))
        worker = backend.worker(poll=0.1)
        worker.stop()
        with anyio.fail_after(5):
            stats = await worker.run()
        assert stats["claimed"] == 0


# -- events and logging ------------------------------------------------------------------------
@pytest.mark.anyio
async def test_events_off_writes_no_event_files(local_storage, tmp_path):
    events_dir = tmp_path / "events-elsewhere"
    async with make(local_storage, events_dir=str(events_dir)) as backend:
        assert backend.events is None
        ok = await backend.enqueue(worker_tasks.add, (1, 2))
        bad = await backend.enqueue(
            worker_tasks.always_fail, ("x",), max_retries=1, retry_backoff=0.01
        )
        stats = await backend.worker(**BURST).run()
        assert (stats["succeeded"], stats["retried"], stats["dead"]) == (1, 1, 1)
        assert (await backend.result(ok)).value == 3
        assert (await backend.result(bad)).status is ResultStatus.FAILURE
    base = Path(local_storage.base_dir)
    assert not (base / "events").exists()
    assert not events_dir.exists()
    assert not [p for p in base.rglob("*") if "event" in p.name]


@QUICK
@pytest.mark.anyio
async def test_events_on_record_every_state_change(storage, tmp_path):
    async with make(storage, events=True) as backend:
        ok = await backend.enqueue(
            worker_tasks.fail_once, (str(tmp_path / "m"),), max_retries=1, retry_backoff=0.01
        )
        bad = await backend.enqueue(
            worker_tasks.always_fail, ("x",), max_retries=1, retry_backoff=0.01
        )
        worker = backend.worker(concurrency=1, **BURST)
        await worker.run()
        everything = await backend.events.query()
        assert {e.task_id for e in everything} == {ok, bad}
        assert await types_of(backend, ok) == [
            (EventType.ENQUEUED, None),
            (EventType.STARTED, 1),
            (EventType.RETRIED, 1),
            (EventType.STARTED, 2),
            (EventType.SUCCEEDED, 2),
        ]
        assert await types_of(backend, bad) == [
            (EventType.ENQUEUED, None),
            (EventType.STARTED, 1),
            (EventType.RETRIED, 1),
            (EventType.STARTED, 2),
            (EventType.FAILED, 2),
            (EventType.DEAD_LETTERED, 2),
        ]
        for event in everything:
            if event.type is not EventType.ENQUEUED:
                assert event.worker_id == worker.worker_id
            if event.type in (EventType.RETRIED, EventType.FAILED, EventType.DEAD_LETTERED):
                assert event.error.type in ("builtins.RuntimeError", "builtins.ValueError")
        assert backend.events.failed_writes == 0


@MEMORY
@pytest.mark.anyio
async def test_a_success_logs_a_start_line_and_a_debug_line(storage, caplog):
    # The start line stays INFO (operators and the fault harness follow it); the success
    # line is DEBUG: two formatted lines per task cost a busy worker a fifth of its time.
    caplog.set_level(logging.DEBUG, logger="omniq")
    async with make(storage) as backend:
        ok = await backend.enqueue(worker_tasks.add, (1, 2))
        await backend.worker(**BURST).run()
        assert (await backend.result(ok)).value == 3
    mine = [r for r in caplog.records if ok in r.getMessage()]
    assert [r.levelno for r in mine] == [logging.INFO, logging.DEBUG]
    assert "worker_tasks:add started (attempt 1)" in mine[0].getMessage()
    assert "succeeded in " in mine[1].getMessage()
    assert all(r.name.startswith("omniq.") for r in mine)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    worker_lines = [r.getMessage() for r in caplog.records if r.name == "omniq.worker"]
    assert worker_lines[0].startswith("worker ") and " started on default" in worker_lines[0]
    assert worker_lines[-1].startswith("worker ") and " stopped: " in worker_lines[-1]


@MEMORY
@pytest.mark.anyio
async def test_failures_log_one_info_line_each(storage, caplog):
    caplog.set_level(logging.DEBUG, logger="omniq")
    async with make(storage) as backend:
        bad = await backend.enqueue(
            worker_tasks.always_fail, ("nope",), max_retries=1, retry_backoff=0.01
        )
        await backend.worker(concurrency=1, **BURST).run()
    lines = [(r.name, r.levelno, r.getMessage()) for r in caplog.records if bad in r.getMessage()]
    assert [level for _, level, _ in lines] == [logging.INFO, logging.INFO] * 2
    assert all(name.startswith("omniq.") for name, _, _ in lines)
    assert "started (attempt 1)" in lines[0][2]
    assert "ValueError: nope (will retry)" in lines[1][2]
    assert "started (attempt 2)" in lines[2][2]
    assert "ValueError: nope (dead-lettered)" in lines[3][2]


@pytest.mark.anyio
async def test_cleanup_sweeps_results_without_a_marker_only_when_due(tmp_path: Path) -> None:
    """A result whose batched expiry marker was lost (its writer was killed before the flush)
    is found only by a sweep; the worker sweeps every ``sweep_interval``, not at each clean-up
    and not at start-up."""
    from datetime import timedelta

    from omniq.core.models import TaskResult
    from omniq.storage.file.results import AsyncFileResultStorage

    base = tmp_path / "store"
    writer = AsyncFileResultStorage(base / "results", default_ttl=timedelta(seconds=0.05))
    await writer.set(TaskResult(task_id="T-lost", status=ResultStatus.SUCCESS, value=1))
    # The writer is abandoned without close(): its buffered marker is never written.
    stored = base / "results" / "results" / "T-lost.json"
    assert stored.exists()
    await anyio.sleep(0.1)
    async with AsyncFileBackend(str(base), environ={}) as backend:
        never = backend.worker(sweep_interval=None)
        await never.cleanup()
        assert stored.exists()
        daily = backend.worker()  # default: the first sweep is about a day away
        await daily.cleanup()
        assert stored.exists()
        due = backend.worker(sweep_interval=0)
        await due.cleanup()
        assert not stored.exists()


@pytest.mark.anyio
async def test_sweep_removes_only_stale_temporary_files(tmp_path: Path, caplog) -> None:
    """A process killed between writing a temporary file and renaming it leaves ``.tmp-*``
    behind. The worker's sweep removes those older than an hour, under the queue, results and
    events directories (and a results directory elsewhere), and keeps everything else."""
    from omniq.backend.file._worker import TEMP_FILE_AGE

    base, elsewhere = tmp_path / "store", tmp_path / "results-elsewhere"
    async with AsyncFileBackend(
        str(base), results_dir=str(elsewhere), events=True, environ={}
    ) as backend:
        task_id = await backend.enqueue(worker_tasks.add, (1, 2))
        await backend.worker(concurrency=1, **BURST).run()
        assert (await backend.result(task_id)).value == 3
        old = time.time() - TEMP_FILE_AGE - 60
        stale = [
            base / "queue" / "default" / "ready" / ".tmp-a",
            base / "events" / "events" / ".tmp-b",
            elsewhere / "results" / ".tmp-c",
        ]
        fresh = base / "queue" / "default" / ".tmp-d"
        old_data = base / "queue" / "old.json"  # not a temporary file, however old
        for path in [*stale, fresh, old_data]:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"half")
        for path in [*stale, old_data]:
            os.utime(path, (old, old))
        caplog.set_level(logging.WARNING, logger="omniq.worker")

        await backend.worker(sweep_interval=None).cleanup()
        assert all(p.exists() for p in stale)

        await backend.worker(sweep_interval=0).cleanup()
        assert [p for p in stale if p.exists()] == []
        assert fresh.exists() and old_data.exists()
        assert (await backend.result(task_id)).value == 3
        notes = [r.getMessage() for r in caplog.records if "temporary file" in r.getMessage()]
        assert sorted(int(n.split()[1]) for n in notes) == [1, 1, 1], notes


@pytest.mark.anyio
@pytest.mark.parametrize("schedules", [True, False])
async def test_a_worker_makes_its_store_clients_before_it_claims(remote_storage, schedules):
    """Making an object-store client costs the event loop up to seconds of CPU on a loaded
    machine (botocore loads its models): made at a fresh worker's first result write, it held
    the heartbeats back until the lease was taken over (tests/faults' S3 chaos, once in two
    runs). Every store the worker writes to has its client before the first claim."""
    async with make(remote_storage, events=True) as backend:
        await backend.enqueue("worker_tasks:add", [1, 2])
        stores = {
            "queue": backend.queue.store,
            "results": backend.results.store,
            "events": backend.events.store,
        }
        if schedules:
            stores["schedules"] = backend.schedules.store.store
        unopened: list[list[str]] = []
        real = backend.queue.dequeue_many

        async def dequeue_many(*args, **kwargs):
            loop = asyncio.get_running_loop()
            unopened.append([name for name, s in stores.items() if loop not in s._async_ops])
            return await real(*args, **kwargs)

        backend.queue.dequeue_many = dequeue_many  # type: ignore[method-assign]
        stats = await backend.worker(schedules=schedules, **BURST).run()
    assert stats["succeeded"] == 1
    assert unopened and unopened[0] == [], f"no client yet at the first claim: {unopened[0]}"
    if not schedules:  # a worker that fires no schedules leaves their store alone
        assert not backend.schedules.store.store._async_ops


@pytest.mark.anyio
@MEMORY
@pytest.mark.parametrize(
    ("func", "lease", "warned"),
    [("worker_tasks:block_the_loop", 0.9, True), ("worker_tasks:async_sleep", 30.0, False)],
)
async def test_heartbeats_held_back_by_a_blocked_loop_are_reported(
    storage, caplog, func, lease, warned
):
    """An async task that blocks the event loop holds the heartbeats back: over a third of
    a lease late, the worker warns (another worker takes the task over once a beat is a
    lease late). One that awaits does not."""
    async with make(storage, lease=lease) as backend:
        task_id = await backend.enqueue(func, [0.7])
        with caplog.at_level(logging.WARNING, "omniq.worker"):
            stats = await backend.worker(**BURST).run()
        assert stats["succeeded"] == 1, stats
        assert (await backend.result(task_id)).status is ResultStatus.SUCCESS
    late = [r.getMessage() for r in caplog.records if "heartbeats ran" in r.getMessage()]
    assert bool(late) is warned, late
    if warned:
        assert "event loop was blocked" in late[0] and "lease (0.9 s)" in late[0], late
