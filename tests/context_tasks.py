"""Task functions that take a ``TaskContext``, for tests/test_context.py and test_hooks.py.

Workers import them by path (``"context_tasks:name"``); subprocess workers and process pools
get ``tests/`` through ``PYTHONPATH``."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import anyio

from omniq.core import TaskContext


def describe(ctx: TaskContext, x: int) -> dict[str, Any]:
    """The context as the function saw it (a thread task), with ``x``."""
    ctx.update(seen=x)
    return {
        "task_id": ctx.task_id,
        "attempt": ctx.attempt,
        "queue": ctx.queue,
        "func": ctx.func,
        "worker_id": ctx.worker_id,
        "enqueued": ctx.enqueued_at.isoformat() if ctx.enqueued_at else None,
        "pid": os.getpid(),
        "x": x,
    }


async def async_describe(x: int, *, context: TaskContext) -> dict[str, Any]:
    """An async task taking the context by keyword, after its own argument."""
    context.update(seen=x)
    return {"task_id": context.task_id, "attempt": context.attempt, "x": x}


def plain(x: int) -> int:
    return x + 1


def report_then_wait(ctx: TaskContext, gate: str, steps: int = 3) -> str:
    """Reports ``steps`` of ``steps * 2`` with a message and metadata, then waits for the
    file ``gate`` to exist (the test controls it), then reports the rest."""
    for i in range(1, steps + 1):
        ctx.progress(i, steps * 2, message=f"step {i}")
    ctx.update(stage="waiting")
    while not Path(gate).exists():
        time.sleep(0.02)
    ctx.progress(steps * 2, steps * 2, message="done")
    ctx.update(stage="finished")
    return "ok"


async def async_report_then_wait(gate: str, ctx: TaskContext, steps: int = 3) -> str:
    for i in range(1, steps + 1):
        ctx.progress(i, steps * 2, message=f"step {i}")
    ctx.update(stage="waiting")
    while not Path(gate).exists():
        await anyio.sleep(0.02)
    ctx.progress(steps * 2, steps * 2, message="done")
    ctx.update(stage="finished")
    return "ok"


def tight_loop(ctx: TaskContext, calls: int) -> dict[str, float]:
    """Calls ``ctx.progress`` ``calls`` times as fast as it can; returns how long it took."""
    start = time.monotonic()
    for i in range(calls):
        ctx.progress(i + 1, calls)
    return {"seconds": time.monotonic() - start, "calls": calls}


def until_cancelled(ctx: TaskContext, gate: str) -> str:
    """Polls ``ctx.cancelled`` (touching ``gate`` once it runs) until asked to stop."""
    Path(gate).touch()
    try:
        while True:
            ctx.check_cancelled()
            time.sleep(0.01)
    finally:
        Path(f"{gate}.stopped").touch()


def fails(ctx: TaskContext) -> None:
    ctx.update(before="failing")
    raise RuntimeError("boom")


class RecordingHook:
    """A sync hook for ``omniq worker --hook context_tasks:RecordingHook`` (a class: the
    worker makes one); appends to the file named by $OMNIQ_TEST_HOOK_LOG."""

    def _log(self, *parts: Any) -> None:
        with open(os.environ["OMNIQ_TEST_HOOK_LOG"], "a") as out:
            out.write(" ".join(str(p) for p in parts) + "\n")

    def before_task(self, ctx: TaskContext) -> None:
        self._log("before", ctx.task_id, ctx.outcome)

    def after_task(self, ctx: TaskContext, result: Any) -> None:
        self._log("after", ctx.task_id, ctx.outcome, result)

    def on_failure(self, ctx: TaskContext, error: BaseException) -> None:
        self._log("failure", ctx.task_id, ctx.outcome, type(error).__name__)


def non_json_metadata(ctx: TaskContext) -> bool:
    """Tries to put a non-JSON value into ``ctx.metadata`` directly (review of issue 15);
    returns whether that was refused. Runs past a few heartbeats (lease 0.9 s)."""
    ctx.update(step=1)
    try:
        ctx.metadata["handle"] = object()  # type: ignore[index]
    except TypeError:
        refused = True
    else:
        refused = False
    time.sleep(0.6)
    return refused


def mutates_after_update(ctx: TaskContext) -> int:
    """Passes a list to ``update``, then grows it past the metadata limit and puts a non-JSON
    value in it; runs past a few heartbeats (lease 0.9 s)."""
    items: list[Any] = ["a"]
    ctx.update(items=items)
    items.extend(["x" * 1000] * 100)
    items.append(object())
    time.sleep(0.6)
    return len(items)


#: Runs per key, in this process (hook tests run their workers here).
RUNS: dict[str, int] = {}


def counted(key: str) -> int:
    RUNS[key] = RUNS.get(key, 0) + 1
    time.sleep(0.2)
    return 1
