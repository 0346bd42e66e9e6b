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
(conditional PUT). Listing caches are off: a stale listing loses or duplicates work. How a
plugin is chosen, checked and configured: ``_plugins``.
"""

from __future__ import annotations

import asyncio
import builtins
import functools
import logging
import os
import uuid
import warnings
import weakref
from collections.abc import Callable, Collection, Generator, Iterable
from typing import Any, Literal, NamedTuple, TypeVar, overload

import anyio
import anyio.to_thread
import sniffio
from fsspec.core import split_protocol
from fsspec.implementations.dirfs import DirFileSystem

from . import _redact
from ._fsspec_ops import AsyncFsspecOps, FsspecOps, detach_finalizers
from ._local_ops import LocalOps
from ._ops_protocol import Entry as Entry
from ._ops_protocol import LocalOnlyOps as LocalOnlyOps
from ._ops_protocol import Ops as Ops
from ._ops_protocol import Stat as Stat
from ._ops_protocol import TakeResult as TakeResult
from ._ops_protocol import TakeStatus as TakeStatus
from ._plugins import (
    KIND,
    check_options,
    fs_class,
    keep_s3_session,
    s3_session,
    sdk_defaults,
    single_try,
)
from .errors import (
    CapabilityError,
    ConfigurationError,
    OmniQError,
    StorageError,
)

log = logging.getLogger("omniq.fs")
R = TypeVar("R")


class Op(NamedTuple):
    """One request of a program: ``name`` is the constructor that built it and the method of
    the ops object (``Ops``, ``LocalOnlyOps``) that runs it."""

    name: str
    args: tuple[Any, ...]


Program = Generator[Op, Any, R]
# A NamedTuple's own __new__ is a generated function: ~0.2 us more an op (a local claim and
# its ack are seven ops).
_new = tuple.__new__


# Op constructors: ``data = yield read("a/b.json")`` inside a program.
def read(key: str) -> Op:
    """Bytes of ``key``, or None if it does not exist."""
    return _new(Op, ("read", (key,)))


def read_many(keys: Iterable[str]) -> Op:
    """``{key: bytes or None}`` for many keys, fetched concurrently."""
    return _new(Op, ("read_many", (list(keys),)))


def write(key: str, data: bytes) -> Op:
    """Replace ``key`` atomically (temp + rename locally, one PUT remotely)."""
    return _new(Op, ("write", (key, data)))


def mark(key: str, data: bytes) -> Op:
    """Replace a small existing file (a tombstone) in place: no new file locally, where a
    reader may see it empty for an instant; one PUT remotely."""
    return _new(Op, ("mark", (key, data)))


def create(key: str, data: bytes) -> Op:
    """Create ``key`` only if absent; True if this call created it, False if it existed.

    An "exists" answer is checked against the stored bytes (a retry of a request that landed
    but whose response was lost also gets it), so ``data`` must be unique to the caller: put a
    nonce in it. Raises StorageError when the outcome cannot be known."""
    return _new(Op, ("create", (key, data)))


def create_many(items: Iterable[tuple[str, bytes]]) -> Op:
    """Exclusive-create many keys (concurrently where the store allows); list of bools."""
    return _new(Op, ("create_many", (list(items),)))


def delete(key: str) -> Op:
    """Delete ``key``; True if it existed (always True on S3, which does not say)."""
    return _new(Op, ("delete", (key,)))


def delete_many(keys: Iterable[str]) -> Op:
    return _new(Op, ("delete_many", (list(keys),)))


@overload
def listdir(
    prefix: str, detail: Literal[False] = False, keep: Callable[[str], bool] | None = None
) -> Op: ...
@overload
def listdir(
    prefix: str, detail: Literal[True], keep: Callable[[Entry], bool] | None = None
) -> Op: ...
@overload
def listdir(prefix: str, detail: bool, keep: None = None) -> Op: ...
def listdir(prefix: str, detail: bool = False, keep: Callable[[Any], bool] | None = None) -> Op:
    """Files directly under ``prefix`` as sorted ``Entry`` (detail) or names; [] if absent.

    With ``keep``, only the entries (detail) or names it accepts are returned. A local
    directory applies it to entries while scanning, so a large directory's entries are
    never held in memory, and to names before it looks at their type: a few names kept of
    hundreds cost a listing of names alone."""
    return _new(Op, ("listdir", (prefix, detail, keep)))


def count(prefix: str, min_size: int = 0, skip: Collection[str] = ()) -> Op:
    """How many files directly under ``prefix`` (of at least ``min_size`` bytes), not
    counting the names in ``skip``."""
    return _new(Op, ("count", (prefix, min_size, skip)))


def listhead(prefix: str, limit: int) -> Op:
    """The first ``limit`` file names under ``prefix`` in sorted order. On S3 this is one
    LIST request whatever the number of keys; elsewhere a full listing, sliced."""
    return _new(Op, ("listhead", (prefix, limit)))


def listafter(prefix: str, after: str, limit: int) -> Op:
    """Up to ``limit`` file names under ``prefix`` sorting after ``after``, in order. On S3
    one LIST request (``StartAfter``); elsewhere a full listing, filtered."""
    return _new(Op, ("listafter", (prefix, after, limit)))


def listtree(prefix: str, limit: int) -> Op:
    """The first ``limit`` files of ``prefix``'s sub-directories, as ``dir/name``, in sorted
    order (a queue's ready head over its priority directories). On S3, GCS and Azure one
    flat listing request; elsewhere the sub-directories listed, then each one's head. For
    sub-directories of files whose names are of one width (``p0005``): where one name is a
    prefix of another (``a``, ``a-b``) the flat key order and the directory order differ."""
    return _new(Op, ("listtree", (prefix, limit)))


def listdirs(prefix: str) -> Op:
    """Sorted names of the sub-directories directly under ``prefix``."""
    return _new(Op, ("listdirs", (prefix,)))


def exists(key: str) -> Op:
    return _new(Op, ("exists", (key,)))


def remove_dir(prefix: str) -> Op:
    """Remove the directory ``prefix`` if it is empty; True if this call removed it.

    Only a local directory keeps empty directories behind; on object stores and the memory
    filesystem a prefix vanishes with its last file, so this is a no-op (False) there.
    """
    return _new(Op, ("remove_dir", (prefix,)))


def take(src: str, dst: str, mtime: float, owner: str, min_size: int = 0) -> Op:
    """Local directories only (``Store.can_take``): claim the file ``src`` as ``dst`` by
    hard link, exclusive like ``create``, stamped with ``mtime`` (and ``owner``, where
    extended attributes work). No new file is made. Returns a ``TakeResult``: ``TAKEN`` with
    the inode number; ``EXISTS`` if ``dst`` exists (or the file is under ``min_size`` bytes);
    ``GONE`` if ``src`` is gone; ``REFUSED`` if this file cannot be taken (not ours, links
    refused)."""
    return _new(Op, ("take", (src, dst, mtime, owner, min_size)))


def link(src: str, dst: str, mtime: float | None = None) -> Op:
    """Local directories only: a new name ``dst`` for the file ``src`` (hard link, exclusive
    like ``create``), stamped with ``mtime`` if given. True if made; False if ``dst`` exists;
    None if ``src`` is gone or links are refused (create instead)."""
    return _new(Op, ("link", (src, dst, mtime)))


def owner(key: str) -> Op:
    """Local directories only: the ``owner`` stamped by ``take``, or None."""
    return _new(Op, ("owner", (key,)))


def stat(key: str) -> Op:
    """Local directories only: ``Stat(size, mtime, ino)`` of ``key``, or None."""
    return _new(Op, ("stat", (key,)))


def touch(key: str, mtime: float) -> Op:
    """Local directories only: set the modification time; False if ``key`` is absent."""
    return _new(Op, ("touch", (key, mtime)))


def now() -> Op:
    """The current time (epoch seconds); lets tests inject a clock through ``Store.clock``."""
    return _NOW


_NOW = Op("now", ())


def redact_url(url: str) -> str:
    """Drop ``user:password@`` from a URL so it can be shown."""
    return _redact.redact_url(url)


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
        self.kind = KIND.get(protocol, "remote")
        self._options = dict(storage_options or {})
        # Credentials in the URL or the options are hidden in every text OmniQ shows.
        _redact.register([*_redact.url_secrets(url), *_redact.option_secrets(self._options)])
        self.url = redact_url(url)
        self.clock = clock or _wall_clock
        self._package = package
        if local_io not in (None, "inline", "thread"):
            raise ConfigurationError(f"local_io must be 'inline' or 'thread', not {local_io!r}")
        # An fsync takes milliseconds: not on the event loop.
        self.local_io = local_io or ("thread" if fsync else "inline")
        self._async_ops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncFsspecOps]
        self._async_ops = weakref.WeakKeyDictionary()
        self._sync: Ops | LocalOnlyOps | None = None
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
            cls = fs_class(protocol, package)
            self._native_async = bool(getattr(cls, "async_impl", False))
            check_options(self.kind, protocol, cls, self._options)

    @property
    def _sync_ops(self) -> Ops | LocalOnlyOps:
        # Remote stores build their sync filesystem only when needed (trio, or no loop):
        # under asyncio they run natively async and never open a second session.
        if self._sync is None:
            self._sync = FsspecOps(self._make_dirfs(asynchronous=False))
        return self._sync

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    @functools.cached_property
    def where(self) -> str:
        """The store as shown in messages: its URL, and its endpoint if one is set (both
        without credentials)."""
        endpoint = self._options.get("endpoint_url")
        connection = self._options.get("connection_string")
        if not endpoint and isinstance(connection, str):  # Azure: its BlobEndpoint
            parts = dict(p.partition("=")[::2] for p in connection.split(";") if "=" in p)
            endpoint = parts.get("BlobEndpoint")
        if isinstance(endpoint, str) and endpoint:
            return _redact.redact(f"{self.url} (endpoint {redact_url(endpoint)})")
        return self.url

    def _make_dirfs(self, asynchronous: bool) -> DirFileSystem:
        cls = fs_class(self.protocol, self._package)
        options = {**self._options, **sdk_defaults(self.kind, self._options)}
        extra: dict[str, Any] = {"skip_instance_cache": True, "use_listings_cache": False}
        if asynchronous:
            extra["asynchronous"] = True
            if self.kind == "s3":
                options.update(s3_session(self._options))
        try:
            fs = cls(**{**extra, **options})
        except TypeError:  # filesystems that do not take listing-cache arguments
            fs = cls(
                **options,
                skip_instance_cache=True,
                **({"asynchronous": True} if asynchronous else {}),
            )
        single_try(self.kind, fs, self._options)
        return DirFileSystem(path=self.root, fs=fs, asynchronous=asynchronous)

    @property
    def is_local(self) -> bool:
        return self.kind == "local"

    @property
    def is_remote(self) -> bool:
        """An object store (S3, GCS, Azure): every op is a request, with its latency and price
        (not a local directory or memory)."""
        return self.kind not in ("local", "memory")

    @property
    def can_take(self) -> bool:
        """Whether the ``LocalOnlyOps`` (``take``, ``link``, ``stat``, ``owner``, ``touch``) are
        available: a local directory whose filesystem has not refused a hard link
        (``probe_exclusive_create`` tries one)."""
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
            return _drive(program, self._sync_ops, self.clock, self.where)
        if self.kind == "local":
            return await anyio.to_thread.run_sync(
                _drive, program, self._sync_ops, self.clock, self.where
            )
        if not self._native_async or sniffio.current_async_library() != "asyncio":
            return await anyio.to_thread.run_sync(
                _drive, program, self._sync_ops, self.clock, self.where
            )
        ops = await self._ops_for_loop()
        return await _adrive(program, ops, self.clock, self.where)

    async def open(self) -> None:
        """Make this event loop's object-store client now, not at the first request (no
        request is sent; nothing to do locally, in memory or off asyncio). An S3 client costs
        the loop ~60 ms of CPU (botocore parses its JSON models, once a loop and set of
        options), seconds on a loaded machine: a worker opens its stores before it holds a
        lease that must be renewed."""
        if self.is_remote and self._native_async and sniffio.current_async_library() == "asyncio":
            await self._ops_for_loop()

    async def _ops_for_loop(self) -> AsyncFsspecOps:
        loop = asyncio.get_running_loop()
        ops = self._async_ops.get(loop)
        if ops is None:
            dirfs = self._make_dirfs(asynchronous=True)
            setter = getattr(dirfs.fs, "set_session", None)
            if setter is not None and asyncio.iscoroutinefunction(setter):
                await setter()
            if self.kind == "s3":
                keep_s3_session(self._options, dirfs.fs)
            # The plugins' own finalizers close their sessions at exit through this loop;
            # once it is closed, adlfs' raise "Loop is not running" (a traceback at every
            # exit of a program that did not close its storage). ``aclose`` closes them.
            detach_finalizers(dirfs.fs)
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

    @overload
    async def listdir(self, prefix: str, detail: Literal[False] = False) -> builtins.list[str]: ...
    @overload
    async def listdir(self, prefix: str, detail: Literal[True]) -> builtins.list[Entry]: ...
    async def listdir(self, prefix: str, detail: bool = False) -> builtins.list[Any]:
        """Files directly under ``prefix``: sorted names, or ``Entry``s with ``detail``."""
        return await self.run(_one(listdir(prefix, detail)))

    async def listdirs(self, prefix: str) -> builtins.list[str]:
        return await self.run(_one(listdirs(prefix)))

    # Deprecated names (0.1.0), kept one release: the ops and Store now share one vocabulary.
    async def list(self, prefix: str) -> builtins.list[str]:
        """Deprecated: ``listdir(prefix)``."""
        _deprecated("Store.list", "Store.listdir(prefix)")
        return await self.listdir(prefix)

    async def list_detail(self, prefix: str) -> builtins.list[Entry]:
        """Deprecated: ``listdir(prefix, detail=True)``."""
        _deprecated("Store.list_detail", "Store.listdir(prefix, detail=True)")
        return await self.listdir(prefix, True)

    async def list_dirs(self, prefix: str) -> builtins.list[str]:
        """Deprecated: ``listdirs(prefix)``."""
        _deprecated("Store.list_dirs", "Store.listdirs(prefix)")
        return await self.listdirs(prefix)

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
        """Prove that exclusive create is enforced here: create one new key twice, with
        different bytes each time (an "exists" answer to a retry of the first create, whose
        response was lost, is recognized by its bytes and counts as created).

        Raises CapabilityError if the first create is refused or the second also succeeds;
        StorageError if the store cannot be reached.
        """
        token = uuid.uuid4().hex
        key = f"_omniq/probe-{token}"
        first = await self.create(key, f"probe {token} first".encode())
        second = await self.create(key, f"probe {token} second".encode())
        await self.delete(key)
        if first and not second:
            return
        if not first:
            what = 'the first create of a new key was answered "already exists"'
        else:
            what = "a second create of the same key also succeeded"
        raise CapabilityError(
            f"{self.where}: exclusive create (create-if-absent) is not enforced: {what}. "
            "This store or filesystem does not support conditional writes, so two workers "
            "could claim the same task. Use a store that enforces them: a local directory "
            "(one machine or a POSIX shared filesystem), AWS S3 or an S3-compatible store "
            "with conditional writes (If-None-Match), Google Cloud Storage, Azure Blob "
            "Storage, or memory:// inside one process"
        )


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"{old} is deprecated; use {new}", DeprecationWarning, stacklevel=3)


def _wall_clock() -> float:
    import time

    return time.time()


def _one(op: Op) -> Program[Any]:
    return (yield op)


# Packages whose exceptions (and builtin exceptions raised inside them) are storage failures.
_STORAGE_PACKAGES = frozenset(
    {
        "fsspec",
        "s3fs",
        "botocore",
        "aiobotocore",
        "gcsfs",
        "google",
        "adlfs",
        "azure",
        "aiohttp",
        "requests",
        "urllib3",
    }
)


def _from_storage_sdk(exc: BaseException) -> bool:
    if type(exc).__module__.split(".")[0] in _STORAGE_PACKAGES:
        return True
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    module = tb.tb_frame.f_globals.get("__name__", "") if tb is not None else ""
    return str(module).split(".")[0] in _STORAGE_PACKAGES


def _as_storage_error(op: Op, exc: Exception, where: str = "") -> Exception:
    """What a failed op hands to its program: a StorageError naming the store (without
    credentials) and the op, with the original as ``__cause__``, for an OSError or anything a
    filesystem plugin or SDK raised (its ValueError or TypeError included). OmniQ's own errors,
    and bugs in OmniQ, pass unchanged."""
    if isinstance(exc, OmniQError) and not isinstance(exc, StorageError):
        return exc
    if not isinstance(exc, OSError) and not _from_storage_sdk(exc):
        return exc
    prefix = f"{where}: " if where else ""
    if isinstance(exc, StorageError):
        if prefix and not str(exc).startswith(prefix):
            exc.args = (_redact.redact(f"{prefix}{exc}"),)
        return exc
    _redact.scrub_exception(exc)
    key = op.args[0] if op.args else ""
    error = StorageError(
        _redact.redact(f"{prefix}{op.name} {key!r} failed: {type(exc).__name__}: {exc}")
    )
    error.__cause__ = exc
    return error


# Called after every storage op a program makes (``now`` excepted) with the op's name and the
# exception it raised, or None: how ``omniq.backend.file._metrics`` counts storage requests.
# None by default, so that the drivers cost one comparison per op when nobody is counting.
RequestHook = Callable[[str, BaseException | None], None]
request_hook: RequestHook | None = None


def set_request_hook(hook: RequestHook | None) -> RequestHook | None:
    """Install ``hook`` (None removes it) for the programs started from now on; returns the
    hook it replaces. One op retried inside the ops (transient failures) counts once."""
    global request_hook
    previous, request_hook = request_hook, hook
    return previous


def _drive(
    program: Program[R], ops: Ops | LocalOnlyOps, clock: Callable[[], float], where: str = ""
) -> R:
    """Run ``program`` against ``ops``: each ``Op`` is the ops method of its name (``now`` is
    the clock). A local-only op on ops without it fails like any other bad op."""
    hook = request_hook
    try:
        op = next(program)
        while True:
            try:
                result = clock() if op.name == "now" else getattr(ops, op.name)(*op.args)
            except Exception as exc:  # handed to the program, which may handle it
                if hook is not None:
                    hook(op.name, exc)
                op = program.throw(_as_storage_error(op, exc, where))
            else:
                if hook is not None and op.name != "now":
                    hook(op.name, None)
                op = program.send(result)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


async def _adrive(
    program: Program[R], ops: AsyncFsspecOps, clock: Callable[[], float], where: str = ""
) -> R:
    hook = request_hook
    try:
        op = next(program)
        while True:
            try:
                result = clock() if op.name == "now" else await getattr(ops, op.name)(*op.args)
            except Exception as exc:
                if hook is not None:
                    hook(op.name, exc)
                op = program.throw(_as_storage_error(op, exc, where))
            else:
                if hook is not None and op.name != "now":
                    hook(op.name, None)
                op = program.send(result)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
