"""TaskThreads: the threads the worker runs plain task functions in on asyncio."""

from __future__ import annotations

import contextvars
import threading

import anyio
import anyio.from_thread
import pytest
import sniffio

from omniq.backend.file._task_threads import TaskThreads

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
