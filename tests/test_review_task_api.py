"""Review of issue 15's task context, hooks and testing mode: FAILING tests that prove bugs
(see each docstring). Task functions are module-level here, imported by path."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import anyio
import pytest

from omniq.backend.file import AsyncFileBackend, TaskContext

RUNS: dict[str, int] = {}
_lock = threading.Lock()


def _count(key: str) -> None:
    with _lock:
        RUNS[key] = RUNS.get(key, 0) + 1


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def add(a: int, b: int) -> int:
    return a + b


def counted(key: str) -> int:
    _count(key)
    time.sleep(0.2)
    return 1


class SlowBefore:
    async def before_task(self, ctx: TaskContext) -> None:
        await anyio.sleep(2.0)  # a log shipper or exporter that stalls


@pytest.mark.anyio
async def test_a_slow_before_task_hook_does_not_let_the_task_run_twice() -> None:
    """before_task runs before the heartbeat starts: a hook slower than lease + clock_skew
    lets another worker take the task over, and the first worker then still calls the
    function with its expired lease: it runs twice."""
    key = uuid.uuid4().hex
    async with AsyncFileBackend(
        f"memory://review-hook-{uuid.uuid4().hex}", environ={}, lease=1.0, clock_skew=0.2
    ) as backend:
        await backend.enqueue(counted, (key,))
        slow: Any = backend.worker(burst=True, idle_timeout=3, poll=0.1, hooks=[SlowBefore()])
        other: Any = backend.worker(burst=True, idle_timeout=3, poll=0.1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(slow.run)
            await anyio.sleep(0.2)  # the slow one claims first
            tg.start_soon(other.run)
    assert RUNS[key] == 1, f"the task ran {RUNS[key]} times"
