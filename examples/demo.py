"""OmniQ in one command: ``hatch run demo`` (``python examples/demo.py [--dir PATH]``).

Queues a few dozen real tasks in a local directory -- plain and async functions, a delayed
task, one that fails once and succeeds on its retry, one that times out, one that always
fails, one that reports its progress, and one that waits for two others (``depends_on``) --
and a schedule that fires every second, twice; runs a worker (concurrency 8, burst mode)
until every task has a result, then prints the results, the progress seen while a task ran,
the worker's counters and one task's event timeline. Nothing is simulated: the files stay behind for ``omniq status DIR``,
``omniq events DIR --task ID`` and ``omniq schedule list DIR``.

Exit code 0 when every task behaved as expected, 1 otherwise.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import demo_tasks  # beside this script: a worker imports tasks by path, like yours

from omniq.backend.file import FileBackend
from omniq.backend.file._cli_format import clip, fmt_error, fmt_time, table
from omniq.backend.file._schedule_ticks import tick_task_id
from omniq.core.models import UTC, EventType, Progress, TaskResult, TaskStatus, utcnow
from omniq.storage.file.events import FileEventStorage

DELAY = 2.0  # seconds the delayed task waits
PROGRESS_STEPS = 8  # images resize_images "processes", 0.3 s each
DEADLINE = 45.0  # the worker is stopped after this many seconds whatever happens
SCHEDULE = "demo-every-second"

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "a task queue on plain files",
    "workers claim tasks with exclusive create",
    "results and events are JSON documents",
    "S3 Azure GCS or a local directory",
    "no broker no database",
    "retries with exponential backoff",
    "leases are renewed while a task runs",
    "dead letters keep the last error",
    "hello world",
]


@dataclass
class Job:
    label: str
    task_id: str
    expect: str  # "value", "retried", "timeout", "dead", "after" (its dependencies)
    value: Any = None
    enqueued_at: datetime = field(default_factory=utcnow)
    delay: float = 0.0
    result: TaskResult | None = None
    depends_on: list[str] = field(default_factory=list)


def _enqueue(backend: FileBackend, marker: str) -> list[Job]:
    jobs: list[Job] = []
    for text in TEXTS:
        tid = backend.enqueue(demo_tasks.word_count, [text])
        jobs.append(Job(f"word_count({clip(repr(text), 22)})", tid, "value", len(text.split())))
    for n in range(10, 91, 10):  # fibonacci(93) would not fit in JSON's 64-bit integers
        tid = backend.enqueue(demo_tasks.fibonacci, [n], priority=n // 10)
        jobs.append(Job(f"fibonacci({n})", tid, "value", demo_tasks.fibonacci(n)))
    for i in range(10):  # async functions, on their own queue
        seconds = round(0.2 + 0.1 * i, 1)
        tid = backend.enqueue(demo_tasks.fetch, [f"page-{i}", seconds], queue="io")
        jobs.append(
            Job(
                f"fetch('page-{i}', {seconds})",
                tid,
                "value",
                {"name": f"page-{i}", "waited": seconds},
            )
        )
    tid = backend.enqueue(demo_tasks.remind, ["stretch your legs"], delay=DELAY)
    jobs.append(
        Job("remind(...) delay=2s", tid, "value", "reminder: stretch your legs", delay=DELAY)
    )
    tid = backend.enqueue(
        demo_tasks.flaky, kwargs={"marker": marker}, max_retries=2, retry_backoff=0.2
    )
    jobs.append(Job("flaky() max_retries=2", tid, "retried", "ok on the second attempt"))
    tid = backend.enqueue(demo_tasks.slow, [5.0], timeout=0.5, max_retries=0)
    jobs.append(Job("slow(5.0) timeout=0.5", tid, "timeout"))
    tid = backend.enqueue(demo_tasks.broken, ["id=42;;"], max_retries=2, retry_backoff=0.1)
    jobs.append(Job("broken(...) max_retries=2", tid, "dead"))
    resize = backend.enqueue(demo_tasks.resize_images, [PROGRESS_STEPS])
    jobs.append(Job(f"resize_images({PROGRESS_STEPS}) progress", resize, "value", PROGRESS_STEPS))
    first = jobs[0].task_id  # word_count of the first text
    tid = backend.enqueue(demo_tasks.publish, ["album"], depends_on=[resize, first])
    jobs.append(
        Job(
            "publish(...) depends_on=2", tid, "after", "published album", depends_on=[resize, first]
        )
    )
    return jobs


def _schedule(backend: FileBackend) -> list[Job]:
    """Every second, twice: the worker fires each tick (any number of workers would make
    one task per tick). Each tick's task id is known in advance."""
    backend.schedules.delete(SCHEDULE)  # from an earlier run in the same directory
    first = math.ceil(time.time()) + 1
    start = datetime.fromtimestamp(first, UTC)
    text = "fired by a schedule"
    backend.schedule(
        demo_tasks.word_count,
        [text],
        every=1,
        start=start,
        end=start + timedelta(seconds=1),
        name=SCHEDULE,
    )
    schedule = backend.schedules.get(SCHEDULE).schedule
    return [
        Job(
            f"word_count(...) tick {fmt_time(start + timedelta(seconds=k))[11:19]}",
            tick_task_id(schedule, (first + k) * 1000),
            "value",
            len(text.split()),
        )
        for k in range(2)
    ]


