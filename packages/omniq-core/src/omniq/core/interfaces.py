"""The storage contract: what any OmniQ queue, result storage and event storage provides.

The file storages implement these; a future backend (SQL, Redis, ...) implements the same
abstract classes and works with the same worker.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from datetime import datetime, timedelta
from types import TracebackType

from typing_extensions import Self

from .errors import LeaseLostError
from .models import (
    Claimed,
    ErrorInfo,
    EventType,
    QueueSize,
    ResultStatus,
    Task,
    TaskEvent,
    TaskInfo,
    TaskResult,
    TaskStatus,
)


class AsyncResource(abc.ABC):  # noqa: B024 - a mixin with optional close()
    """Opened lazily; ``async with`` closes it."""

    async def close(self) -> None:  # noqa: B027 - optional for implementations
        """Release connections. The object may not be used afterwards."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class AsyncQueue(AsyncResource):
    """A task queue with leases: at-least-once delivery, one holder at a time."""

    @abc.abstractmethod
    async def enqueue(self, task: Task) -> str:
        """Store ``task``; it becomes ready now or at ``task.eta``. Returns the task id."""

    @abc.abstractmethod
    async def enqueue_many(self, tasks: Sequence[Task]) -> list[str]:
        """Store many tasks at once (concurrently); returns their ids in order."""

    @abc.abstractmethod
    async def dequeue(
        self,
        queues: Sequence[str] = ("default",),
        *,
        lease: float | None = None,
        wait: float = 0.0,
        worker_id: str | None = None,
    ) -> Claimed | None:
        """Claim the next ready task, or return None (after waiting up to ``wait`` seconds)."""

    async def dequeue_many(
        self,
        count: int,
        queues: Sequence[str] = ("default",),
        *,
        lease: float | None = None,
        wait: float = 0.0,
        worker_id: str | None = None,
    ) -> list[Claimed]:
        """Claim up to ``count`` ready tasks (``wait`` applies until the first one).
        A backend overrides this when it can claim several in one round trip."""
        if count < 1:
            raise ValueError("count must be at least 1")
        first = await self.dequeue(queues, lease=lease, wait=wait, worker_id=worker_id)
        claimed = [] if first is None else [first]
        while claimed and len(claimed) < count:
            more = await self.dequeue(queues, lease=lease, worker_id=worker_id)
            if more is None:
                break
            claimed.append(more)
        return claimed

    @abc.abstractmethod
    async def ack(self, claimed: Claimed) -> None:
        """The attempt succeeded: remove the task. Raises LeaseLostError if taken over."""

    async def ack_many(self, claims: Sequence[Claimed]) -> None:
        """``ack`` every claim; then LeaseLostError if any was refused (the rest are acked)."""
        lost: list[Claimed] = []
        for claimed in claims:
            try:
                await self.ack(claimed)
            except LeaseLostError:
                lost.append(claimed)
        if lost:
            raise LeaseLostError(
                f"ack of {len(lost)} of {len(claims)} tasks refused, first: task {lost[0].id}"
            )

    @abc.abstractmethod
    async def nack(
        self,
        claimed: Claimed,
        *,
        error: ErrorInfo | BaseException | str | None = None,
        retry_in: float | None = None,
        retry: bool = True,
    ) -> TaskStatus:
        """The attempt failed: retry later (SCHEDULED/PENDING) or dead-letter it (DEAD);
        ``retry=False`` dead-letters at once."""

    @abc.abstractmethod
    async def release(self, claimed: Claimed) -> None:
        """Give the task back at once without counting a failure (graceful shutdown)."""

    @abc.abstractmethod
    async def extend_lease(self, claimed: Claimed, seconds: float | None = None) -> Claimed:
        """Heartbeat: push the lease expiry. Raises LeaseLostError or TaskCancelledError."""

    @abc.abstractmethod
    async def get_task(self, task_id: str, queue: str | None = None) -> TaskInfo:
        """Where the task stands. Raises NotFoundError."""

    @abc.abstractmethod
    async def cancel(self, task_id: str, queue: str | None = None) -> bool:
        """Cancel: a pending task never runs; a running one learns at its next heartbeat."""

    @abc.abstractmethod
    async def size(self, queue: str = "default") -> QueueSize:
        """Counts of ready, scheduled, running and dead tasks."""

    @abc.abstractmethod
    async def list_queues(self) -> list[str]:
        """Names of the queues that exist."""

    @abc.abstractmethod
    async def purge(self, queue: str = "default") -> int:
        """Drop every ready and scheduled task of ``queue``; returns how many."""

    @abc.abstractmethod
    async def list_dead(self, queue: str = "default", limit: int | None = 100) -> list[TaskInfo]:
        """Dead-lettered tasks with their last error."""

    @abc.abstractmethod
    async def requeue_dead(self, queue: str = "default", task_id: str | None = None) -> int:
        """Put dead-lettered tasks (one, or all) back as ready; returns how many."""


class AsyncResultStorage(AsyncResource):
    """Task results with expiry."""

    @abc.abstractmethod
    async def set(self, result: TaskResult, *, check_attempt: bool = True) -> None:
        """Store a result atomically (the later attempt's write wins; ``check_attempt=False``
        when the caller knows no later attempt exists)."""

    @abc.abstractmethod
    async def get(self, task_id: str) -> TaskResult | None:
        """The result, or None if absent or expired."""

    @abc.abstractmethod
    async def wait(self, task_id: str, timeout: float | None = None) -> TaskResult:
        """Return the result as soon as it lands; ResultTimeoutError after ``timeout`` s."""

    @abc.abstractmethod
    async def delete(self, task_id: str) -> bool:
        """Delete a result; True if one existed."""

    @abc.abstractmethod
    async def list(
        self, status: ResultStatus | None = None, limit: int | None = None
    ) -> list[TaskResult]:
        """Stored, unexpired results, optionally of one status."""

    @abc.abstractmethod
    async def cleanup_expired(self) -> int:
        """Delete expired results; returns how many."""


class AsyncEventStorage(AsyncResource):
    """Task events, one document each."""

    @abc.abstractmethod
    async def log(self, event: TaskEvent) -> None:
        """Record an event. Never raises for storage trouble (it is logged and counted)."""

    @abc.abstractmethod
    async def query(
        self,
        task_id: str | None = None,
        event_type: EventType | str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int | None = None,
    ) -> list[TaskEvent]:
        """Events in time order, filtered."""

    @abc.abstractmethod
    async def cleanup(self, older_than: datetime | timedelta) -> int:
        """Delete events older than a time (or an age); returns how many."""
