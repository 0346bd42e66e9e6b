"""Claim lanes (issue 13, docs/queue.md "Many consumers of one queue"): consumers busy
claiming from a queue announce themselves under ``{queue}/lanes/``, and each claims the tasks
whose id hashes to its own lane first. Lanes only choose among listed tasks: a call that does
not wait takes anything listed, no task waits on another lane's owner for long, and a claim
is still the storage's exclusive create."""

from __future__ import annotations

import zlib
from collections import Counter
from typing import Any

import msgspec
import pytest

from omniq.core import Task
from omniq.core.errors import StorageError
from omniq.core.fs import delete, listhead, write
from omniq.core.models import id_text
from omniq.storage.file.queue import AsyncFileQueue
from omniq.storage.file.queue import _layout as layout
from omniq.storage.file.queue._lanes import Lanes, lane_of
from queue_helpers import FakeClock, count_scans, make_queue

pytestmark = pytest.mark.anyio

QUEUE = "jobs"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def tasks(n: int, at: float) -> list[Task]:
    """``n`` tasks whose ids carry the time ``at`` (epoch seconds): their age to the lanes."""
    ms = int(at * 1000)
    return [
        Task(func="m:f", args=[i], id=id_text(ms << 80 | i << 40 | 7), queue=QUEUE)
        for i in range(n)
    ]


async def entries(q: AsyncFileQueue) -> list[str]:
    def program() -> Any:
        return (yield listhead(layout.lanes_dir(QUEUE), 100))

    return await q.store.run(program())


async def make_busy(q: AsyncFileQueue, tag: str) -> None:
    """A claim made by ``q``: it is busy at ``QUEUE`` from now."""
    await q.enqueue(Task(func="m:f", id=f"warm-{tag}", queue=QUEUE))
    claimed = await q.dequeue(QUEUE)
    assert claimed is not None and claimed.id == f"warm-{tag}"
    await q.ack(claimed)


async def test_busy_consumers_take_one_lane_each_and_claim_from_it_first(storage: Any) -> None:
    clock = FakeClock()
    consumers = [make_queue(storage, lanes=True, clock=clock) for _ in range(3)]
    try:
        for i, q in enumerate(consumers):
            await make_busy(q, str(i))
        for q in consumers:  # each writes its entry and lists the others written so far
            assert await q.dequeue(QUEUE) is None
        assert len(await entries(consumers[0])) == 3
        assert consumers[0].lanes is not None and consumers[0].lanes.lane(QUEUE) is None  # alone
        clock.advance(1.5)  # a newcomer looks again a second later: all see all
        for q in consumers:
            assert await q.dequeue(QUEUE) is None
        lanes = [q.lanes.lane(QUEUE) for q in consumers if q.lanes is not None]
        assert sorted(lanes) == [(0, 3), (1, 3), (2, 3)]

        batch = tasks(90, clock())
        per_lane = Counter(lane_of(t.id, 3) for t in batch)
        assert min(per_lane.values()) >= 6  # every lane holds more than a claim
        await consumers[0].enqueue_many(batch)
        for q, (own, _) in zip(consumers, lanes, strict=True):
            got = await q.dequeue_many(5, QUEUE)  # without waiting: its own lane first
            assert len(got) == 5
            assert [lane_of(c.id, 3) for c in got] == [own] * 5
            for claimed in got:
                await q.ack(claimed)
    finally:
        for q in consumers:
            await q.close()


async def lanes_of_two(storage: Any, clock: FakeClock) -> tuple[AsyncFileQueue, AsyncFileQueue]:
    a, b = (make_queue(storage, lanes=True, clock=clock) for _ in range(2))
    await make_busy(a, "a")
    await make_busy(b, "b")
    for q in (a, b, a):  # the first to look saw only itself: it looks again
        clock.advance(1.5)
        assert await q.dequeue(QUEUE) is None
    assert a.lanes is not None and b.lanes is not None
    assert {a.lanes.lane(QUEUE), b.lanes.lane(QUEUE)} == {(0, 2), (1, 2)}
    return a, b


