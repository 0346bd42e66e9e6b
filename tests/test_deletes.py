"""Deleting many keys at once (``Store.delete_many``): on Azure blob batches, one request per
256 blobs (adlfs sends a DELETE a blob); a queue's spent ready copies go that way, on S3 and
Azure at the next listing (``_claim_batched``), on GCS beside the next claims
(``_claim_deferred``)."""

from __future__ import annotations

from typing import Any

import pytest

from omniq.core import Task
from omniq.core.errors import StorageError
from omniq.core.fs import Store
from omniq.storage.file.queue._claim_deferred import DeferredClaims
from queue_helpers import make_queue
from test_listing import http_requests

pytestmark = pytest.mark.anyio
AZURE = pytest.mark.parametrize("storage", ["azure"], indirect=True)
BATCHED = pytest.mark.parametrize("storage", ["s3", "azure"], indirect=True)


def batch_deletes(made: list[str]) -> list[str]:
    """The batch deletes among ``made``: S3's DeleteObjects, Azure's blob batch."""
    return [r for r in made if r.startswith("POST") and ("delete" in r or "comp=batch" in r)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])  # trio: the sync ops in a thread
async def test_many_keys_are_deleted_absent_ones_included(storage: Any) -> None:
    store = Store(storage.base_dir, storage.storage_options)
    keys = [f"q/{i:03}.json" for i in range(300)]
    for key in keys:
        await store.write(key, b"{}")
    await store.write("q/kept.json", b"{}")
    await store.delete_many([*keys, "q/absent.json", "elsewhere/absent.json"])
    assert await store.listdir("q") == ["kept.json"]
    await store.aclose()


@AZURE
async def test_azure_deletes_up_to_256_blobs_a_request(storage: Any) -> None:
    store = Store(storage.base_dir, storage.storage_options)
    keys = [f"q/{i:03}.json" for i in range(300)]
    for key in keys:
        await store.write(key, b"{}")
    with http_requests() as made:
        await store.delete_many(keys)
    assert [r.split(" ")[0] for r in made] == ["POST", "POST"], made  # before: 300 DELETEs
    assert await store.listdir("q") == []
    await store.aclose()


@AZURE
async def test_a_blob_the_batch_cannot_delete_fails_alone(storage: Any) -> None:
    """A leased blob refuses its delete inside the batch: deleted on its own, it raises the
    error a single delete raises, and the others are gone."""
    from azure.storage.blob.aio import BlobServiceClient

    store = Store(storage.base_dir, storage.storage_options)
    for key in ("q/a.json", "q/leased.json", "q/z.json"):
        await store.write(key, b"{}")
    container, _, prefix = storage.base_dir.split("://", 1)[1].partition("/")
    conn = storage.storage_options["connection_string"]
    async with BlobServiceClient.from_connection_string(conn) as service:
        blob = service.get_blob_client(container, f"{prefix}/q/leased.json")
        lease = await blob.acquire_lease(lease_duration=-1)
        with pytest.raises(StorageError):
            await store.delete_many(["q/a.json", "q/leased.json", "q/z.json"])
        assert await store.listdir("q") == ["leased.json"]
        await lease.release()
    await store.delete_many(["q/leased.json"])
    assert await store.listdir("q") == []
    await store.aclose()


