"""Figure group "peers": OmniQ against Huey FileStorage, kombu's filesystem transport,
persist-queue SQLiteAckQueue and a rename floor, on local disk and on tmpfs.

For every queue: enqueue N tasks twice (one producer process each, into two directories);
dequeue + ack the first N with one consumer process, the second with two consumer processes
racing (every consumer records the ids it got: duplicates and losses are counted); peak RSS
of each child (``VmHWM``). In a repetition every queue enqueues before any consumes (see
``run``). Repetitions interleave the queues (the order rotates every repetition)
and medians are reported, plus the median of the per-repetition ratios OmniQ / peer.

Every child is a fresh ``spawn`` process that opens its queue, then waits at a barrier so
process start-up and imports are never timed.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from typing import Any

from .common import (
    Context,
    fmt,
    md_table,
    median,
    peers_available,
    plt,
    ratio,
    run_children,
    summary,
)

NAME = "peers"

SIZES = {
    "smoke": {"n": 40},
    "quick": {"n": 500},
    "full": {"n": 2000},
}

OMNIQ = ("omniq", "omniq-sync", "omniq-batch")
PEERS = ("huey", "kombu", "persist-queue")
FLOOR = "floor"
LABELS = {
    "omniq": "OmniQ AsyncFileQueue (one call at a time)",
    "omniq-sync": "OmniQ FileQueue (blocking twin)",
    "omniq-batch": "OmniQ async batch (enqueue_many + dequeue_many/ack_many of 64)",
    "huey": "Huey FileStorage",
    "kombu": "kombu filesystem transport",
    "persist-queue": "persist-queue SQLiteAckQueue",
    "floor": "rename floor (JSON file + os.rename claim)",
}
BATCH = 256
CLAIM_BATCH = 64


def _payload(i: int) -> dict[str, Any]:
    return {"id": i, "func": "bench:noop", "args": [i], "kwargs": {}}


# --------------------------------------------------------------------------- producers
def produce(peer: str, path: str, n: int, *, ready: Any) -> dict[str, Any]:
    """Enqueue tasks 0..n-1 into ``peer``'s queue at ``path``; returns the timed window."""
    if peer in ("omniq", "omniq-batch"):
        return _produce_omniq_async(peer, path, n, ready)
    if peer == "omniq-sync":
        from omniq.core import Task
        from omniq.storage.file.queue import FileQueue

        q = FileQueue(path)
        ready()
        start = time.monotonic()
        for i in range(n):
            q.enqueue(Task(func="bench:noop", args=[i]))
        end = time.monotonic()
        q.close()
        return {"start": start, "end": end}
    if peer == "huey":
        from huey.storage import FileStorage

        storage = FileStorage("bench", path)
        ready()
        start = time.monotonic()
        for i in range(n):
            storage.enqueue(json.dumps(_payload(i)).encode())
        return {"start": start, "end": time.monotonic()}
    if peer == "kombu":
        conn, q = _kombu(path)
        ready()
        start = time.monotonic()
        for i in range(n):
            q.put(_payload(i))
        end = time.monotonic()
        q.close()
        conn.release()
        return {"start": start, "end": end}
    if peer == "persist-queue":
        pq = _persist_queue(path)
        ready()
        start = time.monotonic()
        for i in range(n):
            pq.put(_payload(i))
        return {"start": start, "end": time.monotonic()}
    if peer == FLOOR:
        ready_dir = os.path.join(path, "ready")
        os.makedirs(ready_dir, exist_ok=True)
        os.makedirs(os.path.join(path, "claimed"), exist_ok=True)
        pid = os.getpid()
        ready()
        start = time.monotonic()
        for i in range(n):
            data = json.dumps(_payload(i)).encode()
            tmp = os.path.join(ready_dir, f".tmp-{uuid.uuid4().hex}")
            with open(tmp, "wb") as f:
                f.write(data)
            os.rename(tmp, os.path.join(ready_dir, f"{time.time_ns():020d}-{pid}-{i}.json"))
        return {"start": start, "end": time.monotonic()}
    raise ValueError(f"unknown queue {peer!r}")


