"""Faults at the edges (issue 12): error classification by type and status, the outcome of an
exclusive create whose response was lost, the worker's errors, one retry budget per operation,
credentials in URLs, options and logs, and the command's exit codes for each case.

Tests against S3, GCS and Azure use the emulators of ``tests/conftest.py`` (a working one, or a
closed port next to it for a dead endpoint).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest

from omniq.backend.file import AsyncFileBackend, FileBackend
from omniq.core import (
    CapabilityError,
    ConfigurationError,
    RedactFilter,
    StorageError,
    _store_errors,
    redact_logs,
)
from omniq.core import _fsspec_ops as _ops
from omniq.core.fs import Store

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

TESTS_DIR = Path(__file__).resolve().parent
OMNIQ = Path(sys.executable).parent / ("omniq.exe" if os.name == "nt" else "omniq")
# Names that an error text would contain if classification looked at text.
TRAP = "app412-409-exists"
TASK_ID = "order-412-409-exists"
QUEUE = "q412exists409"
KEY_ID = "AKIDPLANTED412"
SECRET = "SECRETPLANTED409"


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(autouse=True)
def _fast_backoff(monkeypatch):
    monkeypatch.setattr(_ops, "_backoff", lambda attempt: 0.0)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dead_options(target: Any, port: int | None = None) -> dict[str, Any]:
    """The target's storage options with the endpoint moved to a port nobody listens on."""
    endpoint = f"http://127.0.0.1:{port or _closed_port()}"
    options = dict(target.storage_options)
    if target.kind == "azure":
        old = options["connection_string"]
        start = old.index("BlobEndpoint=") + len("BlobEndpoint=")
        host_end = old.index("/", start + len("http://"))
        options["connection_string"] = old[:start] + endpoint + old[host_end:]
    else:
        options["endpoint_url"] = endpoint
    return options


def _url(target: Any, *parts: str) -> str:
    return "/".join([target.base_dir.rstrip("/"), *parts])


# --------------------------------------------------------------------------- 1. classification


def _sdk_errors() -> list[tuple[str, BaseException, bool, bool]]:
    """(label, exception, is "exists", is transient); texts full of 412 / 409 / exists."""
    import aiohttp
    from azure.core.exceptions import (
        HttpResponseError,
        ResourceExistsError,
        ResourceModifiedError,
        ServiceRequestError,
        ServiceResponseError,
    )
    from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError
    from gcsfs.retry import HttpError

    url = f"http://127.0.0.1:1/omniq-test/{TRAP}/{QUEUE}/{TASK_ID}.json"

    def client_error(code: str, status: int, message: str) -> ClientError:
        return ClientError(
            {
                "Error": {"Code": code, "Message": message},
                "ResponseMetadata": {"HTTPStatusCode": status},
            },
            "PutObject",
        )

    def azure_error(status: int, code: str | None) -> HttpResponseError:
        error = HttpResponseError(message=f"{url}: 412 PreconditionFailed exists")
        error.status_code, error.error_code = status, code
        return error

    translated = OSError(errno.EIO, f"{url} 412 exists")
    translated.__cause__ = client_error("InternalError", 500, f"{url} 412 exists")
    forbidden = PermissionError(f"{url} 412 exists")
    forbidden.__cause__ = client_error("AccessDenied", 403, "412 PreconditionFailed")
    return [
        # connection failures whose text holds the URL: transient, never "exists"
        ("botocore connect", EndpointConnectionError(endpoint_url=url), False, True),
        ("botocore read timeout", ReadTimeoutError(endpoint_url=url), False, True),
        ("aiohttp disconnect", aiohttp.ServerDisconnectedError(f"{url} 412"), False, True),
        ("azure request", ServiceRequestError(f"{url} 412 exists 409"), False, True),
        ("azure response", ServiceResponseError(f"{url} 412 exists 409"), False, True),
        ("reset", ConnectionResetError(f"{url} 412 PreconditionFailed exists"), False, True),
        ("timeout", TimeoutError(f"{url} 412"), False, True),
        # HTTP answers: decided by status / code
        ("s3 412", client_error("PreconditionFailed", 412, "pre-conditions"), True, False),
        ("s3 409", client_error("ConditionalRequestConflict", 409, "conflict"), True, False),
        ("s3 503 text 412", client_error("SlowDown", 503, f"{url} 412 exists"), False, True),
        ("s3 500 translated", translated, False, True),
        ("s3 403 text 412", forbidden, False, False),
        ("gcs 412", HttpError({"code": 412, "message": "conditionNotMet"}), True, False),
        ("gcs 503 text 412", HttpError({"code": 503, "message": f"{url} 412"}), False, True),
        ("gcs 400 text 412", HttpError({"code": 400, "message": f"{url} 412"}), False, False),
        ("azure exists", ResourceExistsError("The specified blob already exists"), True, False),
        ("azure 412", ResourceModifiedError("ConditionNotMet"), True, False),
        ("azure 500 text 412", azure_error(500, "InternalError"), False, True),
        ("azure 409 lease", azure_error(409, "LeaseAlreadyPresent"), False, False),
        ("file exists", FileExistsError(f"{TASK_ID}"), True, False),
        # not storage answers at all
        ("bug", RuntimeError(f"{url} 412 exists"), False, False),
        ("bad value", ValueError(f"{url} 412"), False, False),
        ("missing", FileNotFoundError(f"{url} 412"), False, False),
    ]


