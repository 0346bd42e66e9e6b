"""A task module that fails while it is imported (not with ImportError)."""

from __future__ import annotations

raise RuntimeError("fault_tasks_broken fails at import on purpose")


def never() -> None:  # pragma: no cover - unreachable
    pass
