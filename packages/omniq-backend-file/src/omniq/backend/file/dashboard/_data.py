"""What the dashboard pages read, and the little it keeps in memory between refreshes.

Each page reads only what it shows: the queues page one ``size`` per queue (which lists the
queue's ready, scheduled, running and dead entries, not its results), listings one page of
``list_tasks``, a task page one task's records, result and event index, the throughput chart
the event files recorded since its last read. Nothing here walks the results or the whole
event history, so one refresh costs the same at 100 or 100,000 finished tasks (the chart:
it follows the tasks finishing now, not those finished before).

Kept in this process's memory (lost on restart, never written to the storage): samples of
the queue counts taken at each refresh of the queues page (the depth sparklines), the
per-minute count of finished tasks read from the events (the throughput chart), and the
workers seen in running claims.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from omniq.core.errors import NotFoundError
from omniq.core.models import (
    UTC,
    EventType,
    QueueSize,
    TaskEvent,
    TaskInfo,
    TaskResult,
    TaskStatus,
    from_epoch,
)
from omniq.storage.file.events import Tail

#: How far back the charts reach (seconds).
WINDOW = 15 * 60.0
#: The events are read at most this often for the throughput chart (seconds).
THROUGHPUT_EVERY = 5.0
#: Seconds of event time listed again on each throughput refresh: event files may land
#: this late (batches are written after their events).
LOOKBACK = 10.0
#: Workers stay listed this long after their last running claim was seen (seconds).
WORKER_MEMORY = 10 * 60.0
#: Statuses a listing can show (what ``list_tasks`` lists).
LISTED = ("pending", "scheduled", "waiting", "running", "dead")
FINISHED_EVENTS = (EventType.SUCCEEDED, EventType.FAILED, EventType.DEAD_LETTERED)


@dataclass
class Page:
    """One page of a listing; ``next`` is the cursor of the following page (None: last)."""

    items: list[TaskInfo]
    next: str | None = None
    complete: bool = True  # False: this listing cannot page further (no list_tasks)


@dataclass
class QueueRow:
    name: str
    size: QueueSize
    depth: list[tuple[float, float]]  # (time, ready + scheduled + running) samples


@dataclass
class WorkerSeen:
    worker_id: str
    last_seen: float
    queues: set[str] = field(default_factory=set)
    running: int = 0  # in the latest sample


@dataclass
class Attempt:
    """One attempt of a task as its events tell it."""

    number: int
    started: datetime | None = None
    worker_id: str | None = None
    outcome: str | None = None
    ended: datetime | None = None
    duration: float | None = None
    error: Any = None


@dataclass
class TaskView:
    task_id: str
    info: TaskInfo | None
    result: TaskResult | None
    events: list[TaskEvent] | None  # None: events are off
    attempts: list[Attempt]

    @property
    def found(self) -> bool:
        return self.info is not None or self.result is not None or bool(self.events)


class Monitor:
    """The dashboard's reads of one backend (an ``AsyncFileBackend``)."""

    def __init__(self, backend: Any, clock: Callable[[], float] = time.time) -> None:
        self.backend = backend
        self.clock = clock
        self._depth: dict[str, deque[tuple[float, float]]] = {}
        self._finished: dict[int, int] = {}  # minute (epoch // 60) -> finished tasks
        self._tail: Tail | None = None  # where the throughput's reading of events stands
        self._events_read_at = 0.0
        self._workers: dict[str, WorkerSeen] = {}

    @property
    def events_on(self) -> bool:
        return self.backend.events is not None

    @property
    def results_on(self) -> bool:
        return self.backend.results is not None

    @property
    def has_listing(self) -> bool:
        return callable(getattr(self.backend, "list_tasks", None))

    # -- queues ------------------------------------------------------------------------------
    async def queues(self) -> list[QueueRow]:
        """Every queue with its counts; records a depth sample for the sparklines."""
        queue = self.backend.queue
        now = self.clock()
        rows = []
        for name in await queue.list_queues():
            size = await queue.size(name)
            samples = self._depth.setdefault(name, deque())
            samples.append((now, float(size.ready + size.scheduled + size.running)))
            while samples and samples[0][0] < now - WINDOW:
                samples.popleft()
            rows.append(QueueRow(name, size, list(samples)))
        return rows

    async def throughput(self) -> list[tuple[float, float]] | None:
        """Finished tasks (succeeded, failed, dead-lettered) per minute over the window, from
        the events; None when events are off. At most every THROUGHPUT_EVERY seconds, one
        ``tail`` of the event storage: only the event files recorded since the last read
        (plus a LOOKBACK) are listed and read, however many the hour partition holds."""
        events = self.backend.events
        if events is None:
            return None
        now = self.clock()
        if now - self._events_read_at >= THROUGHPUT_EVERY:
            self._events_read_at = now
            if self._tail is None:
                self._tail = Tail(from_epoch(now - WINDOW), LOOKBACK)
            for event in await events.tail(self._tail, FINISHED_EVENTS):
                minute = int(event.time.timestamp() // 60)
                self._finished[minute] = self._finished.get(minute, 0) + 1
            oldest = int((now - WINDOW) // 60)
            self._finished = {m: c for m, c in self._finished.items() if m >= oldest}
        first, last = int((now - WINDOW) // 60) + 1, int(now // 60)
        return [(m * 60.0, float(self._finished.get(m, 0))) for m in range(first, last + 1)]

    # -- listings ----------------------------------------------------------------------------
    async def listing(
        self, queue: str | None, status: str, limit: int = 50, after: str | None = None
    ) -> Page:
        """One page of the tasks of ``queue`` (None: every queue) in ``status``."""
        if status not in LISTED:
            raise ValueError(f"unknown status {status!r} (one of {', '.join(LISTED)})")
        if self.has_listing:
            page = await self.backend.list_tasks(
                queue=queue, status=status, limit=limit, after=after
            )
            items = list(page.items)
            if status == "running":
                self._saw_running(items, complete=page.next is None and after is None)
            return Page(items, page.next)
        # Without list_tasks only dead letters can be listed (the first page of each queue).
        if status != "dead":
            return Page([], None, complete=False)
        names = [queue] if queue else await self.backend.queue.list_queues()
        items = []
        for name in names:
            items += await self.backend.queue.list_dead(name, limit=limit - len(items))
            if len(items) >= limit:
                break
        return Page(items, None, complete=False)

    def _saw_running(self, items: list[TaskInfo], complete: bool) -> None:
        now = self.clock()
        counts: dict[str, int] = {}
        for info in items:
            worker = info.worker_id or "?"
            seen = self._workers.setdefault(worker, WorkerSeen(worker, now))
            seen.last_seen = now
            if info.task is not None:
                seen.queues.add(info.task.queue)
            counts[worker] = counts.get(worker, 0) + 1
        for worker, seen in self._workers.items():
            if worker in counts or complete:
                seen.running = counts.get(worker, 0)
        self._workers = {
            k: w for k, w in self._workers.items() if w.last_seen >= now - WORKER_MEMORY
        }

    async def workers(self, limit: int = 500) -> tuple[list[WorkerSeen], bool]:
        """Workers holding running claims now (one page of running tasks, up to ``limit``),
        plus those seen in the last WORKER_MEMORY seconds; and whether the page was whole."""
        page = await self.listing(None, "running", limit=limit)
        workers = sorted(self._workers.values(), key=lambda w: (-w.last_seen, w.worker_id))
        return workers, page.complete and page.next is None

    # -- one task ----------------------------------------------------------------------------
    async def task(self, task_id: str) -> TaskView:
        info: TaskInfo | None
        try:
            info = await self.backend.get_task(task_id)
        except NotFoundError:
            info = None
        result = None
        if self.backend.results is not None:
            result = await self.backend.results.get(task_id)
        events = None
        if self.backend.events is not None:
            events = await self.backend.events.query(task_id=task_id, limit=500)
        return TaskView(task_id, info, result, events, attempts_of(events or []))

    # -- actions -----------------------------------------------------------------------------
    async def requeue(self, queue: str, task_id: str) -> bool:
        return bool(await self.backend.requeue_dead(queue, task_id))

    async def delete_dead(self, queue: str, task_id: str) -> bool:
        return bool(await self.backend.delete_dead(queue, task_id))

    async def cancel(self, task_id: str) -> bool:
        return bool(await self.backend.cancel(task_id))

    async def set_paused(self, schedule_id: str, paused: bool) -> None:
        schedules = self.backend.schedules
        await (schedules.pause(schedule_id) if paused else schedules.resume(schedule_id))

    async def schedules(self) -> list[Any] | None:
        """Every schedule with its last and next tick; None without a base_dir."""
        schedules = self.backend.schedules
        if not schedules.available:
            return None
        return list(await schedules.list())


def attempts_of(events: list[TaskEvent]) -> list[Attempt]:
    """The attempts a task's events tell of, in order."""
    found: dict[int, Attempt] = {}
    for event in events:
        if event.attempt is None:
            continue
        one = found.setdefault(event.attempt, Attempt(event.attempt))
        kind = EventType(event.type)
        if kind is EventType.STARTED:
            one.started, one.worker_id = event.time, event.worker_id or one.worker_id
        elif kind in (EventType.ENQUEUED, EventType.SCHEDULED, EventType.PROGRESS):
            continue
        elif kind is not EventType.WAITING:
            one.outcome, one.ended = kind.value, event.time
            one.duration = event.duration if event.duration is not None else one.duration
            one.error = event.error or one.error
            one.worker_id = one.worker_id or event.worker_id
    return [found[n] for n in sorted(found)]


def lease_left(info: TaskInfo, now: datetime | None = None) -> float | None:
    """Seconds left on a running task's lease (negative: expired, not yet taken over)."""
    if info.lease_until is None:
        return None
    return (info.lease_until - (now or datetime.now(UTC))).total_seconds()


def age(when: datetime | None, now: datetime | None = None) -> str:
    """``3s``, ``4m``, ``2h``, ``5d`` since ``when`` (or until it, prefixed ``in``)."""
    if when is None:
        return ""
    seconds = ((now or datetime.now(UTC)) - when).total_seconds()
    ahead = seconds < 0
    text = short_duration(abs(seconds))
    return f"in {text}" if ahead else f"{text} ago"


def short_duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s" if seconds >= 1 else f"{seconds * 1000:.0f}ms"


def status_of(info: TaskInfo | None, result: TaskResult | None) -> str:
    if info is not None:
        return TaskStatus(info.status).value
    if result is not None:
        return "done" if result.ok else "failed"
    return "unknown"
