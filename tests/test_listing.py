"""Listing tasks by status (``list_tasks``): every status, paging, every queue, bad input,
the cost of a page, the blocking twins, the in-memory contract backend and ``omniq tasks``."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest

from omniq.backend.file import FileBackend
from omniq.core import InvalidNameError, Task, TaskPage, TaskStatus, codec
from omniq.core.models import Progress, utcnow
from omniq.storage.file.queue import AsyncFileQueue, FileQueue
from omniq.storage.file.queue import _layout as layout
from queue_helpers import FakeClock, make_queue

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the queue's own tests run trio too; listing adds nothing there


STATUSES = ["pending", "scheduled", "waiting", "running", "dead"]


async def wait_doc(q: AsyncFileQueue, task: Task) -> None:
    """A task held for its dependencies, as ``enqueue(depends_on=...)`` stores it."""
    await q.store.write(f"{task.queue}/wait/{task.id}.json", codec.encode(task))


async def all_pages(q: Any, limit: int, **kw: Any) -> list[Any]:
    """Every item, page after page; each page full but the last."""
    items, after = [], None
    while True:
        page = await q.list_tasks(limit=limit, after=after, **kw)
        assert isinstance(page, TaskPage) and len(page.items) <= limit
        items += page.items
        if page.next is None:
            return items
        assert len(page.items) == limit
        after = page.next


def ids(items: list[Any]) -> list[str]:
    return [i.task.id for i in items]


async def fill(q: AsyncFileQueue, queue: str = "default") -> dict[str, list[str]]:
    """Tasks of every status in ``queue``; returns their ids by status, in listing order."""
    got: dict[str, list[str]] = {s: [] for s in STATUSES}
    for n in range(3):  # running: claimed, one with a heartbeat (a lease epoch)
        await q.enqueue(Task(func="m:run", id=f"r{n}", queue=queue))
    for n in range(3):
        claimed = await q.dequeue(queue, worker_id=f"w{n}", lease=600)
        assert claimed is not None
        if claimed.id == "r1":
            await q.extend_lease(claimed, 900)
    got["running"] = ["r0", "r1", "r2"]
    for n in range(3):
        await q.enqueue(Task(func="m:dead", id=f"d{n}", queue=queue))
        claimed = await q.dequeue(queue)
        assert claimed is not None
        await q.nack(claimed, error=ValueError("bad"), retry=False)
    got["dead"] = ["d0", "d1", "d2"]
    await q.enqueue(Task(func="m:done", id="a0", queue=queue))  # finished: never listed
    claimed = await q.dequeue(queue)
    assert claimed is not None
    await q.ack(claimed)
    await q.enqueue(Task(func="m:cancelled", id="c0", queue=queue))  # ended unclaimed
    assert await q.cancel("c0", queue)
    # pending: by priority, then age (ids given here: by id)
    await q.enqueue_many(
        [
            Task(func="m:p", id="p1", queue=queue),
            Task(func="m:p", id="p0", queue=queue),
            Task(func="m:p", id="p2", queue=queue, priority=5),
        ]
    )
    got["pending"] = ["p2", "p0", "p1"]
    now = utcnow()  # scheduled: by due time
    for n, hours in enumerate((3, 1, 2)):
        await q.enqueue(Task(func="m:s", id=f"s{n}", queue=queue, eta=now + timedelta(hours=hours)))
    got["scheduled"] = ["s1", "s2", "s0"]
    for n in range(3):
        await wait_doc(q, Task(func="m:w", id=f"w{n}", queue=queue))
    got["waiting"] = ["w0", "w1", "w2"]
    return got


async def test_each_status_is_listed(storage) -> None:
    async with make_queue(storage) as q:
        want = await fill(q)
        for status in STATUSES:
            page = await q.list_tasks(status=status)
            assert ids(page.items) == want[status], status
            assert {i.status for i in page.items} <= {TaskStatus(status)}
            assert page.next is None
        everything = await q.list_tasks()
        assert ids(everything.items) == [i for s in STATUSES for i in want[s]]
        assert everything.next is None

        running = {i.task.id: i for i in (await q.list_tasks(status="running")).items}
        assert {i.worker_id for i in running.values()} == {"w0", "w1", "w2"}
        assert all(i.attempt == 1 for i in running.values())
        # r1's lease is its newest lease epoch (900 s), the others' their claim (600 s)
        left = {k: i.lease_until.timestamp() - time.time() for k, i in running.items()}
        assert 850 < left["r1"] <= 900 and 550 < left["r0"] <= 600
        dead = (await q.list_tasks(status=TaskStatus.DEAD)).items[0]
        assert dead.error is not None and dead.error.message == "bad"
        scheduled = (await q.list_tasks(status="scheduled")).items
        assert all(i.task.eta is not None and i.attempt == 1 for i in scheduled)


async def test_running_shows_progress_and_metadata_of_the_newest_lease_record(storage) -> None:
    async with make_queue(storage) as q:
        await q.enqueue(Task(func="m:f", id="t1"))
        claimed = await q.dequeue(worker_id="w")
        assert claimed is not None
        claimed = await q.extend_lease(claimed, 100)
        now = time.time()
        record = layout.record(  # a lease epoch carrying what the task context reported
            "lease",
            now,
            lease_until=now + 500,
            worker="w",
            progress=Progress(done=3, total=4, message="rows"),
            meta={"stage": "load"},
        )
        key = layout.epoch_key("default", "t1", 1, claimed.epoch + 1)
        assert await q.store.create(key, record)
        info = (await q.list_tasks(status="running")).items[0]
        assert info.progress is not None and info.progress.fraction == 0.75
        assert info.progress.message == "rows" and info.metadata == {"stage": "load"}
        assert 450 < info.lease_until.timestamp() - time.time() <= 500
        # a record without them (an older OmniQ's heartbeat) leaves them empty
        plain = layout.record("lease", now, lease_until=now + 50, worker="w")
        assert await q.store.create(layout.epoch_key("default", "t1", 1, claimed.epoch + 2), plain)
        info = (await q.list_tasks(status="running")).items[0]
        assert info.progress is None and info.metadata == {}


async def test_paging_has_no_duplicates_or_gaps(storage) -> None:
    async with make_queue(storage) as q:
        want = await fill(q)
        await q.enqueue_many([Task(func="m:p", id=f"p{n:02d}x", priority=-1) for n in range(9)])
        want["pending"] += [f"p{n:02d}x" for n in range(9)]
        expected = [i for s in STATUSES for i in want[s]]
        for limit in (1, 2, 4, 7):
            assert ids(await all_pages(q, limit)) == expected, limit
        for status in STATUSES:
            assert ids(await all_pages(q, 2, status=status)) == want[status], status
        # a page that ends exactly at the end says so
        assert (await q.list_tasks(status="dead", limit=3)).next is None


async def test_a_cursor_resumes_where_the_page_ended(storage) -> None:
    async with make_queue(storage) as q:
        await q.enqueue_many([Task(func="m:p", id=f"t{n}") for n in range(5)])
        first = await q.list_tasks(status="pending", limit=2)
        assert ids(first.items) == ["t0", "t1"] and first.next
        # tasks claimed or added meanwhile: the next page goes on after t1
        claimed = await q.dequeue()
        assert claimed is not None and claimed.id in {f"t{n}" for n in range(5)}
        await q.enqueue(Task(func="m:p", id="t9"))
        rest = await q.list_tasks(status="pending", after=first.next)
        assert ids(rest.items) == [f"t{n}" for n in (2, 3, 4, 9) if f"t{n}" != claimed.id]
        # the same cursor again gives the same page (nothing is consumed)
        assert ids((await q.list_tasks(status="pending", after=first.next)).items) == ids(
            rest.items
        )


async def test_a_stale_copy_of_a_claimed_attempt_is_not_pending(storage) -> None:
    async with make_queue(storage) as q:
        task = Task(func="m:f", id="t1")
        await q.enqueue(task)
        claimed = await q.dequeue()
        assert claimed is not None
        # the ready copy back, as a claimer leaves it whose delete failed (or is deferred)
        await q.store.write(layout.ready_key("default", 0, "t1", 1), codec.encode(task))
        assert (await q.list_tasks(status="pending")).items == []
        assert ids((await q.list_tasks()).items) == ["t1"]


def counts(size: Any) -> tuple[int, int, int, int]:
    return (size.ready, size.scheduled, size.running, size.dead)


async def test_copies_left_by_a_dead_claimer_do_not_count_in_size(storage) -> None:
    """A claimer killed between its claim and the copy's delete (or an S3 claimer killed with
    its deletes still batched) leaves the ready or scheduled copy; size() must not count
    such a task as ready or scheduled, before or after its ack (CI: ready=1 after a chaos run
    on S3 whose 150 tasks had all succeeded)."""
    clock = FakeClock()
    async with make_queue(storage, clock=clock) as q:
        now = utcnow()
        await q.enqueue(Task(func="m:f", id="r1"))
        await q.enqueue(Task(func="m:f", id="s1", eta=now + timedelta(seconds=30)))
        sched = layout.sched_key("default", "s1", 1)
        sched_copy = await q.store.read(sched)
        assert counts(await q.size()) == (1, 1, 0, 0)
        r1 = await q.dequeue()
        clock.advance(60)
        s1 = await q.dequeue()
        assert r1 is not None and s1 is not None and (r1.id, s1.id) == ("r1", "s1")
        # What the dead claimer left: both copies back in place.
        await q.store.write(layout.ready_key("default", 0, "r1", 1), codec.encode(r1.task))
        await q.store.write(sched, sched_copy)
        await q.enqueue(Task(func="m:f", id="r2"))
        assert len(await q.store.listdir("default/ready/p0999")) == 2
        assert counts(await q.size()) == (1, 0, 2, 0)
        await q.ack(r1)
        await q.ack(s1)
        assert counts(await q.size()) == (1, 0, 0, 0)  # r2 only
        assert (await q.dequeue()).id == "r2"  # the stale copies are never handed out


async def test_a_decided_wait_is_not_waiting(storage) -> None:
    async with make_queue(storage) as q:
        for n in range(3):
            await wait_doc(q, Task(func="m:w", id=f"w{n}"))
        # w1's wait decided (released: attempt 1 follows), its document not removed yet
        done = layout.record("released", time.time(), next=Task(func="m:w", id="w1"))
        assert await q.store.create(layout.outcome_key("default", "w1", 0), done)
        assert ids((await q.list_tasks(status="waiting")).items) == ["w0", "w2"]


async def test_every_queue_when_queue_is_none(storage) -> None:
    async with make_queue(storage) as q:
        await q.enqueue_many([Task(func="m:f", id=f"b{n}", queue="beta") for n in range(3)])
        await q.enqueue_many([Task(func="m:f", id=f"a{n}", queue="alpha") for n in range(2)])
        await q.enqueue(Task(func="m:f", id="a9", queue="alpha", eta=utcnow() + timedelta(hours=1)))
        expected = ["a0", "a1", "a9", "b0", "b1", "b2"]
        for limit in (1, 2, 3, 100):
            items = await all_pages(q, limit)
            assert ids(items) == expected, limit
        assert [i.task.queue for i in items] == ["alpha"] * 3 + ["beta"] * 3
        assert ids((await q.list_tasks("beta")).items) == ["b0", "b1", "b2"]
        assert ids((await q.list_tasks(status="scheduled")).items) == ["a9"]
        assert (await q.list_tasks("nothing-here")).items == []


async def test_bad_input_is_refused_and_changes_nothing(storage) -> None:
    async with make_queue(storage) as q:
        await fill(q)
        before = sorted(await q.store.listdir(""))
        page = await q.list_tasks(status="pending", limit=1)
        for kwargs, error in [
            ({"status": "done"}, "cannot be listed"),
            ({"status": "bogus"}, "cannot be listed"),
            ({"status": TaskStatus.CANCELLED}, "cannot be listed"),
            ({"limit": 0}, "positive integer"),
            ({"limit": -3}, "positive integer"),
            ({"limit": True}, "positive integer"),
            ({"limit": "5"}, "positive integer"),
            ({"after": "not-a-cursor"}, "not a cursor"),
            ({"after": ""}, "not a cursor"),
            ({"after": page.next[:-3]}, "cursor"),
            ({"after": page.next, "status": "dead"}, "another queue or status"),
            ({"after": page.next, "queue": "other"}, "another queue or status"),
        ]:
            with pytest.raises(ValueError, match=error):
                await q.list_tasks(**kwargs)
        for name in ("../x", "a/b", "", ".hidden"):
            with pytest.raises(InvalidNameError):
                await q.list_tasks(name)
        forged = page.next.encode()
        import base64

        raw = json.loads(base64.urlsafe_b64decode(forged + b"=" * (-len(forged) % 4)))
        for bad in (["../x", "pending", raw[3]], ["default", "pending", "../../etc/passwd"]):
            text = base64.urlsafe_b64encode(json.dumps([raw[0], *bad]).encode()).decode()
            with pytest.raises(ValueError):
                await q.list_tasks(after=text)
        assert sorted(await q.store.listdir("")) == before


# -- cost ------------------------------------------------------------------------------------
class Spy:
    """Records the ops of every program the queue runs, and how many names each listing
    returned."""

    def __init__(self, q: AsyncFileQueue, monkeypatch: Any) -> None:
        self.ops: list[tuple[str, Any]] = []
        self.listed = 0
        real_run = q.store.run

        def record(program: Any) -> Any:
            value: Any = None
            try:
                op = next(program)
                while True:
                    self.ops.append((op.name, op.args[0] if op.args else None))
                    value = yield op
                    if op.name == "listafter":
                        self.listed += len(value)
                    op = program.send(value)
            except StopIteration as stop:
                return stop.value

        monkeypatch.setattr(q.store, "run", lambda program, **kw: real_run(record(program), **kw))

    def reset(self) -> None:
        self.ops.clear()
        self.listed = 0

    def keys(self) -> list[Any]:
        """Every op with its first argument (the keys read, as lists)."""
        return [
            (name, list(arg) if isinstance(arg, (list, tuple)) else arg) for name, arg in self.ops
        ]


@contextlib.contextmanager
def s3_requests(kind: str) -> Iterator[list[str]]:
    """The S3 requests made inside (each call of aiobotocore's ``_make_api_call``)."""
    made: list[str] = []
    if kind != "s3":
        yield made
        return
    from aiobotocore.client import AioBaseClient

    original = AioBaseClient._make_api_call

    async def counted(self: Any, operation: str, params: dict[str, Any]) -> Any:
        made.append(operation)
        return await original(self, operation, params)

    AioBaseClient._make_api_call = counted  # type: ignore[method-assign]
    try:
        yield made
    finally:
        AioBaseClient._make_api_call = original  # type: ignore[method-assign]


async def test_a_page_costs_the_same_whatever_the_depth_and_the_finished_tasks(
    storage, monkeypatch
) -> None:
    clock = FakeClock()
    q = make_queue(storage, clock=clock, tombstone_ttl=60, spread=1)
    async with q:
        await fill(q)
        await q.store.run(q.claims.flush())  # S3, Azure: the claimed copies' deferred deletes
        spy = Spy(q, monkeypatch)

        async def cost(status: str | None) -> tuple[list[Any], int, list[str]]:
            spy.reset()
            with s3_requests(storage.kind) as made:
                page = await q.list_tasks(status=status, limit=2)
            assert len(page.items) == 2
            return spy.keys(), spy.listed, sorted(made)

        statuses: list[str | None] = [*STATUSES, None]
        before = {s: await cost(s) for s in statuses}

        # 40 tasks finished (their records stay in run/ for tombstone_ttl) ...
        await q.enqueue_many([Task(func="m:f", id=f"a{n:02d}x") for n in range(40)])
        for n in range(40):  # claimed by name: dequeue would take the pending tasks first
            name = f"a{n:02d}x.1.json"
            candidate = layout.ready_candidate("default", layout.rank(0), name)
            claimed = await q.store.run(q._claim_program("default", candidate, 600, "w"))
            assert claimed is not None
            await q.ack(claimed)
        await q.store.run(q.claims.flush())  # S3, Azure: the claimed copies' deferred deletes
        # ... and the queue deeper: 60 more pending, scheduled, waiting and dead tasks
        await q.enqueue_many([Task(func="m:f", id=f"q{n:02d}") for n in range(60)])
        later = utcnow() + timedelta(days=1)
        await q.enqueue_many([Task(func="m:f", id=f"s{n:02d}x", eta=later) for n in range(20)])
        for n in range(20):
            await wait_doc(q, Task(func="m:w", id=f"x{n:02d}"))
            await q.store.write(f"default/dead/x{n:02d}.json", codec.encode(Task(func="m:d")))
        after = {s: await cost(s) for s in statuses}

        for status in statuses:
            ops_before, listed_before, requests_before = before[status]
            ops_after, listed_after, requests_after = after[status]
            assert ops_after == ops_before, status  # the same ops, reading the same keys
            assert requests_after == requests_before, status  # S3: the same requests
            if status != "running":
                assert listed_after == listed_before, status  # at most the page and one more
        # run/ is listed through the finished attempts' records until the reaper's clean-up
        listed_running = after["running"][1]
        assert listed_running > before["running"][1]
        clock.advance(300)  # past tombstone_ttl (60 s), well within the 600 s leases
        await q.reap()
        ops, listed, _ = await cost("running")
        assert len(ops) <= len(before["running"][0])
        assert listed <= before["running"][1] < listed_running
        # what is left are the running attempts' own records: 3 claims, 1 lease epoch
        assert listed == 4


# -- twins, the contract backend, the backend ------------------------------------------------
def test_blocking_twins(tmp_path) -> None:
    with FileQueue(str(tmp_path / "q")) as q:
        q.enqueue_many([Task(func="m:f", id=f"t{n}") for n in range(3)])
        page = q.list_tasks(status="pending", limit=2)
        assert ids(page.items) == ["t0", "t1"] and page.next
        assert ids(q.list_tasks(after=page.next, status="pending").items) == ["t2"]
    with FileBackend(str(tmp_path / "b")) as backend:
        task_id = backend.enqueue("m:f", queue="mail")
        page = backend.list_tasks(queue="mail", status=TaskStatus.PENDING)
        assert ids(page.items) == [task_id] and page.next is None
        assert backend.list_tasks("other").items == []


async def test_the_async_backend_lists_through_its_queue(tmp_path) -> None:
    from omniq.backend.file import AsyncFileBackend

    async with AsyncFileBackend(str(tmp_path)) as backend:
        first = await backend.enqueue("m:f")
        await backend.enqueue("m:f", delay=3600)
        page = await backend.list_tasks(limit=1)
        assert ids(page.items) == [first] and page.next
        rest = await backend.list_tasks(after=page.next)
        assert [i.status for i in rest.items] == [TaskStatus.SCHEDULED]


async def test_the_memory_contract_backend_pages_the_same_way() -> None:
    from memory_backend import MemoryQueue

    q = MemoryQueue()
    await q.enqueue_many([Task(func="m:f", id=f"t{n}") for n in range(5)])
    claimed = await q.dequeue()
    assert claimed is not None
    items = await all_pages(q, 2)
    assert [i.status for i in items] == [TaskStatus.PENDING] * 4 + [TaskStatus.RUNNING]
    assert len(set(ids(items))) == 5
    with pytest.raises(ValueError):
        await q.list_tasks(status="done")


# -- omniq tasks -----------------------------------------------------------------------------
def test_cli_tasks_lists_pages_and_refuses_bad_input(tmp_path) -> None:
    from test_cli import SECRET_OPTIONS, Cli

    work = tmp_path / "cwd"
    work.mkdir()
    cli, base = Cli(work), str(tmp_path / "store")
    dead = cli.enqueue(base, "cli_tasks:boom", "--kwargs", '{"message": "bad record"}')
    cli.burst(base)
    first = cli.enqueue(base, "cli_tasks:add", "--args", "[1, 2]")
    later = cli.enqueue(base, "cli_tasks:add", "--args", "[3, 4]", "--delay", "600", "-q", "zz")

    table = cli.ok("tasks", base, "--storage-options", SECRET_OPTIONS).splitlines()
    assert table[0].split() == [
        "TASK", "QUEUE", "STATUS", "FUNCTION", "ATTEMPT", "WHEN", "WORKER", "NOTE"
    ]  # fmt: skip
    rows = [line.split()[:3] for line in table[1:]]
    assert rows == [
        [first, "default", "pending"],
        [dead, "default", "dead"],
        [later, "zz", "scheduled"],
    ]
    assert "ValueError: bad record" in table[2] and "(more" not in "\n".join(table)

    seen, after = [], []
    while True:  # --json, one task a page
        page = json.loads(cli.ok("tasks", base, "--json", "--limit", "1", *after))
        seen += [(i["task"]["id"], i["status"]) for i in page["items"]]
        if page["next"] is None:
            break
        after = ["--after", page["next"]]
    assert seen == [(first, "pending"), (dead, "dead"), (later, "scheduled")]
    out = cli.ok("tasks", base, "--limit", "1", "-q", "default")
    assert first in out and dead not in out and "(more: --after " in out
    assert dead in cli.ok("tasks", base, "--status", "dead") and "(no tasks)" in cli.ok(
        "tasks", base, "--status", "running"
    )

    for args, message in [
        (["--status", "done"], "invalid choice"),
        (["--limit", "0"], "must be > 0"),
        (["--after", "junk"], "not a cursor"),
        (["-q", "../x"], "queue name"),
    ]:
        proc = cli("tasks", base, *args)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
    proc = cli("tasks", str(tmp_path / "missing"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr


@contextlib.contextmanager
def http_requests() -> Iterator[list[str]]:
    """Every HTTP request the SDKs send inside (s3fs, gcsfs and adlfs all go through
    aiohttp's ``ClientSession``), as ``"METHOD path?query"``."""
    import aiohttp

    made: list[str] = []
    original = aiohttp.ClientSession._request

    async def counted(self: Any, method: str, url: Any, *args: Any, **kw: Any) -> Any:
        made.append(f"{method} {url}")
        return await original(self, method, url, *args, **kw)

    aiohttp.ClientSession._request = counted  # type: ignore[method-assign]
    try:
        yield made
    finally:
        aiohttp.ClientSession._request = original  # type: ignore[method-assign]


@pytest.mark.parametrize("storage", ["s3", "gcs", "azure"], indirect=True)
async def test_a_prefix_is_listed_with_one_request_on_each_object_store(storage) -> None:
    """The plugins' ``ls`` looks again at an empty prefix (is it a file?): s3fs lists the
    parent, gcsfs GETs the object, adlfs HEADs it; adlfs also walks the parent level first
    whatever the prefix holds. An idle queue's reaper pass lists its ``deps/`` and its empty
    ``run/``: one request each; after a pass that found ``run/`` empty, one bounded look at
    ``run/`` (tests/test_queue.py: the pass after it finds a claim)."""
    async with make_queue(storage) as q:
        await q.enqueue_many([])  # the start-up probe
        with http_requests() as made:
            assert await q.store.listdir("default/run") == []
            assert await q.store.listdir("default/run", True) == []
        assert len(made) == 2, made
        with http_requests() as made:
            assert await q.reap() == []
        assert len(made) == 2, made  # deps/ and run/
        with http_requests() as made:
            assert await q.reap() == []
        assert len(made) == 1, made  # run/ found empty last time: one bounded look
        await q.store.write("default/run/a.json", b"12345")
        await q.store.write("default/run/sub/b.json", b"1")
        with http_requests() as made:
            assert await q.store.listdir("default/run") == ["a.json"]
            (entry,) = await q.store.listdir("default/run", True)
            assert await q.store.listdirs("default") == ["run"]
        assert len(made) == 3, made
        assert (entry.name, entry.size) == ("a.json", 5)
        assert abs(entry.mtime - time.time()) < 300  # the store's clock: the emulator's
        if storage.kind == "azure":  # a Data Lake (hierarchical) account's folder is a blob
            from azure.storage.blob.aio import BlobServiceClient

            container, _, root = storage.base_dir.split("://", 1)[1].partition("/")
            conn = storage.storage_options["connection_string"]
            async with BlobServiceClient.from_connection_string(conn) as service:
                blob = service.get_blob_client(container, f"{root}/default/run/folder")
                await blob.upload_blob(b"", metadata={"hdi_isfolder": "true"})
            assert await q.store.listdir("default/run") == ["a.json"]  # not a file
