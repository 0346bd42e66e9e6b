"""Figure group "fleet" (in ``all``; S3 only in ``smoke``): object-store requests per task with K workers on one
queue, flat in depth, per-worker throughput under request latency, idle polling cost.

* **Requests per task.** A queue on S3 (moto), GCS (fake-gcs-server) or Azure (azurite),
  from ``tools/emulators.py``, is filled to depth D (not counted); then K in-process
  ``AsyncWorker``s (``concurrency=8``, burst, events off, results on; each with its own
  backend, so its own client and claim cache, as K processes would have) drain it. At depth
  100 they drain everything once ("one-shot"), then, on a fresh queue, drain while a producer
  keeps 100 tasks unclaimed ("kept"; its requests are not counted); at depth 5,000 they stop
  after ``sample`` tasks ("steady": the cost of the head of a deep queue). Every HTTP request
  the clients send during the drain is counted by operation (S3: aiobotocore's
  ``_make_api_call``; GCS: gcsfs' ``_request``; Azure: the azure-core aiohttp transport's
  ``send``) and divided by the tasks finished: claim + result + ack + listings + reaper,
  amortized. Kept and steady, the figure is a steady drain's: the
  requests sent between the ``sample // 2``-th finished task and ``sample`` more, over those
  ``sample`` tasks (claims in flight at the two ends balance). The whole drain, with each
  worker's first listings and the claims it holds when stopped (released: 4 requests each),
  is reported beside it.
* **Latency-bound throughput.** A drain of 300 tasks per worker through
  ``tools/fault_proxy.py`` holding every response 20 ms, then 100 ms (``delay`` mode):
  per-worker tasks/s against ``concurrency / (requests per task x latency)``, the rate of a
  worker whose requests overlap up to its concurrency. Both are a steady drain's, as the
  requests per task above: counted from the fleet's 50 x K-th finished task to 200 x K more, of
  300 x K queued, tasks/s divided by K (a worker's start is a dozen requests in a row, ~0.4 s at
  20 ms before its first task ends, and a drain's last tasks leave slots empty); the rate from
  the workers' start until they are stopped at the stretch's end (the "whole drain" column) is
  shown beside it. Until the 2026-12-06 run the figure was a whole drain of 100 tasks a
  worker. The same drain with no proxy gives the *ceiling*: what the emulator and the worker,
  sharing this machine's cores, reach with no latency at all. Where the 20 ms bound is above
  that ceiling, the 20 ms ratio measures the emulator's CPU, not the worker; the 100 ms row
  keeps the bound under it.
* **Idle polling.** One worker idles on an empty queue: requests it sends per minute (counted
  over ``idle_s``), then the pick-up latency of single tasks enqueued at random moments
  (enqueue returned -> the task function started), against ``max_poll_interval / 2``.

Every measurement starts a fresh emulator (all three keep their objects in memory): with
10,000 objects of earlier measurements in its bucket, fake-gcs-server served a one-worker
drain at 18 tasks/s instead of 410 (why, inside the emulator, is not known; a real bucket
lists by prefix), which made GCS's ceiling and latency rows of the 2026-12-03 run measure the
leftovers. Workers are in one process with the emulator in another (2 cores): tasks/s say
little about a real fleet; the request counts are the design's.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import os
import random
import sys
import time
from collections.abc import Iterator
from typing import Any

from .common import TOOLS, Context, burst_worker, fmt, md_table, median

NAME = "fleet"

SIZES = {
    "smoke": {"stores": ["s3"], "workers": [1], "depths": [20], "sample": 20, "idle_s": 1,
              "pickups": 1, "latency": False},
    "quick": {"stores": ["s3", "gcs", "azure"], "workers": [1, 4, 16], "depths": [100, 5000],
              "sample": 300, "idle_s": 20, "pickups": 10, "latency": True},
    "full": {"stores": ["s3", "gcs", "azure"], "workers": [1, 4, 16], "depths": [100, 5000],
             "sample": 500, "idle_s": 30, "pickups": 40, "latency": True},
}  # fmt: skip
LIMIT = 5.0  # target: requests per task (claim + result + ack)
CONCURRENCY = 8
LATENCIES = (0.02, 0.1)
LATENCY_DRAIN = (300, 50, 200)  # tasks a worker: queued, finished before the stretch, in it
FUNC = "benchmarks.tasks:noop"
MARK = "benchmarks.fleet:mark"
# The worker's schedule runner lists schedules/ every second (not the queue's cost; measured
# apart with OMNIQ_FLEET_SCHEDULES=1).
SCHEDULES = os.environ.get("OMNIQ_FLEET_SCHEDULES") == "1"

COUNTS: collections.Counter[str] = collections.Counter()
STARTED: dict[int, float] = {}
# Set in the producer that keeps a shallow queue topped up: its requests are not the workers'.
UNCOUNTED: contextvars.ContextVar[bool] = contextvars.ContextVar("UNCOUNTED", default=False)


def mark(n: int) -> None:
    """The pick-up task: notes when it started (the workers run in this process)."""
    STARTED[n] = time.monotonic()


@contextlib.contextmanager
def count_requests() -> Iterator[None]:
    """Count every HTTP request of the three SDKs into ``COUNTS`` by operation."""
    patches: list[tuple[Any, str, Any]] = []
    from aiobotocore.client import AioBaseClient

    async def s3_call(self: Any, operation: str, params: dict[str, Any]) -> Any:
        name = operation + ("(If-None-Match)" if params.get("IfNoneMatch") else "")
        if operation == "ListObjectsV2":  # which area: ready/p0005/ -> ready, run/ -> run
            parts = str(params.get("Prefix", "")).rstrip("/").split("/")
            name += f" {parts[-2] if parts[-1].startswith('p0') else parts[-1]}/"
        if not UNCOUNTED.get():
            COUNTS[f"s3 {name}"] += 1
        return await s3_original(self, operation, params)

    s3_original = AioBaseClient._make_api_call
    patches.append((AioBaseClient, "_make_api_call", s3_call))
    with contextlib.suppress(ImportError):
        import gcsfs

        gcs_original = gcsfs.GCSFileSystem._request

        async def gcs_request(self: Any, method: str, path: str, *args: Any, **kw: Any) -> Any:
            kind = "list" if method == "GET" and path.rstrip("/").endswith("/o") else "object"
            if not UNCOUNTED.get():
                COUNTS[f"gcs {method} {kind}"] += 1
            return await gcs_original(self, method, path, *args, **kw)

        patches.append((gcsfs.GCSFileSystem, "_request", gcs_request))
    with contextlib.suppress(ImportError):
        from azure.core.pipeline.transport import AioHttpTransport

        azure_original = AioHttpTransport.send

        async def azure_send(self: Any, request: Any, **kw: Any) -> Any:
            kind = "list" if "comp=list" in str(request.url) else "blob"
            if not UNCOUNTED.get():
                COUNTS[f"azure {request.method} {kind}"] += 1
            return await azure_original(self, request, **kw)

        patches.append((AioHttpTransport, "send", azure_send))
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, fn in patches:
        setattr(owner, name, fn)
    try:
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def emulator_for(store: str) -> Any:
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    if TOOLS not in sys.path:
        sys.path.insert(0, TOOLS)
    import emulators

    return {"s3": emulators.S3Emulator, "gcs": emulators.GCSEmulator}.get(
        store, emulators.AzureEmulator
    )()


def options_via(emulator: Any, endpoint: str) -> dict[str, Any]:
    options = dict(emulator.storage_options)
    if "connection_string" in options:
        options["connection_string"] = options["connection_string"].replace(
            emulator.endpoint, endpoint
        )
    else:
        options["endpoint_url"] = endpoint
    return options


def _sharding(shards: int) -> dict[str, int] | None:
    """The ``queue_shards`` of a queue ``default`` in ``shards`` shards (None: unsharded)."""
    return {"default": shards} if shards > 1 else None


async def _drain(
    url: str,
    options: dict[str, Any],
    workers: int,
    depth: int,
    sample: int,
    warm: int = 0,
    top_up: bool = False,
    shards: int = 1,
) -> dict[str, Any]:
    """K workers drain a queue of ``depth``; requests counted over the ``sample`` tasks
    finished after the first ``warm`` (see the module docstring), and over the whole drain.
    With ``top_up`` a producer (not counted) keeps ``depth`` tasks unclaimed meanwhile. With
    ``shards`` > 1 the queue is sharded (benchmarks/shards.py)."""
    import anyio

    from omniq.backend.file import AsyncFileBackend
    from omniq.core import Task
    from omniq.storage.file.queue import AsyncFileQueue

    sharded = _sharding(shards)
    filler = AsyncFileQueue(f"{url}/queue", options, shards=sharded)
    for lo in range(0, depth, 500):
        await filler.enqueue_many(
            [Task(func=FUNC, args=[i]) for i in range(lo, min(depth, lo + 500))]
        )
    await filler.close()
    want = sample if top_up else min(depth - warm, sample)
    backends = [
        AsyncFileBackend(url, options, events=False, queue_shards=sharded) for _ in range(workers)
    ]
    fleet = [
        burst_worker(b, CONCURRENCY, idle_timeout=0.5, poll=0.5, schedules=SCHEDULES)
        for b in backends
    ]

    def done() -> int:
        return sum(w.stats["succeeded"] + w.stats["failed"] for w in fleet)

    async def keep_depth() -> None:
        UNCOUNTED.set(True)  # this task's context only
        producer, made = AsyncFileQueue(f"{url}/queue", options, shards=sharded), depth
        try:
            while "to" not in window:
                need = depth - (made - sum(w.stats["claimed"] for w in fleet))
                if need > 0:
                    await producer.enqueue_many(
                        [Task(func=FUNC, args=[i]) for i in range(made, made + need)]
                    )
                    made += need
                await anyio.sleep(0.02)
        finally:
            await producer.close()

    finished: dict[str, float] = {}
    window: dict[str, Any] = {}

    async def watch() -> None:
        while done() < warm:
            await anyio.sleep(0.01)
        window["from"] = (done(), collections.Counter(COUNTS), time.monotonic())
        while done() < warm + want:
            await anyio.sleep(0.01)
        window["to"] = (done(), collections.Counter(COUNTS), time.monotonic())
        finished["at"] = time.monotonic()
        for w in fleet:
            w.stop()

    for b in backends:  # the start-up probe (3 requests once per process): not counted
        await b.queue.enqueue_many([])
    COUNTS.clear()
    t0 = time.monotonic()
    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        if top_up:
            tg.start_soon(keep_depth)
        for w in fleet:
            tg.start_soon(w.run)
    seconds = finished.get("at", time.monotonic()) - t0
    whole_ops, whole_tasks = collections.Counter(COUNTS), done()
    for b in backends:
        await b.close()
    steady = None
    if warm and "to" in window:
        ops, tasks = window["to"][1] - window["from"][1], window["to"][0] - window["from"][0]
        steady = tasks / (window["to"][2] - window["from"][2]) / workers
    else:  # the whole drain (until the workers stopped) is the figure
        ops, tasks = whole_ops, whole_tasks
    whole = sum(whole_ops.values())
    return {
        "workers": workers,
        "depth": depth,
        "mode": "kept" if top_up else "steady" if warm else "one-shot",
        "tasks": tasks,
        "seconds": seconds,
        "requests_per_task": sum(ops.values()) / max(1, tasks),
        "by_operation": {op: n / max(1, tasks) for op, n in sorted(ops.items())},
        "whole_tasks": whole_tasks,
        "whole_requests_per_task": whole / max(1, whole_tasks),
        "tasks_per_s_per_worker": whole_tasks / seconds / workers if seconds else None,
        "steady_tasks_per_s_per_worker": steady,
    }


async def _idle(
    url: str,
    options: dict[str, Any],
    idle_s: float,
    pickups: int,
    shards: int = 1,
    brief: bool = False,
) -> dict[str, Any]:
    """One idle worker's requests a minute, then its pick-up latency. ``brief`` (smoke mode)
    cuts the waits to fractions of a second: it checks the harness and measures nothing."""
    import anyio

    from omniq.backend.file import AsyncFileBackend

    sharded = _sharding(shards)
    backend = AsyncFileBackend(url, options, events=False, queue_shards=sharded)
    producer = AsyncFileBackend(url, options, events=False, queue_shards=sharded)
    await producer.enqueue(FUNC, args=[0])  # the queue exists; the worker takes this one
    worker = backend.worker(
        "default", concurrency=CONCURRENCY, poll=0.5, handle_signals=False, schedules=SCHEDULES
    )
    poll_max = backend.queue.max_poll_interval
    out: dict[str, Any] = {"max_poll_interval": poll_max}
    latencies: list[float] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        # The worker has found the queue empty a while: its pause has grown to poll_max and
        # it trusts its bells (docs/queue.md, "Bells"). After 2 * poll_max + 1 the window
        # still held 16 shards' first listings once their bell was heard (the full run of
        # 3c7548e: 614 requests a minute, where a settled worker sends ~376).
        await anyio.sleep(0.5 if brief else 5 * poll_max + 5)
        COUNTS.clear()
        await anyio.sleep(idle_s)
        out["requests_per_idle_minute"] = sum(COUNTS.values()) * 60 / idle_s
        out["idle_by_operation"] = {k: v * 60 / idle_s for k, v in sorted(COUNTS.items())}
        STARTED.clear()
        for n in range(pickups):
            await anyio.sleep(
                random.uniform(0.2, 0.4) if brief else random.uniform(2, 3) * poll_max
            )
            await producer.enqueue(MARK, args=[n])
            sent = time.monotonic()
            while n not in STARTED:
                await anyio.sleep(0.005)
            latencies.append(STARTED[n] - sent)
        worker.stop()
    await backend.close()
    await producer.close()
    out["pickup_ms"] = sorted(round(x * 1000, 1) for x in latencies)
    out["pickup_p50_ms"] = (median(latencies) or 0.0) * 1000
    return out


def _drains(size: dict[str, Any]) -> list[tuple[int, int, bool]]:
    """(depth, workers, top_up) of each drain: a shallow queue drained once, then kept at
    its depth by a producer; a deep one drained for a steady stretch."""
    return [
        (depth, k, top_up)
        for depth in size["depths"]
        for top_up in ((False, True) if depth < 4 * size["sample"] else (False,))
        for k in size["workers"]
    ]


def _store(ctx: Context, store: str, size: dict[str, Any]) -> dict[str, Any]:
    emulator = emulator_for(store)
    try:
        emulator.start()
    except Exception as exc:
        ctx.note(f"fleet: {store} skipped: {exc}")
        return {"skipped": str(exc)}
    out: dict[str, Any] = {"drain": [], "latency": [], "idle": None}
    try:
        with count_requests():
            for depth, k, top_up in _drains(size):
                url = fresh(emulator).url(f"fleet-{os.getpid()}-{time.time_ns()}")
                # A deep or topped-up queue: a steady stretch (see the module docstring).
                warm = size["sample"] // 2 if top_up or depth >= 4 * size["sample"] else 0
                got = asyncio.run(
                    _drain(url, emulator.storage_options, k, depth, size["sample"], warm, top_up)
                )
                ctx.log(
                    f"fleet: {store} depth {depth:,} ({got['mode']}) K={k}: "
                    f"{got['requests_per_task']:.2f} "
                    f"requests/task over {got['tasks']} tasks (whole drain "
                    f"{got['whole_requests_per_task']:.2f} over {got['whole_tasks']}) "
                    f"{got['by_operation']}"
                )
                out["drain"].append(got)
            if size["latency"]:
                out["latency"] = _latency(ctx, store, emulator, size)
            url = fresh(emulator).url(f"fleet-idle-{os.getpid()}-{time.time_ns()}")
            out["idle"] = asyncio.run(
                _idle(
                    url,
                    emulator.storage_options,
                    size["idle_s"],
                    size["pickups"],
                    brief=ctx.mode == "smoke",
                )
            )
            ctx.log(f"fleet: {store} idle: {out['idle']}")
    finally:
        emulator.stop()
    return out


def _latency(ctx: Context, store: str, emulator: Any, size: dict[str, Any]) -> list[Any]:
    rows = []

    def drain(url: str, options: dict[str, Any], k: int) -> dict[str, Any]:
        # A steady stretch (see the module docstring): 200 tasks a worker after its first 50,
        # of 300 (so that no worker runs out of tasks inside the stretch).
        depth, warm, sample = LATENCY_DRAIN
        got = asyncio.run(_drain(url, options, k, depth * k, sample * k, warm * k))
        got["rate"] = got["steady_tasks_per_s_per_worker"] or got["tasks_per_s_per_worker"]
        return got

    for k in size["workers"][:2]:
        got = drain(fresh(emulator).url(f"fleet-ceiling-{os.getpid()}-{time.time_ns()}"),
                    emulator.storage_options, k)  # fmt: skip
        got["latency_ms"], got["bound_tasks_per_s"], got["ratio_to_bound"] = 0, None, None
        ctx.log(f"fleet: {store} ceiling K={k}: {got['rate']:.1f} tasks/s")
        rows.append(got)
    for latency in LATENCIES:
        for k in size["workers"][:2]:
            with behind_proxy(emulator, latency) as options:
                got = drain(emulator.url(f"fleet-lat-{os.getpid()}-{time.time_ns()}"), options, k)
            bound = CONCURRENCY / (got["requests_per_task"] * latency)
            got["latency_ms"] = latency * 1000
            got["bound_tasks_per_s"] = bound
            got["ratio_to_bound"] = got["rate"] / bound
            ctx.log(
                f"fleet: {store} +{latency * 1000:.0f} ms K={k}: {got['rate']:.1f} tasks/s per "
                f"worker (whole drain {got['tasks_per_s_per_worker']:.1f}), bound {bound:.1f}"
            )
            rows.append(got)
    return rows


@contextlib.contextmanager
def behind_proxy(emulator: Any, latency: float) -> Iterator[dict[str, Any]]:
    """The emulator restarted empty, behind ``tools/fault_proxy.py`` holding every response
    ``latency`` seconds; yields the storage options that go through the proxy."""
    import fault_proxy  # tools/ is on sys.path once emulator_for() ran

    port = int(fresh(emulator).endpoint.rsplit(":", 1)[1])
    with fault_proxy.FaultProxy(("127.0.0.1", port), delay_range=(latency, latency)) as proxy:
        proxy.set_mode("delay", p=1.0)
        yield options_via(emulator, proxy.endpoint)


def fresh(emulator: Any) -> Any:
    """The emulator restarted, empty (see the module docstring: objects left by earlier
    measurements slow the next one's listings on fake-gcs-server)."""
    emulator.stop()
    return emulator.start()


def run(ctx: Context) -> dict[str, Any]:
    size = ctx.size(SIZES)
    only = os.environ.get("OMNIQ_FLEET_STORES")
    stores = only.split(",") if only else size["stores"]
    return {"limit": LIMIT, "stores": {s: _store(ctx, s, size) for s in stores}}


def targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    bits, met = [], True
    for store, block in data["stores"].items():
        if "skipped" in block:
            met = False
            continue
        # Judged on steady drains (a deep queue, or a shallow one kept at its depth): a
        # one-shot drain of 100 tasks by 16 workers measures their start and stop.
        per = [d["requests_per_task"] for d in block["drain"] if d.get("mode") != "one-shot"]
        once = [d["requests_per_task"] for d in block["drain"] if d.get("mode") == "one-shot"]
        met = met and bool(per) and max(per) <= LIMIT
        bits.append(
            f"{store}: {min(per):.2f}-{max(per):.2f}"
            + (f" (one-shot drains {min(once):.2f}-{max(once):.2f})" if once else "")
        )
    lat_bits, lat_met = [], True
    for store, block in data["stores"].items():
        rows = block.get("latency") or []
        ceiling = [_rate(d) for d in rows if not d["latency_ms"]]
        ratios = [
            f"{d['latency_ms']:.0f} ms {d['ratio_to_bound']:.2f}" for d in rows if d["latency_ms"]
        ]
        lat_met = lat_met and all(
            d["ratio_to_bound"] >= 1 / 1.5 for d in rows if d["latency_ms"] == LATENCIES[0] * 1000
        )
        if ratios:
            lat_bits.append(
                f"{store}: {', '.join(ratios)} (ceiling {fmt(max(ceiling or [0]), 1)}/s)"
            )
    latency_target = {
        "id": 16,
        "figure": NAME,
        "title": "per-worker throughput under request latency (fault proxy)",
        "goal": "within 1.5x of concurrency / (requests per task x latency) at 20 ms",
        "measured": "; ".join(lat_bits) or "not run",
        "met": lat_met and bool(lat_bits),
    }
    return [
        latency_target,
        {
            "id": 17,
            "figure": NAME,
            "title": "object-store requests per task with 1-16 workers, depth 100 and 5,000",
            "goal": f"<= {LIMIT:g} requests per task (claim + result + ack), flat in depth",
            "measured": "; ".join(bits),
            "met": met,
        },
    ]


def _rate(d: dict[str, Any]) -> float | None:
    """A latency row's tasks/s a worker: the steady stretch's (results before the 2026-12-06
    run have the whole drain's only)."""
    return d.get("rate", d["tasks_per_s_per_worker"])


def _whole(d: dict[str, Any]) -> str:
    if "whole_tasks" not in d or d["whole_tasks"] == d["tasks"]:
        return "(the same)"
    return f"{d['whole_requests_per_task']:.2f} over {d['whole_tasks']}"


def markdown(data: dict[str, Any]) -> str:
    parts = []
    for store, block in data["stores"].items():
        if "skipped" in block:
            parts.append(f"**{store}**: skipped ({block['skipped']})")
            continue
        rows = [
            [
                f"{d['depth']:,}",
                d.get("mode", ""),
                d["workers"],
                d["tasks"],
                f"{d['requests_per_task']:.2f}",
                _whole(d),
                ", ".join(f"{op.split(' ', 1)[1]} {n:.2f}" for op, n in d["by_operation"].items()),
            ]
            for d in block["drain"]
        ]
        parts.append(
            f"**{store}** (steady: a stretch of a deep queue's drain; kept: a stretch while a "
            "producer keeps the depth; one-shot: the whole drain; the whole drain beside a "
            "stretch includes each worker's first listings and the claims it held when "
            "stopped)\n\n"
            + md_table(
                [
                    "depth",
                    "mode",
                    "workers",
                    "tasks",
                    "requests/task",
                    "whole drain",
                    "by operation",
                ],
                rows,
            )
        )
        if block["latency"]:
            lat = [
                [
                    f"{d['latency_ms']:.0f}" if d["latency_ms"] else "none (ceiling)",
                    d["workers"],
                    f"{d['requests_per_task']:.2f}",
                    fmt(_rate(d), 1),
                    fmt(d["tasks_per_s_per_worker"], 1) if "rate" in d else "(the same)",
                    fmt(d["bound_tasks_per_s"], 1),
                    "" if d["ratio_to_bound"] is None else f"{d['ratio_to_bound']:.2f}",
                ]
                for d in block["latency"]
            ]
            steady = any("rate" in d for d in block["latency"])
            parts.append(
                f"{store} with latency added to every request (fault proxy)"
                + (
                    "; tasks/s and requests per task over a steady stretch, beside them the "
                    "tasks/s from the workers' start until they were stopped"
                    if steady
                    else ""
                )
                + "\n\n"
                + md_table(
                    [
                        "ms",
                        "workers",
                        "requests/task",
                        "tasks/s per worker",
                        "whole drain",
                        "bound",
                        "ratio",
                    ],
                    lat,
                )
            )
        idle = block["idle"]
        if idle:
            parts.append(
                f"{store} idle worker: {idle['requests_per_idle_minute']:.0f} requests/min "
                f"({idle['idle_by_operation']}); pick-up p50 {idle['pickup_p50_ms']:.0f} ms "
                f"(max_poll_interval {idle['max_poll_interval']:g} s), all {idle['pickup_ms']}"
            )
    return "\n\n".join(parts)
