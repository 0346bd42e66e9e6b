"""Figure group "pickup": how soon an idle worker starts a new task, and what idling costs.

Two worker processes idle side by side on their own local-disk directories: one whose queue
watches its directory (``AsyncFileQueue(watch=True)``, the default: inotify wakes a waiting
``dequeue``) and one that only polls (``watch=False``: the poll pause starts at
``poll_interval`` 0.2 s and the worker's ``dequeue(wait=0.5)`` restarts it every 0.5 s). Each
is an ``AsyncWorker`` from ``backend.worker(...)``: concurrency 8, not burst, events off,
results on, every other option at its default.

This process is the producer. Before the workers start it enqueues one seed task per queue,
so the queue's directories exist when a worker first waits (see the README: a watch armed
while ``ready/`` and its priority directory are being created misses the latter and falls
back to polling for good). After a few untimed warm-up tasks it measures each worker's
CPU time (``/proc/<pid>/stat`` utime + stime) over an idle window with no tasks. Then it
enqueues N tasks per configuration, one at a time, alternating between the two in a random
order per round, each after an idle gap of 0.2-0.6 s, and waits for each result before the
next gap. The task (``benchmarks.tasks:stamp``, a plain function) returns ``time.time()``
when it starts:

- pick-up = start stamp - ``time.time()`` taken right after ``backend.enqueue`` returned (the
  task file is visible from slightly before that: a pick-up can be a few µs negative);
- result visible = when this process first read the result (read every 1 ms) - the same time;
- enqueue call = how long ``backend.enqueue`` took.

Both clocks are ``time.time()`` on the same machine.
"""

from __future__ import annotations

import contextlib
import os
import queue as _queue
import random
import time
import traceback
from typing import Any

from .common import SPAWN, Context, fmt, md_table, percentile, plt, ratio

NAME = "pickup"

SIZES = {
    "smoke": {"n": 4, "idle_s": 1.0, "warmup": 2},
    "quick": {"n": 60, "idle_s": 5.0, "warmup": 3},
    "full": {"n": 200, "idle_s": 5.0, "warmup": 3},
}
CONFIGS = ("watch", "poll")  # watch=True (the default), watch=False (poll only)
FUNC = "benchmarks.tasks:stamp"
GAP = (0.2, 0.6)  # idle seconds before each task
CONCURRENCY = 8
RESULT_POLL = 0.001  # the producer reads the result every 1 ms
TASK_TIMEOUT = 15.0
P50_TARGET_MS = 10.0
CPU_TARGET_PCT = 1.0


# --------------------------------------------------------------------------- worker child
def worker_child(path: str, watch: bool, tag: str, messages: Any, stop: Any) -> None:
    """A worker on ``path`` until ``stop`` is set; reports ("ready", pid), then ("done", ...)."""
    try:
        import anyio
        import anyio.to_thread

        from omniq.backend.file import AsyncFileBackend
        from omniq.storage.file.queue import AsyncFileQueue

        async def main() -> dict[str, Any]:
            backend = AsyncFileBackend(path, events=False, results=True)
            if not watch:
                # AsyncFileBackend has no option for the queue's ``watch``: give it a queue
                # built as its own, but polling only.
                cfg = backend.config
                part = cfg.part("queue")
                default = backend.queue
                backend.queue = AsyncFileQueue(
                    part.base_dir,
                    part.storage_options,
                    lease=cfg.lease,
                    clock_skew=cfg.clock_skew,
                    on_event=backend._queue_event,
                    watch=False,
                )
                await default.close()
            worker = backend.worker("default", concurrency=CONCURRENCY, handle_signals=False)
            assert worker.queue.watch is watch

            async def stopper() -> None:
                # A blocked thread, not a poll: costs the idle worker no CPU.
                await anyio.to_thread.run_sync(stop.wait, abandon_on_cancel=True)
                worker.stop()

            async with anyio.create_task_group() as tg:
                tg.start_soon(stopper)
                messages.put(("ready", tag, os.getpid()))
                stats = await worker.run()
                tg.cancel_scope.cancel()
            await backend.close()
            return stats

        stats = anyio.run(main)
        messages.put(("done", tag, {"stats": stats}))
    except BaseException:  # reported to the parent, which raises
        messages.put(("error", tag, traceback.format_exc()))


def cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is the state (field 3 of stat(5)): utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- producer
async def _one(backend: Any, i: int) -> dict[str, Any] | None:
    import anyio

    t0 = time.time()
    task_id = await backend.enqueue(FUNC, args=[i])
    t1 = time.time()
    while True:
        result = await backend.results.get(task_id)
        t2 = time.time()
        if result is not None:
            break
        if t2 - t1 > TASK_TIMEOUT:
            return None
        await anyio.sleep(RESULT_POLL)
    if not result.ok:
        raise RuntimeError(f"task {task_id} failed: {result.error}")
    started = float(result.value)
    return {
        "pickup": started - t1,
        "pickup_from_call": started - t0,
        "visible": t2 - t1,
        "enqueue": t1 - t0,
    }


async def _seed(paths: dict[str, str]) -> None:
    """One task per queue before its worker starts: creates the queue's directories."""
    from omniq.backend.file import AsyncFileBackend

    for path in paths.values():
        backend = AsyncFileBackend(path, events=False)
        await backend.enqueue(FUNC, args=[0])
        await backend.close()


async def _produce(
    paths: dict[str, str], pids: dict[str, int], size: dict[str, Any], ctx: Context
) -> dict[str, Any]:
    import anyio

    from omniq.backend.file import AsyncFileBackend

    rng = random.Random(13)
    backends = {c: AsyncFileBackend(paths[c], events=False) for c in CONFIGS}
    samples: dict[str, list[dict[str, Any]]] = {c: [] for c in CONFIGS}
    lost = {c: 0 for c in CONFIGS}
    try:
        # Warm-up: both workers are running, their first reaper pass and (watch) inotify
        # watch are set up.
        for i in range(size["warmup"]):
            for c in CONFIGS:
                if await _one(backends[c], -1 - i) is None:
                    raise RuntimeError(f"pickup: warm-up task of {c!r} not done in time")
                await anyio.sleep(0.1)
        await anyio.sleep(1.0)
        before = {c: cpu_seconds(pids[c]) for c in CONFIGS}
        w0 = time.monotonic()
        await anyio.sleep(size["idle_s"])
        window = time.monotonic() - w0
        idle = {
            c: {
                "cpu_s": cpu_seconds(pids[c]) - before[c],
                "window_s": window,
            }
            for c in CONFIGS
        }
        for c in CONFIGS:
            idle[c]["cpu_pct"] = 100.0 * idle[c]["cpu_s"] / window
        ctx.log(
            "pickup: idle CPU over "
            f"{window:.1f}s: " + ", ".join(f"{c} {idle[c]['cpu_pct']:.2f} %" for c in CONFIGS)
        )
        for i in range(size["n"]):
            order = list(CONFIGS)
            rng.shuffle(order)
            for c in order:
                await anyio.sleep(rng.uniform(*GAP))
                got = await _one(backends[c], i)
                if got is None:
                    lost[c] += 1
                else:
                    samples[c].append(got)
            if (i + 1) % max(1, size["n"] // 5) == 0:
                ctx.log(
                    f"pickup: {i + 1}/{size['n']} rounds; p50 so far "
                    + ", ".join(
                        f"{c} {fmt(_ms([s['pickup'] for s in samples[c]], 50), 1)} ms"
                        for c in CONFIGS
                    )
                )
    finally:
        for b in backends.values():
            await b.close()
    return {"samples": samples, "lost": lost, "idle": idle}


def _ms(values: list[float], q: float) -> float | None:
    p = percentile(values, q)
    return None if p is None else p * 1e3


def _stats_ms(values: list[float]) -> dict[str, Any]:
    return {
        "n": len(values),
        "p50_ms": _ms(values, 50),
        "p90_ms": _ms(values, 90),
        "p99_ms": _ms(values, 99),
        "max_ms": max(values) * 1e3 if values else None,
        "mean_ms": sum(values) / len(values) * 1e3 if values else None,
    }


def run(ctx: Context) -> dict[str, Any]:
    import anyio

    size = ctx.size(SIZES)
    messages = SPAWN.Queue()
    stop = SPAWN.Event()
    with ctx.scratch(ctx.disk_base, "pickup") as base:
        paths = {c: os.path.join(base, c) for c in CONFIGS}
        anyio.run(_seed, paths)
        procs = {
            c: SPAWN.Process(
                target=worker_child,
                args=(paths[c], c == "watch", c, messages, stop),
                daemon=True,
            )
            for c in CONFIGS
        }
        for proc in procs.values():
            proc.start()
        pids: dict[str, int] = {}
        done: dict[str, dict[str, Any]] = {}

        def receive(wanted: dict[str, Any], kind: str, timeout: float) -> None:
            deadline = time.monotonic() + timeout
            while len(wanted) < len(CONFIGS):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"pickup: workers not {kind} within {timeout:.0f}s")
                try:
                    got, tag, payload = messages.get(timeout=1.0)
                except _queue.Empty:
                    dead = [c for c, p in procs.items() if c not in wanted and not p.is_alive()]
                    if dead:
                        raise RuntimeError(f"pickup: worker {dead[0]!r} died") from None
                    continue
                if got == "error":
                    raise RuntimeError(f"pickup: worker {tag!r} failed:\n{payload}")
                if got == kind:
                    wanted[tag] = payload

        try:
            receive(pids, "ready", 120.0)
            for c in CONFIGS:
                assert pids[c] == procs[c].pid
            data = anyio.run(_produce, paths, pids, size, ctx)
            stop.set()
            receive(done, "done", 60.0)
            for proc in procs.values():
                proc.join(10)
        finally:
            stop.set()
            for proc in procs.values():
                if proc.is_alive():
                    proc.kill()
                    proc.join(5)
            with contextlib.suppress(Exception):
                messages.close()
    results: dict[str, Any] = {}
    for c in CONFIGS:
        got = data["samples"][c]
        results[c] = {
            "watch": c == "watch",
            "pickup": _stats_ms([s["pickup"] for s in got]),
            "pickup_from_call": _stats_ms([s["pickup_from_call"] for s in got]),
            "visible": _stats_ms([s["visible"] for s in got]),
            "enqueue": _stats_ms([s["enqueue"] for s in got]),
            "lost": data["lost"][c],
            "idle": data["idle"][c],
            "worker_stats": done[c]["stats"],
            "samples_ms": [round(s["pickup"] * 1e3, 3) for s in got],
        }
        expected = 1 + size["warmup"] + size["n"] - data["lost"][c]  # seed, warm-up, timed
        if done[c]["stats"]["succeeded"] != expected:
            ctx.note(f"pickup {c}: worker stats {done[c]['stats']} (expected {expected} successes)")
    w, p = results["watch"], results["poll"]
    ratios = {
        key: {q: ratio(p[key][f"{q}_ms"], w[key][f"{q}_ms"]) for q in ("p50", "p90", "p99")}
        for key in ("pickup", "visible")
    }
    return {
        "n": size["n"],
        "warmup": size["warmup"],
        "idle_s": size["idle_s"],
        "gap_s": list(GAP),
        "concurrency": CONCURRENCY,
        "func": FUNC,
        "results": results,
        "poll_over_watch": ratios,
    }


