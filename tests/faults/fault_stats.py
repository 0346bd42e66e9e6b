"""Counters of the fault suite, printed in the test session's summary.

Tests add to them as they go; the session summary (``tests/conftest.py``, which pytest-xdist's
controller always loads, unlike this directory's conftest) prints the totals, so a run shows
how much chaos it really caused (not just that it passed). Under pytest-xdist each worker
hands its ``export()`` to the controller, which ``merge``s them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

COUNTS: Counter[str] = Counter()

#: Printed in this order (others after them).
ORDER = (
    "worker SIGKILLs",
    "crash points (process died mid-operation)",
    "injected storage faults",
    "emulator outages",
    "bad inputs tried",
    "corrupt files dropped",
    "task re-runs after a kill",
)


def add(name: str, n: int = 1) -> None:
    COUNTS[name] += n


def export() -> dict[str, int]:
    """The counters as a JSON-able dict (for pytest-xdist's ``workeroutput``)."""
    return dict(COUNTS)


def merge(counts: Mapping[str, int]) -> None:
    """Add another process's ``export()`` to the counters."""
    COUNTS.update(counts)


def summary_lines() -> list[str]:
    """``name: total`` lines of the "fault suite" section; none if nothing was counted."""
    names = [n for n in ORDER if n in COUNTS] + sorted(n for n in COUNTS if n not in ORDER)
    return [f"{name}: {COUNTS[name]}" for name in names]
