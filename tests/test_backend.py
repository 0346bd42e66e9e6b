"""AsyncFileBackend / FileBackend end to end: enqueue, a burst worker, results and events.

The end-to-end tests run on memory, local and the S3 emulator (``storage`` narrowed by
indirect parametrization); the async ones on asyncio and trio. Task functions live in
``worker_tasks`` (imported by the worker as ``"worker_tasks:name"``).
"""

from __future__ import annotations

import json
import traceback
import uuid
from pathlib import Path

import anyio
import fsspec
import pytest

import worker_tasks
from omniq.backend.file import (
    AsyncFileBackend,
    AsyncTaskFunction,
    BackendConfig,
    FileBackend,
    TaskFunction,
)
from omniq.core.errors import ConfigurationError, ResultTimeoutError
from omniq.core.models import EventType, ResultStatus, TaskStatus
from omniq.core.sync import run_sync

E2E = pytest.mark.parametrize(
    "storage", ["memory", "local", pytest.param("s3", marks=pytest.mark.emulator)], indirect=True
)
ASYNCIO_ONLY = pytest.mark.parametrize("anyio_backend", ["asyncio"])
#: A burst worker that notices an empty queue quickly.
BURST = {"burst": True, "idle_timeout": 0.3, "poll": 0.1}


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


def files_under(path: str | Path) -> list[str]:
    root = Path(path)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def check_events(events, *, attempts: int = 1) -> None:
    """enqueued -> started -> succeeded, in time order, with the attempt numbers."""
    assert [e.type for e in events] == [EventType.ENQUEUED, EventType.STARTED, EventType.SUCCEEDED]
    times = [e.time for e in events]
    assert times == sorted(times)
    assert events[1].attempt == attempts and events[2].attempt == attempts
    assert events[1].worker_id is not None
    assert events[1].worker_id == events[2].worker_id
    assert events[2].duration is not None and events[2].duration >= 0


# -- end to end --------------------------------------------------------------------------------
@E2E
@pytest.mark.anyio
async def test_end_to_end_async_api(storage, anyio_backend):
    async with AsyncFileBackend(storage.base_dir, storage.storage_options, events=True) as backend:
        plain = await backend.enqueue(worker_tasks.add, (2, 3))
        by_path = await backend.enqueue("worker_tasks:add", [40], {"b": 2})
        coro = await backend.enqueue(worker_tasks.async_mul, (6, 7))

        send = backend.task(worker_tasks.shout)
        assert isinstance(send, AsyncTaskFunction)
        assert send("direct") == "DIRECT!"  # still callable in place, no queue involved
        assert send.path == "worker_tasks:shout"
        decorated = await send.enqueue("hello")

        mail = backend.task(queue="mail", max_retries=1)(worker_tasks.async_shout)
        assert await mail("direct") == "DIRECT!"
        decorated_async = await mail.enqueue("async hello")
        assert (await backend.get_task(decorated_async)).task.queue == "mail"
        assert (await backend.get_task(decorated_async)).task.max_retries == 1

        # User kwargs named like enqueue options are the function's, not the backend's.
        user_kwargs = {"timeout": 7, "queue": "not-a-queue", "priority": 3}
        passthrough = await backend.enqueue(worker_tasks.echo_kwargs, kwargs=user_kwargs)
        passthrough_decorated = await backend.task(worker_tasks.echo_kwargs).enqueue(
            timeout=8, queue="nope", priority=-1
        )
        info = await backend.get_task(passthrough_decorated)
        assert info.status is TaskStatus.PENDING
        assert (info.task.queue, info.task.priority, info.task.timeout) == ("default", 0, None)

        assert await backend.result(plain) is None  # nothing ran yet
        stats = await backend.worker(["default", "mail"], concurrency=3, **BURST).run()
        assert stats["succeeded"] == 7 and stats["failed"] == 0

        expected = {
            plain: 5,
            by_path: 42,
            coro: 42,
            decorated: "HELLO!",
            decorated_async: "ASYNC HELLO!",
            passthrough: user_kwargs,
            passthrough_decorated: {"timeout": 8, "queue": "nope", "priority": -1},
        }
        for task_id, value in expected.items():
            result = await backend.result(task_id)
            assert result is not None, task_id
            assert result.status is ResultStatus.SUCCESS
            assert result.value == value
            assert result.attempt == 1
            assert (await backend.get_task(task_id)).status is TaskStatus.DONE
            check_events(await backend.events.query(task_id))
        assert (await backend.result(decorated_async)).queue == "mail"
        assert (await backend.result(coro)).func == "worker_tasks:async_mul"