def _run_worker(backend: FileBackend, jobs: list[Job], progress: list[Progress]) -> dict[str, int]:
    """A burst-mode worker, stopped as soon as every task has a result (its idle timeout
    alone is long enough for the delayed task to come due). Meanwhile the progress of the
    task that reports it is read the way any other process would: ``get_task``."""
    worker = backend.worker(
        ["default", "io"],
        concurrency=8,
        burst=True,
        idle_timeout=DELAY + 3.0,
        progress_interval=0.25,
    )
    done = threading.Event()
    watched = next(job.task_id for job in jobs if job.label.startswith("resize_images"))

    def stop_when_done() -> None:
        deadline = time.monotonic() + DEADLINE
        pending = {job.task_id: job for job in jobs}
        while pending and time.monotonic() < deadline and not done.is_set():
            if watched in pending:
                seen = backend.get_task(watched).progress
                if seen is not None and (not progress or seen.done != progress[-1].done):
                    progress.append(seen)
            for task_id in list(pending):
                result = backend.result(task_id)
                if result is not None:
                    pending.pop(task_id).result = result
            if pending:
                time.sleep(0.1)
        worker.stop()

    watcher = threading.Thread(target=stop_when_done, name="demo-watcher", daemon=True)
    watcher.start()
    try:
        return worker.run()
    finally:
        done.set()
        watcher.join()


def _check(
    backend: FileBackend, jobs: list[Job], stats: dict[str, int], timeline: list[Any]
) -> list[str]:
    problems = []
    for job in jobs:
        res = job.result
        if res is None:
            problems.append(f"{job.label}: no result")
        elif job.expect in ("value", "retried"):
            if not res.ok or res.value != job.value:
                problems.append(
                    f"{job.label}: expected {job.value!r}, got "
                    f"{res.value if res.ok else fmt_error(res.error)!r}"
                )
            if job.expect == "retried" and res.attempt != 2:
                problems.append(f"{job.label}: succeeded on attempt {res.attempt}, not 2")
        elif job.expect == "after":
            if not res.ok or res.value != job.value:
                problems.append(f"{job.label}: expected {job.value!r}, got {res.status.value}")
            for dep in job.depends_on:
                before = next(j.result for j in jobs if j.task_id == dep)
                if before is None or res.started_at is None or res.started_at < before.finished_at:
                    problems.append(f"{job.label}: started before its dependency {dep} finished")
            if (
                job.delay
                and res.started_at is not None
                and (res.started_at < job.enqueued_at + timedelta(seconds=job.delay - 0.05))
            ):
                problems.append(f"{job.label}: started before its delay was over")
        elif job.expect == "timeout":
            if res.ok or res.error is None or not res.error.type.endswith("TimeoutError"):
                problems.append(f"{job.label}: expected a TimeoutError, got {res.status.value}")
        elif job.expect == "dead":
            status = backend.get_task(job.task_id).status
            if res.ok or res.attempt != 3 or status is not TaskStatus.DEAD:
                problems.append(
                    f"{job.label}: expected dead after 3 attempts, got "
                    f"{res.status.value} on attempt {res.attempt} ({status.value})"
                )
    succeeded = sum(1 for job in jobs if job.expect in ("value", "retried", "after"))
    if stats.get("succeeded") != succeeded or stats.get("dead") != 2:
        problems.append(f"worker counters: expected succeeded={succeeded} dead=2, got {stats}")
    kinds = [event.type for event in timeline]
    wanted = [
        EventType.ENQUEUED,
        EventType.STARTED,
        EventType.RETRIED,
        EventType.STARTED,
        EventType.SUCCEEDED,
    ]
    if kinds != wanted:
        problems.append(f"flaky task's events: {[k.value for k in kinds]}")
    return problems


def _results_table(jobs: list[Job]) -> str:
    rows: list[list[Any]] = []
    for job in jobs:
        res = job.result
        if res is None:
            rows.append([job.task_id, job.label, "missing", "-", ""])
            continue
        shown = clip(repr(res.value), 44) if res.ok else fmt_error(res.error, 44)
        rows.append([job.task_id, job.label, res.status.value, res.attempt, shown])
    return table(["TASK", "CALL", "STATUS", "TRY", "VALUE / ERROR"], rows, right=(3,))


