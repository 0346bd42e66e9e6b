"""The file storages under one name: ``from omniq.storage.file import AsyncFileQueue``.

``omniq.storage.file`` is shared by three distributions, each shipping one subpackage:
omniq-file-queue (``.queue``), omniq-file-results (``.results``) and omniq-file-events
(``.events``). This module, shipped by omniq-core (which each of them depends on), re-exports
their classes lazily: a name resolves to the very object of its own module
(``omniq.storage.file.queue.AsyncFileQueue``), and a name whose distribution is not
installed raises an ``ImportError`` naming the distribution to install.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# pkgutil-style namespace: the subpackages of the other distributions may sit in other
# directories of sys.path (editable installs put each distribution's src/ there). This exact
# spelling is also what documentation tools (griffe) recognise.
__path__ = __import__("pkgutil").extend_path(__path__, __name__)

if TYPE_CHECKING:
    from omniq.storage.file.events import AsyncFileEventStorage, FileEventStorage
    from omniq.storage.file.queue import AsyncFileQueue, FileQueue
    from omniq.storage.file.results import AsyncFileResultStorage, FileResultStorage

#: name -> (module that defines it, distribution that ships that module)
_PROVIDERS: dict[str, tuple[str, str]] = {
    "AsyncFileQueue": ("omniq.storage.file.queue", "omniq-file-queue"),
    "FileQueue": ("omniq.storage.file.queue", "omniq-file-queue"),
    "AsyncFileResultStorage": ("omniq.storage.file.results", "omniq-file-results"),
    "FileResultStorage": ("omniq.storage.file.results", "omniq-file-results"),
    "AsyncFileEventStorage": ("omniq.storage.file.events", "omniq-file-events"),
    "FileEventStorage": ("omniq.storage.file.events", "omniq-file-events"),
}

__all__ = [
    "AsyncFileQueue",
    "FileQueue",
    "AsyncFileResultStorage",
    "FileResultStorage",
    "AsyncFileEventStorage",
    "FileEventStorage",
]


def __getattr__(name: str) -> Any:
    try:
        module_name, dist = _PROVIDERS[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if not (module_name == missing or module_name.startswith(missing + ".")):
            raise  # the subpackage is there but one of its own imports is missing
        raise ImportError(
            f"cannot import name {name!r} from {__name__!r}: it is provided by the "
            f"distribution {dist}, which is not installed (install {dist}: "
            f"pip install {dist})",
            name=module_name,
        ) from exc
    value = getattr(module, name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
