"""Task functions of tests/test_dependencies.py: each leaves ``{log}/{name}.done`` when it
finishes and ``{log}/{name}.early`` if it started before one of its dependencies finished."""

from __future__ import annotations

import os
import time


def step(log: str, name: str, deps: list[str]) -> str:
    missing = [d for d in deps if not os.path.exists(os.path.join(log, f"{d}.done"))]
    if missing:
        with open(os.path.join(log, f"{name}.early"), "w") as file:
            file.write(",".join(missing))
    time.sleep(0.01)
    with open(os.path.join(log, f"{name}.done"), "w") as file:
        file.write(str(time.time()))
    return name


def fail(log: str, name: str) -> None:
    with open(os.path.join(log, f"{name}.failed"), "w") as file:
        file.write(str(time.time()))
    raise RuntimeError(f"{name} fails on purpose")
