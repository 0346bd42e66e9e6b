"""Module-level task functions for tests/test_testing_mode.py (workers import them by path)."""

from __future__ import annotations

import threading

import anyio

from omniq.backend.file import AsyncFileBackend

#: Calls per key, in this process (the testing mode runs tasks here).
CALLS: dict[str, int] = {}
_lock = threading.Lock()


def _count(key: str) -> int:
    with _lock:
        CALLS[key] = CALLS.get(key, 0) + 1
        return CALLS[key]


def add(a: int, b: int) -> int:
    return a + b


async def async_mul(a: int, b: int) -> int:
    await anyio.sleep(0)
    return a * b


def fail_until(key: str, succeed_on: int) -> int:
    """Raises until its ``succeed_on``-th call for ``key``, then returns the call number."""
    n = _count(key)
    if n < succeed_on:
        raise RuntimeError(f"{key}: call {n} fails")
    return n


async def spawn(base_dir: str, queue: str, n: int) -> int:
    """Enqueues ``n`` additions into ``queue`` of the backend at ``base_dir``."""
    backend = AsyncFileBackend(base_dir)
    try:
        for i in range(n):
            await backend.enqueue(add, (i, i), queue=queue)
    finally:
        await backend.close()
    return n


def parent_enqueues_a_delayed_child(base_dir: str, key: str) -> str:
    """Counts its runs, then enqueues a task delayed by an hour on an immediate backend."""
    _count(key)
    from omniq.backend.file import FileBackend

    with FileBackend(base_dir, environ={}, immediate=True) as backend:
        backend.enqueue(add, (1, 1), delay=3600)
    return "ok"
