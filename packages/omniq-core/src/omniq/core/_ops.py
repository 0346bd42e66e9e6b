"""The file operations behind ``Store`` on fsspec filesystems (sync, async); shared helpers.

Every class answers the same operations with the same meaning (see the op constructors in
``fs.py``). Transient failures (timeouts, connection resets, 5xx) of idempotent operations are
retried with backoff; other failures become ``StorageError`` with the original as the cause.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime
from typing import Any, NamedTuple, Protocol, TypeVar

from ._redact import RedactFilter, redact, scrub_exception
from .errors import OmniQError, StorageError

log = logging.getLogger("omniq.fs")
log.addFilter(RedactFilter())
T = TypeVar("T")

RETRIES = 4
_PERMANENT = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    ValueError,
    TypeError,
    KeyError,
    OmniQError,
)


# Errors are classified by their type, their errno and the HTTP status or error code they
# carry -- never by their text: an SDK's message may hold the request URL, whose bucket, key or
# task id may contain "412" or "exists". The SDKs are optional: a type is looked up only if its
# module is already imported (an exception cannot be an instance of a class never loaded).
_TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ECONNRESET",
        "ECONNREFUSED",
        "ECONNABORTED",
        "ETIMEDOUT",
        "EPIPE",
        "EHOSTUNREACH",
        "EHOSTDOWN",
        "ENETUNREACH",
        "ENETDOWN",
        "ENETRESET",
        "EAGAIN",
        "EBUSY",
        "EIO",
        "EREMOTEIO",
    )
    if hasattr(errno, name)
)
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# S3 error codes that mean "slow down" or "try again" whatever the status says.
_TRANSIENT_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError"}
)
_EXISTS_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict"})
_SDK_TRANSIENT = (
    ("botocore.exceptions", "HTTPClientError"),  # connect/read timeouts, closed connections
    ("botocore.exceptions", "ConnectionError"),  # EndpointConnectionError, ...
    ("botocore.exceptions", "ResponseStreamingError"),
    ("botocore.exceptions", "IncompleteReadError"),
    ("aiohttp", "ClientConnectionError"),  # refused, reset, server disconnected, timeouts
    ("aiohttp", "ClientPayloadError"),
    ("requests.exceptions", "ConnectionError"),  # gcsfs reports HTTP 502 as ProxyError
    ("requests.exceptions", "Timeout"),
    ("gcsfs.retry", "ChecksumError"),
    ("azure.core.exceptions", "ServiceRequestError"),  # the request did not go out
    ("azure.core.exceptions", "ServiceResponseError"),  # the response did not come back
)


def _sdk_type(module: str, name: str) -> type | None:
    mod = sys.modules.get(module)
    found = getattr(mod, name, None) if mod is not None else None
    return found if isinstance(found, type) else None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and its explicit causes (plugins translate an SDK error into an OSError and
    keep the original as ``__cause__``)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < 10:
        seen.add(id(current))
        yield current
        current = current.__cause__


def _http(exc: BaseException) -> tuple[int | None, str | None]:
    """The HTTP status and service error code an SDK exception carries, by type."""
    client_error = _sdk_type("botocore.exceptions", "ClientError")
    if client_error is not None and isinstance(exc, client_error):
        response = getattr(exc, "response", None) or {}
        error = response.get("Error") or {}
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        code = error.get("Code")
        if status is None and isinstance(code, str) and code.isdigit():
            status = int(code)
        return (status if isinstance(status, int) else None), (
            code if isinstance(code, str) else None
        )
    http_error = _sdk_type("gcsfs.retry", "HttpError")
    if http_error is not None and isinstance(exc, http_error):
        code = getattr(exc, "code", None)
        return (code if isinstance(code, int) else None), None
    azure_error = _sdk_type("azure.core.exceptions", "HttpResponseError")
    if azure_error is not None and isinstance(exc, azure_error):
        status = getattr(exc, "status_code", None)
        code = getattr(exc, "error_code", None)
        return (status if isinstance(status, int) else None), (
            str(code) if code is not None else None
        )
    response_error = _sdk_type("aiohttp", "ClientResponseError")
    if response_error is not None and isinstance(exc, response_error):
        status = getattr(exc, "status", None)
        return (status if isinstance(status, int) else None), None
    return None, None


def _is_transient(exc: BaseException) -> bool:
    """Whether retrying may help: HTTP 408/429/5xx and S3's throttling codes (an HTTP answer
    decides), else connection errors and timeouts by type and transient errnos. An
    ``OSError`` with neither an errno nor a cause is what some plugins raise for a failed
    exchange with no status: retried too. Anything else (missing keys, permissions, bad
    arguments, bugs) is not."""
    if isinstance(exc, _PERMANENT):
        return False
    chain = list(_chain(exc))
    for item in chain:
        status, code = _http(item)
        if status is not None or code is not None:
            return status in _TRANSIENT_STATUS or code in _TRANSIENT_CODES
    for item in chain:
        if isinstance(item, (ConnectionError, TimeoutError, asyncio.TimeoutError)):
            return True
        if isinstance(item, OSError) and item.errno in _TRANSIENT_ERRNOS:
            return True
        for module, name in _SDK_TRANSIENT:
            kind = _sdk_type(module, name)
            if kind is not None and isinstance(item, kind):
                return True
    return type(exc) is OSError and exc.errno is None and exc.__cause__ is None


def _backoff(attempt: int) -> float:
    return min(2.0, 0.1 * 3.0**attempt) * (0.5 + random.random() / 2)


def _storage_error(what: str, key: str, exc: BaseException) -> StorageError:
    scrub_exception(exc)
    return StorageError(redact(f"{what} {key!r} failed: {type(exc).__name__}: {exc}"))


class Ops(Protocol):
    def read(self, key: str) -> bytes | None: ...
    def read_many(self, keys: list[str]) -> dict[str, bytes | None]: ...
    def write(self, key: str, data: bytes) -> None: ...
    def create(self, key: str, data: bytes) -> bool: ...
    def create_many(self, items: list[tuple[str, bytes]]) -> list[bool]: ...
    def mark(self, key: str, data: bytes) -> None: ...
    def delete(self, key: str) -> bool: ...
    def delete_many(self, keys: list[str]) -> None: ...
    def ls(
        self, prefix: str, detail: bool, keep: Callable[[Entry], bool] | None = None
    ) -> list[Any]: ...
    def count(self, prefix: str, min_size: int = 0) -> int: ...
    def ls_head(self, prefix: str, limit: int) -> list[str]: ...
    def ls_after(self, prefix: str, after: str, limit: int) -> list[str]: ...
    def list_dirs(self, prefix: str) -> list[str]: ...
    def exists(self, key: str) -> bool: ...
    def remove_dir(self, prefix: str) -> bool: ...


def _retry(what: str, key: str, fn: Callable[[], T]) -> T:
    for attempt in range(RETRIES):
        try:
            return fn()
        except Exception as exc:
            if not _is_transient(exc):
                raise
            if attempt == RETRIES - 1:
                raise _storage_error(what, key, exc) from exc
            log.warning(
                "retrying %s %r after %s: %s", what, key, type(exc).__name__, redact(str(exc))
            )
            time.sleep(_backoff(attempt))
    raise AssertionError("unreachable")


async def _aretry(what: str, key: str, fn: Callable[[], Awaitable[T]]) -> T:
    for attempt in range(RETRIES):
        try:
            return await fn()
        except Exception as exc:
            if not _is_transient(exc):
                raise
            if attempt == RETRIES - 1:
                raise _storage_error(what, key, exc) from exc
            log.warning(
                "retrying %s %r after %s: %s", what, key, type(exc).__name__, redact(str(exc))
            )
            await asyncio.sleep(_backoff(attempt))
    raise AssertionError("unreachable")


class Entry(NamedTuple):
    """One file in a listing: its base name, size in bytes and modification time (epoch s)."""

    name: str
    size: int
    mtime: float


_entry = Entry


def _mtime(info: dict[str, Any]) -> float:
    for field in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(field)
        if value is None:
            continue
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return 0.0


def _basename(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1]


def _listing(
    infos: list[dict[str, Any]], detail: bool, keep: Callable[[Entry], bool] | None = None
) -> list[Any]:
    out: list[Any] = []
    for info in infos:
        if info.get("type") != "file":
            continue
        name = _basename(info["name"])
        if name.startswith("."):
            continue
        if detail:
            item = _entry(name, int(info.get("size") or 0), _mtime(info))
            if keep is None or keep(item):
                out.append(item)
        else:
            out.append(name)
    out.sort()
    return out


def _count(infos: list[dict[str, Any]], min_size: int) -> int:
    return sum(1 for e in _listing(infos, True) if e.size >= min_size)


def _dirs(infos: list[dict[str, Any]]) -> list[str]:
    names = {_basename(i["name"]) for i in infos if i.get("type") == "directory"}
    return sorted(n for n in names if n and not n.startswith("."))


def _is_exists_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a store's answer "the key already exists" to a conditional create:
    ``FileExistsError`` (what s3fs, gcsfs, adlfs and the local and memory filesystems raise),
    or, untranslated, botocore's ``PreconditionFailed`` / ``ConditionalRequestConflict`` / HTTP
    412, gcsfs' ``HttpError`` 412, azure's ``ResourceExistsError`` (409 ``BlobAlreadyExists``)
    and ``ResourceModifiedError`` (412)."""
    for item in _chain(exc):
        if isinstance(item, FileExistsError):
            return True
        for module, name in (
            ("azure.core.exceptions", "ResourceExistsError"),
            ("azure.core.exceptions", "ResourceModifiedError"),
        ):
            kind = _sdk_type(module, name)
            if kind is not None and isinstance(item, kind):
                return True
        status, code = _http(item)
        if status == 412 or code in _EXISTS_CODES:
            return True
        if status == 409 and code in (None, "BlobAlreadyExists"):
            return True
    return False


