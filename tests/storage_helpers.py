"""Reach a storage target's files behind the storage class's back (shared by test modules)."""

from __future__ import annotations

import os
from typing import Any


def path(storage: Any, key: str) -> str:
    """The fsspec path of ``key`` under the target's ``base_dir``."""
    return f"{storage.base_dir.rstrip('/')}/{key}"


def put(storage: Any, key: str, data: bytes) -> None:
    """Write a file behind the storage's back."""
    target = path(storage, key)
    if storage.kind == "local":
        os.makedirs(os.path.dirname(target), exist_ok=True)
    storage.filesystem().pipe_file(target, data)


def exists(storage: Any, key: str) -> bool:
    return bool(storage.filesystem().exists(path(storage, key)))
