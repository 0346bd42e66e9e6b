"""OmniQ's file result storage: ``AsyncFileResultStorage`` and its blocking twin
``FileResultStorage``."""

from __future__ import annotations

from omniq.core.sync import StorageTwin, blocking

from ._results import DEFAULT_TTL, AsyncFileResultStorage, NewerSchemaError

__version__ = "0.1.0"  # the only copy (pyproject: dynamic); change it with tools/bump.py


class FileResultStorage(StorageTwin[AsyncFileResultStorage]):
    """Blocking twin of :class:`AsyncFileResultStorage` (same arguments, same method names).

    ``close()`` (and leaving a ``with`` block) writes the buffered expiry markers.
    """

    async_class = AsyncFileResultStorage

    set = blocking(AsyncFileResultStorage.set)
    get = blocking(AsyncFileResultStorage.get)
    wait = blocking(AsyncFileResultStorage.wait)
    delete = blocking(AsyncFileResultStorage.delete)
    list = blocking(AsyncFileResultStorage.list)
    cleanup_expired = blocking(AsyncFileResultStorage.cleanup_expired)
    maintain = blocking(AsyncFileResultStorage.maintain)
    flush = blocking(AsyncFileResultStorage.flush)


__all__ = ["DEFAULT_TTL", "AsyncFileResultStorage", "FileResultStorage", "NewerSchemaError"]
