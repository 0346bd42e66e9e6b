"""Dependencies end to end on every filesystem, run by three workers (processes; in-process
workers on memory://, which other processes cannot see): fan-in of 100 tasks into one, a
chain of 10, a failed dependency cancelling its dependents (and ``on_dependency_failure=
"run"`` running one anyway), and no task started before its dependencies finished (each task
checks its dependencies' marker files when it starts: ``dependency_tasks.py``). Unknown ids
and cycles are refused, storing nothing."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from omniq.backend.file import AsyncFileBackend
from omniq.core.errors import DependencyCycleError, DependencyError, UnknownDependencyError
from omniq.core.models import EventType, ResultStatus, Task, TaskResult, TaskStatus
from omniq.storage.file.queue import AsyncFileQueue
from omniq.storage.file.queue._dependencies import MAX_DEPENDENCIES

TESTS_DIR = Path(__file__).resolve().parent
OMNIQ = str(Path(sys.executable).with_name("omniq"))
STEP, FAIL = "dependency_tasks:step", "dependency_tasks:fail"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def make(storage: Any, **settings: Any) -> AsyncFileBackend:
    return AsyncFileBackend(
        storage.base_dir, storage.storage_options, environ={}, lease=10, **settings
    )


async def run_workers(storage: Any, backend: AsyncFileBackend, n: int = 3) -> None:
    """``n`` workers until the queues stay empty (processes, except on memory://)."""
    if storage.kind == "memory":
        async with anyio.create_task_group() as group:
            for _ in range(n):
                worker = backend.worker(concurrency=4, burst=True, idle_timeout=1.0, poll=0.05)
                group.start_soon(worker.run)
        return
    env = dict(os.environ)
    env["OMNIQ_STORAGE_OPTIONS"] = json.dumps(storage.storage_options)
    args = [OMNIQ, "worker", storage.base_dir, "--burst", "--idle-timeout", "3", "-c", "4"]
    args += ["--path", str(TESTS_DIR), "--lease", "10", "--events"]
    procs = [subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL) for _ in range(n)]
    for proc in procs:
        code = await anyio.to_thread.run_sync(lambda p=proc: p.wait(timeout=300))
        assert code == 0, f"a worker exited with {code}"


def early(log: Path) -> list[str]:
    return sorted(p.name for p in log.glob("*.early"))


@pytest.mark.anyio
async def test_fan_in_of_100_and_a_chain_of_10(storage: Any, tmp_path: Path) -> None:
    log = str(tmp_path)
    async with make(storage, events=True) as backend:
        fan = [await backend.enqueue(STEP, [log, f"f{i}", []]) for i in range(100)]
        sink = await backend.enqueue(
            STEP, [log, "sink", [f"f{i}" for i in range(100)]], depends_on=fan
        )
        links = [
            backend.make_task(STEP, [log, f"c{i}", [f"c{i - 1}"] if i else []]) for i in range(10)
        ]
        chain = await backend.chain(*links)
        assert chain == [t.id for t in links]
        assert (await backend.get_task(sink)).status is TaskStatus.WAITING
        assert (await backend.get_task(chain[5])).status is TaskStatus.WAITING
        assert (await backend.queue.size()).ready == 101  # waiting tasks are not ready
        await run_workers(storage, backend)
        assert early(tmp_path) == []  # no task started before its dependencies finished
        for task_id in [sink, *chain]:
            result = await backend.result(task_id, wait=30)
            assert result is not None and result.ok, result
        assert (await backend.result(sink)).value == "sink"  # type: ignore[union-attr]
        done = {p.stem for p in tmp_path.glob("*.done")}
        assert done == {f"f{i}" for i in range(100)} | {f"c{i}" for i in range(10)} | {"sink"}
        # Each started after the previous one finished (their marker times say so too).
        times = [float((tmp_path / f"c{i}.done").read_text()) for i in range(10)]
        assert times == sorted(times)
        kinds = [e.type for e in await backend.events.query(sink)]  # type: ignore[union-attr]
        assert EventType.WAITING in kinds and EventType.SUCCEEDED in kinds


