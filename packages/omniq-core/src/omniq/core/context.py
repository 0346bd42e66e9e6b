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
from collections.abc import Callable, Mapping
from datetime import datetime
from types import MappingProxyType
from typing import Any

import msgspec

from .codec import check_json_value
from .errors import SerializationError, TaskCancelledError
from .models import Progress, utcnow

MAX_METADATA_BYTES = 64 * 1024
"""Largest size (encoded as JSON) of what a running attempt reports: its ``metadata`` (once
``update`` was called) plus its ``progress``; both travel with every lease record."""

MAX_PROGRESS_MESSAGE = 1024
"""Longest progress message kept, in characters: a longer one is cut, ending with "…"."""

_EMPTY: Mapping[str, Any] = MappingProxyType({})

Notify = Callable[[], None]


class TaskContext:
    """The running attempt of a task, as its function sees it.

    Attributes: ``task_id``, ``attempt``, ``queue``, ``func``, ``worker_id``, ``metadata``
    (a read-only copy of the task's enqueue-time metadata plus what ``update`` set: change it
    with ``update``), ``enqueued_at``, ``started_at``, and ``outcome`` (set by the worker
    before the ``after_task`` / ``on_failure`` hooks run: ``"done"``, ``"retried"``,
    ``"dead"``, ``"released"``, ``"cancelled"``, ``"lost"`` when another worker took the task
    over; None while running).

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
        # The metadata lives encoded: what update() checked is what is persisted and stored
        # with the result, whatever the task later does to the objects it passed in.
        self._meta_json = _encode(dict(metadata or {}), "metadata")
        self._meta_view: Mapping[str, Any] | None = None  # cached when it holds no containers
        self._progress_size = 0  # encoded size of the latest progress
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

    @property
    def metadata(self) -> Mapping[str, Any]:
        """The task's metadata, read-only (a fresh copy when it holds lists or dicts)."""
        view = self._meta_view
        if view is not None:
            return view
        with self._lock:
            data = msgspec.json.decode(self._meta_json)
        if not data:
            return _EMPTY
        view = MappingProxyType(data)
        if not any(isinstance(v, (dict, list)) for v in data.values()):
            self._meta_view = view
        return view

    # -- reporting -------------------------------------------------------------------------
    def progress(self, done: float, total: float | None = None, message: str | None = None) -> None:
        """Report how far the task has come (``done`` of ``total``, an optional message).

        Only the latest value is kept; the worker writes it at most once per its
        ``progress_interval``. A message longer than ``MAX_PROGRESS_MESSAGE`` characters is
        cut. Raises ValueError/TypeError for values that are not finite numbers (or a message
        that is not a string), SerializationError if it would take the reported values past
        ``MAX_METADATA_BYTES``; nothing changes then."""
        value = Progress(
            done=_number(done, "done"),
            total=None if total is None else _number(total, "total"),
            message=_message(message),
        )
        size = len(msgspec.json.encode(value))
        with self._lock:
            _check_size(size + (len(self._meta_json) if self._updated else 0))
            self._progress = value
            self._progress_size = size
            self._progress_dirty = True
            wake = not self._dirty
            self._dirty = True
        if wake:
            self._wake()

    def update(self, **meta: Any) -> None:
        """Merge a copy of ``meta`` into ``metadata`` and persist it with the attempt
        (rate-limited as ``progress``); the result carries the final metadata. Values must be
        JSON values, and the metadata plus the progress at most ``MAX_METADATA_BYTES``
        encoded: else SerializationError, and nothing changes. Changing the objects passed
        in afterwards changes nothing."""
        check_json_value(meta, "metadata")
        copy = msgspec.json.decode(_encode(meta, "metadata"))  # deep: later mutations stay out
        with self._lock:
            merged = {**msgspec.json.decode(self._meta_json), **copy}
            encoded = _encode(merged, "metadata")
            _check_size(len(encoded) + self._progress_size)
            self._meta_json = encoded
            self._meta_view = None
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
            meta = msgspec.json.decode(self._meta_json) if self._updated else None
            return progress, meta, changed

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
                message["meta"] = msgspec.json.decode(self._meta_json)
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
    if message is not None and len(message) > MAX_PROGRESS_MESSAGE:
        return message[: MAX_PROGRESS_MESSAGE - 1] + "\u2026"
    return message


def _encode(value: Any, where: str) -> bytes:
    try:
        return msgspec.json.encode(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise SerializationError(f"{where}: {exc}") from None


def _check_size(size: int) -> None:
    if size > MAX_METADATA_BYTES:
        raise SerializationError(
            f"task metadata and progress would be {size} bytes encoded; at most "
            f"{MAX_METADATA_BYTES} are kept with a running attempt"
        )


__all__ = ["MAX_METADATA_BYTES", "MAX_PROGRESS_MESSAGE", "TaskContext"]