@E2E
def test_end_to_end_sync_api(storage):
    with FileBackend(storage.base_dir, storage.storage_options, events=True) as backend:
        send = backend.task(queue="mail")(worker_tasks.shout)
        assert isinstance(send, TaskFunction)
        assert send("direct") == "DIRECT!"
        assert send.__wrapped__ is worker_tasks.shout
        decorated = send.enqueue("sync")
        later = send.enqueue_with(["with"], priority=5)
        plain = backend.enqueue(worker_tasks.add, (1, 2))
        coro = backend.enqueue(worker_tasks.async_mul, (3, 4))
        passthrough = backend.task(worker_tasks.echo_kwargs).enqueue(
            timeout=1, queue="q", priority=2
        )
        assert backend.get_task(later).task.priority == 5

        worker = backend.worker(["default", "mail"], concurrency=2, **BURST)
        stats = worker.run()
        assert stats["succeeded"] == 5
        assert worker.stats == stats

        expected = {
            decorated: "SYNC!",
            later: "WITH!",
            plain: 3,
            coro: 12,
            passthrough: {"timeout": 1, "queue": "q", "priority": 2},
        }
        for task_id, value in expected.items():
            result = backend.result(task_id, wait=5)
            assert result.status is ResultStatus.SUCCESS and result.value == value
            check_events(sync_events(backend, task_id))


def sync_events(backend: FileBackend, task_id: str):
    """The events of a task, read from blocking code (on OmniQ's loop thread)."""
    events = backend.async_api.events
    assert events is not None
    return run_sync(lambda: events.query(task_id), "events")


