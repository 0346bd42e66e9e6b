"""Dependencies end to end on every filesystem, run by three workers (processes; in-process
workers on memory://, which other processes cannot see): fan-in of 100 tasks into one, a
chain of 10, a failed dependency cancelling its dependents (and ``on_dependency_failure=
"run"`` running one anyway), and no task started before its dependencies finished (each task
checks its dependencies' marker files when it starts: ``dependency_tasks.py``). Unknown ids
and cycles are refused, storing nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from omniq.backend.file import AsyncFileBackend
from omniq.core.errors import DependencyCycleError, UnknownDependencyError
from omniq.core.models import EventType, ResultStatus, TaskStatus

TESTS_DIR = Path(__file__).resolve().parent
OMNIQ = str(Path(sys.executable).with_name("omniq"))
STEP, FAIL = "dependency_tasks:step", "dependency_tasks:fail"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def make(storage: Any, **settings: Any) -> AsyncFileBackend:
    return AsyncFileBackend(
        storage.base_dir, storage.storage_options, environ={}, lease=10, **settings
    )


async def run_workers(storage: Any, backend: AsyncFileBackend, n: int = 3) -> None:
    """``n`` workers until the queues stay empty (processes, except on memory://)."""
    if storage.kind == "memory":
        async with anyio.create_task_group() as group:
            for _ in range(n):
                worker = backend.worker(concurrency=4, burst=True, idle_timeout=1.0, poll=0.05)
                group.start_soon(worker.run)
        return
    env = dict(os.environ)
    env["OMNIQ_STORAGE_OPTIONS"] = json.dumps(storage.storage_options)
    args = [OMNIQ, "worker", storage.base_dir, "--burst", "--idle-timeout", "3", "-c", "4"]
    args += ["--path", str(TESTS_DIR), "--lease", "10", "--events"]
    procs = [subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL) for _ in range(n)]
    for proc in procs:
        code = await anyio.to_thread.run_sync(lambda p=proc: p.wait(timeout=300))
        assert code == 0, f"a worker exited with {code}"


def early(log: Path) -> list[str]:
    return sorted(p.name for p in log.glob("*.early"))


@pytest.mark.anyio
async def test_fan_in_of_100_and_a_chain_of_10(storage: Any, tmp_path: Path) -> None:
    log = str(tmp_path)
    async with make(storage, events=True) as backend:
        fan = [await backend.enqueue(STEP, [log, f"f{i}", []]) for i in range(100)]
        sink = await backend.enqueue(
            STEP, [log, "sink", [f"f{i}" for i in range(100)]], depends_on=fan
        )
        links = [
            backend.make_task(STEP, [log, f"c{i}", [f"c{i - 1}"] if i else []]) for i in range(10)
        ]
        chain = await backend.chain(*links)
        assert chain == [t.id for t in links]
        assert (await backend.get_task(sink)).status is TaskStatus.WAITING
        assert (await backend.get_task(chain[5])).status is TaskStatus.WAITING
        assert (await backend.queue.size()).ready == 101  # waiting tasks are not ready
        await run_workers(storage, backend)
        assert early(tmp_path) == []  # no task started before its dependencies finished
        for task_id in [sink, *chain]:
            result = await backend.result(task_id, wait=30)
            assert result is not None and result.ok, result
        assert (await backend.result(sink)).value == "sink"  # type: ignore[union-attr]
        done = {p.stem for p in tmp_path.glob("*.done")}
        assert done == {f"f{i}" for i in range(100)} | {f"c{i}" for i in range(10)} | {"sink"}
        # Each started after the previous one finished (their marker times say so too).
        times = [float((tmp_path / f"c{i}.done").read_text()) for i in range(10)]
        assert times == sorted(times)
        kinds = [e.type for e in await backend.events.query(sink)]  # type: ignore[union-attr]
        assert EventType.WAITING in kinds and EventType.SUCCEEDED in kinds


@pytest.mark.anyio
async def test_a_failed_dependency_cancels_its_dependents_or_runs_them(
    storage: Any, tmp_path: Path
) -> None:
    log = str(tmp_path)
    async with make(storage, events=True) as backend:
        bad = await backend.enqueue(FAIL, [log, "bad"], max_retries=0)
        good = await backend.enqueue(STEP, [log, "good", []])
        child = await backend.enqueue(STEP, [log, "child", ["bad"]], depends_on=[bad, good])
        grandchild = await backend.enqueue(STEP, [log, "grandchild", []], depends_on=[child])
        anyway = await backend.enqueue(
            STEP, [log, "anyway", ["good"]], depends_on=[bad, good], on_dependency_failure="run"
        )
        await run_workers(storage, backend)
        assert (await backend.get_task(bad)).status is TaskStatus.DEAD
        for task_id, cause in ((child, bad), (grandchild, child)):
            info = await backend.get_task(task_id)
            assert info.status is TaskStatus.CANCELLED
            assert info.error is not None and cause in info.error.message
            result = await backend.result(task_id, wait=30)
            assert result is not None and result.status is ResultStatus.FAILURE
            assert result.error is not None and cause in result.error.message
        assert not (tmp_path / "child.done").exists()
        assert not (tmp_path / "grandchild.done").exists()
        assert (await backend.result(anyway, wait=30)).ok  # type: ignore[union-attr]
        assert early(tmp_path) == []
        ran = float((tmp_path / "anyway.done").read_text())
        assert ran > float((tmp_path / "bad.failed").read_text())  # after the failure
        kinds = [e.type for e in await backend.events.query(child)]  # type: ignore[union-attr]
        assert EventType.CANCELLED in kinds


@pytest.mark.anyio
async def test_unknown_ids_and_cycles_are_refused_and_nothing_is_stored(storage: Any) -> None:
    async with make(storage) as backend:
        a = await backend.enqueue(STEP, ["/nonexistent", "a", []])
        before = await backend.queue.size()
        with pytest.raises(UnknownDependencyError, match="nope") as caught:
            await backend.enqueue(STEP, depends_on=[a, "nope"], task_id="t1")
        assert caught.value.task_ids == ["nope"]
        with pytest.raises(DependencyCycleError, match="itself"):
            await backend.enqueue(STEP, depends_on=[a], task_id=a)
        with pytest.raises(DependencyCycleError):
            await backend.enqueue(STEP, depends_on=["t2"], task_id="t2")
        b = await backend.enqueue(STEP, depends_on=[a], task_id="b")
        with pytest.raises(DependencyCycleError, match="would depend on itself"):
            await backend.enqueue(STEP, depends_on=[b], task_id=a)  # a <- b <- a
        for missing in ("t1", "t2"):
            with pytest.raises(Exception, match="not found"):
                await backend.get_task(missing)
        assert await backend.queue.size() == before
        assert (await backend.get_task(b)).status is TaskStatus.WAITING
        assert (await backend.get_task(a)).status is TaskStatus.PENDING
        # A cancelled waiting task is withdrawn: it never becomes ready.
        assert await backend.cancel(b)
        assert (await backend.get_task(b)).status is TaskStatus.CANCELLED
