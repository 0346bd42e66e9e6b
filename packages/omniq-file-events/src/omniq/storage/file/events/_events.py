"""AsyncFileEventStorage: task events as one JSON document each, on any fsspec filesystem.

Multi-step operations are *programs* (generators of storage ops, see ``omniq.core.fs``): one
thread hop per call for a local directory, natively async on S3, GCS and Azure.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any

import msgspec

from omniq.core import codec
from omniq.core.errors import SerializationError
from omniq.core.fs import Program, Store, delete_many, listdir, listdirs, read_many, remove_dir
from omniq.core.fs import write as write_op
from omniq.core.interfaces import AsyncEventStorage
from omniq.core.maintenance import sweep_temp_files
from omniq.core.models import UTC, EventType, TaskEvent, ensure_utc
from omniq.core.names import validate_name

from . import _layout as layout

log = logging.getLogger("omniq.events")


class _Window:
    """The half-open time window ``since <= time < until`` of a query (None: unbounded)."""

    __slots__ = ("since", "since_ms", "since_s", "until", "until_ms", "until_s")

    def __init__(self, since: datetime | None, until: datetime | None) -> None:
        self.since, self.until = since, until
        self.since_ms = None if since is None else layout.epoch_ms(since)
        self.until_ms = None if until is None else layout.epoch_ms(until)
        self.since_s = None if since is None else since.timestamp()
        self.until_s = None if until is None else until.timestamp()

    def overlaps(self, start: float, length: float) -> bool:
        """Whether the partition ``[start, start + length)`` may hold events of the window."""
        return (self.since_s is None or start + length > self.since_s) and (
            self.until_s is None or start < self.until_s
        )

    def may_hold(self, time_ms: int) -> bool:
        """Cheap test on the millisecond in a file name (the exact test follows decoding)."""
        return (self.since_ms is None or time_ms >= self.since_ms) and (
            self.until_ms is None or time_ms <= self.until_ms
        )

    def holds(self, time: datetime) -> bool:
        return (self.since is None or time >= self.since) and (
            self.until is None or time < self.until
        )


class AsyncFileEventStorage(AsyncEventStorage):
    """Task events as JSON files under ``base_dir``, partitioned by hour and indexed by task.

    ``log`` never raises for storage trouble: the failure is logged on the ``omniq.events``
    logger and counted in ``failed_writes`` (successes in ``written``).

    Args:
        base_dir: local path or fsspec URL (``s3://bucket/prefix``, ``gs://...``,
            ``abfs://container/prefix``, ``memory://name``).
        storage_options: passed to fsspec (credentials, endpoint); never shown.
        batch: events read per request by ``query``.
        fsync: fsync local files before they are renamed into place.
        clock: epoch-seconds clock, for tests (``cleanup`` with a timedelta uses it).
    """

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        storage_options: dict[str, Any] | None = None,
        *,
        batch: int = 256,
        fsync: bool = False,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.store = Store(
            base_dir, storage_options, package="omniq-file-events", fsync=fsync, clock=clock
        )
        self.batch = max(1, batch)
        self.written = 0
        """Events recorded by this instance."""
        self.failed_writes = 0
        """Events this instance failed to record (storage trouble); see the log for why."""

    def __repr__(self) -> str:
        return f"AsyncFileEventStorage({self.store.url!r})"

    async def close(self) -> None:
        await self.store.aclose()

    async def maintain(self, *, sweep: bool = False) -> None:
        """With ``sweep``: remove the temporary files an hour old under this storage's
        directory, left by a process killed while writing (local directories only)."""
        if sweep:
            await sweep_temp_files(self.store)

    # -- writing -----------------------------------------------------------------------------
    @staticmethod
    def _name(event: TaskEvent) -> layout.Name:
        validate_name(event.task_id, "task id")
        validate_name(event.id, "event id")
        kind = EventType(event.type)  # ValueError for an unknown type
        time_ms = layout.epoch_ms(event.time)
        if time_ms < 0:
            raise ValueError(f"event time {event.time.isoformat()} is before 1970")
        return layout.Name(time_ms, event.id, kind.value, event.task_id)

    async def log(self, event: TaskEvent) -> None:
        """Record ``event`` (two small files: the primary copy and the per-task index).

        Never raises for storage trouble: it is logged on ``omniq.events`` and counted in
        ``failed_writes``. Event ``data`` that is not JSON is replaced by a note saying so.
        Invalid input (a task id or event id that is not a safe name) raises
        InvalidNameError.
        """
        name = self._name(event)
        try:
            data = codec.encode(event)
        except SerializationError as exc:
            log.warning("event %s of task %s: data dropped: %s", event.id, event.task_id, exc)
            event = msgspec.structs.replace(event, data={"unencodable_data": str(exc)})
            data = codec.encode(event)
        try:
            await self.store.run(self._log_program(name, data))
        except Exception as exc:  # storage trouble must not break the caller
            self.failed_writes += 1
            log.warning(
                "could not record event %s (%s of task %s) in %s: %s: %s",
                event.id,
                name.type,
                event.task_id,
                self.store.url,
                type(exc).__name__,
                exc,
            )
            log.debug("event write failure", exc_info=True)
            return
        self.written += 1

    def _log_program(self, name: layout.Name, data: bytes) -> Program[None]:
        # The primary copy first: an index entry never exists without it, so cleanup (which
        # walks the primary copies) also removes every index entry.
        for key in (layout.time_key(name), layout.task_key(name)):
            yield write_op(key, data)

    # -- reading -----------------------------------------------------------------------------
    async def query(
        self,
        task_id: str | None = None,
        event_type: EventType | str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int | None = None,
    ) -> list[TaskEvent]:
        """Events with ``since <= time < until``, oldest first (by time, then event id).

        With ``task_id`` only that task's index is listed; otherwise only the hour
        partitions overlapping the window. ``since`` and ``until`` must be timezone-aware.
        """
        if task_id is not None:
            validate_name(task_id, "task id")
        kind = None if event_type is None else EventType(event_type).value
        window = _Window(ensure_utc(since, "since"), ensure_utc(until, "until"))
        if limit is not None and limit <= 0:
            return []
        if task_id is not None:
            return await self.store.run(
                self._task_program(task_id, kind, window, limit), heavy=True
            )
        return await self.store.run(self._time_program(kind, window, limit), heavy=True)

    def _select(
        self,
        prefix: str,
        listing: Iterable[tuple[str, layout.Name | None]],
        kind: str | None,
        window: _Window,
    ) -> list[str]:
        """Keys of the listed events that may match, in time order (names only, no reads)."""
        chosen = [
            (parsed.sort_key, f"{prefix}/{name}")
            for name, parsed in listing
            if parsed is not None
            and (kind is None or parsed.type == kind)
            and window.may_hold(parsed.time_ms)
        ]
        chosen.sort()
        return [key for _, key in chosen]

    def _task_program(
        self, task_id: str, kind: str | None, window: _Window, limit: int | None
    ) -> Program[list[TaskEvent]]:
        prefix = f"{layout.BY_TASK}/{task_id}"
        listing = yield listdir(prefix)
        keys = self._select(
            prefix, ((n, layout.parse_task_name(task_id, n)) for n in listing), kind, window
        )
        out: list[TaskEvent] = []
        yield from self._read(keys, window, out, limit)
        return out

    def _time_program(
        self, kind: str | None, window: _Window, limit: int | None
    ) -> Program[list[TaskEvent]]:
        out: list[TaskEvent] = []
        for day in (yield listdirs(layout.BY_TIME)):
            day_start = layout.day_start(day)
            if day_start is None or not window.overlaps(day_start, layout.DAY):
                continue
            for hour in (yield listdirs(f"{layout.BY_TIME}/{day}")):
                start = layout.hour_start(day_start, hour)
                if start is None or not window.overlaps(start, layout.HOUR):
                    continue
                prefix = f"{layout.BY_TIME}/{day}/{hour}"
                listing = yield listdir(prefix)
                keys = self._select(
                    prefix, ((n, layout.parse_time_name(n)) for n in listing), kind, window
                )
                if (yield from self._read(keys, window, out, limit)):
                    return out
        return out

    def _read(
        self, keys: list[str], window: _Window, out: list[TaskEvent], limit: int | None
    ) -> Program[bool]:
        """Append the events stored at ``keys`` to ``out``; True once ``limit`` is reached."""
        first = 0
        while first < len(keys):
            step = self.batch if limit is None else min(self.batch, limit - len(out))
            chunk = keys[first : first + step]
            first += step
            bodies = yield read_many(chunk)
            for key in chunk:
                data = bodies.get(key)
                if data is None:  # removed by a cleanup since the listing
                    continue
                try:
                    event = codec.decode(data, TaskEvent)
                except SerializationError as exc:
                    log.warning("skipping unreadable event file %s: %s", key, exc)
                    continue
                if not window.holds(event.time):
                    continue
                out.append(event)
                if limit is not None and len(out) >= limit:
                    return True
        return False

    # -- cleanup -----------------------------------------------------------------------------
    async def cleanup(self, older_than: datetime | timedelta) -> int:
        """Delete events older than a time (or an age, by the storage's clock); returns how
        many. Hour partitions wholly before the cutoff go entirely (with their per-task
        index entries); in the partition holding the cutoff, events are picked by name."""
        if isinstance(older_than, timedelta):
            cutoff = self.store.clock() - older_than.total_seconds()
        else:
            aware = ensure_utc(older_than, "older_than")
            assert aware is not None
            cutoff = aware.timestamp()
        return await self.store.run(self._cleanup_program(cutoff), heavy=True)

    def _cleanup_program(self, cutoff: float) -> Program[int]:
        cutoff_ms = int(cutoff * 1000)
        local = self.store.is_local
        removed = 0
        tasks: set[str] = set()
        for day in (yield listdirs(layout.BY_TIME)):
            day_start = layout.day_start(day)
            if day_start is None or day_start >= cutoff:
                continue
            for hour in (yield listdirs(f"{layout.BY_TIME}/{day}")):
                start = layout.hour_start(day_start, hour)
                if start is None or start >= cutoff:
                    continue
                whole = start + layout.HOUR <= cutoff
                prefix = f"{layout.BY_TIME}/{day}/{hour}"
                doomed, index = [], []
                for name in (yield listdir(prefix)):
                    parsed = layout.parse_time_name(name)
                    if parsed is None:
                        if whole:  # a stray file in an old partition: it goes too
                            doomed.append(f"{prefix}/{name}")
                        continue
                    if whole or parsed.time_ms < cutoff_ms:
                        doomed.append(f"{prefix}/{name}")
                        index.append(layout.task_key(parsed))
                        tasks.add(parsed.task_id)
                # The index entries first: if this fails half-way, the primary copies are
                # still there and the next cleanup removes the rest.
                if index:
                    yield delete_many(index)
                if doomed:
                    yield delete_many(doomed)
                    removed += len(index)
                if local and whole:
                    yield remove_dir(prefix)
            if local:
                yield remove_dir(f"{layout.BY_TIME}/{day}")
        if local:
            for task_id in sorted(tasks):
                yield remove_dir(f"{layout.BY_TASK}/{task_id}")
        if removed:
            log.info(
                "deleted %d events older than %s from %s",
                removed,
                datetime.fromtimestamp(cutoff, UTC).isoformat(),
                self.store.url,
            )
        return removed
