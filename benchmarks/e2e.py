"""Figure group "e2e": tasks/s through the worker on local disk.

In a fresh process: ``AsyncFileBackend(dir, events=on|off)`` enqueues N tasks of the no-op
``benchmarks.tasks:noop`` (a plain function, so it runs in the worker's thread pool as user
code would), then an ``AsyncWorker`` with concurrency 1, 8 or 32 in burst mode drains them:
claim, run, write the result, ack (and the started/succeeded events when events are on).
The drain ends when the worker has counted N successes. Configurations are interleaved,
repetitions rotate their order; medians.
"""

from __future__ import annotations

import os
import time
from typing import Any

from .common import Context, fmt, md_table, median, plt, run_children, summary

NAME = "e2e"

SIZES = {"smoke": {"n": 30}, "quick": {"n": 500}, "full": {"n": 2000}}
CONCURRENCY = (1, 8, 32)
FUNC = "benchmarks.tasks:noop"


def child(path: str, n: int, concurrency: int, events: bool, *, ready: Any) -> dict[str, Any]:
    import anyio

    from omniq.backend.file import AsyncFileBackend

    async def main() -> dict[str, Any]:
        backend = AsyncFileBackend(path, events=events)
        ready()
        t0 = time.monotonic()
        for i in range(n):
            await backend.enqueue(FUNC, args=[i])
        t1 = time.monotonic()
        worker = backend.worker(
            "default",
            concurrency=concurrency,
            burst=True,
            idle_timeout=0.2,
            poll=0.2,
            handle_signals=False,
        )
        finished: dict[str, float] = {}

        async def watch() -> None:
            while worker.stats["succeeded"] + worker.stats["failed"] < n:
                await anyio.sleep(0.002)
            finished["at"] = time.monotonic()

        t2 = time.monotonic()
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            stats = await worker.run()
        await backend.close()
        return {
            "enqueue_s": t1 - t0,
            "drain_s": finished["at"] - t2,
            "stats": stats,
            "max_running": worker.max_running,
        }

    return anyio.run(main)


def run(ctx: Context) -> dict[str, Any]:
    n = ctx.size(SIZES)["n"]
    configs = [(c, e) for e in (False, True) for c in CONCURRENCY]
    raw: dict[str, list[dict[str, Any]]] = {}
    for rep in range(ctx.repeat):
        order = configs[rep % len(configs) :] + configs[: rep % len(configs)]
        for concurrency, events in order:
            key = f"c{concurrency}-events-{'on' if events else 'off'}"
            with ctx.scratch(ctx.disk_base, f"e2e-{key}") as path:
                (got,) = run_children(
                    child, [(os.path.join(path, "omniq"), n, concurrency, events)]
                )
            if got["stats"]["succeeded"] != n:
                ctx.note(f"e2e {key}: {got['stats']} (expected {n} successes)")
            got["drain_per_s"] = n / got["drain_s"]
            got["enqueue_per_s"] = n / got["enqueue_s"]
            got["e2e_per_s"] = n / (got["enqueue_s"] + got["drain_s"])
            ctx.log(
                f"e2e rep {rep + 1}/{ctx.repeat} {key:18} enqueue {got['enqueue_per_s']:6.0f}/s"
                f"  drain {got['drain_per_s']:6.0f}/s  (max running {got['max_running']})"
            )
            raw.setdefault(key, []).append(got)
    table = {}
    for key, runs in raw.items():
        table[key] = {
            "concurrency": int(key[1:].split("-")[0]),
            "events": key.endswith("on"),
            "drain_per_s": summary([r["drain_per_s"] for r in runs]),
            "enqueue_per_s": summary([r["enqueue_per_s"] for r in runs]),
            "e2e_per_s": summary([r["e2e_per_s"] for r in runs]),
            "max_running": max(r["max_running"] for r in runs),
            "succeeded": [r["stats"]["succeeded"] for r in runs],
            "rss_mib": median(r["maxrss_kb"] / 1024 for r in runs),
        }
    return {"n": n, "repeat": ctx.repeat, "func": FUNC, "results": table}


def targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    res = data["results"]
    bits = [
        f"c={v['concurrency']} events {'on' if v['events'] else 'off'}: "
        f"{fmt(v['drain_per_s']['median'])}/s"
        for v in res.values()
    ]
    ok = all(all(s == data["n"] for s in v["succeeded"]) for v in res.values())
    return [
        {
            "id": 7,
            "figure": NAME,
            "title": "end to end through the worker (local disk)",
            "goal": "report tasks/s at concurrency 1, 8, 32, events on and off (no threshold)",
            "measured": "; ".join(bits) + ("" if ok else "; SOME TASKS DID NOT SUCCEED"),
            "met": ok,
        }
    ]


def markdown(data: dict[str, Any]) -> str:
    rows = []
    for _key, v in sorted(
        data["results"].items(), key=lambda kv: (kv[1]["events"], kv[1]["concurrency"])
    ):
        rows.append(
            [
                v["concurrency"],
                "on" if v["events"] else "off",
                fmt(v["enqueue_per_s"]["median"]),
                fmt(v["drain_per_s"]["median"]),
                fmt(v["e2e_per_s"]["median"]),
                v["max_running"],
                fmt(v["rss_mib"], 1),
            ]
        )
    return (
        f"N = {data['n']:,} tasks of `{data['func']}` per run, {data['repeat']} repetitions, "
        "medians. drain = claim + run + result + ack (+ events); e2e = N / (enqueue time + "
        "drain time).\n\n"
        + md_table(
            [
                "concurrency",
                "events",
                "enqueue/s (backend.enqueue)",
                "drain tasks/s",
                "enqueue+drain tasks/s",
                "max running",
                "peak RSS MiB",
            ],
            rows,
        )
    )


def chart(data: dict[str, Any], out_dir: str) -> list[str]:
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(6.5, 4.2))
    width = 0.38
    for k, events in enumerate((False, True)):
        values = [
            data["results"][f"c{c}-events-{'on' if events else 'off'}"]["drain_per_s"]["median"]
            or 0
            for c in CONCURRENCY
        ]
        ax.bar(
            [i + (k - 0.5) * width for i in range(len(CONCURRENCY))],
            values,
            width,
            label=f"events {'on' if events else 'off'}",
        )
    ax.set_xticks(range(len(CONCURRENCY)))
    ax.set_xticklabels([f"concurrency {c}" for c in CONCURRENCY])
    ax.set_ylabel("tasks/s through the worker (median)")
    ax.set_title(f"OmniQ worker, local disk, N={data['n']:,}")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = os.path.join(out_dir, "e2e.png")
    fig.savefig(path, dpi=110)
    pyplot.close(fig)
    return [path]
