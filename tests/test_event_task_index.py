"""The per-task index of the event storage for task ids that are ULIDs (OmniQ's own ids).

On a local directory each new directory is an inode, as costly as the event's own file, so
ULID task ids are indexed by the 4 ms in which the id was made (``events/by-task-time/``;
batches by the 32 ms) instead of one directory per task; object stores and memory have no
directories to make and keep ``events/by-task/{task_id}/``. Entries of the older layout are
still read and cleaned.
"""

from __future__ import annotations

import os
import threading
from datetime import datetime, timedelta, timezone

import pytest

from omniq.core.models import EventType, TaskEvent, id_text
from omniq.storage.file.events import _layout as layout
from storage_helpers import path
from test_events import OpSpy, find, make

UTC = timezone.utc
T0 = datetime(2024, 5, 1, 22, 30, tzinfo=UTC)
MS = 1_714_600_000_000  # a multiple of 4: ids made at MS + 0..3 share a 4 ms group


def ulid(ms: int, n: int) -> str:
    return id_text((ms << 80) | n)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


def events_of(task_ids: list[str]) -> list[TaskEvent]:
    kinds = [EventType.ENQUEUED, EventType.STARTED, EventType.SUCCEEDED]
    return [
        TaskEvent(task_id=t, type=k, time=T0 + timedelta(seconds=i * 3 + j))
        for i, t in enumerate(task_ids)
        for j, k in enumerate(kinds)
    ]


def test_task_group_is_the_4_ms_the_id_was_made_in():
    assert layout.task_group(ulid(MS, 1)) == layout.task_group(ulid(MS + 3, 99))
    assert layout.task_group(ulid(MS + 4, 1)) != layout.task_group(ulid(MS + 3, 1))
    assert len({layout.task_group(ulid(MS + i, 1)) for i in range(64)}) == 16
    assert layout.task_group(ulid(MS - 1, 1)) != layout.task_group(ulid(MS, 1))
    for other in ("job-1", "k00001", ulid(MS, 1).lower(), ulid(MS, 1) + "0", "I" * 26):
        assert layout.task_group(other) is None


def test_a_groups_batch_entry_is_judged_by_its_range_alone():
    """A query by task drops a group's batch entry whose range of ids cannot hold the task
    before parsing anything of it (``range_may_hold``); an entry in range, or a name that is
    not a range of ULID ids, is kept for the parse that decides."""
    first, last = ulid(MS, 1), ulid(MS + 2, 1)
    entry = f"{first}~{last}~{layout.Batch(MS, MS + 5, 'b1').name}"
    for inside in (first, ulid(MS + 1, 9), last):
        assert layout.range_may_hold(entry, inside)
    for outside in (ulid(MS - 1, 1), ulid(MS + 2, 2), ulid(MS + 3, 1)):
        assert not layout.range_may_hold(entry, outside)
    assert layout.range_may_hold(f"job-1~{layout.Batch(MS, MS, 'b2').name}", ulid(MS + 9, 1))


@pytest.mark.anyio
async def test_ulid_tasks_share_an_index_directory_locally(storage, anyio_backend, monkeypatch):
    a, b, c = ulid(MS + 1, 5), ulid(MS + 3, 2), ulid(MS + 5, 7)  # a, b: one 4 ms; c the next
    events = events_of([a, b, c])
    async with make(storage) as s:
        for event in events[0::3]:
            await s.log(event)  # one file per event
        await s.log_many([e for e in events if e.type is not EventType.ENQUEUED])  # a batch
        for task in (a, b, c):
            got = await s.query(task_id=task)
            assert [e.id for e in got] == [e.id for e in events if e.task_id == task]
        assert [e.id for e in await s.query(task_id=b, event_type="started")] == [events[4].id]

        spy = OpSpy(s, monkeypatch)
        await s.query(task_id=a)
        if storage.kind == "local":
            group, span = layout.task_group(a), layout.batch_group(a)
            assert span == layout.batch_group(c) and group != layout.task_group(c)
            assert spy.listed() == [
                f"events/by-task-time/{group}",
                f"events/by-task-time/{span}",
                f"events/by-task/{a}",  # the older layout too
            ]
            root = path(storage, "events")
            assert sorted(os.listdir(f"{root}/by-task-time")) == sorted(
                {group, layout.task_group(c), span}
            )
            assert find(storage, "events/by-task") == []  # no directory per task
            # a's and b's single files; one entry for the batch of all three (not one each)
            assert len(os.listdir(f"{root}/by-task-time/{group}")) == 2
            assert len(os.listdir(f"{root}/by-task-time/{span}")) == 1
        else:
            assert spy.listed() == [f"events/by-task/{a}"]
            assert find(storage, "events/by-task-time") == []
            assert len(find(storage, f"events/by-task/{a}")) == 2

        assert await s.cleanup(T0 + timedelta(hours=2)) == len(events)
        for task in (a, b, c):
            assert await s.query(task_id=task) == []
        assert find(storage, "events") == []
    if storage.kind == "local":  # no empty group directory is left behind
        assert os.listdir(f"{path(storage, 'events')}/by-task-time") == []