def _produce_omniq_async(peer: str, path: str, n: int, ready: Any) -> dict[str, Any]:
    import asyncio

    from omniq.core import Task
    from omniq.storage.file.queue import AsyncFileQueue

    async def main() -> dict[str, Any]:
        q = AsyncFileQueue(path)
        await q.enqueue_many([])  # one-time start-up (store probe, imports) outside the window
        ready()
        start = time.monotonic()
        if peer == "omniq":
            for i in range(n):
                await q.enqueue(Task(func="bench:noop", args=[i]))
        else:
            for lo in range(0, n, BATCH):
                await q.enqueue_many(
                    [Task(func="bench:noop", args=[i]) for i in range(lo, min(n, lo + BATCH))]
                )
        end = time.monotonic()
        await q.close()
        return {"start": start, "end": end}

    return asyncio.run(main())


def _kombu(path: str) -> Any:
    import tempfile

    from kombu import Connection

    data = os.path.join(path, "data")
    processed = os.path.join(path, "processed")
    for d in (data, processed, os.path.join(path, "control")):
        os.makedirs(d, exist_ok=True)
    # kombu moves a message it takes into tempfile.gettempdir() (store_processed=False);
    # keep that on the same filesystem so the move is a rename, as on a real deployment.
    tempfile.tempdir = processed
    conn = Connection(
        transport="filesystem",
        transport_options={
            "data_folder_in": data,
            "data_folder_out": data,
            "control_folder": os.path.join(path, "control"),
        },
    )
    return conn, conn.SimpleQueue("bench")


def _persist_queue(path: str) -> Any:
    import persistqueue
    from persistqueue.serializers import json as pq_json

    return persistqueue.SQLiteAckQueue(
        path, auto_resume=False, multithreading=True, serializer=pq_json
    )


# --------------------------------------------------------------------------- consumers
def consume(peer: str, path: str, *, ready: Any) -> dict[str, Any]:
    """Dequeue + ack until the queue is empty; returns the timed window and the ids seen."""
    ids: list[int] = []
    errors = 0
    if peer in ("omniq", "omniq-batch"):
        return _consume_omniq_async(peer, path, ready)
    if peer == "omniq-sync":
        from omniq.storage.file.queue import FileQueue

        q = FileQueue(path)
        q.size()  # start the loop thread outside the timed part
        ready()
        start = time.monotonic()
        while (claimed := q.dequeue("default")) is not None:
            ids.append(claimed.task.args[0])
            q.ack(claimed)
        end = time.monotonic()
        q.close()
    elif peer == "huey":
        from huey.storage import FileStorage

        storage = FileStorage("bench", path)
        ready()
        start = time.monotonic()
        while (data := storage.dequeue()) is not None:
            ids.append(json.loads(data)["id"])
        end = time.monotonic()
    elif peer == "kombu":
        conn, q = _kombu(path)
        ready()
        start = time.monotonic()
        while True:
            try:
                message = q.get(block=False)
            except q.Empty:
                break
            ids.append(message.payload["id"])
            message.ack()
        end = time.monotonic()
        q.close()
        conn.release()
    elif peer == "persist-queue":
        import sqlite3

        import persistqueue

        pq = _persist_queue(path)
        ready()
        start = time.monotonic()
        while True:
            try:
                item = pq.get(block=False, raw=True)
            except persistqueue.Empty:
                break
            except sqlite3.OperationalError:  # "database is locked" under contention
                errors += 1
                continue
            ids.append(item["data"]["id"])
            try:
                pq.ack(id=item["pqid"])
            except sqlite3.OperationalError:
                errors += 1
        end = time.monotonic()
    elif peer == FLOOR:
        ready_dir = os.path.join(path, "ready")
        claimed_dir = os.path.join(path, "claimed")
        ready()
        start = time.monotonic()
        while True:
            names = sorted(n for n in os.listdir(ready_dir) if not n.startswith("."))
            if not names:
                break
            for name in names:
                target = os.path.join(claimed_dir, name)
                try:
                    os.rename(os.path.join(ready_dir, name), target)
                except FileNotFoundError:
                    continue  # the other consumer took it
                with open(target, "rb") as f:
                    ids.append(json.loads(f.read())["id"])
                os.unlink(target)
        end = time.monotonic()
    else:
        raise ValueError(f"unknown queue {peer!r}")
    return {"start": start, "end": end, "ids": ids, "errors": errors}


