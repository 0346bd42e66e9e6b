"""What OmniQ's S3 and Azure clients do beside the SDKs' own work (docs/storage.md, "What a
request costs the client"): S3 times read as ISO 8601, Azure listings read from the List Blobs
XML, Azure reads and writes sent through the SDK client's pipeline (SAS tokens, the service's
error codes, adlfs' ``timeout``), and the environment looked up only where it holds a proxy or
a netrc file."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest

from omniq.core import _azure_rest
from omniq.storage.file.queue import AsyncFileQueue
from test_claim_listing import _listafter

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


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


def test_azure_container_clients_are_made_once_per_service_client_and_container() -> None:
    """A ContainerClient a request cost ~60 us of CPU: one per container is kept, and a new
    one made when adlfs replaces its service client (it does when it reconnects)."""

    class Service:
        def __init__(self) -> None:
            self.made: list[str] = []

        def get_container_client(self, container: str) -> tuple[Service, str]:
            self.made.append(container)
            return (self, container)

    class Azure:
        service_client = Service()

    azure = Azure()
    first = _azure_rest.container_client(azure, "a")
    assert _azure_rest.container_client(azure, "a") is first
    assert _azure_rest.container_client(azure, "b") == (azure.service_client, "b")
    assert azure.service_client.made == ["a", "b"]
    old, azure.service_client = azure.service_client, Service()
    assert _azure_rest.container_client(azure, "a") == (azure.service_client, "a")
    assert azure.service_client.made == ["a"] and old.made == ["a", "b"]
