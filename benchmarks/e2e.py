"""Figure group "e2e": tasks/s through the worker on local disk.

In a fresh process: ``AsyncFileBackend(dir, events=...)`` enqueues N tasks of the no-op
``benchmarks.tasks:noop`` (a plain function, so it runs in the worker's thread pool as user
code would), then an ``AsyncWorker`` with concurrency 1, 8 or 32 in burst mode drains them:
claim, run, write the result, ack (and the started/succeeded events when events are on).
Events are off, on (each written before the call returns: the default) or batched
(``event_flush_interval=0.05``: the background writer's batch files). The drain ends when the
worker has counted N successes. Configurations are interleaved, repetitions rotate their
order; medians. With events on or batched, the event writer's pending events are flushed
inside each timed window (enqueue, drain), so its deferred writes are counted.

Enqueue is also timed interleaved, in two more children per repetition: two backends in
sibling directories, events off and on (then off and batched), take turns enqueuing ``CHUNK``
tasks each, the first of the two alternating (and the pairs' order changing every
repetition), until each has N; the batched one flushes its writer at the end of each of its
turns (inside its time: batches of ``CHUNK`` events, no bigger than its 50 ms would make). A disk whose create rate swings 4-7x within a minute
(``/tmp`` here) then slows both alike, where the drain children's enqueue figures, minutes
apart, swing with it. The pairs are timed apart because a third backend writing a file and a
link per event slowed the disk for whoever came after it: with the three modes in one child
and a rotation of one order, "batched" always came right after "on" (a script measured
batched/off 0.44-0.54x that way, 0.67-0.70x with every order, 0.90-0.94x with the two alone,
in the same hour).

Issue 13 target 2 (id 14): events on cost at most 25 % of the drain tasks/s and enqueue
keeps >= 0.8x (the interleaved enqueue; ratios of the same repetition), and event queries of the layout that way
writes are as fast as with the one-file-per-event layout (met if one way to write meets all
three). The queries are timed in one more child: N tasks' events (enqueued, started,
succeeded) written as single files with ``log`` and task ids of our own (a directory per
task: the layout when the issue was filed), and with ULID ids, each made as its task's first
event is written, as ``backend.enqueue`` makes them, through ``submit`` (batches: what the
backend and worker write with ``event_flush_interval``) and with ``log`` (events on: the
index grouped by 4 ms of ids), and once more through ``submit`` with the batches indexed as
on object stores, a directory per task and a link per task a batch ("per-task": not a mode
users choose; it shows what a query by task as fast as a directory per task would cost the
batched writes on a local disk); then the median of ``query(task_id=...)`` over 200 tasks,
and ``query(since, until)`` over a 10 % window and over everything.
"""

from __future__ import annotations

import asyncio
import os
import random
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
    plt,
    ratio,
    run_children,
    summary,
)

NAME = "e2e"

SIZES = {"smoke": {"n": 30}, "quick": {"n": 500}, "full": {"n": 2000}}
CONCURRENCY = (1, 8, 32)
FUNC = "benchmarks.tasks:noop"
LAYOUTS = ("files", "batches", "grouped", "per-task")  # see query_child
EVENTS = ("off", "on", "batched")
FLUSH_INTERVAL = 0.05  # event_flush_interval of the batched mode
CHUNK = 250  # tasks a backend enqueues in one turn of the interleaved enqueue


def event_settings(mode: str) -> dict[str, Any]:
    """``AsyncFileBackend`` settings of an events mode (one of ``EVENTS``)."""
    batched = {"event_flush_interval": FLUSH_INTERVAL} if mode == "batched" else {}
    return {"events": mode != "off", **batched}


def child(path: str, n: int, concurrency: int, events: str, *, ready: Any) -> dict[str, Any]:
    import anyio

    from omniq.backend.file import AsyncFileBackend

    async def main() -> dict[str, Any]:
        backend = AsyncFileBackend(path, **event_settings(events))
        ready()
        t0 = time.monotonic()
        await enqueue_range(backend, FUNC, 0, n)
        t1 = time.monotonic()
        worker = burst_worker(backend, concurrency, schedules=True)
        finished: dict[str, float] = {}
        t2 = time.monotonic()
        stats = await drain_timed(backend, worker, n, lambda: finished.update(at=time.monotonic()))
        await backend.close()
        return {
            "enqueue_s": t1 - t0,
            "drain_s": finished["at"] - t2,
            "stats": stats,
            "max_running": worker.max_running,
        }

    return anyio.run(main)


