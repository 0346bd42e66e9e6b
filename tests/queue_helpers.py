"""Helpers shared by the queue tests (imported by module name; tests/ is on sys.path)."""

from __future__ import annotations

import time
from typing import Any

from omniq.storage.file.queue import AsyncFileQueue


class FakeClock:
    """An epoch-seconds clock the test moves by hand (starts at the real time)."""

    def __init__(self) -> None:
        self.t = time.time()

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds

    def catch_up(self) -> None:
        """Move to the real time if behind it: what a store stamps with its own clock (a
        document claim's mtime) is then no later than this clock, however slow the calls
        before it were."""
        self.t = max(self.t, time.time())


def make_queue(storage: Any, **kwargs: Any) -> AsyncFileQueue:
    return AsyncFileQueue(storage.base_dir, storage.storage_options, **kwargs)


def count_scans(q: AsyncFileQueue) -> list[str]:
    """The queues ``q``'s claims list from now on (one entry per listing of a queue's head)."""
    scans: list[str] = []
    scan = q._scan_program

    def counted(queue: str) -> Any:
        scans.append(queue)
        return scan(queue)

    q._scan_program = counted  # type: ignore[method-assign]
    return scans
