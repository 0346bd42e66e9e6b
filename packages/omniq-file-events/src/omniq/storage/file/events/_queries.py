"""Reading events: ``query`` by task or by time and ``tail``, as programs over the layout of
``_layout`` (what ``_events`` writes). ``AsyncFileEventStorage`` takes them from
``EventQueries``."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime
from operator import itemgetter
from typing import TYPE_CHECKING, NamedTuple

from omniq.core import codec
from omniq.core.errors import SerializationError
from omniq.core.fs import Program, Store, listafter, listdir, listdirs, read_many
from omniq.core.models import EventType, TaskEvent, ensure_utc
from omniq.core.names import validate_name

from . import _layout as layout

log = logging.getLogger("omniq.events")


class Source(NamedTuple):
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


class Window:
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


class EventQueries:
    """query and tail (writing and cleanup: ``_events.AsyncFileEventStorage``)."""

    store: Store
    batch: int
    _grouped: bool

    if TYPE_CHECKING:

        async def flush(self) -> None: ...

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
        window = Window(ensure_utc(since, "since"), ensure_utc(until, "until"))
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
        window: Window,
        lead: str = "",
    ) -> list[Source]:
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
                        out.append(Source(holder.min_ms, layout.batch_time_key(holder), True))
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
                    out.append(Source(single.time_ms, f"{prefix}/{listed}", False))
                continue
            batch = layout.parse_batch_name(name)
            if batch is not None and window.may_overlap(batch.min_ms, batch.max_ms):
                key = f"{prefix}/{listed}" if task_id is None else layout.batch_time_key(batch)
                out.append(Source(batch.min_ms, key, True))
        return out

    def _task_program(
        self, task_id: str, kind: str | None, window: Window, limit: int | None
    ) -> Program[list[TaskEvent]]:
        sources: list[Source] = []
        for prefix, lead in layout.task_dirs(task_id, self._grouped):
            listing = yield listdir(prefix, keep=layout.group_keep(task_id, lead) if lead else None)
            sources += self._sources(prefix, listing, task_id, kind, window, lead)
        out: list[TaskEvent] = []
        yield from self._read(sources, task_id, kind, window, out, limit)
        return out

    def _time_program(
        self, kind: str | None, window: Window, limit: int | None
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
        sources: list[Source],
        task_id: str | None,
        kind: str | None,
        window: Window,
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
    def _decode(source: Source, data: bytes, task_id: str | None) -> list[TaskEvent]:
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
        sources: list[Source] = []
        for hour in range(start // layout.HOUR_MS, now_ms // layout.HOUR_MS + 1):
            first = hour * layout.HOUR_MS
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
                            sources.append(Source(single.time_ms, key, False))
                    elif batch is not None:
                        place.seen[key] = batch.min_ms
                        sources.append(Source(batch.min_ms, key, True))
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