@pytest.mark.anyio
@pytest.mark.parametrize("storage", ["local"], indirect=True)
async def test_entries_of_the_older_layout_are_read_and_cleaned(storage, anyio_backend):
    task = ulid(MS + 3, 1)
    first, second, third = events_of([task])
    async with make(storage) as old:
        old._grouped = False  # as 0.1.0 wrote them: one directory per task
        await old.log(first)
        await old.log_many([second])
    assert len(find(storage, f"events/by-task/{task}")) == 2
    async with make(storage) as s:
        await s.log(third)
        assert [e.id for e in await s.query(task_id=task)] == [first.id, second.id, third.id]
        assert await s.cleanup(T0 + timedelta(hours=1)) == 3
        assert await s.query(task_id=task) == []
        assert find(storage, "events") == []
    root = path(storage, "events")
    assert os.listdir(f"{root}/by-task") == [] and os.listdir(f"{root}/by-task-time") == []


@pytest.mark.anyio
@pytest.mark.parametrize("storage", ["local"], indirect=True)
async def test_a_removed_group_directory_is_made_again(storage, anyio_backend):
    """A group outlives its cleanup: a task retried after its events were cleaned up."""
    task = ulid(MS, 3)
    first, second, _ = events_of([task])
    async with make(storage) as s:
        await s.log(first)
        assert await s.cleanup(T0 + timedelta(seconds=1)) == 1
        assert os.listdir(f"{path(storage, 'events')}/by-task-time") == []
        await s.log_many([second])
        assert [e.id for e in await s.query(task_id=task)] == [second.id]


@pytest.mark.anyio
@pytest.mark.parametrize("storage", ["local"], indirect=True)
async def test_a_batch_links_once_per_32_ms_span_of_tasks(storage, anyio_backend, monkeypatch):
    """A batch's index entry is a link per 32 ms span of ULID tasks, not per task, named by
    the range of the span's ids in it: a query by task reads the batches whose range holds
    the task and keeps the task's own lines."""
    same = [ulid(MS + n, n) for n in range(1, 31)]  # 30 tasks made in one 32 ms
    later = ulid(MS + 32, 1)
    events = events_of([*same, later])
    enqueued = events[0::3]
    ran = [e for e in events[3:9] if e.type is not EventType.ENQUEUED]  # tasks 1 and 2
    written = sorted(enqueued + ran, key=lambda e: e.time)
    async with make(storage) as s:
        await s.log_many(enqueued)  # one batch: the two groups' enqueued events
        await s.log_many(ran)  # a second batch, of the first group only
        root = path(storage, "events")
        (first,) = [p for p in find(storage, "events/by-time") if p.endswith(".jsonl")][:1]
        assert os.stat(first).st_nlink == 3  # the batch, one entry for each span
        group = os.listdir(f"{root}/by-task-time/{layout.batch_group(same[0])}")
        ranges = sorted(layout.split_range_name(n)[:2] for n in group)  # type: ignore[index]
        assert ranges == [(same[0], same[29]), (same[1], same[2])]  # the group's ids in each
        assert len(os.listdir(f"{root}/by-task-time/{layout.batch_group(later)}")) == 1
        for task in (same[0], same[1], same[2], same[29], later):
            got = await s.query(task_id=task)
            assert [e.id for e in got] == [e.id for e in written if e.task_id == task]
        spy = OpSpy(s, monkeypatch)
        await s.query(task_id=same[3])  # outside the second batch's range: one batch read
        assert len(spy.read()) == 1
        assert await s.cleanup(T0 + timedelta(hours=2)) == len(written)
        assert find(storage, "events") == []
    assert os.listdir(f"{path(storage, 'events')}/by-task-time") == []


