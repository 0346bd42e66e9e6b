"""The task context: what a task learns about its attempt, progress and metadata persisted
with the attempt (rate-limited) and seen by other processes, the result's final metadata,
progress events, cooperative cancellation; async, thread and process tasks.

Task functions live in ``context_tasks``."""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from omniq.backend.file import AsyncFileBackend, TaskContext
from omniq.backend.file._task_context import (
    ChildLink,
    call_in_process,
    context_parameter,
    with_context,
)
from omniq.core import NotFoundError, SerializationError
from omniq.core.context import MAX_METADATA_BYTES, MAX_PROGRESS_MESSAGE
from omniq.core.models import EventType, ResultStatus, TaskStatus

TESTS_DIR = Path(__file__).resolve().parent
QUICK = pytest.mark.parametrize("storage", ["memory", "local"], indirect=True)
# Seen from another process: not memory:// (one dict per process).
SHARED = pytest.mark.parametrize("storage", ["local", "s3", "azure", "gcs"], indirect=True)
BURST = {"burst": True, "idle_timeout": 0.3, "poll": 0.1}
# The console script: with ``python -m omniq.backend.file.cli`` anyio's process pool fails to
# start its workers (it re-runs the ``__main__`` module in them).
OMNIQ = str(Path(sys.executable).with_name("omniq"))


@pytest.fixture
def anyio_backend():
    return "asyncio"


def make(storage, **settings: Any) -> AsyncFileBackend:
    return AsyncFileBackend(storage.base_dir, storage.storage_options, environ={}, **settings)


def subprocess_env(storage) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), *filter(None, [env.get("PYTHONPATH")])])
    env["OMNIQ_STORAGE_OPTIONS"] = json.dumps(storage.storage_options)
    return env


# -- what a task is given ------------------------------------------------------------------
@QUICK
@pytest.mark.parametrize("processes", [None, 2])
@pytest.mark.anyio
async def test_a_task_gets_its_context_in_threads_processes_and_async(storage, processes):
    async with make(storage) as backend:
        thread_id = await backend.enqueue("context_tasks:describe", [5], metadata={"a": 1})
        async_id = await backend.enqueue("context_tasks:async_describe", [6], queue="q2")
        plain_id = await backend.enqueue("context_tasks:plain", [1])
        worker = backend.worker(["default", "q2"], processes=processes, **BURST)
        await worker.run()
        seen = await backend.result(thread_id)
        assert seen is not None and seen.ok
        assert seen.value["task_id"] == thread_id
        assert seen.value["attempt"] == 1
        assert seen.value["queue"] == "default"
        assert seen.value["func"] == "context_tasks:describe"
        assert seen.value["worker_id"] == worker.worker_id
        assert seen.value["enqueued"] is not None
        # With processes=N the function ran in another process, with a forwarded context.
        assert (seen.value["pid"] != os.getpid()) is bool(processes)
        assert seen.metadata == {"a": 1, "seen": 5}  # enqueue-time metadata plus update()
        other = await backend.result(async_id)
        assert other is not None and other.value == {"task_id": async_id, "attempt": 1, "x": 6}
        assert other.metadata == {"seen": 6}
        plain = await backend.result(plain_id)
        assert plain is not None and plain.value == 2 and plain.metadata == {}


def test_which_parameter_gets_the_context_and_where():
    def first(ctx: TaskContext, x: int) -> None: ...
    def later(x: int, ctx: TaskContext, y: int = 0) -> None: ...
    def keyword(x: int, *, c: TaskContext) -> None: ...
    def none(x: int, ctx: Any) -> None: ...

    assert context_parameter(first) == (0, "ctx")
    assert context_parameter(later) == (1, "ctx")
    assert context_parameter(keyword) == (None, "c")
    assert context_parameter(none) is None
    ctx = object()
    assert with_context((0, "ctx"), [1], {}, ctx) == ([ctx, 1], {})
    assert with_context((1, "ctx"), [1, 2], {}, ctx) == ([1, ctx, 2], {})
    assert with_context((1, "ctx"), [], {"x": 1}, ctx) == ([], {"x": 1, "ctx": ctx})
    assert with_context((None, "c"), [1], {}, ctx) == ([1], {"c": ctx})


def test_bad_progress_and_metadata_are_refused_and_change_nothing():
    ctx = TaskContext(task_id="t", attempt=1, queue="q", func="m:f", worker_id="w")
    ctx.progress(1, 4, "one")
    ctx.update(stage="a")
    for bad in ("3", None, True, float("nan"), float("inf")):
        with pytest.raises((TypeError, ValueError)):
            ctx.progress(bad)
    with pytest.raises(TypeError):
        ctx.progress(1, 2, message=3)
    with pytest.raises(SerializationError):
        ctx.update(when=object())
    with pytest.raises(SerializationError):
        ctx.update(big="x" * MAX_METADATA_BYTES)
    progress, meta, changed = ctx._take()
    assert progress is not None and (progress.done, progress.total) == (1.0, 4.0)
    assert progress.message == "one" and progress.fraction == 0.25
    assert meta == {"stage": "a"} and changed


