"""Figure group "dependencies": storage requests to wait on and release dependents.

Counted with the request counters of ``benchmarks/requests.py`` (HTTP requests on S3 via
moto, ``LocalOps`` calls on a local disk):

* ``enqueue``: a task with one dependency (still running), per task;
* ``settle``: a dependency's ack, then the look at its dependents (the flush a worker does
  at its next dequeue), releasing one dependent each: per released task, the ack included;
* ``ack alone``: the same for tasks without dependents (what dependencies cost every ack:
  the flush's LIST of ``deps/``, here once per ack, in a worker once per
  ``refresh_interval`` or when idle);
* ``fan-in``: one task waiting on 100, each dependency acked and settled on its own: per
  dependency, and for the whole release.

Run with ``python benchmarks/run.py dependencies`` (not part of ``all``).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

from .common import TOOLS, Context, md_table
from .requests import COUNTER, count_local, count_s3

NAME = "dependencies"
SIZES = {
    "smoke": {"n": 5, "fan": 10},
    "quick": {"n": 50, "fan": 100},
    "full": {"n": 100, "fan": 100},
}


async def measure(url: str, options: dict[str, Any] | None, n: int, fan: int) -> dict[str, Any]:
    from omniq.core import Task
    from omniq.storage.file.queue import AsyncFileQueue

    queue = AsyncFileQueue(url, options)
    await queue.enqueue_many([])  # the start-up probe, not counted
    COUNTER.reset()

    async def settle_each(count: int) -> None:
        for _ in range(count):
            COUNTER.phase = "claim"
            claimed = await queue.dequeue()
            assert claimed is not None
            COUNTER.phase = phase
            await queue.ack(claimed)
            await queue._settle_owed()

    COUNTER.phase = "setup"
    deps = [Task(func="bench:noop") for _ in range(n)]
    await queue.enqueue_many(deps)
    COUNTER.phase = "enqueue"
    for dep in deps:
        await queue.enqueue(Task(func="bench:noop", depends_on=[dep.id]))
    phase = "settle"
    await settle_each(n)
    COUNTER.phase = "drain"
    while claimed := await queue.dequeue():  # the released dependents
        await queue.ack(claimed)
    await queue._settle_owed()
    COUNTER.phase = "setup"
    await queue.enqueue_many([Task(func="bench:noop") for _ in range(n)])
    phase = "ack alone"
    await settle_each(n)
    COUNTER.phase = "setup"
    fan_deps = [Task(func="bench:noop") for _ in range(fan)]
    await queue.enqueue_many(fan_deps)
    COUNTER.phase = "fan-in enqueue"
    await queue.enqueue(Task(func="bench:noop", depends_on=[t.id for t in fan_deps]))
    phase = "fan-in"
    await settle_each(fan)
    released = await queue.dequeue()
    assert released is not None and released.task.depends_on
    await queue.close()
    per = {"enqueue": n, "settle": n, "ack alone": n, "fan-in enqueue": 1, "fan-in": fan}
    return {
        phase: {
            "per_item": sum(COUNTER.counts[phase].values()) / count,
            "ops": {op: c / count for op, c in sorted(COUNTER.counts[phase].items())},
        }
        for phase, count in per.items()
    } | {"fan": fan, "n": n}


def run(ctx: Context) -> dict[str, Any]:
    size = ctx.size(SIZES)
    out: dict[str, Any] = {}
    with ctx.scratch(ctx.disk_base, "dependencies") as path, count_local():
        out["local"] = asyncio.run(measure(os.path.join(path, "q"), None, size["n"], size["fan"]))
    if TOOLS not in sys.path:
        sys.path.insert(0, TOOLS)
    try:
        from emulators import EmulatorUnavailable, S3Emulator

        emulator = S3Emulator()
        emulator.start()
    except (ImportError, EmulatorUnavailable) as exc:
        out["s3"] = {"skipped": str(exc)}
        return out
    try:
        with count_s3():
            url = emulator.url(f"deps-{os.getpid()}-{time.time_ns()}")
            out["s3"] = asyncio.run(measure(url, emulator.storage_options, size["n"], size["fan"]))
    finally:
        emulator.stop()
    return out


def targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    return []


def markdown(data: dict[str, Any]) -> str:
    rows = []
    for store in ("local", "s3"):
        got = data.get(store, {"skipped": "not run"})
        if "skipped" in got:
            rows.append([store, "skipped", got["skipped"][:60], "", ""])
            continue
        for phase in ("enqueue", "settle", "ack alone", "fan-in enqueue", "fan-in"):
            block = got[phase]
            ops = ", ".join(f"{op} {c:.2f}" for op, c in block["ops"].items())
            unit = {"fan-in": "per dependency", "fan-in enqueue": "per task"}.get(phase, "per task")
            rows.append([store, phase, f"{block['per_item']:.2f}", unit, ops])
    return md_table(["store", "phase", "requests", "", "by operation"], rows)
