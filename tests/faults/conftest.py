"""Fixtures and reporting of the fault suite (tests/faults).

The shared storage fixtures live in ``tests/conftest.py``; this file only adds:

* ``faulty``: registers ``tools/faulty_fs.py``'s fault-injecting filesystem (protocol
  ``faulty``) and yields a factory of ``Faults`` whose injected counts go to the summary;
* ``records``: a directory where task functions append their per-run records;
* the counters of ``fault_stats.py`` (kills, crash points, injected faults, bad inputs) that
  tests add to; ``tests/conftest.py`` prints their "fault suite" section at the end of the
  session and, under pytest-xdist, merges the workers' counts on the controller (which does
  not load this file unless a path under tests/faults was named on the command line).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fault_stats
import pytest

_ROOT_CONFTEST = str(Path(__file__).resolve().parent.parent / "conftest.py")


def pytest_plugin_registered(plugin: Any, manager: Any) -> None:
    # pytest imports every conftest.py that is not in a package as the module "conftest", the
    # last one loaded winning in sys.modules. Keep that name bound to tests/conftest.py so that
    # `from conftest import StorageTarget` elsewhere still finds the shared one.
    if getattr(plugin, "__file__", None) == _ROOT_CONFTEST:
        _ROOT[0] = plugin
    root = _ROOT[0]
    if root is not None and sys.modules.get("conftest") is not root:
        sys.modules["conftest"] = root


_ROOT: list[Any] = [None]


@pytest.fixture
def faulty() -> Iterator[Callable[..., Any]]:
    """``faulty(rate=0.2, seed=..., ...)`` -> a ``faulty_fs.Faults``; the protocol is
    registered. Every fault injected through them is added to the session summary."""
    import faulty_fs

    faulty_fs.register()
    made: list[Any] = []

    def make(*args: Any, **kwargs: Any) -> Any:
        faults = faulty_fs.Faults(*args, **kwargs)
        made.append(faults)
        return faults

    yield make
    fault_stats.add("injected storage faults", sum(f.total for f in made))


@pytest.fixture
def records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Directory for ``fault_tasks_ok.record``'s per-run lines (also set for subprocesses)."""
    path = tmp_path / "records"
    path.mkdir()
    monkeypatch.setenv("OMNIQ_FAULT_RECORDS", str(path))
    return path
