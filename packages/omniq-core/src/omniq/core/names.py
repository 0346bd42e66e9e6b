"""Validation of every name that becomes part of a storage key."""

from __future__ import annotations

import re

from .errors import InvalidNameError

MAX_NAME_LENGTH = 128
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


def validate_name(name: object, what: str = "name") -> str:
    """Return ``name`` if it is safe as one path component, else raise InvalidNameError.

    Allowed: ASCII letters, digits, ``_``, ``.`` and ``-``, starting with a letter or digit,
    at most 128 characters. This rules out ``..``, separators, absolute paths, control
    characters, whitespace and Unicode look-alikes.
    """
    if not isinstance(name, str):
        raise InvalidNameError(f"{what} must be a string, got {type(name).__name__}")
    if not name:
        raise InvalidNameError(f"{what} must not be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidNameError(
            f"{what} is {len(name)} characters long; the limit is {MAX_NAME_LENGTH}"
        )
    if _NAME.fullmatch(name) is None:
        bad = next((c for c in name if not (c.isascii() and (c.isalnum() or c in "_.-"))), None)
        detail = f"character {bad!r}" if bad is not None else "a leading '.', '_' or '-'"
        raise InvalidNameError(
            f"{what} {name!r} contains {detail}; use ASCII letters, digits, '_', '.' and '-', "
            "starting with a letter or digit"
        )
    return name


def validate_key(key: str) -> str:
    """Validate a relative storage key made of '/'-separated valid names."""
    if not isinstance(key, str) or not key:
        raise InvalidNameError("storage key must be a non-empty string")
    for part in key.split("/"):
        validate_name(part, "key component")
    return key
