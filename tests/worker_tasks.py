"""Module-level task functions for the backend and worker tests.

Workers import them by path (``"worker_tasks:add"``): ``tests/`` is on ``sys.path`` under
pytest (rootdir conftest), and subprocess workers get it through ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import sniffio

NOT_CALLABLE = 42
"""A module attribute that is not a function (a task naming it must fail at once)."""

#: In-process records of running intervals, by key: (start, end) monotonic times.
INTERVALS: dict[str, list[tuple[float, float]]] = {}
_lock = threading.Lock()


# -- plain results -----------------------------------------------------------------------------
def add(a: int, b: int) -> int:
    return a + b


async def async_mul(a: int, b: int) -> int:
    await anyio.sleep(0)
    return a * b


def shout(text: str) -> str:
    return text.upper() + "!"


async def async_shout(text: str) -> str:
    await anyio.sleep(0)
    return text.upper() + "!"


def echo_kwargs(**kwargs: Any) -> dict[str, Any]:
    """Returns its keyword arguments: shows that ``timeout``/``queue``/``priority`` reach it."""
    return kwargs


# -- where a task runs -------------------------------------------------------------------------
def _library() -> str | None:
    try:
        return sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        return None


def where_sync() -> dict[str, Any]:
    return {"thread": threading.get_ident(), "library": _library(), "pid": os.getpid()}


async def where_async() -> dict[str, Any]:
    await anyio.sleep(0)
    return {"thread": threading.get_ident(), "library": _library(), "pid": os.getpid()}


def cpu_bound(n: int) -> dict[str, int]:
    """Burns some CPU, then says which process it ran in."""
    total = 0
    for i in range(n):
        total += i * i % 7
    return {"pid": os.getpid(), "total": total}


# -- timing ------------------------------------------------------------------------------------
async def async_sleep(seconds: float) -> str:
    await anyio.sleep(seconds)
    return "slept"


def sync_sleep(seconds: float) -> str:
    time.sleep(seconds)
    return "slept"


async def block_the_loop(seconds: float) -> str:
    """An async function that blocks its event loop (a mistake the worker reports)."""
    time.sleep(seconds)
    return "blocked"


async def record_async(key: str, seconds: float) -> float:
    start = time.monotonic()
    await anyio.sleep(seconds)
    end = time.monotonic()
    with _lock:
        INTERVALS.setdefault(key, []).append((start, end))
    return end - start


def record_sync(key: str, seconds: float) -> float:
    start = time.monotonic()
    time.sleep(seconds)
    end = time.monotonic()
    with _lock:
        INTERVALS.setdefault(key, []).append((start, end))
    return end - start


# -- failures ----------------------------------------------------------------------------------
def always_fail(message: str) -> None:
    raise ValueError(message)


def returns_a_set() -> set[int]:
    return {1, 2}


def fail_once(marker: str) -> str:
    """Fails the first time (creating ``marker``), succeeds afterwards."""
    path = Path(marker)
    if not path.exists():
        path.write_text("failed once")
        raise RuntimeError("first attempt fails")
    return "second time lucky"


# -- long tasks that are quick the second time -------------------------------------------------
async def slow_first_run(marker: str, seconds: float) -> str:
    """Sleeps ``seconds`` on its first run (creating ``marker``); returns at once on later runs."""
    path = Path(marker)
    if path.exists():
        return "quick rerun"
    path.write_text("started")
    await anyio.sleep(seconds)
    return "slow first run"


def sleep_first_run(marker_dir: str, name: str, seconds: float) -> str:
    """Blocking twin of ``slow_first_run`` for the subprocess (SIGKILL) test: the marker
    ``marker_dir/name`` tells the test that the first run has started."""
    path = Path(marker_dir) / name
    if path.exists():
        return f"{name} rerun in {os.getpid()}"
    path.write_text(str(os.getpid()))
    time.sleep(seconds)
    return f"{name} first run"


def empty_next() -> Any:
    """Raises StopIteration (``next`` of an empty iterator): a future refuses it as is."""
    return next(iter([]))
