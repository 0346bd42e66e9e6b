"""The storage contract: what any OmniQ queue, result storage and event storage provides.

The file storages implement these; a future backend (SQL, Redis, ...) implements the same
abstract classes and works with the same worker: ``AsyncWorker`` takes any object that has the
shape of :class:`WorkerBackend` (a queue, optional result and event storages, ``emit`` and a
``config`` with ``event_retention``) and calls nothing else.

What a backend implements:

* :class:`AsyncQueue`: the abstract methods, and the ``lease`` attribute (the default lease in
  seconds). ``next_due``, ``repair`` and ``maintain`` have defaults (no delayed tasks known,
  nothing to repair, no housekeeping); override them when the storage can do better. Without
  ``next_due`` a burst worker stops while delayed tasks still wait.
* :class:`AsyncResultStorage` and :class:`AsyncEventStorage` (both optional for a backend):
  the abstract methods; ``maintain`` has a no-op default.
* The backend object itself: see :class:`WorkerBackend`.
"""

from __future__ import annotations

import abc
import os
import socket
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Protocol

from typing_extensions import Self

from .errors import CapabilityError, LeaseLostError, TaskCancelledError
from .models import (
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

    lease: float
    """The default lease in seconds: what ``dequeue(lease=None)`` grants. Implementations set
    it; a worker without its own ``lease`` uses it and heartbeats every third of it."""

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
    async def extend_lease(
        self,
        claimed: Claimed,
        seconds: float | None = None,
        *,
        progress: Progress | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Claimed:
        """Heartbeat: push the lease expiry. Raises LeaseLostError or TaskCancelledError.

        ``progress`` and ``metadata`` are what the task reported through its context: kept
        with the lease, so that ``get_task`` shows the latest while the attempt runs. The
        worker passes them (keywords) only once the task has reported something."""

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

    async def list_tasks(
        self,
        queue: str | None = None,
        status: TaskStatus | str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> TaskPage:
        """One page of tasks of ``queue`` (None: every queue) in ``status`` (``pending``,
        ``scheduled``, ``waiting``, ``running`` or ``dead``; None: all of them), at most
        ``limit``; ``after`` is the ``next`` cursor of the previous page. Bad input raises
        ValueError (InvalidNameError for a bad queue name).

        This default raises CapabilityError: a backend that can list overrides it, at a
        cost proportional to the page."""
        raise CapabilityError(f"{type(self).__name__} cannot list tasks")

    async def next_due(
        self, queue: str = "default", after: datetime | None = None
    ) -> datetime | None:
        """When the earliest delayed or retrying task of ``queue`` (due after ``after``, if
        given) comes due; None if there is none.

        A burst worker asks it before stopping, so that it waits for a task due soon. This
        default knows of none (None): a burst worker on such a queue stops once nothing is
        ready, leaving delayed tasks for the next run."""
        return None

    async def repair(self, queue: str = "default") -> int:
        """Redo what a process killed half-way through a change left undone; returns how
        many steps it redid. The worker calls it every ``sweep_interval``. This default has
        nothing to repair (a storage whose changes are atomic needs none): 0."""
        return 0

    async def maintain(self, *, sweep: bool = False) -> None:
        """Housekeeping that belongs to this storage, beyond the contract's clean-ups. The
        worker calls it every ``cleanup_interval`` with ``sweep=False`` and about every
        ``sweep_interval`` with ``sweep=True`` (the expensive once-a-day work, such as
        removing what a killed process left). Errors propagate (the worker logs them and
        tries again at the next round). This default does nothing."""


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

    async def maintain(self, *, sweep: bool = False) -> None:
        """Housekeeping that belongs to this storage (see ``AsyncQueue.maintain``); the worker
        calls it before ``cleanup_expired``. This default does nothing."""


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

    async def maintain(self, *, sweep: bool = False) -> None:
        """Housekeeping that belongs to this storage (see ``AsyncQueue.maintain``); the worker
        calls it before ``cleanup``. This default does nothing."""


# -- what a worker needs from a backend ------------------------------------------------------
class WorkerSettings(Protocol):
    """The settings a worker reads from ``backend.config``."""

    @property
    def event_retention(self) -> float | None:
        """Seconds events are kept: the worker's clean-up deletes older ones (None: never)."""


class WorkerBackend(Protocol):
    """Everything ``AsyncWorker`` uses of a backend; any object of this shape works with it.

    * ``queue``: where tasks are claimed (``dequeue``), heartbeated (``extend_lease``, whose
      ``TaskCancelledError`` stops a running task), finished (``ack``/``nack``) or given back
      (``release``); also ``lease``, ``next_due``, ``repair`` and ``maintain``.
    * ``results``: where outcomes are stored (``set``) and expired ones dropped
      (``cleanup_expired``, ``maintain``); None: results are not kept.
    * ``events``: None turns events off; otherwise the worker records ``started``,
      ``succeeded``, ``retried``, ``failed``, ``dead_lettered`` and ``cancelled`` through
      ``emit`` and drops old ones (``cleanup``, ``maintain``).
    * ``emit(event)``: record one event (only called when ``events`` is not None; must not
      raise for storage trouble).
    * ``config.event_retention``: see :class:`WorkerSettings`.

    Optional, looked up with ``getattr``: ``schedules``, the file backend's schedule store;
    without it a worker fires no schedules. ``open(schedules=...)``: awaited before the
    worker's first claim (the file backend makes its object-store clients there).
    """

    @property
    def queue(self) -> AsyncQueue: ...

    @property
    def results(self) -> AsyncResultStorage | None: ...

    @property
    def events(self) -> AsyncEventStorage | None: ...

    @property
    def config(self) -> WorkerSettings: ...

    async def emit(self, event: TaskEvent) -> None: ...


def default_worker_id() -> str:
    """A worker id unique to this process: ``host-pid-random``."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def cancelled_result(
    task: Task, attempt: int, worker_id: str | None, started: datetime | None = None
) -> TaskResult:
    """The FAILURE result recorded for a cancelled task, so that waiters stop waiting. Both a
    worker (a running task cancelled) and a backend's ``cancel`` (a pending one) write it."""
    error = ErrorInfo(
        type=f"{TaskCancelledError.__module__}.{TaskCancelledError.__qualname__}",
        message=f"task {task.id} was cancelled",
    )
    return TaskResult(
        task_id=task.id,
        status=ResultStatus.FAILURE,
        error=error,
        attempt=attempt,
        queue=task.queue,
        func=task.func,
        worker_id=worker_id,
        started_at=started,
    )
