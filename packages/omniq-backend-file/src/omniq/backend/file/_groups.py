"""The error ``AsyncWorker.run`` raises for an exception group out of its task group."""

from __future__ import annotations

import asyncio
import logging
import sys

log = logging.getLogger("omniq.worker")


def leaves(exc: BaseException) -> list[BaseException]:
    inner = getattr(exc, "exceptions", None)
    if not isinstance(inner, tuple):
        return [exc]
    return [leaf for item in inner for leaf in leaves(item)]


def first_error(group: BaseException) -> BaseException:
    """The error to raise for an exception group out of the worker's task group: an
    interruption (KeyboardInterrupt, SystemExit) first, else the first real error; the others
    are logged and noted on it. The group itself if it holds only cancellations."""
    found = leaves(group)
    cancelled: tuple[type[BaseException], ...] = (asyncio.CancelledError,)
    trio = sys.modules.get("trio")
    if trio is not None:
        cancelled += (trio.Cancelled,)
    real = [e for e in found if not isinstance(e, cancelled)]
    if not real:
        return group
    first = next((e for e in real if not isinstance(e, Exception)), real[0])
    for other in real:
        if other is not first:
            log.error(
                "worker also failed with %s: %s",
                type(other).__name__,
                other,
                exc_info=(type(other), other, other.__traceback__),
            )
            if hasattr(first, "add_note"):
                first.add_note(f"the worker also failed with {type(other).__name__}: {other}")
    return first
