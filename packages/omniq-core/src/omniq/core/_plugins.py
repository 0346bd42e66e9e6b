"""Setting up an fsspec plugin for a ``Store``: which protocol is which kind of store, the
plugin class (with the pip extra to install when it is missing), ``storage_options`` checked
against what the class takes, and the SDK settings that leave one retry budget per operation
(OmniQ's) with bounded timeouts.
"""

from __future__ import annotations

import asyncio
import difflib
import importlib
import inspect
import json
import logging
import os
import types
import urllib.request
import weakref
from datetime import datetime
from typing import Any

import fsspec

from . import _redact
from .errors import ConfigurationError, MissingDependencyError

log = logging.getLogger("omniq.fs")

KIND = {
    "s3": "s3",
    "s3a": "s3",
    "gs": "gcs",
    "gcs": "gcs",
    "abfs": "azure",
    "abfss": "azure",
    "az": "azure",
    "adl": "azure",
    "memory": "memory",
    "file": "local",
    "local": "local",
}
# The pip extra that brings each cloud protocol's plugin.
_EXTRAS = {protocol: kind for protocol, kind in KIND.items() if kind in ("s3", "gcs", "azure")}
# One retry budget per operation: OmniQ's (``_fsspec_ops.RETRIES`` tries with backoff); the
# SDKs are set to a single try each, with these timeouts (unless storage_options set them).
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 15.0
# Options every fsspec filesystem takes (AbstractFileSystem / AsyncFileSystem).
_FSSPEC_OPTIONS = frozenset(
    {
        "use_listings_cache",
        "listings_expiry_time",
        "max_paths",
        "skip_instance_cache",
        "asynchronous",
        "loop",
        "batch_size",
    }
)


def fs_class(protocol: str, package: str) -> type[Any]:
    try:
        return fsspec.get_filesystem_class(protocol)  # type: ignore[no-any-return]
    except (ImportError, ValueError) as exc:
        extra = _EXTRAS.get(protocol)
        hint = (
            f'install it with `pip install "{package}[{extra}]"` (or `[cloud]` for all '
            f'three; with the backend: `pip install "omniq-backend-file[{extra}]"`)'
            if extra
            else "install the fsspec plugin for it"
        )
        raise MissingDependencyError(
            f"the {protocol}:// filesystem is not available: {exc}; {hint}"
        ) from exc


def check_options(kind: str, protocol: str, cls: type[Any], options: dict[str, Any]) -> None:
    """Refuse storage options the filesystem would not take, naming them: S3, GCS and Azure
    plugins silently ignore a misspelt option, or fail at the first request."""
    if kind not in ("s3", "gcs", "azure"):
        return
    known = set(_FSSPEC_OPTIONS)
    classes: list[Any] = list(cls.__mro__)
    if kind == "s3":  # s3fs hands unknown keyword arguments to aiobotocore's AioSession
        try:
            from aiobotocore.session import AioSession

            classes.append(AioSession)
        except ImportError:  # pragma: no cover - s3fs depends on it
            pass
    for klass in classes:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            params = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):  # pragma: no cover - a C-level __init__
            return
        known.update(
            p.name
            for p in params
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"
        )
    unknown = sorted(str(name) for name in options if name not in known)
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigurationError(
            f"unknown storage option{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(hints)} for {protocol}:// ({cls.__module__}.{cls.__name__})"
        )
    endpoint = options.get("endpoint_url")
    if kind == "s3" and endpoint is not None:
        shown = _redact.redact_url(str(endpoint))
        try:
            from botocore.utils import is_valid_endpoint_url, is_valid_ipv6_endpoint_url
        except ImportError:  # pragma: no cover - s3fs depends on it
            return
        text = str(endpoint)
        if not isinstance(endpoint, str) or not (
            is_valid_endpoint_url(text) or is_valid_ipv6_endpoint_url(text)
        ):
            raise ConfigurationError(
                f"storage option endpoint_url is not a valid URL: {shown!r} "
                "(expected http[s]://host[:port])"
            )
        if _redact.url_secrets(text):
            raise ConfigurationError(
                f"storage option endpoint_url must not carry credentials ({shown!r}): S3 "
                "requests are signed with the key and secret options instead"
            )


def sdk_defaults(kind: str, options: dict[str, Any]) -> dict[str, Any]:
    """Storage options that make the SDK try each request once, with connect and read
    timeouts: OmniQ's retries are the only ones (they would multiply otherwise). Options the
    caller gave win."""
    if kind == "s3":
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("retries", {"total_max_attempts": 1})
        config.setdefault("connect_timeout", CONNECT_TIMEOUT)
        config.setdefault("read_timeout", READ_TIMEOUT)
        return {"config_kwargs": config}
    if kind == "gcs" and "requests_timeout" not in options:
        try:  # gcsfs' HTTP client (imported by name: its types are not checked here)
            aiohttp: Any = importlib.import_module("aiohttp")
        except ImportError:  # pragma: no cover - gcsfs depends on it
            return {}
        timeout = aiohttp.ClientTimeout(sock_connect=CONNECT_TIMEOUT, sock_read=READ_TIMEOUT)
        return {"requests_timeout": timeout}
    return {}


# The aiobotocore session of each event loop's S3 stores, by their storage options.
_s3_sessions: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, Any]] = (
    weakref.WeakKeyDictionary()
)


def _session_key(options: dict[str, Any]) -> str | None:
    # None: the caller gave its own session (it is theirs to share or not).
    return None if "session" in options else json.dumps(options, sort_keys=True, default=repr)


