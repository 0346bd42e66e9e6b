"""Key layout of one queue under ``base_dir`` (see the README's "Layout" section).

::

    {queue}/ready/p{rank:04d}/{id}.{attempt}.json   ready task (body); rank 0 = priority 999
    {queue}/sched/{id}.{attempt}.json               delayed or retrying task (body)
    {queue}/due/{eta_ms:013d}.{rank:04d}.{id}.{attempt}   empty marker, sorted by due time
    {queue}/run/{id}.{attempt}.json                 claim of that attempt (exclusive create,
                                                    locally a hard link of the ready file):
                                                    lease + body while running, then a short
                                                    tombstone ("done", "retried", ...)
    {queue}/dead/{id}.json                          dead-lettered task with its last error
    {queue}/cancel/{id}                             cancel request for a running task
    {queue}/quarantine/{area}.{name}.{time}         unreadable files, moved aside
"""

from __future__ import annotations

from datetime import datetime
from typing import NamedTuple

from omniq.core import codec
from omniq.core.errors import SerializationError
from omniq.core.models import MAX_PRIORITY, UTC, Claimed, Task

TOMBSTONE_MAX = 16
"""A claim file this small is a tombstone (the attempt is over), not a live lease."""

DONE, RETRIED, DEAD, LOST, RELEASED, CANCELLED, EXPIRED = (
    b"done",
    b"retried",
    b"dead",
    b"lost",
    b"released",
    b"cancelled",
    b"expired",
)

TOMBSTONES = frozenset((DONE, RETRIED, DEAD, LOST, RELEASED, CANCELLED, EXPIRED))

_CROCKFORD = {c: i for i, c in enumerate("0123456789ABCDEFGHJKMNPQRSTVWXYZ")}


def rank(priority: int) -> str:
    return f"p{MAX_PRIORITY - priority:04d}"


def ready_key(queue: str, priority: int, task_id: str, attempt: int) -> str:
    return f"{queue}/ready/{rank(priority)}/{task_id}.{attempt}.json"


def sched_key(queue: str, task_id: str, attempt: int) -> str:
    return f"{queue}/sched/{task_id}.{attempt}.json"


def due_key(queue: str, eta_ms: int, priority: int, task_id: str, attempt: int) -> str:
    return f"{queue}/due/{eta_ms:013d}.{MAX_PRIORITY - priority:04d}.{task_id}.{attempt}"


def run_key(queue: str, task_id: str, attempt: int) -> str:
    return f"{queue}/run/{task_id}.{attempt}.json"


def dead_key(queue: str, task_id: str) -> str:
    return f"{queue}/dead/{task_id}.json"


def cancel_key(queue: str, task_id: str) -> str:
    return f"{queue}/cancel/{task_id}"


class Candidate(NamedTuple):
    """A claimable entry found by a listing, ordered by (rank, time, id)."""

    rank: int
    time_ms: int
    task_id: str
    attempt: int
    key: str  # the entry holding the body
    marker: str | None  # due marker to remove with it (scheduled tasks)


def split_id_attempt(stem: str) -> tuple[str, int] | None:
    """``"ID.3"`` -> ("ID", 3); None if malformed."""
    task_id, _, attempt = stem.rpartition(".")
    if not task_id or not attempt.isdigit():
        return None
    return task_id, int(attempt)


def id_time_ms(task_id: str) -> int:
    """Creation time carried by an OmniQ id (0 for ids supplied by users)."""
    if len(task_id) != 26:
        return 0
    value = 0
    for char in task_id[:10]:
        digit = _CROCKFORD.get(char)
        if digit is None:
            return 0
        value = value * 32 + digit
    return value


def ready_candidate(queue: str, rank_dir: str, name: str) -> Candidate | None:
    if not name.endswith(".json") or not rank_dir[1:].isdigit():
        return None
    parsed = split_id_attempt(name[:-5])
    if parsed is None:
        return None
    task_id, attempt = parsed
    return Candidate(
        int(rank_dir[1:]),
        id_time_ms(task_id),
        task_id,
        attempt,
        f"{queue}/ready/{rank_dir}/{name}",
        None,
    )


def due_candidate(queue: str, name: str) -> Candidate | None:
    eta, _, rest = name.partition(".")
    rank_text, _, stem = rest.partition(".")
    parsed = split_id_attempt(stem)
    if parsed is None or not eta.isdigit() or not rank_text.isdigit():
        return None
    task_id, attempt = parsed
    return Candidate(
        int(rank_text),
        int(eta),
        task_id,
        attempt,
        sched_key(queue, task_id, attempt),
        f"{queue}/due/{name}",
    )


INODE_TOKEN = "ino:"
"""Token prefix of a claim made by taking the ready file itself (locally)."""


def as_claim(data: bytes, mtime: float, queue: str, key: str) -> Claimed | None:
    """A claim file as a Claimed: a claim document, or a taken ready file (the task itself,
    its lease end in ``mtime``). None if it is neither, or does not match its name."""
    try:
        return codec.decode(data, Claimed)
    except SerializationError:
        pass
    try:
        task = codec.decode(data, Task)
    except SerializationError:
        return None
    name = key.rsplit("/", 1)[-1]
    if task.queue != queue or name != f"{task.id}.{task.attempt}.json":
        return None
    return Claimed(
        task=task,
        attempt=task.attempt,
        lease_until=datetime.fromtimestamp(mtime, UTC),
        worker_id="",
        token="",
        claimed_at=datetime.fromtimestamp(mtime, UTC),
    )
