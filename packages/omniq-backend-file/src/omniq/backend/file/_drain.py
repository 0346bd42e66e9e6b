"""Testing mode: run the queued tasks in this process, through the real worker.

``AsyncFileBackend.drain`` and the backend's ``immediate`` setting use it. Tasks run exactly
as a worker runs them (``AsyncWorker`` in burst mode): results, events and retries are the
production ones. Delayed and retrying tasks are made due without waiting by a second queue
on the same storage whose clock runs ahead just enough: the backend's own queue, and every
other process, keep the real time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from omniq.core.interfaces import AsyncEventStorage, AsyncResultStorage, WorkerSettings
from omniq.core.models import TaskEvent
from omniq.storage.file.queue import AsyncFileQueue

from ._worker import AsyncWorker

if TYPE_CHECKING:
    from ._backend import AsyncFileBackend

#: Worker settings of a drain: stop as soon as nothing is ready (no idle wait), look again
#: every 20 ms while tasks run, no signal handling, no schedules, no clean-up rounds.
DRAIN_WORKER: dict[str, Any] = {
    "burst": True,
    "idle_timeout": 0.0,
    "burst_horizon": 0.0,
    "poll": 0.02,
    "handle_signals": False,
    "schedules": False,
    "cleanup_interval": 86_400.0,
    "sweep_interval": None,
}


class _AheadClock:
    """The queue's clock plus an offset that only grows (time never runs backwards)."""

    def __init__(self, base: Any) -> None:
        self.base = base
        self.offset = 0.0

    def __call__(self) -> float:
        return float(self.base()) + self.offset

    def reach(self, when: datetime) -> None:
        """Move ahead so that ``when`` is (just) past."""
        self.offset += max(0.0, when.timestamp() - self() + 0.001)


class _AheadBackend:
    """The backend as a worker sees it, with ``queue`` replaced by the clock-ahead queue."""

    def __init__(self, backend: AsyncFileBackend, queue: AsyncFileQueue) -> None:
        self._backend = backend
        self.queue = queue

    @property
    def results(self) -> AsyncResultStorage | None:
        return self._backend.results

    @property
    def events(self) -> AsyncEventStorage | None:
        return self._backend.events

    @property
    def config(self) -> WorkerSettings:
        return self._backend.config

    async def emit(self, event: TaskEvent) -> None:
        await self._backend.emit(event)

    def __getattr__(self, name: str) -> Any:  # whatever else a worker looks up
        return getattr(self._backend, name)


async def drain(
    backend: AsyncFileBackend,
    queues: Sequence[str] | str | None = None,
    *,
    include_scheduled: bool = False,
    concurrency: int = 1,
    max_rounds: int = 1000,
    **worker_options: Any,
) -> dict[str, int]:
    """See ``AsyncFileBackend.drain``."""
    names = [queues] if isinstance(queues, str) else list(queues or ())
    if queues is None:
        names = await backend.queue.list_queues()
    totals: dict[str, int] = {}
    if not names:
        return dict.fromkeys(AsyncWorker(backend, "default").stats, 0)
    clock: _AheadClock | None = None
    target: Any = backend
    if include_scheduled:
        cfg = backend.config
        part = cfg.part("queue")
        clock = _AheadClock(backend.queue.store.clock)
        ahead = AsyncFileQueue(
            part.base_dir,
            part.storage_options,
            lease=cfg.lease,
            clock_skew=cfg.clock_skew,
            on_event=backend.emit,
            shards=cfg.queue_shards,
            clock=clock,
        )
        # It only claims: by its clock every lease held elsewhere (another worker, the task
        # that called drain in immediate mode) would look expired and every record old, so
        # its reaper would take live claims over and clean up what is still needed.
        ahead.reap_interval = math.inf
        target = _AheadBackend(backend, ahead)
    options = {**DRAIN_WORKER, **worker_options}
    previous_due: datetime | None = None
    try:
        for _ in range(max_rounds):
            worker = AsyncWorker(target, names, concurrency, **options)
            stats = await worker.run()
            for key, value in stats.items():
                totals[key] = totals.get(key, 0) + value
            if queues is None:  # a task may have enqueued into a new queue
                found = await backend.queue.list_queues()
                if set(found) - set(names):
                    names = found
                    continue
            if clock is None:
                return totals
            due = await _earliest_due(target.queue, names)
            if due is None:
                return totals
            if due.timestamp() > clock():
                clock.reach(due)
            elif not stats["claimed"] and due == previous_due:
                return totals  # a marker no claim can take: nothing more will run
            previous_due = due
        raise RuntimeError(
            f"drain: tasks still due after {max_rounds} rounds of the worker (a task that "
            "keeps scheduling work?); raise max_rounds if that is expected"
        )
    finally:
        if target is not backend:
            await target.queue.close()


async def _earliest_due(queue: AsyncFileQueue, names: Sequence[str]) -> datetime | None:
    found = [due for name in names if (due := await queue.next_due(name)) is not None]
    return min(found, default=None)