def own_lane(q: AsyncFileQueue) -> int:
    assert q.lanes is not None
    lane = q.lanes.lane(QUEUE)
    assert lane is not None
    return lane[0]


async def test_a_waiting_call_leaves_another_lanes_new_tasks_to_it_for_a_second(
    storage: Any,
) -> None:
    clock = FakeClock()
    a, b = await lanes_of_two(storage, clock)
    try:
        batch = tasks(20, clock())
        await a.enqueue_many(batch)
        mine = {t.id for t in batch if lane_of(t.id, 2) == own_lane(b)}
        assert mine and len(mine) < len(batch)
        seen = []
        while (claimed := await b.dequeue(QUEUE, wait=0.01)) is not None:  # its own lane
            seen.append(claimed.id)
            await b.ack(claimed)
        assert sorted(seen) == sorted(mine)
        claimed = await b.dequeue(QUEUE)  # a call that does not wait takes what is listed
        assert claimed is not None and claimed.id not in mine
        seen.append(claimed.id)
        await b.ack(claimed)
        scans = count_scans(b)
        b._idle.clear()  # (the empty look above paced the next one 0.1-0.2 s later)
        # A waiting call with the impatient call's listing in hand: it leaves what is not
        # its own and less than a second old, lists again, and finds nothing it may take.
        assert await b.dequeue(QUEUE, wait=0.01) is None
        assert scans and set(scans) == {QUEUE}
        clock.advance(1.1)  # ripe: b, with none of its own left, takes them
        # (at its next look: an empty look paces a poller's next one, 0.1-0.2 s later)
        while (claimed := await b.dequeue(QUEUE, wait=0.5)) is not None:
            seen.append(claimed.id)
            await b.ack(claimed)
        assert sorted(seen) == sorted(t.id for t in batch)  # each once
    finally:
        await a.close()
        await b.close()


async def test_another_lanes_overdue_tasks_go_beside_ones_own(storage: Any) -> None:
    clock = FakeClock()
    a, b = await lanes_of_two(storage, clock)
    try:
        old, new = tasks(20, clock() - 11), tasks(20, clock())
        await a.enqueue_many(old + new)
        got = await b.dequeue_many(40, QUEUE, wait=0.01)
        expected = old + [t for t in new if lane_of(t.id, 2) == own_lane(b)]
        assert sorted(c.id for c in got) == sorted(t.id for t in expected)
        assert any(lane_of(t.id, 2) != own_lane(b) for t in old)
        for claimed in got:
            await b.ack(claimed)
    finally:
        await a.close()
        await b.close()


async def test_a_listing_in_hand_is_ordered_again_when_the_lanes_change(storage: Any) -> None:
    """A consumer's listing is ordered for the lanes it saw; when a look finds another list
    of consumers (one joined), its next claims come from its new lane, not from the old
    order (whose first candidates are now others', and their owners miss them)."""
    clock = FakeClock()
    a, b = await lanes_of_two(storage, clock)
    c = make_queue(storage, lanes=True, clock=clock)
    try:
        await make_busy(c, "c")  # (no look yet: that comes with its next claim call)
        # (c's spent copy deleted now, not at its next claim call, GCS: a's listing would show
        # it, a's claim of it would miss, and after a miss a listing a second old is stale)
        await c.store.run(c.claims.flush())
        batch = tasks(120, clock())
        await a.enqueue_many(batch)
        first = await a.dequeue_many(1, QUEUE)  # lists (ordered for two lanes) and claims
        assert [lane_of(t.id, 2) for t in first] == [own_lane(a)]
        # c's first look writes its entry (no claim: a claim of a task in a's listing would
        # make a miss there, after which a lists again).
        assert c.lanes is not None
        await c.store.run(c.lanes.look(QUEUE, clock()))
        clock.advance(5)  # a's look is due; its listing (one claim made) is not stale yet
        scans = count_scans(a)
        got = await a.dequeue_many(6, QUEUE)
        assert scans == []  # the same listing
        assert a.lanes is not None and a.lanes.lane(QUEUE) is not None
        assert a.lanes.lane(QUEUE)[1] == 3
        assert [lane_of(t.id, 3) for t in got] == [own_lane(a)] * 6
        for claimed in [*first, *got]:
            await a.ack(claimed)
    finally:
        for q in (a, b, c):
            await q.close()


