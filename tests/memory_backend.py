"""A second, tiny OmniQ backend that lives in memory: proof that the worker contract holds.

Written only against the abstract classes and the ``WorkerBackend`` protocol of
``omniq.core.interfaces`` (and the models): plain dicts and lists, asyncio, no file storage,
no fsspec. ``AsyncWorker(MemoryBackend(), ...)`` runs tasks exactly as it does on the file
backend; ``tests/test_worker_contract.py`` runs the same conformance tests on both.

Deliberately minimal: it keeps the ABCs' defaults of ``repair`` and ``maintain`` (nothing
to repair, no housekeeping) and overrides ``next_due`` (so that a burst worker waits for a
delayed task, as on the file backend). One process, one event loop; no persistence.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from msgspec.structs import replace

from omniq.core.errors import (
    LeaseLostError,
    NotFoundError,
    ResultTimeoutError,
    TaskCancelledError,
)
from omniq.core.interfaces import (
    AsyncEventStorage,
    AsyncQueue,
    AsyncResultStorage,
    cancelled_result,
)
from omniq.core.models import (
    Claimed,
    ErrorInfo,
    EventType,
    Progress,
    QueueSize,
    ResultStatus,
    Task,
    TaskEvent,
    TaskInfo,
    TaskPage,
    TaskResult,
    TaskStatus,
    ensure_utc,
    utcnow,
)
from omniq.core.names import validate_name

POLL = 0.01  # seconds between looks while waiting (dequeue, results.wait)
_OPEN = (TaskStatus.PENDING, TaskStatus.SCHEDULED)
_LISTED = (  # what list_tasks lists (no dependencies here: nothing is ever waiting)
    TaskStatus.PENDING,
    TaskStatus.SCHEDULED,
    TaskStatus.WAITING,
    TaskStatus.RUNNING,
    TaskStatus.DEAD,
)


@dataclasses.dataclass
class _Entry:
    task: Task  # with the attempt to run next (or that runs / ran last)
    status: TaskStatus
    token: str | None = None
    worker_id: str | None = None
    lease_until: datetime | None = None
    cancel_requested: bool = False
    progress: Progress | None = None  # what the running attempt reported (its context)
    metadata: dict[str, Any] | None = None

    def info(self) -> TaskInfo:
        return TaskInfo(
            task=self.task,
            status=self.status,
            attempt=self.task.attempt,
            worker_id=self.worker_id,
            lease_until=self.lease_until,
            error=self.task.last_error,
            progress=self.progress if self.status is TaskStatus.RUNNING else None,
            metadata=(self.metadata or {}) if self.status is TaskStatus.RUNNING else {},
        )


def _error_info(error: ErrorInfo | BaseException | str | None) -> ErrorInfo | None:
    if error is None or isinstance(error, ErrorInfo):
        return error
    if isinstance(error, BaseException):
        return ErrorInfo.from_exception(error)
    return ErrorInfo(type="error", message=str(error))


class MemoryQueue(AsyncQueue):
    """An ``AsyncQueue`` in a dict: priority first, then oldest; leases; retries with the
    task's backoff; dead letters; cancel. A claim whose lease ran out is taken over."""

    def __init__(self, *, lease: float = 60.0) -> None:
        self.lease = float(lease)
        self._tasks: dict[str, _Entry] = {}

    # -- producing -------------------------------------------------------------------------
    async def enqueue(self, task: Task) -> str:
        validate_name(task.queue, "queue name")
        validate_name(task.id, "task id")
        due_later = task.eta is not None and task.eta > utcnow()
        self._tasks[task.id] = _Entry(
            task, TaskStatus.SCHEDULED if due_later else TaskStatus.PENDING
        )
        return task.id

    async def enqueue_many(self, tasks: Sequence[Task]) -> list[str]:
        return [await self.enqueue(task) for task in tasks]

    # -- claiming --------------------------------------------------------------------------
    def _claimable(self, entry: _Entry, queues: Sequence[str], now: datetime) -> bool:
        if entry.task.queue not in queues:
            return False
        if entry.status is TaskStatus.RUNNING:  # a holder that stopped heartbeating
            return entry.lease_until is not None and entry.lease_until <= now
        if entry.status not in _OPEN:
            return False
        return entry.task.eta is None or entry.task.eta <= now

    def _claim_one(
        self, queues: Sequence[str], lease: float | None, worker_id: str | None
    ) -> Claimed | None:
        now = utcnow()
        for entry in self._tasks.values():  # expired tasks never run
            if entry.status in _OPEN and entry.task.is_expired(now):
                entry.status = TaskStatus.EXPIRED
        ready = [e for e in self._tasks.values() if self._claimable(e, queues, now)]
        if not ready:
            return None
        entry = min(ready, key=lambda e: (-e.task.priority, e.task.eta or now, e.task.id))
        if entry.status is TaskStatus.RUNNING:  # taken over: the next attempt
            entry.task = _next(entry.task)
        entry.status = TaskStatus.RUNNING
        entry.token = uuid.uuid4().hex
        entry.worker_id = worker_id or "memory-worker"
        entry.lease_until = now + timedelta(seconds=self.lease if lease is None else lease)
        entry.cancel_requested = False
        entry.progress = entry.metadata = None
        return Claimed(
            task=entry.task,
            attempt=entry.task.attempt,
            lease_until=entry.lease_until,
            worker_id=entry.worker_id,
            token=entry.token,
            claimed_at=now,
        )

    async def dequeue(
        self,
        queues: Sequence[str] = ("default",),
        *,
        lease: float | None = None,
        wait: float = 0.0,
        worker_id: str | None = None,
    ) -> Claimed | None:
        names = [validate_name(q, "queue name") for q in queues]
        deadline = asyncio.get_running_loop().time() + max(0.0, wait)
        while True:
            claimed = self._claim_one(names, lease, worker_id)
            if claimed is not None or asyncio.get_running_loop().time() >= deadline:
                return claimed
            await asyncio.sleep(POLL)

    def _held(self, claimed: Claimed, what: str) -> _Entry:
        entry = self._tasks.get(claimed.id)
        if (
            entry is None
            or entry.status is not TaskStatus.RUNNING
            or entry.token != claimed.token
            or entry.task.attempt != claimed.attempt
        ):
            raise LeaseLostError(f"{what} of task {claimed.id}: the claim is no longer held")
        return entry

    async def ack(self, claimed: Claimed) -> None:
        entry = self._held(claimed, "ack")
        entry.status, entry.token = TaskStatus.DONE, None

    async def nack(
        self,
        claimed: Claimed,
        *,
        error: ErrorInfo | BaseException | str | None = None,
        retry_in: float | None = None,
        retry: bool = True,
    ) -> TaskStatus:
        entry = self._held(claimed, "nack")
        task = replace(entry.task, failures=entry.task.failures + 1, last_error=_error_info(error))
        entry.token = None
        if not retry or task.failures > task.max_retries:
            entry.task, entry.status = task, TaskStatus.DEAD
            return TaskStatus.DEAD
        delay = task.retry_delay(task.failures, random.random()) if retry_in is None else retry_in
        eta = utcnow() + timedelta(seconds=delay) if delay > 0 else None
        entry.task = replace(_next(task), eta=eta)
        entry.status = TaskStatus.SCHEDULED if eta is not None else TaskStatus.PENDING
        return entry.status

    async def release(self, claimed: Claimed) -> None:
        entry = self._held(claimed, "release")
        entry.task = replace(_next(entry.task), eta=None)
        entry.status, entry.token = TaskStatus.PENDING, None

    async def extend_lease(
        self,
        claimed: Claimed,
        seconds: float | None = None,
        *,
        progress: Progress | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Claimed:
        entry = self._held(claimed, "extend_lease")
        if entry.cancel_requested:
            entry.status, entry.token = TaskStatus.CANCELLED, None
            raise TaskCancelledError(f"task {claimed.id} was cancelled")
        entry.progress, entry.metadata = progress, metadata
        entry.lease_until = utcnow() + timedelta(seconds=self.lease if seconds is None else seconds)
        return replace(claimed, lease_until=entry.lease_until)

    # -- inspecting ------------------------------------------------------------------------
    def _entry(self, task_id: str, queue: str | None) -> _Entry:
        entry = self._tasks.get(task_id)
        if entry is None or (queue is not None and entry.task.queue != queue):
            raise NotFoundError(f"task {task_id} not found")
        return entry

    async def get_task(self, task_id: str, queue: str | None = None) -> TaskInfo:
        return self._entry(task_id, queue).info()

    async def cancel(self, task_id: str, queue: str | None = None) -> bool:
        try:
            entry = self._entry(task_id, queue)
        except NotFoundError:
            return False
        if entry.status in _OPEN:
            entry.status = TaskStatus.CANCELLED
            return True
        if entry.status is TaskStatus.RUNNING:  # learnt at its next heartbeat
            entry.cancel_requested = True
            return True
        return False

    async def size(self, queue: str = "default") -> QueueSize:
        counts = {s: 0 for s in TaskStatus}
        for entry in self._tasks.values():
            if entry.task.queue == queue:
                counts[entry.status] += 1
        return QueueSize(
            ready=counts[TaskStatus.PENDING],
            scheduled=counts[TaskStatus.SCHEDULED],
            running=counts[TaskStatus.RUNNING],
            dead=counts[TaskStatus.DEAD],
        )

    async def list_queues(self) -> list[str]:
        return sorted({entry.task.queue for entry in self._tasks.values()})

    async def purge(self, queue: str = "default") -> int:
        doomed = [i for i, e in self._tasks.items() if e.task.queue == queue and e.status in _OPEN]
        for task_id in doomed:
            del self._tasks[task_id]
        return len(doomed)

    async def list_dead(self, queue: str = "default", limit: int | None = 100) -> list[TaskInfo]:
        dead = [
            e.info()
            for e in self._tasks.values()
            if e.task.queue == queue and e.status is TaskStatus.DEAD
        ]
        return dead if limit is None else dead[:limit]

    async def requeue_dead(self, queue: str = "default", task_id: str | None = None) -> int:
        count = 0
        for entry in self._tasks.values():
            if entry.status is not TaskStatus.DEAD or entry.task.queue != queue:
                continue
            if task_id is not None and entry.task.id != task_id:
                continue
            entry.task = replace(_next(entry.task), failures=0, eta=None)
            entry.status = TaskStatus.PENDING
            count += 1
        return count

    async def list_tasks(
        self,
        queue: str | None = None,
        status: TaskStatus | str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> TaskPage:
        wanted = _LISTED if status is None else (TaskStatus(status),)
        if wanted[0] not in _LISTED:
            raise ValueError(f"status {status!r} cannot be listed")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError("limit must be a positive integer")
        if queue is not None:
            validate_name(queue, "queue name")
        rows = sorted(
            (f"{e.task.queue}/{_LISTED.index(e.status)}/{e.task.id}", e)
            for e in self._tasks.values()
            if e.status in wanted and queue in (None, e.task.queue)
        )
        if after is not None and after.count("/") != 2:
            raise ValueError("after: not a cursor")
        rows = [(key, e) for key, e in rows if after is None or key > after]
        more = len(rows) > limit
        return TaskPage([e.info() for _, e in rows[:limit]], rows[limit - 1][0] if more else None)

    async def next_due(
        self, queue: str = "default", after: datetime | None = None
    ) -> datetime | None:
        etas = [
            e.task.eta
            for e in self._tasks.values()
            if e.task.queue == queue and e.status in _OPEN and e.task.eta is not None
        ]
        later = [eta for eta in etas if after is None or eta > after]
        return min(later, default=None)


def _next(task: Task) -> Task:
    return replace(task, attempt=task.attempt + 1)


class MemoryResultStorage(AsyncResultStorage):
    """An ``AsyncResultStorage`` in a dict, with an optional default time to live."""

    def __init__(self, *, default_ttl: float | None = None) -> None:
        self.default_ttl = default_ttl
        self._results: dict[str, TaskResult] = {}

    async def set(self, result: TaskResult, *, check_attempt: bool = True) -> None:
        old = self._results.get(result.task_id)
        if check_attempt and old is not None and old.attempt > result.attempt:
            return  # a later attempt's write wins
        if result.expires_at is None and self.default_ttl is not None:
            expires = result.finished_at + timedelta(seconds=self.default_ttl)
            result = replace(result, expires_at=expires)
        self._results[result.task_id] = result

    async def get(self, task_id: str) -> TaskResult | None:
        result = self._results.get(task_id)
        return None if result is None or result.is_expired(utcnow()) else result

    async def wait(self, task_id: str, timeout: float | None = None) -> TaskResult:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while (result := await self.get(task_id)) is None:
            if deadline is not None and loop.time() >= deadline:
                raise ResultTimeoutError(f"no result for task {task_id} within {timeout} s")
            await asyncio.sleep(POLL)
        return result

    async def delete(self, task_id: str) -> bool:
        return self._results.pop(task_id, None) is not None

    async def list(
        self, status: ResultStatus | None = None, limit: int | None = None
    ) -> list[TaskResult]:
        now = utcnow()
        found = [
            r
            for r in self._results.values()
            if not r.is_expired(now) and (status is None or r.status is status)
        ]
        return found if limit is None else found[:limit]

    async def cleanup_expired(self) -> int:
        now = utcnow()
        doomed = [i for i, r in self._results.items() if r.is_expired(now)]
        for task_id in doomed:
            del self._results[task_id]
        return len(doomed)


class MemoryEventStorage(AsyncEventStorage):
    """An ``AsyncEventStorage`` in a list."""

    def __init__(self) -> None:
        self.events: list[TaskEvent] = []

    async def log(self, event: TaskEvent) -> None:
        self.events.append(event)

    async def query(
        self,
        task_id: str | None = None,
        event_type: EventType | str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int | None = None,
    ) -> list[TaskEvent]:
        kind = None if event_type is None else EventType(event_type)
        since, until = ensure_utc(since, "since"), ensure_utc(until, "until")
        found = [
            e
            for e in sorted(self.events, key=lambda e: e.time)  # stable: ties keep log order
            if (task_id is None or e.task_id == task_id)
            and (kind is None or e.type is kind)
            and (since is None or e.time >= since)
            and (until is None or e.time < until)
        ]
        return found if limit is None else found[:limit]

    async def cleanup(self, older_than: datetime | timedelta) -> int:
        cutoff = utcnow() - older_than if isinstance(older_than, timedelta) else older_than
        kept = [e for e in self.events if e.time >= cutoff]
        removed = len(self.events) - len(kept)
        self.events[:] = kept
        return removed


@dataclasses.dataclass
class MemoryConfig:
    """What ``WorkerBackend.config`` asks for."""

    event_retention: float | None = 30 * 24 * 3600.0


class MemoryBackend:
    """A ``WorkerBackend``: queue, results (optional), events (optional), ``emit`` and
    ``config``; plus the producer side the tests use (``enqueue_task``, ``cancel``,
    ``result``), shaped like ``AsyncFileBackend``'s."""

    def __init__(
        self,
        *,
        results: bool = True,
        events: bool = False,
        lease: float = 60.0,
        result_ttl: float | None = None,
        event_retention: float | None = 30 * 24 * 3600.0,
    ) -> None:
        self.queue = MemoryQueue(lease=lease)
        self.results = MemoryResultStorage(default_ttl=result_ttl) if results else None
        self.events = MemoryEventStorage() if events else None
        self.config = MemoryConfig(event_retention=event_retention)

    async def __aenter__(self) -> MemoryBackend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for part in (self.queue, self.results, self.events):
            if part is not None:
                await part.close()

    async def emit(self, event: TaskEvent) -> None:
        if self.events is not None:
            await self.events.log(event)

    async def enqueue_task(self, task: Task) -> str:
        await self.queue.enqueue(task)
        await self.emit(
            TaskEvent(
                task_id=task.id, type=EventType.ENQUEUED, queue=task.queue, data={"func": task.func}
            )
        )
        return task.id

    async def enqueue(
        self,
        func: Callable[..., Any] | str,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> str:
        """``enqueue("module:function", args, kwargs, queue=..., eta=..., ...)`` (Task's
        fields as options)."""
        path = func if isinstance(func, str) else f"{func.__module__}:{func.__qualname__}"
        task = Task(func=path, args=list(args), kwargs=dict(kwargs or {}), **options)
        return await self.enqueue_task(task)

    async def result(self, task_id: str, wait: float | None = None) -> TaskResult | None:
        if self.results is None:
            raise RuntimeError("results are off for this backend")
        if wait is None:
            return await self.results.get(task_id)
        return await self.results.wait(task_id, timeout=wait)

    async def cancel(self, task_id: str) -> bool:
        """As ``AsyncFileBackend.cancel``: a pending task gets a FAILURE result and a
        ``cancelled`` event now; a running one stops at its next heartbeat."""
        try:
            info = await self.queue.get_task(task_id)
        except NotFoundError:
            return False
        if not await self.queue.cancel(task_id):
            return False
        if info.status in _OPEN and info.task is not None:
            if self.results is not None:
                await self.results.set(cancelled_result(info.task, info.attempt or 1, None))
            await self.emit(
                TaskEvent(
                    task_id=task_id,
                    type=EventType.CANCELLED,
                    queue=info.task.queue,
                    attempt=info.attempt,
                )
            )
        return True
