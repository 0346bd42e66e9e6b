"""Batched expiry markers of AsyncFileResultStorage (memory, local, S3, Azure, GCS).

``set`` writes only the result; (expires_ms, task_id) pairs are buffered and written as one
batch marker per expiry hour on flush / close / ``marker_batch`` / ``marker_flush_interval``.
``cleanup_expired`` reads batch markers and the single markers of older versions;
``cleanup_expired(sweep=True)`` is the backstop for markers lost in a crash.
"""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import datetime, timezone

import pytest

from omniq.core.errors import StorageError
from omniq.core.models import ResultStatus, TaskResult
from omniq.storage.file.results import AsyncFileResultStorage, FileResultStorage
from omniq.storage.file.results import _layout as layout
from storage_helpers import exists, path, put

UTC = timezone.utc
QUICK = pytest.mark.parametrize("storage", ["memory", "local"], indirect=True)
MEMORY = pytest.mark.parametrize("storage", ["memory"], indirect=True)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


class Clock:
    """An epoch-seconds clock that only moves when told to; starts at the top of an hour, so
    that expiries up to an hour later share one expiry bucket."""

    def __init__(self) -> None:
        self.t = float(int(time.time()) // 3600 * 3600)

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds

    def at(self, seconds: float) -> datetime:
        return datetime.fromtimestamp(self.t + seconds, UTC)


def make(storage, **kwargs) -> AsyncFileResultStorage:
    return AsyncFileResultStorage(storage.base_dir, storage.storage_options, **kwargs)


def result(task_id: str, value=None, *, attempt: int = 1, **kw) -> TaskResult:
    return TaskResult(
        task_id=task_id, status=ResultStatus.SUCCESS, value=value, attempt=attempt, **kw
    )


def find(storage, key: str) -> dict[str, bytes]:
    """Files under ``key``: {path relative to ``key``: bytes}."""
    fs = storage.filesystem()
    root = fs._strip_protocol(path(storage, key)).rstrip("/")
    try:
        found = fs.find(root)
    except FileNotFoundError:
        return {}
    return {p[len(root) + 1 :]: fs.cat_file(p) for p in found}


def markers(storage) -> dict[str, bytes]:
    """The expiry markers: {"BUCKET/NAME": body}."""
    return find(storage, "results/_expiry")


def pairs_of(body: bytes) -> set[tuple[int, str]]:
    doc = json.loads(body)
    assert doc["v"] == 1
    return {(ms, task_id) for ms, task_id in doc["expiry"]}


def ms(dt: datetime) -> int:
    return layout.epoch_ms(dt)


# --------------------------------------------------------------------------- writing


@pytest.mark.anyio
async def test_one_batch_marker_per_bucket_per_flush(storage, anyio_backend):
    clock = Clock()
    s = make(storage, clock=clock, default_ttl=None)
    try:
        soon, later = clock.at(600), clock.at(3 * 3600 + 5)  # two expiry hours
        for i in range(5):
            await s.set(result(f"a{i}", i, finished_at=clock.at(0), expires_at=soon))
        await s.set(result("b0", finished_at=clock.at(0), expires_at=later))
        await s.set(result("never", finished_at=clock.at(0)))  # no expiry: no marker
        assert markers(storage) == {}  # nothing written for the markers yet ...
        assert (await s.get("a3")).value == 3  # ... but the results are there

        assert await s.flush() == 6
        found = markers(storage)
        assert len(found) == 2, found
        by_bucket = {name.split("/")[0]: body for name, body in found.items()}
        assert pairs_of(by_bucket[layout.bucket(ms(soon))]) == {
            (ms(soon), f"a{i}") for i in range(5)
        }
        assert pairs_of(by_bucket[layout.bucket(ms(later))]) == {(ms(later), "b0")}
        for name in found:
            assert layout.parse_batch(name.split("/")[1]) is not None
            # The single-marker parser (as in OmniQ 0.1.0) skips batch markers.
            assert layout.parse_marker(name.split("/")[1]) is None
        assert await s.flush() == 0
        assert len(markers(storage)) == 2

        await s.set(result("c0", finished_at=clock.at(0), expires_at=soon))
    finally:
        await s.close()  # close flushes
    found = markers(storage)
    assert len(found) == 3
    assert sum(pairs_of(b) == {(ms(soon), "c0")} for b in found.values()) == 1


@QUICK
@pytest.mark.anyio
async def test_a_worker_finishing_a_task_a_second_writes_a_marker_per_ten_seconds(
    storage, anyio_backend
):
    """The default interval: on an object store each marker is a billed request."""
    clock = Clock()
    async with make(storage, clock=clock, default_ttl=600) as s:
        for i in range(10):
            await s.set(result(f"t{i}", finished_at=clock.at(0)))
            clock.advance(1)
        assert markers(storage) == {}  # the oldest pair has waited 9 s
        await s.set(result("t10", finished_at=clock.at(0)))
        (batch,) = markers(storage).values()
        assert len(pairs_of(batch)) == 11


@QUICK
@pytest.mark.anyio
async def test_flush_at_marker_batch_and_after_the_interval(storage, anyio_backend):
    clock = Clock()
    async with make(
        storage, clock=clock, default_ttl=600, marker_batch=3, marker_flush_interval=5
    ) as s:
        for i in range(3):
            await s.set(result(f"t{i}", finished_at=clock.at(0)))
        assert len(markers(storage)) == 1  # the third set filled the batch
        await s.set(result("t3", finished_at=clock.at(0)))
        clock.advance(4)
        await s.set(result("t4", finished_at=clock.at(0)))
        assert len(markers(storage)) == 1  # oldest buffered pair waited 4 s < 5 s
        clock.advance(1)
        await s.set(result("t5", finished_at=clock.at(0)))
        found = markers(storage)
        assert len(found) == 2
        assert sorted(len(pairs_of(b)) for b in found.values()) == [3, 3]
        assert await s.flush() == 0


@MEMORY
@pytest.mark.anyio
async def test_marker_batch_1_writes_each_marker_before_its_result(storage, anyio_backend):
    clock = Clock()
    async with make(storage, clock=clock, default_ttl=60, marker_batch=1) as s:
        ops = s.store._sync_ops
        written: list[str] = []
        real_write = ops.write

        def recording_write(key, data):
            written.append(key)
            return real_write(key, data)

        ops.write = recording_write
        await s.set(result("one", finished_at=clock.at(0)))
        expires = ms(clock.at(60))
        assert written == [layout.marker_key(expires, "one"), "results/one.json"]
        assert await s.flush() == 0
        assert markers(storage) == {f"{layout.bucket(expires)}/{expires:013d}.one": b""}
        clock.advance(61)
        assert await s.cleanup_expired() == 1
        assert markers(storage) == {}


@MEMORY
@pytest.mark.anyio
async def test_a_failed_flush_keeps_the_pairs(storage, anyio_backend, caplog):
    caplog.set_level(logging.WARNING, logger="omniq.results")
    clock = Clock()
    s = make(storage, clock=clock, default_ttl=60, marker_batch=2)
    real = s._write_markers

    def failing(pairs):
        raise StorageError("store down")
        yield

    s._write_markers = failing  # type: ignore[method-assign]
    await s.set(result("x", finished_at=clock.at(0)))
    await s.set(result("y", finished_at=clock.at(0)))  # flush due: fails, set does not raise
    assert (await s.get("y")) is not None
    assert any("will retry" in r.getMessage() for r in caplog.records)
    with pytest.raises(StorageError):
        await s.flush()
    assert markers(storage) == {}
    s._write_markers = real  # type: ignore[method-assign]
    await s.close()
    assert [pairs_of(b) for b in markers(storage).values()] == [
        {(ms(clock.at(60)), "x"), (ms(clock.at(60)), "y")}
    ]

    s2 = make(storage, clock=clock, default_ttl=60)
    await s2.set(result("z", finished_at=clock.at(0)))
    s2._write_markers = failing  # type: ignore[method-assign]
    await s2.close()  # logs, does not raise
    assert any("on close" in r.getMessage() for r in caplog.records)


def test_sync_twin_close_flushes(storage):
    clock = Clock()
    with FileResultStorage(
        storage.base_dir, storage.storage_options, clock=clock, default_ttl=60
    ) as s:
        s.set(result("s1", finished_at=clock.at(0)))
        s.set(result("s2", finished_at=clock.at(0)))
        assert markers(storage) == {}
    (body,) = markers(storage).values()
    assert pairs_of(body) == {(ms(clock.at(60)), "s1"), (ms(clock.at(60)), "s2")}

    with FileResultStorage(
        storage.base_dir, storage.storage_options, clock=clock, default_ttl=60
    ) as s:
        s.set(result("s3", finished_at=clock.at(0)))
        assert s.flush() == 1
        assert len(markers(storage)) == 2
        clock.advance(61)
        assert s.cleanup_expired() == 3
    assert markers(storage) == {}


# --------------------------------------------------------------------------- cleanup


@pytest.mark.anyio
async def test_cleanup_reads_batch_and_single_markers(storage, anyio_backend):
    clock = Clock()
    async with make(storage, clock=clock, default_ttl=60, marker_batch=1) as old:
        await old.set(result("old1", finished_at=clock.at(0)))  # a single marker
    # A single marker as OmniQ 0.1.0 wrote it, for a result it wrote.
    expires = ms(clock.at(30))
    put(storage, layout.marker_key(expires, "old2"), b"")
    async with make(storage, clock=clock) as s:
        await s.set(result("old2", finished_at=clock.at(0), expires_at=clock.at(30)))
        s._markers.take()  # that result's marker is the single one above
        await s.set(result("new1", finished_at=clock.at(0), expires_at=clock.at(60)))
        await s.set(result("new2", finished_at=clock.at(0), expires_at=clock.at(45)))
        await s.set(result("keep", finished_at=clock.at(0), expires_at=clock.at(3000)))
    assert len(markers(storage)) == 3  # two single markers, one batch

    async with make(storage, clock=clock) as cleaner:  # another process: no shared state
        assert await cleaner.cleanup_expired() == 0
        clock.advance(61)
        assert await cleaner.cleanup_expired() == 4
        for gone in ("old1", "old2", "new1", "new2"):
            assert not exists(storage, f"results/{gone}.json")
        assert (await cleaner.get("keep")) is not None
        (body,) = markers(storage).values()  # the batch, rewritten with what is left
        assert pairs_of(body) == {(ms(clock.at(3000 - 61)), "keep")}
        assert await cleaner.cleanup_expired() == 0
        clock.advance(3600)  # and the bucket's hour is over: its directory goes too
        assert await cleaner.cleanup_expired() == 1
    assert markers(storage) == {}
    if storage.kind == "local":
        assert os.listdir(path(storage, "results/_expiry")) == []


@pytest.mark.anyio
async def test_partly_due_batch_keeps_the_rest_cleanable(storage, anyio_backend):
    clock = Clock()
    async with make(storage, clock=clock, default_ttl=None) as s:
        for name, at in (("a", 60), ("b", 120), ("c", 1800), ("d", 60)):
            await s.set(result(name, finished_at=clock.at(0), expires_at=clock.at(at)))
        # d is rewritten with a later expiry: its first pair must not delete it.
        await s.set(result("d", 2, attempt=2, finished_at=clock.at(0), expires_at=clock.at(900)))
    (body,) = markers(storage).values()
    assert len(pairs_of(body)) == 5

    async with make(storage, clock=clock) as cleaner:
        clock.advance(90)
        assert await cleaner.cleanup_expired() == 1  # a
        assert sorted(r.task_id for r in await cleaner.list()) == ["b", "c", "d"]
        (body,) = markers(storage).values()
        assert {t for _, t in pairs_of(body)} == {"b", "c", "d"}
        assert len(pairs_of(body)) == 3  # d's stale pair is gone
        clock.advance(60)
        assert await cleaner.cleanup_expired() == 1  # b
        clock.advance(760)
        assert await cleaner.cleanup_expired() == 1  # d (second expiry)
        (body,) = markers(storage).values()
        assert pairs_of(body) == {(ms(clock.at(1800 - 910)), "c")}
        clock.advance(900)
        assert await cleaner.cleanup_expired() == 1  # c
        assert markers(storage) == {}
        assert await cleaner.list() == []


@MEMORY
@pytest.mark.anyio
async def test_cleanup_reads_only_what_expires(storage, anyio_backend):
    clock = Clock()
    async with make(storage, clock=clock, default_ttl=None) as s:
        for i in range(3):
            await s.set(result(f"soon{i}", finished_at=clock.at(0), expires_at=clock.at(60)))
        await s.flush()
        for i in range(40):
            await s.set(result(f"late{i}", finished_at=clock.at(0), expires_at=clock.at(1800)))
        await s.flush()
        for i in range(40):  # a later hour: its bucket is not even listed
            await s.set(result(f"far{i}", finished_at=clock.at(0), expires_at=clock.at(7300)))
        await s.flush()
        ops = s.store._sync_ops
        read: list[str] = []
        real = ops.read_many

        def recording(keys):
            read.extend(keys)
            return real(keys)

        ops.read_many = recording
        clock.advance(90)
        assert await s.cleanup_expired() == 3
        results_read = sorted(k for k in read if not k.startswith("results/_expiry/"))
        assert results_read == [f"results/soon{i}.json" for i in range(3)]
        assert len(read) == 4  # and one batch marker: the other one is not due yet


@pytest.mark.anyio
async def test_corrupt_batch_marker_is_quarantined(storage, anyio_backend, caplog):
    caplog.set_level(logging.WARNING, logger="omniq.results")
    clock = Clock()
    due = ms(clock.at(10))
    bucket = layout.bucket(due)
    garbage = b'{"v": 1, "expiry": [[12, "a"'
    bad_id = json.dumps({"v": 1, "expiry": [[due, "../../etc/passwd"]]}).encode()
    newer = json.dumps({"v": 9, "format": "unknown"}).encode()
    # Readable JSON, but an expiry no datetime can hold (and not due): unreadable all the same.
    huge = json.dumps({"v": 1, "expiry": [[due, "ok"], [10**16, "x"]]}).encode()
    put(storage, f"results/_expiry/{bucket}/{due:013d}-{'1' * 32}.batch", garbage)
    put(storage, f"results/_expiry/{bucket}/{due:013d}-{'2' * 32}.batch", bad_id)
    put(storage, f"results/_expiry/{bucket}/{due:013d}-{'3' * 32}.batch", newer)
    put(storage, f"results/_expiry/{bucket}/{due:013d}-{'4' * 32}.batch", huge)
    async with make(storage, clock=clock, default_ttl=60) as s:
        await s.set(result("ok", finished_at=clock.at(0)))
        clock.advance(61)
        assert await s.cleanup_expired() == 1  # cleanup goes on
        assert not exists(storage, "results/ok.json")
        quarantined = set(find(storage, "results/_quarantine").values())
        assert quarantined == {garbage, bad_id, huge}
        assert [b for b in markers(storage).values()] == [newer]  # a newer OmniQ's: left alone
        assert await s.cleanup_expired() == 0
    assert any(
        "unreadable expiry marker" in r.getMessage() and "1111" in r.getMessage()
        for r in caplog.records
    )


# --------------------------------------------------------------------------- sweep


@pytest.mark.anyio
async def test_sweep_removes_expired_results_whose_marker_was_lost(storage, anyio_backend):
    clock = Clock()
    crashed = make(storage, clock=clock, default_ttl=60)
    await crashed.set(result("lost1", finished_at=clock.at(0)))
    await crashed.set(result("lost2", finished_at=clock.at(0)))
    await crashed.set(result("young", finished_at=clock.at(0), expires_at=clock.at(3600)))
    await crashed.store.aclose()  # killed before its flush: the pairs die with it
    async with make(storage, clock=clock, default_ttl=None) as s:
        await s.set(result("forever", finished_at=clock.at(0)))
        clock.advance(120)
        assert await s.get("lost1") is None  # expired reads as absent
        assert await s.cleanup_expired() == 0  # no marker: not found
        assert exists(storage, "results/lost1.json")
        assert await s.cleanup_expired(sweep=True) == 2
        assert not exists(storage, "results/lost1.json")
        assert not exists(storage, "results/lost2.json")
        assert sorted(r.task_id for r in await s.list()) == ["forever", "young"]
        assert await s.cleanup_expired(sweep=True) == 0


@MEMORY
@pytest.mark.anyio
async def test_the_marker_buffer_is_bounded_while_writes_fail(storage, anyio_backend, caplog):
    """Suspected, confirmed: while marker writes failed, the buffer grew without bound. It
    now keeps HELD_BATCHES batches and drops older pairs (the sweep still finds them)."""
    from omniq.storage.file.results._markers import HELD_BATCHES

    caplog.set_level(logging.WARNING, logger="omniq.results")
    clock = Clock()
    s = make(storage, clock=clock, default_ttl=60, marker_batch=2)

    def failing(pairs):
        raise StorageError("store down")
        yield

    s._write_markers = failing  # type: ignore[method-assign]
    for i in range(HELD_BATCHES * 2 * 3):
        await s.set(result(f"t{i}", finished_at=clock.at(0)))
        clock.t += s.marker_flush_interval + 1  # every set finds a flush due
    assert len(s._markers) <= HELD_BATCHES * 2
    assert any("dropped from memory" in r.getMessage() for r in caplog.records)
    s._markers.pairs.clear()
