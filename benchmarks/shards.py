"""Figure group "shards" (in ``all``): what a sharded queue (docs/queue.md, "Sharded
queues") spreads and what it costs, on S3 (moto).

* **Where the writes go.** K in-process workers drain a queue of depth D in a steady stretch,
  as ``fleet`` measures it (same ``_drain``), with the queue unsharded and in ``n`` shards.
  Every write request (PUT, DELETE, and each key of a DeleteObjects) is counted by the
  storage queue it lands in (``default``, ``default.shard003``, ...): the busiest queue's
  share of the writes is what bounds one queue by one prefix's write rate (docs/costs.md,
  "How far one queue scales"); with ``n`` shards it should be about ``1/n``. The producer's
  enqueues are counted too (they are writes to the same prefixes), the workers' requests per
  task beside them as in ``fleet``.
* **What an idle worker pays.** One worker idles on the empty queue, unsharded and sharded:
  requests a minute (each look lists every shard), then the pick-up latency of single tasks.

The emulator does not throttle, so the rate a prefix sustains is not measured: the bound
that the spread raises is computed in docs/costs.md from the stores' published limits.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

from . import fleet
from .common import Context, md_table

NAME = "shards"

SIZES = {
    "smoke": {"workers": 1, "depth": 40, "sample": 20, "shards": [1, 4], "idle_s": 1,
              "pickups": 1},
    "quick": {"workers": 16, "depth": 3000, "sample": 300, "shards": [1, 4, 16], "idle_s": 20,
              "pickups": 5},
    "full": {"workers": 16, "depth": 5000, "sample": 500, "shards": [1, 4, 16], "idle_s": 30,
             "pickups": 10},
}  # fmt: skip

WRITES: collections.Counter[str] = collections.Counter()


def _queue_of(key: str) -> str:
    """The storage queue a key of ``{bucket}/{prefix}/queue/{queue}/...`` belongs to."""
    parts = key.split("/")
    return parts[parts.index("queue") + 1] if "queue" in parts[:-1] else "(other)"


@contextlib.contextmanager
def count_writes() -> Iterator[None]:
    """Count S3 writes into ``WRITES`` by storage queue (inside fleet's request counting)."""
    from aiobotocore.client import AioBaseClient

    original = AioBaseClient._make_api_call

    async def call(self: Any, operation: str, params: dict[str, Any]) -> Any:
        if operation in ("PutObject", "DeleteObject", "CopyObject"):
            WRITES[_queue_of(str(params.get("Key", "")))] += 1
        elif operation == "DeleteObjects":
            for item in params.get("Delete", {}).get("Objects", []):
                WRITES[_queue_of(str(item.get("Key", "")))] += 1
        return await original(self, operation, params)

    AioBaseClient._make_api_call = call  # type: ignore[method-assign]
    try:
        yield
    finally:
        AioBaseClient._make_api_call = original  # type: ignore[method-assign]


def run(ctx: Context) -> dict[str, Any]:
    size = ctx.size(SIZES)
    emulator = fleet.emulator_for("s3")
    try:
        emulator.start()
    except Exception as exc:
        ctx.note(f"shards: s3 skipped: {exc}")
        return {"skipped": str(exc)}
    rows: list[dict[str, Any]] = []
    try:
        with fleet.count_requests(), count_writes():
            for n in size["shards"]:
                url = fleet.fresh(emulator).url(f"shards-{os.getpid()}-{time.time_ns()}")
                WRITES.clear()
                got = asyncio.run(
                    fleet._drain(
                        url,
                        emulator.storage_options,
                        size["workers"],
                        size["depth"],
                        size["sample"],
                        warm=size["sample"] // 2,
                        shards=n,
                    )
                )
                # Not "(other)" (results) nor "_omniq" (the start-up probe's keys).
                queue_writes = {q: c for q, c in WRITES.items() if q[0] not in "(_"}
                total = sum(queue_writes.values())
                got["shards"] = n
                got["writes_by_queue"] = dict(sorted(queue_writes.items()))
                got["busiest_share"] = max(queue_writes.values()) / total if total else None
                url = fleet.fresh(emulator).url(f"shards-idle-{os.getpid()}-{time.time_ns()}")
                got["idle"] = asyncio.run(
                    fleet._idle(
                        url,
                        emulator.storage_options,
                        size["idle_s"],
                        size["pickups"],
                        shards=n,
                        brief=ctx.mode == "smoke",
                    )
                )
                ctx.log(
                    f"shards: n={n}: {got['requests_per_task']:.2f} requests/task, busiest "
                    f"queue {got['busiest_share']:.2f} of {total} writes, idle "
                    f"{got['idle']['requests_per_idle_minute']:.0f} requests/min"
                )
                rows.append(got)
    finally:
        emulator.stop()
    return {"workers": size["workers"], "depth": size["depth"], "rows": rows}


def targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    if "skipped" in data:
        measured, met = f"skipped: {data['skipped']}", False
    else:
        bits = [
            f"{r['shards']} shard(s): busiest queue {r['busiest_share']:.2f} of the writes, "
            f"{r['requests_per_task']:.2f} requests/task, idle "
            f"{r['idle']['requests_per_idle_minute']:.0f}/min"
            for r in data["rows"]
        ]
        measured = "; ".join(bits)
        # Spread: the busiest of n shards takes at most twice its fair share.
        met = all(r["busiest_share"] <= 2 / r["shards"] for r in data["rows"] if r["shards"] > 1)
    return [
        {
            "id": 19,
            "figure": NAME,
            "title": "a sharded queue spreads its writes over its shards' prefixes (S3)",
            "goal": "the busiest of n shards takes <= 2/n of the queue's writes",
            "measured": measured,
            "met": met,
        }
    ]


def markdown(data: dict[str, Any]) -> str:
    if "skipped" in data:
        return f"skipped ({data['skipped']})"
    rows = [
        [
            r["shards"],
            r["tasks"],
            f"{r['requests_per_task']:.2f}",
            f"{r['busiest_share']:.2f}",
            ", ".join(f"{q} {c}" for q, c in r["writes_by_queue"].items()),
            f"{r['idle']['requests_per_idle_minute']:.0f}",
            f"{r['idle']['pickup_p50_ms']:.0f}",
            ", ".join(f"{op.split(' ', 1)[1]} {n:.2f}" for op, n in r["by_operation"].items()),
        ]
        for r in data["rows"]
    ]
    return (
        f"S3 (moto), {data['workers']} worker(s) (concurrency {fleet.CONCURRENCY}) draining a "
        f"queue {data['depth']:,} deep, a steady stretch as in `fleet`; writes (PUT, DELETE, "
        "each key of a DeleteObjects) of the producer and the workers counted by storage "
        "queue; then one idle worker.\n\n"
        + md_table(
            [
                "shards",
                "tasks",
                "requests/task",
                "busiest queue's share of writes",
                "writes by queue",
                "idle requests/min",
                "pick-up p50 ms",
                "requests/task by operation",
            ],
            rows,
        )
    )
