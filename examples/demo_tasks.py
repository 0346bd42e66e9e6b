"""Task functions of ``examples/demo.py``.

A worker imports tasks by path (``"demo_tasks:fibonacci"``), so they live at module level in
an importable module, like your own tasks would.
"""

from __future__ import annotations

import time

import anyio

from omniq.core import TaskContext


def word_count(text: str) -> int:
    """A plain function: runs in the worker's thread pool."""
    return len(text.split())


def fibonacci(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


async def fetch(name: str, seconds: float) -> dict[str, object]:
    """An async function: runs on the worker's event loop (many at once cost no threads)."""
    await anyio.sleep(seconds)
    return {"name": name, "waited": seconds}


def remind(message: str) -> str:
    """Enqueued with ``delay=2``: it runs two seconds later."""
    return f"reminder: {message}"


def flaky(marker: str) -> str:
    """Fails on the first attempt (creating ``marker``) and succeeds on the retry."""
    try:
        with open(marker, "x") as f:  # exclusive: only the first attempt gets here
            f.write("first attempt failed\n")
    except FileExistsError:
        return "ok on the second attempt"
    raise ConnectionError("simulated outage on the first attempt")


async def slow(seconds: float) -> str:
    """Sleeps longer than its ``timeout``: the worker cancels it with TimeoutError."""
    await anyio.sleep(seconds)
    return "finished (should not happen in the demo)"


def broken(record: str) -> None:
    """Always fails: retried, then dead-lettered."""
    raise ValueError(f"cannot parse record {record!r}")


def resize_images(count: int, ctx: TaskContext) -> int:
    """Asks for its task context (a parameter annotated ``TaskContext``) and reports
    progress after each image; the worker persists it at most once per progress interval."""
    for done in range(1, count + 1):
        time.sleep(0.3)  # stands in for real work
        ctx.progress(done, count, f"image {done} of {count}")
    ctx.update(images=count)
    return count


def publish(album: str) -> str:
    """Enqueued with ``depends_on``: runs only once the tasks it depends on have succeeded."""
    return f"published {album}"