def _consume_omniq_async(peer: str, path: str, ready: Any) -> dict[str, Any]:
    import asyncio

    from omniq.storage.file.queue import AsyncFileQueue

    async def main() -> dict[str, Any]:
        q = AsyncFileQueue(path)
        # One-time start-up outside the window: the store probe, and the first reaper pass
        # (it scans in a worker thread: starting the pool and importing its modules).
        await q.enqueue_many([])
        await q.reap("default")
        ids: list[int] = []
        ready()
        start = time.monotonic()
        if peer == "omniq":
            while (claimed := await q.dequeue("default")) is not None:
                ids.append(claimed.task.args[0])
                await q.ack(claimed)
        else:
            while claims := await q.dequeue_many(CLAIM_BATCH, "default"):
                ids.extend(c.task.args[0] for c in claims)
                await q.ack_many(claims)
        end = time.monotonic()
        await q.close()
        return {"start": start, "end": end, "ids": ids, "errors": 0}

    return asyncio.run(main())


# --------------------------------------------------------------------------- scenario
def _check(ids: list[int], n: int) -> dict[str, int]:
    seen = set(ids)
    expected = set(range(n))
    return {
        "duplicates": len(ids) - len(seen),
        "lost": len(expected - seen),
        "foreign": len(seen - expected),
    }


def produce_both(
    ctx: Context, stack: contextlib.ExitStack, peer: str, base: str, n: int
) -> list[tuple[str, dict[str, Any]]]:
    """One repetition's two enqueues of one queue on one filesystem, each into its own
    scratch directory (kept open on ``stack`` for ``consume_both``)."""
    made: list[tuple[str, dict[str, Any]]] = []
    for _ in range(2):
        path = stack.enter_context(ctx.scratch(base, peer))
        (p,) = run_children(produce, [(peer, path, n)])
        made.append((path, p))
    return made


def consume_both(peer: str, made: list[tuple[str, dict[str, Any]]], n: int) -> dict[str, Any]:
    """The tasks of ``produce_both`` dequeued + acked: the first lot by one consumer, the
    second by two racing."""
    (path, p), (path2, p2) = made
    (c,) = run_children(consume, [(peer, path)])
    out: dict[str, Any] = {
        "enqueue_per_s": n / (p["end"] - p["start"]),
        "consume1_per_s": n / (c["end"] - c["start"]),
        "consume1_check": _check(c["ids"], n),
        "rss_kb": {"producer": p["maxrss_kb"], "consumer": c["maxrss_kb"]},
    }
    cs = run_children(consume, [(peer, path2), (peer, path2)])
    out["enqueue2_per_s"] = n / (p2["end"] - p2["start"])
    window = max(c["end"] for c in cs) - min(c["start"] for c in cs)
    all_ids = [i for c in cs for i in c["ids"]]
    out["consume2_per_s"] = n / window
    out["consume2_check"] = _check(all_ids, n)
    out["consume2_split"] = [len(c["ids"]) for c in cs]
    out["consume2_errors"] = sum(c["errors"] for c in cs)
    out["rss_kb"]["racing_consumer_max"] = max(c["maxrss_kb"] for c in cs)
    return out


