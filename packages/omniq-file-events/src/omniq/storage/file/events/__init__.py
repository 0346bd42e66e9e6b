"""OmniQ's file event storage: ``AsyncFileEventStorage`` and its blocking twin
``FileEventStorage``."""

from __future__ import annotations

import os
from typing import Any

from omniq.core.sync import SyncWrapper, blocking

from ._events import AsyncFileEventStorage

__version__ = "0.1.0"


class FileEventStorage(SyncWrapper[AsyncFileEventStorage]):
    """Blocking twin of :class:`AsyncFileEventStorage` (same arguments, same method names).

    Safe from many threads; raises AsyncContextError if called inside a running event loop.
    """

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        storage_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(AsyncFileEventStorage(base_dir, storage_options, **kwargs))

    @property
    def written(self) -> int:
        """Events recorded through this object."""
        return self._async.written

    @property
    def failed_writes(self) -> int:
        """Events that could not be recorded (storage trouble)."""
        return self._async.failed_writes

    log = blocking(AsyncFileEventStorage.log)
    query = blocking(AsyncFileEventStorage.query)
    cleanup = blocking(AsyncFileEventStorage.cleanup)


__all__ = ["AsyncFileEventStorage", "FileEventStorage"]
