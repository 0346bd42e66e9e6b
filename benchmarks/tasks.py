"""Task functions the benchmark workers run (referenced as ``benchmarks.tasks:noop``)."""

from __future__ import annotations


def noop(*args: object) -> None:
    """Does nothing: the measurement is the queue's cost around it."""


async def anoop(*args: object) -> None:
    """Async twin of :func:`noop` (runs on the worker's event loop, no thread hop)."""


def stamp(*args: object) -> float:
    """Returns ``time.time()`` when it starts: the pick-up benchmark's clock on the worker."""
    import time

    return time.time()