# --------------------------------------------------------------------------- reporting
def targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    w, p = data["results"]["watch"], data["results"]["poll"]
    p50 = w["pickup"]["p50_ms"]
    r = data["poll_over_watch"]["pickup"]["p50"]
    cpu_w, cpu_p = w["idle"]["cpu_pct"], p["idle"]["cpu_pct"]
    lost = w["lost"] + p["lost"]
    return [
        {
            "id": 8,
            "figure": NAME,
            "title": "idle pick-up latency, local disk (issue 13)",
            "goal": f"p50 ≤ {P50_TARGET_MS:g} ms with watch on (the default)",
            "measured": (
                f"watch p50 {fmt(p50, 1)} ms (p90 {fmt(w['pickup']['p90_ms'], 1)}, p99 "
                f"{fmt(w['pickup']['p99_ms'], 1)}); polling p50 {fmt(p['pickup']['p50_ms'], 1)} "
                f"ms: {fmt(r, 1)}x; N = {w['pickup']['n']} each"
                + (f"; {lost} TASK(S) NOT DONE IN {TASK_TIMEOUT:g} s" if lost else "")
            ),
            "met": None if p50 is None else (p50 <= P50_TARGET_MS and lost == 0),
        },
        {
            "id": 9,
            "figure": NAME,
            "title": "idle worker CPU, local disk (issue 13)",
            "goal": f"≤ {CPU_TARGET_PCT:g} % of one core with watch on (the default)",
            "measured": (
                f"watch {fmt(cpu_w, 2)} %, polling {fmt(cpu_p, 2)} % of a core over "
                f"{w['idle']['window_s']:.1f} s"
            ),
            "met": cpu_w <= CPU_TARGET_PCT,
        },
    ]


