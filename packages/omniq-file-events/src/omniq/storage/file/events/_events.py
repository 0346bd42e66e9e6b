"""AsyncFileEventStorage: task events as JSON documents on any fsspec filesystem.

``log`` writes one event as two small files; ``log_many`` and the background writer behind
``submit`` write many events as one batch file per hour plus index entries (one per task;
locally one per 32 ms span of OmniQ's task ids: see ``_layout``). Multi-step operations are
*programs* (generators of storage ops, see ``omniq.core.fs``): run on the event loop for a
local directory (in a worker thread with ``local_io="thread"`` or ``fsync``, and for big
writes and scans), natively async on S3, GCS and Azure.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from operator import itemgetter
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
    listafter,
    listdir,
    listdirs,
    read_many,
    remove_dir,
)
from omniq.core.fs import write as write_op
from omniq.core.interfaces import AsyncEventStorage
from omniq.core.maintenance import sweep_temp_files
from omniq.core.models import UTC, EventType, TaskEvent, ensure_utc
from omniq.core.names import validate_name
from omniq.core.sync import flush_at_exit, in_shared_loop

from . import _layout as layout

log = logging.getLogger("omniq.events")
_HOUR_MS = 3_600_000
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


class _Source(NamedTuple):
    """A file a query reads: one event (``batch`` False) or a batch, whose events all lie
    in ``min_ms..max_ms``."""

    min_ms: int
    key: str
    batch: bool


def _lines_with(data: bytes, needle: bytes) -> list[bytes]:
    """The lines of ``data`` that contain ``needle`` (found by ``bytes.find``, not split)."""
    lines = []
    at = data.find(needle)
    while at >= 0:
        start = data.rfind(b"\n", 0, at) + 1
        end = data.find(b"\n", at)
        end = len(data) if end < 0 else end
        lines.append(data[start:end])
        at = data.find(needle, end)
    return lines


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

    def may_overlap(self, min_ms: int, max_ms: int) -> bool:
        """Whether a batch of events timed ``min_ms..max_ms`` may hold events of the window."""
        return (self.since_ms is None or max_ms >= self.since_ms) and (
            self.until_ms is None or min_ms <= self.until_ms
        )

    def holds(self, time: datetime) -> bool:
        return (self.since is None or time >= self.since) and (
            self.until is None or time < self.until
        )


class Tail:
    """A reader's place in the events as recorded, for ``AsyncFileEventStorage.tail``: the
    ``by-time`` files of the last ``settle`` seconds it has seen, by key. Each read lists
    from the previous read's time minus ``settle``: a file landing later than that after
    its events' time (a stalled writer, a clock behind) is not seen."""

    def __init__(self, since: datetime, settle: float = 10.0) -> None:
        aware = ensure_utc(since, "since")
        assert aware is not None
        self.since_ms = layout.epoch_ms(aware)
        self.settle_ms = max(0, int(settle * 1000))
        self.read_at_ms: int | None = None  # the storage's clock at the last read
        self.seen: dict[str, int] = {}  # key -> earliest event time in the file (ms)


