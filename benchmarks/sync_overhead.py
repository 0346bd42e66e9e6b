"""Figure group "sync_overhead": the cost of the blocking twin ``FileQueue`` over
``AsyncFileQueue``.

On ``memory://`` (no I/O: what is left is the bridge) the same queue is asked ``size()`` and
``get_task()`` K times:

* single thread: each async call is awaited inside one running loop; each sync call is made
  from the main thread (it hops to OmniQ's shared loop thread and back). The overhead is the
  difference of the median per-call times.
* 8 threads: 8 threads make K sync calls each, against 8 coroutines making K async calls each
  in one loop. The threads and coroutines are serialized anyway (the GIL; the loop), so the
  overhead is the difference of wall time per call (amortized), and the median per-call
  latency seen by a caller is shown beside it.

The same measurement on a local directory is shown for information: there both twins pay
a thread hop per call and the sync one adds the cross-thread hand-off.
Repetitions alternate sync and async; medians over repetitions.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import threading
import time
import uuid
from typing import Any

from .common import Context, fmt, md_table, median

NAME = "sync_overhead"

SIZES = {"smoke": {"calls": 100}, "quick": {"calls": 1000}, "full": {"calls": 2000}}
THREADS = 8
LIMIT_US = 200.0


def _setup(url: str) -> tuple[Any, str]:
    from omniq.core import Task
    from omniq.storage.file.queue import FileQueue

    sync = FileQueue(url)
    ids = sync.enqueue_many([Task(func="bench:noop", args=[i]) for i in range(10)])
    return sync, ids[3]


def _call(queue: Any, method: str, task_id: str) -> Any:
    return queue.size("default") if method == "size" else queue.get_task(task_id, "default")


def _sync_single(sync: Any, method: str, task_id: str, calls: int) -> list[float]:
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        _call(sync, method, task_id)
        times.append(time.perf_counter() - t)
    return times


def _async_single(aq: Any, method: str, task_id: str, calls: int) -> list[float]:
    async def main() -> list[float]:
        times = []
        for _ in range(calls):
            t = time.perf_counter()
            await _call(aq, method, task_id)
            times.append(time.perf_counter() - t)
        return times

    return asyncio.run(main())


def _sync_threads(sync: Any, method: str, task_id: str, calls: int) -> tuple[float, list[float]]:
    barrier = threading.Barrier(THREADS + 1)
    times: list[list[float]] = [[] for _ in range(THREADS)]

    def worker(k: int) -> None:
        barrier.wait()
        mine = times[k]
        for _ in range(calls):
            t = time.perf_counter()
            _call(sync, method, task_id)
            mine.append(time.perf_counter() - t)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(THREADS)]
    for th in threads:
        th.start()
    barrier.wait()
    start = time.perf_counter()
    for th in threads:
        th.join()
    wall = time.perf_counter() - start
    return wall, [t for ts in times for t in ts]


def _async_concurrent(aq: Any, method: str, task_id: str, calls: int) -> tuple[float, list[float]]:
    async def main() -> tuple[float, list[float]]:
        times: list[float] = []

        async def worker() -> None:
            for _ in range(calls):
                t = time.perf_counter()
                await _call(aq, method, task_id)
                times.append(time.perf_counter() - t)
                await asyncio.sleep(0)  # let the other callers in, as threads would

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(THREADS)))
        return time.perf_counter() - start, times

    return asyncio.run(main())


def _measure(url: str, calls: int, repeat: int) -> dict[str, Any]:
    sync, task_id = _setup(url)
    aq = sync.async_api
    out: dict[str, Any] = {}
    for method in ("size", "get_task"):
        single_sync, single_async, wall_sync, wall_async, lat_sync, lat_async = (
            [] for _ in range(6)
        )
        _sync_single(sync, method, task_id, max(10, calls // 10))  # warm-up
        _async_single(aq, method, task_id, max(10, calls // 10))
        for _ in range(repeat):
            single_sync.append(statistics.median(_sync_single(sync, method, task_id, calls)))
            single_async.append(statistics.median(_async_single(aq, method, task_id, calls)))
            w, lat = _sync_threads(sync, method, task_id, calls)
            wall_sync.append(w / (THREADS * calls))
            lat_sync.append(statistics.median(lat))
            w, lat = _async_concurrent(aq, method, task_id, calls)
            wall_async.append(w / (THREADS * calls))
            lat_async.append(statistics.median(lat))
        s1, a1 = median(single_sync), median(single_async)
        s8, a8 = median(wall_sync), median(wall_async)
        out[method] = {
            "single_sync_us": s1 * 1e6,
            "single_async_us": a1 * 1e6,
            "single_overhead_us": (s1 - a1) * 1e6,
            "threads8_sync_wall_per_call_us": s8 * 1e6,
            "threads8_async_wall_per_call_us": a8 * 1e6,
            "threads8_overhead_us": (s8 - a8) * 1e6,
            "threads8_sync_latency_us": median(lat_sync) * 1e6,
            "threads8_async_latency_us": median(lat_async) * 1e6,
        }
    sync.close()
    return out


def run(ctx: Context) -> dict[str, Any]:
    calls = ctx.size(SIZES)["calls"]
    memory = _measure(f"memory://bench-sync-{uuid.uuid4().hex[:8]}", calls, ctx.repeat)
    for method, got in memory.items():
        ctx.log(
            f"sync_overhead memory {method}: single {got['single_overhead_us']:.0f}us, "
            f"8 threads {got['threads8_overhead_us']:.0f}us per call"
        )
    with ctx.scratch(ctx.disk_base, "sync") as path:
        local = _measure(os.path.join(path, "q"), max(50, calls // 4), ctx.repeat)
    for method, got in local.items():
        ctx.log(
            f"sync_overhead local {method}: single {got['single_overhead_us']:.0f}us, "
            f"8 threads {got['threads8_overhead_us']:.0f}us per call"
        )
    return {
        "calls": calls,
        "threads": THREADS,
        "repeat": ctx.repeat,
        "memory": memory,
        "local": local,
    }


def targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    mem = data["memory"]
    worst_single = max(m["single_overhead_us"] for m in mem.values())
    worst_threads = max(m["threads8_overhead_us"] for m in mem.values())
    measured = "; ".join(
        f"{method}: single thread +{fmt(m['single_overhead_us'])} µs "
        f"({fmt(m['single_sync_us'])} vs {fmt(m['single_async_us'])}), 8 threads "
        f"+{fmt(m['threads8_overhead_us'])} µs per call amortized (caller latency "
        f"{fmt(m['threads8_sync_latency_us'])} vs {fmt(m['threads8_async_latency_us'])} µs)"
        for method, m in mem.items()
    )
    return [
        {
            "id": 5,
            "figure": NAME,
            "title": "sync twin overhead on memory://",
            "goal": f"<= {LIMIT_US:.0f} µs extra per call, single thread and 8 threads",
            "measured": measured,
            "met": worst_single <= LIMIT_US and worst_threads <= LIMIT_US,
        }
    ]


def markdown(data: dict[str, Any]) -> str:
    rows = []
    for store in ("memory", "local"):
        for method, m in data[store].items():
            rows.append(
                [
                    store,
                    method,
                    fmt(m["single_async_us"]),
                    fmt(m["single_sync_us"]),
                    fmt(m["single_overhead_us"]),
                    fmt(m["threads8_async_wall_per_call_us"]),
                    fmt(m["threads8_sync_wall_per_call_us"]),
                    fmt(m["threads8_overhead_us"]),
                    f"{fmt(m['threads8_async_latency_us'])} / {fmt(m['threads8_sync_latency_us'])}",
                ]
            )
    return (
        f"{data['calls']:,} calls per measurement, {data['repeat']} repetitions, medians "
        "(µs per call). 8-thread columns: wall time / calls (amortized), and the median "
        "latency one caller sees.\n\n"
        + md_table(
            [
                "store",
                "call",
                "async 1 thread",
                "sync 1 thread",
                "overhead 1 thread",
                "async 8 coroutines (wall/call)",
                "sync 8 threads (wall/call)",
                "overhead 8 threads",
                "caller latency async / sync",
            ],
            rows,
        )
    )
