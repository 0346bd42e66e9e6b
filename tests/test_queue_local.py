"""Local-directory claims: the ready file itself becomes the claim (a hard link), its mtime
the lease. No file is created per claim; these tests pin that down and its edge cases."""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from omniq.core import ConfigurationError, LeaseLostError, Task, TaskStatus, _local_ops, codec
from omniq.core._local_ops import LocalOps
from omniq.core.fs import TakeResult, TakeStatus
from omniq.core.models import Claimed
from omniq.storage.file.queue import AsyncFileQueue, FileQueue
from queue_helpers import FakeClock

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request) -> str:
    return request.param


def _ready_files(base: Path) -> list[Path]:
    return sorted((base / "default" / "ready").rglob("*.json"))


def _run_file(base: Path, task_id: str, attempt: int) -> Path:
    return base / "default" / "run" / f"{task_id}.{attempt}.json"


async def test_claim_takes_the_ready_file_itself(tmp_path: Path) -> None:
    clock = FakeClock()
    async with AsyncFileQueue(tmp_path, lease=30, clock=clock) as q:
        task = Task(func="m:f", args=[1])
        await q.enqueue(task)
        [ready] = _ready_files(tmp_path)
        inode, ready_bytes = ready.stat().st_ino, ready.read_bytes()
        claimed = await q.dequeue(worker_id="w-7")
        assert claimed is not None and claimed.task == task
        run = _run_file(tmp_path, task.id, 1)
        assert not ready.exists()
        assert run.stat().st_ino == inode  # the same file: nothing was created
        assert run.stat().st_nlink == 1
        assert run.stat().st_mtime == pytest.approx(clock.t + 30, abs=0.01)
        assert [p.name for p in run.parent.iterdir()] == [run.name]  # no temp file left
        info = await q.get_task(task.id)
        assert info.status is TaskStatus.RUNNING and info.task == task
        assert info.lease_until is not None
        assert abs((info.lease_until - claimed.lease_until).total_seconds()) < 0.01
        assert info.worker_id in ("w-7", None)  # None where user xattrs are unsupported
        await q.ack(claimed)
        # The ack is a second name for the same file: the outcome, made without a new file.
        outcome = run.with_name(f"{task.id}.1.x")
        assert run.read_bytes() == ready_bytes and outcome.stat().st_ino == inode
        assert (await q.get_task(task.id)).status is TaskStatus.DONE


async def test_the_lease_lives_in_the_mtime(tmp_path: Path) -> None:
    """Another queue instance (another worker) takes the task over exactly when the mtime
    lease plus the clock-skew tolerance has passed, not before; a heartbeat moves it (as
    lease epoch 1, an exclusive create beside the claim)."""
    clock = FakeClock()
    owner = AsyncFileQueue(tmp_path, lease=10, clock_skew=2, clock=clock)
    other = AsyncFileQueue(tmp_path, lease=10, clock_skew=2, clock=clock)
    async with owner, other:
        task = Task(func="m:f")
        await owner.enqueue(task)
        claimed = await owner.dequeue()
        assert claimed is not None
        clock.advance(9)
        claimed = await owner.extend_lease(claimed, 10)  # lease now ends at t0 + 19
        run = _run_file(tmp_path, task.id, 1)
        epoch = json.loads(run.with_name(f"{task.id}.1.1").read_bytes())
        assert epoch["state"] == "lease" and claimed.epoch == 1
        assert epoch["lease_until"] == pytest.approx(clock.t + 10, abs=0.01)
        clock.advance(10.5)  # past the lease, inside the skew
        assert await other.reap() == []
        assert await other.dequeue() is None
        clock.advance(2)
        [taken] = await other.reap()
        assert taken.id == task.id and taken.attempt == 1
        again = await other.dequeue()
        assert again is not None and again.attempt == 2
        with pytest.raises(LeaseLostError):
            await owner.ack(claimed)
        await other.ack(again)
        assert json.loads(run.with_name(f"{task.id}.1.x").read_bytes())["state"] == "lost"
        assert json.loads(run.with_name(f"{task.id}.1.2").read_bytes())["state"] == "fence"


