"""What a claim lists and how often (issue 13): bounded head listings on every store, one
reaper pass per interval whatever the number of consumers, consumers spread over the head
without breaking priority order, an idle poller's pace kept across calls."""

from __future__ import annotations

import random
import time
from typing import Any

import pytest

from omniq.core import Task, _cloud_listing, codec
from omniq.core.fs import exists, listafter, listdirs, listhead, listtree, write
from omniq.storage.file.queue import _layout as layout
from omniq.storage.file.queue import _queue as queue_module
from queue_helpers import FakeClock, count_scans, make_queue

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_head_listings_are_ordered_and_bounded(storage: Any) -> None:
    """listhead/listafter return names in key order from where they are asked, at most
    ``limit``, files only (not a sub-directory), [] for a missing prefix; listtree the same
    over the sub-directories: the claim's listing on S3, GCS and Azure is one bounded
    request built on these."""
    q = make_queue(storage)
    try:

        def program() -> Any:
            for i in range(30):
                yield write(f"area/a{i:03d}", b"x")
            yield write("area/sub/inner", b"x")
            head = yield listhead("area", 5)
            after = yield listafter("area", "a010", 5)
            tail = yield listafter("area", "a028", 5)
            missing = yield listhead("nothing-here", 5)
            dirs = yield listdirs("area")
            for rank in ("p2", "p1"):
                for i in range(4):
                    yield write(f"tree/{rank}/t{i}", b"x")
            yield write("tree/top", b"x")  # not in a sub-directory: not listed
            yield write("tree/p1/deeper/t9", b"x")  # two levels down: not listed either
            tree = yield listtree("tree", 6)
            whole = yield listtree("tree", 100)
            none = yield listtree("nothing-here", 5)
            return head, after, tail, missing, dirs, tree, whole, none

        head, after, tail, missing, dirs, tree, whole, none = await q.store.run(program())
    finally:
        await q.close()
    assert head == [f"a{i:03d}" for i in range(5)]
    assert after == [f"a{i:03d}" for i in range(11, 16)]
    assert tail == ["a029"]
    assert missing == []
    assert dirs == ["sub"]
    # The head over the sub-directories, the first one's first (a queue's top priority).
    assert tree == [f"p1/t{i}" for i in range(4)] + ["p2/t0", "p2/t1"]
    assert whole == [f"p{r}/t{i}" for r in (1, 2) for i in range(4)]
    assert none == []


async def test_one_reaper_pass_per_interval_whatever_the_consumers(storage: Any) -> None:
    clock = FakeClock()
    consumers = [make_queue(storage, clock=clock, lease=40) for _ in range(4)]
    passes = []
    for q in consumers:
        original = q._reap_queue  # the pass over one storage queue that dequeue makes

        async def counted(queue: str, _original: Any = original) -> Any:
            passes.append(queue)
            return await _original(queue)

        q._reap_queue = counted  # type: ignore[method-assign]
    try:
        for _ in range(3):
            for q in consumers:
                assert await q.dequeue() is None
        assert len(passes) == 1  # not one per consumer
        clock.advance(consumers[0].reap_interval * 1.3)  # past the interval and its jitter
        for q in consumers:
            assert await q.dequeue() is None
        assert len(passes) == 2
    finally:
        for q in consumers:
            await q.close()


async def test_spread_consumers_keep_priority_order_and_claim_each_once(storage: Any) -> None:
    consumers = [make_queue(storage, spread=256) for _ in range(3)]
    try:
        low = [Task(func="m:f", args=[i], priority=-1) for i in range(40)]
        high = [Task(func="m:f", args=[i], priority=5) for i in range(10)]
        await consumers[0].enqueue_many(low + high)
        seen: list[str] = []
        while True:
            got = [await q.dequeue() for q in consumers]
            claimed = [c for c in got if c is not None]
            if not claimed:
                break
            seen += [c.id for c in claimed]
            for c, q in zip(got, consumers, strict=True):
                if c is not None:
                    await q.ack(c)
        assert sorted(seen) == sorted(t.id for t in low + high)  # each exactly once
        assert set(seen[:10]) == {t.id for t in high}  # every high one before any low one
    finally:
        for q in consumers:
            await q.close()


