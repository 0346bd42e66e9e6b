"""A process dies in the middle of enqueue, claim, ack, result write or event write.

The child (``fault_proc``) dies with ``os._exit`` -- no cleanup, no ``finally``, as under
SIGKILL -- at the N-th system call of one kind on one area: half-way through writing a file,
or just before or just after the ``link``/``replace``/``unlink`` that publishes or removes it.
Then a healthy worker drains the store. Nothing half-written is ever read (no quarantine, no
SerializationError), nothing acknowledged to a producer is lost, and the queue ends empty.
"""

from __future__ import annotations

import logging
import random
import subprocess
from pathlib import Path
from typing import Any

import anyio
import fault_stats
import pytest
from fault_proc import CRASH_EXIT, spawn

from omniq.backend.file import AsyncFileBackend
from omniq.core import ResultStatus
from omniq.core.models import new_id

SEED = random.randrange(1_000_000)
COUNT = 30  # tasks per store in the worker phases
LEASE, SKEW = 1.0, 0.3


def _n(low: int, high: int) -> int:
    return _rng.randint(low, high)


_rng = random.Random(SEED)

# phase -> crash points: (call, area under base_dir, how, nth range, written data or None[,
# True: local creates through a named temp file, as without O_TMPFILE])
Point = (
    tuple[str, str, str, tuple[int, int], "str | None"]
    | tuple[str, str, str, tuple[int, int], "str | None", bool]
)
PHASES: dict[str, list[Point]] = {
    "enqueue": [
        ("write", "queue/default/ready/", "half", (1, 20), None),
        ("link", "queue/default/ready/", "before", (1, 20), None),
        ("link", "queue/default/ready/", "after", (1, 20), None),
        # without O_TMPFILE a named temp file is written, linked into place, then unlinked
        ("write", "queue/default/ready/", "half", (1, 20), None, True),
        ("unlink", "queue/default/ready/", "before", (1, 20), None, True),
        # a delayed task: its body, then its due marker, each linked in (renamed without
        # O_TMPFILE)
        ("link", "queue/default/sched/", "after", (1, 6), None),
        ("link", "queue/default/due/", "before", (1, 6), None),
        ("replace", "queue/default/sched/", "after", (1, 6), None, True),
        ("replace", "queue/default/due/", "before", (1, 6), None, True),
    ],
    # a local claim links the ready file to run/{id}.{n}.json, then unlinks the ready name
    "claim": [
        ("link", "queue/default/run/*.json", "before", (1, 20), None),
        ("link", "queue/default/run/*.json", "after", (1, 20), None),
        ("unlink", "queue/default/ready/", "before", (1, 20), None),
    ],
    # a local ack links the claim to the outcome name run/{id}.{n}.x (its one outcome)
    "ack": [
        ("link", "queue/default/run/*.x", "before", (1, 20), None),
        ("link", "queue/default/run/*.x", "after", (1, 20), None),
    ],
    # a result is a nameless (O_TMPFILE) inode written in its directory, then linked in
    "result": [
        ("write", "results/results*/results", "half", (1, 20), None),
        ("link", "results/results/k", "before", (1, 20), None),
        ("link", "results/results/k", "after", (1, 20), None),
        # Expiry markers are batched: the first flush (by time, or at close) is the crash
        # point; the results it would have marked are left for the sweep.
        ("link", "results/results/_expiry/", "before", (1, 1), None),
        ("write", "results/results/_expiry", "half", (1, 1), None),
        # without O_TMPFILE: a named temp file renamed into place
        ("write", "results/results/.tmp-", "half", (1, 20), None, True),
        ("replace", "results/results/k", "before", (1, 20), None, True),
        ("replace", "results/results/k", "after", (1, 20), None, True),
        ("replace", "results/results/_expiry/", "before", (1, 1), None, True),
        ("write", "results/results/_expiry/", "half", (1, 1), None, True),
    ],
    "event": [
        ("write", "events/events/by-time/", "half", (1, 20), None),
        # locally the per-task index entry is a hard link to the event's file: in a directory
        # of its own for an id of ours, in the group of its 4 ms for an id OmniQ made (half
        # of this phase's tasks, see _prefill)
        ("link", "events/events/by-task/", "before", (1, 20), None),
        ("link", "events/events/by-task/", "after", (1, 20), None),
        ("link", "events/events/by-task-time/", "before", (1, 20), None),
        ("link", "events/events/by-task-time/", "after", (1, 20), None),
    ],
}


def _config(base: Path, mode: str, crash: dict[str, Any]) -> dict[str, Any]:
    common = {
        "base_dir": str(base),
        "lease": LEASE,
        "clock_skew": SKEW,
        "events": True,
        "crash": crash,
    }
    if mode == "enqueue":
        return {
            **common,
            "mode": "enqueue",
            "count": 40,
            "prefix": "k",
            "log": str(base.parent / "enqueued.log"),
            "delay_every": 4,
            "delay": 0.3,
        }
    return {
        **common,
        "mode": "worker",
        "burst": True,
        "idle_timeout": 1.0,
        "concurrency": 2,
        "poll": 0.2,
    }


