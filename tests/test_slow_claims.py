"""Claims whose requests were slow (delayed or retried through an outage): the claimer starts
what it holds instead of claiming more, renews nearly spent leases at once before it hands
them out, judges every claim again after a slow renewal, and the worker's first heartbeat
comes before what is left of the lease runs out (the CI's network-fault test on
S3 and GCS found claims handed out, or dropped, with their lease spent by a sibling's
requests)."""

from __future__ import annotations

import time
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import anyio
import pytest

from omniq.backend.file._heartbeats import Heartbeats
from omniq.core import Claimed, StorageError, Task
from queue_helpers import FakeClock, make_queue

pytestmark = pytest.mark.anyio

LEASE = 30.0
LOCAL = pytest.mark.parametrize("storage", ["memory", "local"], indirect=True)
QUICK = pytest.mark.parametrize(
    "storage", ["memory", "local", pytest.param("s3", marks=pytest.mark.emulator)], indirect=True
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def left(claimed: Claimed, clock: FakeClock) -> float:
    return claimed.lease_until.timestamp() - clock()


@QUICK
async def test_a_claimer_holding_an_aged_claim_starts_it_instead_of_claiming_more(
    storage: Any,
) -> None:
    clock = FakeClock()
    q = make_queue(storage, clock=clock, lease=LEASE)
    rounds: list[int] = []
    original = q._claim_picks

    async def slow(queue: str, picks: list[Any], lease: float, worker: str) -> list[Any]:
        # One pick lands, one was lost to "another consumer" (the rest were not tried); the
        # round took half the lease (requests delayed through an outage).
        got = await original(queue, picks[:1], lease, worker)
        rounds.append(len(picks))
        clock.advance(LEASE / 2)
        return [*got, None]

    q._claim_picks = slow  # type: ignore[method-assign]
    try:
        await q.enqueue_many([Task(func="m:f", args=[i]) for i in range(8)])
        got = await q.dequeue_many(4)
        assert len(rounds) == 1, rounds  # no second round while the first claim waits
        assert len(got) == 1
        assert left(got[0], clock) >= LEASE / 3
    finally:
        await q.close()


@QUICK
async def test_stale_claims_are_renewed_at_once(storage: Any) -> None:
    """Two claims back with their lease nearly spent: both renewals are in flight together
    (one after the other, a slow first renewal spends the second's lease)."""
    clock = FakeClock()
    q = make_queue(storage, clock=clock, lease=LEASE)
    entered = 0
    both = anyio.Event()
    original = q.extend_lease

    async def renew(claimed: Claimed, seconds: float | None = None, **kw: Any) -> Claimed:
        nonlocal entered
        entered += 1
        if entered == 2:
            both.set()
        await both.wait()
        return await original(claimed, seconds, **kw)

    q.extend_lease = renew  # type: ignore[method-assign]
    try:
        await q.enqueue_many([Task(func="m:f", args=[i]) for i in range(2)])
        claims = await q.dequeue_many(2)
        assert len(claims) == 2
        clock.advance(LEASE * 0.8)
        with anyio.fail_after(10):
            fresh = await q._fresh(claims, LEASE)
        assert [c.id for c in fresh] == [c.id for c in claims]
        assert all(left(c, clock) > LEASE * 0.9 for c in fresh)
    finally:
        await q.close()


@LOCAL
async def test_a_claim_judged_fresh_is_judged_again_after_a_slow_renewal(storage: Any) -> None:
    clock = FakeClock()
    q = make_queue(storage, clock=clock, lease=LEASE)
    original = q.extend_lease
    renewed: list[str] = []

    async def slow(claimed: Claimed, seconds: float | None = None, **kw: Any) -> Claimed:
        out = await original(claimed, seconds, **kw)
        renewed.append(claimed.id)
        if len(renewed) == 1:
            clock.advance(LEASE / 2)  # the first renewal's requests were delayed
        return out

    try:
        await q.enqueue(Task(func="m:f", args=[1], id="early"))
        early = await q.dequeue()
        clock.advance(LEASE / 2)
        await q.enqueue(Task(func="m:f", args=[2], id="late"))
        late = await q.dequeue()
        assert early is not None and late is not None
        clock.advance(LEASE / 4)  # early: a quarter of its lease left (stale); late: 3/4
        q.extend_lease = slow  # type: ignore[method-assign]
        fresh = await q._fresh([late, early], LEASE)
        assert renewed == ["early", "late"]
        assert [c.id for c in fresh] == ["late", "early"]
        assert all(left(c, clock) >= LEASE / 3 for c in fresh), [left(c, clock) for c in fresh]
    finally:
        await q.close()


@LOCAL
async def test_a_stale_claim_taken_over_meanwhile_is_dropped_and_logged(
    storage: Any, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    holder = make_queue(storage, clock=clock, lease=LEASE, clock_skew=1.0)
    reaper = make_queue(storage, clock=clock, lease=LEASE, clock_skew=1.0)
    try:
        await holder.enqueue(Task(func="m:f", id="t1"))
        claimed = await holder.dequeue()
        assert claimed is not None
        clock.advance(LEASE + 2)
        assert [c.id for c in await reaper.reap()] == ["t1"]
        with caplog.at_level("WARNING", logger="omniq.queue"):
            assert await holder._fresh([claimed], LEASE) == []
        assert "task t1: claim lost before it started (attempt 1)" in caplog.text
        again = await reaper.dequeue()
        assert again is not None and again.attempt == 2
    finally:
        await holder.close()
        await reaper.close()


@pytest.mark.parametrize(
    ("left", "due_within"),
    [(LEASE, LEASE / 3), (LEASE * 0.4, LEASE * 0.2), (-1.0, 0.0)],
    ids=["full-lease", "lease-partly-spent", "lease-spent"],
)
def test_the_first_heartbeat_comes_half_way_through_what_is_left(
    left: float, due_within: float
) -> None:
    """A claim handed out with part of its lease spent (its requests were slow) gets its
    first heartbeat half-way through what is left, not a third of a full lease later (by
    then it could have expired and been taken over)."""
    beats = Heartbeats(SimpleNamespace(lease=LEASE, progress_interval=1.0))
    claimed = SimpleNamespace(remaining=lambda: timedelta(seconds=left))
    before = time.monotonic()
    held = beats.hold({"claimed": claimed}, SimpleNamespace())  # type: ignore[arg-type]
    after = time.monotonic()
    assert before + due_within <= held.next_beat <= after + due_within


@LOCAL
async def test_a_slow_second_queue_does_not_age_the_claims_of_the_first(storage: Any) -> None:
    clock = FakeClock()
    q = make_queue(storage, clock=clock, lease=LEASE)
    tried: list[str] = []
    scan, picks = q._scan_program, q._claim_picks

    def slow_scan(queue: str) -> Any:
        if queue == "b":
            clock.advance(LEASE / 2)  # listing b took half a lease
        return scan(queue)

    async def record(queue: str, *args: Any) -> Any:
        tried.append(queue)
        return await picks(queue, *args)

    q._scan_program = slow_scan  # type: ignore[method-assign]
    q._claim_picks = record  # type: ignore[method-assign]
    try:
        await q.enqueue(Task(func="m:f", queue="a", id="a1"))
        await q.enqueue_many([Task(func="m:f", queue="b") for _ in range(4)])
        got = await q.dequeue_many(4, ["a", "b"])
        assert [c.id for c in got] == ["a1"]
        assert tried == ["a"]  # no claim round on b once a's claim had aged
    finally:
        await q.close()


@LOCAL
async def test_claims_in_hand_are_handed_out_when_a_later_step_fails(
    storage: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A storage error after some claims were made (a later claim round, or the next
    queue's listing) hands out what was claimed: raising would strand those claims until
    their lease ran out."""
    q = make_queue(storage, lease=LEASE)
    calls = 0
    picks, scan = q._claim_picks, q._scan_program

    async def fail_second(queue: str, chosen: list[Any], *args: Any) -> list[Any]:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise StorageError("the store went away")
        return await picks(queue, chosen[:1], *args)  # one claimed, the others not tried

    def fail_on_c(queue: str) -> Any:
        if queue == "c":
            raise StorageError("listing c failed")
        return scan(queue)

    q._claim_picks = fail_second  # type: ignore[method-assign]
    q._scan_program = fail_on_c  # type: ignore[method-assign]
    try:
        await q.enqueue_many([Task(func="m:f", queue="a") for _ in range(8)])
        await q.enqueue(Task(func="m:f", queue="c"))
        with caplog.at_level("WARNING", logger="omniq.queue"):
            got = await q.dequeue_many(4, ["a"])
            assert len(got) == 1  # round 2 failed: round 1's claim is handed out
            assert (
                "claiming from a stopped after an error: StorageError: the store went away"
                in caplog.text
            )
            q._claim_picks = picks  # type: ignore[method-assign]
            got = await q.dequeue_many(8, ["a", "c"])
            assert len(got) == 7  # the rest of a, then listing c failed
            assert (
                "claiming from c stopped after an error: StorageError: listing c failed"
                in caplog.text
            )
        with pytest.raises(StorageError):  # nothing claimed: the error is the caller's
            await q.dequeue_many(1, ["c"])
    finally:
        await q.close()


@LOCAL
async def test_a_claim_whose_lease_ran_out_through_slow_renewals_is_not_handed_out(
    storage: Any, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    q = make_queue(storage, clock=clock, lease=LEASE)
    original = q.extend_lease

    async def very_slow(claimed: Claimed, seconds: float | None = None, **kw: Any) -> Claimed:
        out = await original(claimed, seconds, **kw)
        clock.advance(LEASE * 2)  # renewed, but the answer came after the new lease ended
        return out

    try:
        await q.enqueue(Task(func="m:f", id="t1"))
        claimed = await q.dequeue()
        assert claimed is not None
        clock.advance(LEASE * 0.9)
        q.extend_lease = very_slow  # type: ignore[method-assign]
        with caplog.at_level("WARNING", logger="omniq.queue"):
            assert await q._fresh([claimed], LEASE) == []
        assert "task t1: its lease ran out before it started (attempt 1)" in caplog.text
    finally:
        await q.close()


async def test_a_held_claim_with_little_lease_left_wakes_the_heartbeat_loop() -> None:
    """The loop may be asleep for a third of a lease when a claim with less left comes in:
    holding it wakes the loop, which beats half-way through what is left."""
    beat = anyio.Event()

    async def extend_lease(claimed: Any, seconds: float, **kw: Any) -> Any:
        beat.set()
        return claimed

    worker = SimpleNamespace(
        lease=LEASE, progress_interval=1.0, queue=SimpleNamespace(extend_lease=extend_lease)
    )
    beats = Heartbeats(worker)
    ctx = SimpleNamespace(_pending=lambda: False, _take=lambda: (None, None, False))
    claimed = SimpleNamespace(id="t1", remaining=lambda: timedelta(seconds=1.0))
    async with anyio.create_task_group() as tg:
        await tg.start(beats.run)
        await anyio.sleep(0.05)  # the loop sleeps now, for up to LEASE / 3 (10 s)
        held = beats.hold({"claimed": claimed}, ctx)  # type: ignore[arg-type]
        with anyio.fail_after(5):  # due after 0.5 s; without a wake-up after 10 s
            await beat.wait()
        await beats.release(held)
        tg.cancel_scope.cancel()