def run(ctx: Context) -> dict[str, Any]:
    n = ctx.size(SIZES)["n"]
    available = peers_available()
    queues = list(OMNIQ) + [p for p in PEERS if available[p]] + [FLOOR]
    missing = [p for p in PEERS if not available[p]]
    if missing:
        ctx.note(
            f"peers not installed, skipped: {', '.join(missing)} "
            "(use `hatch run bench:...` to include them)"
        )
    reps: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for rep in range(ctx.repeat):
        order = queues[rep % len(queues) :] + queues[: rep % len(queues)]
        for label, base in ctx.filesystems():
            # Every queue's enqueues first, then every queue's consumers: a consumer that
            # deletes its files as it acks (the floor, Huey, kombu) slowed the next queue's
            # file creations to ~1,000 a second (ext4's recently freed inodes, see
            # ``Context.absorb_deletions``), and a dequeue + ack creates no inode.
            absorbed = ctx.absorb_deletions(base)  # the last repetition's consumers deleted
            if absorbed:
                ctx.log(f"peers rep {rep + 1}/{ctx.repeat} {label:5} {absorbed} files absorbed")
            with contextlib.ExitStack() as stack:
                made = {peer: produce_both(ctx, stack, peer, base, n) for peer in order}
                for peer in order:
                    t0 = time.monotonic()
                    got = consume_both(peer, made[peer], n)
                    ctx.log(
                        f"peers rep {rep + 1}/{ctx.repeat} {label:5} {peer:13} "
                        f"enq {got['enqueue_per_s']:8.0f}/s {got['enqueue2_per_s']:8.0f}/s  "
                        f"1c {got['consume1_per_s']:7.0f}/s  2c {got['consume2_per_s']:7.0f}/s  "
                        f"dup/lost {got['consume2_check']['duplicates']}/"
                        f"{got['consume2_check']['lost']}  ({time.monotonic() - t0:.1f}s)"
                    )
                    reps.setdefault(label, {}).setdefault(peer, []).append(got)
    return {
        "n": n,
        "repeat": ctx.repeat,
        "queues": queues,
        "missing_peers": missing,
        "labels": {q: LABELS[q] for q in queues},
        "results": _aggregate(reps),
    }


