"""The storage operations a ``Store`` program may request: their protocols and result types.

One vocabulary: an op constructor in ``fs.py`` (``listdir``), the ``Op.name`` it builds and
the method of the ops object that runs it are the same word. ``Ops`` is what every store
answers (``FsspecOps``, ``LocalOps``; ``AsyncFsspecOps`` answers the same names with
coroutines); ``LocalOnlyOps`` adds what only a local directory can do (hard links, inode
stamps), available where ``Store.can_take`` says so.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection
from typing import Any, NamedTuple, Protocol


class Entry(NamedTuple):
    """One file in a listing: its base name, size in bytes and modification time (epoch s)."""

    name: str
    size: int
    mtime: float


class Stat(NamedTuple):
    """A local file's size, modification time (epoch s) and inode number."""

    size: int
    mtime: float
    ino: int


class TakeStatus(enum.Enum):
    """How a ``take`` ended."""

    TAKEN = "taken"
    """The file is claimed under the new name (``TakeResult.ino`` is its inode number)."""
    EXISTS = "exists"
    """The new name exists already (another claim), or the file is under ``min_size``."""
    GONE = "gone"
    """The file is gone (taken by someone else meanwhile)."""
    REFUSED = "refused"
    """This file cannot be taken here (another user's, hard links refused): claim it
    another way."""


class TakeResult(NamedTuple):
    """What ``take`` returns: its status and, when ``TAKEN``, the inode number (else 0)."""

    status: TakeStatus
    ino: int = 0


class Ops(Protocol):
    """The operations every store answers (see the op constructors in ``fs.py``)."""

    def read(self, key: str) -> bytes | None: ...
    def read_many(self, keys: list[str]) -> dict[str, bytes | None]: ...
    def write(self, key: str, data: bytes) -> None: ...
    def mark(self, key: str, data: bytes) -> None: ...
    def create(self, key: str, data: bytes) -> bool: ...
    def create_many(self, items: list[tuple[str, bytes]]) -> list[bool]: ...
    def delete(self, key: str) -> bool: ...
    def delete_many(self, keys: list[str]) -> None: ...
    def listdir(
        self, prefix: str, detail: bool, keep: Callable[[Any], bool] | None = None
    ) -> list[Any]: ...
    def count(self, prefix: str, min_size: int = 0, skip: Collection[str] = ()) -> int: ...
    def listhead(self, prefix: str, limit: int) -> list[str]: ...
    def listafter(self, prefix: str, after: str, limit: int) -> list[str]: ...
    def listdirs(self, prefix: str) -> list[str]: ...
    def listtree(self, prefix: str, limit: int) -> list[str]: ...
    def exists(self, key: str) -> bool: ...
    def remove_dir(self, prefix: str) -> bool: ...


class LocalOnlyOps(Ops, Protocol):
    """The operations only a local directory answers (``LocalOps``)."""

    def take(
        self, src: str, dst: str, mtime: float, owner: str, min_size: int = 0
    ) -> TakeResult: ...
    def link(self, src: str, dst: str, mtime: float | None = None) -> bool | None: ...
    def stat(self, key: str) -> Stat | None: ...
    def owner(self, key: str) -> str | None: ...
    def touch(self, key: str, mtime: float) -> bool: ...
