"""The task context: what a running task may learn and report about its own attempt.

A task function asks for it with a parameter annotated ``TaskContext`` (any name); the
worker then passes the context of the running attempt. ``progress`` and ``update`` only
change values in memory (cheap enough for a tight loop); the worker persists the latest
values with the attempt's next lease record, at most once per ``progress_interval``
(docs/worker.md, "Task context and progress").
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

import msgspec

from .codec import check_json_value
from .errors import SerializationError, TaskCancelledError
from .models import Progress, utcnow

MAX_METADATA_BYTES = 64 * 1024
"""Largest ``ctx.metadata`` accepted (encoded as JSON): it travels with every lease record."""

Notify = Callable[[], None]


class TaskContext:
    """The running attempt of a task, as its function sees it.

    Attributes: ``task_id``, ``attempt``, ``queue``, ``func``, ``worker_id``, ``metadata``
    (the task's enqueue-time metadata plus what ``update`` set), ``enqueued_at``,
    ``started_at``, and ``outcome`` (set by the worker before the ``after_task`` /
    ``on_failure`` hooks run: ``"done"``, ``"retried"``, ``"dead"``, ``"released"``,
    ``"cancelled"``, or None while running and when the lease was lost).

    ``progress`` and ``update`` are thread-safe and never block on storage.
    """

    def __init__(
        self,
        *,
        task_id: str,
        attempt: int,
        queue: str,
        func: str,
        worker_id: str,
        metadata: dict[str, Any] | None = None,
        enqueued_at: datetime | None = None,
        started_at: datetime | None = None,
    ) -> None:
        self.task_id = task_id
        self.attempt = attempt
        self.queue = queue
        self.func = func
        self.worker_id = worker_id
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.enqueued_at = enqueued_at
        self.started_at = started_at or utcnow()
        self.outcome: str | None = None
        self._lock = threading.Lock()
        self._progress: Progress | None = None
        self._updated = False  # update() was called: metadata is persisted from then on
        self._dirty = False  # changed since the worker last took the values
        self._progress_dirty = False
        self._check = False  # the task asked whether it was cancelled
        self._cancelled = threading.Event()
        self._notify: Notify | None = None  # set by the worker: "something to write"

    def __repr__(self) -> str:
        return (
            f"TaskContext(task_id={self.task_id!r}, attempt={self.attempt}, "
            f"queue={self.queue!r}, func={self.func!r})"
        )

    # -- reporting -------------------------------------------------------------------------
    def progress(self, done: float, total: float | None = None, message: str | None = None) -> None:
        """Report how far the task has come (``done`` of ``total``, an optional message).

        Only the latest value is kept; the worker writes it at most once per its
        ``progress_interval``. Raises ValueError/TypeError for values that are not finite
        numbers (or a message that is not a string), changing nothing."""
        value = Progress(
            done=_number(done, "done"),
            total=None if total is None else _number(total, "total"),
            message=_message(message),
        )
        with self._lock:
            self._progress = value
            self._progress_dirty = True
            wake = not self._dirty
            self._dirty = True
        if wake:
            self._wake()

    def update(self, **meta: Any) -> None:
        """Merge ``meta`` into ``metadata`` and persist it with the attempt (rate-limited as
        ``progress``); the result carries the final metadata. Values must be JSON values
        and the whole metadata at most ``MAX_METADATA_BYTES``: else SerializationError,
        and nothing changes."""
        check_json_value(meta, "metadata")
        with self._lock:
            merged = {**self.metadata, **meta}
            size = len(msgspec.json.encode(merged))
            if size > MAX_METADATA_BYTES:
                raise SerializationError(
                    f"task metadata would be {size} bytes encoded; at most "
                    f"{MAX_METADATA_BYTES} are kept with a running attempt"
                )
            self.metadata = merged
            self._updated = True
            wake = not self._dirty
            self._dirty = True
        if wake:
            self._wake()

    # -- cancellation ----------------------------------------------------------------------
    @property
    def cancelled(self) -> bool:
        """Whether the task was asked to stop (``backend.cancel``). Reading it asks the worker
        for an early heartbeat (at most one per ``progress_interval``), which looks for a
        cancel request: a polling task learns of it within about that interval."""
        if self._cancelled.is_set():
            return True
        with self._lock:
            wake = not self._dirty and not self._check
            self._check = True
        if wake:
            self._wake()
        return self._cancelled.is_set()

    def check_cancelled(self) -> None:
        """Raise TaskCancelledError if the task was asked to stop (see ``cancelled``)."""
        if self.cancelled:
            raise TaskCancelledError(f"task {self.task_id} was cancelled")

    # -- for the worker --------------------------------------------------------------------
    def _wake(self) -> None:
        notify = self._notify
        if notify is not None:
            notify()

    def _mark_cancelled(self) -> None:
        self._cancelled.set()

    def _pending(self) -> bool:
        """Whether values (or a cancellation check) wait to be written."""
        with self._lock:
            return self._dirty or self._check

    def _take(self) -> tuple[Progress | None, dict[str, Any] | None, bool]:
        """The values to write now: (progress, metadata or None if never updated, whether
        the progress changed since the last take). Clears the pending flags."""
        with self._lock:
            changed = self._progress_dirty
            self._dirty = self._progress_dirty = self._check = False
            progress = self._progress
            if progress is not None:
                progress = msgspec.structs.replace(progress, at=utcnow())
            return progress, (dict(self.metadata) if self._updated else None), changed

    def _apply(self, message: dict[str, Any]) -> None:
        """Apply a message forwarded by a child process's context (see ``_snapshot``)."""
        if "progress" in message:
            p = message["progress"]
            self.progress(p["done"], p.get("total"), p.get("message"))
        if "meta" in message:
            self.update(**message["meta"])
        if message.get("check"):
            _ = self.cancelled

    def _snapshot(self) -> dict[str, Any]:
        """What changed since the last snapshot, as a JSON-able message (for forwarding)."""
        with self._lock:
            message: dict[str, Any] = {}
            if self._progress_dirty and self._progress is not None:
                p = self._progress
                message["progress"] = {"done": p.done, "total": p.total, "message": p.message}
            if self._updated:
                message["meta"] = dict(self.metadata)
            if self._check:
                message["check"] = True
            self._dirty = self._progress_dirty = self._check = False
            return message


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"progress {name} must be a number, got {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"progress {name} must be finite, got {value!r}")
    return number


def _message(message: Any) -> str | None:
    if message is not None and not isinstance(message, str):
        raise TypeError(f"progress message must be a string, got {type(message).__name__}")
    return message


__all__ = ["MAX_METADATA_BYTES", "TaskContext"]