async def _claim_leaving_the_ready_name(
    q: AsyncFileQueue, tmp_path: Path
) -> tuple[Task, Claimed, Path]:
    """Enqueue and claim a task, then restore its ready name as a claimer killed between
    its link and its unlink leaves it (one file, two names)."""
    task = Task(func="m:f")
    await q.enqueue(task)
    [ready] = _ready_files(tmp_path)
    claimed = await q.dequeue()
    assert claimed is not None
    os.link(_run_file(tmp_path, task.id, 1), ready)
    return task, claimed, ready


async def test_a_stale_ready_name_sharing_a_finished_claim_is_dropped(tmp_path: Path) -> None:
    """A claimer killed between its link and its unlink leaves the ready name pointing at
    the claim. Finished, the claim is still there to guard it: the name is removed, never
    run again, never quarantined, and its lease is not stamped by the claimer that drops it."""
    clock = FakeClock()
    async with AsyncFileQueue(tmp_path, clock=clock) as q:
        task, claimed, ready = await _claim_leaving_the_ready_name(q, tmp_path)
        await q.ack(claimed)
        mtime = ready.stat().st_mtime
        clock.advance(5)
        assert await q.dequeue() is None
        assert _run_file(tmp_path, task.id, 1).stat().st_mtime == mtime
        assert not ready.exists()
        assert not (tmp_path / "default" / "quarantine").exists()
        assert (await q.get_task(task.id)).status is TaskStatus.DONE


async def test_a_stale_ready_name_of_a_running_claim_is_not_run_twice(tmp_path: Path) -> None:
    # Found by another consumer (the claimer was killed; its own queue object would leave a
    # key it tried itself for two refresh_intervals).
    async with AsyncFileQueue(tmp_path) as q, AsyncFileQueue(tmp_path) as other:
        _, claimed, ready = await _claim_leaving_the_ready_name(q, tmp_path)
        assert await other.dequeue() is None  # the attempt is claimed: the copy goes
        assert not ready.exists()
        await q.ack(claimed)
        assert (await q.size()).ready == 0


async def test_without_hard_links_claims_are_documents(tmp_path: Path, monkeypatch) -> None:
    """Filesystems that refuse link(2) (some FUSE/SMB mounts) fall back to O_EXCL creates of
    a claim document; the queue behaves the same."""
    real_link = os.link

    def no_links(src, dst, *args, **kwargs):
        if str(tmp_path) in str(dst):
            raise OSError(errno.EPERM, "Operation not permitted", dst)
        return real_link(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "link", no_links)
    async with AsyncFileQueue(tmp_path) as q:
        task = Task(func="m:f")
        await q.enqueue(task)  # the first call probes the store
        assert not q.store.can_take
        claimed = await q.dequeue(worker_id="w")
        assert claimed is not None and not claimed.token.startswith("ino:")
        stored = _run_file(tmp_path, task.id, 1).read_bytes()
        assert codec.decode(stored, Claimed).token == claimed.token
        info = await q.get_task(task.id)
        assert info.status is TaskStatus.RUNNING and info.worker_id == "w"
        await q.ack(claimed)
        assert (await q.get_task(task.id)).status is TaskStatus.DONE


def test_local_io_thread_mode_and_bad_value(tmp_path: Path) -> None:
    with FileQueue(tmp_path, local_io="thread") as q:
        q.enqueue(Task(func="m:f"))
        claimed = q.dequeue()
        assert claimed is not None and claimed.token.startswith("ino:")
        q.ack(claimed)
        assert q.size().total == 0
    with pytest.raises(ConfigurationError, match="local_io"):
        AsyncFileQueue(tmp_path, local_io="async")


_TMPFILE = getattr(os, "O_TMPFILE", 0)
linux_only = pytest.mark.skipif(not _TMPFILE, reason="O_TMPFILE is Linux's")


