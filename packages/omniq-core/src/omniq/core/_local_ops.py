"""A local directory through os calls: ``LocalOps``, the ``Ops`` (and ``LocalOnlyOps``) of
``Store`` for ``file://`` paths.

Exclusive create is a fully written file hard-linked into place (``link`` fails with EEXIST
like ``O_EXCL``, so a reader never sees half a file): a nameless ``O_TMPFILE`` inode linked
with ``linkat(2)`` through ``/proc/self/fd`` (one directory change, and a crash leaves nothing
to sweep), or a named temp file linked and unlinked, whichever was faster here
(``_NewFileWay``). ``take`` claims an existing file by hard link without creating one.
"""

from __future__ import annotations

import errno
import heapq
import logging
import os
import statistics
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from typing import Any

from ._ops_protocol import Entry, Stat, TakeResult, TakeStatus

log = logging.getLogger("omniq.fs")
_entry = Entry

_CHUNK = 1 << 16
_OWNER_XATTR = "user.omniq.owner"
_NO_LINK = (errno.EPERM, errno.EACCES, errno.EXDEV, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK)


_EXISTS = TakeResult(TakeStatus.EXISTS)
_GONE = TakeResult(TakeStatus.GONE)
_REFUSED = TakeResult(TakeStatus.REFUSED)


def _lock_name(path: str) -> str:
    directory, name = os.path.split(path)
    return os.path.join(directory, f".lock-{name}")


TRIAL_FILES = 8
"""New files made each way (nameless and named) before ``LocalOps`` keeps the faster; 0:
nameless wherever the filesystem allows (read when a ``LocalOps`` is made)."""


class _NewFileWay:
    """How a ``LocalOps`` makes a new file: a nameless ``O_TMPFILE`` inode linked into place
    (one directory change), or a named temp file linked or renamed into place (three or two).

    Which is faster depends on the kernel and the filesystem, by a wide margin: on one host's
    ext4 nameless files were 4-7x slower (each one goes on the filesystem's orphan list and
    off it again at the link, journaled where ext4 has a journal and no ``orphan_file``), on
    another 1.3x faster (tmpfs 1.1-1.6x faster on both). So the first ``TRIAL_FILES`` new
    files of each way alternate and are timed, and the way with the lower median is kept."""

    __slots__ = ("flag", "root", "times")

    def __init__(self, flag: int, root: str) -> None:
        self.flag = flag  # O_TMPFILE, or 0: named temp files only
        self.root = root
        self.times: tuple[list[float], list[float]] | None = (
            ([], []) if flag and TRIAL_FILES else None
        )

    def unnamed(self) -> bool:
        """Whether the next new file is made nameless."""
        times = self.times
        if times is None:
            return self.flag != 0
        return len(times[0]) <= len(times[1])

    def took(self, unnamed: bool, seconds: float) -> None:
        times = self.times
        if times is None:
            return
        side = times[0 if unnamed else 1]
        if len(side) < TRIAL_FILES:  # bounded while the other way waits for its files
            side.append(seconds)
        if min(len(times[0]), len(times[1])) >= TRIAL_FILES:
            self.times = None
            nameless, named = statistics.median(times[0]), statistics.median(times[1])
            if nameless > named:
                self.flag = 0
            log.debug(
                "new files under %s: %s (median %.0f us nameless, %.0f us named)",
                self.root,
                "O_TMPFILE" if self.flag else "named temp files",
                nameless * 1e6,
                named * 1e6,
            )

    def refused(self) -> None:
        self.flag = 0
        self.times = None


