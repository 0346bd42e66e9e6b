"""Schedules: periodic and cron tasks, fired once per tick by any number of workers.

There is no scheduler process. Every worker (unless started with ``schedules=False`` /
``omniq worker --no-schedules``) reads the schedules at most once per refresh interval and
fires the ticks that are due; the storage decides, so any number of workers on any number of
machines make one task per tick.

Layout, under ``{base_dir}/schedules/``::

    {schedule_id}.json                       the schedule (one JSON document, written whole)
    fired/{schedule_id}.{tick_ms:013d}.json  the record of one fired tick (exclusive create)

Firing tick ``t`` of schedule ``s`` (a worker whose last listing shows no record of ``t``):

1. **The task.** Enqueue the tick's task with the id derived from ``(s, t)`` and no ``eta``,
   so it is written by the queue's exclusive create of its ready file: the first create
   makes the task, every other one is refused. A create that comes after the task was
   claimed (its ready copy is gone) makes a copy of an attempt whose claim exists: the next
   claimer drops it, it never runs (see the queue's attempt protocol).
2. **The event** ``scheduled`` (events on): its id and time are derived from ``(s, t)``,
   so whoever writes it writes the same files (one event per tick).
3. **The record.** Create ``fired/{s}.{t}.json`` (exclusive): the newest record of a
   schedule is its last fired tick, which every worker reads from one listing. A firer that
   dies before 3 leaves the task without a record: the next worker to evaluate the tick is
   refused at 1, writes the event again (the same files) and creates the record.

A worker fires only ticks newer than the newest record in a listing made less than
``STALE_VIEW`` seconds before, and a record is pruned only when it is ``RECORD_RETENTION``
seconds old and ``RECORD_KEEP`` newer ones exist: a worker that fires an already fired tick
does so within ``STALE_VIEW`` of its record, when the task's own records (kept
``tombstone_ttl``, 300 s, after the task ends) still refuse or drop a second copy. A tick
fired more than ``LOOK_UP_AFTER`` seconds after it was due is first looked up (its task, its
result): a tick whose firer died between 1 and 3 long ago is not enqueued a second time.

What a schedule is and when it ticks: ``_schedule_ticks``.
"""

from __future__ import annotations

import builtins
import logging
import random
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

import anyio
import msgspec

from omniq.core import RedactFilter, codec
from omniq.core.errors import (
    ConfigurationError,
    NotFoundError,
    OmniQError,
    SerializationError,
    StorageError,
)
from omniq.core.fs import Entry, Store
from omniq.core.models import Task, from_epoch
from omniq.core.names import validate_name
from omniq.core.sync import SyncWrapper, blocking

from ._functions import func_path
from ._schedule_ticks import (
    SCHEDULE_VERSION,
    Schedule,
    ScheduleInfo,
    Ticks,
    build_schedule,
    from_ms,
    iso,
    jitter_ms,
    periodic_name,
    plan,
    task_for,
    tick_event,
)

log = logging.getLogger("omniq.schedules")
log.addFilter(RedactFilter())  # storage errors may quote URLs; credentials never show
F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_REFRESH = 1.0
"""Seconds between two reads of the schedules by one worker (``schedule_refresh``)."""
STALE_VIEW = 30.0
"""A worker stops firing when its listing is this old (it lists again first)."""
LOOK_UP_AFTER = 60.0
"""A tick fired this long after it was due is looked up first (its task, its result): its
task may have been made, run and cleaned up already by a firer that died before the record."""
RECORD_KEEP = 3
RECORD_RETENTION = 120.0
PRUNE_BATCH = 10
FIRED = "fired"


# -- storage -----------------------------------------------------------------------------------
class FiredRecord(msgspec.Struct, kw_only=True):
    """``fired/{id}.{tick}.json``: who recorded the tick, and when."""

    schedule_id: str
    tick: str
    task_id: str
    worker_id: str
    fired_at: float
    missed: bool = False
    nonce: str = ""


class View(msgspec.Struct, kw_only=True):
    """One worker's reading of the schedules: definitions and fired records."""

    at: float
    names: builtins.list[str]
    schedules: dict[str, Schedule]
    records: dict[str, builtins.list[Entry]]  # schedule id -> its records, oldest first

    def last(self, schedule_id: str) -> int | None:
        entries = self.records.get(schedule_id)
        return _record_tick(entries[-1].name)[1] if entries else None


def _record_name(schedule_id: str, tick_ms: int) -> str:
    return f"{schedule_id}.{tick_ms:013d}.json"


def _record_tick(name: str) -> tuple[str, int]:
    stem = name.removesuffix(".json")
    schedule_id, _, tick = stem.rpartition(".")
    return schedule_id, int(tick)