def _prefill(base: Path, ulids: bool = False) -> list[str]:
    """COUNT tasks queued; with ``ulids`` every other one has an id OmniQ makes (a ULID)."""
    ids = [new_id() if ulids and i % 2 else f"k{i:05d}" for i in range(COUNT)]

    async def go() -> None:
        async with AsyncFileBackend(
            str(base), lease=LEASE, clock_skew=SKEW, events=True
        ) as backend:
            await backend.queue.enqueue_many(
                [backend.make_task("fault_tasks_ok:echo", [i], task_id=i) for i in ids]
            )

    anyio.run(go)
    return ids


async def _drain(base: Path) -> dict[str, Any]:
    """A healthy worker until the store is drained (crashed claims expire after 1.3 s)."""
    async with AsyncFileBackend(str(base), lease=LEASE, clock_skew=SKEW, events=True) as backend:
        worker = backend.worker(
            ["default"], concurrency=4, burst=True, idle_timeout=2.0, poll=0.2, handle_signals=False
        )
        stats = await worker.run()
        results = await backend.results.list()
        size = await backend.queue.size()
        sched = await backend.queue.store.listdir("default/sched")
        quarantine = await backend.queue.store.listdir("default/quarantine")
        result_quarantine = await backend.results.store.listdir("results/_quarantine")
        events = await backend.events.query()
    return {
        "stats": stats,
        "results": {r.task_id: r for r in results},
        "size": size,
        "sched": sched,
        "quarantine": quarantine,
        "result_quarantine": result_quarantine,
        "events": events,
    }


@pytest.mark.timeout(120)
@pytest.mark.parametrize("phase", list(PHASES))
def test_crash_mid_operation_loses_and_corrupts_nothing(phase: str, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.WARNING)
    runs = []
    for index, (call, area, how, (low, high), data, *named_temp) in enumerate(PHASES[phase]):
        root = tmp_path / f"v{index}"
        base = root / "store"
        root.mkdir()
        crash = {
            "call": call,
            "match": f"{base}/{area}",
            "how": how,
            "nth": _n(low, high),
            "data": data,
            "named_temp": bool(named_temp),
        }
        ids = _prefill(base, ulids=phase == "event") if phase != "enqueue" else []
        proc = spawn(_config(base, phase, crash), root / "child.log")
        runs.append((root, base, crash, ids, proc))
    for root, _, crash, _, proc in runs:
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        log = (root / "child.log").read_text(errors="replace")
        assert code == CRASH_EXIT, (
            f"seed {SEED}: the child did not die at {crash} (exit {code}):\n{log[-2000:]}"
        )
    fault_stats.add("crash points (process died mid-operation)", len(runs))

    async def drain_all() -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [{} for _ in runs]

        async def one(i: int, base: Path) -> None:
            out[i] = await _drain(base)

        async with anyio.create_task_group() as tg:
            for i, (_, base, _, _, _) in enumerate(runs):
                tg.start_soon(one, i, base)
        return out

    reports = anyio.run(drain_all)
    for (root, _, crash, ids, _), report in zip(runs, reports, strict=True):
        where = f"seed {SEED}, {phase} crash {crash}"
        if phase == "enqueue":
            log = root / "enqueued.log"
            told = log.read_text().split() if log.exists() else []
            attempted = {f"k{i:05d}" for i in range(40)}
        else:
            told, attempted = ids, set(ids)
        results = report["results"]
        lost = [i for i in told if i not in results]
        assert not lost, f"{where}: acknowledged tasks lost: {lost}"
        assert set(results) <= attempted, f"{where}: results of unknown tasks"
        wrong = {
            i: r for i, r in results.items() if r.status is not ResultStatus.SUCCESS or r.value != i
        }
        assert not wrong, f"{where}: bad results {wrong}"
        size = report["size"]
        assert (size.ready, size.running, size.dead) == (0, 0, 0), f"{where}: {size}"
        # A producer killed between a delayed task's body and its due marker leaves the body:
        # never for a task whose enqueue returned.
        orphans = {name.rsplit(".", 2)[0] for name in report["sched"]}
        assert not orphans & set(told), f"{where}: acknowledged tasks stuck: {orphans}"
        assert report["quarantine"] == [] and report["result_quarantine"] == [], (
            f"{where}: something half-written was read and quarantined: {report}"
        )
        assert report["stats"]["failed"] == 0 and report["stats"]["dead"] == 0, where
        assert all(e.task_id in attempted for e in report["events"]), where
    unreadable = [
        r.getMessage()
        for r in caplog.records
        if "unreadable" in r.getMessage()
        or "SerializationError" in r.getMessage()
        or "internal error" in r.getMessage()
    ]
    assert not unreadable, f"seed {SEED}: {unreadable[:5]}"
    print(
        f"\n{phase}: {len(runs)} crash points (seed {SEED}): "
        + "; ".join(
            f"{c['call']}/{c['how']}#{c['nth']} on {c['match'].split('store/')[1]}"
            for _, _, c, _, _ in runs
        )
    )
