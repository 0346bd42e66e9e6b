"""AsyncFileEventStorage and FileEventStorage on memory, local, S3, Azure and GCS.

Async tests run on asyncio and trio (the ``anyio_backend`` fixture below).
"""

from __future__ import annotations

import json
import logging
import os
import random
from datetime import datetime, timedelta, timezone

import pytest

from omniq.core import fs as ops
from omniq.core.errors import InvalidNameError, StorageError
from omniq.core.models import EventType, TaskEvent
from omniq.storage.file.events import AsyncFileEventStorage, FileEventStorage
from storage_helpers import path

UTC = timezone.utc
QUICK = pytest.mark.parametrize("storage", ["memory", "local"], indirect=True)
# 2024-05-01 22:30 UTC, so that the events below span two days and five hours.
T0 = datetime(2024, 5, 1, 22, 30, tzinfo=UTC)
TYPES = [
    EventType.ENQUEUED,
    EventType.STARTED,
    EventType.FAILED,
    EventType.RETRIED,
    EventType.STARTED,
    EventType.SUCCEEDED,
    EventType.ENQUEUED,
    EventType.FAILED,
    EventType.STARTED,
]


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


def make(storage, **kwargs) -> AsyncFileEventStorage:
    return AsyncFileEventStorage(storage.base_dir, storage.storage_options, **kwargs)


def find(storage, key: str) -> list[str]:
    try:
        return sorted(storage.filesystem().find(path(storage, key)))
    except FileNotFoundError:
        return []


def sample() -> list[TaskEvent]:
    """Nine events of three tasks, 37 minutes apart, at 22:30 23:07 23:44 (May 1) and
    00:21 00:58 01:35 02:12 02:49 03:26 (May 2)."""
    tasks = ["t1", "t2", "t3"]
    return [
        TaskEvent(
            task_id=tasks[i % 3],
            type=kind,
            time=T0 + timedelta(minutes=37 * i),
            attempt=1 + i // 3,
            data={"i": i},
        )
        for i, kind in enumerate(TYPES)
    ]


async def log_all(s: AsyncFileEventStorage, events: list[TaskEvent]) -> None:
    shuffled = list(events)
    random.Random(7).shuffle(shuffled)  # storage order must not matter
    for event in shuffled:
        await s.log(event)


def ids(events: list[TaskEvent]) -> list[str]:
    return [e.id for e in events]


class OpSpy:
    """Records every storage op the programs of ``s`` yield."""

    def __init__(self, s: AsyncFileEventStorage, monkeypatch) -> None:
        self.ops: list[tuple[str, tuple]] = []
        real_run = s.store.run

        def record(program):
            try:
                op = next(program)
                while True:
                    self.ops.append((op.name, op.args))
                    try:
                        value = yield op
                    except Exception as exc:
                        op = program.throw(exc)
                    else:
                        op = program.send(value)
            except StopIteration as stop:
                return stop.value

        monkeypatch.setattr(s.store, "run", lambda program, **kw: real_run(record(program), **kw))

    def first_args(self, name: str) -> list:
        return [args[0] for op, args in self.ops if op == name]

    def listed(self) -> list[str]:
        """Prefixes whose files were listed."""
        return self.first_args(ops.listdir("").name)

    def listed_dirs(self) -> list[str]:
        """Prefixes whose sub-directories were listed."""
        return self.first_args(ops.listdirs("").name)

    def read(self) -> list[str]:
        """Keys read."""
        return [key for keys in self.first_args(ops.read_many([]).name) for key in keys]


# --------------------------------------------------------------------------- conformance


@pytest.mark.anyio
async def test_log_and_query(storage, anyio_backend):
    events = sample()
    async with make(storage) as s:
        assert await s.query() == []
        await log_all(s, events)
        assert (s.written, s.failed_writes) == (9, 0)
        await check_queries(s, events)