@pytest.mark.anyio
async def test_a_failed_dependency_cancels_its_dependents_or_runs_them(
    storage: Any, tmp_path: Path
) -> None:
    log = str(tmp_path)
    async with make(storage, events=True) as backend:
        bad = await backend.enqueue(FAIL, [log, "bad"], max_retries=0)
        good = await backend.enqueue(STEP, [log, "good", []])
        child = await backend.enqueue(STEP, [log, "child", ["bad"]], depends_on=[bad, good])
        grandchild = await backend.enqueue(STEP, [log, "grandchild", []], depends_on=[child])
        anyway = await backend.enqueue(
            STEP, [log, "anyway", ["good"]], depends_on=[bad, good], on_dependency_failure="run"
        )
        await run_workers(storage, backend)
        assert (await backend.get_task(bad)).status is TaskStatus.DEAD
        for task_id, cause in ((child, bad), (grandchild, child)):
            info = await backend.get_task(task_id)
            assert info.status is TaskStatus.CANCELLED
            assert info.error is not None and cause in info.error.message
            result = await backend.result(task_id, wait=30)
            assert result is not None and result.status is ResultStatus.FAILURE
            assert result.error is not None and cause in result.error.message
        assert not (tmp_path / "child.done").exists()
        assert not (tmp_path / "grandchild.done").exists()
        assert (await backend.result(anyway, wait=30)).ok  # type: ignore[union-attr]
        assert early(tmp_path) == []
        ran = float((tmp_path / "anyway.done").read_text())
        assert ran > float((tmp_path / "bad.failed").read_text())  # after the failure
        kinds = [e.type for e in await backend.events.query(child)]  # type: ignore[union-attr]
        assert EventType.CANCELLED in kinds


@pytest.mark.anyio
async def test_unknown_ids_and_cycles_are_refused_and_nothing_is_stored(storage: Any) -> None:
    async with make(storage) as backend:
        a = await backend.enqueue(STEP, ["/nonexistent", "a", []])
        before = await backend.queue.size()
        with pytest.raises(UnknownDependencyError, match="nope") as caught:
            await backend.enqueue(STEP, depends_on=[a, "nope"], task_id="t1")
        assert caught.value.task_ids == ["nope"]
        with pytest.raises(DependencyCycleError, match="itself"):
            await backend.enqueue(STEP, depends_on=[a], task_id=a)
        with pytest.raises(DependencyCycleError):
            await backend.enqueue(STEP, depends_on=["t2"], task_id="t2")
        b = await backend.enqueue(STEP, depends_on=[a], task_id="b")
        with pytest.raises(DependencyCycleError, match="would depend on itself"):
            await backend.enqueue(STEP, depends_on=[b], task_id=a)  # a <- b <- a
        for missing in ("t1", "t2"):
            with pytest.raises(Exception, match="not found"):
                await backend.get_task(missing)
        assert await backend.queue.size() == before
        assert (await backend.get_task(b)).status is TaskStatus.WAITING
        assert (await backend.get_task(a)).status is TaskStatus.PENDING
        # A cancelled waiting task is withdrawn: it never becomes ready.
        assert await backend.cancel(b)
        assert (await backend.get_task(b)).status is TaskStatus.CANCELLED


# -- review of issue 15 (each failed before its fix) -------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


async def status(queue: AsyncFileQueue, task_id: str) -> TaskStatus:
    return (await queue.get_task(task_id)).status


@pytest.mark.anyio
async def test_a_dependency_id_cannot_escape_base_dir(tmp_path: Path) -> None:
    """depends_on ids were never validated: '../..' in one was read and written outside
    base_dir (the link {q}/deps/{dep}/{id})."""
    base = tmp_path / "base"
    base.mkdir()
    (tmp_path / "outside.json").write_bytes(b"{}")  # any file outside base_dir
    queue = AsyncFileQueue(str(base))
    try:
        await queue.enqueue(Task(func="m:f", id="A"))
        await queue.enqueue(Task(func="m:f", id="W", depends_on=["A"]))  # wait/ and deps/ made
        with pytest.raises(ValueError, match="task id"):
            await queue.enqueue(Task(func="m:f", id="T", depends_on=["../../../outside"]))
    finally:
        await queue.close()
    assert not (tmp_path / "outside").exists(), "a link was written outside base_dir"
    backend = AsyncFileBackend(f"memory://{tmp_path.name}-escape", environ={})
    with pytest.raises(ValueError, match="task id"):
        backend.make_task("m:f", depends_on=["a/b"])


