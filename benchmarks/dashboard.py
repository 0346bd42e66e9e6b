"""Figure group "dashboard": the cost of one refresh of each dashboard page, in storage
requests and time, with 100 and with 100,000 finished tasks behind it.

Each configuration is a fresh base directory on memory:// or a local disk holding the same
live state, made through the API: 20 pending tasks, 5 running ones (claimed, not run), 5 dead
letters, each with its events, and one schedule. Then N finished tasks are added **by writing
their files directly** (what a finished task leaves once its queue records are cleaned up,
``tombstone_ttl`` after it ended): one result document each, and one ``succeeded`` event each
(its by-time copy and its by-task index entry), spread evenly either over the 24 hours that
ended an hour ago ("past") or over the current hour's last 15 minutes up to 20 s ago
("current": in the partition the throughput chart lists). Writing 100,000 of them through
workers would take most of the run; the files are byte for byte what the storages write
(``codec.encode`` of the same documents, at the keys of the storages' layout modules).

Each page is requested through Starlette's TestClient (in process, no network), once to warm
up and then ``repeat`` times; the figure is the median time and the number of storage
operations one refresh made (counted with ``omniq.core.fs.set_request_hook``: every op of a
storage program, a listing or a read or a write, counted once). The queues page is measured
with its incremental events read forced on every refresh (by default it reads the events at
most every 5 s). On memory:// the time grows with the files held although the requests do not:
fsspec's ``MemoryFileSystem`` answers a listing by scanning every key it holds.

A storage operation is a listing of any length counted once, so equal operations do not prove
equal cost: the same pages also run on S3 (moto, fewer finished tasks: they are uploaded one
by one) where every HTTP request is counted (aiobotocore's ``_make_api_call``), a LIST page
holding at most 1,000 names.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from datetime import datetime, timedelta
from typing import Any

from .common import TOOLS, Context, fmt, md_table
from .requests import COUNTER, count_s3

NAME = "dashboard"

SIZES = {
    "smoke": {"finished": (100, 1_000), "s3_finished": (10, 300)},
    "quick": {"finished": (100, 10_000), "s3_finished": (100, 2_500)},
    "full": {"finished": (100, 100_000), "s3_finished": (100, 10_000)},
}
#: When the finished tasks ended: an hour and more ago, or in the current hour.
WHEN = ("past", "current")
PAGES = (
    ("queues", "/"),
    ("queue", "/queues/default?status=pending"),
    ("running", "/running"),
    ("dead", "/dead"),
    ("task", "/tasks/{task}"),
    ("schedules", "/schedules"),
    ("workers", "/workers"),
)


def _finished_files(base: str, n: int, when: str = "past") -> dict[str, bytes]:
    """``{path: bytes}`` of ``n`` finished tasks: a result and a succeeded event each; "past":
    over the 24 hours that ended an hour ago, "current": over this hour's last 15 minutes up
    to 20 s ago (in the partition the throughput chart reads, outside its 10 s look-back)."""
    from omniq.core import codec
    from omniq.core.models import UTC, EventType, ResultStatus, TaskEvent, TaskResult, new_id
    from omniq.storage.file.events import _layout as events_layout
    from omniq.storage.file.results import _layout as results_layout

    now = datetime.now(UTC)
    if when == "past":
        end = now - timedelta(hours=1)
        step = timedelta(hours=24) / max(n, 1)
    else:
        hour = now.replace(minute=0, second=0, microsecond=0)
        end = max(hour + timedelta(milliseconds=n), now - timedelta(seconds=20))
        step = (end - max(hour, now - timedelta(minutes=15))) / max(n, 1)
    files: dict[str, bytes] = {}
    for i in range(n):
        task_id = new_id()
        when = end - step * (n - i)
        result = TaskResult(
            task_id=task_id,
            status=ResultStatus.SUCCESS,
            value=i,
            queue="default",
            func="benchmarks.tasks:noop",
            worker_id="bench-worker",
            started_at=when - timedelta(milliseconds=5),
            finished_at=when,
        )
        files[f"{base}/results/{results_layout.result_key(task_id)}"] = codec.encode(result)
        event = TaskEvent(
            task_id=task_id,
            type=EventType.SUCCEEDED,
            time=when,
            queue="default",
            worker_id="bench-worker",
            attempt=1,
            duration=0.005,
        )
        name = events_layout.Name(
            events_layout.epoch_ms(when), event.id, EventType.SUCCEEDED.value, task_id
        )
        data = codec.encode(event)
        files[f"{base}/events/{events_layout.time_key(name)}"] = data
        files[f"{base}/events/{events_layout.task_key(name)}"] = data
    return files


def _write(kind: str, files: dict[str, bytes], filesystem: Any = None) -> None:
    if filesystem is not None:  # S3 (moto)
        filesystem.pipe(files)
        return
    if kind == "memory":
        import fsspec

        fsspec.filesystem("memory").pipe(files)
        return
    made: set[str] = set()
    for path, data in files.items():
        folder = os.path.dirname(path)
        if folder not in made:
            os.makedirs(folder, exist_ok=True)
            made.add(folder)
        with open(path, "wb") as f:
            f.write(data)


def _one(
    ctx: Context,
    kind: str,
    base: str,
    finished: int,
    when: str = "past",
    emulator: Any = None,
) -> dict[str, Any]:
    from starlette.testclient import TestClient

    from omniq.backend.file import FileBackend
    from omniq.backend.file.dashboard import create_app
    from omniq.core import fs

    options = None if emulator is None else emulator.storage_options
    with FileBackend(base, options, events=True) as backend:
        for i in range(20):
            backend.enqueue("benchmarks.tasks:noop", [i])
        for i in range(5):
            backend.enqueue("benchmarks.tasks:noop", [i], queue="busy")
            assert backend.queue.dequeue(["busy"], lease=600, worker_id=f"bench-{i}")
        for i in range(5):
            backend.enqueue("benchmarks.tasks:noop", [i], queue="fails")
            claimed = backend.queue.dequeue(["fails"], lease=600, worker_id="bench")
            assert claimed is not None
            backend.queue.nack(claimed, error=RuntimeError("boom"), retry=False)
        backend.schedule("benchmarks.tasks:noop", [0], every=3600, name="hourly")
        t0 = time.perf_counter()
        files = _finished_files(base, finished, when)
        one = next(iter(files)).rsplit("/", 1)[1].removesuffix(".json")
        _write(kind, files, None if emulator is None else emulator.filesystem())
        ctx.log(
            f"{kind}: wrote {len(files):,} files for {finished:,} finished tasks "
            f"in {time.perf_counter() - t0:.1f} s"
        )
        del files

        counted = [0]

        def hook(op: str, error: BaseException | None) -> None:
            counted[0] += 1

        app = create_app(backend)
        monitor = app.state.dashboard.monitor
        pages: dict[str, Any] = {}
        previous = fs.set_request_hook(hook)
        try:
            with TestClient(app, base_url="http://127.0.0.1:8787") as client:
                for label, path in PAGES:
                    url = path.format(task=one)
                    assert client.get(url).status_code == 200, url  # warm-up
                    times, ops, http = [], [], []
                    for _ in range(max(ctx.repeat, 3)):
                        monitor._events_read_at = 0.0  # force the incremental events read
                        counted[0] = 0
                        COUNTER.reset()
                        start = time.perf_counter()
                        response = client.get(url)
                        times.append(time.perf_counter() - start)
                        ops.append(counted[0])
                        http.append(sum(sum(c.values()) for c in COUNTER.counts.values()))
                        assert response.status_code == 200, url
                    pages[label] = {"ms": statistics.median(times) * 1000, "ops": max(ops)}
                    if emulator is not None:
                        pages[label]["http"] = max(http)
        finally:
            fs.set_request_hook(previous)
    return {"kind": kind, "finished": finished, "when": when, "pages": pages}


def _forget(base: str) -> None:
    """Drop a memory:// tree at once (``rm(recursive=True)`` rescans every key per file)."""
    from fsspec.implementations.memory import MemoryFileSystem

    prefix = "/" + base.removeprefix("memory://").strip("/")
    for key in [k for k in MemoryFileSystem.store if k == prefix or k.startswith(prefix + "/")]:
        del MemoryFileSystem.store[key]
    MemoryFileSystem.pseudo_dirs[:] = [
        d for d in MemoryFileSystem.pseudo_dirs if not (d == prefix or d.startswith(prefix + "/"))
    ]


