"""Data models: tasks, results and events, as msgspec structs."""

from __future__ import annotations

import enum
import os
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import msgspec

from .errors import SerializationError

SCHEMA_VERSION = 1
"""Version written into every stored document (field ``v``)."""

UTC = timezone.utc


def utcnow() -> datetime:
    return datetime.now(UTC)


def from_epoch(seconds: float) -> datetime:
    """The UTC datetime of ``seconds`` since the epoch (a store's clock, a file's mtime)."""
    return datetime.fromtimestamp(seconds, UTC)


def ensure_utc(value: datetime | None, name: str = "timestamp") -> datetime | None:
    """Return ``value`` in UTC; naive datetimes are refused (their zone is unknown)."""
    if value is None:
        return None
    if value.tzinfo is UTC:  # what utcnow and the decoder give: nothing to convert
        return value
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware, got naive {value!r}")
    return value.astimezone(UTC)


_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_CROCKFORD_PAIRS = [a + b for a in _CROCKFORD for b in _CROCKFORD]  # 10 bits a look-up
_PAIR_SHIFTS = tuple(range(120, -1, -10))  # 13 pairs: 130 bits, the top two always 0
_id_lock = threading.Lock()
# [millis, random part, the text of the millis]: the first 10 characters encode 50 bits (two
# zero bits and the 48 of the millis), so one millisecond's ids share them.
_last_id: list[Any] = [-1, 0, ""]  # -1: the first call, even at millisecond 0, starts afresh


def new_id() -> str:
    """A 26-character ULID-style id: sortable by creation time, unique, monotonic per process."""
    ms = time.time_ns() // 1_000_000
    head: str
    rand: int
    with _id_lock:
        if ms <= _last_id[0]:
            ms, rand, head = _last_id[0], _last_id[1] + 1, _last_id[2]
        else:
            rand = int.from_bytes(os.urandom(10), "big") >> 1  # headroom for increments
            head = id_text(ms << 80)[:10]
        _last_id[0], _last_id[1], _last_id[2] = ms, rand, head
    pairs = _CROCKFORD_PAIRS
    hi, lo = rand >> 40, rand & 0xFF_FFFF_FFFF  # 40 bits (four pairs) each
    return (
        head
        + pairs[hi >> 30]
        + pairs[(hi >> 20) & 1023]
        + pairs[(hi >> 10) & 1023]
        + pairs[hi & 1023]
        + pairs[lo >> 30]
        + pairs[(lo >> 20) & 1023]
        + pairs[(lo >> 10) & 1023]
        + pairs[lo & 1023]
    )


def id_text(value: int) -> str:
    """The 26 Crockford base-32 characters of a 128-bit id (ULID text: 48 bits of
    milliseconds, then 80 more)."""
    return "".join([_CROCKFORD_PAIRS[(value >> shift) & 1023] for shift in _PAIR_SHIFTS])


def _reset_ids_after_fork() -> None:
    # A forked child must not continue the parent's sequence: within the same millisecond both
    # would hand out the same "last + 1" ids.
    global _id_lock
    _id_lock = threading.Lock()
    _last_id[:] = [-1, 0, ""]


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_ids_after_fork)


class TaskStatus(str, enum.Enum):
    PENDING = "pending"
    SCHEDULED = "scheduled"
    WAITING = "waiting"  # held until the tasks it depends on have succeeded
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    DEAD = "dead"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


class ResultStatus(str, enum.Enum):
    SUCCESS = "success"
    FAILURE = "failure"


class EventType(str, enum.Enum):
    ENQUEUED = "enqueued"
    STARTED = "started"
    RETRIED = "retried"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DEAD_LETTERED = "dead_lettered"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    LEASE_EXPIRED = "lease_expired"
    SCHEDULED = "scheduled"  # a schedule fired a tick: its task was enqueued
    PROGRESS = "progress"  # a running task reported progress (``data``: done, total, message)
    WAITING = "waiting"  # enqueued with dependencies: held until they have succeeded


class ErrorInfo(msgspec.Struct, kw_only=True, frozen=True):
    """An exception captured as data."""

    type: str
    message: str
    traceback: str | None = None

    @classmethod
    def from_exception(cls, exc: BaseException, *, with_traceback: bool = True) -> ErrorInfo:
        import traceback as tb

        text = "".join(tb.format_exception(exc)) if with_traceback else None
        return cls(
            type=f"{type(exc).__module__}.{type(exc).__qualname__}",
            message=str(exc),
            traceback=text,
        )


class _Document(msgspec.Struct, kw_only=True):
    v: int = SCHEMA_VERSION

    def _check_version(self) -> None:
        if self.v > SCHEMA_VERSION or self.v < 1:
            raise SerializationError(
                f"{type(self).__name__} schema version {self.v} is not supported "
                f"(this OmniQ reads 1..{SCHEMA_VERSION})"
            )


