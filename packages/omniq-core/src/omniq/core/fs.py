"""fsspec plumbing shared by every file storage: one ``Store`` rooted at ``base_dir``.

A storage class describes a multi-step operation as a *program*: a generator that yields
``Op`` requests (``read``, ``write``, ``create``, ...) and receives their results. ``Store.run``
drives the whole program

* inline for the memory filesystem and, by default, for a local directory (a program is a
  few syscalls: cheaper than a thread hop; ``local_io="thread"`` moves each program to one
  worker thread instead, for slow network mounts),
* natively async through an async ``DirFileSystem`` for S3, GCS and Azure under asyncio,
* in one worker-thread hop over the sync fsspec API for remote stores under trio.

Exclusive create uses the primitive that is really atomic on each store: locally a fully written
temporary file is hard-linked into place (``link(2)`` fails with EEXIST exactly like ``O_EXCL``,
and a reader never sees a half-written claim); on S3, GCS and Azure ``pipe_file(mode="create")``
(conditional PUT). Listing caches are off: a stale listing loses or duplicates work.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import os
import re
import uuid
import weakref
from collections.abc import Callable, Generator, Iterable
from typing import Any, NamedTuple, TypeVar

import anyio
import anyio.to_thread
import fsspec
import sniffio
from fsspec.core import split_protocol
from fsspec.implementations.dirfs import DirFileSystem

from ._local import CANNOT_TAKE as CANNOT_TAKE
from ._local import LocalOps
from ._local import Stat as Stat
from ._ops import AsyncFsspecOps, FsspecOps, Ops
from ._ops import Entry as Entry
from .errors import CapabilityError, ConfigurationError, MissingDependencyError, StorageError

log = logging.getLogger("omniq.fs")
R = TypeVar("R")


class Op(NamedTuple):
    name: str
    args: tuple[Any, ...]


Program = Generator[Op, Any, R]


# Op constructors: ``data = yield read("a/b.json")`` inside a program.
def read(key: str) -> Op:
    """Bytes of ``key``, or None if it does not exist."""
    return Op("read", (key,))


def read_many(keys: Iterable[str]) -> Op:
    """``{key: bytes or None}`` for many keys, fetched concurrently."""
    return Op("read_many", (list(keys),))


def write(key: str, data: bytes) -> Op:
    """Replace ``key`` atomically (temp + rename locally, one PUT remotely)."""
    return Op("write", (key, data))


def mark(key: str, data: bytes) -> Op:
    """Replace a small existing file (a tombstone) in place: no new file locally, where a
    reader may see it empty for an instant; one PUT remotely."""
    return Op("mark", (key, data))


def create(key: str, data: bytes) -> Op:
    """Create ``key`` only if absent; True if this call created it, False if it existed."""
    return Op("create", (key, data))


def create_many(items: Iterable[tuple[str, bytes]]) -> Op:
    """Exclusive-create many keys (concurrently where the store allows); list of bools."""
    return Op("create_many", (list(items),))


def delete(key: str) -> Op:
    """Delete ``key``; True if it existed (always True on S3, which does not say)."""
    return Op("delete", (key,))


def delete_many(keys: Iterable[str]) -> Op:
    return Op("delete_many", (list(keys),))


def listdir(prefix: str, detail: bool = False, keep: Callable[[Entry], bool] | None = None) -> Op:
    """Files directly under ``prefix`` as sorted ``Entry`` (detail) or names; [] if absent.

    With ``keep`` (used with ``detail=True`` only; ignored otherwise), only the entries it
    accepts are returned; a local directory applies it while scanning, so a large directory
    is never held in memory."""
    return Op("ls", (prefix, detail, keep))


def count(prefix: str, min_size: int = 0) -> Op:
    """How many files directly under ``prefix`` (of at least ``min_size`` bytes)."""
    return Op("count", (prefix, min_size))


def listhead(prefix: str, limit: int) -> Op:
    """The first ``limit`` file names under ``prefix`` in sorted order. On S3 this is one
    LIST request whatever the number of keys; elsewhere a full listing, sliced."""
    return Op("ls_head", (prefix, limit))


def listafter(prefix: str, after: str, limit: int) -> Op:
    """Up to ``limit`` file names under ``prefix`` sorting after ``after``, in order. On S3
    one LIST request (``StartAfter``); elsewhere a full listing, filtered."""
    return Op("ls_after", (prefix, after, limit))


def listdirs(prefix: str) -> Op:
    """Sorted names of the sub-directories directly under ``prefix``."""
    return Op("list_dirs", (prefix,))


def exists(key: str) -> Op:
    return Op("exists", (key,))


def remove_dir(prefix: str) -> Op:
    """Remove the directory ``prefix`` if it is empty; True if this call removed it.

    Only a local directory keeps empty directories behind; on object stores and the memory
    filesystem a prefix vanishes with its last file, so this is a no-op (False) there.
    """
    return Op("remove_dir", (prefix,))


def take(src: str, dst: str, mtime: float, owner: str, min_size: int = 0) -> Op:
    """Local directories only (``Store.can_take``): claim the file ``src`` as ``dst`` by
    hard link, exclusive like ``create``, stamped with ``mtime`` (and ``owner``, where
    extended attributes work). No new file is made. Returns the inode number; False if
    ``dst`` exists (or the file is under ``min_size`` bytes); None if ``src`` is gone;
    ``CANNOT_TAKE`` if this file cannot be taken (not ours, links refused)."""
    return Op("take", (src, dst, mtime, owner, min_size))


def link(src: str, dst: str, mtime: float) -> Op:
    """Local directories only: a new name ``dst`` for the file ``src`` (hard link, exclusive
    like ``create``), stamped with ``mtime``. True if made; False if ``dst`` exists; None if
    ``src`` is gone or links are refused (create instead)."""
    return Op("link", (src, dst, mtime))


def owner(key: str) -> Op:
    """Local directories only: the ``owner`` stamped by ``take``, or None."""
    return Op("owner", (key,))


def stat(key: str) -> Op:
    """Local directories only: ``Stat(size, mtime, ino)`` of ``key``, or None."""
    return Op("stat", (key,))


def touch(key: str, mtime: float) -> Op:
    """Local directories only: set the modification time; False if ``key`` is absent."""
    return Op("touch", (key, mtime))


def now() -> Op:
    """The current time (epoch seconds); lets tests inject a clock through ``Store.clock``."""
    return Op("now", ())


_KIND = {
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
_EXTRAS = {protocol: kind for protocol, kind in _KIND.items() if kind in ("s3", "gcs", "azure")}
_USERINFO = re.compile(r"(://)[^/@]*@")


def redact_url(url: str) -> str:
    """Drop ``user:password@`` from a URL so it can be shown."""
    return _USERINFO.sub(r"\1***@", url)


def _fs_class(protocol: str, package: str) -> type[Any]:
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


class Store:
    """Files under ``base_dir`` on any fsspec filesystem.

    ``storage_options`` go to fsspec unchanged (credentials, endpoints) and are never shown in
    ``repr``, logs or error messages.
    """

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        storage_options: dict[str, Any] | None = None,
        *,
        package: str = "omniq-core",
        fsync: bool = False,
        clock: Callable[[], float] | None = None,
        local_io: str | None = None,
    ) -> None:
        if not isinstance(base_dir, (str, os.PathLike)) or not str(base_dir):
            raise ConfigurationError("base_dir must be a non-empty path or fsspec URL")
        url = os.fspath(base_dir)
        protocol, path = split_protocol(url)
        protocol = protocol or "file"
        self.protocol = protocol
        self.kind = _KIND.get(protocol, "remote")
        self.url = redact_url(url)
        self._options = dict(storage_options or {})
        self.clock = clock or _wall_clock
        self._package = package
        if local_io not in (None, "inline", "thread"):
            raise ConfigurationError(f"local_io must be 'inline' or 'thread', not {local_io!r}")
        # An fsync takes milliseconds: not on the event loop.
        self.local_io = local_io or ("thread" if fsync else "inline")
        self._async_ops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncFsspecOps]
        self._async_ops = weakref.WeakKeyDictionary()
        self._sync: Ops | None = None
        if self.kind == "local":
            if self._options:
                log.debug("storage_options are ignored for a local directory")
            root = os.path.abspath(os.path.expanduser(path))
            self.root = root
            self._sync = LocalOps(root, fsync=fsync)
        else:
            self.root = path.rstrip("/")
            if not self.root:
                raise ConfigurationError(f"base_dir {self.url!r} needs a bucket or path")
            self._native_async = bool(getattr(_fs_class(protocol, package), "async_impl", False))

    @property
    def _sync_ops(self) -> Ops:
        # Remote stores build their sync filesystem only when needed (trio, or no loop):
        # under asyncio they run natively async and never open a second session.
        if self._sync is None:
            self._sync = FsspecOps(self._make_dirfs(asynchronous=False))
        return self._sync

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def _make_dirfs(self, asynchronous: bool) -> DirFileSystem:
        cls = _fs_class(self.protocol, self._package)
        options = dict(self._options)
        extra: dict[str, Any] = {"skip_instance_cache": True, "use_listings_cache": False}
        if asynchronous:
            extra["asynchronous"] = True
        try:
            fs = cls(**{**extra, **options})
        except TypeError:  # filesystems that do not take listing-cache arguments
            fs = cls(
                **options,
                skip_instance_cache=True,
                **({"asynchronous": True} if asynchronous else {}),
            )
        return DirFileSystem(path=self.root, fs=fs, asynchronous=asynchronous)

    @property
    def is_local(self) -> bool:
        return self.kind == "local"

    @property
    def can_take(self) -> bool:
        """Whether the ``take``, ``stat`` and ``touch`` ops are available: a local directory
        whose filesystem has not refused a hard link (``probe_exclusive_create`` tries one)."""
        return isinstance(self._sync, LocalOps) and self._sync.links_work

    @property
    def shared_across_processes(self) -> bool:
        """False for the memory filesystem, which lives inside one process."""
        return self.kind != "memory"

    # -- running programs -------------------------------------------------------------------
    async def run(self, program: Program[R], *, heavy: bool = False) -> R:
        """Drive ``program`` to completion and return its value. ``heavy`` marks a program
        that may scan a large directory: locally it then runs in a worker thread even when
        ``local_io`` is inline, so it does not stall the event loop."""
        if self.kind == "memory" or (
            self.kind == "local" and self.local_io == "inline" and not heavy
        ):
            # A program's few local syscalls cost less than a hop to a worker thread (about
            # 4x on tmpfs, 30 % on ext4, measured in benchmarks/README.md).
            return _drive(program, self._sync_ops, self.clock)
        if self.kind == "local":
            return await anyio.to_thread.run_sync(_drive, program, self._sync_ops, self.clock)
        if not self._native_async or sniffio.current_async_library() != "asyncio":
            return await anyio.to_thread.run_sync(_drive, program, self._sync_ops, self.clock)
        ops = await self._ops_for_loop()
        return await _adrive(program, ops, self.clock)

    async def _ops_for_loop(self) -> AsyncFsspecOps:
        loop = asyncio.get_running_loop()
        ops = self._async_ops.get(loop)
        if ops is None:
            dirfs = self._make_dirfs(asynchronous=True)
            setter = getattr(dirfs.fs, "set_session", None)
            if setter is not None and asyncio.iscoroutinefunction(setter):
                await setter()
            ops = self._async_ops[loop] = AsyncFsspecOps(dirfs)
        return ops

    async def aclose(self) -> None:
        """Close the network sessions opened on the current event loop."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        ops = self._async_ops.pop(loop, None)
        if ops is not None:
            await ops.aclose()

    # -- one-op conveniences ----------------------------------------------------------------
    async def read(self, key: str) -> bytes | None:
        return await self.run(_one(read(key)))

    async def read_many(self, keys: Iterable[str]) -> dict[str, bytes | None]:
        return await self.run(_one(read_many(keys)))

    async def write(self, key: str, data: bytes) -> None:
        await self.run(_one(write(key, data)))

    async def create(self, key: str, data: bytes) -> bool:
        return await self.run(_one(create(key, data)))

    async def delete(self, key: str) -> bool:
        return await self.run(_one(delete(key)))

    async def delete_many(self, keys: Iterable[str]) -> None:
        await self.run(_one(delete_many(keys)))

    async def list(self, prefix: str) -> builtins.list[str]:
        return await self.run(_one(listdir(prefix)))

    async def list_detail(self, prefix: str) -> builtins.list[Entry]:
        return await self.run(_one(listdir(prefix, True)))

    async def list_dirs(self, prefix: str) -> builtins.list[str]:
        return await self.run(_one(listdirs(prefix)))

    async def exists(self, key: str) -> bool:
        return await self.run(_one(exists(key)))

    async def sweep_temp(self, prefix: str = "", older_than: float = 3600.0) -> builtins.list[str]:
        """Delete temporary files (``.tmp-*``) older than ``older_than`` seconds under
        ``prefix``: a local directory's writes go through them, and a process killed between
        the write and the rename leaves one behind (never read as data). Other filesystems
        write whole objects and have none. Returns the keys removed."""
        if not isinstance(self._sync, LocalOps):
            return []
        before = self.clock() - older_than
        return await anyio.to_thread.run_sync(self._sync.sweep_temp, prefix, before)

    async def probe_exclusive_create(self) -> None:
        """Prove that exclusive create is enforced here: create one key twice.

        Raises CapabilityError if the second create also succeeds.
        """
        key = f"_omniq/probe-{uuid.uuid4().hex}"
        first = await self.create(key, b"1")
        second = await self.create(key, b"2")
        await self.delete(key)
        if not first or second:
            raise CapabilityError(
                f"{self.url}: this filesystem does not enforce exclusive create "
                f"(first={first}, second={second}); several workers would run the same task"
            )


def _wall_clock() -> float:
    import time

    return time.time()


def _one(op: Op) -> Program[Any]:
    return (yield op)


def _as_storage_error(op: Op, exc: Exception) -> Exception:
    if isinstance(exc, OSError) and not isinstance(exc, StorageError):
        key = op.args[0] if op.args else ""
        error = StorageError(f"{op.name} {key!r} failed: {type(exc).__name__}: {exc}")
        error.__cause__ = exc
        return error
    return exc


def _drive(program: Program[R], ops: Ops, clock: Callable[[], float]) -> R:
    try:
        op = next(program)
        while True:
            try:
                result = clock() if op.name == "now" else getattr(ops, op.name)(*op.args)
            except Exception as exc:  # handed to the program, which may handle it
                op = program.throw(_as_storage_error(op, exc))
            else:
                op = program.send(result)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


async def _adrive(program: Program[R], ops: AsyncFsspecOps, clock: Callable[[], float]) -> R:
    try:
        op = next(program)
        while True:
            try:
                result = clock() if op.name == "now" else await getattr(ops, op.name)(*op.args)
            except Exception as exc:
                op = program.throw(_as_storage_error(op, exc))
            else:
                op = program.send(result)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