def run(ctx: Context) -> dict[str, Any]:
    runs = []
    size = ctx.size(SIZES)
    for finished in size["finished"]:
        for when in WHEN:
            base = f"memory://omniq-bench-dashboard-{finished}-{when}"
            try:
                runs.append(_one(ctx, "memory", base, finished, when))
            finally:
                _forget(base)
            with ctx.scratch(ctx.disk_base, "dashboard") as path:
                runs.append(_one(ctx, "local", path, finished, when))
    if TOOLS not in sys.path:
        sys.path.insert(0, TOOLS)
    try:
        from emulators import EmulatorUnavailable, S3Emulator

        emulator = S3Emulator()
        emulator.start()
    except (ImportError, EmulatorUnavailable) as exc:
        return {"runs": runs, "s3": {"skipped": str(exc)}}
    try:
        with count_s3():
            for finished in size["s3_finished"]:
                for when in WHEN:
                    url = emulator.url(f"dash-{os.getpid()}-{time.time_ns()}")
                    runs.append(_one(ctx, "s3", url, finished, when, emulator))
    finally:
        emulator.stop()
    return {"runs": runs}


def targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Per store and age of the finished tasks: every page makes as many storage operations
    (on S3: HTTP requests, where a long listing takes several) with the most finished tasks
    as with the fewest (time is reported, not judged: the machine is shared)."""
    out = []
    ids = {("memory", "past"): 10, ("local", "past"): 11, ("memory", "current"): 30}
    ids.update({("local", "current"): 31, ("s3", "past"): 32, ("s3", "current"): 33})
    for kind, unit in (("memory", "ops"), ("local", "ops"), ("s3", "http")):
        for when in WHEN:
            runs = sorted(
                (r for r in data["runs"] if r["kind"] == kind and r.get("when", "past") == when),
                key=lambda r: r["finished"],
            )
            if not runs:
                continue
            small, large = runs[0], runs[-1]
            grew = [
                f"{p} {small['pages'][p][unit]}->{large['pages'][p][unit]}"
                for p in small["pages"]
                if large["pages"][p][unit] > small["pages"][p][unit]
            ]
            what = "HTTP requests" if unit == "http" else "storage operations"
            out.append(
                {
                    "id": ids[kind, when],
                    "figure": NAME,
                    "title": f"dashboard refresh cost vs finished tasks ({kind}, {when} hour)",
                    "goal": f"{what} per page refresh equal at {small['finished']:,} and "
                    f"{large['finished']:,} tasks finished in the {when} hour",
                    "measured": "; ".join(grew) if grew else "equal on every page",
                    "met": not grew,
                }
            )
    return out


def markdown(data: dict[str, Any]) -> str:
    rows = []
    for run_ in data["runs"]:
        for label, page in run_["pages"].items():
            rows.append(
                [
                    run_["kind"],
                    f"{run_['finished']:,} ({run_.get('when', 'past')} hour)",
                    label,
                    page["ops"],
                    page.get("http", ""),
                    fmt(page["ms"], 1),
                ]
            )
    headers = ["store", "finished tasks", "page", "storage ops", "HTTP requests", "ms (median)"]
    return md_table(headers, rows)
