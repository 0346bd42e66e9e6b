"""How the worker claims: every free slot in one call, a batch's claims overlapping on an
object store, extra claim loops only while there is work, and a stop that does not wait on
them. Task functions live in ``worker_tasks``."""

from __future__ import annotations

import anyio
import pytest

import worker_tasks
from omniq.backend.file import AsyncFileBackend
from omniq.backend.file._claimers import HELPER_WAIT
from omniq.core.models import ResultStatus

MEMORY = pytest.mark.parametrize("storage", ["memory"], indirect=True)
REMOTE = pytest.mark.parametrize("storage", ["s3", "gcs", "azure"], indirect=True)


@pytest.fixture
def anyio_backend():
    return "asyncio"


def make(storage, **settings) -> AsyncFileBackend:
    return AsyncFileBackend(storage.base_dir, storage.storage_options, environ={}, **settings)


class InFlight:
    """Wraps an async callable: how many calls ran at once (``peak``), and their arguments."""

    def __init__(self, real, delay: float = 0.0) -> None:
        self.real, self.delay = real, delay
        self.now = self.peak = 0
        self.calls: list[tuple] = []

    async def __call__(self, *args, **kwargs):
        self.now += 1
        self.peak = max(self.peak, self.now)
        self.calls.append(args)
        try:
            if self.delay:
                await anyio.sleep(self.delay)
            return await self.real(*args, **kwargs)
        finally:
            self.now -= 1


@MEMORY
@pytest.mark.anyio
async def test_a_worker_claims_every_free_slot_in_one_call(storage):
    async with make(storage) as backend:
        ids = [await backend.enqueue(worker_tasks.add, (i, 1)) for i in range(8)]
        calls = InFlight(backend.queue.dequeue_many)
        backend.queue.dequeue_many = calls
        stats = await backend.worker(concurrency=4, burst=True, idle_timeout=0.3).run()
        assert stats["succeeded"] == 8
        assert calls.calls[0][0] == 4  # the first call asked for all four slots
        for i, task_id in enumerate(ids):
            assert (await backend.result(task_id)).value == i + 1


@REMOTE
@pytest.mark.anyio
async def test_a_batch_claim_on_an_object_store_overlaps_its_claims(storage):
    """Each claim is a read and a create: a batch's claims run at once, not one by one."""
    async with make(storage) as backend:
        queue = backend.queue
        ids = {await backend.enqueue(worker_tasks.add, (i, 1)) for i in range(4)}
        await queue.dequeue_many(1, wait=0)  # the listing is cached: only claims follow
        runs = InFlight(queue.store.run)
        queue.store.run = runs
        got = await queue.dequeue_many(3)
        assert len(got) == 3 and {c.id for c in got} < ids
        # Three claim programs in flight together; on GCS also the delete of the first
        # claim's ready copy, deferred to these claims (``flush_early``).
        assert runs.peak == 3 + (1 if queue.claims.flush_early else 0)
        for claimed in got:
            await queue.ack(claimed)


@MEMORY
@pytest.mark.anyio
async def test_extra_claimers_claim_only_while_there_is_work(storage):
    """While tasks wait, up to ``claimers`` claim calls are in flight; an idle worker polls
    with one, so extra claimers add no requests to an empty queue."""
    async with make(storage) as backend:
        ids = [await backend.enqueue(worker_tasks.async_sleep, (0.02,)) for _ in range(40)]
        calls = InFlight(backend.queue.dequeue_many, delay=0.1)  # a slow store's claim
        backend.queue.dequeue_many = calls
        worker = backend.worker(concurrency=6, claimers=3, poll=0.1, handle_signals=False)
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            with anyio.fail_after(30):
                while worker.stats["succeeded"] < len(ids):
                    await anyio.sleep(0.02)
            busy_peak = calls.peak
            await anyio.sleep(0.5)  # calls that started while there was work have ended
            calls.peak = calls.now
            await anyio.sleep(1.0)  # five polls of an empty queue
            idle_peak = calls.peak
            worker.stop()
        assert busy_peak == 3
        assert idle_peak == 1
        for task_id in ids:
            assert (await backend.result(task_id)).status is ResultStatus.SUCCESS


@MEMORY
@pytest.mark.anyio
async def test_stop_does_not_wait_for_claimers_blocked_on_busy_slots(storage):
    """An extra claimer waiting for a slot is stopped at once: the grace period, not the
    running tasks, bounds the stop (the tasks are released for another worker)."""
    async with make(storage) as backend:
        for _ in range(3):
            await backend.enqueue(worker_tasks.async_sleep, (30.0,))
        worker = backend.worker(
            concurrency=2, claimers=2, poll=0.1, grace=0.2, handle_signals=False
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            with anyio.fail_after(10):
                while len(worker.running) < 2:
                    await anyio.sleep(0.01)
            await anyio.sleep(0.2)  # the second claimer is waiting for a slot now
            with anyio.fail_after(20):
                worker.stop()
                while worker.running:
                    await anyio.sleep(0.05)
        assert worker.stats["released"] == 2
        assert worker.stats["succeeded"] == 0


@MEMORY
def test_claimers_must_be_positive(storage):
    backend = make(storage)
    with pytest.raises(ValueError, match="claimers"):
        backend.worker(claimers=0)


@MEMORY
@pytest.mark.anyio
async def test_a_burst_worker_runs_what_a_helper_claims_while_it_decides_to_stop(storage):
    """A helper's claim in flight when the main loop's last look found nothing: the task is
    run (and the worker goes on), not given back as the worker exits with it ready (seen in
    CI: three burst workers on S3 left a chain's next task behind)."""
    async with make(storage) as backend:
        first = await backend.enqueue(worker_tasks.add, (1, 1))
        second = await backend.enqueue(worker_tasks.add, (2, 1))
        real, last_look = backend.queue.dequeue_many, anyio.Event()
        main_calls = 0

        async def dequeue_many(count, queues, *, wait=None, **kwargs):
            nonlocal main_calls
            if wait == HELPER_WAIT:  # a helper: its claim lands after the main loop's last look
                await last_look.wait()
                await anyio.sleep(0.05)
                return await real(count, queues, wait=wait, **kwargs)
            main_calls += 1
            if main_calls == 1:
                return await real(1, queues, wait=wait, **kwargs)  # the first task only
            if wait == 0.0:
                last_look.set()
            return []  # the main loop never sees the second task

        backend.queue.dequeue_many = dequeue_many
        worker = backend.worker(concurrency=2, claimers=2, burst=True, idle_timeout=0.1)
        stats = await worker.run()
        assert (stats["succeeded"], stats["released"]) == (2, 0)
        assert (await backend.result(first)).value == 2
        assert (await backend.result(second)).value == 3