class Task(_Document, kw_only=True):
    """A unit of work. ``func`` is an import path ``"package.module:function"``."""

    func: str
    args: list[Any] = msgspec.field(default_factory=list)
    kwargs: dict[str, Any] = msgspec.field(default_factory=dict)
    id: str = msgspec.field(default_factory=new_id)
    queue: str = "default"
    priority: int = 0
    eta: datetime | None = None
    expires_at: datetime | None = None
    max_retries: int = 0
    retry_backoff: float = 1.0
    retry_backoff_max: float = 300.0
    retry_jitter: bool = True
    timeout: float | None = None
    attempt: int = 1
    failures: int = 0
    created_at: datetime = msgspec.field(default_factory=utcnow)
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    last_error: ErrorInfo | None = None
    depends_on: list[str] = msgspec.field(default_factory=list)
    """Ids of the tasks that must succeed before this one becomes ready (docs/dependencies.md)."""
    on_dependency_failure: str = "cancel"
    """``"cancel"``: a dependency that fails for good cancels this task; ``"run"``: it runs
    once every dependency has ended, whatever the outcome."""

    def __post_init__(self) -> None:
        self._check_version()
        if self.on_dependency_failure not in DEPENDENCY_FAILURE_MODES:
            raise ValueError(
                f"on_dependency_failure must be 'cancel' or 'run', not {self.on_dependency_failure!r}"
            )
        args: Any = self.args
        if isinstance(args, tuple):  # accept tuples from Python callers
            self.args = list(args)
        self.eta = ensure_utc(self.eta, "eta")
        self.expires_at = ensure_utc(self.expires_at, "expires_at")
        self.created_at = ensure_utc(self.created_at, "created_at") or utcnow()
        if self.attempt < 1:
            raise ValueError("attempt starts at 1")
        if not MIN_PRIORITY <= self.priority <= MAX_PRIORITY:
            raise ValueError(f"priority must be in [{MIN_PRIORITY}, {MAX_PRIORITY}]")
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")

    def retry_delay(self, failures: int, rand: float) -> float:
        """Exponential backoff after ``failures`` failed attempts; ``rand`` in [0, 1)."""
        exponent = min(max(0, failures - 1), 1000)  # 2.0 ** 1024 overflows; capped anyway
        delay = min(self.retry_backoff_max, self.retry_backoff * 2.0**exponent)
        if self.retry_jitter:
            delay = delay / 2 + delay / 2 * rand
        return max(0.0, delay)

    def is_expired(self, now: datetime) -> bool:
        return self.expires_at is not None and now >= self.expires_at


DEPENDENCY_FAILURE_MODES = ("cancel", "run")
MIN_PRIORITY = -999
MAX_PRIORITY = 999


class TaskResult(_Document, kw_only=True):
    """The outcome of one task (the last attempt that wrote it)."""

    task_id: str
    status: ResultStatus
    value: Any = None
    error: ErrorInfo | None = None
    attempt: int = 1
    queue: str | None = None
    func: str | None = None
    worker_id: str | None = None
    started_at: datetime | None = None
    finished_at: datetime = msgspec.field(default_factory=utcnow)
    expires_at: datetime | None = None
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    """The task's final metadata: its enqueue-time metadata plus what ``ctx.update`` set."""

    def __post_init__(self) -> None:
        self._check_version()
        self.started_at = ensure_utc(self.started_at, "started_at")
        self.finished_at = ensure_utc(self.finished_at, "finished_at") or utcnow()
        self.expires_at = ensure_utc(self.expires_at, "expires_at")

    @property
    def ok(self) -> bool:
        return self.status is ResultStatus.SUCCESS

    def is_expired(self, now: datetime) -> bool:
        return self.expires_at is not None and now >= self.expires_at


class TaskEvent(_Document, kw_only=True):
    """One step in a task's life, stored as one JSON document."""

    task_id: str
    type: EventType
    time: datetime = msgspec.field(default_factory=utcnow)
    id: str = msgspec.field(default_factory=new_id)
    queue: str | None = None
    worker_id: str | None = None
    attempt: int | None = None
    error: ErrorInfo | None = None
    duration: float | None = None
    data: dict[str, Any] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check_version()
        self.time = ensure_utc(self.time, "time") or utcnow()


class Claimed(msgspec.Struct, kw_only=True):
    """A task held by one worker: what ``ack``, ``nack`` and ``extend_lease`` need."""

    task: Task
    attempt: int
    lease_until: datetime
    worker_id: str
    token: str
    claimed_at: datetime = msgspec.field(default_factory=utcnow)
    epoch: int = 0
    """The last lease epoch this holder created (0: the claim itself); its next heartbeat
    creates ``epoch + 1``, which a reaper's take-over claims first."""

    @property
    def id(self) -> str:
        return self.task.id

    @property
    def queue(self) -> str:
        return self.task.queue

    def remaining(self, now: datetime | None = None) -> timedelta:
        return self.lease_until - (now or utcnow())


class Progress(msgspec.Struct, kw_only=True, frozen=True, omit_defaults=True):
    """How far a running attempt has come, as its task reported it (``ctx.progress``)."""

    done: float
    total: float | None = None
    message: str | None = None
    at: datetime | None = None

    @property
    def fraction(self) -> float | None:
        """``done / total`` clamped to [0, 1], or None without a positive total."""
        if not self.total or self.total <= 0:
            return None
        return min(max(self.done / self.total, 0.0), 1.0)


class TaskInfo(msgspec.Struct, kw_only=True):
    """What ``get_task`` reports: the task document and where it stands.

    ``progress`` and ``metadata`` are what the running attempt last persisted through its
    task context (``ctx.progress`` / ``ctx.update``); empty for tasks that never reported."""

    task: Task | None
    status: TaskStatus
    attempt: int | None = None
    worker_id: str | None = None
    lease_until: datetime | None = None
    error: ErrorInfo | None = None
    progress: Progress | None = None
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)


class TaskPage(msgspec.Struct):
    """One page of ``list_tasks``: the tasks, and ``next``, the cursor to pass as ``after``
    for the following page (None: this is the last page)."""

    items: list[TaskInfo]
    next: str | None = None


class QueueSize(msgspec.Struct, kw_only=True):
    ready: int = 0
    scheduled: int = 0
    running: int = 0
    dead: int = 0

    @property
    def total(self) -> int:
        return self.ready + self.scheduled + self.running + self.dead