def _aggregate(reps: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label, per_queue in reps.items():
        table: dict[str, Any] = {}
        for peer, runs in per_queue.items():
            enqueue = [r["enqueue_per_s"] for r in runs] + [r["enqueue2_per_s"] for r in runs]
            table[peer] = {
                "enqueue_per_s": summary(enqueue),
                "consume1_per_s": summary([r["consume1_per_s"] for r in runs]),
                "consume2_per_s": summary([r["consume2_per_s"] for r in runs]),
                "duplicates_1": sum(r["consume1_check"]["duplicates"] for r in runs),
                "lost_1": sum(r["consume1_check"]["lost"] for r in runs),
                "duplicates_2": sum(r["consume2_check"]["duplicates"] for r in runs),
                "lost_2": sum(r["consume2_check"]["lost"] for r in runs),
                "race_split": [r["consume2_split"] for r in runs],
                "race_errors": sum(r["consume2_errors"] for r in runs),
                "rss_mib": {
                    "producer": median(r["rss_kb"]["producer"] / 1024 for r in runs),
                    "consumer": median(r["rss_kb"]["consumer"] / 1024 for r in runs),
                    "racing_consumer": median(
                        r["rss_kb"]["racing_consumer_max"] / 1024 for r in runs
                    ),
                },
                "per_rep": runs,
            }
        # ratios measured side by side: median over repetitions of (OmniQ variant / peer)
        ratios: dict[str, Any] = {}
        for mine in OMNIQ:
            if mine not in table:
                continue
            for other in table:
                if other in OMNIQ:
                    continue
                for metric, key in (
                    ("enqueue", "enqueue_per_s"),
                    ("consume1", "consume1_per_s"),
                    ("consume2", "consume2_per_s"),
                ):
                    pairs = [
                        ratio(a[key], b[key])
                        for a, b in zip(
                            table[mine]["per_rep"], table[other]["per_rep"], strict=False
                        )
                    ]
                    if metric == "enqueue":
                        pairs += [
                            ratio(a["enqueue2_per_s"], b["enqueue2_per_s"])
                            for a, b in zip(
                                table[mine]["per_rep"], table[other]["per_rep"], strict=False
                            )
                        ]
                    ratios[f"{mine}/{other}/{metric}"] = median(pairs)
        out[label] = {"queues": table, "ratios": ratios}
    return out


# --------------------------------------------------------------------------- targets
def targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    res = data["results"]
    out = []
    disk = res.get("disk")
    if disk:
        r = disk["ratios"]
        q = disk["queues"]
        primary = "omniq"
        checks = []
        for other in ("huey", "kombu"):
            key = f"{primary}/{other}/consume2"
            if key in r:
                checks.append((f"2-consumer dequeue+ack vs {other}", r[key], 3.0))
        if "huey" in q:
            checks.append(("enqueue vs huey", r.get(f"{primary}/huey/enqueue"), 1.0))
        clean = q[primary]["duplicates_2"] == 0 and q[primary]["lost_2"] == 0
        met = bool(checks) and all(v is not None and v >= goal for _, v, goal in checks) and clean
        bits = [f"{name} {fmt(v, 2)}x (goal >= {goal:g}x)" for name, v, goal in checks]
        bits.append(
            f"duplicates {q[primary]['duplicates_2']}, losses {q[primary]['lost_2']}"
            f" over {data['repeat']} races of {data['n']}"
        )
        if not checks:
            bits.append("peers not installed: ratios not measured")
        measured = "; ".join(bits)
        others = []
        for variant in ("omniq-sync", "omniq-batch"):
            bits = [
                f"{o} {fmt(r.get(f'{variant}/{o}/consume2'), 2)}x"
                for o in ("huey", "kombu")
                if f"{variant}/{o}/consume2" in r
            ]
            if bits:
                others.append(f"{variant}: " + ", ".join(bits))
        if others:
            measured += " (also " + "; ".join(others) + ")"
        out.append(
            {
                "id": 1,
                "figure": NAME,
                "title": "local disk, 2 consumers: OmniQ vs Huey/kombu",
                "goal": "dequeue+ack >= 3x Huey FileStorage and >= 3x kombu filesystem, "
                "0 duplicates, 0 losses; enqueue >= Huey",
                "measured": measured,
                "met": met if checks else None,
            }
        )
    tmpfs = res.get("tmpfs")
    if tmpfs:
        r = tmpfs["ratios"]
        enq = r.get("omniq-batch/floor/enqueue")
        deq = r.get("omniq-batch/floor/consume1")
        deq2 = r.get("omniq-batch/floor/consume2")
        met = enq is not None and deq is not None and enq >= 0.5 and deq >= 0.5
        out.append(
            {
                "id": 2,
                "figure": NAME,
                "title": "tmpfs, async batch API vs rename floor",
                "goal": "enqueue and dequeue+ack >= 0.5x the rename floor",
                "measured": f"enqueue {fmt(enq, 2)}x, dequeue+ack (1 process) {fmt(deq, 2)}x, "
                f"(2 processes {fmt(deq2, 2)}x) of the floor",
                "met": met,
            }
        )
    out.extend(_twin_target(data))
    return out


def _twin_target(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 13 target 5: the blocking twin, one call at a time, against the async class
    (1 consumer, dequeue+ack) and Huey (enqueue), ratios of the same repetition."""
    bits, checks = [], []
    for label in ("disk", "tmpfs"):
        res = data["results"].get(label)
        if not res or "omniq-sync" not in res["queues"] or "omniq" not in res["queues"]:
            continue
        q = res["queues"]
        deq = median(
            ratio(a["consume1_per_s"], b["consume1_per_s"])
            for a, b in zip(q["omniq-sync"]["per_rep"], q["omniq"]["per_rep"], strict=False)
        )
        enq = res["ratios"].get("omniq-sync/huey/enqueue")
        checks += [(deq, 0.5)] + ([(enq, 1.0)] if label == "disk" else [])
        bits.append(
            f"{label}: FileQueue dequeue+ack {fmt(deq, 2)}x AsyncFileQueue"
            + (f", enqueue {fmt(enq, 2)}x Huey" if enq is not None else "")
        )
    if not checks:
        return []
    return [
        {
            "id": 15,
            "figure": NAME,
            "title": "blocking twin FileQueue, one call at a time",
            "goal": "dequeue+ack >= 0.5x AsyncFileQueue (1 consumer); enqueue >= 1.0x Huey (disk)",
            "measured": "; ".join(bits),
            "met": all(v is not None and v >= goal for v, goal in checks),
        }
    ]


# --------------------------------------------------------------------------- report
def markdown(data: dict[str, Any]) -> str:
    parts = [
        f"N = {data['n']:,} tasks per run, {data['repeat']} repetitions, medians "
        "(tasks/s). Ratios are medians of per-repetition ratios (measured side by side)."
    ]
    if data["missing_peers"]:
        parts.append(f"Peers not installed (skipped): {', '.join(data['missing_peers'])}.")
    for label, block in data["results"].items():
        rows = []
        for peer, s in block["queues"].items():
            rows.append(
                [
                    LABELS.get(peer, peer),
                    fmt(s["enqueue_per_s"]["median"]),
                    fmt(s["consume1_per_s"]["median"]),
                    fmt(s["consume2_per_s"]["median"]),
                    f"{s['duplicates_2']} / {s['lost_2']}",
                    f"{fmt(s['rss_mib']['consumer'], 1)} / {fmt(s['rss_mib']['racing_consumer'], 1)}",
                ]
            )
        parts.append(
            f"**{label}**\n\n"
            + md_table(
                [
                    "queue",
                    "enqueue/s",
                    "dequeue+ack/s (1 consumer)",
                    "dequeue+ack/s (2 consumers)",
                    "race dup / lost (all reps)",
                    "peak RSS MiB (1c / racing)",
                ],
                rows,
            )
        )
        ratio_rows = []
        for mine in OMNIQ:
            cells = []
            for other in block["queues"]:
                if other in OMNIQ:
                    continue
                r = block["ratios"]
                cells.append(
                    f"{other}: {fmt(r.get(f'{mine}/{other}/enqueue'), 2)} / "
                    f"{fmt(r.get(f'{mine}/{other}/consume1'), 2)} / "
                    f"{fmt(r.get(f'{mine}/{other}/consume2'), 2)}"
                )
            if cells:
                ratio_rows.append([mine, "<br>".join(cells)])
        if ratio_rows:
            parts.append(
                md_table([f"{label}: OmniQ variant", "x peer (enqueue / 1c / 2c)"], ratio_rows)
            )
    return "\n\n".join(parts)


def chart(data: dict[str, Any], out_dir: str) -> list[str]:
    pyplot = plt()
    files = []
    blocks = data["results"]
    fig, axes = pyplot.subplots(1, len(blocks), figsize=(7 * len(blocks), 5.5), squeeze=False)
    metrics = (
        ("enqueue_per_s", "enqueue"),
        ("consume1_per_s", "dequeue+ack, 1 consumer"),
        ("consume2_per_s", "dequeue+ack, 2 consumers"),
    )
    for ax, (label, block) in zip(axes[0], blocks.items(), strict=False):
        queues = list(block["queues"])
        width = 0.8 / len(metrics)
        for k, (key, name) in enumerate(metrics):
            values = [block["queues"][q][key]["median"] or 0 for q in queues]
            xs = [i + (k - 1) * width for i in range(len(queues))]
            ax.bar(xs, values, width, label=name)
        ax.set_xticks(range(len(queues)))
        ax.set_xticklabels(queues, rotation=30, ha="right")
        ax.set_yscale("log")
        ax.set_ylabel("tasks/s (median, log scale)")
        ax.set_title(f"{label}: N={data['n']:,}, {data['repeat']} reps")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, "throughput.png")
    fig.savefig(path, dpi=110)
    pyplot.close(fig)
    files.append(path)
    return files