@pytest.mark.anyio
@pytest.mark.parametrize("storage", ["local"], indirect=True)
async def test_a_dense_slice_of_a_batch_is_indexed_in_its_4_ms_group(
    storage, anyio_backend, monkeypatch
):
    """Ids made in bulk put dozens of batches in one span; a batch's slice of ``DENSE`` or
    more tasks all made in one 4 ms is indexed in that group (still one link), so a query by
    task lists a few entries. Fewer tasks, or tasks of two groups, keep the span's entry."""
    dense = [ulid(MS + n % 4, n) for n in range(layout.DENSE)]  # one 4 ms
    straddling = [ulid(MS + 8 + n % 8, n) for n in range(layout.DENSE)]  # two 4 ms groups
    sparse = [ulid(MS + 16, n) for n in range(layout.DENSE - 1)]  # one 4 ms, too few
    batches = [events_of(dense), events_of(straddling), events_of(sparse)]
    async with make(storage) as s:
        for events in batches:
            await s.log_many(events)
        root = path(storage, "events/by-task-time")
        span, group = layout.batch_group(dense[0]), layout.task_group(dense[0])
        assert span is not None and group is not None
        assert {layout.batch_group(t) for t in straddling + sparse} == {span}
        assert sorted(os.listdir(root)) == [span, group]

        def ranges(directory: str) -> list[tuple[str, str]]:
            names = os.listdir(f"{root}/{directory}")
            return sorted(layout.split_range_name(n)[:2] for n in names)  # type: ignore[index]

        assert ranges(group) == [(min(dense), max(dense))]
        assert ranges(span) == sorted(
            [(min(straddling), max(straddling)), (min(sparse), max(sparse))]
        )
        for events in batches:
            for task in dict.fromkeys(e.task_id for e in events):
                got = await s.query(task_id=task)
                assert [e.id for e in got] == [e.id for e in events if e.task_id == task]
        spy = OpSpy(s, monkeypatch)
        await s.query(task_id=dense[3])
        assert len(spy.read()) == 1  # the dense batch only: the span's two hold other ids
        assert await s.cleanup(T0 + timedelta(days=1)) == sum(map(len, batches))
        assert find(storage, "events") == []
    assert os.listdir(f"{path(storage, 'events')}/by-task-time") == []


@pytest.mark.anyio
@pytest.mark.parametrize("storage", ["local"], indirect=True)
@pytest.mark.parametrize("local_io", [None, "thread"])
async def test_small_batches_are_written_on_the_loop_and_big_ones_in_a_thread(
    storage, anyio_backend, local_io, monkeypatch
):
    """A batch of a few index links costs less than a thread's hand-offs; many links (tasks
    made far apart) would hold the event loop for milliseconds, and ``local_io="thread"``
    asks for a thread always."""
    async with make(storage, local_io=local_io) as s:
        ops = s.store._sync_ops
        real_write, where = ops.write, []

        def write(key, data):
            where.append(threading.get_ident())
            return real_write(key, data)

        monkeypatch.setattr(ops, "write", write)
        here = threading.get_ident()
        await s.log_many(events_of([ulid(MS, n) for n in range(1, 4)]))  # one group: one link
        small = set(where)
        where.clear()
        await s.log_many(events_of([ulid(MS + 32 * n, 1) for n in range(20)]))  # 20 links
        assert small and where
        assert (here in small) is (local_io is None)
        assert here not in where
        assert len(await s.query()) == 69
