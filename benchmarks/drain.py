"""Figure group "drain": the worker against Huey's consumer and the file-operation floor.

Side by side in one run, on local disk, N no-op tasks with results, total concurrency 8:

- ``omniq`` -- ``AsyncWorker`` (burst, concurrency 8), events off, the plain function
  ``benchmarks.tasks:noop`` (runs in the worker's thread pool);
- ``omniq-events`` -- the same with events on;
- ``omniq-async`` -- events off, the async function ``benchmarks.tasks:anoop``;
- ``huey`` -- Huey's consumer (``huey.create_consumer(workers=8, worker_type="thread")``)
  on ``FileHuey`` (``FileStorage``, its default file lock), results on (``store_none=True``:
  the no-op's ``None`` is written, as OmniQ writes every result);
- ``rq`` / ``arq`` -- RQ (8 ``SimpleWorker`` processes, started before the timed window)
  and arq (``max_jobs=8``, the async no-op) on a fresh local ``redis-server``
  (``benchmarks/redis_peers.py``); skipped, with a note, where no server binary is found;
- ``floor`` -- the file operations of one task's life after its enqueue, replayed bare in
  one thread (no worker, no encoding): list the ready directory (once per 256 tasks), read
  the task file, claim it (stat, utime, hard link into ``run/``, unlink, stat, owner xattr;
  a second utime only where the stat shows the first replaced), write the result (an
  ``O_TMPFILE`` inode linked in, or a temp file + rename: the way ``LocalOps`` found faster
  here), ack (hard link + utime). The same system calls as ``omniq.core._local_ops.LocalOps``
  makes for the worker.

Each configuration runs in a fresh process that enqueues its N tasks first (not timed), with
logging configured at INFO into ``os.devnull`` (as a daemon logs; both workers log per task
at INFO or DEBUG as their code decides). The timed window runs from the worker's start to
the N-th result; worker CPU per task is the process's CPU time (all threads) in that window
/ N. Order rotated per repetition (and reversed every other one, so that no system always
follows the same one); medians, and the median of per-repetition ratios. Each configuration's
directory is kept until the run ends (``Context.scratch``): a deletion of another's thousands
of files just before slowed a run's file creations several-fold on ext4.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from typing import Any

from .common import (
    Context,
    burst_worker,
    fmt,
    md_table,
    median,
    peers_available,
    ratio,
    run_children,
    summary,
)

NAME = "drain"

SIZES = {"smoke": {"n": 30}, "quick": {"n": 500}, "full": {"n": 2000}}
CONCURRENCY = 8
SYSTEMS = ("omniq", "omniq-events", "omniq-async", "huey", "rq", "arq", "floor")
LABELS = {
    "omniq": "OmniQ worker, threads, events off",
    "omniq-events": "OmniQ worker, events on",
    "omniq-async": "OmniQ worker, async functions",
    "huey": "Huey consumer, FileStorage, 8 threads",
    "rq": "RQ SimpleWorker x 8 processes + Redis (CPU incl. process start-up)",
    "arq": "arq worker, max_jobs=8, async function + Redis",
    "floor": "file-operation floor (bare, 1 thread)",
}


def _log_to_devnull() -> None:
    handler = logging.StreamHandler(open(os.devnull, "w"))  # noqa: SIM115 - lives as long
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)


def child(system: str, path: str, n: int, *, ready: Any) -> dict[str, Any]:
    _log_to_devnull()
    if system == "huey":
        return _huey(path, n, ready)
    if system == "floor":
        return _floor(path, n, ready)
    if system in ("rq", "arq"):
        from . import redis_peers

        return (redis_peers.rq_drain if system == "rq" else redis_peers.arq_drain)(path, n, ready)
    return _omniq(system, path, n, ready)


def _omniq(system: str, path: str, n: int, ready: Any) -> dict[str, Any]:
    import anyio

    from omniq.backend.file import AsyncFileBackend

    func = "benchmarks.tasks:anoop" if system == "omniq-async" else "benchmarks.tasks:noop"

    async def main() -> dict[str, Any]:
        backend = AsyncFileBackend(path, events=system == "omniq-events")
        for i in range(n):
            await backend.enqueue(func, args=[i])
        worker = burst_worker(backend, CONCURRENCY)
        ready()
        finished: dict[str, float] = {}

        async def watch() -> None:
            while worker.stats["succeeded"] + worker.stats["failed"] < n:
                await anyio.sleep(0.002)
            finished["at"], finished["cpu"] = time.monotonic(), time.process_time()

        t0, c0 = time.monotonic(), time.process_time()
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            stats = await worker.run()
        await backend.close()
        return {
            "drain_s": finished["at"] - t0,
            "cpu_s": finished["cpu"] - c0,
            "done": stats["succeeded"],
        }

    return anyio.run(main)


def _huey(path: str, n: int, ready: Any) -> dict[str, Any]:
    from huey import FileHuey
    from huey.signals import SIGNAL_COMPLETE

    from benchmarks.tasks import noop

    huey = FileHuey("bench", path=path, results=True, store_none=True)
    task = huey.task(name="noop")(noop)
    for i in range(n):
        task(i)
    lock = threading.Lock()
    done = [0]
    finished = threading.Event()
    marks: dict[str, float] = {}

    @huey.signal(SIGNAL_COMPLETE)
    def _completed(signal: str, task: Any, *args: Any) -> None:
        with lock:
            done[0] += 1
            if done[0] == n:
                marks["at"], marks["cpu"] = time.monotonic(), time.process_time()
                finished.set()

    consumer = huey.create_consumer(workers=CONCURRENCY, worker_type="thread", periodic=False)
    ready()
    t0, c0 = time.monotonic(), time.process_time()
    consumer.start()
    finished.wait(600)
    consumer.stop(graceful=True)
    results = len(os.listdir(os.path.join(path, "results"))) if done[0] else 0
    return {
        "drain_s": marks["at"] - t0,
        "cpu_s": marks["cpu"] - c0,
        "done": done[0],
        "results_stored": results,
    }


def _floor(path: str, n: int, ready: Any) -> dict[str, Any]:
    ready_dir = os.path.join(path, "ready", "p0999")
    run_dir = os.path.join(path, "run")
    results_dir = os.path.join(path, "results")
    for d in (ready_dir, run_dir, results_dir):
        os.makedirs(d, exist_ok=True)
    document = json.dumps({"func": "benchmarks.tasks:noop", "args": [0], "pad": "x" * 280})
    for i in range(n):  # what enqueue leaves: one file per task, written to a temp name
        tmp = os.path.join(ready_dir, f".tmp-{uuid.uuid4().hex}")
        with open(tmp, "wb") as f:
            f.write(document.encode())
        os.link(tmp, os.path.join(ready_dir, f"{i:026d}.1.json"))
        os.unlink(tmp)
    result = json.dumps({"status": "success", "value": None, "pad": "x" * 200}).encode()
    owner = b"bench-worker"
    xattr = True
    # The way LocalOps makes new files here (its timed trial of the two ways, not timed).
    from omniq.core._local_ops import TRIAL_FILES, LocalOps

    ops = LocalOps(results_dir)
    for i in range(2 * TRIAL_FILES):
        ops.write(f"trial{i}.json", result)
    tmpfile = ops._way.flag
    ready()
    t0, c0 = time.monotonic(), time.process_time()
    done = 0
    while done < n:
        with os.scandir(ready_dir) as it:
            names = sorted(e.name for e in it if not e.name.startswith("."))[:256]
        for name in names:
            src = os.path.join(ready_dir, name)
            dst = os.path.join(run_dir, name)
            fd = os.open(src, os.O_RDONLY)  # read the task
            os.read(fd, 65536)
            os.close(fd)
            now = time.time()  # claim (take)
            stamp = round(now * 1e9)
            if os.stat(src).st_nlink > 1 and os.path.exists(dst):
                continue
            os.utime(src, ns=(stamp, stamp))
            os.link(src, dst)
            os.unlink(src)
            if os.stat(dst).st_mtime_ns != stamp:  # restamped only if it was replaced
                os.utime(dst, ns=(stamp, stamp))
            if xattr:
                try:
                    os.setxattr(dst, "user.omniq.owner", owner)
                except OSError:
                    xattr = False
            target = os.path.join(results_dir, name.split(".")[0] + ".json")  # the result
            if tmpfile:  # a nameless inode linked in, as LocalOps.write makes a new name
                fd = os.open(results_dir, tmpfile | os.O_WRONLY, 0o666)
                os.write(fd, result)
                os.link(f"/proc/self/fd/{fd}", target, src_dir_fd=fd, follow_symlinks=True)
                os.close(fd)
            else:
                tmp = os.path.join(results_dir, f".tmp-{uuid.uuid4().hex}")
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                os.write(fd, result)
                os.close(fd)
                os.replace(tmp, target)
            outcome = dst[: -len(".json")] + ".x"  # the ack
            os.link(dst, outcome)
            os.utime(outcome, (now, now))
            done += 1
    return {"drain_s": time.monotonic() - t0, "cpu_s": time.process_time() - c0, "done": done}


def run(ctx: Context) -> dict[str, Any]:
    n = ctx.size(SIZES)["n"]
    have = peers_available()
    from . import redis_peers

    no_redis = redis_peers.unavailable()
    systems = [
        s
        for s in SYSTEMS
        if (s != "huey" or have["huey"]) and (s not in ("rq", "arq") or no_redis is None)
    ]
    if not have["huey"]:
        ctx.note("drain: huey is not installed; its row is skipped")
    if no_redis is not None:
        ctx.note(f"drain: the RQ and arq rows are skipped: {no_redis}")
    raw: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
    for rep in range(ctx.repeat):
        order = systems[rep % len(systems) :] + systems[: rep % len(systems)]
        if rep % 2:  # reversed every other time: each system follows another one
            order.reverse()
        for system in order:
            with ctx.scratch(ctx.disk_base, f"drain-{system}") as path:
                (got,) = run_children(child, [(system, os.path.join(path, "q"), n)])
            if got["done"] != n:
                ctx.note(f"drain {system}: {got['done']} of {n} tasks finished")
            got["per_s"] = n / got["drain_s"]
            got["cpu_ms_per_task"] = 1000 * got["cpu_s"] / n
            got["rep"] = rep
            ctx.log(
                f"drain rep {rep + 1}/{ctx.repeat} {system:13} {got['per_s']:7.0f} tasks/s"
                f"  cpu {got['cpu_ms_per_task']:.3f} ms/task"
            )
            raw[system].append(got)

    def ratios(system: str, base: str) -> list[float]:
        by_rep = {r["rep"]: r["per_s"] for r in raw.get(base, [])}
        out = [ratio(r["per_s"], by_rep.get(r["rep"])) for r in raw[system]]
        return [x for x in out if x is not None]

    table = {}
    for system, runs in raw.items():
        table[system] = {
            "label": LABELS[system],
            "per_s": summary([r["per_s"] for r in runs]),
            "cpu_ms_per_task": summary([r["cpu_ms_per_task"] for r in runs]),
            "done": [r["done"] for r in runs],
            "vs_omniq": median(ratios(system, "omniq")),
            "vs_huey": median(ratios(system, "huey")) if "huey" in raw else None,
            "vs_floor": median(ratios(system, "floor")),
        }
    return {"n": n, "repeat": ctx.repeat, "concurrency": CONCURRENCY, "results": table}


def targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    res = data["results"]
    om = res["omniq"]
    vs_huey, vs_floor = om["vs_huey"], om["vs_floor"]
    async_ratio = res["omniq-async"]["vs_omniq"]
    ok = all(all(d == data["n"] for d in v["done"]) for v in res.values())
    t1_met = None if vs_huey is None else (vs_huey >= 3.0 and vs_floor >= 0.6 and ok)
    return [
        {
            "id": 12,
            "figure": NAME,
            "title": "worker drain, local disk, events off, vs Huey's consumer and the floor",
            "goal": ">= 3x Huey consumer (8 threads, FileStorage, results) and >= 0.6x the "
            "file-operation floor (same run)",
            "measured": f"{fmt(om['per_s']['median'])} tasks/s: {fmt(vs_huey, 2)}x Huey, "
            f"{fmt(vs_floor, 2)}x floor" + ("" if ok else "; SOME TASKS DID NOT FINISH"),
            "met": t1_met,
        },
        {
            "id": 13,
            "figure": NAME,
            "title": "async task functions vs plain functions through the worker",
            "goal": "async >= 1.0x plain (events off, same run)",
            "measured": f"{fmt(res['omniq-async']['per_s']['median'])} vs "
            f"{fmt(om['per_s']['median'])} tasks/s: {fmt(async_ratio, 2)}x",
            "met": None if async_ratio is None else async_ratio >= 1.0,
        },
    ]


def markdown(data: dict[str, Any]) -> str:
    rows = [
        [
            v["label"],
            fmt(v["per_s"]["median"]),
            fmt(v["vs_omniq"], 2),
            fmt(v["vs_huey"], 2),
            fmt(v["vs_floor"], 2),
            fmt(v["cpu_ms_per_task"]["median"], 3),
        ]
        for v in data["results"].values()
    ]
    return (
        f"N = {data['n']:,} no-op tasks with results, total concurrency {data['concurrency']}, "
        f"local disk, {data['repeat']} repetitions (order rotated); medians of tasks/s and of "
        "per-repetition ratios. The floor replays the file operations of claim + result + "
        "ack in one thread.\n\n"
        + md_table(
            [
                "system",
                "drain tasks/s",
                "ratio to OmniQ",
                "ratio to Huey",
                "ratio to floor",
                "CPU ms per task",
            ],
            rows,
        )
    )
