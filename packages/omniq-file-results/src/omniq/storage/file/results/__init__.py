"""OmniQ's file result storage: ``AsyncFileResultStorage`` and its blocking twin
``FileResultStorage``."""

from __future__ import annotations

import os
from typing import Any

from omniq.core.sync import SyncWrapper, blocking

from ._results import DEFAULT_TTL, AsyncFileResultStorage, NewerSchemaError

__version__ = "0.1.0"


class FileResultStorage(SyncWrapper[AsyncFileResultStorage]):
    """Blocking twin of :class:`AsyncFileResultStorage` (same arguments, same method names).

    Safe from many threads; raises AsyncContextError if called inside a running event loop.
    """

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        storage_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(AsyncFileResultStorage(base_dir, storage_options, **kwargs))

    set = blocking(AsyncFileResultStorage.set)
    get = blocking(AsyncFileResultStorage.get)
    wait = blocking(AsyncFileResultStorage.wait)
    delete = blocking(AsyncFileResultStorage.delete)
    list = blocking(AsyncFileResultStorage.list)
    cleanup_expired = blocking(AsyncFileResultStorage.cleanup_expired)


__all__ = ["DEFAULT_TTL", "AsyncFileResultStorage", "FileResultStorage", "NewerSchemaError"]
