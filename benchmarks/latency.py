"""Figure group "latency": dequeue + ack latency against queue depth on local disk.

One queue on local disk is filled to each depth in turn (100, then 10,000, then 100,000);
at each depth one consumer warms up (M/10 untimed pairs), then measures M consecutive ``dequeue`` + ``ack`` pairs one by one,
and after each pair one task is enqueued (untimed) so the depth stays put. The p99 includes
the periodic listing refresh (every ``refresh_interval`` or every ``batch`` claims) and the
reaper pass. The async API is the measured one; the blocking twin is shown beside it.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from .common import Context, fmt, md_table, percentile, plt

NAME = "latency"

SIZES = {
    "smoke": {"depths": [20, 200, 1000], "samples": 40, "sync_samples": 20},
    "quick": {"depths": [100, 10_000, 30_000], "samples": 1000, "sync_samples": 200},
    "full": {"depths": [100, 10_000, 100_000], "samples": 2000, "sync_samples": 500},
}


def _stats(values: list[float]) -> dict[str, Any]:
    us = [v * 1e6 for v in values]
    return {
        "n": len(us),
        "p50_us": percentile(us, 50),
        "p90_us": percentile(us, 90),
        "p99_us": percentile(us, 99),
        "max_us": max(us) if us else None,
        "mean_us": sum(us) / len(us) if us else None,
    }


async def _fill(queue: Any, start: int, stop: int) -> None:
    from omniq.core import Task

    for lo in range(start, stop, 1000):
        await queue.enqueue_many(
            [Task(func="bench:noop", args=[i]) for i in range(lo, min(stop, lo + 1000))]
        )


async def _measure_async(
    path: str, depth: int, filled: int, samples: int, log: Any
) -> dict[str, Any]:
    """Grow the queue from ``filled`` to ``depth`` tasks, then time ``samples`` pairs."""
    from omniq.core import Task
    from omniq.storage.file.queue import AsyncFileQueue

    queue = AsyncFileQueue(path)
    t0 = time.monotonic()
    await _fill(queue, filled, depth)
    log(f"latency: filled to depth {depth:,} in {time.monotonic() - t0:.1f}s")
    for i in range(max(20, samples // 10)):  # warm-up (threads, caches), untimed
        claimed = await queue.dequeue("default")
        assert claimed is not None
        await queue.ack(claimed)
        await queue.enqueue(Task(func="bench:noop", args=[2 * 10**9 + depth + i]))
    times = []
    for i in range(samples):
        start = time.perf_counter()
        claimed = await queue.dequeue("default")
        assert claimed is not None
        await queue.ack(claimed)
        times.append(time.perf_counter() - start)
        await queue.enqueue(Task(func="bench:noop", args=[10**9 + depth + i]))
    await queue.close()
    got = _stats(times)
    log(f"latency: depth {depth:,} async p50 {got['p50_us']:.0f}us p99 {got['p99_us']:.0f}us")
    return got


def _measure_sync(path: str, samples: int) -> dict[str, Any]:
    from omniq.core import Task
    from omniq.storage.file.queue import FileQueue

    times = []
    with FileQueue(path) as queue:
        for i in range(samples):
            start = time.perf_counter()
            claimed = queue.dequeue("default")
            assert claimed is not None
            queue.ack(claimed)
            times.append(time.perf_counter() - start)
            queue.enqueue(Task(func="bench:noop", args=[2 * 10**9 + i]))
    return _stats(times)


def run(ctx: Context) -> dict[str, Any]:
    size = ctx.size(SIZES)
    depths = size["depths"]
    measured: dict[str, Any] = {}
    sync: dict[str, Any] = {}
    with ctx.scratch(ctx.disk_base, "latency") as path:
        queue_dir = os.path.join(path, "queue")
        filled = 0
        for depth in depths:
            measured[str(depth)] = asyncio.run(
                _measure_async(queue_dir, depth, filled, size["samples"], ctx.log)
            )
            filled = depth
            sync[str(depth)] = _measure_sync(queue_dir, size["sync_samples"])
            ctx.log(
                f"latency: depth {depth:,} sync p50 {sync[str(depth)]['p50_us']:.0f}us "
                f"p99 {sync[str(depth)]['p99_us']:.0f}us"
            )
    # The same on tmpfs (async only), for information: local-disk latency on this machine
    # depends on the ext4 state (recently created files, writeback) as much as on OmniQ.
    tmpfs: dict[str, Any] = {}
    if ctx.tmpfs_base and os.path.isdir(ctx.tmpfs_base):
        with ctx.scratch(ctx.tmpfs_base, "latency") as path:
            filled = 0
            for depth in depths:
                tmpfs[str(depth)] = asyncio.run(
                    _measure_async(
                        os.path.join(path, "queue"), depth, filled, size["samples"], ctx.log
                    )
                )
                filled = depth
    return {
        "depths": depths,
        "samples": size["samples"],
        "async": measured,
        "sync": sync,
        "tmpfs_async": tmpfs,
    }


def targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    depths = [str(d) for d in data["depths"]]
    low, high = data["async"][depths[0]], data["async"][depths[-1]]
    factor = high["p50_us"] / low["p50_us"] if low["p50_us"] else None
    measured = "; ".join(
        f"depth {int(d):,}: p50 {fmt(data['async'][d]['p50_us'])} µs, "
        f"p99 {fmt(data['async'][d]['p99_us'])} µs"
        for d in depths
    )
    return [
        {
            "id": 4,
            "figure": NAME,
            "title": "dequeue+ack latency vs depth (local disk)",
            "goal": f"p50 at depth {int(depths[-1]):,} within 2x of p50 at {int(depths[0]):,}",
            "measured": f"{measured}; p50 ratio {fmt(factor, 2)}x",
            "met": factor is not None and factor <= 2.0,
        }
    ]


def markdown(data: dict[str, Any]) -> str:
    rows = []
    for api, label in (
        ("async", "disk, async"),
        ("sync", "disk, sync twin"),
        ("tmpfs_async", "tmpfs, async"),
    ):
        for depth, s in data.get(api, {}).items():
            rows.append(
                [
                    label,
                    f"{int(depth):,}",
                    s["n"],
                    fmt(s["p50_us"]),
                    fmt(s["p90_us"]),
                    fmt(s["p99_us"]),
                    fmt(s["max_us"]),
                    fmt(s["mean_us"]),
                ]
            )
    return (
        "One consumer; each sample is one `dequeue` + `ack` (µs). The target is judged on "
        "the disk/async rows; tmpfs rows show OmniQ's own cost without ext4's.\n\n"
        + md_table(["store, API", "depth", "samples", "p50", "p90", "p99", "max", "mean"], rows)
    )


def chart(data: dict[str, Any], out_dir: str) -> list[str]:
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(7, 4.5))
    depths = [int(d) for d in data["async"]]
    names = {"async": "disk async", "sync": "disk sync", "tmpfs_async": "tmpfs async"}
    for api, style in (("async", "-"), ("sync", "--"), ("tmpfs_async", ":")):
        block = data.get(api)
        if not block:
            continue
        for key, marker in (("p50_us", "o"), ("p99_us", "s")):
            ax.plot(
                depths,
                [block[str(d)][key] / 1000 for d in depths],
                style,
                marker=marker,
                label=f"{names[api]} {key[:3]}",
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("queue depth (tasks)")
    ax.set_ylabel("dequeue + ack latency (ms)")
    ax.set_title("OmniQ dequeue + ack latency vs depth (1 consumer)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    path = os.path.join(out_dir, "latency.png")
    fig.savefig(path, dpi=110)
    pyplot.close(fig)
    return [path]
