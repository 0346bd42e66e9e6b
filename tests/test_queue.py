"""Conformance tests of AsyncFileQueue / FileQueue on all five filesystems."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

from omniq.core import (
    CapabilityError,
    InvalidNameError,
    LeaseLostError,
    NotFoundError,
    SerializationError,
    Task,
    TaskCancelledError,
    TaskEvent,
    TaskStatus,
)
from omniq.core.models import EventType, utcnow
from omniq.storage.file.queue import FileQueue
from omniq.storage.file.queue import _layout as layout
from queue_helpers import FakeClock, make_queue

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request) -> str:
    """Every conformance test runs on asyncio and on trio (remote stores then go through
    the sync fsspec API in a worker thread)."""
    return request.param


async def drain(q, queues=("default",), **kw) -> list:
    out = []
    while (c := await q.dequeue(queues, **kw)) is not None:
        out.append(c)
        await q.ack(c)
    return out


async def test_lifecycle_and_status(storage) -> None:
    async with make_queue(storage) as q:
        task = Task(func="pkg.mod:fn", args=[1, "two"], kwargs={"status": {"x": [1]}})
        assert await q.enqueue(task) == task.id
        info = await q.get_task(task.id)
        assert info.status is TaskStatus.PENDING and info.task == task
        assert (await q.size()).ready == 1

        claimed = await q.dequeue(worker_id="w1")
        assert claimed is not None and claimed.task == task and claimed.attempt == 1
        assert claimed.lease_until > utcnow()
        info = await q.get_task(task.id)
        assert info.status is TaskStatus.RUNNING and info.worker_id == "w1"
        size = await q.size()
        assert (size.ready, size.running) == (0, 1)
        assert await q.dequeue() is None

        await q.ack(claimed)
        assert (await q.get_task(task.id)).status is TaskStatus.DONE
        assert (await q.size()).total == 0
        with pytest.raises(NotFoundError):
            await q.get_task("unknown-id")


async def test_priority_then_fifo(storage) -> None:
    async with make_queue(storage, spread=1) as q:
        low = [Task(func="m:f", args=[i], priority=-5) for i in range(3)]
        high = [Task(func="m:f", args=[i], priority=7) for i in range(3)]
        mid = Task(func="m:f", priority=0)
        await q.enqueue_many([*low, mid, *high])
        order = [c.task.id for c in await drain(q)]
        assert order == [t.id for t in high] + [mid.id] + [t.id for t in low]


async def test_queues_in_given_order(storage) -> None:
    async with make_queue(storage) as q:
        a = Task(func="m:f", queue="alpha")
        b = Task(func="m:f", queue="beta", priority=50)
        await q.enqueue_many([a, b])
        first = await q.dequeue(["alpha", "beta"])
        assert first is not None and first.id == a.id
        await q.ack(first)
        assert sorted(await q.list_queues()) == ["alpha", "beta"]
        assert await q.dequeue("alpha") is None
        second = await q.dequeue(["alpha", "beta"])
        assert second is not None and second.id == b.id


async def test_delayed_task_becomes_ready_at_eta(storage) -> None:
    clock = FakeClock()
    async with make_queue(storage, clock=clock) as q:
        task = Task(func="m:f", eta=utcnow() + timedelta(seconds=30))
        await q.enqueue(task)
        assert (await q.get_task(task.id)).status is TaskStatus.SCHEDULED
        assert (await q.size()).scheduled == 1
        assert await q.dequeue() is None
        clock.advance(31)
        claimed = await q.dequeue()
        assert claimed is not None and claimed.id == task.id
        await q.ack(claimed)
        assert (await q.size()).total == 0


async def test_expired_task_is_not_run(storage) -> None:
    events: list[TaskEvent] = []

    async def hook(event: TaskEvent) -> None:
        events.append(event)

    clock = FakeClock()
    async with make_queue(storage, clock=clock, on_event=hook) as q:
        task = Task(func="m:f", expires_at=utcnow() + timedelta(seconds=10))
        await q.enqueue(task)
        clock.advance(11)
        assert await q.dequeue() is None
        assert (await q.get_task(task.id)).status is TaskStatus.EXPIRED
        assert [e.type for e in events] == [EventType.EXPIRED]


async def test_retry_with_backoff_then_dead_letter(storage) -> None:
    clock = FakeClock()
    async with make_queue(storage, clock=clock) as q:
        task = Task(func="m:f", max_retries=2, retry_backoff=10, retry_jitter=False)
        await q.enqueue(task)
        first = await q.dequeue()
        assert first is not None
        assert await q.nack(first, error=ValueError("boom")) is TaskStatus.SCHEDULED
        info = await q.get_task(task.id)
        assert info.status is TaskStatus.SCHEDULED and info.attempt == 2
        assert info.error is not None and info.error.message == "boom"
        assert await q.dequeue() is None  # backoff: 10 s
        clock.advance(10.5)
        second = await q.dequeue()
        assert second is not None and second.attempt == 2 and second.task.failures == 1
        assert await q.nack(second, error="again") is TaskStatus.SCHEDULED
        assert await q.dequeue() is None
        clock.advance(19)  # exponential: 20 s after the second failure
        assert await q.dequeue() is None
        clock.advance(1.5)
        third = await q.dequeue()
        assert third is not None and third.attempt == 3
        assert await q.nack(third, error=RuntimeError("last")) is TaskStatus.DEAD
        info = await q.get_task(task.id)
        assert info.status is TaskStatus.DEAD and info.error is not None
        assert info.error.type == "builtins.RuntimeError"
        dead = await q.list_dead()
        assert [d.task.id for d in dead if d.task] == [task.id]
        assert (await q.size()).dead == 1

        assert await q.requeue_dead() == 1
        again = await q.dequeue()
        assert again is not None and again.id == task.id and again.task.failures == 0
        await q.ack(again)
        assert (await q.size()).total == 0


async def test_nack_retry_in_zero_is_immediate(storage) -> None:
    async with make_queue(storage) as q:
        await q.enqueue(Task(func="m:f", max_retries=1))
        first = await q.dequeue()
        assert first is not None
        assert await q.nack(first, retry_in=0) is TaskStatus.PENDING
        second = await q.dequeue()
        assert second is not None and second.attempt == 2


async def test_lease_takeover_fences_the_old_holder(storage) -> None:
    clock = FakeClock()
    async with make_queue(storage, clock=clock, lease=10, clock_skew=2) as q:
        task = Task(func="m:f")
        await q.enqueue(task)
        old = await q.dequeue(worker_id="old")
        assert old is not None
        clock.advance(11)  # expired, but inside the skew tolerance
        assert await q.dequeue(worker_id="new") is None
        # Past the skew and the reap interval (lease / 4), and past the real time: a document
        # claim's mtime is the store's real time, and the reaper reads only claims older than
        # one lease by the fake clock, so slow store calls before the claim must not hide it
        # (a 3 s margin, then a 20 s one, each failed once in CI runs sharing two cores).
        clock.catch_up()
        clock.advance(20)
        new = await q.dequeue(worker_id="new")
        assert new is not None and new.id == task.id and new.attempt == 2

        for action in (
            q.ack(old),
            q.nack(old, error="late"),
            q.extend_lease(old, 30),
            q.release(old),
        ):
            with pytest.raises(LeaseLostError):
                await action
        info = await q.get_task(task.id)
        assert info.status is TaskStatus.RUNNING and info.worker_id == "new"
        assert info.attempt == 2
        await q.ack(new)
        assert (await q.get_task(task.id)).status is TaskStatus.DONE


async def test_a_reaper_that_found_run_empty_still_takes_over_a_later_claim(storage) -> None:
    """After a pass that found ``run/`` empty the next one looks at ``run/`` first (one
    bounded listing, no ``deps/``); a claim made since must bring the whole pass back."""
    clock = FakeClock()
    async with (
        make_queue(storage, clock=clock, lease=10, clock_skew=2) as reaper,
        make_queue(storage, clock=clock, lease=10, clock_skew=2) as other,
    ):
        assert await reaper.reap() == [] and "default" in reaper._run_empty
        assert await reaper.reap() == []  # the bounded look
        await other.enqueue(Task(func="m:f", id="t1"))
        held = await other.dequeue(worker_id="died")
        assert held is not None
        clock.catch_up()
        clock.advance(20)  # past the lease and the skew (see the test above)
        (taken,) = await reaper.reap()
        assert (taken.id, taken.attempt) == ("t1", 1) and "default" not in reaper._run_empty
        assert (await reaper.dequeue(worker_id="new")).attempt == 2


async def test_dequeue_many_and_ack_many(storage) -> None:
    clock = FakeClock()
    async with make_queue(storage, clock=clock, lease=10, clock_skew=1) as q:
        tasks = [Task(func="m:f", priority=p) for p in (1, 5, 3, 4, 2)]
        await q.enqueue_many(tasks)
        clock.catch_up()  # the claims' mtimes are real times (see below)
        first = await q.dequeue_many(3)
        assert [c.task.priority for c in first] == [5, 4, 3]
        rest = await q.dequeue_many(10, worker_id="w2")
        assert sorted(c.task.priority for c in rest) == [1, 2]
        assert await q.dequeue_many(5) == []
        await q.ack_many(first)
        for c in first:
            assert (await q.get_task(c.id)).status is TaskStatus.DONE
        clock.advance(8)
        rest[1] = await q.extend_lease(rest[1], 30)
        # rest[0]'s lease ended (+ skew): the reaper requeues it. The margin is wide because
        # a document claim's mtime is the store's real time, and the reaper lists only claims
        # older than one lease by the fake clock: slow claim calls (seconds on a busy CI
        # machine) must not hide it.
        clock.advance(20)
        taken = await q.reap()
        assert [c.id for c in taken] == [rest[0].id]
        with pytest.raises(LeaseLostError, match="1 of 2"):
            await q.ack_many(rest)
        assert (await q.get_task(rest[1].id)).status is TaskStatus.DONE
        with pytest.raises(ValueError):
            await q.dequeue_many(0)


@pytest.mark.parametrize("storage", ["s3", "azure"], indirect=True)
async def test_s3_and_azure_defer_and_batch_the_ready_copy_deletes(storage) -> None:
    """On S3 and Azure a claimer leaves the claimed task's ready copy for one batch delete at
    its next listing; other workers' listings skip (and delete) copies of claimed attempts,
    so they never try to claim them."""
    async with make_queue(storage) as q1, make_queue(storage) as q2:
        tasks = [Task(func="m:f", args=[i]) for i in range(3)]
        await q1.enqueue_many(tasks)
        ready = "default/ready/p0999"
        claimed = await q1.dequeue_many(2)
        assert len(claimed) == 2
        assert len(await q1.store.listdir(ready)) == 3  # the copies wait for the batch
        gets: list[str] = []
        real_read = q2._claim_program

        def spy(queue, cand, lease, worker):
            gets.append(cand.task_id)
            return real_read(queue, cand, lease, worker)

        q2._claim_program = spy  # type: ignore[method-assign]
        third = await q2.dequeue()
        assert third is not None and third.id not in {c.id for c in claimed}
        assert gets == [third.id]  # the claimed ones were never tried
        # q2's listing deleted q1's spent copies; its own claim's copy waits for its batch.
        assert await q1.store.listdir(ready) == [f"{third.id}.1.json"]
        await q1.ack_many(claimed)
        await q2.ack(third)
        assert len(await q1.store.listdir(ready)) == 1  # q2's copy waits for its batch ...
        assert (await q1.size()).total == 0  # ... and does not count: its attempt has a claim
        assert (await q2.size()).total == 0
        assert await q1.store.listdir(ready) == []  # size() sends its own pending deletes first
    async with make_queue(storage) as q3:
        await q3.enqueue(Task(func="m:f"))
        got = await q3.dequeue()
        assert got is not None
    assert await q3.store.listdir(ready) == []  # close() sent the pending delete
    async with make_queue(storage) as q4:  # a copy met by a lost claim joins the batch too
        await q4.enqueue(Task(func="m:f", id="met"))
        (name,) = await q4.store.listdir(ready)
        cand = layout.ready_candidate("default", "p0999", name)
        assert cand is not None
        await q4.store.run(q4.claims.lost(cand, layout.run_key("default", "met", 1)))
        assert q4.claims.pending and await q4.store.listdir(ready) == [name]
    assert await q4.store.listdir(ready) == []


@pytest.mark.parametrize("storage", ["gcs"], indirect=True)
async def test_gcs_deletes_the_ready_copy_beside_the_next_claims(storage) -> None:
    """On GCS a claim used to DELETE the ready copy before handing the task out: a request in
    a row with the claim's read and create, on every task's path. Now the copy waits for the
    claimer's next claim call, which deletes it beside its own claims; until then it does not
    count as ready, and a claimer that picks it loses to the claim. (S3 and Azure wait for
    the next listing: tests/test_deletes.py.)"""
    ready = "default/ready/p0999"
    async with make_queue(storage) as q1, make_queue(storage) as q2:
        q1.spread = q2.spread = 1  # claims in listing order (no random start): q2 meets q1's copy
        await q1.enqueue_many([Task(func="m:f", args=[i]) for i in range(4)])
        first = await q1.dequeue()
        assert first is not None
        assert len(await q1.store.listdir(ready)) == 4  # the copy waits for the next claims
        assert (await q2.size()).ready == 3  # it does not count: its attempt has a claim
        second = await q1.dequeue()
        assert second is not None and second.id != first.id
        names = await q1.store.listdir(ready)
        assert f"{first.id}.1.json" not in names and f"{second.id}.1.json" in names
        assert len(names) == 3
        third = await q2.dequeue()
        assert third is not None and third.id not in {first.id, second.id}
        # q2 lost a race on it: that deletes the copy at once, before the next claimer meets it.
        assert f"{second.id}.1.json" not in await q1.store.listdir(ready)
        await q1.ack_many([first, second])
        await q2.ack(third)
    # close() sent the pending deletes.
    assert [n for n in await q1.store.listdir(ready)] == [
        n for n in names if n.split(".")[0] not in {first.id, second.id, third.id}
    ]
    async with make_queue(storage) as q3:  # a claim that lost deletes the copy it met at once
        await q3.enqueue(Task(func="m:f", id="met"))
        (name,) = [n for n in await q3.store.listdir(ready) if n.startswith("met.")]
        cand = layout.ready_candidate("default", "p0999", name)
        assert cand is not None
        await q3.store.run(q3.claims.lost(cand, layout.run_key("default", "met", 1)))
        assert not q3.claims.pending
        assert name not in await q3.store.listdir(ready)


async def test_extend_lease_keeps_the_task(storage) -> None:
    clock = FakeClock()
    async with make_queue(storage, clock=clock, lease=10, clock_skew=1) as q:
        await q.enqueue(Task(func="m:f"))
        claimed = await q.dequeue()
        assert claimed is not None
        clock.advance(8)
        claimed = await q.extend_lease(claimed, 10)
        clock.advance(8)
        assert await q.dequeue() is None
        assert await q.reap() == []
        await q.ack(claimed)


async def test_release_gives_the_task_back(storage) -> None:
    async with make_queue(storage) as q:
        await q.enqueue(Task(func="m:f"))
        claimed = await q.dequeue()
        assert claimed is not None
        await q.release(claimed)
        again = await q.dequeue()
        assert again is not None and again.id == claimed.id and again.task.failures == 0


async def test_cancel_pending_and_running(storage) -> None:
    async with make_queue(storage) as q:
        pending = Task(func="m:f")
        running = Task(func="m:f")
        await q.enqueue(running)
        claimed = await q.dequeue()
        assert claimed is not None
        await q.enqueue(pending)
        assert await q.cancel(pending.id) is True
        assert (await q.get_task(pending.id)).status is TaskStatus.CANCELLED
        assert await q.dequeue() is None

        assert await q.cancel(running.id) is True
        with pytest.raises(TaskCancelledError):
            await q.extend_lease(claimed)
        assert (await q.get_task(running.id)).status is TaskStatus.CANCELLED
        assert await q.cancel(running.id) is False


async def test_cancel_scheduled(storage) -> None:
    clock = FakeClock()
    async with make_queue(storage, clock=clock) as q:
        task = Task(func="m:f", eta=utcnow() + timedelta(seconds=5))
        await q.enqueue(task)
        assert await q.cancel(task.id, queue="default") is True
        clock.advance(6)
        assert await q.dequeue() is None
        assert (await q.size()).total == 0


async def test_purge(storage) -> None:
    async with make_queue(storage) as q:
        await q.enqueue_many([Task(func="m:f") for _ in range(5)])
        await q.enqueue(Task(func="m:f", eta=utcnow() + timedelta(hours=1)))
        assert await q.purge() == 6
        assert (await q.size()).total == 0
        assert await q.dequeue() is None


async def test_enqueue_is_idempotent_per_id(storage) -> None:
    async with make_queue(storage) as q:
        task = Task(func="m:f", id="order-42")
        await q.enqueue(task)
        await q.enqueue(task)
        assert (await q.size()).ready == 1


async def test_corrupt_file_is_quarantined_and_good_tasks_run(storage) -> None:
    async with make_queue(storage) as q:
        good = Task(func="m:f")
        await q.enqueue(good)
        bad_key = "default/ready/p0999/01ZZZZZZZZZZZZZZZZZZZZZZZZ.1.json"
        await q.store.write(bad_key, b'{"v": 1, "func": trunc')
        got = await drain(q)
        assert [c.id for c in got] == [good.id]
        assert await q.store.read(bad_key) is None
        kept = await q.store.listdir("default/quarantine")
        assert len(kept) == 1
        assert await q.store.read(f"default/quarantine/{kept[0]}") == b'{"v": 1, "func": trunc'


async def test_future_schema_version_is_left_for_newer_workers(storage) -> None:
    """A task written by a newer OmniQ (rolling upgrade) is neither run nor quarantined."""
    async with make_queue(storage) as q:
        from omniq.core import encode

        task = Task(func="m:f")
        raw = encode(task).replace(b'"v":1', b'"v":99')
        key = f"default/ready/p0999/{task.id}.1.json"
        await q.store.write(key, raw)
        good = Task(func="m:f")
        await q.enqueue(good)
        claimed = await q.dequeue()
        assert claimed is not None and claimed.id == good.id
        assert await q.dequeue() is None
        assert await q.store.read(key) == raw
        assert await q.store.listdir("default/quarantine") == []


@pytest.mark.parametrize(
    "bad",
    ["../x", "a/b", "/abs", "a\\b", "nul\x00", "\u0430bc", "", "x" * 200, ".hidden", "tab\tname"],
)
async def test_bad_names_are_rejected(storage, bad: str) -> None:
    async with make_queue(storage) as q:
        with pytest.raises(InvalidNameError):
            await q.enqueue(Task(func="m:f", queue=bad))
        with pytest.raises(InvalidNameError):
            await q.enqueue(Task(func="m:f", id=bad))
        with pytest.raises(InvalidNameError):
            await q.dequeue(bad)
        with pytest.raises(InvalidNameError):
            await q.get_task(bad)
        assert await q.list_queues() == []


async def test_unencodable_args_fail_at_enqueue(storage) -> None:
    async with make_queue(storage) as q:
        with pytest.raises(SerializationError, match="datetime"):
            await q.enqueue(Task(func="m:f", args=[utcnow()]))
        with pytest.raises(SerializationError, match="nested deeper"):
            nested: list = []
            for _ in range(100):
                nested = [nested]
            await q.enqueue(Task(func="m:f", args=nested))
        assert (await q.size()).total == 0


async def test_probe_refuses_a_store_without_exclusive_create(storage, monkeypatch) -> None:
    q = make_queue(storage)
    ops = q.store._sync_ops
    monkeypatch.setattr(type(q.store), "create", _always_created)
    with pytest.raises(CapabilityError, match="exclusive create"):
        await q.enqueue(Task(func="m:f"))
    assert ops is q.store._sync_ops
    await q.close()


async def _always_created(self, key: str, data: bytes) -> bool:
    return True


def test_sync_twin_from_many_threads(storage) -> None:
    with FileQueue(storage.base_dir, storage.storage_options) as q:
        ids = q.enqueue_many([Task(func="m:f", args=[i]) for i in range(40)])
        acked: list[str] = []
        lock = threading.Lock()

        def work() -> None:
            while (c := q.dequeue()) is not None:
                q.ack(c)
                with lock:
                    acked.append(c.id)

        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(acked) == sorted(ids)
        assert q.size().total == 0
