"""AsyncFileResultStorage and FileResultStorage on memory, local, S3, Azure and GCS.

Async tests run on asyncio and trio (the ``anyio_backend`` fixture below).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import types
from datetime import datetime, timedelta, timezone

import anyio
import anyio.lowlevel
import pytest

from omniq.core.errors import InvalidNameError, ResultTimeoutError, SerializationError
from omniq.core.models import ErrorInfo, ResultStatus, TaskResult
from omniq.storage.file.results import AsyncFileResultStorage, FileResultStorage
from omniq.storage.file.results import _results as results_module
from storage_helpers import exists, path, put

UTC = timezone.utc
SUCCESS, FAILURE = ResultStatus.SUCCESS, ResultStatus.FAILURE
QUICK = pytest.mark.parametrize("storage", ["memory", "local"], indirect=True)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


class Clock:
    """An epoch-seconds clock that only moves when told to."""

    def __init__(self, start: float | None = None) -> None:
        self.t = float(int(start if start is not None else time.time()))

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds

    @property
    def dt(self) -> datetime:
        return datetime.fromtimestamp(self.t, UTC)


def make(storage, **kwargs) -> AsyncFileResultStorage:
    return AsyncFileResultStorage(storage.base_dir, storage.storage_options, **kwargs)


def make_sync(storage, **kwargs) -> FileResultStorage:
    return FileResultStorage(storage.base_dir, storage.storage_options, **kwargs)


def result(task_id: str, value=None, *, status=SUCCESS, attempt: int = 1, **kw) -> TaskResult:
    return TaskResult(task_id=task_id, status=status, value=value, attempt=attempt, **kw)


def quarantined(storage) -> list[bytes]:
    fs = storage.filesystem()
    try:
        found = fs.find(path(storage, "results/_quarantine"))
    except FileNotFoundError:
        return []
    return [fs.cat_file(p) for p in found]


# --------------------------------------------------------------------------- conformance


@pytest.mark.anyio
async def test_set_get_list_delete(storage, anyio_backend):
    async with make(storage) as s:
        assert await s.get("nothing") is None
        assert await s.delete("nothing") is False
        assert await s.list() == []

        ok = result("t1", {"rows": [1, 2.5, "x", None, True]}, worker_id="w")
        await s.set(ok)
        got = await s.get("t1")
        assert got is not None and got.ok
        assert got.value == {"rows": [1, 2.5, "x", None, True]}
        assert got.worker_id == "w"
        assert got.expires_at == ok.finished_at + timedelta(days=7)  # default_ttl stamped

        # One readable JSON document at the documented key.
        doc = json.loads(storage.filesystem().cat_file(path(storage, "results/t1.json")))
        assert doc["task_id"] == "t1" and doc["status"] == "success"

        err = ErrorInfo(type="builtins.ValueError", message="boom")
        await s.set(result("t2", status=FAILURE, error=err))
        await s.set(result("t3", [1]))

        assert [r.task_id for r in await s.list()] == ["t1", "t2", "t3"]
        assert [r.task_id for r in await s.list(status=FAILURE)] == ["t2"]
        assert [r.task_id for r in await s.list(status=SUCCESS, limit=1)] == ["t1"]
        assert len(await s.list(limit=2)) == 2
        assert (await s.get("t2")).error == err

        assert await s.delete("t1") is True
        assert await s.get("t1") is None
        assert await s.delete("t1") is False
        assert [r.task_id for r in await s.list()] == ["t2", "t3"]
        assert await s.wait("t3", timeout=1) == await s.get("t3")


@QUICK
@pytest.mark.anyio
async def test_task_ids_are_validated(storage, anyio_backend):
    async with make(storage) as s:
        for bad in ("../etc", "a/b", "", ".hidden", "_quarantine", "x y", "é"):
            with pytest.raises(InvalidNameError):
                await s.get(bad)
            with pytest.raises(InvalidNameError):
                await s.set(result(bad, 1))
            with pytest.raises(InvalidNameError):
                await s.wait(bad, timeout=0)
            with pytest.raises(InvalidNameError):
                await s.delete(bad)


@QUICK
@pytest.mark.anyio
async def test_no_default_ttl_and_explicit_expiry(storage, anyio_backend):
    async with make(storage, default_ttl=None) as s:
        await s.set(result("keep", 1))
        assert (await s.get("keep")).expires_at is None
        explicit = datetime.now(UTC) + timedelta(hours=3)
        await s.set(result("own", 1, expires_at=explicit))
        assert (await s.get("own")).expires_at == explicit
    async with make(storage, default_ttl=timedelta(hours=1)) as s:
        explicit = datetime.now(UTC) + timedelta(days=30)
        await s.set(result("own2", 1, expires_at=explicit))  # its own expiry is kept
        assert (await s.get("own2")).expires_at == explicit


def test_sync_twin(storage):
    clock = Clock()
    with make_sync(storage, clock=clock, default_ttl=60) as s:
        s.set(result("s1", {"a": 1}, finished_at=clock.dt))
        s.set(result("s2", status=FAILURE, finished_at=clock.dt))
        assert s.get("s1").value == {"a": 1}
        assert s.wait("s1", timeout=1).value == {"a": 1}
        assert [r.task_id for r in s.list()] == ["s1", "s2"]
        assert [r.task_id for r in s.list(status=FAILURE)] == ["s2"]
        assert s.delete("s2") is True
        clock.advance(61)
        assert s.get("s1") is None
        assert s.cleanup_expired() == 1
        assert s.list() == []


# --------------------------------------------------------------------------- wait


@pytest.mark.anyio
async def test_wait_returns_when_the_result_lands(storage, anyio_backend):
    async with make(storage) as s:

        async def later() -> None:
            await anyio.sleep(0.2)
            await s.set(result("w1", "done"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(later)
            start = time.monotonic()
            got = await s.wait("w1", timeout=60)
            elapsed = time.monotonic() - start
        assert got.value == "done"
        # It waited for the value and returned with it (a timeout raises; no upper time
        # bound: a loaded CI machine took 8 s to write once).
        assert elapsed >= 0.15, elapsed


def test_sync_wait_for_a_result_set_by_another_thread(storage):
    with make_sync(storage) as s:
        setter = threading.Timer(0.2, s.set, args=(result("w2", 42),))
        setter.start()
        try:
            start = time.monotonic()
            got = s.wait("w2", timeout=60)
            elapsed = time.monotonic() - start
        finally:
            setter.join()
        assert got.value == 42
        # It waited for the value and returned with it (a timeout raises; no upper time
        # bound: a loaded CI machine took 8 s to write once).
        assert elapsed >= 0.15, elapsed


@QUICK
@pytest.mark.anyio
async def test_wait_times_out(storage, anyio_backend):
    async with make(storage) as s:
        start = time.monotonic()
        with pytest.raises(ResultTimeoutError, match=r"no result for task 'missing' after"):
            await s.wait("missing", timeout=0.3)
        # Upper bound loose: it returns instead of waiting for ever, on a loaded machine too.
        assert 0.29 <= time.monotonic() - start < 10.0


@pytest.mark.parametrize("storage", ["memory"], indirect=True)
def test_sync_wait_times_out(storage):
    with make_sync(storage) as s, pytest.raises(ResultTimeoutError) as info:
        s.wait("missing", timeout=0.2)
    assert isinstance(info.value, TimeoutError)


@pytest.mark.parametrize("storage", ["memory"], indirect=True)
@pytest.mark.anyio
async def test_wait_backs_off_instead_of_spinning(storage, anyio_backend, monkeypatch):
    # A virtual clock: the pauses asked for are checked, not how long a loaded machine slept
    # (a wall-clock version of this test failed in CI with a 0.18 s first gap under load).
    now = [1000.0]
    pauses: list[float] = []

    async def virtual_sleep(seconds: float) -> None:
        pauses.append(seconds)
        now[0] += seconds
        await anyio.lowlevel.checkpoint()

    monkeypatch.setattr(
        results_module,
        "time",
        types.SimpleNamespace(monotonic=lambda: now[0], time_ns=time.time_ns),
    )
    monkeypatch.setattr(results_module.anyio, "sleep", virtual_sleep)
    async with make(storage, poll_interval=0.02, max_poll_interval=0.5) as s:
        polls = 0
        real_get = s.get

        async def counting_get(task_id):
            nonlocal polls
            polls += 1
            return await real_get(task_id)

        s.get = counting_get  # type: ignore[method-assign]
        with pytest.raises(ResultTimeoutError):
            await s.wait("missing", timeout=1.5)
    # 20 ms growing 1.5x to the 0.5 s cap, the last pause cut to the deadline: eleven reads in
    # 1.5 s, not thousands.
    expected = [0.02, 0.03, 0.045, 0.0675, 0.10125, 0.151875, 0.2278125, 0.34171875, 0.5]
    assert pauses[:-1] == pytest.approx(expected)
    assert pauses[-1] == pytest.approx(1.5 - sum(expected))
    assert polls == len(pauses) + 1 == 11


# --------------------------------------------------------------------------- expiry


@pytest.mark.anyio
async def test_expiry_with_an_injected_clock(storage, anyio_backend):
    clock = Clock()
    t0 = clock.dt
    async with make(storage, clock=clock, default_ttl=timedelta(hours=1)) as s:
        await s.set(result("short", 1, finished_at=t0, expires_at=t0 + timedelta(seconds=60)))
        await s.set(result("hourly", 2, finished_at=t0))
        assert (await s.get("hourly")).expires_at == t0 + timedelta(hours=1)
        async with make(storage, clock=clock, default_ttl=None) as forever:
            await forever.set(result("forever", 3, finished_at=t0))
        # Rewritten with a later expiry: its first expiry marker must not delete it.
        await s.set(result("moved", 4, finished_at=t0, expires_at=t0 + timedelta(seconds=60)))
        await s.set(
            result("moved", 5, attempt=2, finished_at=t0, expires_at=t0 + timedelta(hours=2))
        )
        assert await s.cleanup_expired() == 0

        clock.advance(120)
        assert await s.get("short") is None  # expired reads as absent ...
        assert exists(storage, "results/short.json")  # ... before cleanup removed it
        with pytest.raises(ResultTimeoutError):
            await s.wait("short", timeout=0)
        assert sorted(r.task_id for r in await s.list()) == ["forever", "hourly", "moved"]

        assert await s.cleanup_expired() == 1
        assert not exists(storage, "results/short.json")
        assert (await s.get("moved")).value == 5
        assert await s.cleanup_expired() == 0

        clock.advance(3 * 3600)
        assert await s.cleanup_expired() == 2  # hourly and moved
        assert [r.task_id for r in await s.list()] == ["forever"]
        assert await s.cleanup_expired() == 0
    if storage.kind == "local":  # emptied expiry buckets do not pile up as directories
        assert os.listdir(path(storage, "results/_expiry")) == []


# --------------------------------------------------------------------------- write races


@pytest.mark.anyio
async def test_later_attempt_wins_and_a_late_earlier_attempt_does_not(storage, anyio_backend):
    async with make(storage) as s:
        await s.set(result("r", "first", attempt=1))
        await s.set(result("r", "second", attempt=2))
        assert (await s.get("r")).value == "second"

        await s.set(result("r", "late first", attempt=1))  # at-least-once: a stale duplicate
        got = await s.get("r")
        assert (got.attempt, got.value) == (2, "second")

        await s.set(result("r", "second again", attempt=2))  # same attempt: later write wins
        assert (await s.get("r")).value == "second again"

        # Concurrent writers never leave a torn or unreadable document behind.
        async with anyio.create_task_group() as tg:
            for attempt in (3, 4, 3, 4, 3):
                tg.start_soon(s.set, result("r", f"a{attempt}", attempt=attempt))
        got = await s.get("r")
        assert got is not None and got.attempt in (3, 4) and got.value == f"a{got.attempt}"
        assert quarantined(storage) == []


# --------------------------------------------------------------------------- bad values


@pytest.mark.anyio
async def test_unencodable_value_becomes_a_failure(storage, anyio_backend, caplog):
    caplog.set_level(logging.WARNING, logger="omniq.results")
    async with make(storage) as s:
        await s.set(result("dt", {"when": datetime.now(UTC)}))  # must not raise
        got = await s.get("dt")
        assert got.status is FAILURE and got.value is None
        assert got.error.type == "omniq.core.errors.SerializationError"
        assert "(type dict) is not JSON-serializable" in got.error.message
        assert "datetime.datetime" in got.error.message

        class Custom:
            pass

        await s.set(result("obj", Custom()))
        message = (await s.get("obj")).error.message
        assert "Custom) is not JSON-serializable" in message

        # A failed task keeps its own error; only the value is dropped.
        own = ErrorInfo(type="builtins.KeyError", message="k")
        await s.set(result("failed", {1, 2}, status=FAILURE, error=own))
        assert (await s.get("failed")).error == own
    assert any(
        "not JSON-serializable" in r.getMessage()
        for r in caplog.records
        if r.name == "omniq.results"
    )


@pytest.mark.parametrize("storage", ["memory"], indirect=True)
@pytest.mark.anyio
async def test_oversized_value_becomes_a_failure(storage, anyio_backend):
    async with make(storage) as s:
        await s.set(result("big", "x" * (9 * 1024 * 1024)))
        got = await s.get("big")
        assert got.status is FAILURE and "cannot be stored" in got.error.message


# --------------------------------------------------------------------------- corrupt files


@pytest.mark.anyio
async def test_corrupt_result_is_quarantined_not_deleted(storage, anyio_backend, caplog):
    caplog.set_level(logging.WARNING, logger="omniq.results")
    garbage = b'{"task_id": "bad", "status": "succ'
    async with make(storage) as s:
        await s.set(result("good", 1))
        put(storage, "results/bad.json", garbage)
        # A valid document stored under another task's name is not trusted either.
        put(storage, "results/misfiled.json", (await s.store.read("results/good.json")))

        assert await s.get("bad") is None
        assert not exists(storage, "results/bad.json")
        assert garbage in quarantined(storage)
        assert any(
            r.name == "omniq.results" and "results/bad.json" in r.getMessage()
            for r in caplog.records
        )

        assert [r.task_id for r in await s.list()] == ["good"]  # quarantines misfiled.json
        assert not exists(storage, "results/misfiled.json")
        assert len(quarantined(storage)) == 2

        # The storage keeps working, also for the ids that were corrupt.
        await s.set(result("bad", "fixed"))
        assert (await s.get("bad")).value == "fixed"
        assert garbage in quarantined(storage)


@QUICK
@pytest.mark.anyio
async def test_cleanup_quarantines_corrupt_expiring_result(storage, anyio_backend):
    clock = Clock()
    async with make(storage, clock=clock, default_ttl=60) as s:
        await s.set(result("soon", 1, finished_at=clock.dt))
        put(storage, "results/soon.json", b"\x00not json")
        clock.advance(120)
        assert await s.cleanup_expired() == 0
        assert quarantined(storage) == [b"\x00not json"]
        assert await s.list() == []


@QUICK
@pytest.mark.anyio
async def test_result_of_a_newer_schema_is_left_alone(storage, anyio_backend):
    clock = Clock()
    async with make(storage, clock=clock, default_ttl=60) as s:
        await s.set(result("future", 1, finished_at=clock.dt))
        await s.set(result("other", 2, finished_at=clock.dt))
        doc = json.loads(await s.store.read("results/future.json"))
        doc.update(v=99, attempt=3, new_field=True)
        newer = json.dumps(doc).encode()
        put(storage, "results/future.json", newer)

        with pytest.raises(SerializationError, match="newer OmniQ"):
            await s.get("future")
        assert [r.task_id for r in await s.list()] == ["other"]
        await s.set(result("future", "stale", attempt=2))  # a lower attempt: dropped
        clock.advance(120)
        assert await s.cleanup_expired() == 1  # "other" only
        assert await s.store.read("results/future.json") == newer
        assert quarantined(storage) == []
        await s.set(result("future", "retry", attempt=4, finished_at=clock.dt))
        assert (await s.get("future")).value == "retry"
