"""Figure group "rss": worker memory while draining a small and a large queue.

The queue is filled with N no-op tasks (N = 100, then 100,000), then a fresh worker process
(``AsyncWorker``, concurrency 8, burst mode, results on, events off) drains it. The peak RSS
is the child's ``VmHWM`` (whole life, imports included); the parent also samples the
child's RSS with psutil every 20 ms, and the child reports its RSS when it was ready to start
(after imports), so the growth while draining is shown too.

The large run goes to tmpfs when available, only to keep the suite short (memory use does
not depend on the filesystem; the 100-task runs use the same filesystem).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from .common import Context, RssSampler, burst_worker, fmt, md_table, median, run_children

NAME = "rss"

SIZES = {
    "smoke": {"sizes": [20, 300]},
    "quick": {"sizes": [100, 20_000]},
    "full": {"sizes": [100, 100_000]},
}
LIMIT = 1.2


def _current_rss_kb() -> int:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


def child(path: str, n: int, *, ready: Any) -> dict[str, Any]:
    import anyio

    from omniq.backend.file import AsyncFileBackend

    async def main() -> dict[str, Any]:
        backend = AsyncFileBackend(path, events=False)
        worker = burst_worker(backend, 8, idle_timeout=0.3, schedules=True)
        await backend.queue.size("default")
        baseline = _current_rss_kb()
        ready()
        t0 = time.monotonic()
        stats = await worker.run()
        seconds = time.monotonic() - t0
        await backend.close()
        return {
            "baseline_kb": baseline,
            "end_kb": _current_rss_kb(),
            "stats": stats,
            "seconds": seconds,
        }

    return anyio.run(main)


async def _fill(path: str, n: int) -> None:
    from omniq.backend.file import AsyncFileBackend

    backend = AsyncFileBackend(path, events=False)
    for lo in range(0, n, 1000):
        await backend.queue.enqueue_many(
            [backend.make_task("benchmarks.tasks:noop", [i]) for i in range(lo, min(n, lo + 1000))]
        )
    await backend.close()


def _one(ctx: Context, base: str, n: int) -> dict[str, Any]:
    with ctx.scratch(base, f"rss-{n}") as path:
        data = os.path.join(path, "omniq")
        t0 = time.monotonic()
        asyncio.run(_fill(data, n))
        fill_s = time.monotonic() - t0
        samplers: list[RssSampler] = []

        def on_start(procs: list[Any]) -> None:
            samplers.append(RssSampler(procs[0].pid).start())

        try:
            (got,) = run_children(child, [(data, n)], timeout=3600, on_start=on_start)
        finally:
            sampled = samplers[0].stop() if samplers else 0
    got["sampled_peak_kb"] = sampled // 1024
    got["samples"] = samplers[0].samples if samplers else 0
    got["fill_s"] = fill_s
    got["n"] = n
    ctx.log(
        f"rss: n={n:,} peak {got['maxrss_kb'] / 1024:.1f} MiB (sampled "
        f"{got['sampled_peak_kb'] / 1024:.1f}, baseline {got['baseline_kb'] / 1024:.1f}), "
        f"drained in {got['seconds']:.1f}s ({got['stats']['succeeded']:,} ok)"
    )
    return got


def run(ctx: Context) -> dict[str, Any]:
    small, large = ctx.size(SIZES)["sizes"]
    base = ctx.tmpfs_base if ctx.tmpfs_base and os.path.isdir(ctx.tmpfs_base) else ctx.disk_base
    small_runs = []
    large_run = None
    for rep in range(ctx.repeat):
        small_runs.append(_one(ctx, base, small))
        if rep == 0:
            large_run = _one(ctx, base, large)
    assert large_run is not None
    small_peak = median(r["maxrss_kb"] for r in small_runs)
    return {
        "filesystem": base,
        "small": small,
        "large": large,
        "small_runs": small_runs,
        "large_run": large_run,
        "small_peak_mib": small_peak / 1024,
        "large_peak_mib": large_run["maxrss_kb"] / 1024,
        "ratio": large_run["maxrss_kb"] / small_peak,
    }


def targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    large = data["large_run"]
    ok = large["stats"]["succeeded"] == data["large"]
    return [
        {
            "id": 6,
            "figure": NAME,
            "title": "worker RSS draining a large vs small queue",
            "goal": f"peak RSS draining {data['large']:,} tasks <= {LIMIT}x draining "
            f"{data['small']:,}",
            "measured": f"{fmt(data['large_peak_mib'], 1)} MiB vs "
            f"{fmt(data['small_peak_mib'], 1)} MiB = {data['ratio']:.2f}x "
            f"(drained {large['stats']['succeeded']:,} in {large['seconds']:.0f} s)",
            "met": ok and data["ratio"] <= LIMIT,
        }
    ]


def markdown(data: dict[str, Any]) -> str:
    rows = []
    for r in [*data["small_runs"], data["large_run"]]:
        rows.append(
            [
                f"{r['n']:,}",
                f"{r['stats']['succeeded']:,}",
                f"{r['seconds']:.1f}",
                fmt(r["baseline_kb"] / 1024, 1),
                fmt(r["maxrss_kb"] / 1024, 1),
                fmt(r["sampled_peak_kb"] / 1024, 1),
                fmt(r["end_kb"] / 1024, 1),
            ]
        )
    return (
        f"Worker (concurrency 8, results on, events off) in a fresh process on "
        f"`{data['filesystem']}`; ratio of peaks {data['ratio']:.2f}x.\n\n"
        + md_table(
            [
                "tasks",
                "succeeded",
                "drain s",
                "RSS at start MiB",
                "peak RSS MiB (VmHWM)",
                "peak sampled MiB",
                "RSS at end MiB",
            ],
            rows,
        )
    )