class LocalOps:
    """A local directory through os calls (inline, or one worker thread per program).
    Implements ``LocalOnlyOps`` (and so ``Ops``)."""

    def __init__(self, root: str, *, fsync: bool = False) -> None:
        self.root = root
        self._prefix = root.rstrip(os.sep) + os.sep
        self.fsync = fsync
        self._link_ok = True
        self._xattr_ok = hasattr(os, "setxattr")
        # Not a constant: the fault suite removes it to test the named-temp-file path.
        self._way = _NewFileWay(
            getattr(os, "O_TMPFILE", 0) if os.path.isdir("/proc/self/fd") else 0, self.root
        )

    @property
    def links_work(self) -> bool:
        """False once a hard link was refused here (some FUSE, SMB, FAT mounts)."""
        return self._link_ok

    def _path(self, key: str) -> str:
        return f"{self._prefix}{key}"  # keys are relative and validated: no join needed

    def _tmp_write(self, path: str, data: bytes) -> str:
        directory = os.path.dirname(path)
        tmp = os.path.join(directory, f".tmp-{uuid.uuid4().hex}")
        for attempt in range(3):
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                break
            except FileNotFoundError:
                if attempt == 2:
                    raise
                # Missing, or an empty directory removed by a concurrent cleanup just now.
                os.makedirs(directory, exist_ok=True)
        try:
            self._write_all(fd, data)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        return tmp

    def _write_all(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if self.fsync:
            os.fsync(fd)

    def read(self, key: str) -> bytes | None:
        # os calls, not open(): three syscalls for a small file instead of about seven.
        try:
            fd = os.open(self._path(key), os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            data = os.read(fd, _CHUNK)
            if len(data) < _CHUNK:  # a short read of a regular file is its end
                return data
            parts = [data]
            while chunk := os.read(fd, _CHUNK):
                parts.append(chunk)
            return b"".join(parts)
        finally:
            os.close(fd)

    def read_many(self, keys: list[str]) -> dict[str, bytes | None]:
        return {key: self.read(key) for key in keys}

    def write(self, key: str, data: bytes) -> None:
        path = self._path(key)
        way = self._way
        if self._link_ok and way.unnamed():
            start = time.perf_counter()
            if self._write_unnamed(path, data):
                way.took(True, time.perf_counter() - start)
                return
        start = time.perf_counter()
        tmp = self._tmp_write(path, data)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
        way.took(False, time.perf_counter() - start)

    def _write_unnamed(self, path: str, data: bytes) -> bool:
        """``write`` through an ``O_TMPFILE`` inode; False where one is refused. A new name
        (the common case) is one directory change; an existing one is replaced by the same
        inode linked to a temp name and renamed over it."""
        fd = self._open_unnamed(os.path.dirname(path), data)
        if fd is None:
            return False
        try:
            made = self._link_unnamed(fd, path)
            if made is False:
                tmp = os.path.join(os.path.dirname(path), f".tmp-{uuid.uuid4().hex}")
                made = self._link_unnamed(fd, tmp)
                if made:
                    try:
                        os.replace(tmp, path)
                    except BaseException:
                        os.unlink(tmp)
                        raise
            return bool(made)
        finally:
            os.close(fd)

    def create(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        if not self._link_ok:
            return self._create_excl(path, data)
        way = self._way
        if way.unnamed():
            start = time.perf_counter()
            fd = self._open_unnamed(os.path.dirname(path), data)
            if fd is not None:
                try:
                    made = self._link_unnamed(fd, path)
                finally:
                    os.close(fd)
                if made is not None:
                    way.took(True, time.perf_counter() - start)
                    return made
        start = time.perf_counter()
        tmp = self._tmp_write(path, data)
        try:
            os.link(tmp, path)
            way.took(False, time.perf_counter() - start)
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            log.info("hard links unsupported under %s; using O_EXCL create", self.root)
            self._link_ok = False
            self._way.refused()  # a nameless file could not be linked in either
            return self._create_excl(path, data)
        finally:
            os.unlink(tmp)

    def _open_unnamed(self, directory: str, data: bytes) -> int | None:
        """An ``O_TMPFILE`` inode in ``directory`` holding ``data``, open; None where this
        filesystem (or kernel) refuses one, which is then not tried again."""
        tries = 0
        while True:
            try:
                fd = os.open(directory, self._way.flag | os.O_WRONLY, 0o666)
                break
            except FileNotFoundError:
                tries += 1
                if tries == 3:
                    raise
                os.makedirs(directory, exist_ok=True)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    raise
                self._no_tmpfile(exc)
                return None
        try:
            self._write_all(fd, data)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _link_unnamed(self, fd: int, path: str) -> bool | None:
        """Give the open ``O_TMPFILE`` inode ``fd`` the name ``path``: True, or False if the
        name exists (``link`` is exclusive); None where such links are refused here."""
        tries = 0
        while True:
            try:
                # An absolute source ignores src_dir_fd; giving one makes Python call
                # linkat(AT_SYMLINK_FOLLOW) (plain link(2) would not follow /proc's link).
                os.link(f"/proc/self/fd/{fd}", path, src_dir_fd=fd, follow_symlinks=True)
                return True
            except FileExistsError:
                return False
            except FileNotFoundError:
                # The directory holds no name of ours until the link, so a clean-up may
                # remove it as empty meanwhile; the inode can go into a new one.
                tries += 1
                if tries == 3:
                    raise
                os.makedirs(os.path.dirname(path), exist_ok=True)
            except OSError as exc:
                if exc.errno not in _NO_LINK:
                    raise
                self._no_tmpfile(exc)
                return None

    def _no_tmpfile(self, exc: OSError) -> None:
        log.info("O_TMPFILE refused under %s (%s); using named temp files", self.root, exc)
        self._way.refused()

    def create_many(self, items: list[tuple[str, bytes]]) -> list[bool]:
        return [self.create(key, data) for key, data in items]

    def mark(self, key: str, data: bytes) -> None:
        # In place: no new file (a create costs far more than a write on some disks). A
        # reader may see the file empty for an instant; callers only mark with tiny states.
        try:
            fd = os.open(self._path(key), os.O_WRONLY | os.O_TRUNC)
        except FileNotFoundError:
            self.write(key, data)
            return
        try:
            os.write(fd, data)
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def take(self, src: str, dst: str, mtime: float, owner: str, min_size: int = 0) -> TakeResult:
        """Claim ``src`` as ``dst`` without creating a file: stamp ``mtime`` on it, hard-link
        it to ``dst`` (exclusive like ``O_EXCL``: EEXIST means another claim exists), unlink
        ``src``, stamp ``mtime`` again if it was replaced meanwhile, then ``owner`` (an
        extended attribute, where supported). Returns ``TAKEN`` with the inode number on
        success -- also when the clean-up after the link fails (the claim is won; a leftover
        ``src`` is dropped by its next claimer); ``EXISTS`` if ``dst`` exists or the file is
        smaller than ``min_size``; ``GONE`` if ``src`` is gone; ``REFUSED`` if this file
        cannot be taken here (owned by another user, links refused): the caller then claims
        another way."""
        source, target = self._path(src), self._path(dst)
        stamp = round(mtime * 1e9)
        try:
            if os.stat(source).st_nlink > 1 and os.path.exists(target):
                # Already taken (a claimer died between its link and its unlink): do not stamp
                # it, which would extend that orphaned claim's lease.
                return _EXISTS
            # Before the link, so the claim never exists without a lease.
            os.utime(source, ns=(stamp, stamp))
        except FileNotFoundError:
            return _GONE
        except PermissionError:  # only a file's owner may set its times
            return _REFUSED
        for attempt in range(2):
            try:
                os.link(source, target)
                break
            except FileExistsError:
                return _EXISTS
            except FileNotFoundError:
                if attempt or not os.path.exists(source):
                    return _GONE
                os.makedirs(os.path.dirname(target), exist_ok=True)
            except OSError as exc:
                if exc.errno in _NO_LINK:  # protected_hardlinks, EXDEV, FUSE/SMB mounts
                    return _REFUSED
                raise
        try:
            self.delete(src)
        except OSError as exc:  # the claim is won: keep it
            log.warning("claimed %s, but removing its ready name failed: %s", dst, exc)
        st = os.stat(target)
        if st.st_mtime_ns != stamp:
            # Once more, now that no new claimer can reach the file by its ready name: a
            # loser of the race stamped its own lease between our stamp and unlink (or the
            # filesystem keeps coarser times). Looked at first, after the unlink: the stat is
            # needed anyway, a stamp is a write. (A loser's stamp already under way can still
            # land after this, as it could after an unconditional second stamp.)
            try:
                os.utime(target, ns=(stamp, stamp))
            except OSError as exc:  # the claim is won: keep it
                log.warning("claimed %s, but stamping its lease failed: %s", dst, exc)
        if st.st_size < min_size:
            return _EXISTS
        if self._xattr_ok:
            try:
                os.setxattr(target, _OWNER_XATTR, owner.encode())
            except OSError:  # ENOTSUP, EPERM, ENOSPC: the owner is informational only
                self._xattr_ok = False
        return TakeResult(TakeStatus.TAKEN, st.st_ino)

    def link(self, src: str, dst: str, mtime: float | None = None) -> bool | None:
        """Hard-link ``src`` to ``dst`` (exclusive like ``O_EXCL``; ``dst``'s directory is made
        if missing), then stamp ``mtime`` (if given) on the file: a new name without a new
        file. True if linked; False if ``dst`` exists; None if ``src`` is gone or links are
        refused here (the caller creates instead)."""
        if not self._link_ok:
            return None
        source, target = self._path(src), self._path(dst)
        for attempt in range(2):
            try:
                os.link(source, target)
                break
            except FileExistsError:
                return False
            except FileNotFoundError:
                # The source is gone, or the target's directory does not exist yet (an
                # event index's first entry for a task): make it, once, if the source is here.
                if attempt or not os.path.exists(source):
                    return None
                os.makedirs(os.path.dirname(target), exist_ok=True)
            except OSError as exc:
                if exc.errno in _NO_LINK:
                    return None
                raise
        if mtime is None:
            return True
        try:
            os.utime(target, (mtime, mtime))
        except OSError as exc:  # the name is made; its time only starts the clean-up clock
            log.warning("linked %s, but stamping its time failed: %s", dst, exc)
        return True

    def stat(self, key: str) -> Stat | None:
        try:
            st = os.stat(self._path(key))
        except (FileNotFoundError, NotADirectoryError):
            return None
        return Stat(st.st_size, st.st_mtime, st.st_ino)

    def owner(self, key: str) -> str | None:
        """The owner stamped by ``take``, if the filesystem kept it."""
        if not self._xattr_ok:
            return None
        try:
            return os.getxattr(self._path(key), _OWNER_XATTR).decode(errors="replace")
        except OSError:
            return None

    def touch(self, key: str, mtime: float) -> bool:
        """Set the modification time of ``key``; False if it does not exist."""
        try:
            os.utime(self._path(key), (mtime, mtime))
            return True
        except FileNotFoundError:
            return False

    def _create_excl(self, path: str, data: bytes) -> bool:
        """Exclusive create without hard links: ``O_EXCL`` on a hidden lock name decides,
        then the complete file is renamed into place, so no reader ever sees it half
        written. The lock stays as long as the file (``delete`` removes both)."""
        lock = _lock_name(path)
        for attempt in range(2):
            try:
                os.close(os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
                break
            except FileExistsError:
                return False
            except FileNotFoundError:
                if attempt:
                    raise
                os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            tmp = self._tmp_write(path, data)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(lock)
            raise
        return True

    def delete(self, key: str) -> bool:
        path = self._path(key)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        if not self._link_ok:  # the lock of a file made by _create_excl, after the file
            try:
                os.unlink(_lock_name(path))
            except FileNotFoundError:
                pass
        return True

    def delete_many(self, keys: list[str]) -> None:
        for key in keys:
            self.delete(key)

    def _files(self, prefix: str) -> Iterator[os.DirEntry[str]]:
        """The visible files directly under ``prefix`` as the scan finds them (none if it
        does not exist); entries that vanish while scanned are skipped."""
        try:
            with os.scandir(self._path(prefix)) as it:
                for entry in it:
                    if entry.name.startswith("."):
                        continue
                    try:
                        if entry.is_file():
                            yield entry
                    except FileNotFoundError:
                        continue
        except (FileNotFoundError, NotADirectoryError):
            return

    @staticmethod
    def _stat(entry: os.DirEntry[str]) -> Entry | None:
        try:
            st = entry.stat()
        except FileNotFoundError:
            return None
        return _entry(entry.name, st.st_size, st.st_mtime)

    def _names(self, prefix: str, keep: Callable[[str], bool] | None = None) -> list[str]:
        """The names of ``_files(prefix)`` (that ``keep`` accepts), unsorted, in one
        comprehension: a group of the event index holds hundreds of entries, and the
        generator's steps cost ~0.2 us an entry more on ext4 (a third of the scan's own
        cost). With ``keep``, names alone are listed and only the kept are looked at: a
        query by task keeps a few of a group's hundreds, and an entry object for each costs
        about as much as the listing (285 names on ext4: 0.10 ms listed, 0.15 ms scanned)."""
        directory = self._path(prefix)
        if keep is not None:
            try:
                names = os.listdir(directory)
            except (FileNotFoundError, NotADirectoryError):
                return []
            isfile, join = os.path.isfile, os.path.join
            return [n for n in names if n[0] != "." and keep(n) and isfile(join(directory, n))]
        try:
            it = os.scandir(directory)
        except (FileNotFoundError, NotADirectoryError):
            return []
        with it:
            try:
                return [e.name for e in it if e.name[0] != "." and e.is_file()]
            except OSError:  # an entry gone while its type was looked up: the careful way
                pass
        return [e.name for e in self._files(prefix)]

    def listdir(
        self, prefix: str, detail: bool, keep: Callable[[Any], bool] | None = None
    ) -> list[Any]:
        if not detail:
            names = self._names(prefix, keep)
            names.sort()
            return names
        items = (self._stat(e) for e in self._files(prefix))
        return sorted(i for i in items if i is not None and (keep is None or keep(i)))

    def count(self, prefix: str, min_size: int = 0, skip: Collection[str] = ()) -> int:
        if not min_size:
            return sum(1 for e in self._files(prefix) if e.name not in skip)
        items = (self._stat(e) for e in self._files(prefix) if e.name not in skip)
        return sum(1 for i in items if i is not None and i.size >= min_size)

    def listhead(self, prefix: str, limit: int) -> list[str]:
        # The smallest names without sorting the whole directory listing; the names come
        # from one comprehension (a ready directory 20,000 deep on tmpfs: 13.0 -> 10.5 ms).
        return heapq.nsmallest(limit, self._names(prefix))

    def listafter(self, prefix: str, after: str, limit: int) -> list[str]:
        return heapq.nsmallest(limit, [n for n in self._names(prefix) if n > after])

    def sweep_temp(self, prefix: str, before: float) -> list[str]:
        """Delete the temporary files (``.tmp-*``) under ``prefix``, at any depth, last written
        before ``before``: what a process killed between write and rename left behind. Returns
        their keys."""
        top = self._path(prefix.strip("/")) if prefix.strip("/") else self.root
        removed = []
        for directory, _, files in os.walk(top):
            for name in files:
                if not name.startswith(".tmp-"):
                    continue
                path = os.path.join(directory, name)
                try:
                    if os.lstat(path).st_mtime >= before:
                        continue
                    os.unlink(path)
                except FileNotFoundError:  # renamed or removed by its writer just now
                    continue
                removed.append(os.path.relpath(path, self.root).replace(os.sep, "/"))
        return removed

    def listdirs(self, prefix: str) -> list[str]:
        try:
            with os.scandir(self._path(prefix)) as it:
                return sorted(e.name for e in it if not e.name.startswith(".") and e.is_dir())
        except (FileNotFoundError, NotADirectoryError):
            return []

    def listtree(self, prefix: str, limit: int) -> list[str]:
        out: list[str] = []
        for sub in self.listdirs(prefix):
            out += [f"{sub}/{n}" for n in self.listhead(f"{prefix}/{sub}", limit - len(out))]
            if len(out) >= limit:
                break
        return out

    def exists(self, key: str) -> bool:
        return os.path.exists(self._path(key))

    def remove_dir(self, prefix: str) -> bool:
        if not prefix.strip("/"):
            return False  # never the root itself
        try:
            os.rmdir(self._path(prefix))
            return True
        except OSError:  # absent, not empty (files or an in-flight temp file), not a directory
            return False
