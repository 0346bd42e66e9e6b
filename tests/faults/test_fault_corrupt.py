"""Corrupt, truncated, empty, wrong-schema-version and non-JSON files dropped into the queue
(ready/, sched/, run/, dead/), the results and the events, around good tasks.

A real worker (burst mode) runs: it never crashes, the good tasks all run, and every bad file
is quarantined or reported -- never silently deleted: its bytes still exist under base_dir.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import fault_stats
import pytest

from omniq.backend.file import FileBackend
from omniq.core import ResultStatus, SerializationError, Task, TaskResult, codec
from omniq.core.models import Claimed
from omniq.core.sync import run_sync

GOOD = 12


def _task_doc(task_id: str, **fields: Any) -> bytes:
    return codec.encode(Task(func="fault_tasks_ok:echo", args=[task_id], id=task_id, **fields))


def _v99(data: bytes) -> bytes:
    doc = json.loads(data)
    doc["v"] = 99
    if isinstance(doc.get("task"), dict):  # a claim: the version lives in its task
        doc["task"]["v"] = 99
    return json.dumps(doc).encode()


def _claim_doc(task_id: str) -> bytes:
    task = Task(func="fault_tasks_ok:echo", args=[task_id], id=task_id)
    now = datetime.now(timezone.utc)
    return codec.encode(
        Claimed(
            task=task,
            attempt=1,
            lease_until=now,
            worker_id="gone",
            token=uuid.uuid4().hex,
            claimed_at=now,
        )
    )


def _contents(task_id: str, doc: bytes) -> dict[str, bytes]:
    """Bad contents for a file that should hold ``doc`` (the document of ``task_id``)."""
    return {
        "empty": b"",
        "truncated": doc[: len(doc) // 2],
        "nonjson": b"this is not JSON at all \x00\xff\xfe " + task_id.encode(),
        "binary": bytes(range(256)) + task_id.encode(),
        "v99": _v99(doc),
        "schema": json.dumps({"hello": "world", "id": task_id}).encode(),
        "array": json.dumps([1, 2, task_id]).encode(),
        "utf16": doc.decode().encode("utf-16"),
    }


@pytest.fixture(params=["memory", "local", pytest.param("s3", marks=pytest.mark.emulator)])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str, dict[str, Any]]:
    if request.param == "memory":
        return "memory", f"memory://omniq-corrupt-{uuid.uuid4().hex}", {}
    if request.param == "local":
        return "local", str(tmp_path / "store"), {}
    s3 = request.getfixturevalue("s3_emulator")
    return "s3", s3.url(f"corrupt-{uuid.uuid4().hex}"), dict(s3.storage_options)


def _fs(kind: str, options: dict[str, Any]) -> Any:
    import fsspec

    protocol = {"memory": "memory", "local": "file", "s3": "s3"}[kind]
    extra = {"auto_mkdir": True} if kind == "local" else {}
    return fsspec.filesystem(
        protocol, skip_instance_cache=True, use_listings_cache=False, **options, **extra
    )


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.timeout(120)
def test_corrupt_files_are_quarantined_or_reported_and_good_tasks_run(target, caplog) -> None:
    caplog.set_level(logging.WARNING)
    kind, base, options = target
    fs = _fs(kind, options)
    q, r, e = f"{base}/queue/default", f"{base}/results/results", f"{base}/events/events"
    dropped: dict[str, bytes] = {}  # path -> bytes
    must_move: set[str] = set()  # files the system reads and must move to quarantine

    def drop(path: str, data: bytes, moved: bool = True) -> None:
        fs.pipe_file(path, data)
        dropped[path] = data
        if moved:
            must_move.add(path)

    with FileBackend(base, options, lease=1.0, clock_skew=0.3, events=True) as backend:
        good = [
            backend.enqueue("fault_tasks_ok:echo", [f"g{i}"], task_id=f"g{i:03d}")
            for i in range(GOOD)
        ]
        past_ms = int((time.time() - 60) * 1000)
        now = datetime.now(timezone.utc)
        hour = f"{e}/by-time/{now:%Y-%m-%d}/{now:%H}"
        for label, data in _contents("x", _task_doc("x")).items():
            tid = f"bad-ready-{label}"
            # A document of a newer schema version is left in place for upgraded workers.
            newer = label == "v99"
            drop(
                f"{q}/ready/p0999/{tid}.1.json",
                _contents(tid, _task_doc(tid))[label],
                moved=not newer,
            )
            tid = f"bad-sched-{label}"
            drop(f"{q}/sched/{tid}.1.json", _contents(tid, _task_doc(tid))[label], moved=not newer)
            fs.pipe_file(f"{q}/due/{past_ms:013d}.0999.{tid}.1", b"")
            tid = f"bad-dead-{label}"
            drop(f"{q}/dead/{tid}.json", _contents(tid, _task_doc(tid))[label], moved=not newer)
            tid = f"bad-run-{label}"
            claim = _contents(tid, _claim_doc(tid))[label]
            # A claim of up to 16 bytes reads as a tombstone: left alone, by design.
            drop(f"{q}/run/{tid}.1.json", claim, moved=len(claim) > 16 and not newer)
            tid = f"bad-result-{label}"
            doc = codec.encode(TaskResult(task_id=tid, status=ResultStatus.SUCCESS, value=1))
            # A result of a newer schema version is kept and reported (NewerSchemaError).
            drop(f"{r}/{tid}.json", _contents(tid, doc)[label], moved=label != "v99")
            ms = int(time.time() * 1000)
            eid = f"01BADEVENT{label.upper():0<16}"[:26]
            drop(f"{hour}/{ms:013d}~{eid}~started~bad-event-{label}.json", data, moved=False)
            drop(f"{e}/by-task/bad-event-{label}/{ms:013d}~{eid}~started.json", data, moved=False)
        # a stored result of a good task, corrupt: the worker's write replaces it (the
        # result key is the worker's to write; no read first), so no preservation check
        fs.pipe_file(f"{r}/g000.json", b"{truncated")
        # a task document under another task's name
        drop(f"{q}/ready/p0999/bad-ready-mismatch.1.json", _task_doc("someone-else"))
        drop(f"{q}/ready/p0999/bad-ready-huge.1.json", b"x" * (9 * 1024 * 1024))
        # a good dead-lettered task next to the bad ones
        fs.pipe_file(f"{q}/dead/dead-good.json", _task_doc("dead-good"))
        fault_stats.add("corrupt files dropped", len(dropped))

        stats = backend.worker(
            ["default"], concurrency=3, burst=True, idle_timeout=2.5, poll=0.2
        ).run()
        queue = backend.async_api.queue
        results = backend.async_api.results
        events = backend.async_api.events
        assert results is not None and events is not None
        # the other readers of these areas: they must not crash either
        dead = run_sync(lambda: queue.list_dead(limit=None))
        requeued = run_sync(lambda: queue.requeue_dead())
        for label in _contents("x", b"{}"):
            if label == "v99":
                with pytest.raises(SerializationError, match="newer"):
                    backend.result(f"bad-result-{label}")
            else:
                assert backend.result(f"bad-result-{label}") is None
        listed = run_sync(lambda: results.list())
        seen = run_sync(lambda: events.query())
        stats2 = backend.worker(
            ["default"], concurrency=2, burst=True, idle_timeout=0.5, poll=0.2
        ).run()

        for task_id in good:
            result = backend.result(task_id)
            assert result is not None and result.status is ResultStatus.SUCCESS, (task_id, result)
        revived = backend.result("dead-good")
        assert revived is not None and revived.ok and revived.value == "dead-good"
    assert requeued == 1, requeued
    assert stats["succeeded"] == GOOD and stats2["succeeded"] == 1, (stats, stats2)
    assert stats["failed"] == 0 and stats2["failed"] == 0
    assert {d.task.id for d in dead if d.task is not None} == {"dead-good"}
    assert {x.task_id for x in listed} >= set(good)
    assert all(ev.task_id.startswith(("g", "dead-good")) for ev in seen)

    # ---- never silently deleted: every dropped byte string is still under base_dir
    files = {path: fs.cat_file(path) for path in fs.find(base)}
    by_digest: dict[str, list[str]] = {}
    for path, data in files.items():
        by_digest.setdefault(_digest(data), []).append(path)
    strip = base.split("://", 1)[-1].strip("/")
    problems = []
    for path, data in dropped.items():
        rel = path.split("://", 1)[-1].strip("/")
        name = rel.rsplit("/", 1)[-1]
        here = [
            p
            for p in by_digest.get(_digest(data), [])
            if p.strip("/") == rel or ("quarantine" in p and name in p)
        ]
        if not here:
            problems.append(f"{rel[len(strip) :]}: bytes gone")
        elif path in must_move and all(p.strip("/") == rel for p in here):
            problems.append(f"{rel[len(strip) :]}: neither quarantined nor moved aside")
    assert not problems, "\n".join(problems)

    # ---- quarantine holds only bad files (no good task was moved aside)
    quarantined = [p for p in files if "quarantine" in p]
    bad_digests = {_digest(d) for d in dropped.values()}
    assert all(_digest(files[p]) in bad_digests for p in quarantined), quarantined
    # ---- events: unreadable files are reported (logged), and left where they are
    messages = [rec.getMessage() for rec in caplog.records]
    for label in _contents("x", b"{}"):
        assert any("unreadable event" in m and f"bad-event-{label}" in m for m in messages), label
    assert not [m for m in messages if "internal error" in m], messages
