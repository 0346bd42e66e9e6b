"""Many processes draining one queue, and workers killed while they hold tasks."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from omniq.core import LeaseLostError, Task
from omniq.storage.file.queue import AsyncFileQueue
from queue_helpers import make_queue

SPAWN = multiprocessing.get_context("spawn")


def _drain_process(base_dir: str, options: dict[str, Any], consumers: int, out: str) -> None:
    """One process with ``consumers`` async consumers, each its own queue instance."""

    async def consumer(index: int) -> list[dict[str, Any]]:
        records = []
        async with AsyncFileQueue(base_dir, options, lease=60) as q:
            idle = 0
            while idle < 3:
                claimed = await q.dequeue(wait=0.3, worker_id=f"{os.getpid()}-{index}")
                if claimed is None:
                    idle += 1
                    continue
                idle = 0
                start = time.time()
                await asyncio.sleep(0)  # let other consumers interleave
                try:
                    await q.ack(claimed)
                    ok = True
                except LeaseLostError:
                    ok = False
                records.append(
                    {
                        "id": claimed.id,
                        "attempt": claimed.attempt,
                        "ok": ok,
                        "worker": claimed.worker_id,
                        "start": start,
                        "end": time.time(),
                    }
                )
        return records

    async def main() -> None:
        results = await asyncio.gather(*(consumer(i) for i in range(consumers)))
        Path(out).write_text(json.dumps([r for rs in results for r in rs]))

    asyncio.run(main())


def _race(storage, tmp_path: Path, tasks: int, processes: int, consumers: int) -> None:
    async def fill() -> list[str]:
        async with make_queue(storage) as q:
            ids = []
            for start in range(0, tasks, 500):
                ids += await q.enqueue_many(
                    [Task(func="m:f", args=[i]) for i in range(start, min(tasks, start + 500))]
                )
            return ids

    ids = asyncio.run(fill())
    outs = [str(tmp_path / f"out{i}.json") for i in range(processes)]
    procs = [
        SPAWN.Process(
            target=_drain_process, args=(storage.base_dir, storage.storage_options, consumers, out)
        )
        for out in outs
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
        assert p.exitcode == 0
    records = [r for out in outs for r in json.loads(Path(out).read_text())]
    claimed_ids = [r["id"] for r in records]
    assert len(claimed_ids) == len(set(claimed_ids)), "a task was claimed twice"
    assert sorted(claimed_ids) == sorted(ids), "tasks were lost"
    assert all(r["ok"] and r["attempt"] == 1 for r in records)
    assert len({r["worker"] for r in records}) > 1, "only one consumer did any work"

    async def left() -> Any:
        async with make_queue(storage) as q:
            return await q.size()

    size = asyncio.run(left())
    assert (size.ready, size.running, size.scheduled) == (0, 0, 0)


def test_race_local_4_processes_x_8_consumers(local_storage, tmp_path: Path) -> None:
    _race(local_storage, tmp_path, tasks=2000, processes=4, consumers=8)


def test_race_remote_4_processes_x_8_consumers(remote_storage, tmp_path: Path) -> None:
    _race(remote_storage, tmp_path, tasks=160, processes=4, consumers=8)


def _hold_and_hang(base_dir: str, options: dict[str, Any], count: int, flag: str) -> None:
    async def main() -> None:
        q = AsyncFileQueue(base_dir, options, lease=1.0, clock_skew=0.3)
        held = [await q.dequeue(worker_id="doomed") for _ in range(count)]
        Path(flag).write_text(json.dumps([c.id for c in held if c is not None]))
        await asyncio.sleep(3600)

    asyncio.run(main())


@pytest.mark.parametrize("count", [5])
def test_sigkilled_worker_loses_nothing(storage_for_processes, tmp_path: Path, count: int) -> None:
    storage = storage_for_processes

    async def fill() -> list[str]:
        async with make_queue(storage) as q:
            return await q.enqueue_many([Task(func="m:f", args=[i]) for i in range(count + 3)])

    ids = asyncio.run(fill())
    flag = tmp_path / "held.json"
    proc = SPAWN.Process(
        target=_hold_and_hang, args=(storage.base_dir, storage.storage_options, count, str(flag))
    )
    proc.start()
    deadline = time.time() + 60
    while not flag.exists() and time.time() < deadline:
        time.sleep(0.05)
    held = json.loads(flag.read_text())
    assert len(held) == count
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()

    async def drain() -> dict[str, int]:
        done: dict[str, int] = {}
        async with make_queue(storage, lease=1.0, clock_skew=0.3) as q:
            end = time.time() + 30
            while len(done) < len(ids) and time.time() < end:
                claimed = await q.dequeue(wait=0.5)
                if claimed is not None:
                    await q.ack(claimed)
                    done[claimed.id] = claimed.attempt
        return done

    done = asyncio.run(drain())
    assert sorted(done) == sorted(ids)
    assert all(done[i] == 2 for i in held), "held tasks come back as attempt 2"
    assert all(done[i] == 1 for i in set(ids) - set(held))


@pytest.fixture(params=["local", "s3"])
def storage_for_processes(request, tmp_path: Path):
    import uuid

    from conftest import StorageTarget

    if request.param == "local":
        return StorageTarget("local", str(tmp_path / "store"), {})
    s3 = request.getfixturevalue("s3_emulator")
    return StorageTarget("s3", s3.url(f"kill-{uuid.uuid4().hex}"), dict(s3.storage_options))


def _enqueue_forever(base_dir: str, flag: str) -> None:
    async def main() -> None:
        async with AsyncFileQueue(base_dir) as q:
            Path(flag).write_text("go")
            payload = "x" * 200_000  # big documents make a kill mid-write likely
            while True:
                await q.enqueue(Task(func="m:f", args=[payload]))

    asyncio.run(main())


def test_enqueue_killed_mid_write_leaves_no_garbage(local_storage, tmp_path: Path) -> None:
    for round_ in range(3):
        base = local_storage.sub(f"round{round_}")
        flag = tmp_path / f"flag{round_}"
        proc = SPAWN.Process(target=_enqueue_forever, args=(base.base_dir, str(flag)))
        proc.start()
        while not flag.exists():
            time.sleep(0.01)
        time.sleep(0.2 + 0.1 * round_)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()

        async def check(target=base) -> int:
            async with make_queue(target) as q:
                n = 0
                while (c := await q.dequeue()) is not None:
                    assert len(c.task.args[0]) == 200_000
                    await q.ack(c)
                    n += 1
                assert await q.store.listdir("default/quarantine") == []
                return n

        assert asyncio.run(check()) > 0


def test_failed_write_leaves_no_task(local_storage, monkeypatch) -> None:
    real_write = os.write

    def half_then_fail(fd: int, data: Any) -> int:
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(28, "No space left on device")

    async def run() -> None:
        async with make_queue(local_storage) as q:
            assert await q.dequeue() is None  # runs the start-up probe first
            monkeypatch.setattr(os, "write", half_then_fail)
            with pytest.raises(OSError):
                await q.enqueue(Task(func="m:f"))
            monkeypatch.setattr(os, "write", real_write)
            assert await q.dequeue() is None
            assert (await q.size()).total == 0

    asyncio.run(run())
    leftovers = [p for p in Path(local_storage.base_dir).rglob("*") if p.is_file()]
    assert all(p.name.startswith(".tmp-") is False for p in leftovers)