# -- results -----------------------------------------------------------------------------------
@ASYNCIO_ONLY
@pytest.mark.parametrize("storage", ["memory", "local"], indirect=True)
@pytest.mark.anyio
async def test_result_waits_until_done(storage, anyio_backend):
    async with AsyncFileBackend(storage.base_dir, storage.storage_options) as backend:
        task_id = await backend.enqueue(worker_tasks.async_sleep, (0.3,))
        assert await backend.result(task_id) is None
        worker = backend.worker(poll=0.1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            result = await backend.result(task_id, wait=10)
            worker.stop()
        assert result.status is ResultStatus.SUCCESS and result.value == "slept"
        assert worker.stats["succeeded"] == 1


@ASYNCIO_ONLY
@pytest.mark.parametrize("storage", ["memory"], indirect=True)
@pytest.mark.anyio
async def test_result_wait_times_out_when_nothing_runs(storage, anyio_backend):
    async with AsyncFileBackend(storage.base_dir, storage.storage_options) as backend:
        task_id = await backend.enqueue(worker_tasks.add, (1, 1))
        with pytest.raises(ResultTimeoutError, match=task_id):
            await backend.result(task_id, wait=0.2)
        assert (await backend.get_task(task_id)).status is TaskStatus.PENDING


def test_result_with_results_off_is_a_configuration_error():
    backend = FileBackend(f"memory://omniq-{uuid.uuid4().hex}", results=False)
    assert backend.async_api.results is None
    with pytest.raises(ConfigurationError, match="results"):
        backend.result("01ARZ3NDEKTSV4RRFFQ69G5FAV")


# -- configuration -----------------------------------------------------------------------------
def test_precedence_kwargs_over_config_over_env(tmp_path):
    environ = {
        "OMNIQ_BASE_DIR": str(tmp_path / "from-env"),
        "OMNIQ_LEASE": "11",
        "OMNIQ_MAX_RETRIES": "1",
        "OMNIQ_TIMEOUT": "3.5",
        "OMNIQ_CLOCK_SKEW": "2",
        "OMNIQ_EVENTS": "yes",
        "OMNIQ_SOMETHING_ELSE": "ignored: not every OMNIQ_ variable is a setting",
    }
    config = {"lease": 22, "max_retries": 2, "base_dir": str(tmp_path / "from-config")}
    backend = AsyncFileBackend(lease=33, config=config, environ=environ)
    cfg = backend.config
    assert (cfg.lease, cfg.max_retries, cfg.timeout, cfg.clock_skew, cfg.events) == (
        33,
        2,
        3.5,
        2,
        True,
    )
    assert cfg.base_dir == str(tmp_path / "from-config")
    # ... and the parts are built from the resolved values.
    assert backend.queue.lease == 33 and backend.queue.clock_skew == 2
    assert backend.events is not None
    assert backend.queue.store.root == str(tmp_path / "from-config" / "queue")
    task = backend.make_task(worker_tasks.add, (1, 2))
    assert (task.max_retries, task.timeout) == (2, 3.5)
    assert backend.make_task(worker_tasks.add, max_retries=0, timeout=1).max_retries == 0

    # Environment alone, through from_env (sync twin too).
    only_env = FileBackend.from_env(environ)
    assert (only_env.config.lease, only_env.config.max_retries) == (11, 1)
    assert only_env.config.base_dir == str(tmp_path / "from-env")
    # A None keyword argument means "not given": it does not hide the lower sources.
    assert AsyncFileBackend(None, lease=None, environ=environ).config.lease == 11
    # Defaults when no source says anything.
    default = AsyncFileBackend(tmp_path, environ={}).config
    assert (default.lease, default.max_retries, default.events, default.results) == (
        60.0,
        0,
        False,
        True,
    )


def test_storage_options_from_env_json(tmp_path):
    options = {"key": "AKIA-ENV", "secret": "env-secret", "client_kwargs": {"region": "x"}}
    environ = {"OMNIQ_BASE_DIR": str(tmp_path), "OMNIQ_STORAGE_OPTIONS": json.dumps(options)}
    backend = AsyncFileBackend(environ=environ)
    assert backend.config.storage_options == options
    assert backend.config.part("results").storage_options == options
    # An explicit (even empty) dict wins over the environment.
    assert AsyncFileBackend(
        storage_options={"anon": True}, environ=environ
    ).config.storage_options == {"anon": True}


@pytest.mark.emulator
def test_storage_options_from_env_reach_the_filesystem(s3_emulator):
    environ = {
        "OMNIQ_BASE_DIR": s3_emulator.url(uuid.uuid4().hex),
        "OMNIQ_STORAGE_OPTIONS": json.dumps(s3_emulator.storage_options),
    }
    with FileBackend.from_env(environ) as backend:
        task_id = backend.enqueue(worker_tasks.add, (1, 2))
        assert backend.get_task(task_id).status is TaskStatus.PENDING
        backend.worker(**BURST).run()
        assert backend.result(task_id).value == 3


@pytest.mark.parametrize("source", ["argument", "config"])
def test_unknown_setting_is_an_error(tmp_path, source):
    kwargs = {"leese": 5} if source == "argument" else {"config": {"leese": 5}}
    with pytest.raises(ConfigurationError, match="leese"):
        AsyncFileBackend(tmp_path, environ={}, **kwargs)
    with pytest.raises(ConfigurationError, match="leese"):
        FileBackend(tmp_path, environ={}, **kwargs)


@pytest.mark.parametrize("bad", ['{"secret": "hunter2-LEAK", ', '["hunter2-LEAK"]', "hunter2-LEAK"])
def test_invalid_json_error_does_not_echo_the_value(tmp_path, bad):
    environ = {"OMNIQ_BASE_DIR": str(tmp_path), "OMNIQ_STORAGE_OPTIONS": bad}
    with pytest.raises(ConfigurationError) as caught:
        AsyncFileBackend(environ=environ)
    assert "OMNIQ_STORAGE_OPTIONS" in str(caught.value)
    shown = "".join(traceback.format_exception(caught.value)) + repr(caught.value)
    assert "hunter2" not in shown
    assert caught.value.__cause__ is None


def test_invalid_values_are_configuration_errors(tmp_path):
    for environ in (
        {"OMNIQ_EVENTS": "maybe"},
        {"OMNIQ_LEASE": "soon"},
        {"OMNIQ_MAX_RETRIES": "2.5"},
    ):
        with pytest.raises(ConfigurationError, match=next(iter(environ))):
            AsyncFileBackend(tmp_path, environ=environ)
    with pytest.raises(ConfigurationError, match="base_dir"):
        AsyncFileBackend(environ={})  # nowhere to keep anything


@ASYNCIO_ONLY
@pytest.mark.anyio
async def test_parts_are_relocatable(tmp_path, anyio_backend):
    base = f"memory://omniq-{uuid.uuid4().hex}"
    queue_dir, events_dir = tmp_path / "elsewhere" / "queue", tmp_path / "events-here"
    try:
        async with AsyncFileBackend(
            base, {}, queue_dir=str(queue_dir), events=True, events_dir=events_dir.as_posix()
        ) as backend:
            task_id = await backend.enqueue(worker_tasks.add, (20, 22))
            await backend.worker(**BURST).run()
            assert (await backend.result(task_id)).value == 42
            assert [e.type for e in await backend.events.query(task_id)] == [
                EventType.ENQUEUED,
                EventType.STARTED,
                EventType.SUCCEEDED,
            ]
        assert any(name.startswith("default/run/") for name in files_under(queue_dir))
        assert files_under(events_dir)  # the events are on the local disk...
        memory = fsspec.filesystem("memory")
        kept = [p.split(base.split("://", 1)[1], 1)[1] for p in memory.find(base)]
        assert kept and all(p.startswith("/results/") for p in kept)  # ...not in base_dir
    finally:
        fsspec.filesystem("memory").rm(base, recursive=True)


def test_relocated_part_does_not_inherit_base_storage_options(tmp_path):
    backend = AsyncFileBackend(
        "memory://base",
        {"secret": "base-only"},
        queue_dir=str(tmp_path / "q"),
        results_dir="memory://r",
        results_options={"token": "results-only"},
    )
    assert backend.config.part("queue").storage_options == {}
    assert backend.config.part("results").storage_options == {"token": "results-only"}
    assert backend.config.part("events").storage_options == {"secret": "base-only"}
    # No base_dir at all: a part dir borrows the (only) storage_options there are.
    alone = AsyncFileBackend(
        None, {"anon": True}, queue_dir="memory://q", results_dir="memory://r", environ={}
    )
    assert alone.config.part("queue").storage_options == {"anon": True}


@ASYNCIO_ONLY
@pytest.mark.parametrize("storage", ["local"], indirect=True)
@pytest.mark.anyio
async def test_events_off_by_default(storage, anyio_backend):
    async with AsyncFileBackend(storage.base_dir, environ={}) as backend:
        assert backend.events is None
        assert "events=off" in repr(backend)
        task_id = await backend.enqueue(worker_tasks.add, (1, 1))
        await backend.worker(**BURST).run()
        assert (await backend.result(task_id)).value == 2
    assert sorted(p.name for p in Path(storage.base_dir).iterdir()) == ["queue", "results"]


def test_repr_shows_no_secrets():
    secrets = ["STORAGE-s3cr3t", "QUEUE-s3cr3t", "URL-s3cr3t", "EVENTS-s3cr3t"]
    backend = FileBackend(
        f"s3://AKIAUSER:{secrets[2]}@bucket/app",
        {"key": "AKIAUSER", "secret": secrets[0]},
        queue_dir="memory://elsewhere",
        queue_options={"password": secrets[1]},
        events=True,
        events_options={"token": secrets[3]},
    )
    inner = backend.async_api
    shown = [
        repr(backend),
        str(backend),
        repr(inner),
        repr(inner.config),
        str(inner.config),
        repr(inner.queue),
        repr(inner.results),
        repr(inner.events),
        repr(backend.worker()),
        repr(inner.worker()),
    ]
    shown += [repr(inner.config.part(name)) for name in ("queue", "results", "events")]
    for text in shown:
        for secret in secrets:
            assert secret not in text, text
    assert "bucket/app" in repr(inner) and "elsewhere" in repr(inner)
    assert isinstance(inner.config, BackendConfig)
    assert "lease=60.0" in repr(inner.config)  # still a useful repr


# -- batched events (event_flush_interval) ------------------------------------------------------
async def _event_files(events_dir: str, options: dict) -> list[str]:
    """Names of the files under ``events/by-time`` (a reader of its own, which writes nothing)."""
    from omniq.storage.file.events import AsyncFileEventStorage

    async with AsyncFileEventStorage(events_dir, options) as reader:
        store, names = reader.store, []
        for day in await store.listdirs("events/by-time"):
            for hour in await store.listdirs(f"events/by-time/{day}"):
                names += await store.listdir(f"events/by-time/{day}/{hour}")
        return names


async def _history(events_dir: str, options: dict, task_id: str) -> list[EventType]:
    from omniq.storage.file.events import AsyncFileEventStorage

    async with AsyncFileEventStorage(events_dir, options) as reader:
        return [e.type for e in await reader.query(task_id)]


@ASYNCIO_ONLY
@pytest.mark.anyio
async def test_batched_events_are_written_as_batches_by_close(storage, anyio_backend):
    """With ``event_flush_interval`` the producer's and the worker's events go through the
    background writer: batch files (no single-event files), every event there once the
    backend is closed, read back by another instance."""
    base, options = storage.base_dir, storage.storage_options
    async with AsyncFileBackend(base, options, events=True, event_flush_interval=0.05) as backend:
        ids = [await backend.enqueue(worker_tasks.add, (i, 1)) for i in range(3)]
        assert (await backend.worker(**BURST).run())["succeeded"] == 3
    events_dir = f"{base.rstrip('/')}/events"
    names = await _event_files(events_dir, options)
    assert names and all(name.endswith(".jsonl") for name in names), names
    for task_id in ids:
        assert await _history(events_dir, options, task_id) == [
            EventType.ENQUEUED,
            EventType.STARTED,
            EventType.SUCCEEDED,
        ]


@ASYNCIO_ONLY
@pytest.mark.parametrize("storage", ["memory", "local"], indirect=True)
@pytest.mark.anyio
async def test_batched_events_wait_for_their_interval(storage, anyio_backend):
    """An event waits in the writer until its interval passes (here: an hour, so never
    during the test) or ``flush``; with a short interval the writer writes it unasked."""
    base = storage.base_dir
    events_dir = f"{base.rstrip('/')}/events"
    async with AsyncFileBackend(base, events=True, event_flush_interval=3600) as backend:
        held = await backend.enqueue(worker_tasks.add, (1, 1))
        assert backend.events.pending == 1
        assert await _history(events_dir, {}, held) == []
        await backend.events.flush()
        assert await _history(events_dir, {}, held) == [EventType.ENQUEUED]
    async with AsyncFileBackend(base, events=True, event_flush_interval=0.01) as backend:
        soon = await backend.enqueue(worker_tasks.add, (2, 2))
        with anyio.fail_after(10):
            while await _history(events_dir, {}, soon) != [EventType.ENQUEUED]:
                await anyio.sleep(0.01)
        assert backend.events.pending == 0


@pytest.mark.parametrize("anyio_backend", ["trio"])
@pytest.mark.parametrize("storage", ["memory", "local"], indirect=True)
@pytest.mark.anyio
async def test_under_trio_events_are_written_at_once_whatever_the_interval(storage, anyio_backend):
    """trio has no background writer: each event is written before the call returns, as a
    single event (a batch of one would cost the same writes plus a thread hop)."""
    base = storage.base_dir
    events_dir = f"{base.rstrip('/')}/events"
    async with AsyncFileBackend(base, events=True, event_flush_interval=3600) as backend:
        task_id = await backend.enqueue(worker_tasks.add, (1, 1))
        assert backend.events.pending == 0
        assert await _history(events_dir, {}, task_id) == [EventType.ENQUEUED]
    (name,) = await _event_files(events_dir, {})
    assert name.endswith(".json")


def test_blocking_backend_writes_batched_events_at_close(tmp_path):
    with FileBackend(tmp_path, events=True, event_flush_interval=3600) as backend:
        task_id = backend.enqueue(worker_tasks.add, (1, 2))
        assert backend.worker(**BURST).run()["succeeded"] == 1
        assert backend.async_api.events.pending == 3  # enqueued, started, succeeded: held
    assert run_sync(lambda: _history(str(tmp_path / "events"), {}, task_id)) == [
        EventType.ENQUEUED,
        EventType.STARTED,
        EventType.SUCCEEDED,
    ]


def test_event_flush_interval_is_checked(tmp_path):
    for bad in (-1, float("nan"), float("inf"), True, [1], "soon"):
        with pytest.raises(ConfigurationError, match="event_flush_interval"):
            AsyncFileBackend(tmp_path, events=True, event_flush_interval=bad)
    with pytest.raises(ConfigurationError, match="event_flush_interval"):
        AsyncFileBackend(tmp_path, events=True, config={"event_flush_interval": {"s": 1}})
    with pytest.raises(ConfigurationError, match="OMNIQ_EVENT_FLUSH_INTERVAL"):
        AsyncFileBackend(tmp_path, environ={"OMNIQ_EVENT_FLUSH_INTERVAL": "soon"})
    backend = AsyncFileBackend(tmp_path, events=True, environ={"OMNIQ_EVENT_FLUSH_INTERVAL": "0.5"})
    assert backend.config.event_flush_interval == 0.5
    assert backend.events is not None and backend.events.flush_interval == 0.5
    assert list(tmp_path.iterdir()) == []  # nothing made by a refused or unused backend