@AZURE
async def test_a_refused_batch_deletes_each_blob(
    storage: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An account or a token without blob batches: a DELETE a blob, as adlfs does."""
    from azure.core.exceptions import HttpResponseError
    from azure.storage.blob.aio import ContainerClient

    async def refused(self: Any, *names: str, **kw: Any) -> Any:
        exc = HttpResponseError(message="This operation is not permitted")
        exc.status_code = 403
        raise exc

    monkeypatch.setattr(ContainerClient, "delete_blobs", refused)
    store = Store(storage.base_dir, storage.storage_options)
    keys = [f"q/{i}.json" for i in range(3)]
    for key in keys:
        await store.write(key, b"{}")
    with http_requests() as made:
        await store.delete_many([*keys, "q/absent.json"])
    assert sorted(r.split(" ")[0] for r in made) == ["DELETE"] * 4, made
    assert await store.listdir("q") == []
    await store.aclose()


@AZURE
async def test_a_consumer_deletes_the_copies_its_claims_spent_in_one_request(
    storage: Any,
) -> None:
    """GCS' strategy: the ready copies of one call's claims are deleted beside the next
    call's claims, in one batch (before: a DELETE each). Run on Azure, whose emulator batches
    (fake-gcs-server cannot: its issue #1443)."""
    async with make_queue(storage) as q:
        q.claims = DeferredClaims(q.store, q.batch)
        await q.enqueue_many([Task(func="m:f", queue="jobs") for _ in range(8)])
        first = await q.dequeue_many(4, "jobs")
        assert len(first) == 4
        with http_requests() as made:
            second = await q.dequeue_many(4, "jobs")
        assert len(second) == 4
        methods = [r.split(" ")[0] for r in made]
        assert methods.count("POST") == 1 and "DELETE" not in methods, made
        ready = [
            name
            for rank in await q.store.listdirs("jobs/ready")
            for name in await q.store.listdir(f"jobs/ready/{rank}")
        ]
        assert len(ready) == 4  # the second call's copies wait for the next call
        assert not {c.id for c in first} & {name.split(".")[0] for name in ready}, ready


@BATCHED
async def test_a_listing_deletes_its_own_and_others_spent_copies_in_one_request(
    storage: Any,
) -> None:
    """A listing on S3 or Azure shows the copies this consumer spent (their delete waits for it) and
    copies other consumers claimed: it drops its own by key and the others' after one LIST
    of ``run/``, and deletes both in one batch (a flush before the listing and the skipped
    copies' delete after it were two; on Azure before, a batch beside each claim call)."""
    async with make_queue(storage) as q1, make_queue(storage) as q2:
        await q1.enqueue_many([Task(func="m:f", queue="jobs") for _ in range(6)])
        mine = await q1.dequeue_many(2, "jobs")
        theirs = await q2.dequeue_many(2, "jobs")
        assert len(mine) == 2 and len(theirs) == 2 and q1.claims.pending
        q1._cache.clear()  # its next claim lists again
        tried: list[str] = []
        claim = q1._claim_program

        def spy(queue: str, cand: Any, lease: float, worker: str) -> Any:
            tried.append(cand.task_id)
            return claim(queue, cand, lease, worker)

        q1._claim_program = spy  # type: ignore[method-assign]
        with http_requests() as made:
            more = await q1.dequeue_many(2, "jobs")
        assert len(more) == 2 and sorted(tried) == sorted(c.id for c in more)
        assert len(batch_deletes(made)) == 1, made
        assert not [r for r in made if r.startswith("DELETE")], made
        ready = [
            name.split(".")[0]
            for rank in await q1.store.listdirs("jobs/ready")
            for name in await q1.store.listdir(f"jobs/ready/{rank}")
        ]
        # The four spent copies are gone; the two just claimed wait for the next listing.
        assert sorted(ready) == sorted(c.id for c in more)


@BATCHED
async def test_a_listing_drops_its_own_spent_copies_by_key(
    storage: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A consumer's own spent copies are dropped from its listing by key, whatever ``run/``
    shows (here nothing: its LIST is blinded), and deleted by that listing."""
    from omniq.core.fs import listafter
    from omniq.storage.file.queue import _claim_batched

    async with make_queue(storage) as q:
        await q.enqueue_many([Task(func="m:f", queue="jobs") for _ in range(4)])
        mine = await q.dequeue_many(2, "jobs")
        assert len(mine) == 2 and q.claims.pending == 2
        monkeypatch.setattr(
            _claim_batched, "listafter", lambda prefix, first, limit: listafter(prefix, "~", limit)
        )
        found = await q.store.run(q._scan_program("jobs"))
        assert len(found) == 2 and not {c.task_id for c in found} & {c.id for c in mine}
        assert not q.claims.pending
        ready = await q.store.listdir("jobs/ready/p0999")
        assert sorted(name.split(".")[0] for name in ready) == sorted(c.task_id for c in found)


@BATCHED
async def test_a_small_listing_is_not_filled_with_its_own_spent_copies(storage: Any) -> None:
    """With a small ``batch`` the copies a consumer spent could fill its whole listing (the
    head is where it claimed): a few make the listing ask for that many more names, more
    than half of ``batch`` are deleted before it. Either way the listing offers live tasks."""
    async with make_queue(storage, batch=4) as q:
        await q.enqueue_many([Task(func="m:f", queue="jobs") for _ in range(10)])
        for spent in (1, 3):  # 1: listed past; 3 (of a batch of 4): deleted first
            got = await q.dequeue_many(spent, "jobs")
            assert len(got) == spent and q.claims.pending == spent
            with http_requests() as made:
                found = await q.store.run(q._scan_program("jobs"))
            assert len(found) == 4 and not {c.task_id for c in found} & {c.id for c in got}
            deletes = batch_deletes(made) + [r for r in made if r.startswith("DELETE")]
            assert len(deletes) == 1 and not q.claims.pending, made
            for claimed in got:
                await q.ack(claimed)


@AZURE
async def test_a_spent_copy_that_cannot_be_deleted_does_not_fail_listings(
    storage: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A spent copy the batch cannot delete (here a blob under a lease) is logged and left
    to the next listings' look at ``run/`` and to its attempt's clean-up: the listing still
    offers the live tasks, and so do the next ones (before: each raised and put it back)."""
    from azure.storage.blob.aio import BlobServiceClient

    async with make_queue(storage) as q:
        await q.enqueue_many([Task(func="m:f", queue="jobs") for _ in range(4)])
        mine = await q.dequeue_many(1, "jobs")
        assert len(mine) == 1 and q.claims.pending == 1
        (key,) = q.claims._spent
        container, _, prefix = storage.base_dir.split("://", 1)[1].partition("/")
        conn = storage.storage_options["connection_string"]
        async with BlobServiceClient.from_connection_string(conn) as service:
            blob = service.get_blob_client(container, f"{prefix}/{key}")
            lease = await blob.acquire_lease(lease_duration=-1)
            for _ in range(2):
                found = await q.store.run(q._scan_program("jobs"))
                assert len(found) == 3 and mine[0].id not in {c.task_id for c in found}
                assert not q.claims.pending
            assert "could not remove" in caplog.text
            await lease.release()
        found = await q.store.run(q._scan_program("jobs"))  # the look at run/ finds it again
        assert len(found) == 3
        ready = [n.split(".")[0] for n in await q.store.listdir("jobs/ready/p0999")]
        assert mine[0].id not in ready  # ... and this time deletes it
