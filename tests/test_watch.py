"""Wake-ups instead of polls on a local directory (inotify): an idle consumer sees a new task
when it is written, not at its next poll. The poll intervals here are far longer than the
waits allowed, so a test passes only if the wake-up, not the timer, delivered the task."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest

from omniq.core import Task
from omniq.core._watch import DirWatch
from omniq.storage.file.queue import AsyncFileQueue

pytestmark = pytest.mark.anyio  # on Linux, which has inotify (CI runs there)

NEVER = 60.0  # a poll interval no test waits for


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _watch(dirs: list[Path]) -> DirWatch:
    watch = DirWatch.open([str(d) for d in dirs])
    assert watch is not None, "Linux offers inotify: the watch must be used"
    return watch


async def test_a_new_file_wakes_the_waiter(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    ready.mkdir()
    watch = _watch([ready])
    try:
        assert await watch.wait(0.05) is False  # nothing happened
        (ready / "t.1.json").write_bytes(b"{}")
        with anyio.fail_after(5):
            assert await watch.wait(NEVER) is True
        assert await watch.wait(0.05) is False  # the event was consumed
        (tmp_path / "elsewhere").write_bytes(b"")  # not a watched directory
        assert await watch.wait(0.05) is False
    finally:
        watch.close()


async def test_directories_created_later_are_watched(tmp_path: Path) -> None:
    """``queue/ready`` may not exist yet, and priority directories appear inside it: a file
    in a priority directory created after the watch still wakes the waiter."""
    ready = tmp_path / "q" / "ready"
    watch = _watch([ready])
    try:
        ready.mkdir(parents=True)
        await watch.wait(0.2)  # the parent's event: ready/ is watched from now on
        rank = ready / "p0999"
        rank.mkdir()
        await watch.wait(0.2)
        temp = tmp_path / "tmp"
        temp.write_bytes(b"{}")
        os.replace(temp, rank / "t.1.json")  # renamed into place, as a local write does
        with anyio.fail_after(5):
            assert await watch.wait(NEVER) is True
    finally:
        watch.close()


async def test_a_directory_and_its_subdirectory_created_at_once(tmp_path: Path) -> None:
    """Found by the pickup benchmark: ``ready/`` and ``ready/p0999/`` both appeared before
    the watch read its events; the priority directory was never watched, so the waiter
    fell back to polling for good."""
    ready = tmp_path / "ready"
    watch = _watch([ready])
    try:
        (ready / "p0999").mkdir(parents=True)
        assert await watch.wait(NEVER) is True  # the parent's event
        (ready / "p0999" / "t.1.json").write_bytes(b"{}")
        with anyio.fail_after(5):
            assert await watch.wait(NEVER) is True
    finally:
        watch.close()


async def test_an_idle_dequeue_is_woken_by_an_enqueue(tmp_path: Path) -> None:
    base = str(tmp_path / "store")
    consumer = AsyncFileQueue(base, poll_interval=NEVER, max_poll_interval=NEVER)
    producer = AsyncFileQueue(base)
    got: list[str] = []

    async def consume() -> None:
        claimed = await consumer.dequeue("default", wait=NEVER * 2)
        assert claimed is not None
        got.append(claimed.id)
        await consumer.ack(claimed)

    async with consumer, producer:
        with anyio.fail_after(10):  # far below the poll interval: only a wake-up delivers it
            async with anyio.create_task_group() as tg:
                tg.start_soon(consume)
                await anyio.sleep(0.3)  # the consumer is idle, waiting
                task_id = await producer.enqueue(Task(func="m:f"))
    assert got == [task_id]
