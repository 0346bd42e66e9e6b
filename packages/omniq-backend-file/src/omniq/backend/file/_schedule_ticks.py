"""What a schedule is and when it ticks: the stored ``Schedule``, its validation
(``build_schedule``), its ticks (``Ticks``, ``plan``) and what a tick makes (its task id,
task and ``scheduled`` event). Storing and firing them: ``_schedules``.

Ticks are epoch milliseconds. Cron ticks are computed by ``cronsim`` in the schedule's time
zone, as Debian's cron does: at a DST fall-back a job at a fixed time fires once (the first
of the two wall-clock instants), at a spring-forward a job whose time does not exist fires at
the first valid minute after the gap; jobs with a ``*`` in the minute or hour field follow
real time. ``every`` ticks are ``anchor + k * every`` in real time, whatever the zone.
"""

from __future__ import annotations

import hashlib
import logging
import math
import zoneinfo
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import msgspec
from cronsim import CronSim, CronSimError

from omniq.core import codec
from omniq.core.errors import (
    ConfigurationError,
    OmniQError,
    SerializationError,
)
from omniq.core.models import (
    MAX_PRIORITY,
    MIN_PRIORITY,
    UTC,
    EventType,
    Task,
    TaskEvent,
    id_text,
    new_id,
)
from omniq.core.names import validate_name

from ._functions import func_path

log = logging.getLogger("omniq.schedules")

SCHEDULE_VERSION = 1
MISFIRE_POLICIES = ("latest", "skip", "all")
DEFAULT_GRACE = 60.0
"""A tick not fired within this many seconds of its time is missed (``misfire_grace``)."""
CATCH_UP_LIMIT = 100
"""``misfire="all"`` fires at most this many missed ticks of a schedule (the newest)."""
ROUND_LIMIT = 1000
"""At most this many on-time ticks of one schedule are fired per round."""


# -- the model ---------------------------------------------------------------------------------
class Schedule(msgspec.Struct, kw_only=True):
    """One schedule, as stored in ``schedules/{id}.json``. Times are UTC instants."""

    v: int = SCHEDULE_VERSION
    id: str
    func: str
    args: list[Any] = msgspec.field(default_factory=list)
    kwargs: dict[str, Any] = msgspec.field(default_factory=dict)
    cron: str | None = None
    every: float | None = None
    at: datetime | None = None
    tz: str = "UTC"
    queue: str = "default"
    priority: int = 0
    max_retries: int = 0
    timeout: float | None = None
    ttl: float | None = None
    start: datetime | None = None
    end: datetime | None = None
    misfire: str = "latest"
    misfire_grace: float = DEFAULT_GRACE
    jitter: float | None = None
    paused: bool = False
    created_at: datetime
    updated_at: datetime
    since: datetime
    """No tick before this fires: the creation, the last change of timing, the last resume."""
    anchor: datetime | None = None
    """``every`` schedules: tick k is ``anchor + k * every``."""

    @property
    def when(self) -> str:
        """The timing as text: ``cron '0 * * * *' Europe/Berlin``, ``every 60s``, ``at ...``."""
        if self.cron is not None:
            return f"cron '{self.cron}'" + ("" if self.tz == "UTC" else f" {self.tz}")
        if self.every is not None:
            return f"every {self.every:g}s"
        assert self.at is not None
        return f"at {self.at.isoformat().replace('+00:00', 'Z')}"

    def timing(self) -> tuple[Any, ...]:
        """What decides the ticks (a change resets ``since`` and ``anchor``)."""
        return (self.cron, self.every, self.at, self.tz, self.start)

    def same_definition(self, other: Schedule) -> bool:
        mine = msgspec.structs.replace(self, updated_at=other.updated_at, paused=other.paused)
        return mine == other


