"""Transient storage errors: a share of the calls fail (connection reset, timeout, HTTP 503),
some *after* the store did the work. Operations retry with backoff; the worker keeps running;
nothing is lost; an exclusive create whose first try had an unknown outcome still ends right."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import fault_stats
import pytest

from omniq.backend.file import FileBackend
from omniq.core import ResultStatus, StorageError
from omniq.core._fsspec_ops import AsyncFsspecOps, FsspecOps
from omniq.core.fs import Store

# --------------------------------------------------------------------------- exclusive create


def _scripted(faulty: Any, script: dict[tuple[str, int], str]) -> Any:
    """Faults injected at given (operation, call number) only."""
    return faulty(plan=lambda op, path, n: script.get((op, n)))


def _ops(faults: Any) -> tuple[FsspecOps, Any]:
    from fsspec.implementations.dirfs import DirFileSystem

    import faulty_fs

    fs = faulty_fs.FaultyFileSystem(
        faults=faults, target_protocol="memory", skip_instance_cache=True
    )
    root = f"/omniq-{uuid.uuid4().hex}"
    return FsspecOps(DirFileSystem(path=root, fs=fs)), fs.target


def test_create_whose_first_try_succeeded_unseen_reports_created(faulty) -> None:
    # The PUT lands, then the connection drops: the retry finds the key, reads it back, sees
    # its own bytes and reports success (a claim must not be lost to its own retry).
    faults = _scripted(faulty, {("create", 1): "after"})
    ops, _ = _ops(faults)
    assert ops.create("run/a.1.json", b"token-1") is True
    assert ops.read("run/a.1.json") == b"token-1"
    assert faults.count("create", "after") == 1


def test_create_that_failed_before_and_lost_the_race_reports_not_created(faulty) -> None:
    # First try never reached the store; meanwhile another worker created the key. The retry
    # finds someone else's bytes: not ours, so False (two workers must not both win).
    def plan(op: str, path: str, n: int) -> str | None:
        if op == "create" and n == 1:
            target.pipe_file(path, b"other-token")  # the rival's claim lands now
            return "before"
        return None

    faults = faulty(plan=plan)
    ops, target = _ops(faults)
    assert ops.create("run/b.1.json", b"my-token") is False
    assert ops.read("run/b.1.json") == b"other-token"


def test_create_of_existing_key_without_fault_reports_not_created(faulty) -> None:
    ops, _ = _ops(faulty(rate=0.0))
    assert ops.create("k", b"one") is True
    assert ops.create("k", b"two") is False  # another writer's bytes: not ours
    # The same bytes read back are taken as this call's own write (an SDK retry after a lost
    # response): every caller puts a nonce or token in what it creates.
    assert ops.create("k", b"one") is True


def test_create_whose_last_try_landed_unseen_reports_created(faulty) -> None:
    # Found by the network-fault suite (a "phantom claim" on GCS): three tries never reached
    # the store, the fourth landed and its response was lost. No retry is left to be answered
    # "exists": a last look finds this call's bytes, so the claim is not left unowned.
    script = {("create", n): "before" for n in (1, 2, 3)} | {("create", 4): "after"}
    faults = _scripted(faulty, script)
    ops, _ = _ops(faults)
    assert ops.create("run/d.1.json", b"token-4") is True
    assert faults.count("create", "after") == 1


def test_create_gives_up_with_storage_error_after_retries(faulty) -> None:
    faults = faulty(rate=1.0, after_share=0.0, ops=["create"])
    ops, _ = _ops(faults)
    with pytest.raises(StorageError) as info:
        ops.create("c", b"x")
    assert isinstance(info.value.__cause__, OSError)
    assert faults.total == 4  # RETRIES tries, then a clear error
    assert ops.read("c") is None


class _ScriptedAsyncFs:
    """The two async calls AsyncFsspecOps.create makes, with a scripted fault schedule."""

    def __init__(self, script: list[str | None], rival: bytes | None = None) -> None:
        self.files: dict[str, bytes] = {}
        self.fs = self  # like DirFileSystem: the wrapped filesystem
        self.script = script
        self.rival = rival

    async def _pipe_file(self, key: str, data: bytes, mode: str = "overwrite") -> None:
        when = self.script.pop(0) if self.script else None
        if when == "before":
            if self.rival is not None:
                self.files[key] = self.rival
            fault_stats.add("injected storage faults")
            raise ConnectionResetError(104, "Connection reset by peer")
        if mode == "create" and key in self.files:
            raise FileExistsError(key)
        self.files[key] = data
        if when == "after":
            fault_stats.add("injected storage faults")
            raise TimeoutError("Read timed out")

    async def _cat_file(self, key: str, **kwargs: Any) -> bytes:
        if key not in self.files:
            raise FileNotFoundError(key)
        return self.files[key]


@pytest.mark.parametrize(
    ("script", "rival", "expected"),
    [
        (["after"], None, True),
        (["before"], b"rival", False),
        (["before", "after"], None, True),
        ([None], None, True),
        (["before", "before", "before", "after"], None, True),
    ],
    ids=["after-fault", "lost-race", "before-then-after", "no-fault", "last-try-landed"],
)
def test_async_create_read_back(
    script: list[str | None], rival: bytes | None, expected: bool
) -> None:
    fs = _ScriptedAsyncFs(list(script), rival)
    assert asyncio.run(AsyncFsspecOps(fs).create("k", b"mine")) is expected
    assert fs.files["k"] == (b"mine" if expected else rival)


# --------------------------------------------------------------------------- a worker under faults


def _faulty_target(kind: str, tmp_path: Path) -> tuple[str, dict[str, Any]]:
    if kind == "memory":
        return f"faulty://omniq-{uuid.uuid4().hex}/app", {"target_protocol": "memory"}
    return f"faulty://{tmp_path}/store", {
        "target_protocol": "file",
        "target_options": {"auto_mkdir": True},
    }


def _enqueue_all(backend: FileBackend, ids: list[str]) -> int:
    """Enqueue ``record(id)`` for every id, the way a producer must: a StorageError means
    "unknown", so it tries again with the same task id (enqueue is idempotent per id). The
    first ten one by one through the backend, the rest in batches. Returns the retries."""
    from omniq.core.sync import run_sync

    retries = 0
    queue = backend.async_api.queue
    batches = [[i] for i in ids[:10]] + [ids[n : n + 30] for n in range(10, len(ids), 30)]
    for batch in batches:
        while True:
            try:
                if len(batch) == 1:
                    backend.enqueue("fault_tasks_ok:record", batch, task_id=batch[0])
                else:
                    tasks = [
                        backend.make_task("fault_tasks_ok:record", [i], task_id=i) for i in batch
                    ]
                    run_sync(lambda tasks=tasks: queue.enqueue_many(tasks))
                break
            except StorageError:
                retries += 1
    return retries


def _check_all_done(backend: FileBackend, ids: list[str], records: Path) -> None:
    results = {i: backend.result(i) for i in ids}
    missing = [i for i, r in results.items() if r is None]
    assert not missing, f"{len(missing)} tasks have no result: {missing[:5]}"
    assert all(r.status is ResultStatus.SUCCESS and r.value == i for i, r in results.items())
    queue = backend.async_api.queue
    size = _run(queue.size())
    assert (size.ready, size.scheduled, size.running, size.dead) == (0, 0, 0, 0), size
    assert _run(queue.store.listdir("default/quarantine")) == []
    assert _run(backend.async_api.results.store.listdir("results/_quarantine")) == []
    assert set(_runs(records)) == set(ids)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind", ["memory", "local"])
def test_worker_loses_nothing_under_transient_faults(
    faulty, records, tmp_path, kind, caplog
) -> None:
    """20% of storage calls fail (half of them after the store did the work). Producer,
    worker, results and events all go through it; every task ends with a SUCCESS result."""
    caplog.set_level(logging.WARNING)
    faults = faulty(rate=0.2, after_share=0.5, seed=20240611)
    base_dir, options = _faulty_target(kind, tmp_path)
    ids = [f"t{i:04d}" for i in range(100)]
    with FileBackend(
        base_dir, {**options, "faults": faults}, lease=1.0, clock_skew=0.3, events=True
    ) as backend:
        producer_retries = _enqueue_all(backend, ids)
        enqueue_faults = faults.total
        worker = backend.worker(["default"], concurrency=8, burst=True, idle_timeout=2.0, poll=0.2)
        stats = worker.run()  # must return normally: a storage error never kills it
        faults.enabled = False
        _check_all_done(backend, ids, records)

    print(f"\n{kind}: {faults.summary()}; producer retries {producer_retries}; worker {stats}")
    assert faults.total > 60, faults.summary()
    assert enqueue_faults > 0 and faults.total > enqueue_faults  # both sides were hit
    assert faults.count("create", "after") > 0, "the unknown-outcome create was never exercised"
    assert stats["claimed"] >= len(ids)
    assert any(r.getMessage().startswith("retrying ") for r in caplog.records)


@pytest.mark.timeout(180)
def test_worker_survives_a_storage_outage(faulty, records, caplog) -> None:
    """Every call fails for a while (an outage longer than the retries): operations end in
    StorageError wherever the worker happens to be -- claiming, reaping, writing a result,
    acking, logging events. The worker logs, backs off, carries on; nothing is lost."""
    caplog.set_level(logging.WARNING)
    seen = [0]
    began: list[float] = []

    def outage(op: str, path: str, n: int) -> str | None:
        # From the 150th call on, every call fails for 1.5 s (as if the store went away).
        seen[0] += 1
        if seen[0] == 150:
            began.append(time.monotonic())
        if began and time.monotonic() - began[0] < 1.5:
            return "before" if seen[0] % 2 else "after"
        return None

    faults = faulty(plan=outage)
    ids = [f"o{i:04d}" for i in range(60)]
    with FileBackend(
        f"faulty://omniq-{uuid.uuid4().hex}/app",
        {"faults": faults},
        lease=1.0,
        clock_skew=0.3,
        events=True,
    ) as backend:
        faults.enabled = False
        _enqueue_all(backend, ids)
        faults.enabled = True
        worker = backend.worker(["default"], concurrency=4, burst=True, idle_timeout=2.5, poll=0.2)
        stats = worker.run()
        faults.enabled = False
        _check_all_done(backend, ids, records)
    gave_up = [
        r
        for r in caplog.records
        if "StorageError" in r.getMessage()
        or (r.exc_info and r.exc_info[0] is not None and issubclass(r.exc_info[0], StorageError))
    ]
    print(f"\noutage: {faults.summary()}; worker {stats}; {len(gave_up)} StorageErrors logged")
    assert began, "the outage never began"
    assert gave_up, "the outage never exhausted the retries: the test proves nothing"


def _runs(records: Path) -> dict[str, list[tuple[int, float]]]:
    runs: dict[str, list[tuple[int, float]]] = {}
    for path in records.glob("*.log"):
        for line in path.read_text().splitlines():
            tag, pid, at = line.split()
            runs.setdefault(tag, []).append((int(pid), float(at)))
    return runs


def _run(awaitable: Any) -> Any:
    from omniq.core.sync import run_sync

    async def go() -> Any:
        return await awaitable

    return run_sync(go)


def test_store_outside_asyncio_uses_sync_path(faulty) -> None:
    """The faulty plugin is sync-only: Store drives it through FsspecOps in a thread."""
    faults = faulty(rate=0.0)
    store = Store(f"faulty://omniq-{uuid.uuid4().hex}/x", {"faults": faults})
    assert store.kind == "remote"

    async def go() -> bytes | None:
        await store.write("a/b.json", b"{}")
        return await store.read("a/b.json")

    assert asyncio.run(go()) == b"{}"
    assert isinstance(store._sync_ops, FsspecOps)
    assert faults.calls["pipe_file"] == 1 and faults.calls["cat_file"] == 1