def test_errors_are_classified_by_type_and_status_not_text() -> None:
    wrong = []
    for label, exc, exists, transient in _sdk_errors():
        got = (_store_errors.is_exists_error(exc), _store_errors.is_transient(exc))
        if got != (exists, transient):
            wrong.append(f"{label}: (exists, transient) = {got}, expected {(exists, transient)}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.anyio
async def test_create_over_a_dead_endpoint_raises_never_decides(remote_storage) -> None:
    """A conditional create whose connection fails -- URL, key and id full of 412/409/exists --
    raises StorageError: it neither reports success nor "someone else created it"."""
    store = Store(_url(remote_storage, TRAP), _dead_options(remote_storage))
    try:
        with pytest.raises(StorageError) as info:
            await store.create(f"{QUEUE}/{TASK_ID}.json", b"claim")
        assert "127.0.0.1" in str(info.value)  # where it tried to connect
    finally:
        await store.aclose()


@pytest.mark.anyio
@pytest.mark.timeout(120)
async def test_enqueue_and_dequeue_over_a_dead_endpoint_raise(remote_storage) -> None:
    backend = AsyncFileBackend(
        _url(remote_storage, TRAP), _dead_options(remote_storage), environ={}
    )
    try:
        with pytest.raises(StorageError):
            await backend.enqueue("worker_tasks:add", [1, 2], task_id=TASK_ID, queue=QUEUE)
        with pytest.raises(StorageError):
            await backend.queue.dequeue([QUEUE], worker_id="w")
    finally:
        await backend.close()


def _connection_error(kind: str, where: str) -> Exception:
    """A connection failure as each store's SDK raises it, its text holding ``where``."""
    if kind == "s3":
        from botocore.exceptions import EndpointConnectionError

        return EndpointConnectionError(endpoint_url=f"http://127.0.0.1:1/{where}")
    if kind == "gcs":
        import aiohttp

        return aiohttp.ServerDisconnectedError(f"{where}: 412 Precondition Failed exists")
    if kind == "azure":
        from azure.core.exceptions import ServiceRequestError

        return ServiceRequestError(f"{where}: 412 ConditionNotMet BlobAlreadyExists 409")
    return ConnectionResetError(errno.ECONNRESET, f"{where}: 412 PreconditionFailed exists")


async def _break_creates(store: Store, kind: str, monkeypatch) -> None:
    """Make every exclusive create of ``store`` (but the start-up probe's) fail the way a
    lost connection does, with 412 / 409 / exists in the error text."""
    if store.kind == "memory":
        dirfs = store._sync_ops.fs  # type: ignore[attr-defined]
        name = "pipe_file"
    else:
        dirfs = (await store._ops_for_loop()).fs
        name = "_pipe_file"
    original = getattr(dirfs, name)

    def failing(path: str, data: bytes, **kwargs: Any) -> Any:
        if kwargs.get("mode") == "create" and not path.startswith("_omniq/"):
            raise _connection_error(kind, f"{store.url}/{path}")
        return original(path, data, **kwargs)

    monkeypatch.setattr(dirfs, name, failing)
    write = _ops.azure_write  # an Azure write is a PUT of its own, not adlfs' pipe_file

    async def failing_azure(azure: Any, path: str, data: bytes, create: bool) -> None:
        if create and "/_omniq/" not in path:
            raise _connection_error(kind, f"{store.url}/{path}")
        await write(azure, path, data, create)

    monkeypatch.setattr(_ops, "azure_write", failing_azure)


@pytest.mark.anyio
@pytest.mark.parametrize("storage", ["memory", "s3", "gcs", "azure"], indirect=True)
async def test_claim_whose_create_fails_is_an_error_not_a_lost_race(storage, monkeypatch) -> None:
    """The claim's conditional create fails with a connection error whose text has 412: the
    dequeue raises, and the task is still there for the next claim (it was not given up as
    lost to a rival)."""
    backend = AsyncFileBackend(_url(storage, TRAP), storage.storage_options, environ={})
    try:
        await backend.enqueue("worker_tasks:add", [1, 2], task_id=TASK_ID, queue=QUEUE)
        with monkeypatch.context() as patch:
            await _break_creates(backend.queue.store, storage.kind, patch)
            with pytest.raises(StorageError):
                await backend.queue.dequeue([QUEUE], worker_id="w1")
        claimed = await backend.queue.dequeue([QUEUE], worker_id="w2")
        assert claimed is not None and claimed.id == TASK_ID
    finally:
        await backend.close()


@pytest.mark.anyio
@pytest.mark.parametrize("storage", ["memory"], indirect=True)
async def test_enqueue_whose_create_fails_raises_on_memory(storage, monkeypatch) -> None:
    backend = AsyncFileBackend(_url(storage, TRAP), environ={})
    try:
        await backend.queue.store.probe_exclusive_create()  # the probe itself is not broken
        await _break_creates(backend.queue.store, "memory", monkeypatch)
        with pytest.raises(StorageError):
            await backend.enqueue("worker_tasks:add", [1, 2], task_id=TASK_ID, queue=QUEUE)
        monkeypatch.undo()
        assert await backend.queue.dequeue([QUEUE], worker_id="w") is None  # nothing stored
    finally:
        await backend.close()


@pytest.mark.anyio
async def test_enqueue_into_a_broken_local_directory_raises(tmp_path) -> None:
    base = tmp_path / TRAP
    base.write_text("a file where the queue's directory should be")
    backend = AsyncFileBackend(str(base), environ={})
    try:
        with pytest.raises(StorageError):
            await backend.enqueue("worker_tasks:add", [1, 2], task_id=TASK_ID, queue=QUEUE)
        with pytest.raises(StorageError):
            await backend.queue.dequeue([QUEUE], worker_id="w")
    finally:
        await backend.close()


# --------------------------------------------------------------------------- 2. lost responses


async def _lose_every_answer(store: Store, kind: str, monkeypatch) -> None:
    """Every exclusive create of ``store`` lands but its caller gets a connection error, and
    from then on every read fails: the claimer cannot tell whether its claim landed."""
    if store.kind == "memory":
        dirfs, prefix = store._sync_ops.fs, ""  # type: ignore[attr-defined]
    else:
        dirfs, prefix = (await store._ops_for_loop()).fs, "_"
    pipe, cat = getattr(dirfs, f"{prefix}pipe_file"), getattr(dirfs, f"{prefix}cat_file")

    landed: list[str] = []

    def lost(path: str) -> Exception:
        return _connection_error(kind, f"{store.url}/{path}")

    if store.kind == "memory":

        def pipe_sync(path: str, data: bytes, **kwargs: Any) -> Any:
            pipe(path, data, **kwargs)
            if kwargs.get("mode") == "create":
                landed.append(path)
                raise lost(path)

        def cat_sync(path: str, *args: Any, **kwargs: Any) -> Any:
            if landed:
                raise lost(path)
            return cat(path, *args, **kwargs)

        monkeypatch.setattr(dirfs, "pipe_file", pipe_sync)
        monkeypatch.setattr(dirfs, "cat_file", cat_sync)
        return

    async def pipe_async(path: str, data: bytes, **kwargs: Any) -> Any:
        await pipe(path, data, **kwargs)
        if kwargs.get("mode") == "create":
            landed.append(path)
            raise lost(path)

    async def cat_async(path: str, *args: Any, **kwargs: Any) -> Any:
        if landed:
            raise lost(path)
        return await cat(path, *args, **kwargs)

    monkeypatch.setattr(dirfs, "_pipe_file", pipe_async)
    monkeypatch.setattr(dirfs, "_cat_file", cat_async)
    # Azure reads and writes are requests of their own, not adlfs' cat_file and pipe_file.
    read, write = _ops.azure_read, _ops.azure_write

    async def read_async(azure: Any, path: str) -> Any:
        if landed:
            raise lost(path)
        return await read(azure, path)

    async def write_async(azure: Any, path: str, data: bytes, create: bool) -> None:
        await write(azure, path, data, create)
        if create:
            landed.append(path)
            raise lost(path)

    monkeypatch.setattr(_ops, "azure_read", read_async)
    monkeypatch.setattr(_ops, "azure_write", write_async)


@pytest.mark.anyio
@pytest.mark.parametrize("storage", ["memory", "s3", "gcs", "azure"], indirect=True)
async def test_claim_that_landed_unanswered_is_handed_out_by_the_next_dequeue(
    storage, monkeypatch
) -> None:
    """A claim lands, but every answer is lost (the create's and the look after it): the
    dequeue raises. Once the store answers again, the same consumer's next dequeue returns
    that claim -- the attempt is not left claimed by nobody until its lease runs out -- and
    another consumer finds nothing to claim."""
    monkeypatch.setattr(_ops, "_backoff", lambda n: 0.01)
    backend = AsyncFileBackend(_url(storage, TRAP), storage.storage_options, environ={})
    rival = AsyncFileBackend(_url(storage, TRAP), storage.storage_options, environ={})
    try:
        await backend.enqueue("worker_tasks:add", [1, 2], task_id=TASK_ID, queue=QUEUE)
        with monkeypatch.context() as patch:
            await _lose_every_answer(backend.queue.store, storage.kind, patch)
            with pytest.raises(StorageError):
                await backend.queue.dequeue([QUEUE], worker_id="w1", lease=30)
        assert await rival.queue.dequeue([QUEUE], worker_id="w2") is None
        claimed = await backend.queue.dequeue([QUEUE], worker_id="w1", lease=30)
        assert claimed is not None and (claimed.id, claimed.attempt) == (TASK_ID, 1)
        await backend.queue.ack(claimed)
        assert await backend.queue.dequeue([QUEUE], worker_id="w1") is None
    finally:
        await rival.close()
        await backend.close()


async def _retry_inside_sdk(store: Store, monkeypatch) -> None:
    """Each conditional create is sent twice inside one call, the way an SDK retries a
    request whose response was lost: the first lands, the second gets the store's own
    "already exists" answer, which is what the call returns."""
    if store.kind == "memory":
        dirfs = store._sync_ops.fs  # type: ignore[attr-defined]
        original = dirfs.pipe_file

        def twice(path: str, data: bytes, **kwargs: Any) -> Any:
            original(path, data, **kwargs)
            return original(path, data, **kwargs)

        monkeypatch.setattr(dirfs, "pipe_file", twice)
        return
    dirfs = (await store._ops_for_loop()).fs
    original_async = dirfs._pipe_file

    async def twice_async(path: str, data: bytes, **kwargs: Any) -> Any:
        await original_async(path, data, **kwargs)
        return await original_async(path, data, **kwargs)

    monkeypatch.setattr(dirfs, "_pipe_file", twice_async)
    write = _ops.azure_write  # an Azure write is a PUT of its own, not adlfs' pipe_file

    async def twice_azure(azure: Any, path: str, data: bytes, create: bool) -> None:
        await write(azure, path, data, create)
        await write(azure, path, data, create)

    monkeypatch.setattr(_ops, "azure_write", twice_azure)


@pytest.mark.anyio
@pytest.mark.parametrize("storage", ["memory", "s3", "gcs", "azure"], indirect=True)
async def test_create_answered_exists_by_its_own_retry_reports_created(
    storage, monkeypatch
) -> None:
    store = Store(storage.base_dir, storage.storage_options)
    try:
        await _retry_inside_sdk(store, monkeypatch)
        assert await store.create("k/claim.json", b"token-1") is True
        assert await store.read("k/claim.json") == b"token-1"
        # Somebody else's bytes: not ours.
        assert await store.create("k/claim.json", b"token-2") is False
        await store.probe_exclusive_create()  # one lost response does not fail the probe
    finally:
        await store.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("storage", ["s3"], indirect=True)
async def test_s3_put_retried_by_botocore_after_it_landed_reports_created(storage) -> None:
    """The real thing on S3: botocore itself retries the conditional PUT after the first one
    was stored (its response is thrown away), and the retry is answered 412."""
    store = Store(storage.base_dir, storage.storage_options)
    try:
        ops = await store._ops_for_loop()
        client = await ops.fs.fs.set_session()
        seen: list[int] = []

        def retry_first_put(attempts: int, request_dict: dict[str, Any], **kwargs: Any) -> Any:
            if "If-None-Match" not in request_dict.get("headers", {}):
                return None
            seen.append(attempts)
            return 0 if attempts == 1 else None  # "retry now" after the first response

        client.meta.events.register_first("needs-retry.s3.PutObject", retry_first_put)
        assert await store.create("k/claim.json", b"token-1") is True
        assert seen[:2] == [1, 2]  # the SDK did send it twice
        await store.probe_exclusive_create()
        assert await store.create("k/claim.json", b"token-2") is False
    finally:
        await store.aclose()


# --------------------------------------------------------------------------- 3. run() errors


def _without_exclusive_create(store: Store, monkeypatch) -> None:
    async def always(key: str, data: bytes) -> bool:
        return True

    monkeypatch.setattr(store, "create", always)


@pytest.mark.anyio
@pytest.mark.parametrize("storage", ["memory"], indirect=True)
async def test_async_worker_run_raises_capability_error_itself(storage, monkeypatch) -> None:
    backend = AsyncFileBackend(storage.base_dir, environ={})
    _without_exclusive_create(backend.queue.store, monkeypatch)
    worker = backend.worker(burst=True, idle_timeout=0.1, poll=0.05, handle_signals=False)
    try:
        with anyio.fail_after(30):
            await worker.run()
    except CapabilityError as exc:
        text = str(exc)
        assert "not enforced" in text and "conditional writes" in text and "Use a store" in text
    else:
        pytest.fail("run() did not raise CapabilityError")
    finally:
        await backend.close()


@pytest.mark.parametrize("storage", ["memory"], indirect=True)
def test_worker_run_raises_capability_error_itself(storage, monkeypatch) -> None:
    with FileBackend(storage.base_dir, environ={}) as backend:
        _without_exclusive_create(backend.async_api.queue.store, monkeypatch)
        worker = backend.worker(burst=True, idle_timeout=0.1, poll=0.05)
        with pytest.raises(CapabilityError):
            worker.run()


def test_first_error_of_a_group_is_raised_and_the_others_noted(caplog) -> None:
    from omniq.backend.file._worker import _first_error

    first, other = CapabilityError("no exclusive create"), StorageError("listing failed")
    group = BaseExceptionGroup("worker", [BaseExceptionGroup("inner", [first]), other])
    assert _first_error(group) is first
    assert any("listing failed" in note for note in getattr(first, "__notes__", []))
    assert "listing failed" in caplog.text
    stop = KeyboardInterrupt()
    assert _first_error(BaseExceptionGroup("w", [ValueError("x"), stop])) is stop


# --------------------------------------------------------------------------- 4. retry budget


class _Unavailable:
    """An HTTP server that answers every request 503 Service Unavailable; counts them."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        requests = self.requests = []

        class Handler(BaseHTTPRequestHandler):
            def answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                requests.append((self.command, self.path))
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.send_header("Connection", "close")
                self.end_headers()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.anyio
@pytest.mark.timeout(120)
async def test_one_retry_budget_per_operation(remote_storage) -> None:
    """A store that answers every request 503: a read and a create each make OmniQ's tries,
    one request per try -- not OmniQ's tries times the SDK's own (5 on S3, 6 on GCS, 4 on
    Azure by default). A create then takes one look at the key (its last try may have landed
    with the response lost), a single GET."""
    server = _Unavailable()
    store = Store(remote_storage.base_dir, _dead_options(remote_storage, server.port))
    try:
        with pytest.raises(StorageError):
            await store.read("k.json")
        assert len(server.requests) == _ops.RETRIES, server.requests
        server.requests.clear()
        with pytest.raises(StorageError):
            await store.create("k.json", b"x")
        methods = [method for method, _ in server.requests]
        assert len(methods) == _ops.RETRIES + 1 and methods[-1] == "GET", server.requests
        assert "GET" not in methods[:-1], server.requests
    finally:
        await store.aclose()
        server.close()


@pytest.mark.anyio
@pytest.mark.timeout(120)
@pytest.mark.parametrize("storage", ["memory", "s3"], indirect=True)
async def test_burst_worker_gives_up_when_storage_stays_unavailable(storage, monkeypatch) -> None:
    if storage.kind == "memory":
        backend = AsyncFileBackend(storage.base_dir, environ={})
        store = backend.queue.store
        dirfs = store._sync_ops.fs  # type: ignore[attr-defined]

        def down(*args: Any, **kwargs: Any) -> Any:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")

        for name in ("pipe_file", "cat_file", "cat", "ls", "rm_file", "rm", "exists"):
            monkeypatch.setattr(dirfs, name, down)
    else:
        backend = AsyncFileBackend(storage.base_dir, _dead_options(storage), environ={})
    worker = backend.worker(
        burst=True, idle_timeout=0.1, poll=0.05, storage_timeout=1.0, handle_signals=False
    )
    try:
        with pytest.raises(StorageError) as info:
            await worker.run()
        assert "storage unavailable" in str(info.value)
    finally:
        await backend.close()


# --------------------------------------------------------------------------- 5. secrets


def _no_secret(*texts: str) -> None:
    for text in texts:
        assert KEY_ID not in text and SECRET not in text, text


def _chain_text(exc: BaseException) -> str:
    import traceback

    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


@pytest.mark.anyio
@pytest.mark.timeout(120)
async def test_credentials_in_the_url_never_show(remote_storage, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="omniq")
    port = _closed_port()
    bucket_path = remote_storage.base_dir.split("://", 1)[1]
    url = f"{remote_storage.protocol}://{KEY_ID}:{SECRET}@{bucket_path}"
    store = Store(url, _dead_options(remote_storage, port))
    try:
        _no_secret(repr(store), store.url)
        with pytest.raises(StorageError) as info:
            await store.write("k.json", b"x")
        _no_secret(str(info.value), repr(info.value), _chain_text(info.value), caplog.text)
        assert f"127.0.0.1:{port}" in str(info.value)  # the endpoint is shown
    finally:
        await store.aclose()


@pytest.mark.parametrize(
    "endpoint",
    [f"http://{KEY_ID}:{SECRET}@127.0.0.1:9000", f"http://{KEY_ID}:{SECRET}@bad_host:9000"],
)
def test_credentials_in_endpoint_url_are_refused_without_showing_them(endpoint) -> None:
    with pytest.raises(ConfigurationError) as info:
        Store("s3://bucket/x", {"key": "k", "secret": "s", "endpoint_url": endpoint})
    text = str(info.value)
    _no_secret(text, repr(info.value))
    assert "endpoint_url" in text and endpoint.rsplit("@", 1)[1] in text  # host shown


@pytest.mark.anyio
@pytest.mark.parametrize("storage", ["s3"], indirect=True)
async def test_sdk_debug_logs_do_not_show_the_key_id(storage, caplog) -> None:
    """botocore logs ``Credential=<key id>/...`` at DEBUG on every request; with
    ``redact_logs()`` neither the key id nor the secret reaches any handler."""
    redact_logs()
    options = {**storage.storage_options, "key": KEY_ID, "secret": SECRET}
    caplog.set_level(logging.DEBUG)
    store = Store(storage.base_dir, options)
    try:
        await store.write("k.json", b"x")
        assert await store.read("k.json") == b"x"
    finally:
        await store.aclose()
    assert "Credential=***" in caplog.text  # the SDK did log its signature line
    _no_secret(caplog.text)


def test_redact_filter_hides_credentials_but_shows_endpoints() -> None:
    Store("s3://bucket/x", {"key": KEY_ID, "secret": SECRET, "endpoint_url": "http://h:9"})
    record = logging.LogRecord(
        "botocore.endpoint",
        logging.DEBUG,
        __file__,
        1,
        "Sending http://user:%s@minio.example:9000 Credential=%s/2026/us/s3 with %s",
        (SECRET, KEY_ID, SECRET),
        None,
    )
    assert RedactFilter().filter(record)
    message = record.getMessage()
    _no_secret(message)
    assert "http://***@minio.example:9000" in message and "Credential=***/2026" in message


# --------------------------------------------------------------------------- 6. the command


def _omniq(*args: object, timeout: float = 120, cwd: Path | None = None) -> Any:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNIQ_")}
    proc = subprocess.run(
        [str(OMNIQ), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
    )
    _no_secret(proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


@pytest.mark.parametrize(
    ("url", "options", "named"),
    [
        ("s3://bucket/app", {"key": KEY_ID, "endpoint_uri": "http://127.0.0.1:9"}, "endpoint_url"),
        ("gs://bucket/app", {"token": SECRET, "projet": "p"}, "project"),
        ("abfs://container/app", {"conection_string": SECRET}, "connection_string"),
    ],
)
def test_unknown_storage_option_exits_2_naming_it(url, options, named) -> None:
    proc = _omniq("status", url, "--storage-options", json.dumps(options))
    assert proc.returncode == 2, proc.stderr
    (typo,) = [name for name in options if name not in ("key", "token")]
    assert f"unknown storage option {typo!r}" in proc.stderr
    assert f"did you mean {named!r}" in proc.stderr


def test_invalid_endpoint_is_a_configuration_error_not_an_invalid_task(tmp_path) -> None:
    options = {"key": KEY_ID, "secret": SECRET, "endpoint_url": f"http://u:{SECRET}@bad_host:1"}
    proc = _omniq(
        "enqueue", "s3://bucket/app", "worker_tasks:add", "--no-check",
        "--storage-options", json.dumps(options),
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "invalid task" not in proc.stderr
    assert "endpoint_url" in proc.stderr and "bad_host:1" in proc.stderr


@pytest.mark.parametrize("command", ["status", "dead", "events"])
def test_reading_a_local_directory_that_does_not_exist_exits_2(command, tmp_path) -> None:
    missing = tmp_path / "no" / "such" / "dir"
    proc = _omniq(command, missing)
    assert proc.returncode == 2, proc.stderr
    assert f"{missing}: does not exist" in proc.stderr
    assert not missing.exists()  # looking did not create it


@pytest.mark.timeout(180)
def test_burst_worker_against_a_dead_endpoint_exits_3(remote_storage, tmp_path) -> None:
    options = {**_dead_options(remote_storage)}
    if remote_storage.kind == "s3":
        options.update(key=KEY_ID, secret=SECRET)
    proc = _omniq(
        "worker", remote_storage.base_dir, "--burst", "--storage-timeout", "2",
        "--storage-options", json.dumps(options), cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    assert "storage unavailable for" in proc.stderr
    assert "127.0.0.1" in proc.stderr  # the endpoint is shown, not masked


_NO_EXCLUSIVE_CREATE = """
import sys
from omniq.core.fs import Store

async def create(self, key, data):  # a store that lets every create succeed
    return True

Store.create = create
from omniq.backend.file.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


def test_capability_error_exits_3_and_says_what_to_do(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _NO_EXCLUSIVE_CREATE, "worker", tmp_path / "base", "--burst"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("omniq: storage error:")
    assert "exclusive create" in last and "not enforced" in last  # what failed
    assert "conditional writes" in last  # why
    assert "Use a store that enforces them" in last  # what to do


def test_only_credential_options_are_hidden_everywhere() -> None:
    """A setting's value is not a credential: a store made with ``target_protocol="memory"``
    (the fault suite's) masked every "memory" in the process's later log text."""
    from omniq.core import _redact

    secrets = _redact.option_secrets(
        {
            "target_protocol": "memory",
            "faults": "file",
            "key": "AKIA-TEST-ONLY",
            "client_kwargs": {"aws_secret_access_key": "s3cr3t-value"},
            "token": "anon",
        }
    )
    assert sorted(secrets) == ["AKIA-TEST-ONLY", "s3cr3t-value"]
    assert _redact.option_secrets({"connection_string": "AccountKey=abcd1234;X=y"})[-1] == (
        "abcd1234"
    )


_UNCLOSED = """
import json, sys
import anyio
from omniq.core import Task
from omniq.storage.file.queue import AsyncFileQueue, FileQueue
base_dir, options, mode = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
if mode == "sync":  # the blocking twin, on the shared loop thread
    FileQueue(base_dir, options).enqueue(Task(func="m:f"))
else:
    async def main():
        await AsyncFileQueue(base_dir, options).enqueue(Task(func="m:f"))
    anyio.run(main)
print("done")
"""


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_program_that_never_closes_its_queue_exits_quietly(
    remote_storage: Any, mode: str
) -> None:
    """adlfs' finalizer closed its client at exit through the event loop, closed by then: every
    program that did not close its storage on Azure printed a 'Loop is not running'
    traceback at exit (about 60 of them at the end of each CI log)."""
    options = json.dumps(remote_storage.storage_options)
    proc = subprocess.run(
        [sys.executable, "-W", "default", "-c", _UNCLOSED, remote_storage.base_dir, options, mode],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "done", proc.stderr
    assert "Traceback" not in proc.stderr and "Loop is not running" not in proc.stderr, proc.stderr
