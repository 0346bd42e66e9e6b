"""Leases of a file queue: ack, nack, release, extend_lease and the reaper that takes over
expired claims. Mixed into ``AsyncFileQueue``; every operation is a storage program."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import msgspec

from omniq.core import codec
from omniq.core.errors import LeaseLostError, SerializationError, TaskCancelledError
from omniq.core.fs import (
    Entry,
    Program,
    Store,
    create,
    delete,
    delete_many,
    exists,
    listdir,
    mark,
    now,
    read,
    read_many,
    stat,
    touch,
    write,
)
from omniq.core.models import UTC, Claimed, ErrorInfo, EventType, Task, TaskStatus
from omniq.core.names import validate_name

from . import _layout as L

log = logging.getLogger("omniq.queue")


def _dt(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def _error_info(error: ErrorInfo | BaseException | str | None) -> ErrorInfo | None:
    if error is None or isinstance(error, ErrorInfo):
        return error
    if isinstance(error, BaseException):
        return ErrorInfo.from_exception(error)
    return ErrorInfo(type="error", message=str(error))


class LeaseHandling:
    """ack, ack_many, nack, release, extend_lease, reap."""

    store: Store
    lease: float
    clock_skew: float
    tombstone_ttl: float
    _reaped: dict[str, float]

    if TYPE_CHECKING:

        def _now(self) -> float: ...
        async def _emit(self, kind: EventType, task: Task, **fields: Any) -> None: ...
        def _enqueue_program(self, items: list[tuple[Task, bytes]]) -> Program[None]: ...
        def _quarantine(self, key: str, data: bytes, reason: BaseException) -> Program[None]: ...

    # -- leases ------------------------------------------------------------------------------
    def _holds(self, claimed: Claimed) -> Program[bool]:
        """Whether the claim file of ``claimed``'s attempt is still its live claim."""
        run = L.run_key(claimed.queue, claimed.id, claimed.attempt)
        if claimed.token.startswith(L.INODE_TOKEN):  # a taken ready file: same inode, alive
            info = yield stat(run)
            return (
                info is not None
                and info.size > L.TOMBSTONE_MAX
                and f"{L.INODE_TOKEN}{info.ino}" == claimed.token
            )
        data = yield read(run)
        if data is None or len(data) <= L.TOMBSTONE_MAX:
            return False
        try:
            return codec.decode(data, Claimed).token == claimed.token
        except SerializationError:
            return False

    def _verify(self, claimed: Claimed, always: bool) -> Program[bool]:
        """Whether ``claimed`` still holds its attempt. Inside its own lease no other worker
        may take it over (they wait ``clock_skew`` more), so the check is skipped then."""
        current = yield now()
        if not always and current < claimed.lease_until.timestamp():
            return True
        return (yield from self._holds(claimed))

    def _lost(self, claimed: Claimed, action: str) -> LeaseLostError:
        return LeaseLostError(
            f"{action} of task {claimed.id} attempt {claimed.attempt} refused: the lease was "
            "taken over or the attempt already finished; nothing was changed"
        )

    async def ack(self, claimed: Claimed) -> None:
        """The attempt succeeded: the task is done. Raises LeaseLostError after a take-over."""
        if not await self.store.run(self._finish_program(claimed, L.DONE, None)):
            raise self._lost(claimed, "ack")

    async def ack_many(self, claims: Sequence[Claimed]) -> None:
        """``ack`` each of ``claims`` in one storage program. Every claim still held is
        acked; then LeaseLostError is raised if any was taken over (naming the first)."""
        lost = await self.store.run(self._ack_many_program(list(claims)))
        if lost:
            raise LeaseLostError(
                f"ack of {len(lost)} of {len(claims)} tasks refused (the lease was taken over "
                f"or the attempt already finished), first: task {lost[0].id} attempt "
                f"{lost[0].attempt}; the others were acked"
            )

    def _ack_many_program(self, claims: list[Claimed]) -> Program[list[Claimed]]:
        lost = []
        for claimed in claims:
            if not (yield from self._finish_program(claimed, L.DONE, None)):
                lost.append(claimed)
        return lost

    def _finish_program(
        self, claimed: Claimed, state: bytes, follow_up: Program[None] | None
    ) -> Program[bool]:
        if not (yield from self._verify(claimed, always=False)):
            return False
        if follow_up is not None:
            yield from follow_up
        yield mark(L.run_key(claimed.queue, claimed.id, claimed.attempt), state)
        return True

    async def nack(
        self,
        claimed: Claimed,
        *,
        error: ErrorInfo | BaseException | str | None = None,
        retry_in: float | None = None,
        retry: bool = True,
    ) -> TaskStatus:
        """The attempt failed. Retried with exponential backoff and jitter while retries
        remain (returns SCHEDULED, or PENDING for an immediate retry), else dead-lettered
        (returns DEAD) with the error kept. ``retry=False`` dead-letters at once (for
        failures no retry can fix, such as a function that does not import)."""
        task = msgspec.structs.replace(
            claimed.task, failures=claimed.task.failures + 1, last_error=_error_info(error)
        )
        if not retry or task.failures > task.max_retries:
            status, state = TaskStatus.DEAD, L.DEAD
            follow: Program[None] = self._dead_program(task)
        else:
            delay = (
                task.retry_delay(task.failures, random.random())
                if retry_in is None
                else max(0.0, retry_in)
            )
            status = TaskStatus.SCHEDULED if delay > 0 else TaskStatus.PENDING
            state = L.RETRIED
            follow = self._requeue_program(task, delay)
        if not await self.store.run(self._finish_program(claimed, state, follow)):
            raise self._lost(claimed, "nack")
        return status

    def _dead_program(self, task: Task) -> Program[None]:
        yield write(L.dead_key(task.queue, task.id), codec.encode(task))

    def _requeue_program(self, task: Task, delay: float) -> Program[None]:
        current = yield now()
        nxt = msgspec.structs.replace(
            task, attempt=task.attempt + 1, eta=_dt(current + delay) if delay > 0 else None
        )
        yield from self._enqueue_program([(nxt, codec.encode(nxt))])

    async def release(self, claimed: Claimed) -> None:
        """Give the task back now, without counting a failure (e.g. on shutdown)."""
        follow = self._requeue_program(claimed.task, 0.0)
        if not await self.store.run(self._finish_program(claimed, L.RELEASED, follow)):
            raise self._lost(claimed, "release")

    async def extend_lease(self, claimed: Claimed, seconds: float | None = None) -> Claimed:
        """Heartbeat: the lease now ends ``seconds`` (default: the queue's lease) from now.

        Raises LeaseLostError if another worker took the task over, TaskCancelledError if
        it was cancelled (the attempt is then recorded as cancelled).
        """
        got = await self.store.run(self._extend_program(claimed, seconds or self.lease))
        if got is None:
            raise self._lost(claimed, "extend_lease")
        if isinstance(got, bool):
            raise TaskCancelledError(f"task {claimed.id} was cancelled")
        return got

    def _extend_program(self, claimed: Claimed, seconds: float) -> Program[Claimed | bool | None]:
        run = L.run_key(claimed.queue, claimed.id, claimed.attempt)
        if not (yield from self._holds(claimed)):
            return None
        cancel = L.cancel_key(claimed.queue, claimed.id)
        if (yield exists(cancel)):
            yield mark(run, L.CANCELLED)
            yield delete(cancel)
            return False
        current = yield now()
        renewed = msgspec.structs.replace(claimed, lease_until=_dt(current + seconds))
        if claimed.token.startswith(L.INODE_TOKEN):
            yield touch(run, current + seconds)
        else:
            yield write(run, codec.encode(renewed))
        return renewed

    async def reap(self, queue: str = "default") -> list[Claimed]:
        """Requeue tasks whose lease expired (their worker died) as their next attempt, and
        clean up old tombstones. Runs by itself inside ``dequeue``; returns the expired claims.
        """
        validate_name(queue, "queue name")
        self._reaped[queue] = self._now()  # an explicit pass counts: dequeue waits reap_interval
        taken = await self.store.run(self._reap_program(queue), heavy=True)
        for claimed in taken:
            log.warning(
                "lease of task %s attempt %d%s expired; requeued",
                claimed.id,
                claimed.attempt,
                f" (worker {claimed.worker_id})" if claimed.worker_id else "",
            )
            await self._emit(
                EventType.LEASE_EXPIRED,
                claimed.task,
                attempt=claimed.attempt,
                worker_id=claimed.worker_id or None,
            )
        return taken

    def _reap_program(self, queue: str) -> Program[list[Claimed]]:
        current: float = yield now()
        # A claim document is written when its lease starts (checked against its lease_until
        # once a default lease old); a taken ready file carries its lease end as its mtime.
        threshold = self.clock_skew if self.store.can_take else self.lease
        tombstone_before, suspect_before = current - self.tombstone_ttl, current - threshold

        def due(entry: Entry) -> bool:  # filtered while scanning: run/ may hold 100,000s
            if entry.size <= L.TOMBSTONE_MAX:
                return entry.mtime < tombstone_before
            return entry.mtime < suspect_before

        old_tombstones, suspects = [], {}
        for entry in (yield listdir(f"{queue}/run", True, due)):
            key = f"{queue}/run/{entry.name}"
            if entry.size <= L.TOMBSTONE_MAX:
                old_tombstones.append(key)
            else:
                suspects[key] = entry.mtime
        if old_tombstones:
            yield delete_many(old_tombstones)
        taken: list[Claimed] = []
        if not suspects:
            return taken
        for key, data in (yield read_many(list(suspects))).items():
            if data is None or len(data) <= L.TOMBSTONE_MAX:
                continue
            claimed = L.as_claim(data, suspects[key], queue, key)
            if claimed is None:
                if not codec.is_newer_schema(data):
                    yield from self._quarantine(key, data, SerializationError("unreadable claim"))
                continue
            lease_end = claimed.lease_until.timestamp()
            if not claimed.token:  # a taken file: its lease is its mtime *now*, not at listing
                info = yield stat(key)
                if info is None or info.size <= L.TOMBSTONE_MAX:
                    continue
                lease_end = info.mtime
            if current <= lease_end + self.clock_skew:
                continue
            nxt = msgspec.structs.replace(claimed.task, attempt=claimed.attempt + 1, eta=None)
            won = yield create(
                L.ready_key(queue, nxt.priority, nxt.id, nxt.attempt), codec.encode(nxt)
            )
            yield mark(key, L.LOST)
            if won:
                taken.append(claimed)
        return taken