async def check_queries(s: AsyncFileEventStorage, events: list[TaskEvent]) -> None:
    """Every kind of query over the nine ``sample()`` events, against the expected answer."""
    in_order = sorted(events, key=lambda e: e.time)
    everything = await s.query()
    assert ids(everything) == ids(in_order)
    assert everything[4] == in_order[4]  # the whole document round-trips

    t2 = await s.query(task_id="t2")
    assert ids(t2) == ids([e for e in in_order if e.task_id == "t2"])
    assert await s.query(task_id="unknown") == []

    failed = [e for e in in_order if e.type is EventType.FAILED]
    assert ids(await s.query(event_type=EventType.FAILED)) == ids(failed)
    assert ids(await s.query(event_type="failed")) == ids(failed)
    assert ids(await s.query(task_id="t1", event_type="started")) == ids(
        [e for e in in_order if e.task_id == "t1" and e.type is EventType.STARTED]
    )

    since, until = T0 + timedelta(minutes=37), T0 + timedelta(minutes=37 * 5)
    window = [e for e in in_order if since <= e.time < until]  # half-open
    assert len(window) == 4
    assert ids(await s.query(since=since, until=until)) == ids(window)
    assert ids(await s.query(since=T0 + timedelta(hours=3))) == ids(
        [e for e in in_order if e.time >= T0 + timedelta(hours=3)]
    )
    assert ids(await s.query(until=T0 + timedelta(minutes=1))) == ids(in_order[:1])
    # Other time zones are the same instants.
    eastern = timezone(timedelta(hours=-4))
    assert ids(
        await s.query(since=since.astimezone(eastern), until=until.astimezone(eastern))
    ) == ids(window)

    assert ids(await s.query(limit=3)) == ids(in_order[:3])
    assert ids(await s.query(task_id="t3", limit=1)) == ids(
        [e for e in in_order if e.task_id == "t3"][:1]
    )
    assert ids(await s.query(since=since, event_type="started", limit=2)) == ids(
        [e for e in in_order if e.time >= since and e.type is EventType.STARTED][:2]
    )
    assert await s.query(limit=0) == []


@pytest.mark.anyio
async def test_layout_is_plain_json_by_hour_and_by_task(storage, anyio_backend, monkeypatch):
    event = TaskEvent(task_id="job-1", type=EventType.STARTED, time=T0, worker_id="w1")
    async with make(storage) as s:
        await s.log(event)
    ms = int(T0.timestamp() * 1000)
    primary = find(storage, "events/by-time")
    index = find(storage, "events/by-task")
    assert [p.rsplit("events/", 1)[1] for p in primary] == [
        f"by-time/2024-05-01/22/{ms:013d}~{event.id}~started~job-1.json"
    ]
    assert [p.rsplit("events/", 1)[1] for p in index] == [
        f"by-task/job-1/{ms:013d}~{event.id}~started.json"
    ]
    fs = storage.filesystem()
    for p in primary + index:
        doc = json.loads(fs.cat_file(p))
        assert doc["task_id"] == "job-1" and doc["type"] == "started"
        assert doc["worker_id"] == "w1" and doc["time"].startswith("2024-05-01T22:30")
    if storage.kind == "local":  # the index entry is a second name for the file, not a copy
        assert os.stat(primary[0]).st_ino == os.stat(index[0]).st_ino
        async with make(storage) as s:
            spy = OpSpy(s, monkeypatch)
            await s.log(event)  # logged again: one create (refused) and one link, no rewrite
            assert [name for name, _ in spy.ops] == ["create", "link"]
            assert os.stat(primary[0]).st_ino == os.stat(index[0]).st_ino
            s.store._sync_ops._link_ok = False  # a mount that refuses hard links: two files
            again = TaskEvent(task_id="job-1", type=EventType.SUCCEEDED, time=T0)
            await s.log(again)
            assert [e.id for e in await s.query(task_id="job-1")] == sorted([event.id, again.id])
        index = [p for p in find(storage, "events/by-task") if again.id in p]
        assert os.stat(index[0]).st_nlink == 1