async def test_a_look_that_changes_the_lane_brings_the_next_one_a_ripe_later(
    storage: Any,
) -> None:
    """Consumers learn of a newcomer at their own next look, up to ``period`` apart once
    their pace has grown, and until all have looked two may own one lane (16 workers on a
    deep S3 queue saw 5, 11, 15, then 16 lanes). A consumer whose lane changed looks again
    ``ripe`` later, then backs off again while its view holds."""
    clock = FakeClock()
    a, b = await lanes_of_two(storage, clock)
    c = make_queue(storage, lanes=True, clock=clock)
    try:
        assert a.lanes is not None
        ripe = a.lanes.ripe
        a.lanes._looks[QUEUE] = 8  # long busy: its looks are ``period`` apart
        await make_busy(c, "c")
        assert await c.dequeue(QUEUE) is None  # c's first look writes its entry
        a.lanes._looked[QUEUE] = clock() - a.lanes.period  # a's next look is due
        await a.store.run(a.lanes.look(QUEUE, clock()))
        lane = a.lanes.lane(QUEUE)
        assert lane is not None and lane[1] == 3
        assert a.lanes.due(QUEUE, clock() + ripe)
        await a.store.run(a.lanes.look(QUEUE, clock() + ripe))  # the same view
        assert not a.lanes.due(QUEUE, clock() + 2 * ripe)  # 2 x ripe after it, not 1
        assert a.lanes.due(QUEUE, clock() + 3 * ripe)
    finally:
        for q in (a, b, c):
            await q.close()


async def test_an_idle_consumer_withdraws_and_so_does_a_closed_one(storage: Any) -> None:
    clock = FakeClock()
    a = make_queue(storage, lanes=True, clock=clock)
    b = make_queue(storage, lanes=True, clock=clock)
    try:
        await make_busy(a, "a")
        await make_busy(b, "b")
        assert await a.dequeue(QUEUE) is None
        assert await b.dequeue(QUEUE) is None
        assert len(await entries(a)) == 2
        clock.advance(5)
        assert await b.dequeue(QUEUE) is None  # still busy: 5 s since its last claim
        clock.advance(6)  # 11 s without a claim: idle for a period (10 x refresh_interval)
        assert await a.dequeue(QUEUE) is None
        assert len(await entries(a)) == 1  # a withdrew; b's entry is b's to remove
        await b.close()
        assert await entries(a) == []
    finally:
        await a.close()
        await b.close()


async def test_a_busy_consumer_rewrites_its_entry_once_a_period(storage: Any) -> None:
    """Looks (listings of ``lanes/``) come 1, 2, 4, 8, then 10 seconds apart, but the entry
    is written again only every period (10 x ``refresh_interval``), under a new time, the
    old one deleted: a busy consumer costs a write and a delete every 10 s."""
    clock = FakeClock()
    q = make_queue(storage, lanes=True, clock=clock)
    try:
        await make_busy(q, "0")
        assert await q.dequeue(QUEUE) is None  # the first look writes the entry
        first = await entries(q)
        assert len(first) == 1
        for i in range(3):  # looks 1, 2, 4 s apart, busy all along
            clock.advance(2**i + 0.1)
            await make_busy(q, f"look{i}")
            assert q.lanes is not None and q.lanes._looked[QUEUE] == clock()
            assert await entries(q) == first
        clock.advance(3.5)  # 10.8 s after the entry was written; the next look is at 8 s
        await make_busy(q, "look3")
        assert q.lanes._looked[QUEUE] < clock() and await entries(q) == first
        clock.advance(4.6)
        assert await q.dequeue(QUEUE) is None
        assert await q.dequeue(QUEUE) is None
        again = await entries(q)
        assert len(again) == 1 and again != first
    finally:
        await q.close()