@pytest.fixture
def nameless(monkeypatch) -> None:
    """New files nameless from the first one (no timed trial of the two ways)."""
    monkeypatch.setattr(_local_ops, "TRIAL_FILES", 0)


@linux_only
def test_create_links_an_unnamed_file_into_place(tmp_path: Path, monkeypatch, nameless) -> None:
    """An exclusive create writes an O_TMPFILE inode and links it in: the directory changes
    once (no temp name made and removed), and the loser of a second create changes nothing."""
    ops = LocalOps(str(tmp_path))
    (tmp_path / "q" / "ready").mkdir(parents=True)
    real_open, opened, unlinked = os.open, [], []

    def watched_open(path, flags, *args, **kwargs):
        opened.append(flags & _TMPFILE == _TMPFILE)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", watched_open)
    monkeypatch.setattr(os, "unlink", lambda *a, **k: unlinked.append(a))
    assert ops.create("q/ready/a.json", b"first") is True
    assert ops.create("q/ready/a.json", b"second") is False
    assert opened == [True, True] and unlinked == []
    assert [p.name for p in (tmp_path / "q" / "ready").iterdir()] == ["a.json"]
    assert (tmp_path / "q" / "ready" / "a.json").read_bytes() == b"first"
    assert (tmp_path / "q" / "ready" / "a.json").stat().st_nlink == 1


@linux_only
def test_write_links_a_new_name_and_replaces_an_existing_one_whole(
    tmp_path: Path, monkeypatch, nameless
) -> None:
    ops = LocalOps(str(tmp_path))
    (tmp_path / "r").mkdir()
    real_replace, replaced, unlinked = os.replace, [], []

    def watched_replace(src, dst, *args, **kwargs):
        replaced.append(os.path.basename(src))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", watched_replace)
    monkeypatch.setattr(os, "unlink", lambda *a, **k: unlinked.append(a))
    ops.write("r/k.json", b"first")  # new: linked in, nothing renamed or removed
    assert replaced == [] and unlinked == []
    first = (tmp_path / "r" / "k.json").stat().st_ino
    ops.write("r/k.json", b"second, longer")  # existing: a temp name renamed over it
    assert len(replaced) == 1 and replaced[0].startswith(".tmp-") and unlinked == []
    assert (tmp_path / "r" / "k.json").read_bytes() == b"second, longer"
    assert (tmp_path / "r" / "k.json").stat().st_ino != first  # never rewritten in place
    assert [p.name for p in (tmp_path / "r").iterdir()] == ["k.json"]


def _slowed(monkeypatch, nameless_slow: bool) -> None:
    """Every new file of one way takes 20 ms longer (the other way: the disk's own time)."""
    real_open = os.open

    def slow_open(path, flags, *args, **kwargs):
        if (flags & _TMPFILE == _TMPFILE) == nameless_slow and flags & (os.O_CREAT | _TMPFILE):
            time.sleep(0.02)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", slow_open)


@linux_only
@pytest.mark.parametrize("nameless_slow", [True, False])
def test_new_files_are_made_the_way_that_was_faster_here(
    tmp_path: Path, monkeypatch, nameless_slow: bool
) -> None:
    """The first new files alternate between the two ways and are timed; the faster is kept
    (which one depends on the kernel and filesystem: measured, not assumed)."""
    ops = LocalOps(str(tmp_path))
    _slowed(monkeypatch, nameless_slow)
    trial = 2 * _local_ops.TRIAL_FILES
    for i in range(trial):
        if i % 2:
            ops.write(f"d/w{i}", b"w")
        else:
            assert ops.create(f"d/c{i}", b"c") is True
    opened: list[bool] = []
    timed_open = os.open

    def watched(path, flags, *args, **kwargs):
        opened.append(flags & _TMPFILE == _TMPFILE)
        return timed_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", watched)
    for i in range(4):
        assert ops.create(f"d/after{i}", b"x") is True
    assert opened == [not nameless_slow] * 4
    names = sorted(p.name for p in (tmp_path / "d").iterdir())
    assert len(names) == trial + 4 and not [n for n in names if n.startswith(".tmp-")]