def enqueue_child(path: str, n: int, mode: str, off_first: bool, *, ready: Any) -> dict[str, Any]:
    """Enqueue/s of events off and ``mode``, interleaved (see the module docstring)."""
    import anyio

    from omniq.backend.file import AsyncFileBackend

    async def main() -> dict[str, Any]:
        pair = ("off", mode)
        backends = {m: AsyncFileBackend(os.path.join(path, m), **event_settings(m)) for m in pair}
        spent = dict.fromkeys(pair, 0.0)
        ready()
        for turn, start in enumerate(range(0, n, CHUNK)):
            for m in pair if (turn % 2 == 0) == off_first else pair[::-1]:
                backend = backends[m]
                t0 = time.monotonic()
                await enqueue_range(backend, FUNC, start, min(n, start + CHUNK))
                spent[m] += time.monotonic() - t0
        for backend in backends.values():
            await backend.close()
        return {"enqueue_per_s": {m: n / spent[m] for m in pair}}

    return anyio.run(main)


async def _write_event(s: Any, event: Any, *, batches: bool) -> None:
    if batches:
        await s.submit(event)
        if s.pending % 64 == 0:
            await asyncio.sleep(0)  # let the timer writer run as in a worker
    else:
        await s.log(event)


def query_child(path: str, n: int, *, ready: Any) -> dict[str, Any]:
    """Event queries over the three layouts (see the module docstring)."""
    from datetime import timedelta

    from omniq.core.models import EventType, TaskEvent, new_id
    from omniq.storage.file.events import AsyncFileEventStorage

    kinds = (EventType.STARTED, EventType.SUCCEEDED)

    async def main() -> dict[str, Any]:
        out: dict[str, Any] = {}
        ready()
        for layout in LAYOUTS:
            s = AsyncFileEventStorage(os.path.join(path, layout))
            batches = layout in ("batches", "per-task")
            if layout == "per-task":  # the index of object stores: a directory per task
                s._grouped = False
            # Producer, then worker order: enqueued events first, started/succeeded after.
            tasks, events = [], []
            t0 = time.perf_counter()
            for i in range(n):
                tasks.append(f"task{i:06d}" if layout == "files" else new_id())
                events.append(TaskEvent(task_id=tasks[-1], type=EventType.ENQUEUED))
                await _write_event(s, events[-1], batches=batches)
            for t in tasks:
                for kind in kinds:
                    events.append(TaskEvent(task_id=t, type=kind))
                    await _write_event(s, events[-1], batches=batches)
            await s.flush()
            write_s = time.perf_counter() - t0
            first, last = events[0].time, events[-1].time
            picks = random.Random(1).sample(tasks, min(200, n))
            by_task = []
            for t in picks:
                q0 = time.perf_counter()
                got = await s.query(task_id=t)
                by_task.append(time.perf_counter() - q0)
                assert len(got) == 3, (layout, t, len(got))
            span = last - first
            since = first + span * 0.45
            q0 = time.perf_counter()
            window = await s.query(since=since, until=since + span * 0.1)
            window_s = time.perf_counter() - q0
            q0 = time.perf_counter()
            everything = await s.query(until=last + timedelta(seconds=1))
            all_s = time.perf_counter() - q0
            assert len(everything) == len(events), (layout, len(everything))
            out[layout] = {
                "write_per_s": len(events) / write_s,
                "by_task_ms": (median(by_task) or 0) * 1000,
                "window_ms": window_s * 1000,
                "window_events": len(window),
                "all_ms": all_s * 1000,
                "files": sum(len(f) for _, _, f in os.walk(os.path.join(path, layout))),
            }
            await s.close()
        return out

    return asyncio.run(main())