@QUICK
@pytest.mark.anyio
async def test_query_lists_only_what_it_needs(storage, anyio_backend, monkeypatch):
    async with make(storage) as s:
        await log_all(s, sample())
        # Partitions: 2024-05-01/{22,23} and 2024-05-02/{00,01,02,03}.
        spy = OpSpy(s, monkeypatch)
        got = await s.query(
            since=datetime(2024, 5, 2, 1, 5, tzinfo=UTC),
            until=datetime(2024, 5, 2, 2, 0, tzinfo=UTC),
        )
        assert [(e.time.hour, e.time.minute) for e in got] == [(1, 35)]
        assert spy.listed_dirs() == ["events/by-time", "events/by-time/2024-05-02"]
        assert spy.listed() == ["events/by-time/2024-05-02/01"]

        spy.ops.clear()
        await s.query(task_id="t2")
        assert spy.listed_dirs() == []
        assert spy.listed() == ["events/by-task/t2"]

        spy.ops.clear()  # event type filters on file names: only matching events are read
        failed = await s.query(event_type="failed")
        read = spy.read()
        assert len(failed) == 2 and len(read) == 2 and all("~failed~" in k for k in read)

        spy.ops.clear()  # a limit stops listing once it is met
        await s.query(limit=1)
        assert spy.listed() == ["events/by-time/2024-05-01/22"]


@QUICK
@pytest.mark.anyio
async def test_bad_input_raises(storage, anyio_backend):
    async with make(storage) as s:
        for bad in ("../x", "a/b", "", "a~b", ".x"):
            with pytest.raises(InvalidNameError):
                await s.log(TaskEvent(task_id=bad, type=EventType.STARTED))
            with pytest.raises(InvalidNameError):
                await s.query(task_id=bad)
        with pytest.raises(InvalidNameError):
            await s.log(TaskEvent(task_id="ok", type=EventType.STARTED, id="bad/id"))
        with pytest.raises(ValueError, match="timezone-aware"):
            await s.query(since=datetime(2024, 1, 1))
        with pytest.raises(ValueError):
            await s.query(event_type="no-such-type")
        assert (s.written, s.failed_writes) == (0, 0)


def test_sync_twin(storage):
    with FileEventStorage(storage.base_dir, storage.storage_options) as s:
        for event in sample()[:4]:
            s.log(event)
        assert (s.written, s.failed_writes) == (4, 0)
        assert [e.data["i"] for e in s.query()] == [0, 1, 2, 3]
        assert [e.data["i"] for e in s.query(task_id="t1")] == [0, 3]
        assert s.cleanup(T0 + timedelta(minutes=40)) == 2
        assert [e.data["i"] for e in s.query()] == [2, 3]


# --------------------------------------------------------------------------- cleanup


@pytest.mark.anyio
async def test_cleanup_removes_old_partitions_and_their_index(storage, anyio_backend):
    events = sample()
    in_order = sorted(events, key=lambda e: e.time)
    async with make(storage) as s:
        await log_all(s, events)
        # Cutoff 00:58:01 on May 2: hours 22 and 23 go whole, hour 00 by file name.
        cutoff = T0 + timedelta(minutes=37 * 4, seconds=1)
        assert await s.cleanup(cutoff) == 5
        kept = [e for e in in_order if e.time >= cutoff]
        assert ids(await s.query()) == ids(kept)
        for task in ("t1", "t2", "t3"):
            assert ids(await s.query(task_id=task)) == ids([e for e in kept if e.task_id == task])
        assert len(find(storage, "events/by-task")) == len(kept)  # the index shrank too
        assert len(find(storage, "events/by-time")) == len(kept)
        assert await s.cleanup(cutoff) == 0

        # An age, measured by the storage's clock.
        async with make(storage, clock=lambda: (T0 + timedelta(days=1)).timestamp()) as aged:
            assert await aged.cleanup(timedelta(hours=12)) == len(kept)
        assert await s.query() == []
        assert find(storage, "events") == []
    if storage.kind == "local":  # no empty directories pile up
        root = path(storage, "events")
        assert os.listdir(f"{root}/by-time") == [] and os.listdir(f"{root}/by-task") == []