@linux_only
def test_writes_where_links_are_refused_keep_the_trial_bounded(tmp_path: Path) -> None:
    """Without hard links every write is named: the trial never ends, but what it keeps
    stays bounded (before, it grew by one timing per write for the life of the store)."""
    ops = LocalOps(str(tmp_path))
    ops._link_ok = False
    for i in range(3 * _local_ops.TRIAL_FILES):
        ops.write(f"d/w{i}", b"w")
    assert ops._way.times is not None and len(ops._way.times[1]) == _local_ops.TRIAL_FILES
    assert len(list((tmp_path / "d").iterdir())) == 3 * _local_ops.TRIAL_FILES


@linux_only
def test_create_uses_a_named_temp_file_where_o_tmpfile_is_refused(
    tmp_path: Path, monkeypatch, caplog, nameless
) -> None:
    ops = LocalOps(str(tmp_path))
    (tmp_path / "d").mkdir()
    real_open, refused = os.open, []

    def no_tmpfile(path, flags, *args, **kwargs):
        if flags & _TMPFILE == _TMPFILE:
            refused.append(path)
            raise OSError(errno.EOPNOTSUPP, "Operation not supported", path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_tmpfile)
    caplog.set_level("INFO", logger="omniq.fs")
    assert ops.create("d/a", b"one") is True
    assert ops.create("d/b", b"two") is True
    assert ops.create("d/a", b"three") is False
    ops.write("d/b", b"four")
    assert (tmp_path / "d" / "b").read_bytes() == b"four"
    assert len(refused) == 1  # asked once, then never again
    assert "O_TMPFILE refused" in caplog.text
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["a", "b"]  # no temp left
    assert (tmp_path / "d" / "a").read_bytes() == b"one"


@linux_only
def test_create_remakes_a_directory_removed_before_the_link(
    tmp_path: Path, monkeypatch, nameless
) -> None:
    """The directory holds no name of the new file until the link, so a clean-up may remove
    it as empty in between; the file is linked into the directory made again."""
    ops = LocalOps(str(tmp_path))
    (tmp_path / "d").mkdir()
    real_link, removed = os.link, []

    def clean_up_first(src, dst, *args, **kwargs):
        if not removed:
            removed.append(dst)
            os.rmdir(tmp_path / "d")
        return real_link(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "link", clean_up_first)
    unlinked: list[object] = []
    monkeypatch.setattr(os, "unlink", lambda *a, **k: unlinked.append(a))
    assert ops.create("d/a", b"data") is True
    assert removed and (tmp_path / "d" / "a").read_bytes() == b"data"
    assert unlinked == []  # the same inode, linked into the new directory: no named temp file


def test_take_reports_gone_and_taken(tmp_path: Path) -> None:
    ops = LocalOps(str(tmp_path))
    (tmp_path / "a").write_bytes(b"x" * 40)
    (tmp_path / "b").write_bytes(b"y" * 40)
    assert ops.take("missing", "run/m", 1.0, "w") == TakeResult(TakeStatus.GONE)
    status, ino = ops.take("a", "run/a", 1234.0, "w")
    assert status is TakeStatus.TAKEN and ino == (tmp_path / "run" / "a").stat().st_ino
    assert not (tmp_path / "a").exists()
    assert (tmp_path / "run" / "a").stat().st_mtime == 1234.0
    (tmp_path / "a2").write_bytes(b"z" * 40)
    assert ops.take("a2", "run/a", 1.0, "w").status is TakeStatus.EXISTS  # the claim exists
    assert (tmp_path / "a2").exists()  # the loser's copy is left to its caller
    assert ops.stat("run/a") is not None and ops.stat("nope") is None
    assert ops.touch("run/a", 99.0) and (tmp_path / "run" / "a").stat().st_mtime == 99.0
    assert ops.touch("nope", 1.0) is False
    assert ops.owner("run/a") in ("w", None)


