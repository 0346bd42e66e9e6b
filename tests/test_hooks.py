"""Worker hooks: before_task / after_task / on_failure called in order with the attempt's
context (``ctx.outcome`` set once the outcome is recorded), sync and async; a hook that
raises is logged and never changes or loses the task; ``omniq worker --hook``."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

import context_tasks
from omniq.backend.file import AsyncFileBackend, TaskContext
from omniq.core.models import ResultStatus

TESTS_DIR = Path(__file__).resolve().parent
QUICK = pytest.mark.parametrize("storage", ["memory", "local"], indirect=True)
BURST = {"burst": True, "idle_timeout": 0.3, "poll": 0.1}


@pytest.fixture
def anyio_backend():
    return "asyncio"


def make(storage, **settings: Any) -> AsyncFileBackend:
    return AsyncFileBackend(storage.base_dir, storage.storage_options, environ={}, **settings)


class SyncHook:
    def __init__(self, calls: list[tuple[Any, ...]]) -> None:
        self.calls = calls

    def before_task(self, ctx: TaskContext) -> None:
        self.calls.append(("sync before", ctx.task_id, ctx.attempt, ctx.outcome))

    def after_task(self, ctx: TaskContext, result: Any) -> None:
        self.calls.append(("sync after", ctx.task_id, ctx.attempt, ctx.outcome, result))

    def on_failure(self, ctx: TaskContext, error: BaseException) -> None:
        self.calls.append(("sync failure", ctx.task_id, ctx.attempt, ctx.outcome, str(error)))


class AsyncHook:
    """Only two of the methods, async; it also looks the result up when a task ends."""

    def __init__(self, backend: AsyncFileBackend, calls: list[tuple[Any, ...]]) -> None:
        self.backend, self.calls = backend, calls

    async def before_task(self, ctx: TaskContext) -> None:
        self.calls.append(("async before", ctx.task_id, ctx.attempt, ctx.outcome))

    async def after_task(self, ctx: TaskContext, result: Any) -> None:
        stored = await self.backend.result(ctx.task_id)  # recorded before the hook runs
        self.calls.append(("async after", ctx.task_id, ctx.outcome, stored and stored.value))


class Broken:
    def before_task(self, ctx: TaskContext) -> None:
        raise RuntimeError("hook before broke")

    async def after_task(self, ctx: TaskContext, result: Any) -> None:
        raise RuntimeError("hook after broke")

    def on_failure(self, ctx: TaskContext, error: BaseException) -> None:
        raise RuntimeError("hook failure broke")


@QUICK
@pytest.mark.anyio
async def test_hooks_are_called_in_order_with_the_context_and_the_outcome(storage):
    calls: list[tuple[Any, ...]] = []
    async with make(storage) as backend:
        ok = await backend.enqueue("context_tasks:plain", [1])
        worker = backend.worker(
            concurrency=1, hooks=[SyncHook(calls), AsyncHook(backend, calls)], **BURST
        )
        await worker.run()
        assert calls == [
            ("sync before", ok, 1, None),
            ("async before", ok, 1, None),
            ("sync after", ok, 1, "done", 2),
            ("async after", ok, "done", 2),
        ]
        calls.clear()
        bad = await backend.enqueue("context_tasks:fails", max_retries=1, retry_backoff=0.0)
        await worker.run()
        assert calls == [
            ("sync before", bad, 1, None),
            ("async before", bad, 1, None),
            ("sync failure", bad, 1, "retried", "boom"),
            ("sync before", bad, 2, None),
            ("async before", bad, 2, None),
            ("sync failure", bad, 2, "dead", "boom"),
        ]


@QUICK
@pytest.mark.anyio
async def test_a_raising_hook_is_logged_and_loses_no_task(storage, caplog):
    calls: list[tuple[Any, ...]] = []
    caplog.set_level(logging.ERROR, logger="omniq.worker")
    async with make(storage) as backend:
        ok = await backend.enqueue("context_tasks:plain", [1])
        bad = await backend.enqueue("context_tasks:fails")
        worker = backend.worker(concurrency=1, hooks=[Broken(), SyncHook(calls)], **BURST)
        stats = await worker.run()
        assert stats["succeeded"] == 1 and stats["dead"] == 1
        result = await backend.result(ok)
        assert result is not None and result.status is ResultStatus.SUCCESS and result.value == 2
        failed = await backend.result(bad)
        assert failed is not None and failed.error is not None and failed.error.message == "boom"
        # The hooks after the broken one still ran, each time.
        assert [c[0] for c in calls if c[1] == ok] == ["sync before", "sync after"]
        assert [c[0] for c in calls if c[1] == bad] == ["sync before", "sync failure"]
    logged = [r.getMessage() for r in caplog.records if r.name == "omniq.worker"]
    for name in ("before_task", "after_task", "on_failure"):
        assert any(f".{name} failed for task" in m for m in logged), logged


def test_an_object_without_hook_methods_is_refused(tmp_path):
    backend = AsyncFileBackend(str(tmp_path / "q"), environ={})
    with pytest.raises(TypeError, match="before_task"):
        backend.worker(hooks=[object()])


def test_omniq_worker_loads_hooks_by_path(tmp_path):
    base, log = str(tmp_path / "q"), tmp_path / "hook.log"
    env = dict(os.environ, OMNIQ_TEST_HOOK_LOG=str(log))
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), *filter(None, [env.get("PYTHONPATH")])])
    from omniq.backend.file import FileBackend

    with FileBackend(base, environ={}) as backend:
        task_id = backend.enqueue("context_tasks:plain", [41])
    omniq = str(Path(sys.executable).with_name("omniq"))
    args = [omniq, "worker", base, "--burst", "--hook", "context_tasks:RecordingHook"]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert log.read_text().splitlines() == [f"before {task_id} None", f"after {task_id} done 42"]
    wrong = subprocess.run(
        [*args[:-1], "context_tasks:nothing_here"], env=env, capture_output=True, text=True
    )
    assert wrong.returncode == 2 and "nothing_here" in wrong.stderr


class SlowBefore:
    async def before_task(self, ctx: TaskContext) -> None:
        await anyio.sleep(30)  # an exporter that stalls


class HungAfter:
    def __init__(self) -> None:
        self.cancelled = 0

    async def after_task(self, ctx: TaskContext, result: Any) -> None:
        try:
            await anyio.sleep(3600)
        except anyio.get_cancelled_exc_class():
            self.cancelled += 1
            raise


@pytest.mark.anyio
async def test_a_slow_before_task_hook_does_not_let_the_task_run_twice() -> None:
    """before_task runs before the first heartbeat: it is cut short after a third of the
    lease. A hook slower than lease + clock_skew let another worker take the task over while
    the first still called the function: it ran twice (review of issue 15; failed before)."""
    key = f"slow-before-{os.getpid()}-{id(object())}"
    async with AsyncFileBackend(
        f"memory://hooks-slow/{key}", environ={}, lease=1.0, clock_skew=0.2
    ) as backend:
        await backend.enqueue(context_tasks.counted, (key,))
        slow: Any = backend.worker(burst=True, idle_timeout=3, poll=0.1, hooks=[SlowBefore()])
        other: Any = backend.worker(burst=True, idle_timeout=3, poll=0.1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(slow.run)
            await anyio.sleep(0.2)  # the slow one claims first
            tg.start_soon(other.run)
    assert context_tasks.RUNS[key] == 1, f"the task ran {context_tasks.RUNS[key]} times"


@pytest.mark.anyio
async def test_a_hung_async_hook_is_cancelled_after_hook_timeout() -> None:
    """An after_task that never returns held its slot for ever and a stopping worker waited
    for it for ever; now it is cancelled after hook_timeout and the worker goes on."""
    hung = HungAfter()
    async with AsyncFileBackend(f"memory://hooks-hung/{os.getpid()}", environ={}) as backend:
        ids = [await backend.enqueue(context_tasks.plain, (n,)) for n in range(3)]
        worker: Any = backend.worker(
            burst=True, idle_timeout=0.2, poll=0.05, concurrency=1, hooks=[hung], hook_timeout=0.3
        )
        with anyio.fail_after(30):
            stats = await worker.run()
        assert stats["succeeded"] == 3 and hung.cancelled == 3
        assert [(await backend.result(i)).value for i in ids] == [1, 2, 3]  # type: ignore[union-attr]


@pytest.mark.anyio
async def test_the_hook_timeout_is_shared_and_ends_the_call(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Hooks.call directly: sync hooks run in order with no timeout of their own; the async
    ones share ``timeout``; once one is cancelled the hooks after it are not called."""
    from omniq.backend.file._task_context import Hooks

    calls: list[str] = []

    class Sync:
        def after_task(self, ctx: Any, result: Any) -> None:
            calls.append("sync")

    class Quick:
        async def after_task(self, ctx: Any, result: Any) -> None:
            await anyio.sleep(0.2)
            calls.append("quick")

    hung = HungAfter()
    hooks = Hooks([Sync(), Quick(), hung, Sync()])
    ctx: Any = type("Ctx", (), {"task_id": "t1"})()
    caplog.set_level(logging.WARNING, logger="omniq.worker")
    start = anyio.current_time()
    await hooks.call("after_task", ctx, None, timeout=0.5)
    took = anyio.current_time() - start
    assert calls == ["sync", "quick"] and hung.cancelled == 1  # the last Sync is not called
    assert 0.4 < took < 5  # Quick's 0.2 s counted against the shared 0.5 s
    assert "hooks' after_task for task t1 cancelled after 0.5 s" in caplog.text
    calls.clear()
    await Hooks([Sync(), Quick(), Sync()]).call("after_task", ctx, None, timeout=0.5)
    assert calls == ["sync", "quick", "sync"]
