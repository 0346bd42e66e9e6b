"""Wake-ups on new files in local directories: inotify on Linux, nothing elsewhere.

An idle consumer that polls sleeps up to its poll interval before it sees a new task; with a
watch it wakes when a file is created or renamed into a watched directory. The watch only
shortens waits -- callers still poll on a timer, so a missed event (a directory created
after the watch, a change made on another machine of an NFS mount, which inotify never
sees) costs one poll interval, never a task.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import sys

import anyio

log = logging.getLogger("omniq.storage")

_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = 0o2000000
_IN_MOVED_TO = 0x00000080
_IN_CREATE = 0x00000100


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.inotify_init1.argtypes = [ctypes.c_int]
        libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


class DirWatch:
    """Wakes a waiter when an entry is created in (or renamed into) any of ``dirs`` or in a
    directory created inside one of them later (``ready/`` gains priority directories).
    Directories that do not exist yet are watched from their nearest existing parent and
    picked up once they appear."""

    def __init__(self, fd: int, dirs: list[str]) -> None:
        self._fd = fd
        self._wanted = [os.path.abspath(d) for d in dirs]
        self._watched: dict[int, str] = {}
        self._arm()

    @classmethod
    def open(cls, dirs: list[str]) -> DirWatch | None:
        """A watch on ``dirs``, or None where the OS offers none (callers then poll)."""
        if _LIBC is None:
            return None
        fd = _LIBC.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            log.debug("inotify unavailable: %s", os.strerror(ctypes.get_errno()))
            return None
        return cls(fd, dirs)

    def _add(self, path: str) -> bool:
        assert _LIBC is not None
        wd = _LIBC.inotify_add_watch(self._fd, os.fsencode(path), _IN_CREATE | _IN_MOVED_TO)
        if wd < 0:
            return False
        self._watched[wd] = path
        return True

    def _arm(self) -> None:
        """Watch every wanted directory that exists and its subdirectories (priority
        directories appear at any time), else its nearest existing parent, whose events
        re-arm this. Runs after every read of events."""
        watching = set(self._watched.values())
        for path in self._wanted:
            if path in watching or self._add(path):
                try:
                    with os.scandir(path) as entries:
                        subdirs = [e.path for e in entries if e.is_dir(follow_symlinks=False)]
                except OSError:  # removed meanwhile: its parent's watch re-arms this
                    subdirs = []
                for sub in subdirs:
                    if sub not in watching:
                        self._add(sub)
                continue
            parent = os.path.dirname(path)
            while parent != os.path.dirname(parent) and not os.path.isdir(parent):
                parent = os.path.dirname(parent)
            if parent not in watching:
                self._add(parent)

    def _drain(self) -> bool:
        """Read pending events; True if there were any. What they were does not matter: the
        waiter looks at the directories anyway."""
        seen = False
        while True:
            try:
                os.read(self._fd, 65536)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                raise
            seen = True
        if seen:
            self._arm()
        return seen

    async def wait(self, timeout: float) -> bool:
        """Wait until something was created in a watched directory (True), or ``timeout``
        seconds passed (False). Events that arrived since the last wait count at once."""
        if self._drain():
            return True
        with anyio.move_on_after(timeout):
            await anyio.wait_readable(self._fd)
            self._drain()
            return True
        return False

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
