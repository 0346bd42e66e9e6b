"""Credentials out of everything OmniQ shows: exception messages, reprs and log records.

Two mechanisms, used together:

* patterns that are credentials wherever they appear: the ``user:password@`` of a URL and
  the access key id in an AWS signature (``Credential=<key id>/...``, logged by botocore at
  DEBUG);
* the credential strings of every ``Store`` made in this process (``register``): the values of
  its credential-like storage options (``key``, ``secret``, ``token``, ``account_key``, ...),
  the secrets inside an Azure connection string, and the userinfo of its URL. A key id or secret is hidden wherever an SDK happens to echo it.

Endpoints are shown (a connection error must say where it tried to connect); only credentials
inside them are hidden.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

MASK = "***"
MIN_LENGTH = 4  # shorter strings ("1", "us") are not credentials and would mangle output

# Options whose values are public settings, shown as they are (endpoints minus their userinfo).
SHOWN_OPTIONS = frozenset(
    {
        "endpoint_url",
        "account_host",
        "account_name",
        "region_name",
        "project",
        "default_location",
        "location_mode",
        "anon",
        "use_ssl",
        "verify",
        "requester_pays",
        "version_aware",
        "asynchronous",
        "skip_instance_cache",
        "use_listings_cache",
        "listings_expiry_time",
        "max_concurrency",
        "default_block_size",
        "block_size",
        "consistency",
        "access",
        "timeout",
        "connect_timeout",
        "connection_timeout",
        "read_timeout",
        "requests_timeout",
        "retries",
        "max_attempts",
        "total_max_attempts",
        "mode",
        "signature_version",
        "addressing_style",
        "auto_mkdir",
    }
)
# Words in the names of options that hold credentials.
_CREDENTIAL_WORDS = (
    "key",
    "secret",
    "token",
    "password",
    "passwd",
    "credential",
    "sas",
    "signature",
    "auth",
    "connection_string",
    "conn_str",
)
# Option values that name a mode, not a credential (gcsfs ``token``).
_MODES = frozenset({"anon", "google_default", "cloud", "browser", "cache"})
# Parts of an Azure connection string that are secrets (the rest are endpoints and names).
_CONNECTION_SECRETS = ("accountkey", "sharedaccesssignature", "sharedaccesskey")

_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://)[^/@\s'\"<>]+@")
_CREDENTIAL = re.compile(r"((?:X-Amz-)?Credential=)[^/\s,;&'\"%]+")
_SAS_SIG = re.compile(r"([?&]sig=)[^&\s'\"]+")

_secrets: set[str] = set()
_ordered: list[str] = []  # longest first, so that a secret inside another is not half-hidden
_lock = threading.Lock()


def _strings(value: Any, secret: bool = True) -> Iterator[str]:
    """The credential strings in ``value``: under a mapping, the values of credential-like
    option names (and secrets inside connection strings); a value with no name to judge it
    by counts as a credential. URL userinfo always does."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield from _strings(item, _is_credential_name(str(key)))
    elif isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            yield from _strings(item, secret)
    elif isinstance(value, str):
        yield from url_secrets(value)
        if secret and value not in _MODES:
            yield value
            if ";" in value and "=" in value:  # an Azure connection string
                for part in value.split(";"):
                    name, _, inner = part.partition("=")
                    if name.strip().lower() in _CONNECTION_SECRETS:
                        yield inner.strip()


def _is_credential_name(name: str) -> bool:
    """Whether an option of this name holds a credential (``key``, ``secret``, ``token``,
    ``password``, ``account_key``, ``sas_token``, ``connection_string``, ...). Other options
    (``target_protocol``, ``project``, ...) are settings: their values, common words such as
    ``memory``, must not be masked wherever they appear."""
    lowered = name.lower()
    return lowered not in SHOWN_OPTIONS and any(word in lowered for word in _CREDENTIAL_WORDS)


def url_secrets(url: str) -> list[str]:
    """The credentials inside a URL's ``user:password@`` (the whole, and each part)."""
    found: list[str] = []
    match = re.match(r"[A-Za-z][A-Za-z0-9+.\-]*://([^/@\s]+)@", url)
    if match:
        userinfo = match.group(1)
        found.append(userinfo)
        found.extend(part for part in userinfo.split(":", 1) if part)
    return found


def option_secrets(options: Mapping[str, Any]) -> list[str]:
    """The credential strings in storage options (values of options that are not public
    settings, secrets inside connection strings, userinfo of endpoint URLs)."""
    return [s for s in _strings(options) if len(s) >= MIN_LENGTH]


def register(secrets: Iterable[str]) -> None:
    """Hide these strings in every text OmniQ shows from now on, in this process."""
    new = {s for s in secrets if isinstance(s, str) and len(s) >= MIN_LENGTH}
    with _lock:
        if new - _secrets:
            _secrets.update(new)
            _ordered[:] = sorted(_secrets, key=len, reverse=True)


def redact(text: str) -> str:
    """``text`` with URL userinfo, AWS key ids and registered credentials replaced by ``***``."""
    if "@" in text:
        text = _USERINFO.sub(rf"\1{MASK}@", text)
    if "Credential=" in text:
        text = _CREDENTIAL.sub(rf"\1{MASK}", text)
    if "sig=" in text:
        text = _SAS_SIG.sub(rf"\1{MASK}", text)
    for secret in _ordered:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def redact_url(url: str) -> str:
    """Drop ``user:password@`` from a URL so it can be shown (the rest stays readable)."""
    return _USERINFO.sub(rf"\1{MASK}@", url)


def scrub_exception(exc: BaseException | None) -> None:
    """Redact, in place, the text of ``exc`` and of the exceptions chained to it (an SDK's
    error may echo a URL with credentials or a key id; OmniQ keeps it as ``__cause__``, and a
    traceback shows it)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen and len(seen) < 20:
        seen.add(id(exc))
        try:
            args = tuple(redact(a) if isinstance(a, str) else a for a in exc.args)
            if args != exc.args:
                exc.args = args
            for attr in ("filename", "filename2", "strerror", "message"):
                value = getattr(exc, attr, None)
                if isinstance(value, str):
                    clean = redact(value)
                    if clean != value:
                        setattr(exc, attr, clean)
        except Exception:  # an exception type with read-only attributes: best effort
            pass
        exc = exc.__cause__ or exc.__context__


def _scrub_record(record: logging.LogRecord) -> None:
    try:
        message = record.getMessage()
    except Exception:  # a broken format string: the handler reports it as usual
        return
    clean = redact(message)
    if clean != message:
        record.msg, record.args = clean, None
    if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
        record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
    elif record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)


class RedactFilter(logging.Filter):
    """A logging filter that hides credentials in each record it sees (message, formatted
    traceback, stack): URL userinfo, ``Credential=<key id>`` of AWS signatures, and the
    credentials of every ``Store`` made in this process. Attach it to a handler
    (``handler.addFilter(RedactFilter())``) to cover every record that handler writes, or call
    ``redact_logs()`` to cover every record of the process."""

    def filter(self, record: logging.LogRecord) -> bool:
        _scrub_record(record)
        return True


_factory_installed = False


def redact_logs() -> None:
    """Hide credentials in every log record created in this process from now on, whatever the
    logger (OmniQ's, botocore's, s3fs', azure's, gcsfs') and whatever the handlers: wraps the
    log record factory. Idempotent. The ``omniq`` command calls it."""
    global _factory_installed
    with _lock:
        if _factory_installed:
            return
        previous = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            _scrub_record(record)
            return record

        logging.setLogRecordFactory(factory)
        _factory_installed = True