class FsspecOps:
    """Any fsspec filesystem through its sync API (memory; remote stores outside asyncio)."""

    def __init__(self, fs: Any) -> None:
        self.fs = fs

    def read(self, key: str) -> bytes | None:
        def go() -> bytes | None:
            try:
                return self.fs.cat_file(key, **_read_options(self.fs))  # type: ignore[no-any-return]
            except FileNotFoundError:
                return None

        return _retry("read", key, go)

    def read_many(self, keys: list[str]) -> dict[str, bytes | None]:
        if not keys:
            return {}
        got = _retry(
            "read", keys[0], lambda: self.fs.cat(keys, on_error="return", **_read_options(self.fs))
        )
        return _collect(keys, got, self.read)

    def write(self, key: str, data: bytes) -> None:
        _retry("write", key, lambda: self.fs.pipe_file(key, data))

    mark = write

    def create(self, key: str, data: bytes) -> bool:
        for attempt in range(RETRIES):
            try:
                self.fs.pipe_file(key, data, mode="create")
                return True
            except Exception as exc:
                if _is_exists_error(exc):
                    # "Exists" also answers a retry (ours, the SDK's or the HTTP client's) of
                    # a request that landed but whose response was lost. Callers write unique
                    # bytes (a nonce), so the stored bytes tell whether this call wrote them.
                    return self.read(key) == data
                if not _is_transient(exc) or attempt == RETRIES - 1:
                    raise _storage_error("create", key, exc) from exc
                log.warning(
                    "retrying create %r after %s: %s", key, type(exc).__name__, redact(str(exc))
                )
                time.sleep(_backoff(attempt))
        raise AssertionError("unreachable")

    def create_many(self, items: list[tuple[str, bytes]]) -> list[bool]:
        return [self.create(key, data) for key, data in items]

    def delete(self, key: str) -> bool:
        def go() -> bool:
            try:
                self.fs.rm_file(key)
                return True
            except FileNotFoundError:
                return False

        return _retry("delete", key, go)

    def delete_many(self, keys: list[str]) -> None:
        if keys:
            try:
                _retry("delete", keys[0], lambda: self.fs.rm(keys))
            except FileNotFoundError:
                for key in keys:
                    self.delete(key)

    def ls(
        self, prefix: str, detail: bool, keep: Callable[[Entry], bool] | None = None
    ) -> list[Any]:
        return _listing(self._ls(prefix), detail, keep)

    def count(self, prefix: str, min_size: int = 0) -> int:
        return _count(self._ls(prefix), min_size)

    def ls_head(self, prefix: str, limit: int) -> list[str]:
        inner = self.fs.fs
        if hasattr(inner, "_lsdir") and hasattr(inner, "_call_s3"):
            from fsspec.asyn import sync

            infos = _retry(
                "list",
                prefix,
                lambda: sync(inner.loop, _s3_head, inner, self.fs._join(prefix), limit),
            )
            return _listing(infos, False)[:limit]
        return self.ls(prefix, False)[:limit]

    def ls_after(self, prefix: str, after: str, limit: int) -> list[str]:
        inner = self.fs.fs
        if hasattr(inner, "_call_s3"):
            from fsspec.asyn import sync

            path = self.fs._join(prefix)
            return _retry(
                "list", prefix, lambda: sync(inner.loop, _s3_after, inner, path, after, limit)
            )
        return [n for n in self.ls(prefix, False) if n > after][:limit]

    def list_dirs(self, prefix: str) -> list[str]:
        return _dirs(self._ls(prefix))

    def _ls(self, prefix: str) -> list[dict[str, Any]]:
        def go() -> list[dict[str, Any]]:
            try:
                return self.fs.ls(prefix, detail=True)  # type: ignore[no-any-return]
            except (FileNotFoundError, NotADirectoryError):
                return []

        return _retry("list", prefix, go)

    def exists(self, key: str) -> bool:
        return _retry("exists", key, lambda: bool(self.fs.exists(key)))

    def remove_dir(self, prefix: str) -> bool:
        return False  # no empty directories on object stores or memory


