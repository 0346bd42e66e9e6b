"""AsyncFileEventStorage: task events as JSON documents on any fsspec filesystem.

``log`` writes one event as two small files; ``log_many`` and the background writer behind
``submit`` write many events as one batch file per hour plus index entries (one per task;
locally one per 32 ms span of OmniQ's task ids: see ``_layout``). Multi-step operations are
*programs* (generators of storage ops, see ``omniq.core.fs``): run on the event loop for a
local directory (in a worker thread with ``local_io="thread"`` or ``fsync``, and for big
writes and scans), natively async on S3, GCS and Azure. Reading (``query``, ``tail``) is in
``_queries``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import msgspec
import sniffio

from omniq.core import codec
from omniq.core.errors import SerializationError
from omniq.core.fs import (
    Program,
    Store,
    create,
    delete_many,
    link,
    listdir,
    listdirs,
    read_many,
    remove_dir,
)
from omniq.core.fs import write as write_op
from omniq.core.interfaces import AsyncEventStorage
from omniq.core.maintenance import sweep_temp_files
from omniq.core.models import EventType, TaskEvent, ensure_utc, from_epoch
from omniq.core.names import validate_name
from omniq.core.sync import flush_at_exit, in_shared_loop

from . import _layout as layout
from ._queries import EventQueries, Source

log = logging.getLogger("omniq.events")
_PER_FILE = 64  # events per batch file: a by-task query reads whole batches
_IN_FLIGHT = 2  # background writes under way before ``submit`` waits for them
# A local batch write of up to this many events (8 files) and index links runs on the event
# loop, as the queue's writes do: from a worker thread the hand-offs cost more than the
# writes (enqueue with batched events on tmpfs: 47 us inline against 55-58 us a task with
# the writes in a thread, 35 us without events). Bigger writes, e.g. a worker's events of
# tasks made far apart (a link each, ~15 us on ext4), or a large ``log_many``, would hold
# the loop for milliseconds: they go to a thread. 512 events with 8 links held the loop
# 0.7-1.6 ms on ext4, 0.3-1 ms on tmpfs.
_INLINE_EVENTS = 512
_INLINE_LINKS = 16


class _BatchFile(NamedTuple):
    """One batch file to write: its key, its lines, and its index entries."""

    key: str
    data: bytes
    entries: list[str]


class AsyncFileEventStorage(EventQueries, AsyncEventStorage):
    """Task events as JSON files under ``base_dir``, partitioned by hour and indexed by task.

    ``log`` never raises for storage trouble: the failure is logged on the ``omniq.events``
    logger and counted in ``failed_writes`` (successes in ``written``).

    Args:
        base_dir: local path or fsspec URL (``s3://bucket/prefix``, ``gs://...``,
            ``abfs://container/prefix``, ``memory://name``).
        storage_options: passed to fsspec (credentials, endpoint); never shown.
        batch: files read per request by ``query``.
        fsync: fsync local files before they are renamed into place.
        clock: epoch-seconds clock, for tests (``cleanup`` with a timedelta uses it).
        flush_interval: seconds ``submit`` keeps events before the background writer
            writes them (one batch file per hour of event time, and index entries).
        flush_every: pending events at which ``submit`` writes them at once (and waits).
        local_io: ``"inline"`` (default without ``fsync``) runs a local directory's writes
            and reads on the event loop (big ones in a worker thread); ``"thread"`` runs
            them all in a worker thread, for slow network mounts.
    """

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        storage_options: dict[str, Any] | None = None,
        *,
        batch: int = 256,
        fsync: bool = False,
        clock: Callable[[], float] | None = None,
        flush_interval: float = 0.05,
        flush_every: int = 512,
        local_io: str | None = None,
    ) -> None:
        self.store = Store(
            base_dir,
            storage_options,
            package="omniq-file-events",
            fsync=fsync,
            clock=clock,
            local_io=local_io,
        )
        self.batch = max(1, batch)
        # Locally a directory is an inode: the per-task index goes by the task id's time.
        self._grouped = self.store.is_local
        self.written = 0
        """Events recorded by this instance."""
        self.failed_writes = 0
        """Events this instance failed to record (storage trouble); see the log for why."""
        self.flush_interval = max(0.0, flush_interval)
        self.flush_every = max(1, flush_every)
        self._pending: list[tuple[layout.Name, bytes]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None
        self._flushing: set[asyncio.Task[None]] = set()
        self._at_exit = False

    def __repr__(self) -> str:
        return f"AsyncFileEventStorage({self.store.url!r})"

    @property
    def pending(self) -> int:
        """Events submitted but not written yet."""
        return len(self._pending)

    async def close(self) -> None:
        """Write the submitted events, then release the storage connections."""
        await self.flush()
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
        name, data = self._encode(event)
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

    def _encode(self, event: TaskEvent) -> tuple[layout.Name, bytes]:
        name = self._name(event)
        try:
            data = codec.encode(event)
        except SerializationError as exc:
            log.warning("event %s of task %s: data dropped: %s", event.id, event.task_id, exc)
            event = msgspec.structs.replace(event, data={"unencodable_data": str(exc)})
            data = codec.encode(event)
        return name, data

    async def log_many(self, events: Iterable[TaskEvent]) -> None:
        """Record ``events`` now, as one batch file per hour of event time plus an index
        entry per task (locally a hard link per 32 ms span of OmniQ's task ids). Never
        raises for storage trouble (counted in ``failed_writes``, like ``log``); an invalid
        name raises before anything is written."""
        items = [self._encode(event) for event in events]
        if items:
            await self._write_batch(items)

    async def submit(self, event: TaskEvent) -> None:
        """Hand ``event`` to the background writer and return (a name that is not safe
        raises InvalidNameError at once). Events are written within ``flush_interval``
        seconds, when ``flush_every`` are pending (this call then waits for the write), by
        ``flush``, ``query`` and ``close``. Under trio (no background writer) it writes now.
        Failures are logged and counted in ``failed_writes``, as for ``log``."""
        item = self._encode(event)
        if sniffio.current_async_library() != "asyncio":
            await self._write_batch([item])
            return
        loop = asyncio.get_running_loop()
        if self._timer_loop is not None and self._timer_loop is not loop:
            if self._timer_loop.is_closed():  # e.g. two asyncio.run calls: it would never fire
                self._timer = None
            self._flushing = {t for t in self._flushing if not t.get_loop().is_closed()}
        self._pending.append(item)
        if len(self._pending) >= self.flush_every:
            if len(self._flushing) >= _IN_FLIGHT:  # the writer is behind: wait for it
                await self.flush()
            else:
                self._on_timer()
                await asyncio.sleep(0)  # let the write run (or start, in a thread)
        elif self._timer is None:
            self._timer = loop.call_later(self.flush_interval, self._on_timer)
            self._timer_loop = loop
            if not self._at_exit and in_shared_loop():  # a blocking twin's: flush at exit
                self._at_exit = True
                flush_at_exit(self)

    def _on_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        task = asyncio.get_running_loop().create_task(self._write_pending())
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def _write_pending(self) -> None:
        items, self._pending = self._pending, []
        if items:
            await self._write_batch(items)

    async def flush(self) -> None:
        """Write the submitted events now, and wait for background writes under way."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        await self._write_pending()
        if self._flushing:
            loop = asyncio.get_running_loop()
            here = [task for task in self._flushing if task.get_loop() is loop]
            await asyncio.gather(*here, return_exceptions=True)

    async def _write_batch(self, items: list[tuple[layout.Name, bytes]]) -> None:
        try:
            plan = self._batch_plan(items)
            links = sum(len(entries) for _, _, entries in plan)
            heavy = len(items) > _INLINE_EVENTS or links > _INLINE_LINKS  # see above
            await self.store.run(self._batch_program(plan), heavy=heavy)
        except Exception as exc:  # storage trouble must not break the caller
            self.failed_writes += len(items)
            log.warning(
                "could not record %d events in %s: %s: %s",
                len(items),
                self.store.url,
                type(exc).__name__,
                exc,
            )
            log.debug("event batch write failure", exc_info=True)
            return
        self.written += len(items)

    def _batch_plan(self, items: list[tuple[layout.Name, bytes]]) -> list[_BatchFile]:
        """The batch files of ``items`` (up to ``_PER_FILE`` events of one hour each): key,
        contents and index entries."""
        hours: dict[int, list[tuple[layout.Name, bytes]]] = {}
        for item in items:
            hours.setdefault(item[0].time_ms // layout.HOUR_MS, []).append(item)
        groups = [g[i : i + _PER_FILE] for g in hours.values() for i in range(0, len(g), _PER_FILE)]
        plan = []
        for group in groups:
            times = [name.time_ms for name, _ in group]
            batch = layout.Batch(min(times), max(times), uuid.uuid4().hex)
            lines = b"\n".join([data for _, data in group]) + b"\n"
            tasks = (name.task_id for name, _ in group)
            entries = layout.batch_index_keys(tasks, batch, self._grouped)
            plan.append(_BatchFile(layout.batch_time_key(batch), lines, entries))
        return plan

    def _batch_program(self, plan: list[_BatchFile]) -> Program[None]:
        can_link = self.store.can_take
        for key, data, entries in plan:
            # The batch first: an index entry never exists without it (as in _log_program).
            yield write_op(key, data)
            for entry in entries:
                # A second name for the batch, no new file (its directory is made); no stamp:
                # event clean-up goes by the times in the names.
                if can_link and (yield link(key, entry)) is not None:
                    continue  # made (False, "exists", cannot happen: the name is unique)
                yield write_op(entry, b"")  # links refused here (or not local)

    def _log_program(self, name: layout.Name, data: bytes) -> Program[None]:
        # The primary copy first: an index entry never exists without it, so cleanup (which
        # walks the primary copies) also removes every index entry.
        primary, entry = layout.time_key(name), layout.task_key(name, self._grouped)
        if self.store.can_take:
            # Locally the file is created (a nameless inode linked in: one directory change,
            # not a temp name renamed; False is the same event logged again) and the entry
            # is a second name for it (no new file): made, or there already; None where
            # links are refused.
            yield create(primary, data)
            if (yield link(primary, entry)) is not None:
                return
        else:
            yield write_op(primary, data)
        yield write_op(entry, data)

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
        local, grouped = self.store.is_local, self._grouped
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
                doomed, index, batches = [], [], []
                count = 0
                for name in (yield listdir(prefix)):
                    parsed = layout.parse_time_name(name)
                    if parsed is None:
                        batch = layout.parse_batch_name(name)
                        if batch is not None and (whole or batch.max_ms < cutoff_ms):
                            batches.append((f"{prefix}/{name}", batch))
                        elif batch is None and whole:  # a stray file in an old partition
                            doomed.append(f"{prefix}/{name}")
                        continue
                    if whole or parsed.time_ms < cutoff_ms:
                        doomed.append(f"{prefix}/{name}")
                        count += 1
                        index += layout.index_keys(
                            parsed.task_id, layout.entry_name(parsed), grouped
                        )
                        tasks.add(parsed.task_id)
                # A batch names its tasks only inside: read it to find its index entries.
                bodies = (yield read_many(key for key, _ in batches)) if batches else {}
                for key, batch in batches:
                    doomed.append(key)
                    events = self._decode(
                        Source(batch.min_ms, key, True), bodies.get(key) or b"", None
                    )
                    count += len(events)
                    in_batch = list(dict.fromkeys(event.task_id for event in events))
                    index += layout.batch_index_keys(in_batch, batch, grouped)
                    if grouped:  # where 0.1.0 put a batch's entries: one per task
                        index += layout.batch_index_keys(in_batch, batch)
                    tasks.update(in_batch)
                # The index entries first: if this fails half-way, the primary copies are
                # still there and the next cleanup removes the rest.
                if index:
                    yield delete_many(index)
                if doomed:
                    yield delete_many(doomed)
                    removed += count
                if local and whole:
                    yield remove_dir(prefix)
            if local:
                yield remove_dir(f"{layout.BY_TIME}/{day}")
        if local:
            emptied = {d for task_id in tasks for d, _ in layout.task_dirs(task_id, grouped)}
            for directory in sorted(emptied):
                yield remove_dir(directory)
        if removed:
            log.info(
                "deleted %d events older than %s from %s",
                removed,
                from_epoch(cutoff).isoformat(),
                self.store.url,
            )
        return removed
