"""Figure group "remote_events": what task events cost on object stores (issue 13 target 2).

On S3, GCS and Azure (their emulators, each freshly started per measurement, behind
``tools/fault_proxy.py`` holding every response 20 ms, as a nearby region's latency) one
process enqueues N no-op tasks one at a time with ``AsyncFileBackend.enqueue``, then an
``AsyncWorker`` (concurrency 8, burst) drains them. Events are off, on (``log``: each event is
two PUTs, the event and its task's index entry, awaited before the call returns: the default)
or batched (``event_flush_interval=0.05``: the events' background writer puts a batch file of
up to 64 events and an index entry per task, and the enqueue or the task does not wait for
it). The writer's pending events are flushed inside each timed window, so its writes are
counted; the drain's window ends when the worker has counted N successes (and the events are
flushed), not when the burst worker has seen the queue empty for its ``idle_timeout``. Modes are interleaved and rotate their order each repetition; tasks/s are medians and
the on / off and batched / off ratios are medians of same-repetition ratios. Requests are
counted by operation as in ``fleet``.

Target 2: events on cost at most 25 % of the drain (>= 0.75x) and enqueue keeps >= 0.8x;
met if one way to write (at once or batched) meets both on all three stores. The emulators
run on the same two cores: with events on they serve more requests, so part of a ratio is
their CPU, not the latency.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from .common import (
    Context,
    burst_worker,
    drain_timed,
    enqueue_range,
    fmt,
    md_table,
    median,
    paired_ratios,
    summary,
)
from .e2e import EVENTS, FLUSH_INTERVAL, event_settings
from .fleet import COUNTS, FUNC, behind_proxy, count_requests, emulator_for

NAME = "remote_events"

SIZES = {
    "smoke": {"stores": ["s3"], "n": 10},
    "quick": {"stores": ["s3", "gcs", "azure"], "n": 100},
    "full": {"stores": ["s3", "gcs", "azure"], "n": 200},
}
LATENCY = 0.02
CONCURRENCY = 8


async def _measure(url: str, options: dict[str, Any], mode: str, n: int) -> dict[str, Any]:
    from omniq.backend.file import AsyncFileBackend

    async with AsyncFileBackend(url, options, **event_settings(mode)) as backend:
        COUNTS.clear()
        t0 = time.perf_counter()
        await enqueue_range(backend, FUNC, 0, n)
        t1 = time.perf_counter()
        enqueue_requests = sum(COUNTS.values())
        COUNTS.clear()
        worker = burst_worker(backend, CONCURRENCY, idle_timeout=0.3)
        end: dict[str, float] = {}
        stats = await drain_timed(
            backend,
            worker,
            n,
            lambda: end.update(at=time.perf_counter(), requests=sum(COUNTS.values())),
        )
        t2, drain_requests = end["at"], end["requests"]
        written = backend.events.written if backend.events is not None else 0
    return {
        "mode": mode,
        "enqueue_per_s": n / (t1 - t0),
        "drain_per_s": n / (t2 - t1),
        "enqueue_requests_per_task": enqueue_requests / n,
        "drain_requests_per_task": drain_requests / n,
        "events_written": written,
        "succeeded": stats["succeeded"],
    }


def _store(ctx: Context, store: str, n: int) -> dict[str, Any]:
    emulator = emulator_for(store)
    try:
        emulator.start()
    except Exception as exc:
        ctx.note(f"remote_events: {store} skipped: {exc}")
        return {"skipped": str(exc)}
    raw: dict[str, list[dict[str, Any]]] = {m: [] for m in EVENTS}
    try:
        with count_requests():
            for rep in range(ctx.repeat):
                for mode in EVENTS[rep % len(EVENTS) :] + EVENTS[: rep % len(EVENTS)]:
                    with behind_proxy(emulator, LATENCY) as options:
                        url = emulator.url(f"events-{mode}-{os.getpid()}-{time.time_ns()}")
                        got = asyncio.run(_measure(url, options, mode, n))
                    ctx.log(
                        f"remote_events: {store} rep {rep + 1}/{ctx.repeat} {mode:8} enqueue "
                        f"{got['enqueue_per_s']:5.1f}/s ({got['enqueue_requests_per_task']:.2f} "
                        f"req/task), drain {got['drain_per_s']:5.1f}/s "
                        f"({got['drain_requests_per_task']:.2f} req/task)"
                    )
                    raw[mode].append(got)
    finally:
        emulator.stop()
    fields = (
        "enqueue_per_s",
        "drain_per_s",
        "enqueue_requests_per_task",
        "drain_requests_per_task",
    )
    table = {
        mode: {
            **{field: summary([r[field] for r in runs]) for field in fields},
            "succeeded": [r["succeeded"] for r in runs],
            "events_written": [r["events_written"] for r in runs],
        }
        for mode, runs in raw.items()
    }
    ratios = {
        mode: {
            what: paired_ratios(raw[mode], raw["off"], what)
            for what in ("enqueue_per_s", "drain_per_s")
        }
        for mode in EVENTS[1:]
    }
    return {"results": table, "ratios": ratios}


def run(ctx: Context) -> dict[str, Any]:
    size = ctx.size(SIZES)
    return {
        "n": size["n"],
        "latency_ms": LATENCY * 1000,
        "repeat": ctx.repeat,
        "stores": {store: _store(ctx, store, size["n"]) for store in size["stores"]},
    }


def _met(block: dict[str, Any], mode: str) -> bool:
    r = block["ratios"][mode]
    drain, enqueue = r["drain_per_s"]["median"], r["enqueue_per_s"]["median"]
    return drain is not None and enqueue is not None and drain >= 0.75 and enqueue >= 0.8


def targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    bits, ok, met = [], True, {m: True for m in EVENTS[1:]}
    for store, block in data["stores"].items():
        if "skipped" in block:
            ok = False
            bits.append(f"{store} skipped")
            continue
        ok = ok and all(s == data["n"] for v in block["results"].values() for s in v["succeeded"])
        for mode in EVENTS[1:]:
            met[mode] = met[mode] and _met(block, mode)
            r = block["ratios"][mode]
            bits.append(
                f"{store} {mode}: drain {fmt(r['drain_per_s']['median'], 2)}x, enqueue "
                f"{fmt(r['enqueue_per_s']['median'], 2)}x"
            )
    return [
        {
            "id": 18,
            "figure": NAME,
            "title": "events on object stores, 20 ms a request (issue 13 target 2)",
            "goal": "events on, written at once (the default) or batched "
            "(event_flush_interval): drain >= 0.75x and enqueue >= 0.8x of events off, on S3, "
            "GCS and Azure",
            "measured": "; ".join(bits)
            + f" (met by: {', '.join(m for m, v in met.items() if v and ok) or 'neither'})"
            + ("" if ok else "; A STORE WAS SKIPPED OR TASKS DID NOT SUCCEED"),
            "met": ok and any(met.values()),
        }
    ]


def markdown(data: dict[str, Any]) -> str:
    rows, ratio_rows = [], []
    for store, block in data["stores"].items():
        if "skipped" in block:
            rows.append([store, "skipped", block["skipped"], "", "", "", ""])
            continue
        for mode, v in block["results"].items():
            rows.append(
                [
                    store,
                    mode,
                    fmt(v["enqueue_per_s"]["median"], 1),
                    fmt(v["drain_per_s"]["median"], 1),
                    fmt(v["enqueue_requests_per_task"]["median"], 2),
                    fmt(v["drain_requests_per_task"]["median"], 2),
                    fmt(median(v["events_written"]), 0),
                ]
            )
        for mode, r in block["ratios"].items():
            ratio_rows.append(
                [
                    store,
                    mode,
                    fmt(r["enqueue_per_s"]["median"], 2),
                    fmt(r["drain_per_s"]["median"], 2),
                ]
            )
    return (
        f"N = {data['n']:,} tasks per run, every request held {data['latency_ms']:.0f} ms by a "
        f"proxy, {data['repeat']} repetitions, medians; batched = `event_flush_interval` "
        f"{FLUSH_INTERVAL} s.\n\n"
        + md_table(
            [
                "store",
                "events",
                "enqueue/s",
                "drain tasks/s",
                "enqueue requests/task",
                "drain requests/task",
                "events written",
            ],
            rows,
        )
        + "\n\nMedian of same-repetition ratios to events off:\n\n"
        + md_table(["store", "events", "enqueue / off", "drain / off"], ratio_rows)
    )