async def test_entries_of_dead_consumers_stop_counting_then_are_removed(storage: Any) -> None:
    clock = FakeClock()
    q = make_queue(storage, lanes=True, clock=clock, clock_skew=5.0)
    now = int(clock())
    # (named to sort after q's hex id: q has lane 0, whose consumer removes the dead's)
    alive = layout.lane_key(QUEUE, now - 30, "zz-alive")  # within 3 periods + skew: counted
    stale = layout.lane_key(QUEUE, now - 60, "stale")  # not counted, not yet removed
    dead = layout.lane_key(QUEUE, now - 200, "dead")  # over 10 periods + skew: removed
    ahead = layout.lane_key(QUEUE, now + 60, "ahead")  # a clock far ahead: not counted
    try:

        def plant() -> Any:
            for key in (alive, stale, dead, ahead):
                yield write(key, b"")

        await q.store.run(plant())
        await make_busy(q, "q")
        assert await q.dequeue(QUEUE) is None
        assert q.lanes is not None and q.lanes.lane(QUEUE) is not None
        assert q.lanes.lane(QUEUE)[1] == 2  # alive and q
        names = await entries(q)
        assert alive.rsplit("/", 1)[1] in names and stale.rsplit("/", 1)[1] in names
        assert dead.rsplit("/", 1)[1] not in names
    finally:
        await q.close()

        def tidy() -> Any:
            for key in (alive, stale, ahead):
                yield delete(key)

        await q.store.run(tidy())


async def test_only_the_consumer_of_lane_0_removes_the_entries_of_the_dead(
    storage: Any,
) -> None:
    """Removing forgotten entries is a listing a period: one consumer does it, not each."""
    clock = FakeClock()
    a, b = await lanes_of_two(storage, clock)
    first, second = (a, b) if own_lane(a) == 0 else (b, a)
    dead = layout.lane_key(QUEUE, int(clock()) - 200, "dead")
    try:

        def plant() -> Any:
            yield write(dead, b"")

        await a.store.run(plant())
        for q in (second, first):  # each one's entry a period old: written again, and ...
            assert q.lanes is not None
            q.lanes._written[QUEUE] = clock() - q.lanes.period
            await q.store.run(q.lanes.look(QUEUE, clock()))
            listed = dead.rsplit("/", 1)[1] in await entries(q)
            assert listed == (q is second)  # ... lane 1 leaves the dead's, lane 0 removes it
    finally:
        await a.close()
        await b.close()


async def test_a_failed_look_at_the_lanes_does_not_fail_the_claim(storage: Any) -> None:
    clock = FakeClock()
    q = make_queue(storage, lanes=True, clock=clock)
    looks = []
    try:
        await make_busy(q, "q")
        assert q.lanes is not None

        real = q.lanes.look

        def broken(queue: str, current: float) -> Any:
            """The real look, its first request (the entry's write) failing."""
            looks.append(current)
            program = real(queue, current)
            op = next(program)
            assert op.name == "write" and "/lanes/" in op.args[0]
            yield from ()
            program.throw(StorageError("lanes unreachable"))

        q.lanes.look = broken  # type: ignore[method-assign]
        batch = tasks(2, q._now())
        await q.enqueue_many(batch)
        got = [await q.dequeue(QUEUE), await q.dequeue(QUEUE)]
        assert sorted(c.id for c in got if c is not None) == sorted(t.id for t in batch)
        assert len(looks) == 1  # tried once, not again at every call
        assert await entries(q) == []
        clock.advance(1.1)
        assert await q.dequeue(QUEUE) is None
        assert len(looks) == 2  # a second later

        def list_fails(queue: str, current: float) -> Any:
            """The real look, its entry written if due, its listing of the others failing."""
            looks.append(current)
            program = real(queue, current)
            op = next(program)
            while op.name != "listafter":
                op = program.send((yield op))
            program.throw(StorageError("lanes unreachable"))

        q.lanes.look = list_fails  # type: ignore[method-assign]
        clock.advance(1.1)
        assert await q.dequeue(QUEUE) is None
        assert len(looks) == 3 and len(await entries(q)) == 1
        assert await q.dequeue(QUEUE) is None  # the same second: not again
        assert len(looks) == 3
        clock.advance(1.1)
        assert await q.dequeue(QUEUE) is None
        assert len(looks) == 4
    finally:
        await q.close()