# --------------------------------------------------------------------------- failures


@QUICK
@pytest.mark.anyio
async def test_storage_failure_while_logging_is_counted_not_raised(
    storage, anyio_backend, monkeypatch, caplog
):
    caplog.set_level(logging.WARNING, logger="omniq.events")
    async with make(storage) as s:
        await s.log(TaskEvent(task_id="t", type=EventType.ENQUEUED))

        async def broken(program):
            program.close()
            raise StorageError("write 'events/...' failed: ConnectionError: down")

        monkeypatch.setattr(s.store, "run", broken)
        assert await s.log(TaskEvent(task_id="t", type=EventType.STARTED)) is None
        monkeypatch.undo()
        assert (s.written, s.failed_writes) == (1, 1)
        assert any(
            r.name == "omniq.events" and "could not record event" in r.getMessage()
            for r in caplog.records
        )
        assert [e.type for e in await s.query()] == [EventType.ENQUEUED]  # still works


@pytest.mark.parametrize("storage", ["local"], indirect=True)
@pytest.mark.anyio
async def test_real_local_failure_while_logging(storage, anyio_backend):
    os.makedirs(storage.base_dir)
    with open(path(storage, "events"), "wb") as f:  # a file where a directory must go
        f.write(b"in the way")
    async with make(storage) as s:
        for kind in (EventType.STARTED, EventType.SUCCEEDED):
            await s.log(TaskEvent(task_id="t", type=kind))
        assert (s.written, s.failed_writes) == (0, 2)
        assert await s.query() == []