@pytest.mark.anyio
async def test_more_dependencies_than_the_cap_are_refused_writing_nothing(tmp_path: Path) -> None:
    queue = AsyncFileQueue(str(tmp_path))
    try:
        await queue.enqueue(Task(func="m:f", id="A"))
        many = ["A"] + [f"d{i}" for i in range(MAX_DEPENDENCIES)]
        with pytest.raises(DependencyError, match="limit"):
            await queue.enqueue(Task(func="m:f", id="T", depends_on=many))
        with pytest.raises(Exception, match="not found"):
            await queue.get_task("T")
        assert not (tmp_path / "default" / "deps").exists()
    finally:
        await queue.close()
    backend = AsyncFileBackend(f"memory://{tmp_path.name}-cap", environ={})
    with pytest.raises(DependencyError, match="limit"):
        backend.make_task("m:f", depends_on=many)


@pytest.mark.anyio
async def test_enqueueing_a_waiting_id_again_never_releases_it_early(tmp_path: Path) -> None:
    """Enqueue is idempotent for the same id, but a second enqueue of a waiting id with
    another dependency added a link (counting 1 dependency) by which that one released the
    task, although the dependency it was stored with never ran."""
    queue = AsyncFileQueue(f"file://{tmp_path}", clock=lambda: 1_000_000.0)
    try:
        await queue.enqueue(Task(func="m:f", id="A"))
        await queue.enqueue(Task(func="m:f", id="T", depends_on=["A"]))
        await queue.enqueue(Task(func="m:f", id="C"))
        await queue.enqueue(Task(func="m:f", id="T", depends_on=["C"]))  # 'idempotent'
        claimed = await queue.dequeue_many(2)
        await queue.ack(next(c for c in claimed if c.id == "C"))  # C done; A never acked
        await queue.close()  # the flush
        info = await queue.get_task("T")
        assert info.status is TaskStatus.WAITING, f"T is {info.status.value}; A never ran"
        assert info.task is not None and info.task.depends_on == ["A"]
        await queue.ack(next(c for c in claimed if c.id == "A"))
        await queue.close()
        assert await status(queue, "T") is TaskStatus.PENDING
    finally:
        await queue.close()


@pytest.mark.anyio
async def test_a_heartbeat_settles_what_is_owed_while_one_long_task_runs(tmp_path: Path) -> None:
    """Concurrency 1: the worker acks A, then claims and runs a long task B. The look at A's
    dependents was made only by dequeue, so T waited for all of B; now B's heartbeat (every
    lease/3) makes it once the last one is refresh_interval old."""
    clock = Clock()
    queue = AsyncFileQueue(str(tmp_path), clock=clock)
    try:
        for priority, task_id in enumerate(("B", "A", "X")):  # claimed X, A, B
            await queue.enqueue(Task(func="m:f", id=task_id, priority=priority))
        await queue.enqueue(Task(func="m:f", id="T", depends_on=["A"]))
        claimed = await queue.dequeue()
        assert claimed is not None and claimed.id == "X"
        await queue.ack(claimed)
        claimed = await queue.dequeue()  # settles what X owed: a settle was just made
        assert claimed is not None and claimed.id == "A"
        await queue.ack(claimed)
        long_task = await queue.dequeue()  # busy: the settle is not due yet
        assert long_task is not None and long_task.id == "B"
        assert await status(queue, "T") is TaskStatus.WAITING
        clock.t += queue.lease / 3
        long_task = await queue.extend_lease(long_task)
        assert await status(queue, "T") is TaskStatus.PENDING
    finally:
        await queue.close()


@pytest.mark.anyio
async def test_a_busy_queue_without_dependents_looks_for_them_less_often(tmp_path: Path) -> None:
    """A busy process looked at ``deps/`` once per refresh_interval (1 s) although no task
    had dependents: a request a second per worker on an object store. While its looks find
    no link the pace doubles up to QUIET_PACE intervals; a link seen brings back 1 s, and a
    dependent registered meanwhile is still released (at the next look; a long lease keeps
    the reaper, which would settle it too, out of the way)."""
    clock = Clock()
    queue = AsyncFileQueue(str(tmp_path), clock=clock, lease=3600)
    looks: list[float] = []
    program = queue._owed_program

    def counting(owed: Any) -> Any:
        looks.append(clock.t)
        return program(owed)

    queue._owed_program = counting  # type: ignore[method-assign]
    try:
        await queue.enqueue_many([Task(func="m:f", id=f"t{i:03d}") for i in range(120)])
        busy_until = clock.t + 40
        while clock.t < busy_until:  # a task acked every 0.5 s, never idle
            claimed = await queue.dequeue()
            assert claimed is not None
            await queue.ack(claimed)
            clock.t += 0.5
        gaps = [round(b - a, 1) for a, b in itertools.pairwise(looks)]
        assert gaps[:3] == [2.0, 4.0, 8.0], gaps
        assert max(gaps) == 8.0 and len(looks) <= 8, looks
        running = await queue.dequeue()  # D: a dependency of T registered while D runs
        assert running is not None
        await queue.enqueue(Task(func="m:f", id="T", depends_on=[running.id]))
        await queue.ack(running)
        before = len(looks)
        while await status(queue, "T") is TaskStatus.WAITING:
            claimed = await queue.dequeue()
            assert claimed is not None
            await queue.ack(claimed)
            clock.t += 0.5
        assert len(looks) == before + 1 and looks[-1] - looks[before - 1] <= 8.0, looks
        for _ in range(6):  # that look saw T's link: the next is 1 s later, then quiet again
            claimed = await queue.dequeue()
            assert claimed is not None
            await queue.ack(claimed)
            clock.t += 0.5
        gaps = [round(b - a, 1) for a, b in itertools.pairwise(looks[before:])]
        assert gaps[:2] == [1.0, 2.0], looks
    finally:
        await queue.close()