def _collect(
    keys: list[str], got: Any, single: Callable[[str], bytes | None]
) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    values = got if isinstance(got, dict) else {}
    for key in keys:
        value = values.get(key)
        if value is None:
            value = next((v for k, v in values.items() if k.endswith(key)), None)
        if isinstance(value, FileNotFoundError):
            out[key] = None
        elif isinstance(value, (bytes, bytearray)):
            out[key] = bytes(value)
        else:
            out[key] = single(key)  # odd path echo or an error: ask once more, alone
    return out


class AsyncFsspecOps:
    """An async fsspec filesystem (s3fs, gcsfs, adlfs) on the running asyncio loop."""

    def __init__(self, fs: Any) -> None:
        self.fs = fs

    async def aclose(self) -> None:
        """Close the client sessions now, while their loop runs, and drop the finalizers the
        plugins registered (they would try again at exit, with the loop gone)."""
        inner = self.fs.fs
        closers = []
        s3 = getattr(inner, "_s3", None)
        if s3 is not None:
            closers.append(s3.__aexit__(None, None, None))
        session = getattr(inner, "_session", None)
        if session is not None and not getattr(session, "closed", True):
            closers.append(session.close())
        service = getattr(inner, "service_client", None)
        if service is not None and hasattr(service, "close"):
            closers.append(service.close())
        for closer in closers:
            try:
                result = closer
                if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
                    await result
            except Exception as exc:  # closing is best effort
                log.debug("closing %s: %s", type(inner).__name__, exc)
        _detach_finalizers(inner)

    async def read(self, key: str) -> bytes | None:
        async def go() -> bytes | None:
            try:
                return await self.fs._cat_file(key, **_read_options(self.fs))  # type: ignore[no-any-return]
            except FileNotFoundError:
                return None

        return await _aretry("read", key, go)

    async def read_many(self, keys: list[str]) -> dict[str, bytes | None]:
        values = await asyncio.gather(*(self.read(k) for k in keys))
        return dict(zip(keys, values, strict=True))

    async def write(self, key: str, data: bytes) -> None:
        await _aretry("write", key, lambda: self.fs._pipe_file(key, data))

    mark = write

    async def create(self, key: str, data: bytes) -> bool:
        for attempt in range(RETRIES):
            try:
                await self.fs._pipe_file(key, data, mode="create")
                return True
            except Exception as exc:
                if _is_exists_error(exc):
                    # See FsspecOps.create: the stored bytes say whether this call wrote them.
                    return await self.read(key) == data
                if not _is_transient(exc) or attempt == RETRIES - 1:
                    raise _storage_error("create", key, exc) from exc
                log.warning(
                    "retrying create %r after %s: %s", key, type(exc).__name__, redact(str(exc))
                )
                await asyncio.sleep(_backoff(attempt))
        raise AssertionError("unreachable")

    async def create_many(self, items: list[tuple[str, bytes]]) -> list[bool]:
        return list(await asyncio.gather(*(self.create(key, data) for key, data in items)))

    async def delete(self, key: str) -> bool:
        async def go() -> bool:
            try:
                await self.fs._rm_file(key)
                return True
            except FileNotFoundError:
                return False

        return await _aretry("delete", key, go)

    async def delete_many(self, keys: list[str]) -> None:
        if not keys:
            return
        try:
            await _aretry("delete", keys[0], lambda: self.fs._rm(keys))
        except FileNotFoundError:
            await asyncio.gather(*(self.delete(k) for k in keys))

    async def _ls(self, prefix: str) -> list[dict[str, Any]]:
        async def go() -> list[dict[str, Any]]:
            try:
                return await self.fs._ls(prefix, detail=True)  # type: ignore[no-any-return]
            except (FileNotFoundError, NotADirectoryError):
                return []

        return await _aretry("list", prefix, go)

    async def ls(
        self, prefix: str, detail: bool, keep: Callable[[Entry], bool] | None = None
    ) -> list[Any]:
        return _listing(await self._ls(prefix), detail, keep)

    async def count(self, prefix: str, min_size: int = 0) -> int:
        return _count(await self._ls(prefix), min_size)

    async def ls_head(self, prefix: str, limit: int) -> list[str]:
        inner = self.fs.fs
        if hasattr(inner, "_lsdir") and hasattr(inner, "_call_s3"):
            path = self.fs._join(prefix)
            infos = await _aretry("list", prefix, lambda: _s3_head(inner, path, limit))
            return _listing(infos, False)[:limit]
        return (await self.ls(prefix, False))[:limit]

    async def ls_after(self, prefix: str, after: str, limit: int) -> list[str]:
        inner = self.fs.fs
        if hasattr(inner, "_call_s3"):
            path = self.fs._join(prefix)
            return await _aretry("list", prefix, lambda: _s3_after(inner, path, after, limit))
        return [n for n in await self.ls(prefix, False) if n > after][:limit]

    async def list_dirs(self, prefix: str) -> list[str]:
        return _dirs(await self._ls(prefix))

    async def exists(self, key: str) -> bool:
        return await _aretry("exists", key, lambda: self.fs._exists(key))

    async def remove_dir(self, prefix: str) -> bool:
        return False  # no empty directories on object stores