async def test_lanes_are_on_by_default_on_object_stores_only(storage: Any) -> None:
    q = make_queue(storage)
    off = make_queue(storage, lanes=False)
    try:
        assert (q.lanes is not None) is q.store.is_remote
        assert off.lanes is None
        strict = make_queue(storage, spread=1)  # strictly oldest first: no lanes
        assert strict.lanes is None
        await strict.close()
        with pytest.raises(ValueError, match="refresh_interval"):
            make_queue(storage, refresh_interval=0)
    finally:
        await q.close()
        await off.close()


def test_lanes_do_not_follow_the_shards() -> None:
    """Within one shard every id has the same CRC-32 residue: lanes hash ids another way, so
    the consumers of one shard still get a lane each."""
    ids = [f"id-{i}" for i in range(4000)]
    in_shard = [i for i in ids if zlib.crc32(i.encode()) % 4 == 0]
    lanes = Counter(lane_of(i, 4) for i in in_shard)
    assert len(in_shard) > 800 and sorted(lanes) == [0, 1, 2, 3]
    assert min(lanes.values()) > len(in_shard) / 8


def test_a_consumer_with_an_empty_lane_helps_the_next_lane_first() -> None:
    """Consumer ``i`` without tasks of its own takes the ripe ones of lane ``i + 1`` first,
    then ``i + 2`` ...: hungry consumers spread over the others' lanes instead of all
    racing for the same oldest task. Young ones (under ``ripe`` seconds) are left."""
    lanes = Lanes(period=10.0, ripe=1.0, clock_skew=5.0)
    lanes._lane[QUEUE] = (2, 4)
    now = 1_800_000_000.0
    old, young = tasks(40, now - 5), tasks(8, now - 0.5)
    items = [layout.Candidate(0, int(now * 1000) - 5000, t.id, 1, f"k/{t.id}", None) for t in old]
    items += [layout.Candidate(0, int(now * 1000) - 500, t.id, 1, f"k/{t.id}", None) for t in young]
    items = [c for c in items if lane_of(c.task_id, 4) != 2]  # none of its own
    picked = lanes.pick(QUEUE, items, now)
    assert picked is not None
    distances = [(lane_of(c.task_id, 4) - 2) % 4 for c in picked]
    assert distances == sorted(distances) and set(distances) == {1, 2, 3}
    assert {c.task_id for c in picked} == {
        c.task_id for c in items if c.time_ms <= (now - 1) * 1000
    }
    # Each lane's in their order from a random place on: the helper does not walk into the
    # owner, who takes them from the oldest.
    lane3 = [
        c.task_id for c in items if lane_of(c.task_id, 4) == 3 and c.time_ms < now * 1000 - 1000
    ]
    starts = set()
    for _ in range(30):
        picked = lanes.pick(QUEUE, items, now)
        assert picked is not None
        got = [c.task_id for c in picked if lane_of(c.task_id, 4) == 3]
        start = lane3.index(got[0])
        assert got == lane3[start:] + lane3[:start]
        starts.add(start)
    assert len(lane3) > 2 and len(starts) > 1

    # A backlog: every task overdue. Its own first, then the others lane by lane (all 16
    # consumers of a deep queue reached for the same oldest ones before).
    backlog = [
        layout.Candidate(0, int(now * 1000) - 60_000, t.id, 1, f"k/{t.id}", None) for t in old
    ]
    picked = lanes.pick(QUEUE, backlog, now)
    assert picked is not None and len(picked) == len(backlog)
    own = [c for c in backlog if lane_of(c.task_id, 4) == 2]
    assert own and picked[: len(own)] == own
    distances = [(lane_of(c.task_id, 4) - 2) % 4 for c in picked[len(own) :]]
    assert distances == sorted(distances) and set(distances) == {1, 2, 3}

    lanes._lane.clear()
    assert lanes.pick(QUEUE, items, now) is None  # no lane: the caller's own order