class ScheduleInfo(msgspec.Struct, kw_only=True):
    """A schedule with its state: the last tick fired (by any worker) and the next one."""

    schedule: Schedule
    last_tick: datetime | None = None
    next_tick: datetime | None = None

    @property
    def id(self) -> str:
        return self.schedule.id

    @property
    def paused(self) -> bool:
        return self.schedule.paused


def _ms(when: datetime) -> int:
    return round(when.timestamp() * 1000)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def from_ms(ms: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=ms)  # exact, unlike fromtimestamp(ms / 1000)


def iso(ms: int) -> str:
    return from_ms(ms).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def zone(name: str) -> zoneinfo.ZoneInfo:
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, TypeError):
        raise ConfigurationError(
            f"tz: unknown time zone {name!r} (an IANA name such as 'Europe/Berlin' or 'UTC'; "
            "on systems without a zone database, `pip install tzdata`)"
        ) from None


def _derived_id(time_ms: int, key: str) -> str:
    """A 26-character id like every OmniQ id (ULID): its time part ``time_ms``, the rest
    derived from ``key``."""
    digest = hashlib.blake2b(key.encode(), digest_size=10).digest()
    return id_text((max(0, time_ms) << 80) | int.from_bytes(digest, "big"))


def tick_task_id(schedule: Schedule, tick_ms: int) -> str:
    """The task id of one tick: its time part the tick (so the queue orders it as a task
    made at the tick), the rest derived from the schedule and the tick. The same for every
    worker."""
    return _derived_id(tick_ms, f"{schedule.id}|{_ms(schedule.created_at)}|{tick_ms}")


def tick_event(
    schedule: Schedule, tick_ms: int, task: Task, worker_id: str, missed: bool
) -> TaskEvent:
    """The ``scheduled`` event of one tick. Its id and its time (the tick's due time) are
    derived from the schedule and the tick: every worker that writes it writes the same two
    files, so it is written before the tick's record and a firer killed in between loses
    nothing, and the event exists once."""
    due = tick_ms + jitter_ms(schedule, tick_ms)
    key = f"{schedule.id}|{_ms(schedule.created_at)}|{tick_ms}|scheduled"
    return TaskEvent(
        id=_derived_id(due, key),
        time=from_ms(due),
        task_id=task.id,
        type=EventType.SCHEDULED,
        queue=task.queue,
        worker_id=worker_id,
        data={
            "func": task.func,
            "schedule_id": schedule.id,
            "tick": iso(tick_ms),
            "missed": missed,
        },
    )


def jitter_ms(schedule: Schedule, tick_ms: int) -> int:
    """The tick's delay in [0, jitter): derived from the schedule and the tick, so every worker
    agrees when the tick is due."""
    if not schedule.jitter:
        return 0
    digest = hashlib.blake2b(f"{schedule.id}|{tick_ms}|jitter".encode(), digest_size=8).digest()
    return int(int.from_bytes(digest, "big") / 2**64 * schedule.jitter * 1000)