def _parse_record_name(name: str) -> tuple[str, int] | None:
    if not name.endswith(".json"):
        return None
    schedule_id, _, tick = name.removesuffix(".json").rpartition(".")
    if not schedule_id or not tick.isdigit():
        return None
    return schedule_id, int(tick)


class ScheduleStore:
    """The files of the schedules, under ``{base_dir}/schedules``."""

    def __init__(
        self,
        base_dir: str,
        storage_options: dict[str, Any] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.store = Store(base_dir, storage_options, package="omniq-backend-file", clock=clock)
        self._checked = False
        self._warned: dict[str, bytes] = {}

    def __repr__(self) -> str:
        return f"ScheduleStore({self.store.url!r})"

    def now(self) -> float:
        return self.store.clock()

    async def close(self) -> None:
        await self.store.aclose()

    async def check(self) -> None:
        if not self._checked:
            await self.store.probe_exclusive_create()
            self._checked = True

    async def read(self, schedule_id: str) -> Schedule | None:
        validate_name(schedule_id, "schedule id")
        data = await self.store.read(f"{schedule_id}.json")
        return None if data is None else self._decode(schedule_id, data, strict=True)

    def _decode(self, schedule_id: str, data: bytes, *, strict: bool = False) -> Schedule | None:
        try:
            schedule = codec.decode(data, Schedule)
            if schedule.v > SCHEDULE_VERSION:
                raise SerializationError(
                    f"written by a newer OmniQ (schema {schedule.v}; this one reads "
                    f"{SCHEDULE_VERSION})"
                )
            if schedule.id != schedule_id:
                raise SerializationError(f"its id {schedule.id!r} does not match its file name")
            Ticks(schedule)  # its time zone exists here
        except (SerializationError, ConfigurationError) as exc:
            if strict:
                raise SerializationError(f"schedule {schedule_id}: {exc}") from None
            if self._warned.get(schedule_id) != data:  # once per content, not every refresh
                self._warned[schedule_id] = data
                log.warning("ignoring schedule file %s.json: %s", schedule_id, exc)
            return None
        return schedule

    async def write(self, schedule: Schedule) -> None:
        data = msgspec.json.format(codec.encode(schedule), indent=2) + b"\n"
        await self.store.write(f"{schedule.id}.json", data)

    async def ids(self) -> builtins.list[str]:
        return [
            name.removesuffix(".json")
            for name in await self.store.listdir("")
            if name.endswith(".json") and _valid(name.removesuffix(".json"))
        ]

    async def view(self) -> View:
        """List and read everything: one listing of the schedules, one read of each, one
        listing of the fired records."""
        at = self.now()
        names = await self.ids()
        raw = await self.store.read_many(f"{n}.json" for n in names) if names else {}
        schedules = {}
        for name in names:
            data = raw.get(f"{name}.json")
            if data is not None and (schedule := self._decode(name, data)) is not None:
                schedules[name] = schedule
        records: dict[str, builtins.list[Entry]] = {}
        for entry in await self.store.listdir(FIRED, True):
            parsed = _parse_record_name(entry.name)
            if parsed is not None:
                records.setdefault(parsed[0], []).append(entry)
        for entries in records.values():
            entries.sort(key=lambda e: _record_tick(e.name)[1])
        return View(at=at, names=names, schedules=schedules, records=records)

    async def record(self, schedule: Schedule, tick_ms: int, record: FiredRecord) -> bool:
        """Create the tick's record; True if this call created it."""
        await self.check()
        data = codec.encode(record)
        return await self.store.create(f"{FIRED}/{_record_name(schedule.id, tick_ms)}", data)

    async def records(self, schedule_id: str) -> builtins.list[str]:
        prefix = f"{schedule_id}."
        return [
            name
            for name in await self.store.listdir(FIRED)
            if name.startswith(prefix) and (p := _parse_record_name(name)) and p[0] == schedule_id
        ]

    async def delete(self, schedule_id: str) -> bool:
        validate_name(schedule_id, "schedule id")
        existed = await self.store.exists(f"{schedule_id}.json")
        await self.store.delete(f"{schedule_id}.json")
        stale = [f"{FIRED}/{name}" for name in await self.records(schedule_id)]
        if stale:
            await self.store.delete_many(stale)
        return existed

    async def prune(self, view: View, schedule_id: str | None = None) -> int:
        """Delete old records: those of ``schedule_id`` beyond the newest ``RECORD_KEEP``
        and older than ``RECORD_RETENTION``, or (no id) those of schedules that are gone."""
        now = self.now()
        old: builtins.list[str] = []
        if schedule_id is not None:
            entries = view.records.get(schedule_id, [])[:-RECORD_KEEP]
            old = [e.name for e in entries if now - e.mtime > RECORD_RETENTION]
            if len(old) < PRUNE_BATCH:
                return 0
        else:
            for sid, entries in view.records.items():
                if sid not in view.names and all(now - e.mtime > RECORD_RETENTION for e in entries):
                    old += [e.name for e in entries]
        if old:
            await self.store.delete_many(f"{FIRED}/{name}" for name in old)
            for entries in view.records.values():
                entries[:] = [e for e in entries if e.name not in old]
        return len(old)


def _valid(name: str) -> bool:
    try:
        validate_name(name)
    except OmniQError:
        return False
    return True


# -- the API -----------------------------------------------------------------------------------
class AsyncSchedules:
    """``backend.schedules``: list, get, pause, resume and delete schedules.

    Create them with ``backend.schedule(...)`` or ``@backend.periodic(...)``. Changes are
    whole-file writes (the last writer wins); every worker sees them within its refresh
    interval."""

    def __init__(self, backend: Any, clock: Callable[[], float] | None = None) -> None:
        self._backend = backend
        self._clock = clock
        self._store: ScheduleStore | None = None
        self.pending: dict[str, Schedule] = {}  # @periodic registrations not written yet

    @property
    def available(self) -> bool:
        return self._backend.config.base_dir is not None

    @property
    def store(self) -> ScheduleStore:
        if self._store is None:
            cfg = self._backend.config
            if cfg.base_dir is None:
                raise ConfigurationError(
                    "schedules live under base_dir/schedules: give base_dir (or OMNIQ_BASE_DIR)"
                )
            self._store = ScheduleStore(
                f"{cfg.base_dir.rstrip('/')}/schedules", dict(cfg.storage_options), self._clock
            )
        return self._store

    def now(self) -> datetime:
        return from_epoch(self.store.now())

    async def close(self) -> None:
        if self._store is not None:
            await self._store.close()

    async def add(self, schedule: Schedule) -> str:
        """Store ``schedule``; one with the same id is updated, keeping its fired ticks and
        its pause state (and, if its timing is unchanged, the ticks it counts from)."""
        store = self.store
        old = await self._read_lenient(schedule.id)
        if old is not None:
            keep: dict[str, Any] = {"created_at": old.created_at, "paused": old.paused}
            if old.timing() == schedule.timing():
                keep.update(since=old.since, anchor=old.anchor)
            schedule = msgspec.structs.replace(schedule, **keep)
            if schedule.same_definition(old):
                return schedule.id
        await store.write(schedule)
        log.info("schedule %s stored: %s -> %s", schedule.id, schedule.when, schedule.func)
        return schedule.id

    async def _read_lenient(self, schedule_id: str) -> Schedule | None:
        try:
            return await self.store.read(schedule_id)
        except SerializationError as exc:
            log.warning("replacing unreadable schedule %s: %s", schedule_id, exc)
            return None

    async def sync(self) -> builtins.list[str]:
        """Store the schedules registered with ``@backend.periodic`` on this backend that
        are not stored yet (a worker of this backend does this when it starts)."""
        done = []
        for schedule_id, schedule in list(self.pending.items()):
            done.append(await self.add(schedule))
            self.pending.pop(schedule_id, None)
        return done

    def _info(self, schedule: Schedule, last: int | None, now_ms: int) -> ScheduleInfo:
        nxt = None
        if not schedule.paused:
            after = max(now_ms, -1 if last is None else last)
            nxt = Ticks(schedule).next_after(after)
        return ScheduleInfo(
            schedule=schedule,
            last_tick=None if last is None else from_ms(last),
            next_tick=None if nxt is None else from_ms(nxt),
        )

    async def list(self) -> builtins.list[ScheduleInfo]:
        """Every schedule (by id) with its last fired tick and its next tick."""
        await self.sync()
        view = await self.store.view()
        now_ms = int(self.store.now() * 1000)
        return [
            self._info(view.schedules[sid], view.last(sid), now_ms)
            for sid in sorted(view.schedules)
        ]

    async def get(self, schedule_id: str) -> ScheduleInfo:
        """One schedule; NotFoundError if there is none with this id."""
        schedule = await self._get(schedule_id)
        names = await self.store.records(schedule_id)
        last = max((_record_tick(n)[1] for n in names), default=None)
        return self._info(schedule, last, int(self.store.now() * 1000))

    async def _get(self, schedule_id: str) -> Schedule:
        try:
            validate_name(schedule_id, "schedule id")
        except OmniQError as exc:
            raise NotFoundError(str(exc)) from None
        schedule = await self.store.read(schedule_id)
        if schedule is None:
            raise NotFoundError(f"schedule {schedule_id} not found")
        return schedule

    async def pause(self, schedule_id: str) -> ScheduleInfo:
        """No tick fires until ``resume`` (workers see it within their refresh interval)."""
        return await self._set_paused(schedule_id, True)

    async def resume(self, schedule_id: str) -> ScheduleInfo:
        """Fire again, from now on: the ticks that passed while paused never fire."""
        return await self._set_paused(schedule_id, False)

    async def _set_paused(self, schedule_id: str, paused: bool) -> ScheduleInfo:
        schedule = await self._get(schedule_id)
        if schedule.paused != paused:
            now = self.now()
            changes: dict[str, Any] = {"paused": paused, "updated_at": now}
            if not paused:
                changes["since"] = max(schedule.since, now)
            schedule = msgspec.structs.replace(schedule, **changes)
            await self.store.write(schedule)
            log.info("schedule %s %s", schedule_id, "paused" if paused else "resumed")
        return await self.get(schedule_id)

    async def delete(self, schedule_id: str) -> bool:
        """Delete the schedule and its fired records; False if there was none."""
        try:
            validate_name(schedule_id, "schedule id")
        except OmniQError:
            return False
        self.pending.pop(schedule_id, None)
        existed = await self.store.delete(schedule_id)
        if existed:
            log.info("schedule %s deleted", schedule_id)
        return existed


class Schedules(SyncWrapper[AsyncSchedules]):
    """Blocking twin of :class:`AsyncSchedules` (``FileBackend.schedules``)."""

    @property
    def available(self) -> bool:
        """Whether schedules can be stored: the backend has a ``base_dir``."""
        return self._async.available

    def now(self) -> datetime:
        """The current time on the schedules' clock (UTC)."""
        return self._async.now()

    add = blocking(AsyncSchedules.add)
    sync = blocking(AsyncSchedules.sync)
    list = blocking(AsyncSchedules.list)
    get = blocking(AsyncSchedules.get)
    pause = blocking(AsyncSchedules.pause)
    resume = blocking(AsyncSchedules.resume)
    delete = blocking(AsyncSchedules.delete)

    def close(self) -> None:
        """Nothing to release: the backend owns the storage connections."""


# -- firing ------------------------------------------------------------------------------------
class ScheduleRunner:
    """What a worker runs to fire schedules: ``step()`` reads the schedules and fires the
    due ticks; ``run()`` steps at most once per ``refresh`` seconds until cancelled."""

    def __init__(
        self, backend: Any, *, refresh: float = DEFAULT_REFRESH, worker_id: str = "-"
    ) -> None:
        if not refresh > 0:
            raise ConfigurationError(f"schedule_refresh must be > 0 seconds, got {refresh!r}")
        self.backend = backend
        self.schedules: AsyncSchedules = backend.schedules
        self.refresh = float(refresh)
        self.worker_id = worker_id
        self.fired = 0  # ticks this runner recorded
        self.rounds = 0
        self._warned: set[str] = set()

    def grace_ms(self, schedule: Schedule) -> int:
        # Ticks are fired within about one refresh interval: never call them missed sooner.
        return int(max(schedule.misfire_grace, 2 * self.refresh) * 1000)

    async def run(self) -> None:
        if not self.schedules.available:
            log.debug("no base_dir: this worker fires no schedules")
            return
        try:  # this backend's @periodic schedules, at once (a burst worker may stop soon)
            await self.schedules.sync()
        except Exception as exc:
            log.warning("schedules: storing the registered schedules failed (%s); retrying", exc)
        # Workers started together would list in step and race for every tick.
        await anyio.sleep(random.uniform(0, self.refresh))
        failures = 0
        while True:
            started = time.monotonic()
            try:
                await self.step()
                failures = 0
            except (StorageError, OSError) as exc:
                failures += 1
                log.warning(
                    "schedules: %s: %s (retrying in %.1f s)",
                    type(exc).__name__,
                    exc,
                    self._pause(failures),
                )
            except Exception:
                failures += 1
                log.exception("schedules: internal error; retrying")
            wait = self._pause(failures) * random.uniform(1.0, 1.1)
            await anyio.sleep(max(0.0, wait - (time.monotonic() - started)))

    def _pause(self, failures: int) -> float:
        return self.refresh if not failures else min(30.0, self.refresh * 2**failures)

    async def step(self) -> builtins.list[tuple[str, int]]:
        """One round: read the schedules and fire what is due. Returns the ticks this call
        recorded, as ``(schedule_id, tick_ms)``."""
        self.rounds += 1
        await self.schedules.sync()
        store = self.schedules.store
        view = await store.view()
        recorded: builtins.list[tuple[str, int]] = []
        # What was due when the schedules were read: a tick due later waits for a reading
        # that would have seen a pause or a delete written meanwhile.
        now_ms = int(view.at * 1000)
        for schedule_id in sorted(view.schedules):
            schedule = view.schedules[schedule_id]
            if schedule.paused:
                continue
            try:
                late, on_time = plan(
                    schedule, view.last(schedule_id), now_ms, self.grace_ms(schedule)
                )
                due = [(t, True) for t in late] + [(t, False) for t in on_time]
                tasks = [task_for(schedule, tick) for tick, _ in due]
            except (ValueError, TypeError, OmniQError) as exc:  # a file edited by hand
                self._broken(schedule, exc)
                continue
            fired_here = False
            for (tick, missed), task in zip(due, tasks, strict=True):
                if store.now() - view.at > STALE_VIEW:
                    log.info("schedules: this round took over %gs; listing again", STALE_VIEW)
                    return recorded
                if await self.fire(schedule, tick, missed=missed, task=task):
                    recorded.append((schedule_id, tick))
                    fired_here = True
            if fired_here:
                await store.prune(view, schedule_id)
        if self.rounds % 60 == 1:
            await store.prune(view)  # records of deleted schedules
        return recorded

    def _broken(self, schedule: Schedule, exc: BaseException) -> None:
        key = f"{schedule.id}|{schedule.updated_at}|{exc}"
        if key not in self._warned:
            self._warned.add(key)
            log.warning("schedule %s cannot fire: %s: %s", schedule.id, type(exc).__name__, exc)

    async def fire(
        self, schedule: Schedule, tick_ms: int, *, missed: bool = False, task: Task | None = None
    ) -> bool:
        """Fire one tick: the task (exclusive create of its ready file), its ``scheduled``
        event (when events are on), then the tick's record (exclusive create). True if this
        call created the record."""
        backend = self.backend
        store = self.schedules.store
        task = task or task_for(schedule, tick_ms)
        overdue = store.now() * 1000 - tick_ms - jitter_ms(schedule, tick_ms)
        if overdue > LOOK_UP_AFTER * 1000 and await self._known(task):
            log.info("schedule %s: tick %s has its task already", schedule.id, iso(tick_ms))
        else:
            await backend.queue.enqueue(task)
        # Before the record (which stops the other workers): a firer killed in between
        # leaves the event to the next one, who writes the same files again.
        await backend.emit(tick_event(schedule, tick_ms, task, self.worker_id, missed))
        record = FiredRecord(
            schedule_id=schedule.id,
            tick=iso(tick_ms),
            task_id=task.id,
            worker_id=self.worker_id,
            fired_at=store.now(),
            missed=missed,
            nonce=uuid.uuid4().hex[:16],
        )
        if not await store.record(schedule, tick_ms, record):
            return False
        self.fired += 1
        log.info(
            "schedule %s fired tick %s%s: task %s %s",
            schedule.id,
            iso(tick_ms),
            " (missed)" if missed else "",
            task.id,
            task.func,
        )
        return True

    async def _known(self, task: Task) -> bool:
        """Whether an overdue tick's task exists or ran (its firer may have died before the
        record, long ago): then it is not enqueued again."""
        try:
            await self.backend.queue.get_task(task.id, task.queue)
            return True
        except NotFoundError:
            pass
        results = self.backend.results
        return results is not None and await results.get(task.id) is not None


async def run_schedules(worker: Any) -> None:
    """The worker's schedule loop (``AsyncWorker(schedules=True)``)."""
    runner = ScheduleRunner(
        worker.backend, refresh=worker.schedule_refresh, worker_id=worker.worker_id
    )
    worker.schedule_runner = runner
    await runner.run()


def periodic_decorator(
    backend: Any, register: Callable[[Schedule], None], options: dict[str, Any]
) -> Callable[[F], F]:
    """``@backend.periodic(...)``: the function, unchanged, with its schedule registered."""
    args = options.pop("args", ())
    kwargs = options.pop("kwargs", None)
    name = options.pop("name", None)

    def wrap(fn: F) -> F:
        path = func_path(fn)
        schedule = build_schedule(
            fn,
            args,
            kwargs,
            now=backend.schedules.now(),
            defaults=backend.config,
            name=name or periodic_name(path),
            **options,
        )
        register(schedule)
        fn.__omniq_schedule__ = schedule.id  # type: ignore[attr-defined]
        return fn

    return wrap