@pytest.mark.anyio
async def test_a_hungry_consumer_looks_for_dependents_at_the_same_pace(tmp_path: Path) -> None:
    """A worker of a hungry fleet finds nothing after most acks. Each empty dequeue settled
    at once and listed the queue again: on an object store a LIST of ``deps/`` and a
    listing more a task (16 workers on S3, a queue kept 100 deep: 0.33 LISTs of ``deps/`` a
    task, 0.05 now).
    Now an empty waiting dequeue settles at the busy pace (quiet: up to QUIET_PACE
    intervals), one that does not wait at once, and either lists again only after a look
    that saw links; a dependent is still released."""
    clock = Clock()
    queue = AsyncFileQueue(str(tmp_path), clock=clock, lease=3600)
    looks: list[float] = []
    scans: list[float] = []
    owed_program, scan_program = queue._owed_program, queue._scan_program

    def look(owed: Any) -> Any:
        looks.append(clock.t)
        return owed_program(owed)

    def scan(name: str) -> Any:
        scans.append(clock.t)
        return scan_program(name)

    queue._owed_program = look  # type: ignore[method-assign]
    queue._scan_program = scan  # type: ignore[method-assign]
    try:
        for i in range(80):  # one task at a time, taken, acked, then a dequeue finds nothing
            await queue.enqueue(Task(func="m:f", id=f"t{i:03d}"))
            claimed = await queue.dequeue()
            assert claimed is not None
            await queue.ack(claimed)
            assert await queue.dequeue(wait=0.001) is None  # waits, as a worker's calls do
            clock.t += 0.5
        gaps = [round(b - a, 1) for a, b in itertools.pairwise(looks)]
        assert len(looks) <= 8 and max(gaps) == 8.0, looks
        await queue.enqueue(Task(func="m:f", id="D"))
        running = await queue.dequeue()
        assert running is not None and running.id == "D"
        await queue.enqueue(Task(func="m:f", id="T", depends_on=["D"]))
        await queue.ack(running)
        before = len(looks)
        # The waiting dequeue whose look releases T lists again and takes it.
        while (got := await queue.dequeue(wait=0.01)) is None:
            clock.t += 0.5
        assert got.id == "T" and looks[-1] == clock.t, looks  # that call's own look
        assert len(looks) == before + 1 and looks[-1] - looks[before - 1] <= 8.0, looks
        await queue.ack(got)
        # A dequeue that does not wait (a burst worker's last look, a script's loop) looks at
        # once: its empty answer must not leave a dependent waiting on a look to come. It lists
        # the queue again only after a look that saw links.
        clock.t += 0.5
        await queue.enqueue(Task(func="m:f", id="E"))
        running = await queue.dequeue()
        assert running is not None
        await queue.ack(running)
        listed = len(scans)
        assert await queue.dequeue() is None
        assert looks[-1] == clock.t and len(scans) == listed + 1, (looks, len(scans) - listed)
        await queue.enqueue(Task(func="m:f", id="D2"))
        running = await queue.dequeue()
        assert running is not None and running.id == "D2"
        await queue.enqueue(Task(func="m:f", id="T2", depends_on=["D2"]))
        await queue.ack(running)
        got = await queue.dequeue()
        assert got is not None and got.id == "T2"
    finally:
        await queue.close()


