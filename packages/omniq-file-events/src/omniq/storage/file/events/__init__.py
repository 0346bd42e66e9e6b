"""OmniQ's file event storage: ``AsyncFileEventStorage`` and its blocking twin
``FileEventStorage``."""

from __future__ import annotations

from omniq.core.sync import StorageTwin, blocking

from ._events import AsyncFileEventStorage
from ._queries import Tail

__version__ = "0.1.0"  # the only copy (pyproject: dynamic); change it with tools/bump.py


class FileEventStorage(StorageTwin[AsyncFileEventStorage]):
    """Blocking twin of :class:`AsyncFileEventStorage` (same arguments, same method names)."""

    async_class = AsyncFileEventStorage

    @property
    def written(self) -> int:
        """Events recorded through this object."""
        return self._async.written

    @property
    def failed_writes(self) -> int:
        """Events that could not be recorded (storage trouble)."""
        return self._async.failed_writes

    @property
    def pending(self) -> int:
        """Events submitted but not written yet."""
        return self._async.pending

    log = blocking(AsyncFileEventStorage.log)
    log_many = blocking(AsyncFileEventStorage.log_many)
    submit = blocking(AsyncFileEventStorage.submit)
    flush = blocking(AsyncFileEventStorage.flush)
    query = blocking(AsyncFileEventStorage.query)
    tail = blocking(AsyncFileEventStorage.tail)
    cleanup = blocking(AsyncFileEventStorage.cleanup)
    maintain = blocking(AsyncFileEventStorage.maintain)


__all__ = ["AsyncFileEventStorage", "FileEventStorage", "Tail"]