def s3_session(options: dict[str, Any]) -> dict[str, Any]:
    """``{"session": ...}``: the session an S3 store of this event loop with the same
    options made (``keep_s3_session``), or nothing. A session caches botocore's parsed JSON
    models: a store with its own parsed them again when it made its client, on the loop (~60
    ms of CPU on an idle machine, 0.3-0.7 s on a loaded one; a worker has four stores)."""
    key = _session_key(options)
    session = _s3_sessions.get(asyncio.get_running_loop(), {}).get(key or "")
    return {} if key is None or session is None else {"session": session}


def keep_s3_session(options: dict[str, Any], fs: Any) -> None:
    """Remember ``fs``'s session (after its ``set_session``) for this loop's S3 stores with
    the same options (``s3_session``)."""
    key = _session_key(options)
    session = getattr(fs, "session", None)
    if key is not None and session is not None:
        _s3_sessions.setdefault(asyncio.get_running_loop(), {}).setdefault(key, session)


def single_try(kind: str, fs: Any, options: dict[str, Any]) -> None:
    """Turn off the retry loops the plugins run outside the SDK's configuration (each under
    OmniQ's own would multiply the time to fail: ~9 s for s3fs, ~34 s for gcsfs, ~86 s for
    adlfs against a dead endpoint, per try), and set up the S3 and Azure clients (below)."""
    if kind == "s3":
        fs.retries = 1  # s3fs' own loop around each call (5 by default)
        _tune_s3_clients(fs, own_session="session" in options)
    elif kind == "gcs":
        # gcsfs retries every request 6 times with up to 32 s sleeps, a count fixed when its
        # class is defined: bind the undecorated request method to this instance.
        raw = getattr(getattr(type(fs), "_request", None), "__wrapped__", None)
        if raw is not None:
            fs._request = types.MethodType(raw, fs)
        else:  # pragma: no cover - another gcsfs version
            log.debug("gcsfs request retries could not be turned off")
    elif kind == "azure":
        # adlfs does not pass retry settings to the azure SDK: set them on its client.
        config = getattr(getattr(fs, "service_client", None), "_config", None)
        policy = getattr(config, "retry_policy", None)
        for attr in ("total_retries", "connect_retries", "read_retries", "status_retries"):
            if hasattr(policy, attr):
                setattr(policy, attr, 0)
        transport = getattr(config, "transport", None)
        connection = getattr(transport, "connection_config", None)
        if connection is not None:
            connection.timeout = options.get("connection_timeout") or CONNECT_TIMEOUT
            connection.read_timeout = options.get("read_timeout") or READ_TIMEOUT
        if policy is None or connection is None:  # pragma: no cover - another adlfs version
            log.debug("azure retries or timeouts could not be configured")
        _no_env_lookups(transport)


def _no_env_lookups(transport: Any) -> None:
    """The azure SDK's aiohttp session trusts the environment: on every request aiohttp
    reads ``~/.netrc`` and the proxy settings in worker threads (~1 ms of CPU a request of
    the ~2.3 a read took on azurite, 2026-12-06). Where the environment, when the storage is
    made, sets no proxy aiohttp uses and has no netrc file, those look-ups find nothing: the
    session is made without them. Otherwise nothing changes. Before the session exists: its
    first request makes it."""
    if hasattr(transport, "_use_env_settings") and not _env_for_aiohttp():
        transport._use_env_settings = False


def _env_for_aiohttp() -> bool:
    """Whether aiohttp trusting the environment would find something in it: a proxy for its
    schemes (``NO_PROXY`` alone sends nothing through a proxy), or a netrc file."""
    if any(scheme in urllib.request.getproxies() for scheme in ("http", "https", "ws", "wss")):
        return True
    home = os.path.expanduser("~")
    files = [os.environ.get("NETRC") or os.path.join(home, ".netrc"), os.path.join(home, "_netrc")]
    return any(os.path.exists(f) for f in files)


def _tune_s3_clients(fs: Any, own_session: bool) -> None:
    """Done on each client s3fs creates (in its ``set_session``). botocore sends a PUT with
    ``Expect: 100-continue`` and aiohttp then waits for the interim answer with no timeout:
    against a server that accepts connections but never answers, the PUT would hang forever
    (``read_timeout`` does not apply). OmniQ's bodies are small: they go at once. And the
    session's responses read their ISO 8601 times with ``iso_timestamp`` (not on a session
    the caller gave: theirs to set up)."""
    original = fs.set_session

    async def set_session(*args: Any, **kwargs: Any) -> Any:
        client = await original(*args, **kwargs)
        events = getattr(getattr(client, "meta", None), "events", None)
        session = getattr(fs, "session", None)
        if events is not None:
            try:
                from botocore.handlers import add_expect_header
            except ImportError:  # pragma: no cover - another botocore version
                pass
            else:
                events.unregister("before-call.s3", add_expect_header)
        if session is not None and not own_session:
            parsers = session.get_component("response_parser_factory")
            parsers.set_parser_defaults(timestamp_parser=iso_timestamp)
        return client

    fs.set_session = set_session


def iso_timestamp(value: Any) -> Any:
    """botocore's timestamp parser, with the ISO 8601 UTC times of S3's XML (every entry of a
    listing has one) read by ``datetime.fromisoformat``: botocore's own, dateutil's parser,
    took ~60 % of the CPU of a 257-key listing (26-28 ms -> 10-11 ms on moto, 2026-12-06)."""
    if isinstance(value, str) and value.endswith("Z") and "T" in value:
        try:
            parsed = datetime.fromisoformat(f"{value[:-1]}+00:00")
        except ValueError:
            parsed = None
        if parsed is not None and parsed.tzinfo is not None:
            return parsed
    from botocore.utils import parse_timestamp

    return parse_timestamp(value)
