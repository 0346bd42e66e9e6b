"""Review of issue 15's dependencies: failing tests that prove bugs (see each docstring)."""

from __future__ import annotations

from pathlib import Path

import pytest

from omniq.core.errors import DependencyError
from omniq.core.models import Task, TaskStatus
from omniq.storage.file.queue import AsyncFileQueue


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_a_dependency_id_cannot_escape_base_dir(tmp_path: Path) -> None:
    """depends_on ids are never validated: '../..' in one is read and written outside
    base_dir (the link {q}/deps/{dep}/{id})."""
    base = tmp_path / "base"
    base.mkdir()
    (tmp_path / "outside.json").write_bytes(b"{}")  # any file outside base_dir
    queue = AsyncFileQueue(str(base))
    try:
        await queue.enqueue(Task(func="m:f", id="A"))
        await queue.enqueue(Task(func="m:f", id="W", depends_on=["A"]))  # wait/ and deps/ made
        refused = False
        try:
            await queue.enqueue(Task(func="m:f", id="T", depends_on=["../../../outside"]))
        except (ValueError, DependencyError):
            refused = True
    finally:
        await queue.close()
    assert not (tmp_path / "outside").exists(), "a link was written outside base_dir"
    assert refused, "a dependency id with '/' and '..' was accepted"


@pytest.mark.anyio
async def test_enqueueing_a_waiting_id_again_never_releases_it_early(tmp_path: Path) -> None:
    """Enqueue is 'idempotent for the same id', but a second enqueue of a waiting id with
    another dependency adds a link (counting 1 dependency) by which that one releases the
    task, although the dependency it was stored with never ran."""
    queue = AsyncFileQueue(f"file://{tmp_path}", clock=lambda: 1_000_000.0)
    try:
        await queue.enqueue(Task(func="m:f", id="A"))
        await queue.enqueue(Task(func="m:f", id="T", depends_on=["A"]))
        await queue.enqueue(Task(func="m:f", id="C"))
        await queue.enqueue(Task(func="m:f", id="T", depends_on=["C"]))  # 'idempotent'
        claimed = await queue.dequeue_many(2)
        await queue.ack(next(c for c in claimed if c.id == "C"))  # C done; A never acked
        await queue.close()  # the flush
        info = await queue.get_task("T")
        assert info.status is TaskStatus.WAITING, f"T is {info.status.value}; A never ran"
    finally:
        await queue.close()
