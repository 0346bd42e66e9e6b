"""Figure group "requests": storage requests per task lifecycle.

A lifecycle is what a worker does for one task: enqueue, claim (``dequeue``, including its
share of listings and reaper passes), result write, ack. Requests are counted by
instrumenting the client:

* S3 (moto server from ``tools/emulators.py``): every call of aiobotocore's
  ``AioBaseClient._make_api_call`` is one HTTP request, counted by operation name (a
  conditional PUT is shown as ``PutObject(If-None-Match)``);
* local disk: every call of the ``omniq.core._local_ops.LocalOps`` methods (read, write, create,
  delete, listdir, listhead, ...) is one storage operation; listings also record how many
  directory entries the scan behind them returned.

The queue is filled to a depth D, then M lifecycles are run one after the other; after each,
one new task is enqueued so the depth stays at D. Counts are divided by M (the refill
enqueues give the enqueue count). Events are off (each event adds two writes).

The result write is the worker's call inside its lease, ``set(result, check_attempt=False)``.
Its expiry marker is buffered and written in batches (one object per expiry hour, every
``marker_batch`` results or ``marker_flush_interval`` seconds); the final ``flush()`` is made
inside the counted window, so every marker write is counted in the "result" phase, amortized.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

from .common import TOOLS, Context, fmt, md_table

NAME = "requests"

# Local lifecycles are many more than the listing batch (256) so listings amortize; on S3 a
# listing is refreshed at most once per second, so the time a run takes amortizes it.
SIZES = {
    "smoke": {
        "s3_depths": [20, 60],
        "local_depths": [20, 200],
        "s3_samples": 10,
        "local_samples": 20,
    },
    "quick": {
        "s3_depths": [100, 2000],
        "local_depths": [100, 10_000],
        "s3_samples": 100,
        "local_samples": 1000,
    },
    "full": {
        "s3_depths": [100, 10_000],
        "local_depths": [100, 10_000, 100_000],
        "s3_samples": 200,
        "local_samples": 1000,
    },
}
LIMIT = 6  # target: at most this many requests per lifecycle
PHASES = ("enqueue", "claim", "result", "ack")


class Counter:
    def __init__(self) -> None:
        self.phase = "setup"
        self.counts: dict[str, collections.Counter[str]] = collections.defaultdict(
            collections.Counter
        )
        self.listed: collections.Counter[str] = collections.Counter()

    def add(self, op: str, n: int = 1) -> None:
        self.counts[self.phase][op] += n

    def reset(self) -> None:
        self.counts.clear()
        self.listed.clear()


COUNTER = Counter()


@contextlib.contextmanager
def count_s3() -> Iterator[None]:
    from aiobotocore.client import AioBaseClient

    original = AioBaseClient._make_api_call

    async def counted(self: Any, operation_name: str, api_params: dict[str, Any]) -> Any:
        name = operation_name
        if api_params.get("IfNoneMatch"):
            name += "(If-None-Match)"
        elif api_params.get("IfMatch"):
            name += "(If-Match)"
        COUNTER.add(name)
        return await original(self, operation_name, api_params)

    AioBaseClient._make_api_call = counted
    try:
        yield
    finally:
        AioBaseClient._make_api_call = original


@contextlib.contextmanager
def count_local() -> Iterator[None]:
    """Count the storage operations of ``LocalOps``: every public method is wrapped; a call
    made inside another counted call (``listhead`` calling ``listdir``) is not counted again, and
    the ``*_many`` methods count as their items. Listings also record how many directory
    entries the underlying scan returned (what a local listing costs)."""
    import threading

    from omniq.core._local_ops import LocalOps

    local = threading.local()
    saved = {}
    for name, original in list(vars(LocalOps).items()):
        if name.startswith("_") or not callable(original):
            continue
        saved[name] = original
        transparent = name.endswith("_many")

        def counted(
            self: Any,
            *args: Any,
            _original: Any = original,
            _name: str = name,
            _transparent: bool = transparent,
        ) -> Any:
            depth = getattr(local, "depth", 0)
            if _transparent:
                return _original(self, *args)
            if depth == 0:
                COUNTER.add(_name)
            local.depth = depth + 1
            try:
                result = _original(self, *args)
            finally:
                local.depth = depth
            if _name in ("listdir", "listdirs"):
                COUNTER.listed[COUNTER.phase] += len(result)
            return result

        setattr(LocalOps, name, counted)
    try:
        yield
    finally:
        for name, original in saved.items():
            setattr(LocalOps, name, original)


async def lifecycle(
    queue_url: str,
    results_url: str,
    options: dict[str, Any] | None,
    depth: int,
    samples: int,
    log: Any,
) -> dict[str, Any]:
    from omniq.core import Task
    from omniq.core.models import ResultStatus, TaskResult
    from omniq.storage.file.queue import AsyncFileQueue
    from omniq.storage.file.results import AsyncFileResultStorage

    queue = AsyncFileQueue(queue_url, options)
    results = AsyncFileResultStorage(results_url, options)
    COUNTER.reset()
    COUNTER.phase = "setup"
    await queue.enqueue_many([])  # the start-up probe (3 requests, once per process)
    setup = dict(COUNTER.counts["setup"])
    COUNTER.reset()
    COUNTER.phase = "fill"
    t0 = time.monotonic()
    chunk = 1000
    for lo in range(0, depth, chunk):
        await queue.enqueue_many(
            [Task(func="bench:noop", args=[i]) for i in range(lo, min(depth, lo + chunk))]
        )
    fill_seconds = time.monotonic() - t0
    fill = dict(COUNTER.counts["fill"])
    log(
        f"requests: filled {queue_url.split('://')[0] if '://' in queue_url else 'local'} "
        f"queue to depth {depth:,} in {fill_seconds:.1f}s"
    )
    COUNTER.reset()
    t0 = time.monotonic()
    done = 0
    for i in range(samples):
        COUNTER.phase = "claim"
        claimed = await queue.dequeue("default")
        if claimed is None:
            break
        COUNTER.phase = "result"
        await results.set(
            TaskResult(
                task_id=claimed.id,
                status=ResultStatus.SUCCESS,
                value=None,
                attempt=claimed.attempt,
                queue=claimed.queue,
                func=claimed.task.func,
            ),
            check_attempt=False,  # as the worker does inside its lease
        )
        COUNTER.phase = "ack"
        await queue.ack(claimed)
        COUNTER.phase = "enqueue"
        await queue.enqueue(Task(func="bench:noop", args=[depth + i]))
        done += 1
    COUNTER.phase = "result"
    flushed = await results.flush()  # the last batch of expiry markers: counted too
    seconds = time.monotonic() - t0
    COUNTER.phase = "close"
    await queue.close()
    await results.close()
    per_phase = {
        phase: {op: n / done for op, n in COUNTER.counts[phase].items()} for phase in PHASES
    }
    totals = {phase: sum(ops.values()) for phase, ops in per_phase.items()}
    return {
        "depth": depth,
        "samples": done,
        "seconds": seconds,
        "lifecycles_per_s": done / seconds if seconds else None,
        "per_task": per_phase,
        "per_task_totals": totals,
        "total_per_task": sum(totals.values()),
        "listed_entries_per_task": {
            p: COUNTER.listed[p] / done for p in PHASES if COUNTER.listed[p]
        },
        "startup_probe": setup,
        "markers_in_final_flush": flushed,
        "fill": {
            "seconds": fill_seconds,
            "ops": fill,
            "per_task": sum(fill.values()) / max(1, depth),
        },
    }


def _run_s3(ctx: Context, depths: list[int], samples: int) -> dict[str, Any]:
    if TOOLS not in sys.path:
        sys.path.insert(0, TOOLS)
    try:
        import s3fs  # noqa: F401

        from emulators import EmulatorUnavailable, S3Emulator
    except ImportError as exc:
        ctx.note(f"S3 request counts skipped: {exc}")
        return {"skipped": str(exc)}
    emulator = S3Emulator()
    try:
        emulator.start()
    except EmulatorUnavailable as exc:
        ctx.note(f"S3 request counts skipped: {exc}")
        return {"skipped": str(exc)}
    out = {}
    try:
        for depth in depths:
            prefix = f"bench-{os.getpid()}-{depth}-{time.time_ns()}"
            with count_s3():
                got = asyncio.run(
                    lifecycle(
                        emulator.url(f"{prefix}/queue"),
                        emulator.url(f"{prefix}/results"),
                        emulator.storage_options,
                        depth,
                        samples,
                        ctx.log,
                    )
                )
            ctx.log(
                f"requests: s3 depth {depth:,}: {got['total_per_task']:.2f} requests/task "
                f"({got['per_task_totals']})"
            )
            out[str(depth)] = got
    finally:
        emulator.stop()
    return out


def _run_local(ctx: Context, depths: list[int], samples: int) -> dict[str, Any]:
    out = {}
    for depth in depths:
        with ctx.scratch(ctx.disk_base, f"requests-{depth}") as path, count_local():
            got = asyncio.run(
                lifecycle(
                    os.path.join(path, "queue"),
                    os.path.join(path, "results"),
                    None,
                    depth,
                    samples,
                    ctx.log,
                )
            )
        ctx.log(
            f"requests: local depth {depth:,}: {got['total_per_task']:.2f} ops/task "
            f"({got['per_task_totals']}), listed {got['listed_entries_per_task']}"
        )
        out[str(depth)] = got
    return out


def run(ctx: Context) -> dict[str, Any]:
    size = ctx.size(SIZES)
    return {
        "limit": LIMIT,
        "s3": _run_s3(ctx, size["s3_depths"], size["s3_samples"]),
        "local": _run_local(ctx, size["local_depths"], size["local_samples"]),
    }


def targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    s3 = {d: v for d, v in data["s3"].items() if isinstance(v, dict)}
    local = data["local"]
    bits, met, flat = [], True, True
    for label, block in (("S3", s3), ("local", local)):
        values = []
        for depth, got in block.items():
            total = got["total_per_task"]
            values.append(total)
            bits.append(f"{label} depth {int(depth):,}: {total:.2f}")
            met = met and total <= LIMIT
        flat = flat and (not values or max(values) - min(values) <= 0.5)
    measured = "; ".join(bits)
    if not s3:
        measured += "; S3 not measured (" + str(data["s3"].get("skipped", "?"))[:80] + ")"
    return [
        {
            "id": 3,
            "figure": NAME,
            "title": "storage requests per task lifecycle",
            "goal": f"<= {LIMIT} per task (enqueue+claim+result+ack+listing), the same at "
            "every depth",
            "measured": measured + ("" if flat else " (varies with depth)"),
            "met": (met and flat) if s3 else None,
        }
    ]


def markdown(data: dict[str, Any]) -> str:
    parts = [
        "Depth kept constant by re-enqueueing one task after each lifecycle; requests per "
        "task by phase (claim includes amortized listing and reaping). The result write is "
        "the worker's `set(result, check_attempt=False)`; its expiry markers are batched and "
        "every marker write, the final flush included, is counted in the result phase. Not "
        "counted: the start-up probe (3 requests once per process) and events (off)."
    ]
    for label in ("s3", "local"):
        block = data[label]
        if "skipped" in block:
            parts.append(f"**{label}**: skipped ({block['skipped']})")
            continue
        rows = []
        for depth, got in block.items():
            ops = "; ".join(
                f"{phase}: "
                + ", ".join(f"{op} {n:.2f}" for op, n in sorted(got["per_task"][phase].items()))
                for phase in PHASES
                if got["per_task"][phase]
            )
            listed = ", ".join(f"{p} {n:,.0f}" for p, n in got["listed_entries_per_task"].items())
            rows.append(
                [
                    f"{int(depth):,}",
                    got["samples"],
                    f"{got['total_per_task']:.2f}",
                    " / ".join(f"{got['per_task_totals'][p]:.2f}" for p in PHASES),
                    ops,
                    listed or "-",
                    fmt(got["lifecycles_per_s"], 0),
                ]
            )
        unit = "HTTP requests" if label == "s3" else "LocalOps calls"
        parts.append(
            f"**{label}** ({unit})\n\n"
            + md_table(
                [
                    "depth",
                    "lifecycles",
                    "total/task",
                    "enqueue / claim / result / ack",
                    "by operation",
                    "entries listed per task",
                    "lifecycles/s",
                ],
                rows,
            )
        )
    return "\n\n".join(parts)