async def test_consumers_spread_over_the_whole_head_one_listing_returns(
    storage: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On an object store the head a claim lists is what one request returns (1,000 names)
    and consumers start anywhere in it (a local directory and memory: among the first 256):
    with the random start at its last place, the first claim is that window's last task."""
    head = 256 if storage.kind in ("memory", "local") else 1000
    q = make_queue(storage)
    try:
        ids = await q.enqueue_many([Task(func="m:f", args=[i]) for i in range(head + 5)])
        monkeypatch.setattr(random, "randrange", lambda n: n - 1)
        claimed = await q.dequeue()
        assert claimed is not None
        assert claimed.id == sorted(ids)[head - 1]
        rest = await q.dequeue()  # walks on from there: the head's first task
        assert rest is not None and rest.id == sorted(ids)[0]
    finally:
        await q.close()


async def test_an_idle_poller_keeps_its_pace_across_calls(storage: Any) -> None:
    q = make_queue(storage, poll_interval=30.0, max_poll_interval=60.0, watch=False)
    looks = count_scans(q)
    try:
        assert await q.dequeue(wait=0.01) is None
        assert len(looks) == 1
        # The next look is 30 s away: short waits return without listing again.
        for _ in range(3):
            assert await q.dequeue(wait=0.01) is None
        assert len(looks) == 1
        # A dequeue without a wait always looks.
        assert await q.dequeue() is None
        assert len(looks) == 2
        # An enqueue through this instance wakes its poller at once.
        task = Task(func="m:f")
        await q.enqueue(task)
        claimed = await q.dequeue(wait=0.01)
        assert claimed is not None and claimed.id == task.id
    finally:
        await q.close()


def test_idle_looks_are_drawn_between_half_the_pause_and_the_pause(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pollers started together must not look at the same moments for ever: each wait is
    drawn from [pause / 2, pause], the pause growing 1.5x per empty look up to the maximum."""
    monkeypatch.setattr(queue_module, "random", random.Random(7))
    idle, pause, gaps = queue_module._Idle(), 0.2, []
    for _ in range(60):
        before = time.monotonic()
        idle.looked(False, 0.2, 2.0)
        after = time.monotonic()
        assert idle.pause == pytest.approx(pause)
        assert idle.next - before >= pause / 2 and idle.next - after <= pause
        gaps.append(idle.next - after)
        pause = min(pause * 1.5, 2.0)
    steady = gaps[10:]
    assert min(steady) < 1.2 and max(steady) > 1.8  # spread over the band, not one period
    idle.looked(True, 0.2, 2.0)
    assert (idle.next, idle.pause) == (0.0, 0.0)  # work found: look again at once


async def test_a_shallow_listing_on_an_object_store_is_listed_again_after_one_miss(
    storage: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Consumers of a shallow queue all list the same few tasks, so a listing goes stale
    fast: on an object store, where each miss costs a read (a lost race two requests more),
    one miss makes the claim list again; a local directory and memory keep trying three."""
    monkeypatch.setattr(random, "randrange", lambda n: 0)  # claims in listing order
    q = make_queue(storage)
    tried: list[list[str]] = []
    claim_picks = q._claim_picks

    async def recording(queue: str, picks: list[Any], *args: Any) -> Any:
        tried.append([c.task_id for c in picks])
        return await claim_picks(queue, picks, *args)

    try:
        ids = sorted(await q.enqueue_many([Task(func="m:f", args=[i]) for i in range(6)]))
        first = await q.dequeue()  # lists all six, claims the first
        assert first is not None and first.id == ids[0]
        async with make_queue(storage) as other:  # takes the other five (close: no copies left)
            taken = [c async for c in _drain(other)]
            assert sorted(c.id for c in taken) == ids[1:]
            late = await other.enqueue(Task(func="m:f", args=[6]))
        monkeypatch.setattr(q, "_claim_picks", recording)
        got = await q.dequeue()  # from its listing: five tasks others took meanwhile
        assert got is not None and got.id == late
        misses = 1 if storage.kind not in ("memory", "local") else 3
        assert tried == [[i] for i in ids[1 : 1 + misses]] + [[late]]
    finally:
        await q.close()


async def test_a_kept_listing_whose_candidate_was_taken_is_listed_again(
    storage: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listing kept from an earlier call is trusted until a candidate of it is found taken
    once it is ``refresh_interval`` old: others claim from the same part of it, and the next
    listing drops their claims. A listing younger than that is trusted for three misses in a
    row (races under way). 16 workers on a deep S3 queue tried tasks claimed 1-10 s before
    (their listings are kept up to ten intervals): 0.15-0.2 misses a task."""
    monkeypatch.setattr(random, "randrange", lambda n: 0)  # claims in listing order
    clock = FakeClock()

    def consumer() -> Any:
        return make_queue(storage, clock=clock, lanes=False, batch=8, spread=8)

    async def others_take(n: int) -> list[str]:
        async with consumer() as other:  # (closed: no spent copy left behind on GCS)
            taken = await other.dequeue_many(n)
            for claimed in taken:
                await other.ack(claimed)
        return sorted(c.id for c in taken)

    q = consumer()
    tried: list[str] = []
    claim_picks = q._claim_picks

    async def recording(queue: str, picks: list[Any], *args: Any) -> Any:
        tried.extend(c.task_id for c in picks)
        return await claim_picks(queue, picks, *args)

    try:
        ids = sorted(await q.enqueue_many([Task(func="m:f", args=[i]) for i in range(12)]))
        first = await q.dequeue()  # lists the first eight, claims the first
        assert first is not None and first.id == ids[0]
        assert await others_take(5) == ids[1:6]
        monkeypatch.setattr(q, "_claim_picks", recording)
        clock.advance(2 * q.refresh_interval)
        got = await q.dequeue()  # one miss in the old listing, then a new listing
        assert got is not None and got.id == ids[6]
        assert tried == [ids[1], ids[6]]
        assert await others_take(3) == ids[7:10]
        tried.clear()
        last = await q.dequeue()  # its listing is new: three misses, then a listing
        assert last is not None and last.id == ids[10]
        assert tried == ids[7:11]
        for claimed in [first, got, last]:
            await q.ack(claimed)
    finally:
        await q.close()


async def _drain(q: Any) -> Any:
    while (claimed := await q.dequeue()) is not None:
        yield claimed


async def _claim_with_a_copy_shown_again(q: Any, tried: list[str]) -> tuple[Any, Any, str]:
    """Three tasks; the first claimed, its ready copy put back by hand (as a listing made
    while the claim was in flight would show it), then ``dequeue_many(3)`` from a new listing
    with every try noted in ``tried``. Returns the first claim, the others and the copy."""
    claim_program = q._claim_program

    def spy(queue: str, cand: Any, *args: Any) -> Any:
        tried.append(cand.task_id)
        return claim_program(queue, cand, *args)

    await q.enqueue_many([Task(func="m:f", args=[i]) for i in range(3)])
    first = await q.dequeue()
    assert first is not None
    copy = layout.ready_key(first.queue, first.task.priority, first.id, first.attempt)
    await q.store.run(_put_back(copy, first.task))
    q._claim_program = spy
    q._cache.clear()  # a new listing, which shows the copy again
    return first, await q.dequeue_many(3), copy


def _put_back(copy: str, task: Task) -> Any:
    yield write(copy, codec.encode(task))


def _left(copy: str) -> Any:
    return (yield exists(copy))


async def test_a_queue_object_does_not_try_a_task_again_soon_after_its_own_try(
    remote_storage: Any,
) -> None:
    """On an object store a listing made while another call of the same object has claims
    in flight (or before their ready copies are deleted) shows those tasks again, and a try
    costs requests: they are left out for two ``refresh_interval``s."""
    clock = FakeClock()
    q = make_queue(remote_storage, clock=clock, lanes=False)
    tried: list[str] = []
    try:
        first, got, copy = await _claim_with_a_copy_shown_again(q, tried)
        assert len(got) == 2 and first.id not in tried
        for claimed in [first, *got]:
            await q.ack(claimed)

        clock.advance(2.5)
        await q.store.run(_put_back(copy, first.task))  # (GCS: the deferred delete removed it)
        q._cache.clear()
        assert await q.dequeue() is None  # tried now, lost to the claim (S3, Azure: dropped
        if remote_storage.kind == "gcs":  # by the listing's claim check before a try)
            assert first.id in tried
        else:
            assert first.id not in tried
        assert not await q.store.run(_left(copy))  # and removed
    finally:
        await q.close()


@pytest.mark.parametrize("storage", ["memory", "local"], indirect=True)
async def test_a_local_queue_object_keeps_no_record_of_its_tries(storage: Any) -> None:
    """Locally a try of a task taken meanwhile is one failed system call, less than noting
    every try (a drain of 100,000 tasks on tmpfs held ~15,000 noted keys at a time): a copy
    shown again is tried at once, found taken, and removed."""
    q = make_queue(storage, clock=FakeClock(), lanes=False)
    tried: list[str] = []
    try:
        first, got, copy = await _claim_with_a_copy_shown_again(q, tried)
        assert len(got) == 2 and first.id in tried
        assert not q._picked
        assert not await q.store.run(_left(copy))
        for claimed in [first, *got]:
            await q.ack(claimed)
    finally:
        await q.close()


@pytest.mark.parametrize("storage", ["s3", "gcs", "azure"], indirect=True)
async def test_a_claim_listing_reads_the_ready_head_in_one_request(storage: Any) -> None:
    """The head of ``ready/`` over its priority directories is one flat listing: a refresh
    of a queue with two priorities is that, the head of ``due/`` and on S3 and Azure the
    look at ``run/`` (before: a listing of the priority directories, then one of each)."""
    from test_listing import http_requests

    q = make_queue(storage)
    try:
        await q.enqueue_many([Task(func="m:f", priority=p) for p in (0, 5, 5)])
        with http_requests() as made:
            found = await q.store.run(q._scan_program("default"))
        assert len(found) == 3
        assert len(made) == (2 if q.store.kind == "gcs" else 3), made
    finally:
        await q.close()


def _listafter(prefix: str, after: str, limit: int) -> Any:
    return (yield listafter(prefix, after, limit))


@pytest.mark.parametrize("storage", ["s3", "gcs", "azure"], indirect=True)
async def test_names_after_one_deep_in_a_prefix_are_one_request(
    storage: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``listafter`` from a name deep in a prefix starts there: S3 ``StartAfter``, GCS
    ``startOffset``, Azure ``startFrom`` (before: pages of ``limit`` from the prefix's start,
    six here)."""
    from test_listing import http_requests

    q = make_queue(storage)
    try:
        for i in range(30):
            await q.store.write(f"area/a{i:03d}", b"x")
        for after in ("a020", "a0205"):  # a name listed, a name between two
            with http_requests() as made:
                names = await q.store.run(_listafter("area", after, 5))
            assert names == [f"a{i:03d}" for i in range(21, 26)]
            assert len(made) == 1, made
        if storage.kind == "azure":  # an SDK without startFrom: the same names, more pages
            monkeypatch.setattr(_cloud_listing, "azure_starts_from", lambda: False)
            with http_requests() as made:
                names = await q.store.run(_listafter("area", "a020", 5))
            assert names == [f"a{i:03d}" for i in range(21, 26)]
            assert len(made) == 6, made
    finally:
        await q.close()