def run(ctx: Context) -> dict[str, Any]:
    n = ctx.size(SIZES)["n"]
    configs = [(c, e) for e in EVENTS for c in CONCURRENCY]
    raw: dict[str, list[dict[str, Any]]] = {}
    for rep in range(ctx.repeat):
        order = configs[rep % len(configs) :] + configs[: rep % len(configs)]
        for concurrency, events in order:
            key = f"c{concurrency}-events-{events}"
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
                f"e2e rep {rep + 1}/{ctx.repeat} {key:22} enqueue {got['enqueue_per_s']:6.0f}/s"
                f"  drain {got['drain_per_s']:6.0f}/s  (max running {got['max_running']})"
            )
            raw.setdefault(key, []).append(got)
    interleaved: dict[str, list[dict[str, float]]] = {m: [] for m in EVENTS[1:]}
    for rep in range(ctx.repeat):
        # Which pair runs first, and which of a pair goes first, change every repetition.
        for mode in EVENTS[1:] if rep % 2 == 0 else EVENTS[:0:-1]:
            with ctx.scratch(ctx.disk_base, f"e2e-enqueue-{mode}") as path:
                (got,) = run_children(enqueue_child, [(path, n, mode, rep % 2 == 0)])
            per_s = got["enqueue_per_s"]
            ctx.log(
                f"e2e interleaved enqueue rep {rep + 1}/{ctx.repeat}: "
                + ", ".join(f"{m} {per_s[m]:.0f}/s" for m in per_s)
            )
            interleaved[mode].append(per_s)
    enqueue_ratio = {m: summary([r[m] / r["off"] for r in runs]) for m, runs in interleaved.items()}
    enqueue_per_s = {m: summary([r[m] for r in runs]) for m, runs in interleaved.items()}
    enqueue_per_s["off"] = summary([r["off"] for runs in interleaved.values() for r in runs])
    queries = []
    for rep in range(ctx.repeat):
        with ctx.scratch(ctx.disk_base, "e2e-queries") as path:
            (got,) = run_children(query_child, [(path, n)])
        ctx.log(
            f"e2e queries rep {rep + 1}/{ctx.repeat}: by task ({', '.join(LAYOUTS)}) "
            + ", ".join(f"{got[layout]['by_task_ms']:.3f}" for layout in LAYOUTS)
            + " ms; all "
            + ", ".join(f"{got[layout]['all_ms']:.0f}" for layout in LAYOUTS)
            + " ms"
        )
        queries.append(got)
    table = {}
    for key, runs in raw.items():
        table[key] = {
            "concurrency": int(key[1:].split("-")[0]),
            "events": key.rsplit("-", 1)[1],
            "drain_per_s": summary([r["drain_per_s"] for r in runs]),
            "enqueue_per_s": summary([r["enqueue_per_s"] for r in runs]),
            "e2e_per_s": summary([r["e2e_per_s"] for r in runs]),
            "max_running": max(r["max_running"] for r in runs),
            "succeeded": [r["stats"]["succeeded"] for r in runs],
            "rss_mib": median(r["maxrss_kb"] / 1024 for r in runs),
        }
    # Events on (or batched) / off of the same repetition.
    ratios = {
        mode: {
            f"c{c}": {
                what: paired_ratios(raw[f"c{c}-events-{mode}"], raw[f"c{c}-events-off"], what)
                for what in ("drain_per_s", "enqueue_per_s")
            }
            for c in CONCURRENCY
        }
        for mode in EVENTS[1:]
    }
    query_table = {
        layout: {
            field: summary([q[layout][field] for q in queries])
            for field in ("write_per_s", "by_task_ms", "window_ms", "all_ms", "files")
        }
        for layout in LAYOUTS
    }
    return {
        "n": n,
        "repeat": ctx.repeat,
        "func": FUNC,
        "results": table,
        "events_ratio": ratios,
        "enqueue_interleaved": {
            "per_s": {m: enqueue_per_s[m] for m in EVENTS},
            "ratio": enqueue_ratio,
        },
        "queries": query_table,
    }


def targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    res = data["results"]
    bits = [
        f"c={v['concurrency']} events {v['events']}: {fmt(v['drain_per_s']['median'])}/s"
        for v in res.values()
    ]
    ok = all(all(s == data["n"] for s in v["succeeded"]) for v in res.values())
    q = data["queries"]
    drain = {
        m: {c: r["drain_per_s"]["median"] for c, r in data["events_ratio"][m].items()}
        for m in EVENTS[1:]
    }
    # Enqueue does not depend on the worker's concurrency: the interleaved child's ratio.
    enqueue = {m: data["enqueue_interleaved"]["ratio"][m]["median"] for m in EVENTS[1:]}
    # What each mode writes (OmniQ's ids: ``log`` when on, ``submit`` when batched) against
    # the layout when the issue was filed.
    written_as = {"on": "grouped", "batched": "batches"}
    slower = {
        m: {
            what: ratio(q[written_as[m]][what]["median"], q["files"][what]["median"])
            for what in ("by_task_ms", "window_ms", "all_ms")
        }
        for m in EVENTS[1:]
    }
    # Queries "as fast as today": within 1.25x of the one-file-per-event layout (noise).
    met_by = [
        m
        for m in EVENTS[1:]
        if all(v is not None and v >= 0.75 for v in drain[m].values())
        and enqueue[m] is not None
        and enqueue[m] >= 0.8
        and all(v is not None and v <= 1.25 for v in slower[m].values())
    ]
    ratio_text = "; ".join(
        f"{m}: drain "
        + " ".join(f"{c} {fmt(v, 2)}x" for c, v in drain[m].items())
        + f", enqueue (interleaved) {fmt(enqueue[m], 2)}x"
        + ", query time / a directory per task: by task "
        + f"{fmt(slower[m]['by_task_ms'], 2)}x, 10 % window {fmt(slower[m]['window_ms'], 2)}x, "
        + f"all {fmt(slower[m]['all_ms'], 2)}x"
        for m in EVENTS[1:]
    )
    return [
        {
            "id": 14,
            "figure": NAME,
            "title": "events that cost little (issue 13 target 2)",
            "goal": "events on, written at once (the default) or batched "
            "(event_flush_interval): drain >= 0.75x and enqueue >= 0.8x of events off; "
            "event queries by task / by time no slower than one file per event",
            "measured": f"of events off: {ratio_text}"
            + f" (met by: {', '.join(met_by) or 'neither'})",
            "met": bool(met_by),
        },
        {
            "id": 7,
            "figure": NAME,
            "title": "end to end through the worker (local disk)",
            "goal": "report tasks/s at concurrency 1, 8, 32, events off, on and batched "
            "(no threshold)",
            "measured": "; ".join(bits) + ("" if ok else "; SOME TASKS DID NOT SUCCEED"),
            "met": ok,
        },
    ]