# -- what is persisted is what was checked ---------------------------------------------------
def test_metadata_is_read_only_and_update_keeps_a_copy():
    ctx = TaskContext(
        task_id="t", attempt=1, queue="q", func="m:f", worker_id="w", metadata={"a": 1}
    )
    items: list[Any] = ["a"]
    nested: dict[str, Any] = {"k": []}
    ctx.update(items=items, nested=nested)
    items.extend(["x" * 1000] * 100)  # past the limit, after update() checked it
    items.append(object())
    nested["k"].append(object())
    with pytest.raises(TypeError):
        ctx.metadata["h"] = object()  # type: ignore[index]
    ctx.metadata["nested"]["k"].append(object())  # a copy: changes nothing kept
    expected = {"a": 1, "items": ["a"], "nested": {"k": []}}
    assert dict(ctx.metadata) == expected
    _, meta, _ = ctx._take()
    assert meta == expected


def test_a_long_progress_message_is_cut_and_counted_with_the_metadata():
    ctx = TaskContext(task_id="t", attempt=1, queue="q", func="m:f", worker_id="w")
    ctx.progress(0, message="x" * 10**7)
    progress, _, _ = ctx._take()
    assert progress is not None and progress.message is not None
    assert len(progress.message) == MAX_PROGRESS_MESSAGE and progress.message.endswith("\u2026")
    # Metadata and progress share the limit: 1024 control characters encode to 6 KiB.
    ctx.update(big="x" * (MAX_METADATA_BYTES - 3000))
    with pytest.raises(SerializationError):
        ctx.progress(1, message="\x00" * MAX_PROGRESS_MESSAGE)
    progress, _, _ = ctx._take()
    assert progress is not None and progress.done == 0  # unchanged
    other = TaskContext(task_id="t", attempt=1, queue="q", func="m:f", worker_id="w")
    other.progress(1, message="\x00" * MAX_PROGRESS_MESSAGE)
    with pytest.raises(SerializationError):
        other.update(big="x" * (MAX_METADATA_BYTES - 3000))
    assert dict(other.metadata) == {}


@QUICK
@pytest.mark.parametrize(
    ("func", "value", "metadata"),
    [
        ("context_tasks:non_json_metadata", True, {"step": 1}),
        ("context_tasks:mutates_after_update", 102, {"items": ["a"]}),
    ],
    ids=["assigned", "mutated"],
)
@pytest.mark.anyio
async def test_a_non_json_value_in_ctx_metadata_does_not_strand_the_task(
    storage, func, value, metadata
):
    """From the review of issue 15: a non-JSON value put into ``ctx.metadata``, or a value
    passed to ``update`` and changed later, made every heartbeat fail (the lease was never
    extended) and the result unstorable: the task stayed 'running' with no outcome."""
    async with make(storage, lease=0.9) as backend:
        task_id = await backend.enqueue(func)
        extended: list[Any] = []
        real = backend.queue.extend_lease

        async def counting(claimed, seconds=None, **values):
            got = await real(claimed, seconds, **values)
            extended.append(values.get("metadata"))
            return got

        backend.queue.extend_lease = counting  # type: ignore[method-assign]
        worker = backend.worker(progress_interval=0.05, **BURST)
        await worker.run()
        info = await backend.get_task(task_id)
        assert info.status is TaskStatus.DONE, "the task was left running, no outcome"
        result = await backend.result(task_id)
        assert result is not None and result.ok and result.value == value
        assert result.metadata == metadata
        assert extended and all(m in (None, metadata) for m in extended)


# -- a process task's link to the worker -----------------------------------------------------
@pytest.mark.anyio
async def test_a_silent_local_connection_does_not_keep_the_child_process_out(monkeypatch):
    """Another local process connecting to the link's socket first (saying nothing, or a
    wrong token) is dropped after a short wait; the child's reports still arrive."""
    monkeypatch.setattr(ChildLink, "TOKEN_TIMEOUT", 0.2)
    ctx = TaskContext(task_id="t", attempt=1, queue="q", func="m:f", worker_id="w")
    link = ChildLink(ctx, (0, "ctx"), 0.01)
    spec = link.spec()
    address = tuple(spec["address"])
    with socket.create_connection(address) as silent, socket.create_connection(address) as bad:
        bad.sendall(b"0" * 32 + b"\n")
        seen = await anyio.to_thread.run_sync(
            call_in_process, "context_tasks:describe", [7], {}, spec
        )
        assert seen["x"] == 7
        await link.close()
        assert not link.thread.is_alive()
        assert dict(ctx.metadata) == {"seen": 7}
        silent.settimeout(5)
        assert silent.recv(1) == b""  # the link closed it


# -- seen from another process while the task runs -------------------------------------------
def _cli(storage, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [OMNIQ, *args],
        env=subprocess_env(storage),
        capture_output=True,
        text=True,
        timeout=120,
    )