# -- ticks -------------------------------------------------------------------------------------
class Ticks:
    """The ticks of one schedule (epoch ms), within its ``since``/``start`` and ``end``."""

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule
        self.zone = zone(schedule.tz)
        floor = _ms(schedule.since)
        if schedule.start is not None:
            floor = max(floor, _ms(schedule.start))
        self.floor = floor
        self.end = None if schedule.end is None else _ms(schedule.end)

    def _bounds(self, lo: int, hi: int | None) -> tuple[int, int | None]:
        lo = max(lo, self.floor - 1)
        if self.end is not None:
            hi = self.end if hi is None else min(hi, self.end)
        return lo, hi

    def after(self, lo: int, hi: int | None, limit: int) -> list[int]:
        """Ticks in ``(lo, hi]`` (no upper bound if ``hi`` is None), oldest first."""
        lo, hi = self._bounds(lo, hi)
        if (hi is not None and hi <= lo) or limit <= 0:
            return []
        s = self.schedule
        out: list[int] = []
        if s.at is not None:
            tick = _ms(s.at)
            return [tick] if tick > lo and (hi is None or tick <= hi) else []
        if s.every is not None:
            period, anchor = _period(s), _ms(s.anchor or s.since)
            k = max(0, (lo - anchor) // period + 1)
            while len(out) < limit:
                tick = anchor + k * period
                if hi is not None and tick > hi:
                    break
                out.append(tick)
                k += 1
            return out
        assert s.cron is not None
        it = CronSim(s.cron, datetime.fromtimestamp(lo / 1000, self.zone))
        try:
            while len(out) < limit:
                tick = _ms(next(it))
                if hi is not None and tick > hi:
                    break
                if tick > lo:
                    out.append(tick)
        except StopIteration:
            pass
        return out

    def before(self, hi: int, lo: int, limit: int) -> list[int]:
        """Ticks in ``(lo, hi]``, newest first."""
        lo, bounded = self._bounds(lo, hi)
        assert bounded is not None
        hi = bounded
        if hi <= lo or limit <= 0:
            return []
        s = self.schedule
        out: list[int] = []
        if s.at is not None or (s.every is None and s.cron is None):
            return self.after(lo, hi, limit)
        if s.every is not None:
            period, anchor = _period(s), _ms(s.anchor or s.since)
            if hi < anchor:
                return []
            k = (hi - anchor) // period
            while k >= 0 and len(out) < limit:
                tick = anchor + k * period
                if tick <= lo:
                    break
                out.append(tick)
                k -= 1
            return out
        assert s.cron is not None
        # Whole seconds: cron ticks are; a start with a fraction would be rounded down.
        start = datetime.fromtimestamp(hi // 1000 + 1, self.zone)
        it = CronSim(s.cron, start, reverse=True)
        try:
            while len(out) < limit:
                tick = _ms(next(it))
                if tick <= lo:
                    break
                if tick <= hi:
                    out.append(tick)
        except StopIteration:
            pass
        return out

    def next_after(self, lo: int) -> int | None:
        found = self.after(lo, None, 1)
        return found[0] if found else None


def _period(schedule: Schedule) -> int:
    assert schedule.every is not None
    return max(1, round(schedule.every * 1000))


def plan(
    schedule: Schedule, last: int | None, now: int, grace_ms: int
) -> tuple[list[int], list[int]]:
    """The ticks to fire now, oldest first: ``(missed, on_time)``. ``last`` is the newest
    fired tick (None: none yet); a tick more than ``grace_ms`` (plus the jitter) past its time
    is missed and fires per the schedule's ``misfire`` policy:

    * ``latest``: missed ticks collapse into one run, the newest of them, unless a tick is
      due on time now (that run covers them);
    * ``skip``: missed ticks never fire;
    * ``all``: each fires, the newest ``CATCH_UP_LIMIT`` of them (older ones are skipped).
    """
    ticks = Ticks(schedule)
    lo = -1 if last is None else last
    edge = now - grace_ms - int((schedule.jitter or 0) * 1000)
    on_time = []
    for tick in ticks.after(max(lo, edge), now, ROUND_LIMIT):
        if tick + jitter_ms(schedule, tick) > now:
            break  # in order: the newest record must never pass a tick still to fire
        on_time.append(tick)
    missed: list[int] = []
    if schedule.misfire == "all":
        missed = ticks.before(edge, lo, CATCH_UP_LIMIT + 1)
        if len(missed) > CATCH_UP_LIMIT:
            missed = missed[:CATCH_UP_LIMIT]
            log.warning(
                "schedule %s: more than %d ticks were missed; firing the newest %d (since %s)",
                schedule.id,
                CATCH_UP_LIMIT,
                CATCH_UP_LIMIT,
                iso(missed[-1]),
            )
        missed.reverse()
    elif schedule.misfire == "latest" and not on_time:
        missed = ticks.before(edge, lo, 1)
    return missed, on_time


# -- building and validating a schedule ----------------------------------------------------------
def _seconds(value: Any, what: str, *, zero: bool = False) -> float:
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError(
            f"{what} must be a number of seconds or a timedelta, not {type(value).__name__}"
        )
    number = float(value)
    if not math.isfinite(number) or number < 0 or (number == 0 and not zero):
        relation = ">= 0" if zero else "> 0"
        raise ConfigurationError(f"{what} must be {relation} seconds, got {value!r}")
    return number


def _instant(value: Any, what: str, tz: zoneinfo.ZoneInfo) -> datetime:
    """A datetime as a UTC instant; a naive one is wall-clock time in the schedule's zone."""
    if not isinstance(value, datetime):
        raise ConfigurationError(f"{what} must be a datetime, not {type(value).__name__}")
    when: datetime = value
    if when.tzinfo is None or when.utcoffset() is None:
        when = when.replace(tzinfo=tz)
    return when.astimezone(UTC)


def check_cron(expr: Any) -> str:
    if not isinstance(expr, str) or not expr.strip():
        raise ConfigurationError(f"cron must be a non-empty string, not {expr!r}")
    text = " ".join(expr.split())
    if len(text.split()) not in (5, 6):
        raise ConfigurationError(
            f"cron expression {expr!r} has {len(text.split())} fields; it needs 5 "
            "(minute hour day-of-month month day-of-week), or 6 with seconds first"
        )
    try:
        it = CronSim(text, datetime(2000, 1, 1, tzinfo=UTC))
    except CronSimError as exc:
        raise ConfigurationError(f"cron expression {expr!r} is invalid: {exc}") from None
    except (ValueError, IndexError, KeyError) as exc:  # cronsim's own checks missed it
        raise ConfigurationError(f"cron expression {expr!r} is invalid ({exc})") from None
    try:
        next(it)
    except StopIteration:
        raise ConfigurationError(f"cron expression {expr!r} never matches a date") from None
    return text


def build_schedule(
    func: Callable[..., Any] | str,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    now: datetime,
    defaults: Any = None,
    cron: str | None = None,
    every: float | timedelta | None = None,
    at: datetime | None = None,
    tz: str | None = None,
    name: str | None = None,
    queue: str = "default",
    priority: int = 0,
    max_retries: int | None = None,
    timeout: float | None = None,
    ttl: float | timedelta | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
    misfire: str = "latest",
    misfire_grace: float | timedelta = DEFAULT_GRACE,
    jitter: float | timedelta | None = None,
) -> Schedule:
    """Check every argument (ConfigurationError naming the problem) and build the Schedule.
    No I/O: a schedule that fails here is never stored."""
    path = func_path(func)  # ConfigurationError for lambdas, nested functions, bad paths
    given = [k for k, v in (("cron", cron), ("every", every), ("at", at)) if v is not None]
    if len(given) != 1:
        raise ConfigurationError(
            "give exactly one of cron=, every= or at= "
            + (f"(got {', '.join(given)})" if given else "(got none)")
        )
    tz_name = "UTC" if tz is None else tz
    if not isinstance(tz_name, str):
        raise ConfigurationError(f"tz must be a time zone name, not {type(tz_name).__name__}")
    zoneinfo_ = zone(tz_name)
    if name is not None:
        try:
            validate_name(name, "schedule name")
        except OmniQError as exc:
            raise ConfigurationError(str(exc)) from None
    try:
        validate_name(queue, "queue name")
    except OmniQError as exc:
        raise ConfigurationError(str(exc)) from None
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ConfigurationError(f"priority must be an integer, not {type(priority).__name__}")
    if not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        raise ConfigurationError(
            f"priority must be in [{MIN_PRIORITY}, {MAX_PRIORITY}], got {priority}"
        )
    if max_retries is None:
        max_retries = getattr(defaults, "max_retries", 0)
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise ConfigurationError(f"max_retries must be an integer >= 0, got {max_retries!r}")
    if timeout is None:
        timeout = getattr(defaults, "timeout", None)
    timeout_s = None if timeout is None else _seconds(timeout, "timeout")
    ttl_s = None if ttl is None else _seconds(ttl, "ttl")
    jitter_s = None if jitter is None else _seconds(jitter, "jitter", zero=True) or None
    grace_s = _seconds(misfire_grace, "misfire_grace")
    if misfire not in MISFIRE_POLICIES:
        raise ConfigurationError(
            f"misfire must be one of {', '.join(map(repr, MISFIRE_POLICIES))}, not {misfire!r}"
        )
    if isinstance(args, (str, bytes)) or not isinstance(args, Sequence):
        raise ConfigurationError(f"args must be a list or tuple, not {type(args).__name__}")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise ConfigurationError(f"kwargs must be a dict, not {type(kwargs).__name__}")
    arg_list, kwarg_dict = list(args), dict(kwargs or {})
    try:
        codec.check_json_value(arg_list, "args")
        codec.check_json_value(kwarg_dict, "kwargs")
    except SerializationError as exc:
        raise ConfigurationError(str(exc)) from None
    cron_text = None if cron is None else check_cron(cron)
    every_s = None if every is None else _seconds(every, "every")
    if every_s is not None and every_s < 0.001:
        raise ConfigurationError(f"every must be at least 0.001 seconds, got {every!r}")
    at_utc = None if at is None else _instant(at, "at", zoneinfo_)
    start_utc = None if start is None else _instant(start, "start", zoneinfo_)
    end_utc = None if end is None else _instant(end, "end", zoneinfo_)
    if at_utc is not None and (start_utc is not None or end_utc is not None):
        raise ConfigurationError("start= and end= apply to cron and every schedules, not at=")
    if start_utc is not None and end_utc is not None and end_utc < start_utc:
        raise ConfigurationError(
            f"end ({end_utc.isoformat()}) is before start ({start_utc.isoformat()})"
        )
    now = now.astimezone(UTC)
    since = now if at_utc is None else min(now, at_utc)  # an `at` in the past fires at once
    anchor = None
    if every_s is not None:
        anchor = start_utc or now + timedelta(seconds=every_s)
    return Schedule(
        id=name or new_id(),
        func=path,
        args=arg_list,
        kwargs=kwarg_dict,
        cron=cron_text,
        every=every_s,
        at=at_utc,
        tz=tz_name,
        queue=queue,
        priority=priority,
        max_retries=max_retries,
        timeout=timeout_s,
        ttl=ttl_s,
        start=start_utc,
        end=end_utc,
        misfire=misfire,
        misfire_grace=grace_s,
        jitter=jitter_s,
        created_at=now,
        updated_at=now,
        since=since,
        anchor=anchor,
    )


def periodic_name(path: str) -> str:
    """The default name of ``@backend.periodic``: the function's path, ``:`` as ``.``."""
    name = path.replace(":", ".")
    try:
        return validate_name(name, "schedule name")
    except OmniQError:
        raise ConfigurationError(
            f"cannot derive a schedule name from {path!r}; give name=..."
        ) from None


def task_for(schedule: Schedule, tick_ms: int) -> Task:
    """The task that tick ``tick_ms`` of ``schedule`` enqueues (no eta: it is due now)."""
    due = tick_ms + jitter_ms(schedule, tick_ms)
    expires = None if schedule.ttl is None else from_ms(due) + timedelta(seconds=schedule.ttl)
    return Task(
        id=tick_task_id(schedule, tick_ms),
        func=schedule.func,
        args=list(schedule.args),
        kwargs=dict(schedule.kwargs),
        queue=schedule.queue,
        priority=schedule.priority,
        expires_at=expires,
        max_retries=schedule.max_retries,
        timeout=schedule.timeout,
        metadata={"schedule_id": schedule.id, "schedule_tick": iso(tick_ms)},
    )
