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
from collections.abc import Callable, Iterable
from datetime import timedelta
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
from omniq.core.maintenance import sweep_temp_files
from omniq.core.models import SCHEMA_VERSION, ErrorInfo, ResultStatus, TaskResult, from_epoch
from omniq.core.names import validate_name

from . import _layout as layout
from ._markers import MarkerBuffer, NewerMarkerError, Pair, batch_writes, decode_batch

log = logging.getLogger("omniq.results")

DEFAULT_TTL = timedelta(days=7)
_SERIALIZATION_ERROR = f"{SerializationError.__module__}.{SerializationError.__qualname__}"


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


class _Batch:
    """A batch marker read by ``cleanup_expired``, and which of its pairs are handled."""

    __slots__ = ("handled", "key", "pairs")

    def __init__(self, key: str, pairs: builtins.list[Pair]) -> None:
        self.key = key
        self.pairs = pairs
        self.handled: builtins.set[Pair] = builtins.set()


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
        marker_batch: expiry markers are buffered in memory and written as one *batch marker*
            per expiry hour once this many are buffered (or see ``marker_flush_interval``,
            ``flush``, ``close``). ``1`` writes each result's own marker before the result
            instead (one more request per result, nothing to lose in a crash).
        marker_flush_interval: seconds after which buffered markers are written, checked at
            the next ``set`` or ``cleanup_expired`` (no background task). Each write is a
            request on an object store: 10 s makes a worker finishing a task a second pay one
            marker per ten results.
        fsync: fsync local files before they are renamed into place.
        clock: epoch-seconds clock, for tests (expiry and the marker flush interval use it).

    A process killed before it flushed leaves results without a marker, which the ordinary
    ``cleanup_expired()`` never finds: run ``cleanup_expired(sweep=True)`` now and then.
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
        marker_batch: int = 256,
        marker_flush_interval: float = 10.0,
        fsync: bool = False,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if isinstance(default_ttl, (int, float)):
            default_ttl = timedelta(seconds=default_ttl)
        if default_ttl is not None and default_ttl <= timedelta(0):
            raise ValueError("default_ttl must be positive (or None for no expiry)")
        if poll_interval <= 0:
            raise ValueError("poll_interval must be positive")
        if marker_batch < 1:
            raise ValueError("marker_batch must be at least 1 (1: one marker per result)")
        if marker_flush_interval < 0:
            raise ValueError("marker_flush_interval must not be negative")
        self.store = Store(
            base_dir, storage_options, package="omniq-file-results", fsync=fsync, clock=clock
        )
        self.default_ttl = default_ttl
        self.poll_interval = poll_interval
        self.max_poll_interval = max(max_poll_interval, poll_interval)
        self.batch = max(1, batch)
        self.marker_batch = marker_batch
        self.marker_flush_interval = marker_flush_interval
        self._markers = MarkerBuffer(marker_batch, marker_flush_interval)
        self._flushing: builtins.set[object] = builtins.set()  # flushes in flight

    def __repr__(self) -> str:
        return f"AsyncFileResultStorage({self.store.url!r})"

    async def close(self) -> None:
        """Write the buffered expiry markers, then release the storage connections.

        A failed marker write is logged, not raised: the results it would have marked are
        found by ``cleanup_expired(sweep=True)``.
        """
        try:
            await self.flush()
        except Exception as exc:
            log.warning(
                "could not write %d expiry markers to %s on close (%s: %s); "
                "cleanup_expired(sweep=True) will find their results",
                len(self._markers),
                self.store.url,
                type(exc).__name__,
                exc,
            )
        finally:
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
        single = self.marker_batch == 1
        stored = await self.store.run(self._set_program(prepared, data, check_attempt, single))
        if stored is not None:
            log.info(
                "result of task %s attempt %d dropped: attempt %d is stored already",
                prepared.task_id,
                prepared.attempt,
                stored,
            )
            return
        if prepared.expires_at is not None and not single:
            pair = (layout.epoch_ms(prepared.expires_at), prepared.task_id)
            self._markers.add(pair, self.store.clock())
        if self._markers.due(self.store.clock()):
            try:
                await self._flush()
            except Exception as exc:  # the result is stored: its marker waits for a retry
                log.warning(
                    "writing %d expiry markers to %s failed (%s: %s); will retry",
                    len(self._markers),
                    self.store.url,
                    type(exc).__name__,
                    exc,
                )

    def _set_program(
        self, result: TaskResult, data: bytes, check_attempt: bool = True, marker: bool = True
    ) -> Program[int | None]:
        key = layout.result_key(result.task_id)
        old = (yield read(key)) if check_attempt else None
        if old is not None:
            try:
                current = yield from self._decode(key, old)
                stored = None if current is None else current.attempt
            except NewerSchemaError as exc:
                stored = exc.attempt
            if stored is not None and stored > result.attempt:
                return stored
        if marker and result.expires_at is not None:  # marker_batch=1: its own marker first
            yield write(layout.marker_key(layout.epoch_ms(result.expires_at), result.task_id), b"")
        yield write(key, data)
        return None

    async def flush(self) -> int:
        """Write the buffered expiry markers now (one object per expiry hour); returns how
        many results they mark. Also waits for a flush already in flight.

        Raises StorageError if the write fails; the markers stay buffered for the next try.
        """
        others = builtins.set(self._flushing)
        written = await self._flush()
        while others & self._flushing:
            await anyio.sleep(0.005)
        return written

    async def _flush(self) -> int:
        pairs = self._markers.take()
        if not pairs:
            return 0
        token = object()
        self._flushing.add(token)
        try:
            await self.store.run(self._write_markers(pairs))
        except BaseException:
            if dropped := self._markers.restore(pairs, self.store.clock()):
                log.warning(
                    "expiry markers keep failing: %d dropped from memory (the sweep of "
                    "cleanup_expired(sweep=True) still finds their results)",
                    dropped,
                )
            raise
        finally:
            self._flushing.discard(token)
        return len(pairs)

    @staticmethod
    def _write_markers(pairs: Iterable[Pair]) -> Program[None]:
        for key, body in batch_writes(pairs):
            yield write(key, body)

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
        if layout.result_key(result.task_id) != key:
            yield from self._quarantine(
                key, data, f"the document is the result of task {result.task_id!r}"
            )
            return None
        return result

    def _quarantine(
        self, key: str, data: bytes, reason: object, what: str = "result file"
    ) -> Program[None]:
        """Copy an unreadable file aside, then remove it unless it was rewritten meanwhile."""
        name = key.rsplit("/", 1)[-1]
        target = f"{layout.QUARANTINE}/{name}.{time.time_ns()}-{uuid.uuid4().hex[:8]}"
        yield write(target, data)
        if (yield read(key)) == data:
            yield delete(key)
        log.warning("moved unreadable %s %s to %s: %s", what, key, target, reason)

    async def get(self, task_id: str) -> TaskResult | None:
        """The result, or None if there is none or it has expired (even before cleanup).

        An unreadable result file is moved to ``results/_quarantine/`` (logged on
        ``omniq.results``) and reads as None. A result written by a newer OmniQ (higher
        schema version) is left in place and raises SerializationError.
        """
        validate_name(task_id, "task id")
        return await self.store.run(self._get_program(task_id))

    def _get_program(self, task_id: str) -> Program[TaskResult | None]:
        key = layout.result_key(task_id)
        data = yield read(key)
        if data is None:
            return None
        result = yield from self._decode(key, data)
        if result is None or result.is_expired(from_epoch((yield now()))):
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
        key = layout.result_key(task_id)
        if not (yield exists(key)):
            return False
        yield delete(key)  # its expiry marker, if any, goes at the next cleanup_expired
        return True

    async def maintain(self, *, sweep: bool = False) -> None:
        """With ``sweep``: remove the temporary files an hour old under this storage's
        directory (left by a process killed while writing), then ``cleanup_expired(sweep=True)``
        (reads every stored result: the backstop for results whose expiry marker was never
        written). The worker runs it every ``sweep_interval``."""
        if sweep:
            await sweep_temp_files(self.store)
            await self.cleanup_expired(sweep=True)

    async def cleanup_expired(self, *, sweep: bool = False) -> int:
        """Delete expired results; returns how many.

        Writes this storage's buffered expiry markers first. Only the expiry buckets whose
        hour has begun are listed, and only the results whose marker is due are read: the cost
        follows the number of expiring results, not the number stored.

        ``sweep=True`` then also lists ``results/``, reads every stored result (``batch`` per
        request) and deletes every expired one, marked or not: the backstop for results whose
        marker was never written (a process killed before it flushed) or was quarantined. It
        costs in proportion to what is stored: run it now and then (e.g. daily).
        """
        await self.flush()
        removed = await self.store.run(self._cleanup_program(), heavy=True)
        if sweep:
            removed += await self.store.run(self._sweep_program(), heavy=True)
        if removed:
            log.info("deleted %d expired results from %s", removed, self.store.url)
        return removed

    def _cleanup_program(self) -> Program[int]:
        current = yield now()
        removed = 0
        for name in (yield listdirs(layout.EXPIRY)):
            start = layout.bucket_start(name)
            if start is not None and start <= current:
                removed += yield from self._cleanup_bucket(
                    f"{layout.EXPIRY}/{name}", start, current
                )
        return removed

    def _cleanup_bucket(self, prefix: str, start: float, current: float) -> Program[int]:
        """Handle the due markers of one expiry bucket (an hour that has begun).

        A marker pair is *handled* once its result is deleted, gone, or rewritten with another
        expiry. A single marker goes once handled; a batch marker goes once every pair in it
        is handled, and one whose due pairs are handled but not the others is replaced by a
        batch marker of the remaining pairs (written before the old one is deleted).
        """
        now_dt, now_ms = from_epoch(current), int(current * 1000)
        due: dict[str, builtins.list[tuple[int, str | _Batch]]] = {}
        kept = 0  # markers left in the bucket (so that it is not removed)
        batch_keys: builtins.list[str] = []
        for marker in (yield listdir(prefix)):
            single = layout.parse_marker(marker)
            first = layout.parse_batch(marker) if single is None else None
            if single is not None and single[0] <= now_ms:
                due.setdefault(single[1], []).append((single[0], f"{prefix}/{marker}"))
            elif first is not None and first <= now_ms:
                batch_keys.append(f"{prefix}/{marker}")
            else:  # not due yet, or not a marker of ours
                kept += 1
        batches: builtins.list[_Batch] = []
        for lo in range(0, len(batch_keys), self.batch):
            chunk = batch_keys[lo : lo + self.batch]
            bodies = yield read_many(chunk)
            for key in chunk:
                data = bodies.get(key)
                if data is None:  # handled by a concurrent cleanup since the listing
                    continue
                pairs = yield from self._read_batch(key, data)
                if pairs is None:
                    kept += 1
                    continue
                batch = _Batch(key, pairs)
                batches.append(batch)
                for ms, task_id in pairs:
                    if ms <= now_ms:
                        due.setdefault(task_id, []).append((ms, batch))
        ids = builtins.list(due)
        removed = 0
        for lo in range(0, len(ids), self.batch):
            chunk = ids[lo : lo + self.batch]
            bodies = yield read_many(layout.result_key(t) for t in chunk)
            doomed: builtins.list[str] = []
            spent: builtins.list[str] = []
            for task_id in chunk:
                key = layout.result_key(task_id)
                data = bodies.get(key)
                try:
                    result = None if data is None else (yield from self._decode(key, data))
                except NewerSchemaError:  # not ours to judge: keep it and its markers
                    kept += 1
                    continue
                expired = result is not None and result.is_expired(now_dt)
                if expired:
                    doomed.append(key)
                live = (
                    None
                    if result is None or result.expires_at is None
                    else layout.epoch_ms(result.expires_at)
                )
                for ms, ref in due[task_id]:
                    if not expired and ms == live:  # due this very millisecond, not expired
                        kept += 1
                    elif isinstance(ref, _Batch):
                        ref.handled.add((ms, task_id))
                    else:  # expired, gone, or rewritten with another expiry: marker spent
                        spent.append(ref)
            if doomed:
                yield delete_many(doomed)
                removed += len(doomed)
            if spent:
                yield delete_many(spent)
        touched = [b for b in batches if b.handled]
        kept += len(batches) - len(touched)
        rest = {pair for b in touched for pair in b.pairs if pair not in b.handled}
        if rest:
            yield from self._write_markers(rest)
            kept += 1
        if touched:
            yield delete_many(b.key for b in touched)
        if not kept and start + layout.BUCKET_SECONDS <= current:
            yield remove_dir(prefix)
        return removed

    def _read_batch(self, key: str, data: bytes) -> Program[builtins.list[Pair] | None]:
        """The pairs of a batch marker; None if it is quarantined (unreadable) or left alone
        (written by a newer OmniQ)."""
        try:
            return decode_batch(data)
        except NewerMarkerError as exc:
            log.warning("skipping %s: %s written by a newer OmniQ", key, exc)
        except SerializationError as exc:
            yield from self._quarantine(key, data, exc, what="expiry marker")
        return None

    def _stored_keys(self) -> Program[builtins.list[str]]:
        names = yield listdir(layout.RESULTS)
        return [f"{layout.RESULTS}/{n}" for n in names if layout.task_id_of(n) is not None]

    def _read_results(
        self, keys: builtins.list[str], warn_newer: bool
    ) -> Program[builtins.list[tuple[str, TaskResult]]]:
        """Read and decode ``keys`` in one batch; gone, unreadable (quarantined) and
        newer-schema results are left out."""
        bodies = yield read_many(keys)
        out: builtins.list[tuple[str, TaskResult]] = []
        for key in keys:
            data = bodies.get(key)
            if data is None:  # deleted since the listing
                continue
            try:
                result = yield from self._decode(key, data)
            except NewerSchemaError as exc:
                if warn_newer:
                    log.warning("skipping %s", exc)
                continue
            if result is not None:
                out.append((key, result))
        return out

    def _sweep_program(self) -> Program[int]:
        now_dt = from_epoch((yield now()))
        keys = yield from self._stored_keys()
        removed = 0
        for lo in range(0, len(keys), self.batch):
            got = yield from self._read_results(keys[lo : lo + self.batch], warn_newer=False)
            doomed = [key for key, result in got if result.is_expired(now_dt)]
            if doomed:
                yield delete_many(doomed)
                removed += len(doomed)
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
        return await self.store.run(self._list_program(wanted, limit), heavy=True)

    def _list_program(
        self, status: ResultStatus | None, limit: int | None
    ) -> Program[builtins.list[TaskResult]]:
        now_dt = from_epoch((yield now()))
        keys = yield from self._stored_keys()
        step = self.batch if limit is None else min(self.batch, max(limit, 16))
        out: builtins.list[TaskResult] = []
        for first in range(0, len(keys), step):
            for _, result in (yield from self._read_results(keys[first : first + step], True)):
                if result.is_expired(now_dt):
                    continue
                if status is not None and result.status is not status:
                    continue
                out.append(result)
                if limit is not None and len(out) >= limit:
                    return out
        return out
