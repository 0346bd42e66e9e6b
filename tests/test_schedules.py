"""Schedules: periodic and cron tasks fired once per tick by any number of workers.

* four worker processes and an every-second schedule for 20+ ticks, on a local directory and
  on S3 (moto), with and without workers killed (SIGKILL) and restarted: one task per tick,
  none missing;
* the firing protocol itself: two workers firing the same tick make one task, one record,
  one event, on all five filesystems; a tick fired again after its task ran makes no task;
* a cron schedule with an injected clock; DST fall-back and spring-forward (Europe/Berlin,
  America/New_York); misfire policies; jitter;
* pause / resume / delete seen by every worker within the refresh interval;
* bad arguments: a ConfigurationError naming the problem, nothing stored;
* the API on all five filesystems, the decorator, the CLI, ``--no-schedules``.

Worker processes import ``test_schedules:record_run`` (this module) by path.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import anyio
import pytest

from omniq.backend.file import AsyncFileBackend, FileBackend, cli
from omniq.backend.file._schedule_ticks import (
    CATCH_UP_LIMIT,
    Ticks,
    iso,
    jitter_ms,
    plan,
    task_for,
    tick_task_id,
)
from omniq.backend.file._schedules import ScheduleRunner
from omniq.core.errors import ConfigurationError, NotFoundError
from omniq.core.models import EventType, ResultStatus, TaskStatus
from omniq.core.names import validate_name

UTC = timezone.utc
TESTS_DIR = Path(__file__).resolve().parent
BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
MEMORY = pytest.mark.parametrize("storage", ["memory"], indirect=True)


@pytest.fixture
def anyio_backend():
    return "asyncio"


def record_run(directory: str) -> int:
    """The scheduled function of the process tests: one file per execution."""
    name = f"{time.time_ns()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    Path(directory, name).write_text("ran\n")
    return os.getpid()


def noop() -> None:
    return None


class Clock:
    """An injected clock (epoch seconds) for the backend and its stores."""

    def __init__(self, when: datetime) -> None:
        self.t = when.timestamp()

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def ms(when: datetime) -> int:
    return round(when.timestamp() * 1000)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def make(storage, **settings) -> AsyncFileBackend:
    return AsyncFileBackend(storage.base_dir, storage.storage_options, environ={}, **settings)


async def scheduled_events(backend) -> list:
    return await backend.events.query(event_type=EventType.SCHEDULED)


async def step_until(runner: ScheduleRunner, clock: Clock, end: datetime, every: float) -> list:
    """Step the runner every ``every`` seconds of the injected clock until ``end``."""
    fired = []
    while clock.t < end.timestamp():
        clock.advance(every)
        fired += await runner.step()
    return fired


# -- the firing protocol ----------------------------------------------------------------------------
@pytest.mark.anyio
async def test_two_workers_firing_the_same_tick_make_one_task(storage):
    """Two backends (two workers' views) fire the same tick at once: the task's exclusive
    create makes one task, the record's exclusive create one record and one event. Once the
    task ran, firing the tick again makes no runnable task."""
    async with make(storage, events=True) as one, make(storage, events=True) as two:
        sid = await one.schedule(noop, every=60, name="minutely")
        schedule = (await one.schedules.get(sid)).schedule
        tick = ms(schedule.anchor)
        runners = [ScheduleRunner(b, worker_id=f"w{i}") for i, b in enumerate((one, two))]
        won: list[bool] = []

        async def fire(runner: ScheduleRunner) -> None:
            won.append(await runner.fire(schedule, tick))

        async with anyio.create_task_group() as tg:
            for runner in runners:
                tg.start_soon(fire, runner)
        assert sorted(won) == [False, True]
        task_id = tick_task_id(schedule, tick)
        assert (await one.queue.size()).ready == 1
        info = await one.get_task(task_id)
        assert info.status is TaskStatus.PENDING
        assert info.task.metadata == {"schedule_id": "minutely", "schedule_tick": iso(tick)}
        events = await scheduled_events(one)
        assert [(e.task_id, e.data["schedule_id"]) for e in events] == [(task_id, "minutely")]
        assert ms((await one.schedules.get(sid)).last_tick) == tick

        claimed = await one.queue.dequeue(wait=5)
        assert claimed is not None and claimed.id == task_id
        await one.queue.ack(claimed)
        # A worker with an old view fires the tick again: its create makes a copy of an
        # attempt that was claimed; no claimer runs it, and there is no second event.
        assert await runners[1].fire(schedule, tick) is False
        assert await two.queue.dequeue(wait=0.5) is None
        assert (await one.get_task(task_id)).status is TaskStatus.DONE
        assert len(await scheduled_events(one)) == 1


@MEMORY
@pytest.mark.anyio
async def test_a_late_tick_whose_task_ran_is_not_enqueued_again(storage):
    """A firer that died between the task and the record: the tick has a task (which ran)
    and no record. When the tick is fired later as a missed one, the runner finds the task
    and writes only the record."""
    clock = Clock(utc(2026, 5, 1, 12, 0))
    async with make(storage, clock=clock, events=True) as backend:
        sid = await backend.schedule(noop, cron="0 * * * *", name="hourly")
        schedule = (await backend.schedules.get(sid)).schedule
        tick = ms(utc(2026, 5, 1, 13, 0))
        clock.t = tick / 1000 + 1
        await backend.queue.enqueue(task_for(schedule, tick))  # ... and the firer died
        claimed = await backend.queue.dequeue(wait=1)
        await backend.queue.ack(claimed)
        clock.advance(1800)  # 30 min: the tick is missed now; "latest" fires it
        assert await ScheduleRunner(backend).step() == [(sid, tick)]
        assert (await backend.queue.size()).ready == 0
        assert await backend.queue.dequeue(wait=0.2) is None
        assert [e.data["missed"] for e in await scheduled_events(backend)] == [True]


def test_tick_task_ids_are_valid_deterministic_and_time_ordered():
    with FileBackend("memory://ids", environ={}) as backend:
        schedule = backend.make_schedule(noop, every=1, name="a")
        other = backend.make_schedule(noop, every=1, name="b")
    ids = [tick_task_id(schedule, t) for t in range(1_700_000_000_000, 1_700_000_010_000, 1000)]
    assert all(len(i) == 26 and validate_name(i) == i for i in ids)
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert tick_task_id(schedule, 1_700_000_000_000) == ids[0]
    assert tick_task_id(other, 1_700_000_000_000) != ids[0]


# -- four worker processes ---------------------------------------------------------------------------
WORKER_SCRIPT = """
import json, sys
from omniq.backend.file import FileBackend

cfg = json.loads(sys.argv[1])
backend = FileBackend(
    cfg["base"], cfg["options"], events=True, lease=cfg["lease"], clock_skew=0.5, environ={}
)
backend.worker(concurrency=4, poll=0.2).run()
"""
TICKS = 20


def _spawn(target, log: Path, lease: float) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), *filter(None, [env.get("PYTHONPATH")])])
    env["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
    cfg = json.dumps({"base": target.base_dir, "options": target.storage_options, "lease": lease})
    with open(log, "ab") as err:
        return subprocess.Popen(
            [sys.executable, "-c", WORKER_SCRIPT, cfg],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _done(backend: FileBackend, task_id: str) -> bool:
    """Whether the task is done; a tick's task that no worker fired yet is not known yet."""
    try:
        return backend.get_task(task_id).status is TaskStatus.DONE
    except NotFoundError:
        return False


def _four_workers(target, tmp_path: Path, kill: bool) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    logs = tmp_path / "logs"
    logs.mkdir()
    # A short lease when workers are killed: their tasks run again within seconds.
    lease = 5.0 if kill else 60.0
    procs = [_spawn(target, logs / f"w{i}.log", lease) for i in range(4)]
    kills = 0
    try:
        with FileBackend(
            target.base_dir, target.storage_options, events=True, environ={}
        ) as backend:
            # Workers starting late fire the first ticks late (they are within the grace).
            first = math.ceil(time.time()) + 1
            ticks = [first + k for k in range(TICKS)]
            sid = backend.schedule(
                "test_schedules:record_run",
                [str(runs)],
                every=1,
                start=datetime.fromtimestamp(first, UTC),
                end=datetime.fromtimestamp(ticks[-1], UTC),
                name="every-second",
            )
            next_kill = first + 2.0
            while time.time() < ticks[-1] + 0.5:
                if kill and next_kill <= time.time() < ticks[-1] - 3:
                    victim = random.randrange(len(procs))
                    procs[victim].send_signal(signal.SIGKILL)
                    procs[victim].wait()
                    procs[victim] = _spawn(target, logs / f"w{victim}.log", lease)
                    kills += 1
                    next_kill += 2.5
                for i, proc in enumerate(procs):
                    assert proc.poll() is None, (logs / f"w{i}.log").read_text()[-3000:]
                time.sleep(0.1)
            schedule = backend.schedules.get(sid).schedule
            ids = {tick: tick_task_id(schedule, tick * 1000) for tick in ticks}
            # Every task done (a task whose worker was killed runs again once its lease ends),
            # then the results: their attempt numbers count the runs of killed attempts.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not all(
                _done(backend, task_id) for task_id in ids.values()
            ):
                time.sleep(0.2)
            results = {tick: backend.result(ids[tick]) for tick in ticks}
            _stop(procs)
            events = backend.events.query(event_type=EventType.SCHEDULED)
            info = backend.schedules.get(sid)
    finally:
        _stop(procs)
    fired = Counter(e.data["tick"] for e in events)
    expected = {datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds") for t in ticks}
    assert set(fired) == {e.replace("+00:00", "Z") for e in expected}, "a tick missing or extra"
    assert set(fired.values()) == {1}, "a tick reported twice"
    assert sorted(e.task_id for e in events) == sorted(ids.values())
    for tick, result in results.items():
        assert result is not None and result.status is ResultStatus.SUCCESS, tick
    executions = len(list(runs.iterdir()))
    reruns = sum(r.attempt - 1 for r in results.values())  # a worker killed mid-task
    assert TICKS <= executions <= TICKS + reruns
    if kill:
        assert kills >= 4
    else:
        assert executions == TICKS and reruns == 0
    assert info.last_tick == datetime.fromtimestamp(ticks[-1], UTC) and info.next_tick is None


@pytest.mark.parametrize(
    "storage", ["local", pytest.param("s3", marks=pytest.mark.emulator)], indirect=True
)
def test_four_worker_processes_fire_each_tick_once(storage, tmp_path):
    _four_workers(storage, tmp_path, kill=False)


@pytest.mark.parametrize(
    "storage", ["local", pytest.param("s3", marks=pytest.mark.emulator)], indirect=True
)
def test_four_worker_processes_killed_and_restarted_fire_each_tick_once(storage, tmp_path):
    _four_workers(storage, tmp_path, kill=True)


# -- cron, DST, misfire, jitter (injected clocks) ------------------------------------------------------
@MEMORY
@pytest.mark.anyio
async def test_cron_schedule_with_injected_clock_and_three_workers(storage):
    """'*/5 * * * *' in Europe/Berlin for two hours: three workers, each reading the
    schedules on its own, step every 40 s of the injected clock (a random one each time,
    seeded). Each 5-minute tick fires once, on time."""
    clock = Clock(utc(2026, 6, 1, 8, 1))
    backends = [make(storage, clock=clock, events=True) for _ in range(3)]
    try:
        sid = await backends[0].schedule(
            noop, cron="*/5 * * * *", tz="Europe/Berlin", name="five", queue="cron"
        )
        runners = [ScheduleRunner(b, worker_id=f"w{i}") for i, b in enumerate(backends)]
        fired = []
        rng = random.Random(7)
        while clock.t < utc(2026, 6, 1, 10, 1).timestamp():
            clock.advance(40)
            for _, tick in await rng.choice(runners).step():
                assert 0 <= clock.t * 1000 - tick < 40_000  # fired on time
                fired.append(tick)
        expected = [ms(utc(2026, 6, 1, 8, 5)) + k * 300_000 for k in range(24)]
        assert fired == expected
        assert (await backends[0].queue.size("cron")).ready == 24
        for backend in backends:  # each backend's events are written in the background
            await backend.events.flush()
        events = await scheduled_events(backends[0])
        assert len(events) == 24 and {e.worker_id for e in events} == {"w0", "w1", "w2"}
        info = await backends[1].schedules.get(sid)
        assert info.last_tick == utc(2026, 6, 1, 10, 0)
        assert info.next_tick == utc(2026, 6, 1, 10, 5)
    finally:
        for backend in backends:
            await backend.close()


def _ticks(cron: str, tz: str, lo: datetime, hi: datetime) -> list:
    """The ticks in ``(lo, hi]`` of a schedule made before ``lo``."""
    clock = Clock(lo - timedelta(days=1))
    with FileBackend("memory://dst", environ={}, clock=clock) as backend:
        schedule = backend.make_schedule(noop, cron=cron, tz=tz, name="dst")
    return [
        datetime.fromtimestamp(t / 1000, UTC) for t in Ticks(schedule).after(ms(lo), ms(hi), 500)
    ]


@pytest.mark.parametrize(
    ("zone", "cron", "day", "expected_local"),
    [
        # Spring forward, Berlin 2026-03-29 02:00 -> 03:00: 02:30 does not exist -> 03:00.
        (
            "Europe/Berlin",
            "30 2 * * *",
            (2026, 3, 28),
            ["2026-03-28 02:30+01:00", "2026-03-29 03:00+02:00", "2026-03-30 02:30+02:00"],
        ),
        # Fall back, Berlin 2026-10-25 03:00 -> 02:00: 02:30 happens twice -> once (the first).
        (
            "Europe/Berlin",
            "30 2 * * *",
            (2026, 10, 24),
            ["2026-10-24 02:30+02:00", "2026-10-25 02:30+02:00", "2026-10-26 02:30+01:00"],
        ),
        # New York 2026-03-08 02:00 -> 03:00 and 2026-11-01 02:00 -> 01:00.
        (
            "America/New_York",
            "30 2 * * *",
            (2026, 3, 7),
            ["2026-03-07 02:30-05:00", "2026-03-08 03:00-04:00", "2026-03-09 02:30-04:00"],
        ),
        (
            "America/New_York",
            "30 1 * * *",
            (2026, 10, 31),
            ["2026-10-31 01:30-04:00", "2026-11-01 01:30-04:00", "2026-11-02 01:30-05:00"],
        ),
    ],
)
def test_dst_fixed_time_jobs_fire_once_and_never_get_lost(zone, cron, day, expected_local):
    lo = datetime(*day, tzinfo=ZoneInfo(zone)) - timedelta(minutes=1)
    got = _ticks(cron, zone, lo.astimezone(UTC), lo.astimezone(UTC) + timedelta(days=3))
    assert got == [datetime.fromisoformat(text).astimezone(UTC) for text in expected_local]


def test_dst_hourly_jobs_follow_real_time():
    """'0 * * * *' fires every real hour: 23 ticks on the spring-forward day, 25 on the
    fall-back day (the repeated hour fires in both of its real hours)."""
    for day, count in (((2026, 3, 29), 23), ((2026, 10, 25), 25), ((2026, 6, 1), 24)):
        lo = datetime(*day, tzinfo=BERLIN)
        hi = lo + timedelta(days=1)
        got = _ticks(
            "0 * * * *",
            "Europe/Berlin",
            lo.astimezone(UTC) - timedelta(milliseconds=1),
            hi.astimezone(UTC) - timedelta(milliseconds=1),
        )
        assert len(got) == count, day
        assert all(b - a == timedelta(hours=1) for a, b in itertools.pairwise(got))


@MEMORY
@pytest.mark.anyio
async def test_dst_transitions_with_an_injected_clock(storage):
    """A worker stepping every 10 minutes of an injected clock through both 2026 Berlin DST
    changes: the 02:30 job fires once a day, at 03:00 on the spring-forward day and once on
    the fall-back day; the New York 01:30 job once on its fall-back day."""
    for start, zone, cron, expected in (
        (
            utc(2026, 3, 27, 12),
            "Europe/Berlin",
            "30 2 * * *",
            [utc(2026, 3, 28, 1, 30), utc(2026, 3, 29, 1, 0), utc(2026, 3, 30, 0, 30)],
        ),
        (
            utc(2026, 10, 23, 12),
            "Europe/Berlin",
            "30 2 * * *",
            [utc(2026, 10, 24, 0, 30), utc(2026, 10, 25, 0, 30), utc(2026, 10, 26, 1, 30)],
        ),
        (
            utc(2026, 10, 30, 12),
            "America/New_York",
            "30 1 * * *",
            [utc(2026, 10, 31, 5, 30), utc(2026, 11, 1, 5, 30), utc(2026, 11, 2, 6, 30)],
        ),
    ):
        clock = Clock(start)
        async with AsyncFileBackend(
            f"{storage.base_dir}/{uuid.uuid4().hex}", clock=clock, environ={}
        ) as backend:
            await backend.schedule(noop, cron=cron, tz=zone, name="nightly")
            runner = ScheduleRunner(backend)
            fired = await step_until(runner, clock, start + timedelta(days=3, hours=1), 600)
            assert [datetime.fromtimestamp(t / 1000, UTC) for _, t in fired] == expected
            assert (await backend.queue.size()).ready == 3


@MEMORY
@pytest.mark.anyio
@pytest.mark.parametrize(
    ("misfire", "expected"),
    [
        # Down from 12:00:30 to 12:10:30, grace 20 s: the 12:01 ... 12:10 ticks were missed.
        ("latest", [12 * 60 + 10]),  # one run for all of them: the newest
        ("skip", []),  # none of them
        ("all", list(range(12 * 60 + 1, 12 * 60 + 11))),  # each
    ],
)
async def test_misfire_policies(storage, misfire, expected):
    clock = Clock(utc(2026, 5, 4, 12, 0, 30))
    async with make(storage, clock=clock) as backend:
        await backend.schedule(noop, cron="* * * * *", name="m", misfire=misfire, misfire_grace=20)
        runner = ScheduleRunner(backend)
        clock.advance(600)  # every worker was down for ten minutes
        fired = await runner.step()
        assert [t // 60_000 % (24 * 60) for _, t in fired] == expected
        # Afterwards the schedule goes on as usual, on time, with every policy.
        clock.advance(40)
        assert [t for _, t in await runner.step()] == [ms(utc(2026, 5, 4, 12, 11))]


@MEMORY
@pytest.mark.anyio
async def test_misfire_grace_and_catch_up_limit(storage):
    clock = Clock(utc(2026, 5, 4, 12, 0, 0, 500))
    async with make(storage, clock=clock) as backend:
        await backend.schedule(noop, every=10, name="skip", misfire="skip", misfire_grace=30)
        await backend.schedule(noop, every=1, name="all", misfire="all")
        runner = ScheduleRunner(backend)
        clock.advance(25)  # the ticks at +10 s and +20 s are late, but within the grace
        fired = Counter(sid for sid, _ in await runner.step())
        assert fired["skip"] == 2
        clock.advance(3600)  # an hour without workers: "all" fires the newest 100 + on time
        fired = Counter(sid for sid, _ in await runner.step())
        assert fired["skip"] == 3  # the ticks within the last 30 s
        assert fired["all"] == CATCH_UP_LIMIT + 60  # the last 60 s were on time


def test_plan_is_pure_and_respects_start_end():
    start = utc(2026, 1, 1, 0, 0)
    with FileBackend("memory://plan", environ={}, clock=Clock(start - timedelta(1))) as backend:
        schedule = backend.make_schedule(
            noop, every=60, start=start, end=start + timedelta(minutes=5), name="p"
        )
    now = ms(start + timedelta(minutes=10))
    missed, on_time = plan(schedule, None, now, 60_000)
    assert on_time == [] and missed == [ms(start + timedelta(minutes=5))]  # ends at end
    missed, on_time = plan(schedule, ms(start + timedelta(minutes=5)), now, 60_000)
    assert missed == on_time == []


@MEMORY
@pytest.mark.anyio
async def test_jitter_delays_each_tick_by_the_same_amount_for_every_worker(storage):
    clock = Clock(utc(2026, 5, 4, 12, 0, 0, 500_000))
    async with make(storage, clock=clock) as one, make(storage, clock=clock) as two:
        await one.schedule(noop, cron="* * * * *", name="j", jitter=30)
        schedule = (await one.schedules.get("j")).schedule
        tick = ms(utc(2026, 5, 4, 12, 1))
        delay = jitter_ms(schedule, tick)
        assert 0 <= delay < 30_000 and jitter_ms(schedule, tick + 60_000) != delay
        clock.t = (tick + delay - 1) / 1000
        assert await ScheduleRunner(one).step() == []  # not due yet, for either worker
        assert await ScheduleRunner(two).step() == []
        clock.t = (tick + delay) / 1000 + 0.0005
        assert await ScheduleRunner(two).step() == [("j", tick)]
        assert await ScheduleRunner(one).step() == []
        task = (await one.queue.dequeue(wait=1)).task
        assert task.eta is None and task.metadata["schedule_id"] == "j"


# -- pause, resume, delete ------------------------------------------------------------------------
@MEMORY
@pytest.mark.anyio
async def test_pause_resume_delete_seen_by_each_worker_at_its_next_read(storage):
    """Three workers (each with its own backend, so its own reading of the storage) and an
    injected clock: after a pause by a fourth process none fires at its next step; after the
    resume the ticks that passed while paused never fire; after a delete none fires."""
    clock = Clock(utc(2026, 5, 4, 12, 0, 0, 500))
    admin = make(storage, clock=clock, events=True)
    backends = [make(storage, clock=clock, events=True) for _ in range(3)]
    runners = [ScheduleRunner(b, worker_id=f"w{i}") for i, b in enumerate(backends)]
    try:
        await admin.schedule(noop, every=1, name="s")
        clock.advance(1)
        assert len(await runners[0].step()) == 1
        await admin.schedules.pause("s")
        paused_at = clock.t
        for runner in runners:
            clock.advance(1)
            assert await runner.step() == []
        assert (await runners[2].schedules.get("s")).paused
        clock.advance(10.25)  # resumed between two ticks
        info = await admin.schedules.resume("s")
        assert info.next_tick is not None and info.next_tick.timestamp() > clock.t
        clock.advance(1)
        fired = [t for runner in runners for _, t in await runner.step()]
        assert len(fired) == 1 and fired[0] / 1000 > clock.t - 1  # none from the pause
        assert all(not paused_at < t / 1000 < clock.t - 1 for t in fired)
        assert await admin.schedules.delete("s") is True
        for runner in runners:
            clock.advance(1)
            assert await runner.step() == []
        with pytest.raises(NotFoundError):
            await admin.schedules.get("s")
        assert await admin.schedules.delete("s") is False
        assert await admin.schedules.list() == []
    finally:
        for backend in (admin, *backends):
            await backend.close()


@pytest.mark.anyio
async def test_pause_resume_delete_reach_running_workers_within_the_refresh_interval(
    local_storage,
):
    """Three real workers (refresh 0.5 s) and an every-0.5 s schedule: once ``pause`` returns,
    no tick later than one refresh interval (plus a margin) fires; after ``resume`` ticks
    fire again, none from the pause; once ``delete`` returns, nothing more fires."""
    refresh, margin = 0.5, 1.0
    admin = make(local_storage, events=True)
    backends = [make(local_storage, events=True) for _ in range(3)]
    workers = [
        b.worker(["other"], poll=0.1, schedule_refresh=refresh, worker_id=f"w{i}")
        for i, b in enumerate(backends)
    ]

    async def ticks() -> list[float]:
        return sorted(
            datetime.fromisoformat(e.data["tick"].replace("Z", "+00:00")).timestamp()
            for e in await scheduled_events(admin)
        )

    async def wait_ticks(count: int) -> None:
        with anyio.fail_after(20):
            while len(await ticks()) < count:
                await anyio.sleep(0.05)

    try:
        async with anyio.create_task_group() as tg:
            for worker in workers:
                tg.start_soon(worker.run)
            await admin.schedule(noop, every=0.5, name="fast", queue="sched")
            await wait_ticks(3)
            await admin.schedules.pause("fast")
            paused_at = time.time()
            await anyio.sleep(refresh + margin)
            seen = await ticks()
            assert max(seen) <= paused_at + refresh + margin
            await anyio.sleep(1.5)  # three ticks would have come by now
            assert await ticks() == seen
            await admin.schedules.resume("fast")
            resumed_at = time.time()
            await wait_ticks(len(seen) + 2)
            after = [t for t in await ticks() if t not in seen]
            assert min(after) >= resumed_at - 0.01  # none of the paused ones
            assert await admin.schedules.delete("fast") is True
            await anyio.sleep(refresh + margin)
            seen = await ticks()
            await anyio.sleep(1.5)
            assert await ticks() == seen
            for worker in workers:
                worker.stop()
        assert len(Counter(await ticks())) == len(await ticks())  # no tick twice
        assert all(w.schedule_runner.rounds > 2 for w in workers)
    finally:
        for backend in (admin, *backends):
            await backend.close()


# -- the API on every filesystem ----------------------------------------------------------------------
@pytest.mark.anyio
async def test_storage_round_trip(storage):
    async with make(storage) as backend:
        assert await backend.schedules.list() == []
        sid = await backend.schedule(
            noop,
            cron="0 9 * * MON-FRI",
            tz="Europe/Berlin",
            name="weekdays",
            queue="reports",
            priority=5,
            max_retries=2,
            timeout=30,
            ttl=timedelta(hours=1),
            misfire="skip",
            jitter=5,
        )
        other = await backend.schedule("os:getcwd", every=timedelta(minutes=5))
        assert sid == "weekdays" and len(other) == 26
        infos = await backend.schedules.list()
        assert [i.id for i in infos] == sorted([sid, other])
        s = (await backend.schedules.get(sid)).schedule
        assert (s.func, s.queue, s.priority, s.max_retries, s.timeout, s.ttl) == (
            "test_schedules:noop",
            "reports",
            5,
            2,
            30.0,
            3600.0,
        )
        assert (s.cron, s.tz, s.misfire, s.jitter, s.paused) == (
            "0 9 * * MON-FRI",
            "Europe/Berlin",
            "skip",
            5.0,
            False,
        )
        # One JSON document per schedule, under base_dir/schedules/.
        raw = json.loads(await backend.schedules.store.store.read("weekdays.json"))
        assert raw["cron"] == "0 9 * * MON-FRI" and raw["tz"] == "Europe/Berlin"
        # The same name again updates it, keeping its creation and pause state.
        await backend.schedules.pause(sid)
        again = await backend.schedule(noop, cron="0 10 * * MON-FRI", name="weekdays")
        assert again == sid and len(await backend.schedules.list()) == 2
        updated = (await backend.schedules.get(sid)).schedule
        assert updated.cron == "0 10 * * MON-FRI" and updated.paused
        assert updated.created_at == s.created_at and updated.queue == "default"
        info = await backend.schedules.resume(sid)
        assert not info.paused and info.next_tick is not None
        # A fired tick's record is the last fired tick; delete removes it with the schedule.
        runner = ScheduleRunner(backend)
        tick = ms(info.next_tick)
        assert await runner.fire(updated, tick) is True
        assert (await backend.schedules.get(sid)).last_tick == info.next_tick
        assert await backend.schedules.store.records(sid)
        assert await backend.schedules.delete(sid) is True
        assert await backend.schedules.store.records(sid) == []
        assert [i.id for i in await backend.schedules.list()] == [other]
        with pytest.raises(NotFoundError):
            await backend.schedules.pause(sid)


def test_sync_api_and_decorator(tmp_path):
    with FileBackend(tmp_path / "store", environ={}) as backend:
        decorated = backend.periodic(every=60, kwargs={"directory": str(tmp_path)})(record_run)
        assert decorated is record_run  # the function, unchanged
        assert record_run.__omniq_schedule__ == "test_schedules.record_run"
        [info] = backend.schedules.list()
        assert info.schedule.kwargs == {"directory": str(tmp_path)}
        assert info.schedule.every == 60 and info.id == "test_schedules.record_run"
        assert (tmp_path / "store" / "schedules" / f"{info.id}.json").is_file()
        assert backend.schedules.pause(info.id).paused
        assert backend.schedules.delete(info.id) is True


def test_decorator_stores_at_once_sync_and_at_worker_start_async(tmp_path):
    base = tmp_path / "store"
    with FileBackend(base, environ={}) as backend:
        backend.periodic(cron="0 * * * *")(noop)
        backend.periodic(cron="0 * * * *")(noop)  # importing the module again: same schedule
        assert [i.id for i in backend.schedules.list()] == ["test_schedules.noop"]

    async def main() -> None:
        async with AsyncFileBackend(base, environ={}) as backend:
            backend.periodic(every=30, name="async-one", args=["x"])(record_run)
            assert not (base / "schedules" / "async-one.json").exists()
            await backend.worker(burst=True, idle_timeout=0.2, poll=0.1).run()
            assert (base / "schedules" / "async-one.json").is_file()
            assert [i.id for i in await backend.schedules.list()] == [
                "async-one",
                "test_schedules.noop",
            ]

    anyio.run(main)


# -- bad input -------------------------------------------------------------------------------------
BAD = [
    ({"cron": "61 * * * *"}, "cron expression '61 * * * *' is invalid: Bad minute"),
    ({"cron": "* * * *"}, "has 4 fields"),
    ({"cron": "0 0 30 2 *"}, "invalid"),
    ({"cron": ""}, "cron must be a non-empty string"),
    ({"every": 60, "tz": "Mars/Olympus"}, "unknown time zone 'Mars/Olympus'"),
    ({"every": 0}, "every must be > 0 seconds"),
    ({"every": -5}, "every must be > 0 seconds"),
    ({"every": timedelta(0)}, "every must be > 0 seconds"),
    ({"every": "60"}, "every must be a number of seconds or a timedelta"),
    ({"every": True}, "every must be a number"),
    ({"every": math.inf}, "every must be > 0 seconds"),
    ({}, "give exactly one of cron=, every= or at= (got none)"),
    ({"every": 5, "cron": "* * * * *"}, "(got cron, every)"),
    (
        {"every": 5, "start": utc(2026, 2, 1), "end": utc(2026, 1, 1)},
        "end (2026-01-01T00:00:00+00:00) is before start",
    ),
    ({"every": 5, "start": "tomorrow"}, "start must be a datetime"),
    ({"at": utc(2026, 1, 1), "end": utc(2026, 2, 1)}, "start= and end= apply to cron and every"),
    ({"every": 5, "misfire": "sometimes"}, "misfire must be one of 'latest', 'skip', 'all'"),
    ({"every": 5, "misfire_grace": 0}, "misfire_grace must be > 0 seconds"),
    ({"every": 5, "jitter": -1}, "jitter must be >= 0 seconds"),
    ({"every": 5, "ttl": 0}, "ttl must be > 0 seconds"),
    ({"every": 5, "timeout": -1}, "timeout must be > 0 seconds"),
    ({"every": 5, "name": "../etc"}, "schedule name '../etc' contains"),
    ({"every": 5, "name": "x" * 129}, "schedule name is 129 characters long"),
    ({"every": 5, "queue": "a/b"}, "queue name 'a/b' contains character '/'"),
    ({"every": 5, "priority": 1000}, "priority must be in [-999, 999]"),
    ({"every": 5, "max_retries": -1}, "max_retries must be an integer >= 0"),
    ({"every": 5, "args": [object()]}, "args[0]: value of type builtins.object"),
    ({"every": 5, "args": "abc"}, "args must be a list or tuple"),
    ({"every": 5, "kwargs": [1]}, "kwargs must be a dict"),
    ({"every": 5, "kwargs": {"when": utc(2026, 1, 1)}}, "kwargs['when']: value of type"),
    ({"every": 5, "func": lambda: None}, "is not importable by a worker"),
    ({"every": 5, "func": "no-colon"}, "must look like 'package.module:function'"),
]


@pytest.mark.parametrize(("options", "message"), BAD, ids=[m[:40] for _, m in BAD])
def test_bad_arguments_raise_configuration_error_and_store_nothing(tmp_path, options, message):
    options = dict(options)
    func = options.pop("func", noop)
    args = options.pop("args", ())
    kwargs = options.pop("kwargs", None)
    with FileBackend(tmp_path / "store", environ={}) as backend:
        with pytest.raises(ConfigurationError) as caught:
            backend.schedule(func, args, kwargs, **options)
        assert message in str(caught.value)
        if func is noop:  # the decorator checks the same way
            with pytest.raises(ConfigurationError):
                backend.periodic(args=args, kwargs=kwargs, **options)(noop)
        assert backend.schedules.list() == []
    assert not (tmp_path / "store" / "schedules").exists() or not any(
        (tmp_path / "store" / "schedules").iterdir()
    )


def test_unreadable_schedule_files_are_skipped_not_fatal(tmp_path, caplog):
    base = tmp_path / "store"
    with FileBackend(base, environ={}) as backend:
        backend.schedule(noop, every=1, name="good")
        (base / "schedules" / "broken.json").write_text("{not json")
        (base / "schedules" / "wrong-zone.json").write_text(
            (base / "schedules" / "good.json")
            .read_text()
            .replace('"UTC"', '"Nowhere/Else"')
            .replace('"good"', '"wrong-zone"')
        )
        assert [i.id for i in backend.schedules.list()] == ["good"]
        with pytest.raises(Exception, match="broken"):
            backend.schedules.get("broken")
    # (Only file names: another test's storage options may have made "file" a secret.)
    warned = [r.getMessage() for r in caplog.records if r.name == "omniq.schedules"]
    assert any("broken.json" in m and "cannot decode" in m for m in warned), warned
    assert any("wrong-zone.json" in m and "Nowhere/Else" in m for m in warned), warned


# -- the worker option and the CLI ----------------------------------------------------------------
@pytest.mark.anyio
async def test_a_worker_without_schedules_fires_nothing(local_storage):
    async with make(local_storage) as backend:
        await backend.schedule(noop, every=0.2, name="often")
        worker = backend.worker(poll=0.1, schedules=False, schedule_refresh=0.1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            await anyio.sleep(1.0)
            worker.stop()
        assert worker.schedule_runner is None
        assert (await backend.schedules.get("often")).last_tick is None
        with_schedules = backend.worker(poll=0.1, schedule_refresh=0.1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(with_schedules.run)
            with anyio.fail_after(10):
                while (await backend.schedules.get("often")).last_tick is None:
                    await anyio.sleep(0.05)
            with_schedules.stop()
    with pytest.raises(ValueError, match="schedule_refresh"):
        backend.worker(schedule_refresh=0)


def _cli(capsys, *args: object) -> tuple[int, str, str]:
    """``omniq ...`` in this process (the root logger and sys.path are restored after)."""
    root = logging.getLogger()
    saved = (root.level, list(root.handlers), list(sys.path))
    try:
        code = cli.main([str(a) for a in args], environ={})
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
        sys.path[:] = saved[2]
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_schedule_commands(tmp_path, capsys):
    base = str(tmp_path / "store")
    code, out, err = _cli(
        capsys,
        "schedule",
        "add",
        base,
        "test_schedules:record_run",
        "--cron",
        "*/10 * * * *",
        "--tz",
        "Europe/Berlin",
        "--name",
        "tenner",
        "--args",
        json.dumps([str(tmp_path)]),
        "--path",
        str(TESTS_DIR),
    )
    assert (code, out.strip()) == (0, "tenner"), err
    code, out, err = _cli(capsys, "schedule", "add", base, "os:getcwd", "--every", "30")
    assert code == 0 and len(out.strip()) == 26
    code, out, err = _cli(capsys, "schedule", "list", base)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["SCHEDULE", "FUNCTION", "WHEN", "STATE"]
    row = next(line for line in lines if line.startswith("tenner"))
    assert "cron '*/10 * * * *' Europe/Berlin" in row and "active" in row
    assert "LAST FIRED" in lines[0]
    code, out, err = _cli(capsys, "schedule", "pause", base, "tenner")
    assert code == 0 and "paused" in out
    code, out, _ = _cli(capsys, "status", base)
    assert code == 0 and "schedules: 2 (1 paused)" in out
    code, out, _ = _cli(capsys, "status", base, "--json")
    assert json.loads(out)["schedules"] == {"total": 2, "paused": 1}
    code, out, _ = _cli(capsys, "schedule", "list", base, "--json")
    doc = {d["id"]: d for d in json.loads(out)}
    assert doc["tenner"]["paused"] is True and doc["tenner"]["next_tick"] is None
    code, out, _ = _cli(capsys, "schedule", "resume", base, "tenner")
    assert code == 0 and "active" in out
    code, out, _ = _cli(capsys, "schedule", "delete", base, "tenner")
    assert (code, out.strip()) == (0, "deleted tenner")
    code, out, err = _cli(capsys, "schedule", "delete", base, "tenner")
    assert code == 2 and "schedule tenner not found" in err
    for bad, message in (
        (["--cron", "0 25 * * *"], "cron expression '0 25 * * *' is invalid: Bad hour"),
        (["--every", "0"], "every must be > 0 seconds"),
        (["--every", "5", "--tz", "Nowhere/Else"], "unknown time zone 'Nowhere/Else'"),
        (
            ["--every", "5", "--start", "2026-02-01T00:00", "--end", "2026-01-01T00:00"],
            "is before start",
        ),
        (["--at", "someday"], "--at: 'someday' is neither an ISO time"),
    ):
        code, out, err = _cli(capsys, "schedule", "add", base, "os:getcwd", "--name", "x", *bad)
        assert code == 2 and message in err, err
    code, out, err = _cli(capsys, "schedule", "add", base, "nowhere.at.all:f", "--every", "5")
    assert code == 2 and "--no-check" in err
    code, out, _ = _cli(capsys, "schedule", "list", base)
    assert "tenner" not in out and " x " not in out  # nothing stored by the bad ones


def test_cli_worker_no_schedules(tmp_path, capsys):
    base = str(tmp_path / "store")
    with FileBackend(base, environ={}) as backend:  # on a queue the worker does not drain
        backend.schedule(noop, every=0.1, name="often", queue="elsewhere")
    code, out, err = _cli(
        capsys, "worker", base, "--burst", "--idle-timeout", "0.5", "--no-schedules"
    )
    assert code == 0, err
    with FileBackend(base, environ={}) as backend:
        assert backend.schedules.get("often").last_tick is None
    # Idle for 3 s: the worker's first reading of the schedules comes within one second.
    code, out, err = _cli(capsys, "worker", base, "--burst", "--idle-timeout", "3")
    assert code == 0 and "worker stopped" in out, err
    with FileBackend(base, environ={}) as backend:
        assert backend.schedules.get("often").last_tick is not None