def markdown(data: dict[str, Any]) -> str:
    rows = []
    for c in CONFIGS:
        v = data["results"][c]
        rows.append(
            [
                f"watch={'True' if v['watch'] else 'False'}",
                " / ".join(fmt(v["pickup"][f"{q}_ms"], 1) for q in ("p50", "p90", "p99")),
                fmt(v["pickup"]["max_ms"], 1),
                " / ".join(fmt(v["visible"][f"{q}_ms"], 1) for q in ("p50", "p90", "p99")),
                fmt(v["enqueue"]["p50_ms"], 2),
                fmt(v["idle"]["cpu_pct"], 2),
                f"{v['pickup']['n']}" + (f" ({v['lost']} lost)" if v["lost"] else ""),
            ]
        )
    r = data["poll_over_watch"]
    rows.append(
        [
            "polling ÷ watch",
            " / ".join(fmt(r["pickup"][q], 1, "x") for q in ("p50", "p90", "p99")),
            "",
            " / ".join(fmt(r["visible"][q], 1, "x") for q in ("p50", "p90", "p99")),
            "",
            "",
            "",
        ]
    )
    return (
        f"Two idle workers side by side (concurrency {data['concurrency']}, events off, "
        f"results on), local disk, queue directories created (one seed task) before the "
        f"workers start; N = {data['n']} tasks of `{data['func']}` each, one at a "
        f"time, the two interleaved, {data['gap_s'][0]:g}-{data['gap_s'][1]:g} s idle before "
        "each. pick-up = the task's start stamp - the time `enqueue` returned; result visible = "
        "first read of the result (read every 1 ms) - the same time. Idle CPU: utime + stime "
        f"of each worker process over {data['idle_s']:g} s with no tasks, % of one core. "
        "`--repeat` is not used: the N tasks are the samples.\n\n"
        + md_table(
            [
                "queue",
                "pick-up p50 / p90 / p99 ms",
                "max ms",
                "result visible p50 / p90 / p99 ms",
                "enqueue call p50 ms",
                "idle CPU %",
                "N",
            ],
            rows,
        )
    )


def chart(data: dict[str, Any], out_dir: str) -> list[str]:
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(6.5, 4.2))
    for c in CONFIGS:
        v = sorted(max(s, 0.01) for s in data["results"][c]["samples_ms"])
        if not v:
            continue
        ax.step(v, [(i + 1) / len(v) for i in range(len(v))], where="post", label=f"{c}")
    ax.axvline(P50_TARGET_MS, color="grey", linestyle=":", label=f"{P50_TARGET_MS:g} ms")
    ax.set_xscale("log")
    ax.set_xlabel("pick-up latency, ms (log)")
    ax.set_ylabel("fraction of tasks")
    ax.set_title(f"Idle worker pick-up, local disk, N={data['n']} each")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = os.path.join(out_dir, "pickup.png")
    fig.savefig(path, dpi=110)
    pyplot.close(fig)
    return [path]
