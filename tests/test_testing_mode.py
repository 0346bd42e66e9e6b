"""The testing mode (docs/testing.md): ``drain`` runs queued tasks here through the real
worker, ``immediate=True`` runs each task inside ``enqueue``, and the pytest plugin
``omniq.backend.file.testing`` gives each test a fresh memory backend."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

import testing_mode_tasks as tasks
from omniq.backend.file import AsyncFileBackend, FileBackend
from omniq.core.models import EventType, ResultStatus, TaskStatus

pytest_plugins = ["pytester"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _key() -> str:
    return uuid.uuid4().hex


def _kinds(backend: FileBackend, task_id: str) -> list[str]:
    assert backend.events is not None
    return [e.type.value for e in backend.events.query(task_id=task_id)]


# -- drain -------------------------------------------------------------------------------------
def test_drain_runs_every_ready_task_with_results_and_events(omniq_backend: FileBackend) -> None:
    ids = [omniq_backend.enqueue(tasks.add, (i, 1)) for i in range(3)]
    ids.append(omniq_backend.enqueue(tasks.async_mul, (6, 7), queue="other"))
    later = omniq_backend.enqueue(tasks.add, (0, 0), delay=3600)
    stats = omniq_backend.drain()
    assert (stats["claimed"], stats["succeeded"], stats["failed"]) == (4, 4, 0)
    values = []
    for task_id in ids:
        result = omniq_backend.result(task_id)
        assert result is not None and result.status is ResultStatus.SUCCESS
        values.append(result.value)
        assert _kinds(omniq_backend, task_id) == ["enqueued", "started", "succeeded"]
    assert values == [1, 2, 3, 42]
    # A delayed task is not due: it stays scheduled, untouched.
    assert omniq_backend.result(later) is None
    assert omniq_backend.get_task(later).status is TaskStatus.SCHEDULED
    assert omniq_backend.drain()["claimed"] == 0


def test_drain_of_named_queues_leaves_the_others(omniq_backend: FileBackend) -> None:
    mine = omniq_backend.enqueue(tasks.add, (1, 1), queue="mine")
    other = omniq_backend.enqueue(tasks.add, (2, 2), queue="other")
    assert omniq_backend.drain("mine")["succeeded"] == 1
    assert omniq_backend.result(mine) is not None
    assert omniq_backend.result(other) is None
    assert omniq_backend.get_task(other).status is TaskStatus.PENDING


def test_drain_runs_what_tasks_enqueue_even_into_new_queues(omniq_backend: FileBackend) -> None:
    base = omniq_backend.config.base_dir
    assert base is not None
    omniq_backend.enqueue(tasks.spawn, (base, "spawned", 3))
    stats = omniq_backend.drain()
    assert (stats["claimed"], stats["succeeded"]) == (4, 4)
    size = omniq_backend.queue.size("spawned")
    assert (size.ready, size.scheduled, size.running) == (0, 0, 0)


def test_drain_include_scheduled_runs_delays_and_retries_to_the_end(
    omniq_backend: FileBackend,
) -> None:
    key = _key()
    later = omniq_backend.enqueue(tasks.add, (2, 3), delay=3600, ttl=60)
    flaky = omniq_backend.enqueue(tasks.fail_until, (key, 3), max_retries=5, retry_backoff=30)
    dead = omniq_backend.enqueue(tasks.fail_until, (key + "x", 99), max_retries=1)
    stats = omniq_backend.drain(include_scheduled=True)
    assert stats["succeeded"] == 2 and stats["dead"] == 1 and stats["retried"] == 3, stats
    # The delayed task ran at its due time, not past its expiry (eta + ttl).
    result = omniq_backend.result(later)
    assert result is not None and result.value == 5
    result = omniq_backend.result(flaky)
    assert result is not None and (result.value, result.attempt) == (3, 3)
    assert _kinds(omniq_backend, flaky) == [
        "enqueued",
        *["started", "retried"] * 2,
        "started",
        "succeeded",
    ]
    result = omniq_backend.result(dead)
    assert result is not None and result.status is ResultStatus.FAILURE
    assert result.error is not None and "call 2 fails" in result.error.message
    assert _kinds(omniq_backend, dead)[-2:] == ["failed", "dead_lettered"]
    size = omniq_backend.queue.size("default")
    assert (size.ready, size.scheduled, size.running, size.dead) == (0, 0, 0, 1)


def test_drain_include_scheduled_keeps_the_backends_clock(omniq_backend: FileBackend) -> None:
    omniq_backend.enqueue(tasks.add, (1, 1), delay=600)
    assert omniq_backend.drain(include_scheduled=True)["succeeded"] == 1
    # Only the drain's own queue ran ahead: a new delayed task is not due for the backend.
    later = omniq_backend.enqueue(tasks.add, (1, 2), delay=600)
    assert omniq_backend.drain()["claimed"] == 0
    assert omniq_backend.get_task(later).status is TaskStatus.SCHEDULED


def test_drain_on_every_store(storage: Any) -> None:
    # include_scheduled drives a second queue on the same storage (with its clock ahead):
    # each store's claim strategy must accept it, and the results land where production's do.
    key = _key()
    with FileBackend(storage.base_dir, storage.storage_options, events=True) as backend:
        ready = backend.enqueue(tasks.add, (1, 2))
        flaky = backend.enqueue(tasks.fail_until, (key, 2), max_retries=3, retry_backoff=30)
        later = backend.enqueue(tasks.async_mul, (2, 8), delay=3600)
        stats = backend.drain(include_scheduled=True)
        assert (stats["succeeded"], stats["retried"], stats["dead"]) == (3, 1, 0), stats
        values = [getattr(backend.result(t), "value", None) for t in (ready, flaky, later)]
        assert values == [3, 2, 16]
        assert _kinds(backend, flaky)[-2:] == ["started", "succeeded"]
        size = backend.queue.size("default")
        assert (size.ready, size.scheduled, size.running) == (0, 0, 0)


@pytest.mark.anyio
async def test_async_drain(async_omniq_backend: AsyncFileBackend) -> None:
    task_id = await async_omniq_backend.enqueue(tasks.async_mul, (3, 4), delay=60)
    assert (await async_omniq_backend.drain())["claimed"] == 0
    stats = await async_omniq_backend.drain(["default"], include_scheduled=True)
    assert stats["succeeded"] == 1
    result = await async_omniq_backend.result(task_id)
    assert result is not None and result.value == 12
    assert async_omniq_backend.events is not None
    kinds = [e.type for e in await async_omniq_backend.events.query(task_id=task_id)]
    assert kinds == [EventType.ENQUEUED, EventType.STARTED, EventType.SUCCEEDED]


def test_drain_of_an_empty_backend(omniq_backend: FileBackend) -> None:
    stats = omniq_backend.drain(include_scheduled=True)
    assert stats["claimed"] == 0 and "succeeded" in stats


# -- immediate ---------------------------------------------------------------------------------
@pytest.mark.omniq(immediate=True)
def test_immediate_runs_the_task_inside_enqueue(omniq_backend: FileBackend) -> None:
    assert omniq_backend.config.immediate
    task_id = omniq_backend.enqueue(tasks.add, (20, 22))
    result = omniq_backend.result(task_id)  # no worker, no wait
    assert result is not None and result.value == 42
    assert _kinds(omniq_backend, task_id) == ["enqueued", "started", "succeeded"]
    # Delays are ignored, like Celery's task_always_eager (see docs/testing.md).
    later = omniq_backend.enqueue(tasks.add, (1, 1), delay=3600)
    result = omniq_backend.result(later)
    assert result is not None and result.value == 2


@pytest.mark.omniq(immediate=True)
def test_immediate_retries_inline_and_records_the_failure(omniq_backend: FileBackend) -> None:
    key = _key()
    task_id = omniq_backend.enqueue(tasks.fail_until, (key, 10), max_retries=2, retry_backoff=60)
    assert tasks.CALLS[key] == 3  # the first run and both retries, before enqueue returned
    result = omniq_backend.result(task_id)
    assert result is not None and result.status is ResultStatus.FAILURE
    assert result.attempt == 3 and result.error is not None
    assert result.error.type == "builtins.RuntimeError" and "call 3 fails" in result.error.message
    assert omniq_backend.get_task(task_id).status is TaskStatus.DEAD
    assert _kinds(omniq_backend, task_id)[-2:] == ["failed", "dead_lettered"]


@pytest.mark.omniq(immediate=True)
def test_immediate_through_the_task_decorator(omniq_backend: FileBackend) -> None:
    add = omniq_backend.task(tasks.add)
    result = omniq_backend.result(add.enqueue(2, 2))
    assert result is not None and result.value == 4


@pytest.mark.omniq(immediate=True)
@pytest.mark.anyio
async def test_async_immediate(async_omniq_backend: AsyncFileBackend) -> None:
    task_id = await async_omniq_backend.enqueue(tasks.async_mul, (5, 5))
    result = await async_omniq_backend.result(task_id)
    assert result is not None and result.value == 25


def test_immediate_from_the_environment() -> None:
    base = f"memory://immediate-env/{_key()}"
    with FileBackend.from_env({"OMNIQ_BASE_DIR": base, "OMNIQ_IMMEDIATE": "1"}) as backend:
        result = backend.result(backend.enqueue(tasks.add, (1, 2)))
        assert result is not None and result.value == 3
    with FileBackend(base) as backend:  # off by default
        assert backend.result(backend.enqueue(tasks.add, (1, 2))) is None


def test_immediate_runs_a_task_that_enqueues_a_delayed_task_once() -> None:
    """The nested enqueue's drain moves its own clock an hour ahead: its reaper took the
    running parent's lease for expired and ran the parent again (review of issue 15; failed
    before the clock-ahead queue stopped reaping)."""
    base, key = f"memory://immediate-nested/{_key()}", _key()
    with FileBackend(base, environ={}, immediate=True) as backend:
        task_id = backend.enqueue(tasks.parent_enqueues_a_delayed_child, (base, key))
        result = backend.result(task_id)
    assert result is not None and result.value == "ok"
    assert tasks.CALLS[key] == 1, f"the parent ran {tasks.CALLS[key]} times"


@pytest.mark.anyio
async def test_drain_include_scheduled_leaves_a_live_lease_alone() -> None:
    """A task claimed a moment ago by another holder (lease 30 s) is neither taken over nor
    run by a drain whose clock runs ahead (it failed before: attempt 2 ran)."""
    async with AsyncFileBackend(f"memory://drain-live/{_key()}", environ={}, lease=30) as backend:
        held = await backend.enqueue(tasks.add, (1, 2))
        claimed = await backend.queue.dequeue("default")  # a live worker's claim
        assert claimed is not None and claimed.id == held
        later = await backend.enqueue(tasks.add, (3, 4), delay=3600)
        await backend.drain(include_scheduled=True)
        info = await backend.get_task(held)
        assert info.status is TaskStatus.RUNNING and info.attempt == 1, info
        assert (await backend.get_task(later)).status is TaskStatus.DONE


# -- the pytest plugin -------------------------------------------------------------------------
INNER_TESTS = """
import fsspec
import pytest

