"""AsyncFileResultStorage: one JSON document per task result, on any fsspec filesystem.

Multi-step operations are *programs* (generators of storage ops, see ``omniq.core.fs``): one
thread hop per call for a local directory, natively async on S3, GCS and Azure.
"""

from __future__ import annotations

import builtins
import logging
import os
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import anyio
import msgspec

from omniq.core import codec
from omniq.core.errors import ResultTimeoutError, SerializationError
from omniq.core.fs import (
    Program,
    Store,
    delete,
    delete_many,
    exists,
    listdir,
    listdirs,
    now,
    read,
    read_many,
    remove_dir,
    write,
)
from omniq.core.interfaces import AsyncResultStorage
from omniq.core.models import SCHEMA_VERSION, UTC, ErrorInfo, ResultStatus, TaskResult
from omniq.core.names import validate_name

from . import _layout as L

log = logging.getLogger("omniq.results")

DEFAULT_TTL = timedelta(days=7)
_SERIALIZATION_ERROR = f"{SerializationError.__module__}.{SerializationError.__qualname__}"


def _dt(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


class NewerSchemaError(SerializationError):
    """A stored result was written by a newer OmniQ (higher schema version ``v``)."""

    def __init__(self, key: str, version: int, attempt: Any) -> None:
        super().__init__(
            f"{key} was written by a newer OmniQ (schema version {version}; this one reads "
            f"1..{SCHEMA_VERSION}): upgrade omniq-core to read it"
        )
        self.attempt = attempt if isinstance(attempt, int) else 1


def _newer_schema(key: str, data: bytes) -> NewerSchemaError | None:
    """The error to raise if ``data`` is a JSON object of a newer schema version."""
    try:
        doc = codec.loads(data)
    except SerializationError:
        return None
    version = doc.get("v") if isinstance(doc, dict) else None
    if isinstance(version, int) and version > SCHEMA_VERSION:
        return NewerSchemaError(key, version, doc.get("attempt"))
    return None


def _type_name(value: Any) -> str:
    kind = type(value)
    return (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )


class AsyncFileResultStorage(AsyncResultStorage):
    """Task results as files under ``base_dir``; safe for many workers and readers.

    Args:
        base_dir: local path or fsspec URL (``s3://bucket/prefix``, ``gs://...``,
            ``abfs://container/prefix``, ``memory://name``).
        storage_options: passed to fsspec (credentials, endpoint); never shown.
        default_ttl: how long a result is kept after it finished, when the result does not
            carry its own ``expires_at``; None keeps results until deleted.
        poll_interval: first pause of ``wait`` between reads; grows 1.5x per empty read up to
            ``max_poll_interval``.
        batch: results read per request by ``list`` and ``cleanup_expired``.
        fsync: fsync local files before they are renamed into place.
        clock: epoch-seconds clock, for tests (expiry uses it).
    """

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        storage_options: dict[str, Any] | None = None,
        *,
        default_ttl: timedelta | float | None = DEFAULT_TTL,
        poll_interval: float = 0.02,
        max_poll_interval: float = 0.5,
        batch: int = 256,
        fsync: bool = False,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if isinstance(default_ttl, (int, float)):
            default_ttl = timedelta(seconds=default_ttl)
        if default_ttl is not None and default_ttl <= timedelta(0):
            raise ValueError("default_ttl must be positive (or None for no expiry)")
        if poll_interval <= 0:
            raise ValueError("poll_interval must be positive")
        self.store = Store(
            base_dir, storage_options, package="omniq-file-results", fsync=fsync, clock=clock
        )
        self.default_ttl = default_ttl
        self.poll_interval = poll_interval
        self.max_poll_interval = max(max_poll_interval, poll_interval)
        self.batch = max(1, batch)

    def __repr__(self) -> str:
        return f"AsyncFileResultStorage({self.store.url!r})"

    async def close(self) -> None:
        await self.store.aclose()

    # -- writing -----------------------------------------------------------------------------
    def _prepare(self, result: TaskResult) -> tuple[TaskResult, bytes]:
        """Stamp the expiry and encode; an unencodable value becomes a FAILURE result."""
        if result.expires_at is None and self.default_ttl is not None:
            result = msgspec.structs.replace(
                result, expires_at=result.finished_at + self.default_ttl
            )
        try:
            return result, codec.encode(result)
        except SerializationError as exc:
            failed = self._as_failure(result, exc)
            return failed, codec.encode(failed)

    @staticmethod
    def _as_failure(result: TaskResult, exc: SerializationError) -> TaskResult:
        try:
            codec.check_json_value(result.value, "result value")
        except SerializationError:
            message = (
                f"the result value of task {result.task_id} (type "
                f"{_type_name(result.value)}) is not JSON-serializable: {exc}"
            )
        else:  # the value is fine; the document as a whole is not (e.g. too large)
            message = f"the result of task {result.task_id} cannot be stored: {exc}"
        log.warning("%s; storing a FAILURE result instead", message)
        error = result.error
        if result.status is not ResultStatus.FAILURE or error is None:
            error = ErrorInfo(type=_SERIALIZATION_ERROR, message=message)
        return msgspec.structs.replace(result, status=ResultStatus.FAILURE, value=None, error=error)

    async def set(self, result: TaskResult, *, check_attempt: bool = True) -> None:
        """Store ``result`` atomically (temp file + rename locally, one PUT remotely).

        A value that cannot be stored as JSON does not raise: a FAILURE result saying so is
        stored instead. The later write wins, except that a write of a lower ``attempt`` than
        the stored result's is dropped (a late duplicate of an earlier attempt).
        ``check_attempt=False`` skips that read when the caller knows no later attempt can
        exist (a worker still inside its lease).
        """
        validate_name(result.task_id, "task id")
        prepared, data = self._prepare(result)
        stored = await self.store.run(self._set_program(prepared, data, check_attempt))
        if stored is not None:
            log.info(
                "result of task %s attempt %d dropped: attempt %d is stored already",
                prepared.task_id,
                prepared.attempt,
                stored,
            )

    def _set_program(
        self, result: TaskResult, data: bytes, check_attempt: bool = True
    ) -> Program[int | None]:
        key = L.result_key(result.task_id)
        old = (yield read(key)) if check_attempt else None
        if old is not None:
            try:
                current = yield from self._decode(key, old)
                stored = None if current is None else current.attempt
            except NewerSchemaError as exc:
                stored = exc.attempt
            if stored is not None and stored > result.attempt:
                return stored
        if result.expires_at is not None:
            marker = L.marker_key(L.epoch_ms(result.expires_at), result.task_id)
            yield write(marker, b"")
        yield write(key, data)
        return None

    # -- reading -----------------------------------------------------------------------------
    def _decode(self, key: str, data: bytes) -> Program[TaskResult | None]:
        """Decode a stored result; an unreadable file is moved to quarantine (None).

        A result of a newer schema version is left alone: NewerSchemaError.
        """
        try:
            result = codec.decode(data, TaskResult)
        except SerializationError as exc:
            newer = _newer_schema(key, data)
            if newer is not None:
                raise newer from exc
            yield from self._quarantine(key, data, exc)
            return None
        if L.result_key(result.task_id) != key:
            yield from self._quarantine(
                key, data, f"the document is the result of task {result.task_id!r}"
            )
            return None
        return result

    def _quarantine(self, key: str, data: bytes, reason: object) -> Program[None]:
        """Copy an unreadable file aside, then remove it unless it was rewritten meanwhile."""
        name = key.rsplit("/", 1)[-1]
        target = f"{L.QUARANTINE}/{name}.{time.time_ns()}-{uuid.uuid4().hex[:8]}"
        yield write(target, data)
        if (yield read(key)) == data:
            yield delete(key)
        log.warning("moved unreadable result file %s to %s: %s", key, target, reason)

    async def get(self, task_id: str) -> TaskResult | None:
        """The result, or None if there is none or it has expired (even before cleanup).

        An unreadable result file is moved to ``results/_quarantine/`` (logged on
        ``omniq.results``) and reads as None. A result written by a newer OmniQ (higher
        schema version) is left in place and raises SerializationError.
        """
        validate_name(task_id, "task id")
        return await self.store.run(self._get_program(task_id))

    def _get_program(self, task_id: str) -> Program[TaskResult | None]:
        key = L.result_key(task_id)
        data = yield read(key)
        if data is None:
            return None
        result = yield from self._decode(key, data)
        if result is None or result.is_expired(_dt((yield now()))):
            return None
        return result

    async def wait(self, task_id: str, timeout: float | None = None) -> TaskResult:
        """Return the result as soon as it lands (polling with backoff: ``poll_interval``
        growing to ``max_poll_interval``). Raises ResultTimeoutError after ``timeout`` s;
        None waits for ever."""
        validate_name(task_id, "task id")
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        pause = self.poll_interval
        while True:
            result = await self.get(task_id)
            if result is not None:
                return result
            if deadline is None:
                await anyio.sleep(pause)
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ResultTimeoutError(
                        f"no result for task {task_id!r} after waiting {timeout:g} s "
                        f"in {self.store.url} (the task may still be queued or running)"
                    )
                await anyio.sleep(min(pause, left))
            pause = min(pause * 1.5, self.max_poll_interval)

    # -- deleting ----------------------------------------------------------------------------
    async def delete(self, task_id: str) -> bool:
        """Delete the result of ``task_id``; True if there was one."""
        validate_name(task_id, "task id")
        return await self.store.run(self._delete_program(task_id))

    def _delete_program(self, task_id: str) -> Program[bool]:
        key = L.result_key(task_id)
        if not (yield exists(key)):
            return False
        yield delete(key)  # its expiry marker, if any, goes at the next cleanup_expired
        return True

    async def cleanup_expired(self) -> int:
        """Delete expired results; returns how many.

        Only the expiry buckets whose hour has begun are listed, and only results whose
        marker is due are read: the cost follows the number of expiring results, not the
        number stored.
        """
        return await self.store.run(self._cleanup_program())

    def _cleanup_program(self) -> Program[int]:
        current = yield now()
        now_dt, now_ms = _dt(current), int(current * 1000)
        removed = 0
        for name in (yield listdirs(L.EXPIRY)):
            start = L.bucket_start(name)
            if start is None or start > current:
                continue
            prefix = f"{L.EXPIRY}/{name}"
            due: dict[str, builtins.list[tuple[int, str]]] = {}
            kept = 0
            for marker in (yield listdir(prefix)):
                parsed = L.parse_marker(marker)
                if parsed is None or parsed[0] > now_ms:
                    kept += 1
                    continue
                due.setdefault(parsed[1], []).append((parsed[0], f"{prefix}/{marker}"))
            ids = builtins.list(due)
            for first in range(0, len(ids), self.batch):
                chunk = ids[first : first + self.batch]
                bodies = yield read_many(L.result_key(t) for t in chunk)
                doomed: builtins.list[str] = []
                spent: builtins.list[str] = []
                for task_id in chunk:
                    key = L.result_key(task_id)
                    data = bodies.get(key)
                    try:
                        result = None if data is None else (yield from self._decode(key, data))
                    except NewerSchemaError:  # not ours to judge: keep it and its markers
                        kept += len(due[task_id])
                        continue
                    if result is not None and result.is_expired(now_dt):
                        doomed.append(key)
                        spent += [m for _, m in due[task_id]]
                        continue
                    live = (
                        None
                        if result is None or result.expires_at is None
                        else L.epoch_ms(result.expires_at)
                    )
                    for ms, marker in due[task_id]:
                        if ms == live:  # due this very millisecond, not yet expired
                            kept += 1
                        else:  # result gone, or rewritten with another expiry: stale marker
                            spent.append(marker)
                if doomed:
                    yield delete_many(doomed)
                    removed += len(doomed)
                if spent:
                    yield delete_many(spent)
            if not kept and start + L.BUCKET_SECONDS <= current:
                yield remove_dir(prefix)
        if removed:
            log.info("deleted %d expired results from %s", removed, self.store.url)
        return removed

    # -- listing -----------------------------------------------------------------------------
    async def list(
        self, status: ResultStatus | None = None, limit: int | None = None
    ) -> builtins.list[TaskResult]:
        """Stored, unexpired results (optionally of one status), ordered by task id (for
        OmniQ's time-sortable ids: oldest task first). Reads every result up to ``limit``."""
        if limit is not None and limit <= 0:
            return []
        wanted = None if status is None else ResultStatus(status)
        return await self.store.run(self._list_program(wanted, limit))

    def _list_program(
        self, status: ResultStatus | None, limit: int | None
    ) -> Program[builtins.list[TaskResult]]:
        now_dt = _dt((yield now()))
        names = [n for n in (yield listdir(L.RESULTS)) if L.task_id_of(n) is not None]
        step = self.batch if limit is None else min(self.batch, max(limit, 16))
        out: builtins.list[TaskResult] = []
        for first in range(0, len(names), step):
            keys = [f"{L.RESULTS}/{n}" for n in names[first : first + step]]
            bodies = yield read_many(keys)
            for key in keys:
                data = bodies.get(key)
                if data is None:  # deleted since the listing
                    continue
                try:
                    result = yield from self._decode(key, data)
                except NewerSchemaError as exc:
                    log.warning("skipping %s", exc)
                    continue
                if result is None or result.is_expired(now_dt):
                    continue
                if status is not None and result.status is not status:
                    continue
                out.append(result)
                if limit is not None and len(out) >= limit:
                    return out
        return out