def _detach_finalizers(obj: Any) -> None:
    import weakref

    registry = getattr(weakref.finalize, "_registry", {})
    for _ in range(10):
        try:  # a collection in another thread may run finalizers while this copies
            entries = list(registry.copy().items())
            break
        except RuntimeError:
            continue
    else:
        return
    for finalizer, info in entries:
        if info.weakref() is obj:
            finalizer.detach()


async def _s3_head(s3: Any, path: str, limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` entries under ``path`` in key order: one LIST request, however
    many keys the prefix holds (S3 lists in UTF-8 byte order)."""
    try:
        return await s3._lsdir(path, max_items=limit, refresh=True)  # type: ignore[no-any-return]
    except FileNotFoundError:
        return []


async def _s3_after(s3: Any, path: str, after: str, limit: int) -> list[str]:
    """Up to ``limit`` file names under ``path`` that sort after ``after``: one LIST request
    (``StartAfter``), wherever in a large prefix they are."""
    bucket, key, _ = s3.split_path(path)
    prefix = f"{key.rstrip('/')}/" if key else ""
    response = await s3._call_s3(
        "list_objects_v2",
        Bucket=bucket,
        Prefix=prefix,
        Delimiter="/",
        StartAfter=f"{prefix}{after}",
        MaxKeys=limit,
    )
    return [item["Key"][len(prefix) :] for item in response.get("Contents", [])]


def _read_options(dirfs: Any) -> dict[str, Any]:
    """s3fs asks for the object's size (a HEAD, plus a LIST when it is missing) before every
    GET unless reads are single-stream; our documents are small, so one GET is enough."""
    return {"max_concurrency": 1} if hasattr(dirfs.fs, "_call_s3") else {}
