"""What a claim lists and how often (issue 13): bounded head listings on every store, one
reaper pass per interval whatever the number of consumers, consumers spread over the head
without breaking priority order, an idle poller's pace kept across calls; and what the S3 and
Azure clients do for a listing or a read (times, the List Blobs XML, SAS tokens, the
environment)."""

from __future__ import annotations

import os
import random
import time
from typing import Any

import pytest

from omniq.core import Task, _azure_rest, _cloud_listing, codec
from omniq.core.fs import exists, listafter, listdirs, listhead, listtree, write
from omniq.storage.file.queue import AsyncFileQueue
from omniq.storage.file.queue import _layout as layout
from omniq.storage.file.queue import _queue as queue_module
from queue_helpers import FakeClock, count_scans, make_queue

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_head_listings_are_ordered_and_bounded(storage: Any) -> None:
    """listhead/listafter return names in key order from where they are asked, at most
    ``limit``, files only (not a sub-directory), [] for a missing prefix; listtree the same
    over the sub-directories: the claim's listing on S3, GCS and Azure is one bounded
    request built on these."""
    q = make_queue(storage)
    try:

        def program() -> Any:
            for i in range(30):
                yield write(f"area/a{i:03d}", b"x")
            yield write("area/sub/inner", b"x")
            head = yield listhead("area", 5)
            after = yield listafter("area", "a010", 5)
            tail = yield listafter("area", "a028", 5)
            missing = yield listhead("nothing-here", 5)
            dirs = yield listdirs("area")
            for rank in ("p2", "p1"):
                for i in range(4):
                    yield write(f"tree/{rank}/t{i}", b"x")
            yield write("tree/top", b"x")  # not in a sub-directory: not listed
            yield write("tree/p1/deeper/t9", b"x")  # two levels down: not listed either
            tree = yield listtree("tree", 6)
            whole = yield listtree("tree", 100)
            none = yield listtree("nothing-here", 5)
            return head, after, tail, missing, dirs, tree, whole, none

        head, after, tail, missing, dirs, tree, whole, none = await q.store.run(program())
    finally:
        await q.close()
    assert head == [f"a{i:03d}" for i in range(5)]
    assert after == [f"a{i:03d}" for i in range(11, 16)]
    assert tail == ["a029"]
    assert missing == []
    assert dirs == ["sub"]
    # The head over the sub-directories, the first one's first (a queue's top priority).
    assert tree == [f"p1/t{i}" for i in range(4)] + ["p2/t0", "p2/t1"]
    assert whole == [f"p{r}/t{i}" for r in (1, 2) for i in range(4)]
    assert none == []


async def test_one_reaper_pass_per_interval_whatever_the_consumers(storage: Any) -> None:
    clock = FakeClock()
    consumers = [make_queue(storage, clock=clock, lease=40) for _ in range(4)]
    passes = []
    for q in consumers:
        original = q._reap_queue  # the pass over one storage queue that dequeue makes

        async def counted(queue: str, _original: Any = original) -> Any:
            passes.append(queue)
            return await _original(queue)

        q._reap_queue = counted  # type: ignore[method-assign]
    try:
        for _ in range(3):
            for q in consumers:
                assert await q.dequeue() is None
        assert len(passes) == 1  # not one per consumer
        clock.advance(consumers[0].reap_interval * 1.3)  # past the interval and its jitter
        for q in consumers:
            assert await q.dequeue() is None
        assert len(passes) == 2
    finally:
        for q in consumers:
            await q.close()


async def test_spread_consumers_keep_priority_order_and_claim_each_once(storage: Any) -> None:
    consumers = [make_queue(storage, spread=256) for _ in range(3)]
    try:
        low = [Task(func="m:f", args=[i], priority=-1) for i in range(40)]
        high = [Task(func="m:f", args=[i], priority=5) for i in range(10)]
        await consumers[0].enqueue_many(low + high)
        seen: list[str] = []
        while True:
            got = [await q.dequeue() for q in consumers]
            claimed = [c for c in got if c is not None]
            if not claimed:
                break
            seen += [c.id for c in claimed]
            for c, q in zip(got, consumers, strict=True):
                if c is not None:
                    await q.ack(c)
        assert sorted(seen) == sorted(t.id for t in low + high)  # each exactly once
        assert set(seen[:10]) == {t.id for t in high}  # every high one before any low one
    finally:
        for q in consumers:
            await q.close()


