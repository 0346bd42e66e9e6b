"""Sharded queues: one queue name spread over several storage queues.

A store limits the write rate of one key range (S3 about 3,500 writes a second a prefix until
it splits it; GCS about 1,000 a bucket until it scales), and a queue writes its new keys at
the end of its own range (ids are time-ordered): one queue is bounded by one range's rate
(docs/costs.md). A queue configured with ``n`` shards stores each task in the queue
``{queue}.shard{k:03d}`` with ``k`` a hash of the task id, so its writes land in ``n`` ranges.

Each shard is a complete queue with its own claims, leases and outcomes: the attempt
protocol and its correctness argument are those of one queue, unchanged. What sharding
decides is only where a task is stored (by its id, so two enqueues of one id -- a schedule's
tick, a retried call -- meet in the same shard and the second one is refused there as
before) and which queues a name stands for when read (every shard, then the name itself,
which holds what was enqueued before the queue was sharded).
"""

from __future__ import annotations

import itertools
import random
import re
import time
import zlib
from collections.abc import Mapping

import msgspec

from omniq.core.errors import ConfigurationError
from omniq.core.models import Task
from omniq.core.names import MAX_NAME_LENGTH, validate_name

MAX_SHARDS = 256
_SUFFIX = ".shard"
_SHARD = re.compile(r"(.+)\.shard(\d{3})")


def shard_name(queue: str, k: int) -> str:
    """The storage queue of shard ``k`` of ``queue``."""
    return f"{queue}{_SUFFIX}{k:03d}"


def parse_shard(name: str) -> tuple[str, int] | None:
    """(queue, k) if ``name`` has the form of shard ``k`` of ``queue``, else None (by the
    name alone, whatever the shard settings)."""
    match = _SHARD.fullmatch(name)
    return None if match is None else (match[1], int(match[2]))


def shard_of(task_id: str, n: int) -> int:
    """The shard of ``task_id`` among ``n`` (CRC-32: the same in every process and version)."""
    return zlib.crc32(task_id.encode()) % n


class Shards:
    """The shard counts of the queues that have them; every other queue is one queue.

    ``period``: how long a consumer begins its claims at the same shard (the queue gives
    ten ``refresh_interval``s: a busy consumer's listing of a shard serves it that long)."""

    def __init__(self, counts: Mapping[str, int] | None = None, period: float = 1.0) -> None:
        self.counts: dict[str, int] = {}
        if counts is not None and not isinstance(counts, Mapping):
            raise ConfigurationError(
                f"shards must be a mapping of queue names to counts, not {counts!r}"
            )
        for queue, n in (counts or {}).items():
            validate_name(queue, "queue name")
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_SHARDS:
                raise ConfigurationError(
                    f"shards of queue {queue!r} must be an integer from 1 to {MAX_SHARDS}, "
                    f"not {n!r}"
                )
            if len(shard_name(queue, 0)) > MAX_NAME_LENGTH:
                raise ConfigurationError(
                    f"queue name {queue!r} is too long to be sharded (its shards' names would "
                    f"pass the {MAX_NAME_LENGTH}-character limit)"
                )
            if parse_shard(queue) is not None:
                raise ConfigurationError(f"{queue!r} is a shard's name; shard its queue instead")
            if n > 1:
                self.counts[queue] = n
        self.period = period
        self._offset = random.randrange(MAX_SHARDS)  # consumers start at different shards
        self._calls = itertools.count()  # period 0: the next shard at every call
        self._turn = 0
        self._base_looked: dict[str, int] = {}  # the turn whose first call began with it
        self._base_busy: dict[str, int] = {}  # the turn in which it gave a claim

    def route(self, task: Task) -> Task:
        """``task`` in the shard its id falls in (unchanged if its queue has no shards). A
        shard's name counts as its queue's (a task re-enqueued to its own ``ctx.queue``)."""
        queue = self.collapse([task.queue])[0]
        n = self.counts.get(queue)
        if n is None:
            return task
        return msgspec.structs.replace(task, queue=shard_name(queue, shard_of(task.id, n)))

    def queues(self, queue: str, task_id: str | None = None) -> list[str]:
        """The storage queues ``queue`` (validated; None is refused) stands for: its shards
        (the one ``task_id`` falls in first), then the queue itself."""
        n = self.counts.get(validate_name(queue, "queue name"))
        if n is None:
            return [queue]
        return [*_ring(queue, n, 0 if task_id is None else shard_of(task_id, n)), queue]

    def claim_order(self, queues: list[str]) -> list[str]:
        """``queues`` with each sharded one replaced by its shards, then the queue itself.

        The queue itself (tasks stored before it was sharded, or by a process without the
        setting) comes first in the first call of each period, and in every call of a period
        in which it gave a claim; last otherwise: a busy consumer lists it once a period, and
        what it holds is never starved by busy shards.

        The first shard stays the same for ``period`` seconds, then moves to the next: a busy
        consumer keeps using its listing of one shard, as it does an unsharded queue's (16
        workers on 4 shards of one S3 queue sent 6.9 requests a task when every call began
        one shard further on, 6.6 with a new shard every second, 5.3 every ten seconds;
        unsharded 4.6-4.9). Each consumer starts at its own random shard, so that consumers
        are spread over the shards at any moment and each comes round to every shard every
        ``n`` periods; the shards after the first are tried when it has nothing."""
        if not self.counts:
            return queues
        turn = self._turn = self._offset + (
            int(time.monotonic() / self.period) if self.period > 0 else next(self._calls)
        )
        order: list[str] = []
        for queue in queues:
            n = self.counts.get(queue)
            if n is None:
                order.append(queue)
                continue
            shards = _ring(queue, n, turn)
            if self._base_looked.get(queue) != turn or self._base_busy.get(queue) == turn:
                self._base_looked[queue] = turn
                order += [queue, *shards]
            else:
                order += [*shards, queue]
        return order

    def claimed_from(self, queue: str) -> None:
        """A claim came from storage queue ``queue``: if it is a sharded queue itself, it
        stays first for the rest of the period."""
        if queue in self.counts:
            self._base_busy[queue] = self._turn

    def sharded(self, name: str) -> tuple[str, int] | None:
        """The sharded queue and its shard count if storage queue ``name`` is one of its
        shards or the queue itself, else None."""
        shard = parse_shard(name)
        if shard is not None and shard[1] < self.counts.get(shard[0], 0):
            name = shard[0]
        n = self.counts.get(name)
        return None if n is None else (name, n)

    def collapse(self, names: list[str]) -> list[str]:
        """Storage queue names with the shards of a sharded queue shown as that queue."""
        shown: list[str] = []
        for name in names:
            name = (self.sharded(name) or (name, 1))[0]
            if name not in shown:
                shown.append(name)
        return shown


def _ring(queue: str, n: int, start: int) -> list[str]:
    """The ``n`` shards of ``queue``, from shard ``start % n`` on."""
    return [shard_name(queue, (start + i) % n) for i in range(n)]
