"""Task functions of the fault suite (imported by workers in tests and in subprocesses)."""

from __future__ import annotations

import os
import time

NOT_CALLABLE = 42


def record(tag: str, pause: float = 0.0) -> str:
    """Append ``tag pid time`` to ``$OMNIQ_FAULT_RECORDS/{pid}.log`` (one write(2), O_APPEND:
    a line is whole or absent even if the process is killed), then return ``tag``."""
    if pause:
        time.sleep(pause)
    line = f"{tag} {os.getpid()} {time.time():.6f}\n".encode()
    fd = os.open(
        os.path.join(os.environ["OMNIQ_FAULT_RECORDS"], f"{os.getpid()}.log"),
        os.O_WRONLY | os.O_APPEND | os.O_CREAT,
        0o644,
    )
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
    return tag


def echo(value: object) -> object:
    return value


def add(a: int, b: int) -> int:
    return a + b


def returns_set() -> object:
    return {1, 2, 3}


def returns_huge() -> str:
    return "x" * (9 * 1024 * 1024)


def fail(message: str) -> None:
    raise RuntimeError(message)