@SHARED
@pytest.mark.parametrize(
    ("func", "processes"),
    [
        ("context_tasks:report_then_wait", None),
        ("context_tasks:async_report_then_wait", None),
        ("context_tasks:report_then_wait", 1),
    ],
    ids=["thread", "async", "process"],
)
@pytest.mark.anyio
async def test_progress_is_seen_by_other_processes_while_the_task_runs(
    storage, tmp_path, func, processes
):
    gate = tmp_path / "gate"
    worker_args = ["worker", storage.base_dir, "--burst", "--progress-interval", "0.05"]
    if processes:
        worker_args += ["--processes", str(processes)]
    async with make(storage, events=True) as backend:
        task_id = await backend.enqueue(func, [str(gate)])
        worker = subprocess.Popen(
            [OMNIQ, *worker_args, "--events"],
            env=subprocess_env(storage),
        )
        try:
            with anyio.fail_after(60):  # this process never ran the task: it reads storage
                while True:
                    try:
                        info = await backend.get_task(task_id)
                    except NotFoundError:  # seen on azure while the task is claimed: reported
                        await anyio.sleep(0.05)
                        continue
                    if info.progress is not None and info.metadata.get("stage") == "waiting":
                        break
                    assert worker.poll() is None, "the worker exited early"
                    await anyio.sleep(0.05)
            assert info.status is TaskStatus.RUNNING
            assert (info.progress.done, info.progress.total) == (3, 6)
            assert info.progress.message == "step 3" and info.progress.at is not None
            shown = await anyio.to_thread.run_sync(
                _cli, storage, "status", storage.base_dir, "--task", task_id
            )
            assert shown.returncode == 0, shown.stderr
            assert f"task {task_id}  running" in shown.stdout
            assert "progress  50% (3/6)  step 3" in shown.stdout
            assert 'metadata  {"stage":"waiting"}' in shown.stdout
            as_json = await anyio.to_thread.run_sync(
                _cli, storage, "status", storage.base_dir, "--task", task_id, "--json"
            )
            assert json.loads(as_json.stdout)["progress"]["done"] == 3
            gate.touch()
            result = await backend.result(task_id, wait=60)
        finally:
            gate.touch()
            worker.wait(timeout=60)
        assert result is not None and result.ok and result.value == "ok"
        assert result.metadata == {"stage": "finished"}
        reported = [
            e.data for e in await backend.events.query(task_id) if e.type is EventType.PROGRESS
        ]
        assert reported[0]["done"] == 3 or reported[0]["done"] < 3  # the first writes
        assert reported[-1] == {"done": 6, "total": 6, "message": "done"}  # the last, flushed
        assert (await backend.get_task(task_id)).status is TaskStatus.DONE


# -- the rate limit ------------------------------------------------------------------------
@QUICK
@pytest.mark.anyio
async def test_a_tight_progress_loop_writes_at_most_once_per_interval(storage):
    interval, calls = 0.05, 100_000
    async with make(storage, events=True) as backend:
        writes: list[float] = []
        real = backend.queue.extend_lease

        async def counting(claimed, seconds=None, **values):
            if values.get("progress") is not None:
                writes.append(time.monotonic())
            return await real(claimed, seconds, **values)

        backend.queue.extend_lease = counting  # type: ignore[method-assign]
        task_id = await backend.enqueue("context_tasks:tight_loop", [calls])
        worker = backend.worker(progress_interval=interval, **BURST)
        await worker.run()
        result = await backend.result(task_id)
        assert result is not None and result.ok
        seconds = result.value["seconds"]
        # The bound: one write per interval while the loop runs, plus the first one.
        assert 1 <= len(writes) <= seconds / interval + 2, (len(writes), seconds)
        gaps = [b - a for a, b in itertools.pairwise(writes)]
        assert all(gap >= interval * 0.9 for gap in gaps), gaps
        events = [e for e in await backend.events.query(task_id) if e.type is EventType.PROGRESS]
        assert len(events) <= len(writes) + 1  # one per write, plus the last value at the end
        assert events[-1].data == {"done": calls, "total": calls}
        print(
            f"\n{calls} ctx.progress calls in {seconds:.3f} s: {len(writes)} writes "
            f"({len(writes) / max(seconds, 1e-9):.1f} writes/s; interval {interval} s)"
        )


# -- cancellation ----------------------------------------------------------------------------
@QUICK
@pytest.mark.anyio
async def test_a_thread_task_stops_when_cancelled_through_its_context(storage, tmp_path):
    gate = tmp_path / "running"
    async with make(storage, events=True) as backend:
        task_id = await backend.enqueue("context_tasks:until_cancelled", [str(gate)])
        # Heartbeats every 20 s: only the early heartbeats asked by ctx.cancelled can see
        # the cancel request within this test's time.
        worker = backend.worker(lease=60.0, progress_interval=0.05, **BURST)
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            with anyio.fail_after(10):
                while not gate.exists():
                    await anyio.sleep(0.02)
            assert await backend.cancel(task_id)
            with anyio.fail_after(10):
                while not Path(f"{gate}.stopped").exists():  # the thread itself returned
                    await anyio.sleep(0.02)
        result = await backend.result(task_id)
        assert result is not None and result.status is ResultStatus.FAILURE
        assert result.error is not None and "Cancel" in result.error.type
        assert worker.stats["cancelled"] == 1
        assert (await backend.get_task(task_id)).status is TaskStatus.CANCELLED