SEEN = []


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


def double(x):
    return 2 * x


def test_first(omniq_backend):
    SEEN.append(omniq_backend.config.base_dir)
    task_id = omniq_backend.enqueue(double, (21,))
    assert omniq_backend.drain()["succeeded"] == 1
    assert omniq_backend.result(task_id).value == 42


def test_second_is_fresh_and_the_first_was_removed(omniq_backend):
    assert omniq_backend.config.base_dir not in SEEN
    assert omniq_backend.queue.list_queues() == []
    assert omniq_backend.events is not None
    first = SEEN[0].removeprefix("memory://")
    assert not fsspec.filesystem("memory").exists(first)


@pytest.mark.omniq(immediate=True, events=False)
def test_marker_settings(omniq_backend):
    assert omniq_backend.events is None
    assert omniq_backend.result(omniq_backend.enqueue(double, (4,))).value == 8


@pytest.mark.anyio
async def test_async_fixture(async_omniq_backend):
    task_id = await async_omniq_backend.enqueue(double, (5,))
    await async_omniq_backend.drain()
    assert (await async_omniq_backend.result(task_id)).value == 10
"""


def test_plugin_fixtures_in_a_users_test_run(pytester: pytest.Pytester) -> None:
    # A subprocess: the plugin comes from the installed entry point (pytest11), not from us.
    pytester.makepyfile(test_inner=INNER_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=5)  # the async test once on asyncio, once on trio


def test_plugin_is_the_pytest11_entry_point(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_inner=INNER_TESTS)
    result = pytester.runpytest_inprocess("-p", "no:omniq", "-k", "test_first")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'omniq_backend' not found*"])