def test_only_a_young_task_of_its_own_lane_taken_by_another_brings_a_look_sooner() -> None:
    """A task of one's lane taken by another while not overdue: maybe by a consumer that sees
    another list of consumers, so the lanes are looked at ``ripe`` seconds later. An overdue
    one is anyone's (a backlog's helpers take them): its miss changes nothing."""
    lanes = Lanes(period=10.0, ripe=1.0, clock_skew=5.0)
    now = 1_800_000_000.0
    lanes._claimed[QUEUE] = now
    lanes._entry[QUEUE] = "entry"
    lanes._lane[QUEUE] = (1, 4)
    lanes._looks[QUEUE] = 5
    lanes._looked[QUEUE] = now - 2  # the pace is 10 s: no look due yet
    mine = [t for t in tasks(40, now - 30) if lane_of(t.id, 4) == 1]
    theirs = [t for t in tasks(40, now - 3) if lane_of(t.id, 4) == 0]
    assert mine and theirs

    def cand(task_id: str, age: float) -> layout.Candidate:
        return layout.Candidate(0, int((now - age) * 1000), task_id, 1, f"k/{task_id}", None)

    lanes.missed(QUEUE, cand(mine[0].id, 30.0), now)  # overdue (10 x ripe)
    lanes.missed(QUEUE, cand(theirs[0].id, 3.0), now)  # not of its lane
    assert not lanes.due(QUEUE, now)
    lanes.missed(QUEUE, cand(mine[0].id, 3.0), now)  # ripe, not overdue
    assert lanes.due(QUEUE, now)


def test_the_pace_of_looks_stays_bounded_however_long_a_consumer_is_busy() -> None:
    lanes = Lanes(period=10.0, ripe=1.0, clock_skew=5.0)
    lanes._claimed[QUEUE] = 1000.0
    lanes._entry[QUEUE] = "entry"
    lanes._looked[QUEUE] = 995.0
    for looks, due in ((1, True), (3, True), (4, False), (2000, False)):  # 1, 4, 8, 10 s
        lanes._looks[QUEUE] = looks
        assert lanes.due(QUEUE, 1000.0) is due  # 5 s after the last look
    assert lanes.due(QUEUE, 1005.0)  # 10 s: the period, after any number of looks


async def test_a_waiting_call_takes_no_lower_priority_while_a_higher_is_listed(
    storage: Any,
) -> None:
    clock = FakeClock()
    a, b = await lanes_of_two(storage, clock)
    try:
        ms = int(clock() * 1000)
        made = [
            Task(func="m:f", id=id_text(ms << 80 | i << 40 | 9), queue=QUEUE) for i in range(40)
        ]
        high = [
            msgspec.structs.replace(t, priority=5) for t in made if lane_of(t.id, 2) == own_lane(a)
        ][:3]
        low = [t for t in made if lane_of(t.id, 2) == own_lane(b)][:3]
        assert len(high) == len(low) == 3
        await a.enqueue_many(high + low)
        assert await b.dequeue(QUEUE, wait=0.01) is None  # a's new high ones go first
        got = await b.dequeue(QUEUE)  # a call that does not wait: the top priority
        assert got is not None and got.id in {t.id for t in high}
        await b.ack(got)
    finally:
        await a.close()
        await b.close()
