"""Sharded queues (docs/queue.md, "Sharded queues"): a queue's tasks stored in ``n`` storage
queues chosen by task id, and every call that names the queue reading all of them.

Where a task is stored is checked through a second queue instance configured without shards,
which sees each shard as a queue of its own."""

from __future__ import annotations

import types
import zlib
from collections import Counter
from datetime import timedelta
from typing import Any

import anyio
import pytest

from omniq.backend.file import AsyncFileBackend
from omniq.core import ConfigurationError, InvalidNameError, StorageError, Task, TaskStatus
from omniq.core.models import ResultStatus, utcnow
from omniq.storage.file.queue import AsyncFileQueue
from omniq.storage.file.queue import _layout as layout
from omniq.storage.file.queue import _shards as shards_module
from queue_helpers import FakeClock, make_queue

pytestmark = pytest.mark.anyio

QUICK = pytest.mark.parametrize("storage", ["memory", "local"], indirect=True)
SHARDS = {"orders": 4}
NAMES = [f"orders.shard{k:03d}" for k in range(4)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def shard_of(task_id: str, n: int = 4) -> str:
    return f"orders.shard{zlib.crc32(task_id.encode()) % n:03d}"


async def test_tasks_are_stored_by_id_and_the_queue_name_reads_every_shard(storage) -> None:
    tasks = [Task(func="m:f", args=[i], queue="orders") for i in range(40)]
    async with make_queue(storage, shards=SHARDS) as q, make_queue(storage) as plain:
        assert await q.enqueue_many(tasks[:20]) == [t.id for t in tasks[:20]]
        for task in tasks[20:]:
            await q.enqueue(task)

        # Stored where the id says, seen as four queues by an instance without the setting
        # (and the queue's own name, where its bell is, with bells: docs/queue.md, "Bells").
        assert sorted(await plain.list_queues()) == (["orders", *NAMES] if q.bells else NAMES)
        for task in tasks:
            assert (await plain.get_task(task.id, shard_of(task.id))).status is TaskStatus.PENDING
        per_shard = {name: (await plain.size(name)).ready for name in NAMES}
        assert per_shard == Counter(shard_of(t.id) for t in tasks)
        assert all(per_shard.values())  # 40 ids over 4 shards: none empty

        # Every call naming the queue spans its shards.
        assert await q.list_queues() == ["orders"]
        assert (await q.size("orders")).ready == 40
        info = await q.get_task(tasks[0].id, "orders")
        assert info.status is TaskStatus.PENDING and info.task.queue == shard_of(tasks[0].id)
        listed, after = [], None
        while True:
            page = await q.list_tasks("orders", "pending", limit=15, after=after)
            listed += [i.task.id for i in page.items]
            if (after := page.next) is None:
                break
        assert sorted(listed) == sorted(t.id for t in tasks)

        claimed = []
        while (c := await q.dequeue("orders")) is not None:
            claimed.append(c)
            await q.ack(c)
        assert sorted(c.id for c in claimed) == sorted(t.id for t in tasks)  # each once
        assert all(c.queue == shard_of(c.id) for c in claimed)
        assert (await q.size("orders")).total == 0
        assert (await q.get_task(tasks[5].id)).status is TaskStatus.DONE


@QUICK
async def test_claims_begin_at_one_shard_a_period_then_at_the_next(storage, monkeypatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(shards_module, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    async with make_queue(storage, shards=SHARDS, refresh_interval=0.5) as q:
        assert q.shards.period == 5.0  # ten listing lives
        await q.enqueue_many([Task(func="m:f", args=[i], queue="orders") for i in range(80)])
        seen = []
        for _ in range(4):
            within = [await q.dequeue("orders") for _ in range(3)]
            # The same shard for a period: a busy consumer lists one shard a period ...
            assert len({c.queue for c in within if c is not None}) == 1, within
            seen.append(within[0].queue if within[0] else None)
            now[0] += 5.0
        # ... and the next one in the next period: four periods, four shards.
        assert sorted(seen) == NAMES  # type: ignore[type-var]
        first = NAMES.index(seen[0])  # type: ignore[arg-type]
        assert seen == [NAMES[(first + i) % 4] for i in range(4)]


async def test_one_id_enqueued_twice_is_stored_once(storage) -> None:
    async with make_queue(storage, shards=SHARDS) as q, make_queue(storage) as plain:
        for _ in range(2):  # e.g. two workers firing one schedule tick
            await q.enqueue(Task(func="m:f", id="tick-2026-12-03T12-00", queue="orders"))
        assert (await q.size("orders")).ready == 1
        assert sum([(await plain.size(name)).ready for name in NAMES]) == 1
        # Pinned: a version that routed an id elsewhere would store a tick twice meanwhile.
        assert (await plain.size("orders.shard001")).ready == 1
        # A task re-enqueued to the shard it ran from (its ctx.queue) is routed by its id.
        again = await q.enqueue(Task(func="m:f", id="follow-up-7", queue="orders.shard000"))
        assert (await q.get_task(again)).task.queue == shard_of("follow-up-7")


@QUICK
async def test_tasks_stored_before_the_queue_was_sharded_are_served(storage) -> None:
    async with make_queue(storage) as plain:
        old = Task(func="m:f", queue="orders")
        await plain.enqueue(old)
    async with make_queue(storage, shards=SHARDS) as q:
        await q.enqueue(Task(func="m:f", queue="orders"))
        await q.enqueue_many([Task(func="m:f", queue="orders") for _ in range(20)])
        assert (await q.get_task(old.id, "orders")).task.queue == "orders"
        assert (await q.size("orders")).ready == 22
        # The queue itself comes first in a period's first call: busy shards cannot starve it.
        first = await q.dequeue("orders")
        assert first is not None and first.id == old.id


async def test_dead_letters_delays_cancel_and_purge_span_the_shards(storage) -> None:
    async with make_queue(storage, shards=SHARDS) as q:
        doomed = [Task(func="m:f", args=[i], queue="orders") for i in range(6)]
        await q.enqueue_many(doomed)
        while (c := await q.dequeue("orders")) is not None:
            assert await q.nack(c, error="boom", retry=False) is TaskStatus.DEAD
        assert (await q.size("orders")).dead == 6
        dead = await q.list_dead("orders")
        assert sorted(i.task.id for i in dead) == sorted(t.id for t in doomed)
        oldest = sorted(t.id for t in doomed)[:4]  # ids are time-ordered: the oldest first
        assert [i.task.id for i in await q.list_dead("orders", limit=4)] == oldest
        assert await q.delete_dead("orders", doomed[0].id)
        assert not await q.delete_dead("orders", doomed[0].id)
        assert await q.requeue_dead("orders", doomed[1].id) == 1
        assert await q.requeue_dead("orders") == 4
        assert (await q.size("orders")).ready == 5

        later = [
            Task(func="m:f", queue="orders", eta=utcnow() + timedelta(minutes=m))
            for m in (30, 10, 20)
        ]
        await q.enqueue_many(later)
        due = await q.next_due("orders")
        assert due is not None and abs(due - later[1].eta) < timedelta(milliseconds=1)
        assert await q.cancel(later[0].id, "orders")
        assert (await q.get_task(later[0].id)).status is TaskStatus.CANCELLED
        assert await q.purge("orders") == 5 + 2
        assert (await q.size("orders")).total == 0


@QUICK
async def test_bad_shard_settings_are_refused_before_any_write(storage) -> None:
    bad = [
        {"orders": 0},
        {"orders": 257},
        {"orders": True},
        {"orders": "4"},
        {"orders": 2.0},
        {"o" * 125: 2},  # its shards' names would be longer than 128 characters
        {"orders.shard001": 2},  # a shard's name
    ]
    bad.append("orders")  # type: ignore[arg-type]  # not a mapping
    for shards in bad:
        with pytest.raises(ConfigurationError):
            AsyncFileQueue(storage.base_dir, storage.storage_options, shards=shards)
    for name in ("../up", "a/b", ""):
        with pytest.raises(InvalidNameError):
            AsyncFileQueue(storage.base_dir, storage.storage_options, shards={name: 2})
    async with make_queue(storage) as q:
        assert await q.list_queues() == []
    with pytest.raises(ConfigurationError, match="OMNIQ_QUEUE_SHARDS"):
        AsyncFileBackend(storage.base_dir, environ={"OMNIQ_QUEUE_SHARDS": "orders=4"})


@QUICK
async def test_testing_mode_runs_tasks_of_a_sharded_queue(storage) -> None:
    async with AsyncFileBackend(
        storage.base_dir,
        storage.storage_options,
        environ={},
        queue_shards={"orders": 4},
        immediate=True,
    ) as b:
        task_id = await b.enqueue("worker_tasks:add", (2, 3), queue="orders")
        result = await b.result(task_id)
        assert result is not None and result.value == 5
        assert (await b.queue.size("orders")).total == 0


async def test_the_shards_take_one_reaper_turn_and_any_shard_s_turn_reaps_them_all(
    storage,
) -> None:
    """One turn key for the shards and the queue itself: a consumer reads one key a turn,
    not n + 1, and the consumer whose turn comes reaps every shard, so an expired lease in a
    shard no consumer is on is taken over at the next turn. A process without the setting
    keeps its own turn of the queue itself (neither holds the other's queues back)."""
    clock = FakeClock()
    opts = {"clock": clock, "lease": 10, "clock_skew": 2}
    passes: list[str] = []
    reads: list[str] = []

    def counted(q: AsyncFileQueue) -> AsyncFileQueue:
        reap, turn = q._reap_queue, q._reap_turn

        async def reap_counted(queue: str) -> Any:
            passes.append(queue)
            return await reap(queue)

        def turn_counted(key: str, current: float) -> Any:
            reads.append(key)
            return turn(key, current)

        q._reap_queue = reap_counted  # type: ignore[method-assign]
        q._reap_turn = turn_counted  # type: ignore[method-assign]
        return q

    consumers = [counted(make_queue(storage, shards=SHARDS, **opts)) for _ in range(3)]
    plain = counted(make_queue(storage, **opts))
    try:
        task = Task(func="m:f", queue="orders")
        await consumers[0].enqueue(task)
        held = await consumers[0].dequeue("orders", worker_id="gone")
        assert held is not None and held.task.queue == shard_of(task.id)
        group = layout.reaper_shards_key("orders", 4)
        assert sorted(passes) == sorted(["orders", *NAMES]) and reads == [group]
        for q in consumers[1:]:
            assert await q.dequeue("orders") is None
        assert len(passes) == 5 and reads == [group] * 3  # one key a turn, one pass a turn
        assert await plain.dequeue("orders") is None
        assert passes[5:] == ["orders"] and reads[3:] == [layout.reaper_key("orders")]

        clock.catch_up()  # see test_lease_takeover_fences_the_old_holder
        clock.advance(20)  # past the lease, the skew and the reap interval
        passes.clear()
        # Whichever shard this consumer looks at first, its turn takes the lease over.
        again = await consumers[1].dequeue("orders", worker_id="next")
        assert again is not None and again.id == task.id and again.attempt == 2
        assert sorted(passes) == sorted(["orders", *NAMES])
        await consumers[1].ack(again)
    finally:
        for q in (*consumers, plain):
            await q.close()


async def test_a_turn_s_passes_run_side_by_side_and_a_failing_one_stops_no_other(
    storage,
) -> None:
    """On an object store a sharded queue's reaper turn runs its passes at once (one after
    another, 16 shards held the winner's dequeue 17 request latencies); locally one after
    another. A pass that fails stops no other: its error is raised once they are done."""
    q = make_queue(storage, shards=SHARDS)
    reap, done = q._reap_queue, []
    running = most = 0

    async def tracked(queue: str) -> Any:
        nonlocal running, most
        running += 1
        most = max(most, running)
        try:
            await anyio.sleep(0.01)
            if queue == NAMES[1]:
                raise StorageError("this shard's listing failed")
            taken = await reap(queue)
            done.append(queue)
            return taken
        finally:
            running -= 1

    q._reap_queue = tracked  # type: ignore[method-assign]
    async with q:
        with pytest.raises(StorageError, match="listing failed"):
            await q.dequeue("orders")
        assert sorted(done) == sorted(["orders", *NAMES[:1], *NAMES[2:]])
        assert most == (len(NAMES) + 1 if q.store.is_remote else 1)
        await q.enqueue(Task(func="m:f", queue="orders"))  # the turn is taken: no pass now
        assert await q.dequeue("orders") is not None and len(done) == len(NAMES)


async def test_a_worker_drains_a_sharded_queue(storage) -> None:
    environ = {"OMNIQ_QUEUE_SHARDS": '{"orders": 3}'}  # as a deployment sets it
    async with AsyncFileBackend(storage.base_dir, storage.storage_options, environ=environ) as b:
        assert b.config.queue_shards == {"orders": 3}
        ids = [await b.enqueue("worker_tasks:add", (i, 1), queue="orders") for i in range(12)]
        assert {(await b.get_task(i)).task.queue for i in ids} <= {
            f"orders.shard{k:03d}" for k in range(3)
        }
        stats = await b.worker("orders", burst=True, idle_timeout=0.2, poll=0.05).run()
        assert stats["succeeded"] == 12
        for n, task_id in enumerate(ids):
            result = await b.result(task_id)
            assert result is not None and result.status is ResultStatus.SUCCESS
            assert result.value == n + 1
        assert (await b.queue.size("orders")).total == 0


@QUICK
async def test_consumers_racing_on_a_sharded_queue_claim_each_task_once(storage) -> None:
    tasks = [Task(func="m:f", args=[i], queue="orders") for i in range(120)]
    consumers = [make_queue(storage, shards=SHARDS) for _ in range(4)]
    claimed: list[str] = []

    async def consume(q: AsyncFileQueue) -> None:
        misses = 0
        while misses < 3:  # a few empty looks: the others may still hold the last ones
            batch = await q.dequeue_many(5, "orders")
            misses = 0 if batch else misses + 1
            claimed.extend(c.id for c in batch)
            await q.ack_many(batch)
            await anyio.sleep(0)

    try:
        await consumers[0].enqueue_many(tasks)
        async with anyio.create_task_group() as tg:
            for q in consumers:
                tg.start_soon(consume, q)
        assert sorted(claimed) == sorted(t.id for t in tasks)  # none twice, none left
        assert (await consumers[0].size("orders")).total == 0
    finally:
        for q in consumers:
            await q.close()
