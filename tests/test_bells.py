"""Bells (issue 13 target 7, docs/queue.md "Bells"): what adds a task rings its queue's bell,
at most once a second per queue object, and an idle consumer that polls lists a queue only
when its bell or a due time says something may have been added since it found it empty, and
at least once every 60 ``refresh_interval``s. Real seconds: the ring throttle is a constant
of the protocol (``_bells.THROTTLE``), measured on monotonic clocks."""

from __future__ import annotations

import logging
import time
from collections.abc import Generator
from datetime import timedelta
from typing import Any

import anyio
import pytest

from omniq.core import Task, encode
from omniq.core.errors import StorageError
from omniq.core.fs import Op, read
from omniq.core.models import utcnow
from omniq.storage.file.queue import AsyncFileQueue, _bells
from omniq.storage.file.queue import _layout as layout
from queue_helpers import FakeClock, count_scans, make_queue

pytestmark = pytest.mark.anyio

QUEUE = "jobs"
# Polls (no inotify) every 10-20 ms; a queue is listed at least every 60 x 0.05 = 3 s.
FAST = {
    "bells": True,
    "watch": False,
    "poll_interval": 0.01,
    "max_poll_interval": 0.02,
    "refresh_interval": 0.05,
}
# The tests that take seconds of waiting run on memory, local and one object store; the
# stores differ in the requests, which the others exercise on all five.
SLOW = pytest.mark.parametrize("storage", ["memory", "local", "s3"], indirect=True)
# Listed at least every 30 s: what such a consumer finds within a few seconds, its bells or
# its due times found, not the fallback.
NO_FALLBACK = {**FAST, "refresh_interval": 0.5}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def bell(q: AsyncFileQueue, name: str = QUEUE) -> bytes | None:
    def program() -> Any:
        return (yield read(layout.bell_key(name)))

    return await q.store.run(program())


async def each_look_lists(q: AsyncFileQueue, scans: list[str], looks: int) -> None:
    """``looks`` waiting looks, each after ``refresh_interval``, list ``QUEUE`` each time: no
    bell says they need not. Counted by looks, not within a time: a slow store lists less
    often in a second."""
    for look in range(1, looks + 1):
        await anyio.sleep(FAST["refresh_interval"] * 1.2)
        assert await q.dequeue(QUEUE, wait=FAST["max_poll_interval"] * 1.5) is None
        assert len(scans) >= look


async def settle(q: AsyncFileQueue, queue: str = QUEUE) -> None:
    """Poll until a stretch of looks lists nothing: the queue was found empty a throttle after
    its bell was heard (on a slow store that takes more than one throttle)."""
    scan, listed = q._scan_program, []

    def counted(name: str) -> Any:
        listed.append(name)
        return scan(name)

    q._scan_program = counted  # type: ignore[method-assign]
    try:
        deadline = time.monotonic() + 15.0
        while time.monotonic() < deadline:
            listed.clear()
            assert await q.dequeue(queue, wait=0.3) is None
            if not listed:
                return
        raise AssertionError(f"{queue} still listed at every look after 15 s")
    finally:
        q._scan_program = scan  # type: ignore[method-assign]


def failing_bells(program: Generator[Op, Any, Any]) -> Generator[Op, Any, Any]:
    """``program`` with every read or write of a bell failing as an unreachable store would."""
    try:
        op = next(program)
        while True:
            keys = op.args[0] if op.name == "read_many" else [op.args[0]]
            if op.name in ("write", "read_many") and any("/bell/" in str(k) for k in keys):
                op = program.throw(StorageError("bell unreachable"))
            else:
                op = program.send((yield op))
    except StopIteration as done:
        return done.value


async def test_an_idle_consumer_lists_again_only_when_the_bell_rings(storage: Any) -> None:
    async with make_queue(storage, **FAST) as q, make_queue(storage, bells=True) as producer:
        await settle(q)
        scans = count_scans(q)
        assert await q.dequeue(QUEUE, wait=0.5) is None
        assert scans == []  # ~30 looks, each one read of the bell

        before = await bell(q)
        await producer.enqueue(Task(func="m:f", id="t1", queue=QUEUE))
        assert await bell(q) != before
        claimed = await q.dequeue(QUEUE, wait=5.0)
        assert claimed is not None and claimed.id == "t1"
        assert scans  # the ring made it list
        await q.ack(claimed)