def test_listdir_names_visible_files_and_survives_an_entry_vanishing(
    tmp_path: Path, monkeypatch
) -> None:
    """``listdir`` names the files of a directory, sorted: not subdirectories, not hidden
    temp files, nothing for a missing directory; an entry deleted while its type is looked
    up (a filesystem without types in its listing) is left out, not the whole listing."""
    ops = LocalOps(str(tmp_path))
    for name in ("b", "a", ".tmp-x", "c"):
        (tmp_path / "d" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "d" / name).write_bytes(b"x")
    (tmp_path / "d" / "sub").mkdir()
    assert ops.listdir("d", False) == ["a", "b", "c"]
    assert ops.listdir("missing", False) == []
    assert ops.listdir("d/a", False) == []  # a file, not a directory
    real_scandir = os.scandir

    class Vanishing:
        def __init__(self, entry: os.DirEntry[str]) -> None:
            self.name, self._entry = entry.name, entry

        def is_file(self) -> bool:
            if self.name == "b":
                raise FileNotFoundError(self.name)
            return self._entry.is_file()

    class Scan:
        def __init__(self, path: str) -> None:
            self._it = real_scandir(path)

        def __iter__(self) -> Iterator[Vanishing]:
            return (Vanishing(e) for e in self._it)

        def __enter__(self) -> Scan:
            return self

        def __exit__(self, *exc: object) -> None:
            self._it.close()

    monkeypatch.setattr(os, "scandir", Scan)
    assert ops.listdir("d", False) == ["a", "c"]


@pytest.mark.parametrize("when", ["after the link", "just before the unlink"])
def test_take_restamps_after_a_racing_loser(tmp_path: Path, monkeypatch, when: str) -> None:
    """A loser racing for the same ready file may stamp its own lease on the shared inode
    between the winner's link and unlink; the winner stamps again once the name is gone (it
    looks after the unlink: a look before it misses a stamp made just before the unlink)."""
    ops = LocalOps(str(tmp_path))
    (tmp_path / "a").write_bytes(b"x" * 40)
    source = str(tmp_path / "a")

    def loser_stamps() -> None:
        os.utime(source, (5.0, 5.0))  # the loser's utime, before the winner's unlink
        if hasattr(os, "setxattr"):
            os.setxattr(source, "user.omniq.owner", b"loser")

    real_link, real_unlink = os.link, os.unlink

    def link_then_loser_stamps(src, dst, *args, **kwargs):
        real_link(src, dst, *args, **kwargs)
        loser_stamps()

    def loser_stamps_then_unlink(path, *args, **kwargs):
        if path == source:
            loser_stamps()
        real_unlink(path, *args, **kwargs)

    if when == "after the link":
        monkeypatch.setattr(os, "link", link_then_loser_stamps)
    else:
        monkeypatch.setattr(os, "unlink", loser_stamps_then_unlink)
    assert ops.take("a", "run/a", 1234.0, "winner").status is TakeStatus.TAKEN
    assert (tmp_path / "run" / "a").stat().st_mtime == 1234.0
    assert ops.owner("run/a") in ("winner", None)


def test_take_stamps_once_when_nobody_raced(tmp_path: Path, monkeypatch) -> None:
    """The lease is stamped before the link; after the unlink only a stamp that was replaced
    is made again (a stamp is a write: one a claim fewer)."""
    ops = LocalOps(str(tmp_path))
    (tmp_path / "a").write_bytes(b"x" * 40)
    stamps: list[object] = []
    real_utime = os.utime

    def counted(path, *args, **kwargs):
        stamps.append(path)
        return real_utime(path, *args, **kwargs)

    monkeypatch.setattr(os, "utime", counted)
    # A whole second: kept as set where a filesystem keeps coarse times.
    assert ops.take("a", "run/a", 1234.0, "w").status is TakeStatus.TAKEN
    assert stamps == [str(tmp_path / "a")]
    assert (tmp_path / "run" / "a").stat().st_mtime == 1234.0