@pytest.mark.anyio
async def test_cancelling_a_dependency_settles_its_dependents_at_once(tmp_path: Path) -> None:
    """A producer-only process (a web app) that cancels a dependency kept the settle in
    memory until close: its dependent stayed waiting."""
    queue = AsyncFileQueue(str(tmp_path))
    try:
        await queue.enqueue(Task(func="m:f", id="A"))
        await queue.enqueue(Task(func="m:f", id="T", depends_on=["A"]))
        assert await queue.cancel("A")
        assert await status(queue, "T") is TaskStatus.CANCELLED
    finally:
        await queue.close()


async def dead_dependency(queue: AsyncFileQueue) -> None:
    await queue.enqueue(Task(func="m:f", id="A"))
    await queue.enqueue(Task(func="m:f", id="T", depends_on=["A"]))
    claimed = await queue.dequeue()
    assert claimed is not None and claimed.id == "A"
    await queue.nack(claimed, error="boom", retry=False)


@pytest.mark.anyio
async def test_a_dead_dependency_requeued_before_the_flush_keeps_its_dependents(
    tmp_path: Path,
) -> None:
    """The flush cancelled the dependents with the DEAD state it remembered, although
    requeue_dead had put the dependency back meanwhile."""
    queue = AsyncFileQueue(str(tmp_path))
    try:
        await dead_dependency(queue)
        assert await queue.requeue_dead("default", "A") == 1
        await queue.close()  # the flush
        assert await status(queue, "T") is TaskStatus.WAITING
        claimed = await queue.dequeue()
        assert claimed is not None and claimed.id == "A"
        await queue.ack(claimed)
        await queue.close()
        assert await status(queue, "T") is TaskStatus.PENDING
    finally:
        await queue.close()


@pytest.mark.anyio
async def test_a_deleted_dead_letter_cancels_its_dependents_at_the_reaper(tmp_path: Path) -> None:
    """The process that dead-lettered A died before its flush, and A's dead letter was
    deleted: the reaper found A's outcome but nothing to locate, and kept T (and A's records)
    forever; it now settles A as gone."""
    queue = AsyncFileQueue(str(tmp_path))
    try:
        await dead_dependency(queue)
        queue._owed.clear()  # died before its flush
        assert await queue.delete_dead("default", "A")
        await queue.reap()
        assert await status(queue, "T") is TaskStatus.CANCELLED
        assert not list((tmp_path / "default" / "deps").glob("*/*")), "a link was left"
    finally:
        await queue.close()


@pytest.mark.anyio
async def test_a_gone_dependency_whose_result_succeeded_counts_as_met(tmp_path: Path) -> None:
    """A dependency found ended with nothing left to read how counted as failed even when
    the backend holds its success result (what the backend's enqueue already looks at)."""
    async with AsyncFileBackend(str(tmp_path), environ={}) as backend:
        queue = backend.queue
        await dead_dependency(queue)
        queue._owed.clear()
        assert await queue.delete_dead("default", "A")
        assert backend.results is not None
        await backend.results.set(TaskResult(task_id="A", status=ResultStatus.SUCCESS))
        await queue.reap()
        assert await status(queue, "T") is TaskStatus.PENDING


@pytest.mark.anyio
async def test_the_reaper_does_not_look_again_at_a_released_task_still_running(
    tmp_path: Path,
) -> None:
    """A released dependent that is itself a dependency (linked) was located on every reaper
    pass while it ran; now once, until a newer attempt of it ends."""
    queue = AsyncFileQueue(str(tmp_path))
    try:
        await queue.enqueue(Task(func="m:f", id="A"))
        await queue.enqueue(Task(func="m:f", id="T", depends_on=["A"]))
        await queue.enqueue(Task(func="m:f", id="U", depends_on=["T"]))
        claimed = await queue.dequeue()
        assert claimed is not None and claimed.id == "A"
        await queue.ack(claimed)
        await queue.close()  # flush: T released (its attempt 0 outcome), linked by U
        looked: list[str] = []
        locate = queue._locate_program

        def counting(q: str, task_id: str) -> Any:
            looked.append(task_id)
            return locate(q, task_id)

        queue._locate_program = counting  # type: ignore[method-assign]
        for _ in range(3):
            await queue.reap()
        assert looked.count("T") == 1, looked
        claimed = await queue.dequeue()
        assert claimed is not None and claimed.id == "T"
        await queue.ack(claimed)
        queue._owed.clear()  # died before its flush: the reaper looks again
        await queue.reap()
        assert looked.count("T") == 2, looked
        assert await status(queue, "U") is TaskStatus.PENDING
    finally:
        await queue.close()