@SLOW
async def test_a_consumer_that_found_work_lately_reads_no_bell(storage: Any) -> None:
    # Looks 10 ms apart at first, growing 1.5x per empty one to 0.5 s (about 1 s from work).
    async with make_queue(storage, **{**FAST, "max_poll_interval": 0.5}) as q:
        assert q.bells is not None
        listens: list[list[str]] = []
        listen = q.bells.listen
        q.bells.listen = lambda names: (listens.append(names), listen(names))[1]  # type: ignore[method-assign]
        await q.enqueue(Task(func="m:f", id="work", queue=QUEUE))
        claimed = await q.dequeue(QUEUE, wait=5.0)
        assert claimed is not None
        await q.ack(claimed)
        assert await q.dequeue(QUEUE, wait=0.1) is None
        assert listens == []  # a few empty looks: listed, no bell read
        assert await q.dequeue(QUEUE, wait=5.0) is None
        assert listens  # idle: bells


async def test_a_queue_without_bells_lists_at_every_look(storage: Any) -> None:
    async with make_queue(storage, **{**FAST, "bells": False}) as q:
        assert await q.dequeue(QUEUE, wait=1.3) is None
        scans = count_scans(q)
        await each_look_lists(q, scans, 5)
        assert await bell(q) is None


@SLOW
async def test_a_task_added_within_the_throttle_without_a_ring_is_found(
    storage: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_bells, "THROTTLE", 3.0)  # (both sides) the second enqueue falls in it
    async with make_queue(storage, **NO_FALLBACK) as q, make_queue(storage, bells=True) as producer:
        await settle(q)
        await producer.enqueue(Task(func="m:f", id="first", queue=QUEUE))
        rung = await bell(q)
        claimed = await q.dequeue(QUEUE, wait=5.0)
        assert claimed is not None and claimed.id == "first"
        assert await q.dequeue(QUEUE, wait=0.1) is None  # found empty since the ring was heard
        await producer.enqueue(Task(func="m:f", id="second", queue=QUEUE))
        assert await bell(q) == rung  # the producer rang less than THROTTLE ago: not again
        # Listed again once THROTTLE has passed since the ring was heard.
        claimed = await q.dequeue(QUEUE, wait=2 * _bells.THROTTLE + 3.0)
        assert claimed is not None and claimed.id == "second"


@SLOW
async def test_a_delayed_task_is_claimed_at_its_due_time_without_a_ring(storage: Any) -> None:
    async with make_queue(storage, **NO_FALLBACK) as q, make_queue(storage, bells=True) as producer:
        await settle(q)
        eta = utcnow() + timedelta(seconds=5.0)
        await producer.enqueue(Task(func="m:f", id="later", queue=QUEUE, eta=eta))
        await settle(q)  # heard, listed: the marker is not due
        assert utcnow() < eta
        scans = count_scans(q)
        assert await q.dequeue(QUEUE, wait=0.3) is None
        assert scans == []  # quiet until the due time it noted
        claimed = await q.dequeue(QUEUE, wait=10.0)
        assert claimed is not None and claimed.id == "later"
        assert claimed.task.eta is not None and utcnow() >= claimed.task.eta


@SLOW
async def test_a_task_of_a_producer_without_bells_waits_for_the_fallback(storage: Any) -> None:
    async with make_queue(storage, **FAST) as q, make_queue(storage, bells=False) as old:
        await settle(q)
        await old.enqueue(Task(func="m:f", id="unrung", queue=QUEUE))
        assert await q.dequeue(QUEUE, wait=0.3) is None  # nothing rang
        claimed = await q.dequeue(QUEUE, wait=8.0)  # listed anyway within 60 x 0.05 s
        assert claimed is not None and claimed.id == "unrung"


async def test_a_listing_that_found_something_is_not_taken_for_empty(storage: Any) -> None:
    # Listed at least every 60 x 0.02 s.
    async with make_queue(storage, **{**FAST, "refresh_interval": 0.02}) as q:
        await settle(q)
        task = Task(func="m:f", queue=QUEUE)  # written by a newer OmniQ: listed, left alone
        raw = encode(task).replace(b'"v":1', b'"v":99')
        await q.store.write(f"{QUEUE}/ready/p0999/{task.id}.1.json", raw)
        assert await q.dequeue(QUEUE, wait=2.0) is None  # listed by the fallback
        scans = count_scans(q)
        assert await q.dequeue(QUEUE, wait=0.5) is None  # (the next fallback: 1.2 s on)
        assert scans  # listed at every look: its last listing was not empty


