"""Which failures of the fsspec plugins and their SDKs are transient (worth another try) and
which mean "the key already exists" (a conditional create refused). Decided from exception
types, errno values and HTTP status codes or service error codes carried by the exception
chain; never from the text of a message.
"""

from __future__ import annotations

import asyncio
import errno
import sys
from collections.abc import Iterator

from .errors import OmniQError

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


def is_transient(exc: BaseException) -> bool:
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


def is_exists_error(exc: BaseException) -> bool:
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