class AsyncFileEventStorage(AsyncEventStorage):
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
            hours.setdefault(item[0].time_ms // _HOUR_MS, []).append(item)
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
        await self.flush()  # this instance's own submitted events are visible to it
        if task_id is not None:  # one task's few files: inline, no thread hop locally
            return await self.store.run(self._task_program(task_id, kind, window, limit))
        return await self.store.run(self._time_program(kind, window, limit), heavy=True)

    @staticmethod
    def _sources(
        prefix: str,
        names: Iterable[str],
        task_id: str | None,
        kind: str | None,
        window: _Window,
        lead: str = "",
    ) -> list[_Source]:
        """The listed files that may hold matching events (names only, no reads): single
        events by their name, batches by their time span. With ``lead`` (a group of the
        index, listed through ``layout.group_keep``), the names starting with it, which it
        is taken off before parsing, and the group's batch entries whose range of task ids
        holds ``task_id``."""
        out = []
        wanted = task_id or ""
        for listed in names:
            ranged = layout.split_range_name(listed) if lead else None
            if ranged is not None:
                first, last, batch_name = ranged
                if first <= wanted <= last:
                    holder = layout.parse_batch_name(batch_name)
                    if holder is not None and window.may_overlap(holder.min_ms, holder.max_ms):
                        out.append(_Source(holder.min_ms, layout.batch_time_key(holder), True))
                continue
            if not listed.startswith(lead):
                continue
            name = listed[len(lead) :]
            single = (
                layout.parse_time_name(name)
                if task_id is None
                else layout.parse_task_name(task_id, name)
            )
            if single is not None:
                if (kind is None or single.type == kind) and window.may_hold(single.time_ms):
                    out.append(_Source(single.time_ms, f"{prefix}/{listed}", False))
                continue
            batch = layout.parse_batch_name(name)
            if batch is not None and window.may_overlap(batch.min_ms, batch.max_ms):
                key = f"{prefix}/{listed}" if task_id is None else layout.batch_time_key(batch)
                out.append(_Source(batch.min_ms, key, True))
        return out

    def _task_program(
        self, task_id: str, kind: str | None, window: _Window, limit: int | None
    ) -> Program[list[TaskEvent]]:
        sources: list[_Source] = []
        for prefix, lead in layout.task_dirs(task_id, self._grouped):
            listing = yield listdir(prefix, keep=layout.group_keep(task_id, lead) if lead else None)
            sources += self._sources(prefix, listing, task_id, kind, window, lead)
        out: list[TaskEvent] = []
        yield from self._read(sources, task_id, kind, window, out, limit)
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
                sources = self._sources(prefix, listing, None, kind, window)
                if (yield from self._read(sources, None, kind, window, out, limit)):
                    return out
        return out

    def _read(
        self,
        sources: list[_Source],
        task_id: str | None,
        kind: str | None,
        window: _Window,
        out: list[TaskEvent],
        limit: int | None,
    ) -> Program[bool]:
        """Append the matching events of ``sources`` to ``out`` in (time, id) order; True
        once ``limit`` is reached. Sources are read in order of their earliest event: an
        event read is final once no unread source can hold an earlier one."""
        sources.sort()
        held: list[tuple[tuple[int, str], TaskEvent]] = []
        seen: set[str] = {event.id for event in out}  # one event in two files counts once
        first = 0
        while first < len(sources):
            step = self.batch if limit is None else max(1, min(self.batch, limit - len(out)))
            chunk = sources[first : first + step]
            first += step
            bodies = yield read_many([source.key for source in chunk])
            for source in chunk:
                data = bodies.get(source.key)
                if data is None:  # removed by a cleanup since the listing
                    continue
                for event in self._decode(source, data, task_id):
                    if event.id in seen:
                        continue
                    if (kind is None or event.type == kind) and window.holds(event.time):
                        seen.add(event.id)
                        held.append(((layout.epoch_ms(event.time), event.id), event))
            horizon = sources[first].min_ms if first < len(sources) else None
            held.sort(key=itemgetter(0))
            done = 0
            for (time_ms, _), event in held:
                if horizon is not None and time_ms >= horizon:
                    break
                done += 1
                out.append(event)
                if limit is not None and len(out) >= limit:
                    return True
            del held[:done]
        return False

    @staticmethod
    def _decode(source: _Source, data: bytes, task_id: str | None) -> list[TaskEvent]:
        """The events in a file (a batch: only ``task_id``'s, if given); unreadable
        documents are skipped with a warning."""
        if not source.batch:
            lines = [data]
        elif task_id is None:
            lines = [line for line in data.split(b"\n") if line]
        else:  # only the lines naming the task: a batch may hold hundreds of other tasks'
            lines = _lines_with(data, task_id.encode())
        events = []
        for line in lines:
            try:
                event = codec.decode(line, TaskEvent)
            except SerializationError as exc:
                log.warning("skipping unreadable event file %s: %s", source.key, exc)
                continue
            if task_id is None or event.task_id == task_id:
                events.append(event)
        return events

    async def tail(
        self, place: Tail, event_types: Iterable[EventType | str] | None = None
    ) -> list[TaskEvent]:
        """Events recorded since the last call with ``place`` (the first call: since
        ``place.since``), of ``event_types`` (None: all), in no particular order.

        Cost follows the events recorded, not what a partition holds: the hour partitions
        are listed only from the previous read's time minus ``place.settle`` on (one LIST
        from there on S3, GCS and Azure), and only files not seen before are read (a
        single-event file only if the type in its name matches)."""
        kinds = None if event_types is None else {EventType(k).value for k in event_types}
        await self.flush()  # this instance's own submitted events are visible to it
        return await self.store.run(self._tail_program(place, kinds), heavy=True)

    def _tail_program(self, place: Tail, kinds: set[str] | None) -> Program[list[TaskEvent]]:
        now_ms = int(self.store.clock() * 1000)
        start = place.since_ms
        if place.read_at_ms is not None:
            start = max(start, place.read_at_ms - place.settle_ms)
        sources: list[_Source] = []
        for hour in range(start // _HOUR_MS, now_ms // _HOUR_MS + 1):
            first = hour * _HOUR_MS
            prefix = f"{layout.BY_TIME}/{layout.day_of(first)}/{layout.hour_of(first)}"
            # "~~" sorts after every name of that millisecond (ids have no "~").
            after = f"{start - 1:013d}{layout.SEP * 2}" if first < start else ""
            while True:
                names = yield listafter(prefix, after, 1000)
                for name in names:
                    key = f"{prefix}/{name}"
                    if key in place.seen:
                        continue
                    single = layout.parse_time_name(name)
                    batch = None if single is not None else layout.parse_batch_name(name)
                    if single is not None:
                        place.seen[key] = single.time_ms
                        if kinds is None or single.type in kinds:
                            sources.append(_Source(single.time_ms, key, False))
                    elif batch is not None:
                        place.seen[key] = batch.min_ms
                        sources.append(_Source(batch.min_ms, key, True))
                if len(names) < 1000:
                    break
                after = names[-1]
        out: list[TaskEvent] = []
        for begin in range(0, len(sources), self.batch):
            chunk = sources[begin : begin + self.batch]
            bodies = yield read_many([source.key for source in chunk])
            for source in chunk:
                for event in self._decode(source, bodies.get(source.key) or b"", None):
                    if (kinds is None or event.type in kinds) and layout.epoch_ms(
                        event.time
                    ) >= place.since_ms:
                        out.append(event)
        place.read_at_ms = now_ms
        keep = max(place.since_ms, now_ms - place.settle_ms)  # the next listing's start
        place.seen = {key: ms for key, ms in place.seen.items() if ms >= keep}
        return out

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
                        _Source(batch.min_ms, key, True), bodies.get(key) or b"", None
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
                datetime.fromtimestamp(cutoff, UTC).isoformat(),
                self.store.url,
            )
        return removed
