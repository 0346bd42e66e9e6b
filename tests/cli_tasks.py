"""Task functions for tests/test_cli.py: the worker subprocess imports them (``--path tests``)."""

from __future__ import annotations

import os
import time


def add(a: int, b: int) -> int:
    return a + b


def boom(message: str = "boom") -> None:
    raise ValueError(message)


def flaky(marker: str) -> str:
    """Fails on the first attempt (creating ``marker``), succeeds on the next."""
    try:
        with open(marker, "x"):
            pass
    except FileExistsError:
        return "second time lucky"
    raise ConnectionError("first attempt fails")


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def pid() -> int:
    return os.getpid()