def _timeline_table(events: list[Any]) -> str:
    if not events:
        return "  (no events)"
    start = events[0].time
    rows = []
    for event in events:
        detail = (
            fmt_error(event.error, 50)
            if event.error
            else (f"took {event.duration:.3f}s" if event.duration is not None else "")
        )
        rows.append(
            [
                f"+{(event.time - start).total_seconds():.3f}s",
                event.time.astimezone().strftime("%H:%M:%S.%f")[:-3],
                event.type.value,
                "-" if event.attempt is None else event.attempt,
                event.worker_id or "-",
                detail,
            ]
        )
    text = table(["OFFSET", "TIME", "EVENT", "ATTEMPT", "WORKER", ""], rows, right=(0, 3))
    return "\n".join("  " + line for line in text.splitlines())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="omniq-demo", description=__doc__.split("\n\n")[1])
    parser.add_argument("--dir", help="where to keep the files (default: a new temp dir)")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the worker's log")
    args = parser.parse_args(argv)
    if args.verbose:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s"
        )
    demo_dir = os.path.abspath(args.dir or tempfile.mkdtemp(prefix="omniq-demo-"))
    os.makedirs(demo_dir, exist_ok=True)
    marker = os.path.join(demo_dir, f"flaky-{uuid.uuid4().hex[:8]}.marker")
    began = time.monotonic()
    print(f"OmniQ demo: files in {demo_dir}  (queue/, results/, events/)\n")

    # environ={}: ignore OMNIQ_* variables, so the demo behaves the same everywhere.
    with FileBackend(demo_dir, events=True, environ={}) as backend:
        jobs = _enqueue(backend, marker)
        print(
            f"Enqueued {len(jobs)} tasks on queues 'default' and 'io': plain and async "
            f"functions, one delayed by {DELAY:g}s,\none that fails once, one with a 0.5s "
            "timeout, one that always fails."
        )
        ticks = _schedule(backend)
        jobs += ticks
        print(
            f"Scheduled word_count every second, twice ({SCHEDULE!r}): the worker fires "
            "each tick as one task."
        )
        print(
            "Running a worker (concurrency 8, burst mode) until every task has a result ...",
            flush=True,
        )
        started = time.monotonic()
        progress: list[Progress] = []
        stats = _run_worker(backend, jobs, progress)
        print(f"... done in {time.monotonic() - started:.1f}s\n")
        flaky = next(job for job in jobs if job.expect == "retried")
        # The backend keeps its events under BASE_DIR/events; read them like any tool would.
        with FileEventStorage(os.path.join(demo_dir, "events")) as events:
            timeline = events.query(task_id=flaky.task_id)
        problems = _check(backend, jobs, stats, timeline)
        if len(progress) < 2:
            problems.append(f"resize_images: progress seen {len(progress)} times while it ran")

    print(_results_table(jobs) + "\n")
    print("Worker counters: " + ", ".join(f"{k} {v}" for k, v in stats.items()))
    ok = sum(1 for job in jobs if job.result is not None and job.result.ok)
    print(
        f"Tasks: {ok} succeeded, {len(jobs) - ok} failed ({stats.get('dead', 0)} of them "
        "dead-lettered)\n"
    )
    resize = next(job for job in jobs if job.label.startswith("resize_images"))
    seen = ", ".join(f"{p.done:g}/{p.total:g}" for p in progress)
    print(f"Progress of {resize.task_id} seen by get_task while it ran: {seen}")
    publish = next(job for job in jobs if job.expect == "after")
    if publish.result is not None and publish.result.started_at is not None:
        print(
            f"publish({publish.task_id}) waited for {', '.join(publish.depends_on)} and started "
            f"at {fmt_time(publish.result.started_at)[11:23]}\n"
        )
    fired = ", ".join(f"{job.task_id} ({job.label[-8:]})" for job in ticks)
    print(f"Schedule {SCHEDULE!r} fired its 2 ticks as tasks {fired}\n")
    print(f"Event timeline of the flaky task {flaky.task_id} (failed once, then retried):")
    print(_timeline_table(timeline) + "\n")
    dead = next(job for job in jobs if job.expect == "dead")
    print("Look around (in the repository: `hatch run omniq ...`):")
    for command in (
        "status",
        "tasks",
        f"events {{}} --task {flaky.task_id}",
        f"result {{}} {dead.task_id}",
        "dead",
        "schedule list {}",
    ):
        print(
            "  omniq " + (command.format(demo_dir) if "{}" in command else f"{command} {demo_dir}")
        )
    print()
    if problems:
        print("UNEXPECTED:", *problems, sep="\n  ", file=sys.stderr)
        return 1
    print(f"Everything behaved as expected ({time.monotonic() - began:.1f}s in all).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