def markdown(data: dict[str, Any]) -> str:
    rows = []
    for _key, v in sorted(
        data["results"].items(),
        key=lambda kv: (EVENTS.index(kv[1]["events"]), kv[1]["concurrency"]),
    ):
        rows.append(
            [
                v["concurrency"],
                v["events"],
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
        + _queries_markdown(data)
    )


def _queries_markdown(data: dict[str, Any]) -> str:
    q, inter = data["queries"], data["enqueue_interleaved"]
    rows = []
    for field, label in (
        ("write_per_s", "events written/s"),
        ("by_task_ms", "query(task_id) ms, median of 200"),
        ("window_ms", "query(since, until) 10 % window ms"),
        ("all_ms", "query() everything ms"),
        ("files", "files on disk"),
    ):
        a, *others = (q[layout][field]["median"] for layout in LAYOUTS)
        rows.append(
            [label, fmt(a, 2), *(fmt(v, 2) for v in others), *(fmt(ratio(v, a), 2) for v in others)]
        )
    ratio_rows = [
        [c, m, fmt(r["drain_per_s"]["median"], 2), fmt(r["enqueue_per_s"]["median"], 2)]
        for m, by_c in data["events_ratio"].items()
        for c, r in by_c.items()
    ]
    return (
        "\n\nEvents on / off and batched / off (`event_flush_interval` "
        f"{FLUSH_INTERVAL} s), median of per-repetition ratios:\n\n"
        + md_table(["concurrency", "events", "drain / off", "enqueue / off"], ratio_rows)
        + f"\n\nEnqueue interleaved (events off and one other mode taking turns of {CHUNK} "
        "tasks; the batched one flushes at the end of each turn), median of "
        f"{data['repeat']} repetitions (events off: of both pairs' runs; each ratio is to the "
        "off of its own pair):\n\n"
        + md_table(
            ["events", "enqueue/s", "/ off (median of per-repetition ratios)"],
            [
                [
                    m,
                    fmt(inter["per_s"][m]["median"]),
                    "" if m == "off" else fmt(inter["ratio"][m]["median"], 2),
                ]
                for m in EVENTS
            ],
        )
        + f"\n\nEvent queries over {data['n']:,} tasks x 3 events: one file per event with a "
        "directory per task (`log`, ids of our own: the layout when issue 13 was filed), and "
        "with OmniQ's ULID ids, each made as its task's first event is written, in batches "
        "(`submit`: what the backend and worker write with `event_flush_interval`) and one "
        "file per event (`log`: events on; the index grouped by 4 ms of ids); per-task: the "
        "same batches indexed as on object stores, a directory per task and a link per task "
        "a batch (what a query by task as fast as a directory per task would cost the writes "
        "on a local disk):\n\n"
        + md_table(
            ["", *LAYOUTS, *(f"{layout} / files" for layout in LAYOUTS[1:])],
            rows,
        )
    )


def chart(data: dict[str, Any], out_dir: str) -> list[str]:
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(6.5, 4.2))
    width = 0.27
    for k, events in enumerate(EVENTS):
        values = [
            data["results"][f"c{c}-events-{events}"]["drain_per_s"]["median"] or 0
            for c in CONCURRENCY
        ]
        ax.bar(
            [i + (k - 1) * width for i in range(len(CONCURRENCY))],
            values,
            width,
            label=f"events {events}",
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
