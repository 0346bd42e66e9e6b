"""A pytest plugin for testing code that enqueues OmniQ tasks (docs/testing.md).

Installed with omniq-backend-file and loaded by pytest on its own (the ``pytest11`` entry
point ``omniq``). Fixtures, each a fresh backend on its own ``memory://`` directory, removed
after the test:

* ``omniq_backend``: a :class:`~omniq.backend.file.FileBackend` (events on). Enqueue, then
  ``omniq_backend.drain()`` runs the tasks here; results and events are then readable.
* ``async_omniq_backend``: the same as an :class:`~omniq.backend.file.AsyncFileBackend`, for
  async tests under any runner (anyio, pytest-asyncio, trio).

``@pytest.mark.omniq(immediate=True, ...)`` on a test passes backend settings to both, e.g.
``immediate=True`` to run each task inside ``enqueue``, ``events=False``, ``max_retries=2``.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from omniq.backend.file import AsyncFileBackend, FileBackend

#: Settings of every fixture backend unless the ``omniq`` marker says otherwise.
DEFAULT_SETTINGS: dict[str, Any] = {"events": True}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "omniq(**settings): backend settings for the omniq_backend / async_omniq_backend "
        "fixtures, e.g. immediate=True (omniq.backend.file.testing)",
    )


def _settings(request: pytest.FixtureRequest) -> dict[str, Any]:
    settings = dict(DEFAULT_SETTINGS)
    for marker in reversed(list(request.node.iter_markers("omniq"))):  # closest wins
        if marker.args:
            raise pytest.UsageError("@pytest.mark.omniq takes keyword arguments only")
        settings.update(marker.kwargs)
    return settings


@contextlib.contextmanager
def _fresh_base_dir() -> Iterator[str]:
    import fsspec

    path = f"/omniq-test/{uuid.uuid4().hex}"
    try:
        yield f"memory://{path}"
    finally:
        fs = fsspec.filesystem("memory")
        if fs.exists(path):
            fs.rm(path, recursive=True)


@pytest.fixture
def omniq_backend(request: pytest.FixtureRequest) -> Iterator[FileBackend]:
    """A fresh blocking backend on ``memory://`` for this test (see the module docstring)."""
    from omniq.backend.file import FileBackend

    with _fresh_base_dir() as base_dir, FileBackend(base_dir, **_settings(request)) as backend:
        yield backend


@pytest.fixture
def async_omniq_backend(request: pytest.FixtureRequest) -> Iterator[AsyncFileBackend]:
    """A fresh async backend on ``memory://`` for this test (see the module docstring).

    A plain fixture, so it works under any async test runner: the memory store holds no
    connection to close, and the test's directory is removed afterwards."""
    from omniq.backend.file import AsyncFileBackend

    with _fresh_base_dir() as base_dir:
        yield AsyncFileBackend(base_dir, **_settings(request))
