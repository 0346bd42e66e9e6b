"""Worker chaos: several worker processes drain a queue while a driver SIGKILLs one at random
every 0.3-0.5 s and starts a replacement. Leases are short (1 s, clock_skew 0.3 s).

At the end every task has a SUCCESS result, nothing is left in the queue, nothing was
quarantined, and a task ran more than once only if a worker that ran it was killed."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import fault_stats
import pytest
from fault_proc import spawn, wait_ready

from omniq.backend.file import FileBackend
from omniq.core import EventType, ResultStatus
from omniq.core.sync import run_sync


def _count_results(backend: FileBackend) -> int:
    store = backend.async_api.results.store
    names = run_sync(lambda: store.listdir("results"))
    return sum(1 for n in names if n.endswith(".json"))


def _chaos(
    base_dir: str,
    options: dict[str, Any],
    tmp_path: Path,
    records: Path,
    *,
    tasks: int,
    workers: int,
    min_kills: int,
    max_kills: int,
    pause: float,
    deadline: float,
    events: bool = True,
) -> None:
    rng = random.Random()
    ids = [f"c{i:05d}" for i in range(tasks)]
    logs = tmp_path / "logs"
    logs.mkdir()
    config = {
        "mode": "worker",
        "base_dir": base_dir,
        "storage_options": options,
        "lease": 1.0,
        "clock_skew": 0.3,
        "concurrency": 4,
        "poll": 0.2,
        "events": events,
    }
    with FileBackend(base_dir, options, lease=1.0, clock_skew=0.3, events=events) as backend:
        queue = backend.async_api.queue
        for start in range(0, tasks, 250):
            batch = [
                backend.make_task("fault_tasks_ok:record", [i, pause], task_id=i)
                for i in ids[start : start + 250]
            ]
            run_sync(lambda batch=batch: queue.enqueue_many(batch))

        procs: dict[int, subprocess.Popen[bytes]] = {}
        log_of: dict[int, Path] = {}
        started = 0

        def start_worker() -> None:
            nonlocal started
            started += 1
            log = logs / f"worker-{started}.log"
            proc = spawn(config, log, env={"OMNIQ_FAULT_RECORDS": str(records)})
            procs[proc.pid] = proc
            log_of[proc.pid] = log

        killed: list[int] = []
        killed_busy = 0
        try:
            for _ in range(workers):
                start_worker()
            end = time.monotonic() + deadline
            t0 = time.monotonic()
            timeline: list[tuple[float, int, int]] = []
            done = 0
            while True:
                time.sleep(rng.uniform(0.3, 0.5))
                done = _count_results(backend)
                timeline.append((round(time.monotonic() - t0, 1), done, len(killed)))
                if done >= tasks and len(killed) >= min_kills:
                    break
                assert time.monotonic() < end, (
                    f"only {done}/{tasks} results after {deadline} s ({len(killed)} kills); "
                    f"without a result: {_where(backend, ids)}"
                )
                if len(killed) < min_kills or (done < tasks and len(killed) < max_kills):
                    # A victim that is working already (it has run a task), so that kills
                    # hit tasks in flight rather than processes still importing.
                    busy = [pid for pid in sorted(procs) if (records / f"{pid}.log").exists()]
                    if not busy and done >= tasks:
                        # The work ran out before the last kills: replacements started
                        # since will never run a task, so idle workers are the victims.
                        busy = sorted(procs)
                    if not busy:
                        continue
                    pid = rng.choice(busy)
                    os.kill(pid, signal.SIGKILL)
                    procs.pop(pid).wait()
                    killed.append(pid)
                    killed_busy += done < tasks
                    start_worker()
                for pid, proc in procs.items():
                    assert proc.poll() is None, f"worker {pid} exited by itself: {proc.returncode}"
        finally:
            # A replacement started just before the end may still be starting Python (CI saw
            # one die of the SIGTERM with -15); the survivors are stopped once they can be (one
            # still not started after a minute in all gets the SIGTERM anyway, and fails below).
            ready_by = time.monotonic() + 60
            for pid, proc in procs.items():
                wait_ready(proc, log_of[pid], timeout=max(0.0, ready_by - time.monotonic()))
            for proc in procs.values():
                proc.send_signal(signal.SIGTERM)
            for proc in procs.values():
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        fault_stats.add("worker SIGKILLs", len(killed))
        codes = {pid: p.returncode for pid, p in procs.items()}
        assert all(code == 0 for code in codes.values()), f"survivors did not stop cleanly: {codes}"

        # --- nothing lost, nothing half-written
        results = {i: backend.result(i) for i in ids}
        missing = sorted(i for i, r in results.items() if r is None)
        assert not missing, f"{len(missing)} tasks without a result: {missing[:10]}"
        bad = {
            i: r.status
            for i, r in results.items()
            if r.status is not ResultStatus.SUCCESS or r.value != i
        }
        assert not bad, f"tasks without a correct SUCCESS result: {list(bad.items())[:10]}"
        size = run_sync(lambda: queue.size())
        assert (size.ready, size.scheduled, size.running, size.dead) == (0, 0, 0, 0), size
        assert run_sync(lambda: queue.store.listdir("default/quarantine")) == []
        results_store = backend.async_api.results.store
        assert run_sync(lambda: results_store.listdir("results/_quarantine")) == []

        # --- a task ran twice only because a worker that ran (or held) it was killed
        runs = _read_runs(records)
        assert set(runs) == set(ids), f"tasks that never ran: {sorted(set(ids) - set(runs))[:10]}"
        killed_set = set(killed)
        survivors_ran_twice = {}
        unexplained = {}
        reruns = 0
        for tag, tag_runs in runs.items():
            if len(tag_runs) == 1:
                continue
            reruns += len(tag_runs) - 1
            ordered = [pid for _, pid in sorted((at, pid) for pid, at in tag_runs)]
            if not killed_set.intersection(ordered[:-1]):
                unexplained[tag] = ordered
            alive = [pid for pid in ordered if pid not in killed_set]
            if len(alive) > 1:
                survivors_ran_twice[tag] = ordered
        assert not unexplained, (
            f"re-runs without a killed worker: {list(unexplained.items())[:5]}{_warnings(logs)}"
        )
        assert not survivors_ran_twice, (
            f"tasks run twice by workers never killed: {list(survivors_ran_twice.items())[:5]}"
            f"{_warnings(logs)}"
        )
        # A task whose claim was taken over was held by a killed worker: the reaper says whose.
        expired = []
        if events:
            store = backend.async_api.events
            expired = run_sync(lambda: store.query(event_type=EventType.LEASE_EXPIRED))
            holders = {int(e.worker_id.split("-")[-2]) for e in expired if e.worker_id}
            assert holders <= killed_set, f"leases taken from live workers: {holders - killed_set}"
        retaken = sum(1 for r in results.values() if r.attempt > 1)
        fault_stats.add("task re-runs after a kill", reruns)
        print(
            f"\n{tasks} tasks, {len(killed)} kills ({killed_busy} while work remained), "
            f"{reruns} re-runs, {retaken} tasks finished on a later attempt, "
            f"{len(expired)} lease take-overs"
        )
        print("timeline (s, results, kills):", timeline[::3])
        assert retaken > 0, "no kill ever hit a task in flight: the chaos tested nothing"
        for log in logs.glob("*.log"):
            text = log.read_text(errors="replace")
            assert "Traceback" not in text, f"{log.name}:\n{text[-3000:]}"


def _warnings(logs: Path) -> str:
    """The workers' warnings, for a failure message: a live worker that lost a lease says
    why (its event loop blocked, its lease taken over)."""
    lines = [
        f"{log.name}: {line}"
        for log in sorted(logs.glob("*.log"))
        for line in log.read_text(errors="replace").splitlines()
        if " WARNING " in line
    ]
    return "\nworker warnings:\n" + "\n".join(lines[-30:]) if lines else ""


def _where(backend: FileBackend, ids: list[str]) -> str:
    """Where the tasks without a result stand, and their run/ names: what a stuck task needs
    to be diagnosed from the CI log alone."""
    queue = backend.async_api.queue
    missing = [i for i in ids if backend.result(i) is None][:5]
    names = run_sync(lambda: queue.store.listdir("default/run"))
    shown = []
    for task_id in missing:
        mine = sorted(n for n in names if n.startswith(f"{task_id}."))
        try:
            info = backend.get_task(task_id)
            where = f"{info.status.value} attempt {info.attempt}"
        except Exception as exc:  # what it raises is the diagnosis
            where = repr(exc)
        shown.append(f"{task_id}: {where}, run/{mine}")
    return "; ".join(shown)


def _read_runs(records: Path) -> dict[str, list[tuple[int, float]]]:
    runs: dict[str, list[tuple[int, float]]] = {}
    for path in records.glob("*.log"):
        for line in path.read_text().splitlines():
            tag, pid, at = line.split()
            runs.setdefault(tag, []).append((int(pid), float(at)))
    return runs


@pytest.mark.timeout(240)
def test_sigkill_chaos_on_local_disk(tmp_path: Path, records: Path) -> None:
    _chaos(
        str(tmp_path / "store"),
        {},
        tmp_path,
        records,
        tasks=1500,
        workers=3,
        min_kills=10,
        max_kills=20,
        pause=0.01,
        deadline=150,
    )


@pytest.mark.emulator
@pytest.mark.timeout(240)
def test_sigkill_chaos_on_s3(s3_emulator: Any, tmp_path: Path, records: Path) -> None:
    _chaos(
        s3_emulator.url(f"chaos-{uuid.uuid4().hex}"),
        s3_emulator.storage_options,
        tmp_path,
        records,
        tasks=150,
        workers=3,
        min_kills=5,
        max_kills=6,
        pause=0.01,
        deadline=150,
        events=False,
    )


def test_run_records_are_parsed(records: Path) -> None:
    """The checker reads what the task function writes (guards the harness itself)."""
    import fault_tasks_ok

    assert fault_tasks_ok.record("a") == "a"
    assert fault_tasks_ok.record("b") == "b"
    assert fault_tasks_ok.record("a") == "a"
    runs = _read_runs(records)
    assert sorted(runs) == ["a", "b"]
    assert [pid for pid, _ in runs["a"]] == [os.getpid(), os.getpid()]
    assert runs["a"][0][1] <= runs["a"][1][1]