def test_take_refuses_a_leftover_tombstone(tmp_path: Path) -> None:
    ops = LocalOps(str(tmp_path))
    (tmp_path / "a").write_bytes(b"done")
    assert ops.take("a", "run/a", 1.0, "w", min_size=17).status is TakeStatus.EXISTS
    assert not (tmp_path / "a").exists()
    assert (tmp_path / "run" / "a").read_bytes() == b"done"  # stays a tombstone


async def test_a_leftover_name_after_tombstone_cleanup_is_not_run(tmp_path: Path) -> None:
    """The ready name a dead claimer left behind must not outlive its claim: the clean-up of
    a finished attempt (tombstone_ttl later) removes every copy before the claim."""
    clock = FakeClock()
    async with AsyncFileQueue(tmp_path, clock=clock) as q:
        task, claimed, ready = await _claim_leaving_the_ready_name(q, tmp_path)
        await q.ack(claimed)
        clock.advance(q.tombstone_ttl + 1)
        await q.reap()
        assert not ready.exists() and not _run_file(tmp_path, task.id, 1).exists()
        assert await q.dequeue() is None
        assert not (tmp_path / "default" / "quarantine").exists()


async def test_files_that_cannot_be_taken_are_claimed_with_a_document(
    tmp_path: Path, monkeypatch
) -> None:
    """A ready file owned by another user (utime refused) or a link refused after start-up:
    the claim falls back to an exclusive create of a claim document."""
    real_utime = os.utime

    def foreign(path, *args, **kwargs):
        if "/ready/" in str(path):
            raise PermissionError(1, "Operation not permitted", path)
        return real_utime(path, *args, **kwargs)

    async with AsyncFileQueue(tmp_path) as q:
        task = Task(func="m:f")
        await q.enqueue(task)
        monkeypatch.setattr(os, "utime", foreign)
        claimed = await q.dequeue(worker_id="w")
        assert claimed is not None and not claimed.token.startswith("ino:")
        assert q.store.can_take  # only this file could not be taken
        stored = codec.decode(_run_file(tmp_path, task.id, 1).read_bytes(), Claimed)
        assert stored.token == claimed.token
        assert _ready_files(tmp_path) == []
        info = await q.get_task(task.id)
        assert info.status is TaskStatus.RUNNING and info.worker_id == "w"
        await q.ack(claimed)
        assert (await q.get_task(task.id)).status is TaskStatus.DONE


async def test_protocol_defaults_of_the_batch_calls(tmp_path: Path) -> None:
    """``AsyncQueue.dequeue_many`` / ``ack_many`` (for queues that do not override them) loop
    over ``dequeue`` / ``ack``: same order, stop when empty, report refused acks."""
    from omniq.core.interfaces import AsyncQueue

    clock = FakeClock()
    async with AsyncFileQueue(tmp_path, lease=10, clock_skew=1, clock=clock) as q:
        await q.enqueue_many([Task(func="m:f", priority=p) for p in (1, 3, 2)])
        got = await AsyncQueue.dequeue_many(q, 2)
        assert [c.task.priority for c in got] == [3, 2]
        rest = await AsyncQueue.dequeue_many(q, 5)
        assert [c.task.priority for c in rest] == [1]
        assert await AsyncQueue.dequeue_many(q, 5) == []
        with pytest.raises(ValueError):
            await AsyncQueue.dequeue_many(q, 0)
        clock.advance(12)
        got[1] = await q.extend_lease(got[1], 30)
        await q.reap()  # got[0]'s lease ended: taken over
        with pytest.raises(LeaseLostError, match="1 of 2"):
            await AsyncQueue.ack_many(q, got)
        assert (await q.get_task(got[1].id)).status is TaskStatus.DONE
