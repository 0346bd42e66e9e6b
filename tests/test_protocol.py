"""Regression tests of the attempt protocol (issue: every transition decided once by the storage).

Each test forces one unlucky order of storage calls that broke a guarantee before: a program
of one actor is driven op by op, and another actor runs in between (``interleave``). They run
on memory and a local directory, where programs are driven inline and every order can be
forced; the interleaving explorer (test_interleavings.py) covers the orders exhaustively.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from omniq.core import codec
from omniq.core.errors import InvalidNameError, LeaseLostError, NotFoundError, TaskCancelledError
from omniq.core.fs import Op, Program
from omniq.core.models import Claimed, Task, TaskStatus, utcnow
from omniq.storage.file.queue import AsyncFileQueue
from queue_helpers import FakeClock

pytestmark = pytest.mark.anyio

KINDS = ("memory", "local")


@pytest.fixture(params=KINDS)
def base_dir(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "memory":
        return f"memory://protocol-{os.urandom(6).hex()}"
    return str(tmp_path / "q")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def queue(base_dir: str, clock: Callable[[], float], **kwargs: Any) -> AsyncFileQueue:
    kwargs.setdefault("lease", 10.0)
    kwargs.setdefault("clock_skew", 1.0)
    kwargs.setdefault("tombstone_ttl", 60.0)
    return AsyncFileQueue(base_dir, clock=clock, **kwargs)


async def interleave(
    q: AsyncFileQueue, program: Program[Any], between: Callable[[Op], Awaitable[None]]
) -> Any:
    """Drive ``program`` on ``q``'s store one op at a time, awaiting ``between(op)`` after each
    op has run (another actor's turn). Errors are thrown into the program, like Store.run."""
    ops = q.store._sync_ops
    op = next(program)
    while True:
        try:
            result = q.store.clock() if op.name == "now" else getattr(ops, op.name)(*op.args)
        except Exception as exc:
            await between(op)
            try:
                op = program.throw(exc)
            except StopIteration as stop:
                return stop.value
            continue
        await between(op)
        try:
            op = program.send(result)
        except StopIteration as stop:
            return stop.value


async def drain(q: AsyncFileQueue, clock: FakeClock, rounds: int = 6) -> list[Claimed]:
    """Run a worker with time moving on: reap, repair and claim until nothing is left; every
    claim is acked. Returns the claims made."""
    got: list[Claimed] = []
    for _ in range(rounds):
        clock.advance(q.tombstone_ttl + q.lease + 10)
        await q.reap("default")
        await q.repair("default")
        while (claimed := await q.dequeue("default")) is not None:
            got.append(claimed)
            await q.ack(claimed)
    return got


async def test_delayed_enqueue_is_never_lost_to_an_early_claimer(base_dir: str) -> None:
    """Problem 1: a claimer whose clock is ahead by less than clock_skew lists the delayed
    task while its enqueue is half done; the task must still run exactly once."""
    clock = FakeClock()
    producer = queue(base_dir, clock)
    ahead = queue(base_dir, lambda: clock() + 3.0, clock_skew=5.0)
    task = Task(func="m:f", eta=utcnow() + timedelta(seconds=2))
    claims: list[Claimed] = []

    async def claimer_turn(op: Op) -> None:
        if (got := await ahead.dequeue("default")) is not None:
            claims.append(got)
            await ahead.ack(got)

    await producer._check()
    await interleave(
        producer, producer._enqueue_program([(task, codec.encode(task))]), claimer_turn
    )
    claims += await drain(ahead, clock)
    assert [c.id for c in claims] == [task.id]


async def _expired_holder(
    base_dir: str,
) -> tuple[FakeClock, AsyncFileQueue, AsyncFileQueue, Claimed]:
    clock = FakeClock()
    holder, reaper = queue(base_dir, clock), queue(base_dir, clock)
    await holder.enqueue(Task(func="m:f", max_retries=3))
    claimed = await holder.dequeue("default")
    assert claimed is not None
    # The holder stalled past its lease; the margin covers the real seconds the store's mtimes
    # moved on meanwhile (the reaper lists only claims older than a lease by the fake clock).
    clock.advance(holder.lease + holder.clock_skew + 5)
    return clock, holder, reaper, claimed


def _reaper_turn(
    reaper: AsyncFileQueue, taken: list[Claimed], at: int
) -> Callable[[Op], Awaitable[None]]:
    """The reaper's pass, run once right after the holder's op number ``at``."""
    seen = [0]

    async def turn(op: Op) -> None:
        seen[0] += 1
        if seen[0] == at + 1:
            taken.extend(await reaper.reap("default"))

    return turn


STEPS = range(5)  # the reaper runs after each of the holder's first five ops in turn


async def _outcome(call: Awaitable[Any]) -> Any:
    try:
        return await call
    except (LeaseLostError, TaskCancelledError) as exc:
        return exc


@pytest.mark.parametrize("at", STEPS)
async def test_a_heartbeat_after_a_take_over_is_fenced(base_dir: str, at: int) -> None:
    """Problem 2: the reaper takes the attempt over between the steps of a stalled holder's
    heartbeat; the heartbeat must not succeed while the next attempt exists."""
    clock, holder, reaper, claimed = await _expired_holder(base_dir)
    taken: list[Claimed] = []
    got = await _outcome(
        interleave(
            holder, holder._extend_program(claimed, holder.lease), _reaper_turn(reaper, taken, at)
        )
    )
    held = isinstance(got, Claimed)
    assert held != bool(taken), (got, taken)  # the heartbeat or the take-over, not both
    if taken:
        assert got is None, got  # the program's "lost": extend_lease raises LeaseLostError
        info = await reaper.get_task(claimed.id)
        assert info.attempt == 2 and info.status is TaskStatus.PENDING
    # The holder never finishes here: attempt 2 runs once, whoever won the race.
    assert [c.attempt for c in await drain(reaper, clock)] == [2]


@pytest.mark.parametrize("at", STEPS)
@pytest.mark.parametrize("call", ["ack", "nack", "release"])
async def test_a_late_finish_races_the_reaper_with_one_outcome(
    base_dir: str, call: str, at: int
) -> None:
    """Problem 2 (late ack) and problem 3 (stale nack): a holder past its lease finishes
    while the reaper takes over; the attempt gets one outcome, attempt 2 is made once and
    runs once, even after the tombstones are gone."""
    clock, holder, reaper, claimed = await _expired_holder(base_dir)
    taken: list[Claimed] = []
    programs = {
        "ack": lambda: holder._ack_program(claimed),
        "nack": lambda: holder._nack_program(claimed, "boom", 30.0, True),
        "release": lambda: holder._release_program(claimed),
    }
    result = await _outcome(interleave(holder, programs[call](), _reaper_turn(reaper, taken, at)))
    holder_won = result is True or isinstance(result, TaskStatus)
    if not taken:  # the holder finished before the reaper's pass: the reaper must see that
        taken.extend(await reaper.reap("default"))
    assert holder_won != bool(taken), (result, taken)  # exactly one outcome
    runs = await drain(reaper, clock)
    expected = 0 if (holder_won and call == "ack") else 1
    assert [c.attempt for c in runs] == [2] * expected


async def test_a_requeued_task_stays_visible_after_the_tombstone_ttl(base_dir: str) -> None:
    """Problem 4: a task requeued by a lease take-over is found by get_task and cancel,
    however long it waits."""
    clock, _holder, reaper, claimed = await _expired_holder(base_dir)
    assert [c.id for c in await reaper.reap("default")] == [claimed.id]
    clock.advance(reaper.tombstone_ttl * 3)
    await reaper.reap("default")  # old records are cleaned up
    info = await reaper.get_task(claimed.id)
    assert (info.status, info.attempt) == (TaskStatus.PENDING, 2)
    assert await reaper.cancel(claimed.id) is True
    assert await reaper.dequeue("default") is None
    assert (await reaper.get_task(claimed.id)).status is TaskStatus.CANCELLED


async def test_a_requeued_dead_letter_stays_visible(base_dir: str) -> None:
    """Problem 4 through requeue_dead."""
    clock = FakeClock()
    q = queue(base_dir, clock)
    task_id = await q.enqueue(Task(func="m:f"))
    claimed = await q.dequeue("default")
    assert claimed is not None
    assert await q.nack(claimed, error="x") is TaskStatus.DEAD
    clock.advance(q.tombstone_ttl * 3)
    await q.reap("default")
    assert await q.requeue_dead("default", task_id) == 1
    assert await q.requeue_dead("default", task_id) == 0  # once
    clock.advance(q.tombstone_ttl * 3)
    await q.reap("default")
    info = await q.get_task(task_id)
    assert (info.status, info.attempt) == (TaskStatus.PENDING, 2)
    runs = await drain(q, clock)
    assert [c.attempt for c in runs] == [2]


async def test_without_hard_links_no_half_written_file_is_visible(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Problem 5: the O_EXCL fallback (no hard links) must never show a created file before
    it is complete: a claimer reading it empty would quarantine the task."""
    from omniq.core._local_ops import LocalOps

    ops = LocalOps(str(tmp_path))
    ops._link_ok = False
    target = tmp_path / "ready" / "t.1.json"
    seen: list[bytes | None] = []
    real_write, real_fdopen = os.write, os.fdopen

    def look() -> None:
        seen.append(target.read_bytes() if target.exists() else None)

    def spy_write(fd: int, data: Any) -> int:
        look()
        return real_write(fd, data)

    def spy_fdopen(fd: int, *args: Any, **kwargs: Any) -> Any:
        file = real_fdopen(fd, *args, **kwargs)
        inner = file.write

        def write(data: Any) -> int:
            look()
            return inner(data)

        file.write = write  # type: ignore[method-assign]
        return file

    monkeypatch.setattr(os, "write", spy_write)
    monkeypatch.setattr(os, "fdopen", spy_fdopen)
    assert ops.create("ready/t.1.json", b'{"complete": true}') is True
    monkeypatch.undo()
    assert seen and all(s is None for s in seen), seen
    assert target.read_bytes() == b'{"complete": true}'
    assert ops.create("ready/t.1.json", b"other") is False  # still exclusive


async def test_a_won_claim_is_kept_when_the_clean_up_after_it_fails(
    base_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Problem 6: the claim is won, then removing the ready copy fails: the claim must be
    returned (the copy is cleaned up later), not dropped with the task left RUNNING."""
    clock = FakeClock()
    q = queue(base_dir, clock)
    task_id = await q.enqueue(Task(func="m:f"))
    ops = q.store._sync_ops
    real_delete = ops.delete

    def failing_delete(key: str) -> bool:
        if "/ready/" in key:
            raise OSError(5, "I/O error")
        return real_delete(key)

    monkeypatch.setattr(ops, "delete", failing_delete)
    claimed = await q.dequeue("default")
    monkeypatch.undo()
    assert claimed is not None and claimed.id == task_id
    await q.ack(claimed)
    assert (await q.get_task(task_id)).status is TaskStatus.DONE
    assert await drain(q, clock) == []  # the leftover copy never runs again


async def test_a_cancel_request_does_not_outlive_its_attempt(base_dir: str) -> None:
    """Suspected, confirmed: a cancel request for a running task that finished before its
    next heartbeat stayed behind and cancelled a later task with the same id."""
    clock = FakeClock()
    q = queue(base_dir, clock)
    task_id = await q.enqueue(Task(func="m:f", id="report-1"))
    claimed = await q.dequeue("default")
    assert claimed is not None
    assert await q.cancel(task_id) is True  # running: asked to stop at its next heartbeat
    await q.ack(claimed)  # finished first
    clock.advance(q.tombstone_ttl * 3)
    await q.reap("default")
    await q.enqueue(Task(func="m:f", id="report-1"))  # the id is reused later
    again = await q.dequeue("default")
    assert again is not None
    await q.extend_lease(again)  # must not raise TaskCancelledError


async def test_a_stale_copy_never_outlives_its_attempt(base_dir: str) -> None:
    """Suspected, confirmed: the same id enqueued with two priorities is stored twice; the
    second copy must never run once the first finished, even after the tombstone TTL."""
    clock = FakeClock()
    q = queue(base_dir, clock)
    await q.enqueue(Task(func="m:f", id="dup", priority=5))
    first = await q.dequeue("default")
    assert first is not None
    await q.ack(first)
    await q.enqueue(Task(func="m:f", id="dup", priority=0))  # a late duplicate enqueue
    clock.advance(q.tombstone_ttl * 3)
    await q.reap("default")
    assert await drain(q, clock) == []


async def test_not_found_for_unknown_ids(base_dir: str) -> None:
    q = queue(base_dir, FakeClock())
    with pytest.raises(NotFoundError):
        await q.get_task("nope", "default")
    with pytest.raises(InvalidNameError):
        await q.get_task("../x", "default")


async def test_requeue_dead_never_deletes_the_new_attempts_result(
    base_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Suspected, confirmed: the backend's requeue_dead made the task ready, then deleted the
    old result; a fast worker's result of the new attempt, stored in between, was deleted."""
    from omniq.backend.file import AsyncFileBackend
    from omniq.core.models import ResultStatus, TaskResult

    async with AsyncFileBackend(base_dir) as backend:
        q = backend.queue
        task_id = await backend.enqueue("m:f")
        claimed = await q.dequeue("default")
        assert claimed is not None
        await q.nack(claimed, error="boom", retry=False)
        await backend.results.set(TaskResult(task_id=task_id, status=ResultStatus.FAILURE))
        requeue = q.requeue_dead

        async def requeue_then_a_fast_worker(queue: str = "default", one: Any = None) -> int:
            n = await requeue(queue, one)
            again = await q.dequeue("default")  # another worker runs attempt 2 at once
            assert again is not None and again.attempt == 2
            await q.ack(again)
            await backend.results.set(
                TaskResult(task_id=task_id, status=ResultStatus.SUCCESS, value=1, attempt=2)
            )
            return n

        monkeypatch.setattr(q, "requeue_dead", requeue_then_a_fast_worker)
        assert await backend.requeue_dead("default", task_id) == [task_id]
        result = await backend.results.get(task_id)
        assert result is not None and result.status is ResultStatus.SUCCESS


def crash_after(q: AsyncFileQueue, program: Program[Any], last: Callable[[Op], bool]) -> None:
    """Drive ``program`` until the op ``last`` accepts has run, then drop it: a process
    killed right there (no more of its code runs)."""
    ops = q.store._sync_ops
    op = next(program)
    while True:
        result = q.store.clock() if op.name == "now" else getattr(ops, op.name)(*op.args)
        if last(op):
            return
        op = program.send(result)


async def test_repair_redoes_what_a_killed_process_left(base_dir: str) -> None:
    """A worker killed right after winning a retry outcome (before creating attempt 2),
    and a producer killed between a delayed task's body and its marker: repair (run by the
    worker every sweep_interval) redoes both; nothing is lost."""
    clock = FakeClock()
    q = queue(base_dir, clock)
    retried = await q.enqueue(Task(func="m:f", max_retries=2))
    claimed = await q.dequeue("default")
    assert claimed is not None
    crash_after(
        q,
        q._nack_program(claimed, "boom", 0.0, True),
        lambda op: op.name == "create" and op.args[0].endswith(".x"),
    )
    delayed = Task(func="m:f", eta=utcnow() + timedelta(seconds=5))
    crash_after(
        q,
        q._enqueue_program([(delayed, codec.encode(delayed))]),
        lambda op: op.name == "write" and "/sched/" in op.args[0],
    )
    assert await q.dequeue("default") is None  # neither can run yet
    clock.advance(120)
    assert await q.repair("default") == 2
    got = {c.id: c.attempt for c in await drain(q, clock)}
    assert got == {retried: 2, delayed.id: 1}


KILLED_BETWEEN_DECISION_AND_FOLLOW_UP = {
    # the holder's immediate retry: outcome written, attempt 2 not yet
    "nack": (
        lambda q, c: q._nack_program(c, "boom", 0.0, True),
        lambda op: op.name == "create" and op.args[0].endswith(".x"),
    ),
    # a delayed retry: attempt 2's body written, its due marker not yet
    "nack-delayed": (
        lambda q, c: q._nack_program(c, "boom", 1.0, True),
        lambda op: op.name == "write" and "/sched/" in op.args[0],
    ),
    "release": (
        lambda q, c: q._release_program(c),
        lambda op: op.name == "create" and op.args[0].endswith(".x"),
    ),
    # the reaper's take-over: "lost" written, attempt 2 not yet
    "take-over": (
        lambda q, c: q._reap_program("default"),
        lambda op: op.name == "create" and op.args[0].endswith(".x"),
    ),
}


@pytest.mark.parametrize("case", list(KILLED_BETWEEN_DECISION_AND_FOLLOW_UP))
async def test_a_follow_up_cut_short_is_finished_by_the_next_reaper_pass(
    base_dir: str, case: str
) -> None:
    """A process killed between an attempt's spawning outcome and attempt n+1 leaves its
    intent: the next reaper pass (seconds later, not the daily repair) makes attempt 2,
    which then runs once."""
    program, last = KILLED_BETWEEN_DECISION_AND_FOLLOW_UP[case]
    clock = FakeClock()
    q = queue(base_dir, clock)
    task_id = await q.enqueue(Task(func="m:f", max_retries=2))
    claimed = await q.dequeue("default")
    assert claimed is not None
    if case == "take-over":
        clock.advance(q.lease + q.clock_skew + 5)
    crash_after(q, program(q, claimed), last)
    # Attempt 2 is neither ready nor due yet.
    assert (await q.size("default")).ready == 0 and await q.next_due("default") is None
    clock.advance(q.clock_skew + 2)
    await q.reap("default")
    again = await q.dequeue("default")
    assert again is not None and (again.id, again.attempt) == (task_id, 2)
    await q.ack(again)
    names = await q.store.listdir("default/run")
    assert not [n for n in names if n.endswith(".i")], names  # the intent is gone
    assert await drain(q, clock) == []  # attempt 2 is never made twice


async def test_a_failed_follow_up_is_redone_by_the_reaper(
    base_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The outcome is written, then creating attempt 2 fails (an outage): nack still
    succeeds (the decision stands) and the next reaper pass makes attempt 2."""
    clock = FakeClock()
    q = queue(base_dir, clock)
    task_id = await q.enqueue(Task(func="m:f", max_retries=2))
    claimed = await q.dequeue("default")
    assert claimed is not None
    ops = q.store._sync_ops
    real = ops.create_many

    def failing(items: Any) -> Any:
        if any("/ready/" in key for key, _ in items):
            raise OSError(5, "I/O error")
        return real(items)

    monkeypatch.setattr(ops, "create_many", failing)
    assert await q.nack(claimed, error="boom", retry_in=0) is TaskStatus.PENDING
    monkeypatch.undo()
    assert await q.dequeue("default") is None
    clock.advance(q.clock_skew + 2)
    await q.reap("default")
    again = await q.dequeue("default")
    assert again is not None and (again.id, again.attempt) == (task_id, 2)


def step_until(q: AsyncFileQueue, program: Program[Any], last: Callable[[Op], bool]) -> Op:
    """Drive ``program`` until the op ``last`` accepts has run; return the op it asks for
    next, for ``resume`` (a process stalled right there)."""
    ops = q.store._sync_ops
    op = next(program)
    while True:
        result = q.store.clock() if op.name == "now" else getattr(ops, op.name)(*op.args)
        nxt = program.send(result)
        if last(op):
            return nxt
        op = nxt


def resume(q: AsyncFileQueue, program: Program[Any], op: Op) -> Any:
    ops = q.store._sync_ops
    while True:
        result = q.store.clock() if op.name == "now" else getattr(ops, op.name)(*op.args)
        try:
            op = program.send(result)
        except StopIteration as stop:
            return stop.value


async def test_a_writer_stalled_before_its_follow_up_never_makes_attempt_2_again(
    base_dir: str,
) -> None:
    """Review finding: a holder stalls right after its retry outcome; the reaper makes
    attempt 2 from the intent, it runs and is cleaned up; the holder wakes up and must not
    make attempt 2 again (it would run twice)."""
    clock = FakeClock()
    q = queue(base_dir, clock)
    await q.enqueue(Task(func="m:f", max_retries=2))
    claimed = await q.dequeue("default")
    assert claimed is not None
    program = q._nack_program(claimed, "boom", 0.0, True)
    stalled = step_until(q, program, lambda op: op.name == "create" and op.args[0].endswith(".x"))
    clock.advance(q.clock_skew + 2)
    await q.reap("default")  # the intent: attempt 2 is made for the stalled holder
    again = await q.dequeue("default")
    assert again is not None and again.attempt == 2
    await q.ack(again)
    for _ in range(3):  # attempts 1 and 2 are cleaned up
        clock.advance(q.tombstone_ttl * 2)
        await q.reap("default")
    assert not await q.store.listdir("default/run")
    resume(q, program, stalled)  # the holder wakes up
    assert await drain(q, clock) == []


async def test_an_old_intent_never_cleans_up_a_live_claim(base_dir: str) -> None:
    """Review finding: a holder with a lease longer than tombstone_ttl dies between its
    intent and its outcome. The intent ages past the ttl while the claim is live: the
    clean-up of that leftover must not delete the claim (the task would vanish); once the
    lease ends the task is taken over and runs again."""
    clock = FakeClock()
    q = queue(base_dir, clock)
    task_id = await q.enqueue(Task(func="m:f", max_retries=2))
    claimed = await q.dequeue("default", lease=q.tombstone_ttl * 10)
    assert claimed is not None
    crash_after(
        q,
        q._nack_program(claimed, "boom", 0.0, True),
        lambda op: op.name == "write" and op.args[0].endswith(".i"),
    )
    clock.advance(q.tombstone_ttl + 10)
    assert await q.reap("default") == []
    info = await q.get_task(task_id)
    assert (info.status, info.attempt) == (TaskStatus.RUNNING, 1)
    clock.advance(q.tombstone_ttl * 10)
    assert [c.id for c in await q.reap("default")] == [task_id]
    assert [c.attempt for c in await drain(q, clock)] == [2]


async def test_two_racing_cancels_have_one_winner(base_dir: str) -> None:
    """An exclusive create answered "exists" is taken as this call's own write when the
    stored bytes are its own: constant tombstones made a racing second cancel a winner too."""
    q = queue(base_dir, FakeClock())
    task_id = await q.enqueue(Task(func="m:f"))
    wins: list[bool | None] = []

    async def other_cancel(op: Op) -> None:
        if op.name == "read" and not wins:  # after this cancel found the task pending
            wins.append(await q.cancel(task_id, "default"))

    wins.append(await interleave(q, q._cancel_program("default", task_id), other_cancel))
    assert sorted(map(bool, wins)) == [False, True]


async def test_a_claim_that_took_most_of_its_lease_is_renewed_before_it_is_returned(
    base_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the network-fault suite: a claim retried through an outage came back with its
    lease nearly spent; the worker started it and another worker took it over at once."""
    clock = FakeClock()
    q = queue(base_dir, clock, lease=30.0)
    await q.enqueue(Task(func="m:f"))
    slow = q._claim_many_program

    def claim_that_takes_25_seconds(*args: Any) -> Program[Any]:
        got = yield from slow(*args)
        clock.advance(25)  # the claim's requests were retried for 25 s
        return got

    monkeypatch.setattr(q, "_claim_many_program", claim_that_takes_25_seconds)
    claimed = await q.dequeue("default")
    assert claimed is not None and claimed.epoch == 1  # renewed: a lease epoch was made
    assert claimed.lease_until.timestamp() == pytest.approx(clock() + 30)


async def test_a_finished_task_with_a_lease_longer_than_the_ttl_never_runs_again(
    base_dir: str,
) -> None:
    """Found by the benchmarks' review: with lease > tombstone_ttl the clean-up removed the
    outcome but kept the claim (too young for the listing's cut); the reaper then took that
    claim for an expired one and the finished task ran again."""
    clock = FakeClock()
    q = queue(base_dir, clock, lease=600.0, tombstone_ttl=60.0)
    await q.enqueue(Task(func="m:f"))
    claimed = await q.dequeue("default")
    assert claimed is not None
    await q.ack(claimed)
    for _ in range(3):
        clock.advance(q.tombstone_ttl + 1)
        assert await q.reap("default") == []
    clock.advance(q.lease + q.clock_skew + 1)
    assert await q.reap("default") == []
    assert await drain(q, clock) == []


async def test_the_reaper_keeps_no_recent_outcome_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The benchmark's RSS target caught the reaper holding every outcome younger than the
    TTL (one per finished task) and every finished claim (a local claim's mtime is its ack's
    time); it now notes a hash of each recent outcome and keeps only undecided claims."""
    import omniq.storage.file.queue._reaper as reaper

    clock = FakeClock()
    q = queue(str(tmp_path / "q"), clock)
    await q.enqueue_many([Task(func="m:f") for _ in range(50)])
    for claimed in await q.dequeue_many(50, "default"):
        await q.ack(claimed)
    clock.advance(q.clock_skew + 1)  # every claim is past the reaper's suspect cut
    kept: list[Any] = []
    real = reaper.group_run
    called: list[int] = []

    def spy(entries: list[Any]) -> Any:
        called.append(len(entries))
        kept.extend(entries)
        return real(entries)

    monkeypatch.setattr(reaper, "group_run", spy)
    assert await q.reap("default") == []
    assert called  # the reaper's scan went through the spy
    assert kept == []  # neither the 50 finished claims nor their recent outcomes


async def test_a_pass_tells_many_finished_claims_from_the_stale_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass keeps the hashes of recent outcomes as sorted runs merged into one array
    (``_Stems``: a set of Python integers was the worker's memory peak draining 100,000
    tasks); with runs of three, 50 finished claims are still told from the one whose lease
    ran out, and only that one is kept and taken over."""
    import omniq.storage.file.queue._reaper as reaper

    monkeypatch.setattr(reaper, "_RUN", 3)
    clock = FakeClock()
    q = queue(str(tmp_path / "q"), clock)
    await q.enqueue_many([Task(func="m:f") for _ in range(51)])
    *finished, stale = await q.dequeue_many(51, "default")
    for claimed in finished:
        await q.ack(claimed)
    clock.advance(q.lease + q.clock_skew + 1)
    kept: list[Any] = []
    real = reaper.group_run

    def spy(entries: list[Any]) -> Any:
        kept.extend(entries)
        return real(entries)

    monkeypatch.setattr(reaper, "group_run", spy)
    assert [c.id for c in await q.reap("default")] == [stale.id]
    assert {e.name.split(".")[0] for e in kept} == {stale.id}
