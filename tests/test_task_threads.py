"""TaskThreads: the threads the worker runs plain task functions in on asyncio."""

from __future__ import annotations

import contextvars
import queue
import threading
import time
from typing import Any

import anyio
import anyio.from_thread
import pytest
import sniffio

import worker_tasks
from omniq.backend.file import AsyncFileBackend
from omniq.backend.file._task_threads import TaskThreads
from omniq.core.models import ResultStatus

pytestmark = pytest.mark.anyio

VAR: contextvars.ContextVar[str] = contextvars.ContextVar("VAR", default="unset")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_values_errors_and_the_callers_context() -> None:
    threads = TaskThreads()
    VAR.set("caller")

    def look() -> tuple[str, str | None, bool]:
        try:
            library = sniffio.current_async_library()
        except sniffio.AsyncLibraryNotFoundError:
            library = None
        return VAR.get(), library, threading.current_thread() is threading.main_thread()

    assert await threads.run(look) == ("caller", None, False)

    async def on_the_loop() -> bool:
        return threading.current_thread() is threading.main_thread()

    # As in anyio's worker threads: anyio.from_thread finds the loop without a token.
    assert await threads.run(lambda: anyio.from_thread.run(on_the_loop)) is True

    def fail() -> None:
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        await threads.run(fail)
    with anyio.fail_after(10), pytest.raises(RuntimeError, match="StopIteration"):
        await threads.run(lambda: next(iter([])))  # set_exception refuses StopIteration
    assert await threads.run(anyio.from_thread.check_cancelled) is None
    for n in range(5):  # one call at a time: the idle thread is reused
        assert await threads.run(lambda n=n: n * 2) == n * 2
    assert threads.started == 1


async def test_an_abandoned_call_does_not_delay_the_next_one() -> None:
    """A task timed out in its thread keeps that thread; the next task gets another at once
    (a fixed pool would queue it behind the abandoned one, its timeout running)."""
    threads = TaskThreads()
    release = threading.Event()
    with anyio.move_on_after(0.2) as scope:
        await threads.run(lambda: release.wait(30))
    assert scope.cancelled_caught and not release.is_set()
    with anyio.fail_after(10):
        assert await threads.run(lambda: "next") == "next"
    assert threads.started == 2
    release.set()


async def test_a_cancelled_caller_starts_nothing() -> None:
    threads = TaskThreads()
    ran: list[int] = []
    with anyio.CancelScope() as scope:
        scope.cancel()
        await threads.run(lambda: ran.append(1))
    await anyio.sleep(0.1)
    assert ran == [] and threads.started == 0


async def test_more_calls_at_once_than_anyios_default_limit_of_40() -> None:
    """50 calls that each wait for all 50: anyio.to_thread's default limiter (40 threads)
    would leave 10 of them waiting for ever."""
    threads = TaskThreads()
    barrier = threading.Barrier(50, timeout=20)
    results: list[int] = []

    async def one() -> None:
        results.append(await threads.run(barrier.wait))

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for _ in range(50):
                tg.start_soon(one)
    assert sorted(results) == list(range(50))


async def test_a_call_cancelled_before_its_thread_takes_it_is_not_run() -> None:
    threads = TaskThreads()
    gate = threading.Event()

    class Held(queue.SimpleQueue):  # type: ignore[type-arg]
        def get(self, *args: Any, **kwargs: Any) -> Any:
            gate.wait(10)  # the thread takes the job only after the caller gave up
            return super().get(*args, **kwargs)

    threads._jobs = Held()
    ran: list[int] = []
    with anyio.move_on_after(0.1):
        await threads.run(lambda: ran.append(1))
    gate.set()
    assert await threads.run(lambda: "after") == "after"  # the thread went on to the next
    assert ran == []


async def test_a_task_raising_stopiteration_fails_instead_of_hanging() -> None:
    """Before: the future was never settled and the worker held the task for ever."""
    async with AsyncFileBackend("memory://threads-stop-iteration", environ={}) as backend:
        task_id = await backend.enqueue(worker_tasks.empty_next, max_retries=0)
        worker = backend.worker(burst=True, idle_timeout=0.2, poll=0.05)
        with anyio.fail_after(30):
            await worker.run()
        result = await backend.result(task_id)
        assert result is not None and result.status is ResultStatus.FAILURE
        assert result.error is not None and "StopIteration" in result.error.message


async def test_outcomes_that_end_together_wake_the_loop_once(monkeypatch) -> None:
    """Each outcome handed to the loop on its own was a self-pipe write and a loop wake-up
    (a worker's no-op tasks end a few at a time). Eight that end while the loop is busy are
    handed over together; their values and errors each reach their own caller."""
    threads = TaskThreads()
    hand_overs = []
    real = TaskThreads._hand_over

    def counted(self: TaskThreads) -> None:
        hand_overs.append(len(self._done))
        real(self)

    monkeypatch.setattr(TaskThreads, "_hand_over", counted)

    go = threading.Event()

    def job(n: int) -> int:
        assert go.wait(10)
        if n == 3:
            raise ValueError(n)
        return n * 10

    async def call(n: int, out: dict[int, Any]) -> None:
        try:
            out[n] = await threads.run(lambda: job(n))
        except ValueError as exc:
            out[n] = exc

    out: dict[int, Any] = {}
    async with anyio.create_task_group() as tg:
        for n in range(8):
            tg.start_soon(call, n, out)
        await anyio.sleep(0.01)  # every call queued its job, which waits for ``go``
        go.set()
        deadline = time.monotonic() + 10
        while len(threads._done) < 8:  # the loop kept busy while all eight outcomes land
            assert time.monotonic() < deadline, threads._done
            time.sleep(0.001)
    assert hand_overs == [8]
    assert {n: v for n, v in out.items() if n != 3} == {n: n * 10 for n in range(8) if n != 3}
    assert isinstance(out[3], ValueError)