@SLOW
async def test_an_expired_lease_is_taken_over_while_the_bells_are_quiet(storage: Any) -> None:
    async with (
        make_queue(storage, **NO_FALLBACK, lease=4.0, clock_skew=0.0) as q,
        make_queue(storage, bells=True, lease=4.0, clock_skew=0.0) as dead,
    ):
        await settle(q)
        await dead.enqueue(Task(func="m:f", id="stranded", queue=QUEUE))
        held = await dead.dequeue(QUEUE)
        assert held is not None  # its holder stops here: never acked, never extended
        await settle(q)  # heard the ring, found nothing claimable: quiet
        claimed = await q.dequeue(QUEUE, wait=8.0)
        assert claimed is not None and claimed.id == "stranded" and claimed.attempt == 2


@SLOW
async def test_a_quiet_consumer_still_withdraws_its_claim_lane(storage: Any) -> None:
    clock = FakeClock()  # the lanes' clock; bells measure on the monotonic one
    async with make_queue(storage, **FAST, lanes=True, clock=clock) as q:
        await q.enqueue(Task(func="m:f", id="warm", queue=QUEUE))
        claimed = await q.dequeue(QUEUE)
        assert claimed is not None
        await q.ack(claimed)
        assert await q.dequeue(QUEUE) is None  # busy: writes its lane entry
        await settle(q)
        lanes = layout.lanes_dir(QUEUE)
        assert len(await q.store.listdir(lanes)) == 1
        clock.advance(11)  # idle for a lanes period (10 x refresh_interval = 0.5 s) and more
        assert await q.dequeue(QUEUE, wait=0.3) is None
        assert await q.store.listdir(lanes) == []


async def test_a_sharded_queue_idles_on_one_bell(storage: Any) -> None:
    shards = {QUEUE: 4}
    async with (
        make_queue(storage, **FAST, shards=shards) as q,
        make_queue(storage, bells=True, shards=shards) as producer,
    ):
        await settle(q)
        scans = count_scans(q)
        assert await q.dequeue(QUEUE, wait=0.5) is None
        assert scans == []  # five storage queues, none listed
        tasks = [Task(func="m:f", id=f"t{i}", queue=QUEUE) for i in range(8)]
        await producer.enqueue_many(tasks)
        got = []
        while len(got) < len(tasks):
            claimed = await q.dequeue(QUEUE, wait=5.0)
            assert claimed is not None
            got.append(claimed.id)
        assert sorted(got) == sorted(t.id for t in tasks)
        assert await bell(q, f"{QUEUE}.shard000") is None  # one bell, under the queue's name
        async with make_queue(storage, bells=True) as plain:  # without the shard setting
            before = await bell(q)
            await plain.enqueue(Task(func="m:f", id="direct", queue=f"{QUEUE}.shard001"))
            assert await bell(q) != before  # rings the queue's bell all the same
        claimed = await q.dequeue(QUEUE, wait=5.0)
        assert claimed is not None and claimed.id == "direct"


async def test_an_unreadable_bell_lists_every_look_and_a_failed_ring_fails_nothing(
    storage: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="omniq.queue")
    async with make_queue(storage, **FAST) as q, make_queue(storage, bells=True) as producer:
        await settle(q)
        assert q.bells is not None and producer.bells is not None
        listen, ring = q.bells.listen, producer.bells.ring
        q.bells.listen = lambda names: failing_bells(listen(names))  # type: ignore[method-assign]
        scans = count_scans(q)
        await each_look_lists(q, scans, 3)  # nothing known: listed as without bells

        q.bells.listen = listen  # type: ignore[method-assign]
        await settle(q)
        producer.bells.ring = lambda names: failing_bells(ring(names))  # type: ignore[method-assign]
        before = await bell(q)
        assert await producer.enqueue(Task(func="m:f", id="quiet", queue=QUEUE)) == "quiet"
        assert await bell(q) == before
        warned = [r for r in caplog.records if "could not ring the bell" in r.getMessage()]
        assert [r.levelno for r in warned] == [logging.WARNING]  # said (once a bell)
        producer.bells.ring = ring  # type: ignore[method-assign]
        await anyio.sleep(0.1)
        # Not throttled by the failed ring: the next enqueue rings.
        await producer.enqueue(Task(func="m:f", id="loud", queue=QUEUE))
        assert await bell(q) != before
        got = set()
        for _ in range(2):
            claimed = await q.dequeue(QUEUE, wait=5.0)
            assert claimed is not None
            got.add(claimed.id)
        assert got == {"quiet", "loud"}
