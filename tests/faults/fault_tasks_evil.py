"""A module no allow-listed worker may import: importing it leaves a mark."""

from __future__ import annotations

import os

_MARK = os.environ.get("OMNIQ_FAULT_EVIL_MARK")
if _MARK:
    with open(_MARK, "a") as _f:
        _f.write(f"imported by {os.getpid()}\n")


def boom() -> str:
    return "this must never run"