@QUICK
@pytest.mark.anyio
async def test_unreadable_event_file_is_skipped(storage, anyio_backend, caplog):
    caplog.set_level(logging.WARNING, logger="omniq.events")
    event = TaskEvent(task_id="t", type=EventType.STARTED, time=T0)
    async with make(storage) as s:
        await s.log(event)
        ms = int(T0.timestamp() * 1000)
        bad = f"events/by-time/2024-05-01/22/{ms:013d}~ZZZ~started~t.json"
        storage.filesystem().pipe_file(path(storage, bad), b"{oops")
        assert ids(await s.query()) == [event.id]
        assert any("unreadable event" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("storage", ["memory"], indirect=True)
@pytest.mark.anyio
async def test_unencodable_event_data_is_replaced_not_raised(storage, anyio_backend):
    async with make(storage) as s:
        await s.log(TaskEvent(task_id="t", type=EventType.FAILED, data={"x": {1, 2}}))
        (got,) = await s.query()
        assert "unencodable_data" in got.data and "set" in got.data["unencodable_data"]
        assert s.written == 1


# --------------------------------------------------------------------------- batches


async def write_batched(s: AsyncFileEventStorage, events: list[TaskEvent], how: str) -> None:
    shuffled = list(events)
    random.Random(7).shuffle(shuffled)
    if how == "log_many":
        await s.log_many(shuffled[:4])
        await s.log_many(shuffled[4:])
    elif how == "submit":
        for event in shuffled:
            await s.submit(event)
    else:  # single-event files (the layout of earlier versions) beside batches
        for event in shuffled[:3]:
            await s.log(event)
        await s.log_many(shuffled[3:])


@pytest.mark.parametrize("how", ["log_many", "submit", "mixed"])
@pytest.mark.anyio
async def test_batched_events_answer_the_same_queries(storage, anyio_backend, how):
    events = sample()
    async with make(storage) as s:
        await write_batched(s, events, how)
        await s.flush()
        assert (s.written, s.failed_writes, s.pending) == (9, 0, 0)
        await check_queries(s, events)
    async with make(storage) as other:  # another instance (or process) reads the same
        assert ids(await other.query()) == ids(sorted(events, key=lambda e: e.time))


@QUICK
@pytest.mark.anyio
async def test_batch_layout_one_file_per_hour_and_an_index_entry_per_task(storage, anyio_backend):
    events = [  # five events of two tasks in hour 22, one in hour 23
        TaskEvent(task_id=f"t{i % 2}", type=EventType.STARTED, time=T0 + timedelta(minutes=i))
        for i in range(5)
    ] + [TaskEvent(task_id="t0", type=EventType.SUCCEEDED, time=T0 + timedelta(minutes=40))]
    async with make(storage) as s:
        await s.log_many(events)
    by_time = [p.rsplit("events/", 1)[1] for p in find(storage, "events/by-time")]
    by_task = [p.rsplit("events/", 1)[1] for p in find(storage, "events/by-task")]
    assert [k.rsplit("/", 1)[0] for k in by_time] == [
        "by-time/2024-05-01/22",
        "by-time/2024-05-01/23",
    ]
    assert all(k.endswith(".jsonl") for k in by_time + by_task)
    names = {k.rsplit("/", 1)[1] for k in by_time}
    # t0 has events in both batches, t1 in the first only; entries carry the batch's name.
    assert sorted(k.rsplit("/", 2)[1] for k in by_task) == ["t0", "t0", "t1"]
    assert {k.rsplit("/", 1)[1] for k in by_task} == names
    fs = storage.filesystem()
    lines = fs.cat_file(find(storage, "events/by-time/2024-05-01/22")[0]).splitlines()
    assert sorted(json.loads(line)["id"] for line in lines) == sorted(e.id for e in events[:5])
    if storage.kind == "local":  # once a task has its directory, its entries are hard links
        async with make(storage) as s:
            await s.log_many([TaskEvent(task_id=t, type=EventType.RETRIED) for t in ("t0", "t1")])
        (batch,) = [p for p in find(storage, "events/by-time") if p.rsplit("/", 1)[1] not in names]
        assert os.stat(batch).st_nlink == 3  # the batch and its two tasks' entries


@QUICK
@pytest.mark.anyio
async def test_submit_waits_for_flush_close_or_query(storage, anyio_backend):
    events = sample()[:3]
    async with make(storage, flush_interval=3600) as s:
        for event in events:
            await s.submit(event)
        if anyio_backend == "asyncio":  # held by the background writer
            assert (s.pending, s.written) == (3, 0)
            async with make(storage) as other:
                assert await other.query() == []
        assert ids(await s.query()) == ids(events)  # a query writes them first
        assert (s.pending, s.written) == (0, 3)
        await s.submit(sample()[3])
    async with make(storage) as other:  # close wrote the last one
        assert len(await other.query()) == 4


@pytest.mark.parametrize("storage", ["memory"], indirect=True)
@pytest.mark.anyio
async def test_submit_writes_when_flush_every_events_are_pending(storage, anyio_backend):
    async with make(storage, flush_interval=3600, flush_every=4) as s:
        for event in sample()[:5]:
            await s.submit(event)
        trio = anyio_backend == "trio"  # no background writer: each is written at once
        assert (s.written, s.pending) == ((5, 0) if trio else (4, 1))
        with pytest.raises(InvalidNameError):  # bad names raise at once, nothing queued
            await s.submit(TaskEvent(task_id="a/b", type=EventType.STARTED))


def test_background_writer_writes_on_its_timer(storage):
    import time

    # 1 s: both submits (a few ms) come before the timer fires, even on a loaded machine. At
    # 10 ms the timer fired between them once in CI (two batches of one event).
    with FileEventStorage(storage.base_dir, storage.storage_options, flush_interval=1.0) as s:
        for minute in (0, 1):
            s.submit(
                TaskEvent(task_id="t", type=EventType.STARTED, time=T0 + timedelta(minutes=minute))
            )
        for _ in range(1000):  # no timing assertion: waits until the timer has fired
            if s.written == 2:
                break
            time.sleep(0.01)
        assert (s.written, s.pending) == (2, 0)
        assert len(find(storage, "events/by-time")) == 1  # one batch for both


@pytest.mark.parametrize("storage", ["local"], indirect=True)
def test_a_blocking_twin_flushes_its_events_at_exit(storage, tmp_path):
    import subprocess
    import sys

    script = (
        "from omniq.core.models import EventType, TaskEvent\n"
        "from omniq.storage.file.events import FileEventStorage\n"
        f"s = FileEventStorage({storage.base_dir!r}, flush_interval=3600)\n"
        "s.submit(TaskEvent(task_id='t', type=EventType.STARTED))\n"
        "assert s.pending == 1\n"  # never closed: the exit handler writes it
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    with FileEventStorage(storage.base_dir) as s:
        assert [e.task_id for e in s.query()] == ["t"]


@pytest.mark.anyio
async def test_cleanup_removes_batches_and_their_index(storage, anyio_backend):
    events = sample()
    in_order = sorted(events, key=lambda e: e.time)
    async with make(storage) as s:
        await s.log_many(events[:5])  # hours 22, 23, 00, 00, 01: one batch per hour
        await s.log_many(events[5:])
        # Cutoff 00:58:01: hours 22 and 23 go whole; the 00 batch (00:21, 00:58) by its
        # latest time.
        cutoff = T0 + timedelta(minutes=37 * 4, seconds=1)
        assert await s.cleanup(cutoff) == 5
        kept = [e for e in in_order if e.time >= cutoff]
        assert ids(await s.query()) == ids(kept)
        for task in ("t1", "t2", "t3"):
            assert ids(await s.query(task_id=task)) == ids([e for e in kept if e.task_id == task])
        assert all("2024-05-01" not in p for p in find(storage, "events/by-time"))
        # a batch straddling the cutoff stays whole until all its events are old
        await s.log_many(
            TaskEvent(task_id="t9", type=EventType.STARTED, time=cutoff + timedelta(minutes=m))
            for m in (-1, 1)
        )
        assert await s.cleanup(cutoff) == 0
        assert await s.cleanup(timedelta(0)) == len(kept) + 2
        assert find(storage, "events") == []
    if storage.kind == "local":
        root = path(storage, "events")
        assert os.listdir(f"{root}/by-time") == [] and os.listdir(f"{root}/by-task") == []


@QUICK
@pytest.mark.anyio
async def test_batch_failures_are_counted_and_bad_lines_skipped(
    storage, anyio_backend, monkeypatch, caplog
):
    caplog.set_level(logging.WARNING, logger="omniq.events")
    events = sample()[:3]
    async with make(storage) as s:

        async def broken(program, **kwargs):
            program.close()
            raise StorageError("write 'events/...' failed: ConnectionError: down")

        monkeypatch.setattr(s.store, "run", broken)
        await s.log_many(events)
        monkeypatch.undo()
        assert (s.written, s.failed_writes) == (0, 3)
        assert any("could not record 3 events" in r.getMessage() for r in caplog.records)

        await s.log_many(events)
        (key,) = find(storage, "events/by-time/2024-05-01/22")
        fs = storage.filesystem()
        fs.pipe_file(key, b"{oops\n" + fs.cat_file(key))
        assert ids(await s.query()) == ids(events)
        assert ids(await s.query(task_id="t1")) == ids(events[:1])
        assert any("unreadable event" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("storage", ["memory", "local"], indirect=True)
def test_background_writer_outlives_an_event_loop(storage):
    """One storage used from two ``asyncio.run`` calls: the first loop's timer never fires
    once that loop is closed, so the second loop's submit sets a timer of its own (without
    it both events waited for flush_every, flush or close)."""
    import asyncio

    s = make(storage, flush_interval=0.05)
    first, second = sample()[:2]
    asyncio.run(s.submit(first))  # ends before its timer fires: the event stays pending
    assert (s.written, s.pending) == (0, 1)

    async def submit_and_wait() -> None:
        await s.submit(second)
        for _ in range(1000):  # no timing assertion: waits until a timer has fired
            if s.written == 2:
                break
            await asyncio.sleep(0.01)

    asyncio.run(submit_and_wait())
    assert (s.written, s.pending) == (2, 0)
    asyncio.run(s.close())
