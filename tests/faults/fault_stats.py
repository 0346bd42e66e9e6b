"""Counters of the fault suite, printed in the test session's summary (see conftest.py).

Tests add to them as they go; ``conftest.pytest_terminal_summary`` prints the totals, so a run
shows how much chaos it really caused (not just that it passed).
"""

from __future__ import annotations

from collections import Counter

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