async def test_consumers_spread_over_the_whole_head_one_listing_returns(
    storage: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On an object store the head a claim lists is what one request returns (1,000 names)
    and consumers start anywhere in it (a local directory and memory: among the first 256):
    with the random start at its last place, the first claim is that window's last task."""
    head = 256 if storage.kind in ("memory", "local") else 1000
    q = make_queue(storage)
    try:
        ids = await q.enqueue_many([Task(func="m:f", args=[i]) for i in range(head + 5)])
        monkeypatch.setattr(random, "randrange", lambda n: n - 1)
        claimed = await q.dequeue()
        assert claimed is not None
        assert claimed.id == sorted(ids)[head - 1]
        rest = await q.dequeue()  # walks on from there: the head's first task
        assert rest is not None and rest.id == sorted(ids)[0]
    finally:
        await q.close()


async def test_an_idle_poller_keeps_its_pace_across_calls(storage: Any) -> None:
    q = make_queue(storage, poll_interval=30.0, max_poll_interval=60.0, watch=False)
    looks = count_scans(q)
    try:
        assert await q.dequeue(wait=0.01) is None
        assert len(looks) == 1
        # The next look is 30 s away: short waits return without listing again.
        for _ in range(3):
            assert await q.dequeue(wait=0.01) is None
        assert len(looks) == 1
        # A dequeue without a wait always looks.
        assert await q.dequeue() is None
        assert len(looks) == 2
        # An enqueue through this instance wakes its poller at once.
        task = Task(func="m:f")
        await q.enqueue(task)
        claimed = await q.dequeue(wait=0.01)
        assert claimed is not None and claimed.id == task.id
    finally:
        await q.close()


def test_idle_looks_are_drawn_between_half_the_pause_and_the_pause(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pollers started together must not look at the same moments for ever: each wait is
    drawn from [pause / 2, pause], the pause growing 1.5x per empty look up to the maximum."""
    monkeypatch.setattr(queue_module, "random", random.Random(7))
    idle, pause, gaps = queue_module._Idle(), 0.2, []
    for _ in range(60):
        before = time.monotonic()
        idle.looked(False, 0.2, 2.0)
        after = time.monotonic()
        assert idle.pause == pytest.approx(pause)
        assert idle.next - before >= pause / 2 and idle.next - after <= pause
        gaps.append(idle.next - after)
        pause = min(pause * 1.5, 2.0)
    steady = gaps[10:]
    assert min(steady) < 1.2 and max(steady) > 1.8  # spread over the band, not one period
    idle.looked(True, 0.2, 2.0)
    assert (idle.next, idle.pause) == (0.0, 0.0)  # work found: look again at once


async def test_a_shallow_listing_on_an_object_store_is_listed_again_after_one_miss(
    storage: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Consumers of a shallow queue all list the same few tasks, so a listing goes stale
    fast: on an object store, where each miss costs a read (a lost race two requests more),
    one miss makes the claim list again; a local directory and memory keep trying three."""
    monkeypatch.setattr(random, "randrange", lambda n: 0)  # claims in listing order
    q = make_queue(storage)
    tried: list[list[str]] = []
    claim_picks = q._claim_picks

    async def recording(queue: str, picks: list[Any], *args: Any) -> Any:
        tried.append([c.task_id for c in picks])
        return await claim_picks(queue, picks, *args)

    try:
        ids = sorted(await q.enqueue_many([Task(func="m:f", args=[i]) for i in range(6)]))
        first = await q.dequeue()  # lists all six, claims the first
        assert first is not None and first.id == ids[0]
        async with make_queue(storage) as other:  # takes the other five (close: no copies left)
            taken = [c async for c in _drain(other)]
            assert sorted(c.id for c in taken) == ids[1:]
            late = await other.enqueue(Task(func="m:f", args=[6]))
        monkeypatch.setattr(q, "_claim_picks", recording)
        got = await q.dequeue()  # from its listing: five tasks others took meanwhile
        assert got is not None and got.id == late
        misses = 1 if storage.kind not in ("memory", "local") else 3
        assert tried == [[i] for i in ids[1 : 1 + misses]] + [[late]]
    finally:
        await q.close()


async def test_a_kept_listing_whose_candidate_was_taken_is_listed_again(
    storage: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listing kept from an earlier call is trusted until a candidate of it is found taken
    once it is ``refresh_interval`` old: others claim from the same part of it, and the next
    listing drops their claims. A listing younger than that is trusted for three misses in a
    row (races under way). 16 workers on a deep S3 queue tried tasks claimed 1-10 s before
    (their listings are kept up to ten intervals): 0.15-0.2 misses a task."""
    monkeypatch.setattr(random, "randrange", lambda n: 0)  # claims in listing order
    clock = FakeClock()

    def consumer() -> Any:
        return make_queue(storage, clock=clock, lanes=False, batch=8, spread=8)

    async def others_take(n: int) -> list[str]:
        async with consumer() as other:  # (closed: no spent copy left behind on GCS)
            taken = await other.dequeue_many(n)
            for claimed in taken:
                await other.ack(claimed)
        return sorted(c.id for c in taken)

    q = consumer()
    tried: list[str] = []
    claim_picks = q._claim_picks

    async def recording(queue: str, picks: list[Any], *args: Any) -> Any:
        tried.extend(c.task_id for c in picks)
        return await claim_picks(queue, picks, *args)

    try:
        ids = sorted(await q.enqueue_many([Task(func="m:f", args=[i]) for i in range(12)]))
        first = await q.dequeue()  # lists the first eight, claims the first
        assert first is not None and first.id == ids[0]
        assert await others_take(5) == ids[1:6]
        monkeypatch.setattr(q, "_claim_picks", recording)
        clock.advance(2 * q.refresh_interval)
        got = await q.dequeue()  # one miss in the old listing, then a new listing
        assert got is not None and got.id == ids[6]
        assert tried == [ids[1], ids[6]]
        assert await others_take(3) == ids[7:10]
        tried.clear()
        last = await q.dequeue()  # its listing is new: three misses, then a listing
        assert last is not None and last.id == ids[10]
        assert tried == ids[7:11]
        for claimed in [first, got, last]:
            await q.ack(claimed)
    finally:
        await q.close()


async def _drain(q: Any) -> Any:
    while (claimed := await q.dequeue()) is not None:
        yield claimed


async def _claim_with_a_copy_shown_again(q: Any, tried: list[str]) -> tuple[Any, Any, str]:
    """Three tasks; the first claimed, its ready copy put back by hand (as a listing made
    while the claim was in flight would show it), then ``dequeue_many(3)`` from a new listing
    with every try noted in ``tried``. Returns the first claim, the others and the copy."""
    claim_program = q._claim_program

    def spy(queue: str, cand: Any, *args: Any) -> Any:
        tried.append(cand.task_id)
        return claim_program(queue, cand, *args)

    await q.enqueue_many([Task(func="m:f", args=[i]) for i in range(3)])
    first = await q.dequeue()
    assert first is not None
    copy = layout.ready_key(first.queue, first.task.priority, first.id, first.attempt)
    await q.store.run(_put_back(copy, first.task))
    q._claim_program = spy
    q._cache.clear()  # a new listing, which shows the copy again
    return first, await q.dequeue_many(3), copy


def _put_back(copy: str, task: Task) -> Any:
    yield write(copy, codec.encode(task))


def _left(copy: str) -> Any:
    return (yield exists(copy))


async def test_a_queue_object_does_not_try_a_task_again_soon_after_its_own_try(
    remote_storage: Any,
) -> None:
    """On an object store a listing made while another call of the same object has claims
    in flight (or before their ready copies are deleted) shows those tasks again, and a try
    costs requests: they are left out for two ``refresh_interval``s."""
    clock = FakeClock()
    q = make_queue(remote_storage, clock=clock, lanes=False)
    tried: list[str] = []
    try:
        first, got, copy = await _claim_with_a_copy_shown_again(q, tried)
        assert len(got) == 2 and first.id not in tried
        for claimed in [first, *got]:
            await q.ack(claimed)

        clock.advance(2.5)
        await q.store.run(_put_back(copy, first.task))  # (GCS: the deferred delete removed it)
        q._cache.clear()
        assert await q.dequeue() is None  # tried now, lost to the claim (S3, Azure: dropped
        if remote_storage.kind == "gcs":  # by the listing's claim check before a try)
            assert first.id in tried
        else:
            assert first.id not in tried
        assert not await q.store.run(_left(copy))  # and removed
    finally:
        await q.close()


@pytest.mark.parametrize("storage", ["memory", "local"], indirect=True)
async def test_a_local_queue_object_keeps_no_record_of_its_tries(storage: Any) -> None:
    """Locally a try of a task taken meanwhile is one failed system call, less than noting
    every try (a drain of 100,000 tasks on tmpfs held ~15,000 noted keys at a time): a copy
    shown again is tried at once, found taken, and removed."""
    q = make_queue(storage, clock=FakeClock(), lanes=False)
    tried: list[str] = []
    try:
        first, got, copy = await _claim_with_a_copy_shown_again(q, tried)
        assert len(got) == 2 and first.id in tried
        assert not q._picked
        assert not await q.store.run(_left(copy))
        for claimed in [first, *got]:
            await q.ack(claimed)
    finally:
        await q.close()


@pytest.mark.parametrize("storage", ["s3", "gcs", "azure"], indirect=True)
async def test_a_claim_listing_reads_the_ready_head_in_one_request(storage: Any) -> None:
    """The head of ``ready/`` over its priority directories is one flat listing: a refresh
    of a queue with two priorities is that, the head of ``due/`` and on S3 and Azure the
    look at ``run/`` (before: a listing of the priority directories, then one of each)."""
    from test_listing import http_requests

    q = make_queue(storage)
    try:
        await q.enqueue_many([Task(func="m:f", priority=p) for p in (0, 5, 5)])
        with http_requests() as made:
            found = await q.store.run(q._scan_program("default"))
        assert len(found) == 3
        assert len(made) == (2 if q.store.kind == "gcs" else 3), made
    finally:
        await q.close()


def _listafter(prefix: str, after: str, limit: int) -> Any:
    return (yield listafter(prefix, after, limit))


@pytest.mark.parametrize("storage", ["s3", "gcs", "azure"], indirect=True)
async def test_names_after_one_deep_in_a_prefix_are_one_request(
    storage: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``listafter`` from a name deep in a prefix starts there: S3 ``StartAfter``, GCS
    ``startOffset``, Azure ``startFrom`` (before: pages of ``limit`` from the prefix's start,
    six here)."""
    from test_listing import http_requests

    q = make_queue(storage)
    try:
        for i in range(30):
            await q.store.write(f"area/a{i:03d}", b"x")
        for after in ("a020", "a0205"):  # a name listed, a name between two
            with http_requests() as made:
                names = await q.store.run(_listafter("area", after, 5))
            assert names == [f"a{i:03d}" for i in range(21, 26)]
            assert len(made) == 1, made
        if storage.kind == "azure":  # an SDK without startFrom: the same names, more pages
            monkeypatch.setattr(_cloud_listing, "azure_starts_from", lambda: False)
            with http_requests() as made:
                names = await q.store.run(_listafter("area", "a020", 5))
            assert names == [f"a{i:03d}" for i in range(21, 26)]
            assert len(made) == 6, made
    finally:
        await q.close()


def test_iso_timestamps_read_as_botocore_reads_them() -> None:
    """S3 sessions read the ISO 8601 times of listings with ``datetime.fromisoformat``;
    anything else goes to botocore's parser, with the same result or the same error."""
    from botocore.utils import parse_timestamp

    from omniq.core._plugins import iso_timestamp

    for text in (
        "2026-12-06T00:16:12.000Z",
        "2026-12-06T00:16:12Z",
        "2026-12-06T00:16:12.123456Z",
        "Sat, 05 Dec 2026 23:50:43 GMT",  # a Last-Modified header
        "2026-12-06T01:16:12+01:00",
        1764979843,
    ):
        got, want = iso_timestamp(text), parse_timestamp(text)
        assert got == want and got.utcoffset() == want.utcoffset(), text
    for text in ("yesterdayZ", "2026-12-06Z"):  # the second: a naive date to fromisoformat
        with pytest.raises(ValueError):
            parse_timestamp(text)
        with pytest.raises(ValueError):
            iso_timestamp(text)


@pytest.mark.parametrize("storage", ["s3"], indirect=True)
async def test_s3_listing_times_are_read_as_iso_timestamps(
    storage: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store's S3 client reads its listings' times with ``iso_timestamp`` (botocore's own
    parser, dateutil's, took ~60 % of a listing's CPU); a session the caller gave is left as
    it was."""
    from aiobotocore.session import AioSession
    from botocore.utils import parse_timestamp

    from omniq.core import _plugins

    read: list[Any] = []

    def counted(value: Any) -> Any:
        read.append(value)
        return parse_timestamp(value)

    monkeypatch.setattr(_plugins, "iso_timestamp", counted)
    for own in (False, True):
        options = {**storage.storage_options, **({"session": AioSession()} if own else {})}
        q = AsyncFileQueue(storage.base_dir, options)
        try:
            for n in range(3):
                await q.store.write(f"area/f{n}", b"x")
            read.clear()
            entries = await q.store.listdir("area", True)
            assert [e.name for e in entries] == ["f0", "f1", "f2"]
            assert all(abs(e.mtime - time.time()) < 300 for e in entries)
            assert len(read) == (0 if own else 3), read
        finally:
            await q.close()


def test_azure_listing_names_sent_encoded_are_decoded() -> None:
    """A blob name with characters XML 1.0 cannot carry comes percent-encoded in a listing
    (``Encoded="true"``); others as they are."""
    import xml.etree.ElementTree as ET

    page = ET.fromstring(
        "<Blobs><Blob><Name Encoded='true'>a%0Bb%25</Name></Blob>"
        "<Blob><Name>q/ready/x%41.json</Name></Blob><BlobPrefix><Name>q/p/</Name></BlobPrefix>"
        "</Blobs>"
    )
    assert [_azure_rest.blob_name(node) for node in page] == [
        "a\x0bb%",
        "q/ready/x%41.json",
        "q/p/",
    ]


@pytest.mark.parametrize("storage", ["azure"], indirect=True)
async def test_an_azure_listing_of_a_missing_container_is_a_storage_error(storage: Any) -> None:
    """The listings' own List Blobs request raises what the SDK would (404: not found, not
    retried), not an empty listing."""
    from azure.core.exceptions import ResourceNotFoundError

    from omniq.core._store_errors import is_transient
    from omniq.core.errors import StorageError

    container = storage.base_dir.split("://", 1)[1].split("/", 1)[0]
    gone = storage.base_dir.replace(container, f"{container}-gone", 1)
    q = AsyncFileQueue(gone, storage.storage_options)
    try:
        with pytest.raises(StorageError) as caught:
            await q.store.listdir("area")
        cause = caught.value.__cause__
        assert isinstance(cause, ResourceNotFoundError) and cause.status_code == 404
        assert cause.error_code == "ContainerNotFound"  # as the SDK's own errors carry it
        assert not is_transient(cause)
    finally:
        await q.close()


@pytest.mark.parametrize("storage", ["azure"], indirect=True)
async def test_azure_reads_and_listings_with_a_sas_token(storage: Any) -> None:
    """Reads and listings send their own requests through the SDK client's pipeline; with a
    SAS token (in the client's URL, not a header) they carry it too."""
    from datetime import datetime, timedelta, timezone

    from azure.storage.blob import AccountSasPermissions, ResourceTypes, generate_account_sas

    parts = dict(
        item.split("=", 1)
        for item in storage.storage_options["connection_string"].split(";")
        if item
    )
    sas = generate_account_sas(
        parts["AccountName"],
        parts["AccountKey"],
        resource_types=ResourceTypes(service=True, container=True, object=True),
        permission=AccountSasPermissions(read=True, write=True, list=True, create=True),
        expiry=datetime.now(timezone.utc) + timedelta(hours=1),
    )
    options = {
        "connection_string": f"BlobEndpoint={parts['BlobEndpoint']};SharedAccessSignature={sas}"
    }
    q = AsyncFileQueue(storage.base_dir, options)
    try:
        for n in range(3):
            await q.store.write(f"area/f{n}", f"value {n}".encode())
        assert await q.store.read("area/f1") == b"value 1"
        assert await q.store.read("area/missing") is None
        assert await q.store.listdir("area") == ["f0", "f1", "f2"]
        assert [e.size for e in await q.store.listdir("area", True)] == [7, 7, 7]
        assert await q.store.run(_listafter("area", "f0", 5)) == ["f1", "f2"]
    finally:
        await q.close()


@pytest.mark.parametrize("storage", ["azure"], indirect=True)
async def test_azure_requests_look_up_no_environment_unless_it_has_a_proxy_or_netrc(
    storage: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """aiohttp trusting the environment reads ``~/.netrc`` and the proxy settings in threads
    on every request: the azure SDK's session does so only where the environment has a proxy
    for aiohttp's schemes or a netrc file when the storage is made."""
    import urllib.request

    for key in list(os.environ):
        if key.lower().endswith("_proxy"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "absent"))
    netrc = tmp_path / "netrc"
    netrc.write_text("machine example.invalid login a password b\n")
    proxy = {"HTTPS_PROXY": "http://proxy.invalid:3128", "NO_PROXY": "127.0.0.1,localhost"}
    for case in ("no-proxy-only", "netrc", "proxy"):
        with monkeypatch.context() as patch:
            if case == "no-proxy-only":  # NO_PROXY alone sends nothing through a proxy
                patch.setattr(urllib.request, "getproxies", lambda: {"no": "localhost"})
            elif case == "netrc":
                patch.setenv("NETRC", str(netrc))
            else:
                for key, value in proxy.items():  # the emulator's address bypasses it
                    patch.setenv(key, value)
            q = AsyncFileQueue(storage.base_dir, storage.storage_options)
            try:
                await q.store.write("area/a", b"x")
                assert await q.store.read("area/a") == b"x"
                azure = (await q.store._ops_for_loop()).fs.fs
                session = azure.service_client._config.transport.session
                assert session.trust_env is (case != "no-proxy-only"), case
            finally:
                await q.close()


@pytest.mark.parametrize("storage", ["azure"], indirect=True)
async def test_an_azure_read_asks_for_the_server_timeout_adlfs_was_given(storage: Any) -> None:
    """adlfs' ``timeout`` option (the service's own time limit for a request) reaches reads
    sent through the pipeline, as it reached the SDK's downloader."""
    from test_listing import http_requests

    for options, sent in (
        (storage.storage_options, False),
        ({**storage.storage_options, "timeout": 30}, True),
    ):
        q = AsyncFileQueue(storage.base_dir, options)
        try:
            await q.store.write("area/a", b"x")
            with http_requests() as made:
                assert await q.store.read("area/a") == b"x"
            (request,) = made
            assert ("timeout=30" in request) is sent, request
        finally:
            await q.close()


class _AzureAnswer:
    """A response of the Azure pipeline, as ``_azure_rest`` reads it."""

    reason = "stub"

    def __init__(self, status: int, code: str | None) -> None:
        self.status_code = status
        self.headers = {"x-ms-error-code": code} if code else {}

    async def read(self) -> bytes:
        return b""

    def text(self, encoding: str | None = None) -> str:
        return ""


class _AzureStub:
    """adlfs' filesystem as ``azure_write`` uses it, its container client answering
    ``answer`` to every request."""

    def __init__(self, answer: _AzureAnswer) -> None:
        config = type("Config", (), {"url": "http://azure.invalid/acct/c", "version": "v"})
        self.service_client = self
        self._client = type("Client", (), {"_config": config, "_send_request": self._send})()
        self.answer = answer

    async def _send(self, request: Any, stream: bool = False) -> _AzureAnswer:
        return self.answer

    def get_container_client(self, container: str) -> Any:
        return self

    def split_path(self, path: str) -> tuple[str, str, None]:
        container, key = path.split("/", 1)
        return container, key, None

    def _parent(self, path: str) -> str:
        return path.rsplit("/", 1)[0]

    def invalidate_cache(self, path: str) -> None:
        pass


@pytest.mark.parametrize(
    ("status", "code", "exists", "transient"),
    [
        (409, "BlobAlreadyExists", True, False),
        (409, None, True, False),
        (409, "ContainerBeingDeleted", False, False),  # refused, but not for existing
        (412, "ConditionNotMet", True, False),
        (503, "ServerBusy", False, True),
    ],
)
async def test_an_azure_create_is_answered_exists_only_when_the_blob_exists(
    status: int, code: str | None, exists: bool, transient: bool
) -> None:
    """Azure refuses ``If-None-Match: *`` on an existing blob with 409 ``BlobAlreadyExists``;
    another 409 is an error of its own (a create that fails is not a lost race)."""
    from omniq.core._store_errors import is_exists_error, is_transient

    with pytest.raises(Exception) as caught:
        await _azure_rest.azure_write(_AzureStub(_AzureAnswer(status, code)), "c/k", b"x", True)
    assert is_exists_error(caught.value) is exists
    assert is_transient(caught.value) is transient
    assert getattr(caught.value, "error_code", code) == code
