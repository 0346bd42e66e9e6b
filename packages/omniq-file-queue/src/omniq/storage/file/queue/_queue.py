"""AsyncFileQueue: a leased task queue on any fsspec filesystem.

Every multi-step operation is a *program* (a generator of storage ops, see
``omniq.core.fs``) so that a local directory pays one thread hop per operation and object
stores run natively async.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import datetime
from typing import Any

import anyio
import msgspec

from omniq.core import codec
from omniq.core.errors import (
    LeaseLostError,
    SerializationError,
    TaskCancelledError,
)
from omniq.core.fs import (
    CANNOT_TAKE,
    Entry,
    Program,
    Store,
    create,
    create_many,
    delete,
    delete_many,
    exists,
    listdir,
    listdirs,
    listhead,
    mark,
    now,
    read,
    read_many,
    stat,
    take,
    touch,
    write,
)
from omniq.core.interfaces import AsyncQueue
from omniq.core.models import (
    UTC,
    Claimed,
    ErrorInfo,
    EventType,
    Task,
    TaskEvent,
    TaskStatus,
)
from omniq.core.names import validate_name

from . import _layout as L
from ._inspect import QueueInspection

log = logging.getLogger("omniq.queue")

EventHook = Callable[[TaskEvent], Awaitable[None]]


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def _dt(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def _error_info(error: ErrorInfo | BaseException | str | None) -> ErrorInfo | None:
    if error is None or isinstance(error, ErrorInfo):
        return error
    if isinstance(error, BaseException):
        return ErrorInfo.from_exception(error)
    return ErrorInfo(type="error", message=str(error))


class _Cache:
    """Claim candidates from the last listing of one queue, shared by this instance's callers."""

    __slots__ = ("at", "items")

    def __init__(self, at: float, items: list[L.Candidate]) -> None:
        self.at = at
        self.items = items


class AsyncFileQueue(QueueInspection, AsyncQueue):
    """A task queue whose state is files under ``base_dir``; safe for many workers.

    Args:
        base_dir: local path or fsspec URL (``s3://bucket/prefix``, ``gs://...``,
            ``abfs://container/prefix``, ``memory://name``).
        storage_options: passed to fsspec (credentials, endpoint); never shown.
        lease: default seconds a claim lasts unless extended.
        poll_interval: first pause between empty polls when ``dequeue(wait=...)``; grows to
            ``max_poll_interval``.
        clock_skew: tolerated clock difference between workers; a lease is taken over only
            ``clock_skew`` seconds after it expired by the taker's clock.
        tombstone_ttl: how long finished attempts stay visible to ``get_task`` (and fence
            stale workers) before they are cleaned up.
        fsync: fsync local files before they become visible (slower; survives power loss).
        local_io: ``"inline"`` (default without ``fsync``) runs a local directory's short
            operations on the event loop (a few syscalls, cheaper than a thread hop);
            ``"thread"`` (default with ``fsync``) runs each in a worker thread, for slow
            network mounts. Scans of large directories (reaper, inspection) always use a thread.
        on_event: async callback for events the queue itself observes (expired tasks, lease
            take-overs); the worker reports the rest.
        clock: epoch-seconds clock, for tests.
    """

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        storage_options: dict[str, Any] | None = None,
        *,
        lease: float = 60.0,
        poll_interval: float = 0.2,
        max_poll_interval: float = 2.0,
        clock_skew: float = 5.0,
        tombstone_ttl: float = 300.0,
        refresh_interval: float = 1.0,
        batch: int | None = None,
        spread: int = 8,
        fsync: bool = False,
        local_io: str | None = None,
        on_event: EventHook | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if lease <= 0:
            raise ValueError("lease must be positive")
        self.store = Store(
            base_dir,
            storage_options,
            package="omniq-file-queue",
            fsync=fsync,
            clock=clock,
            local_io=local_io,
        )
        self.lease = float(lease)
        self.poll_interval = poll_interval
        self.max_poll_interval = max(max_poll_interval, poll_interval)
        self.clock_skew = clock_skew
        self.tombstone_ttl = tombstone_ttl
        self.refresh_interval = refresh_interval
        self.reap_interval = max(0.2, self.lease / 4)
        # Claim candidates kept from one listing: a local listing reads the whole directory
        # whatever the batch, so it keeps more; an S3 listing returns at most 1,000 keys.
        self.batch = batch or (2048 if self.store.is_local else 256)
        self.spread = max(1, spread)
        self.on_event = on_event
        self.worker_id = default_worker_id()
        self._checked = False
        self._cache: dict[str, _Cache] = {}
        self._reaped: dict[str, float] = {}

    def __repr__(self) -> str:
        return f"AsyncFileQueue({self.store.url!r})"

    async def close(self) -> None:
        await self.store.aclose()

    def _now(self) -> float:
        return self.store.clock()

    async def _check(self) -> None:
        if not self._checked:
            await self.store.probe_exclusive_create()
            if not self.store.shared_across_processes:
                log.debug("%s lives in this process only; workers elsewhere cannot see it", self)
            self._checked = True

    async def _emit(self, kind: EventType, task: Task, **fields: Any) -> None:
        if self.on_event is None:
            return
        try:
            await self.on_event(TaskEvent(task_id=task.id, type=kind, queue=task.queue, **fields))
        except Exception:  # events must never break the queue
            log.exception("event hook failed for %s %s", kind.value, task.id)

    # -- enqueue -----------------------------------------------------------------------------
    def _check_task(self, task: Task) -> None:
        validate_name(task.queue, "queue name")
        validate_name(task.id, "task id")

    async def enqueue(self, task: Task) -> str:
        """Store ``task``; ready now, or at ``task.eta``. Idempotent for the same id."""
        return (await self.enqueue_many([task]))[0]

    async def enqueue_many(self, tasks: Sequence[Task]) -> list[str]:
        """Store many tasks in one batch (one thread hop locally, concurrent PUTs remotely)."""
        for task in tasks:
            self._check_task(task)
        encoded = [(task, codec.encode(task)) for task in tasks]  # errors before any write
        await self._check()
        await self.store.run(self._enqueue_program(encoded))
        return [task.id for task in tasks]

    def _enqueue_program(self, items: list[tuple[Task, bytes]]) -> Program[None]:
        current = yield now()
        ready: list[tuple[str, bytes]] = []
        for task, data in items:
            if task.eta is not None and task.eta.timestamp() > current:
                eta_ms = int(task.eta.timestamp() * 1000)
                # Marker first: a crash between the two leaves a marker without a body, which
                # the next claimer removes, never a body that no marker will ever bring due.
                yield write(
                    L.due_key(task.queue, eta_ms, task.priority, task.id, task.attempt), b""
                )
                yield write(L.sched_key(task.queue, task.id, task.attempt), data)
            else:
                ready.append((L.ready_key(task.queue, task.priority, task.id, task.attempt), data))
        if ready:
            yield create_many(ready)

    # -- dequeue -----------------------------------------------------------------------------
    async def dequeue(
        self,
        queues: Sequence[str] | str = ("default",),
        *,
        lease: float | None = None,
        wait: float = 0.0,
        worker_id: str | None = None,
    ) -> Claimed | None:
        """Claim the next task. Queues are tried in the order given; within a queue the
        highest priority first, then the oldest (due time for delayed tasks, else creation).
        """
        got = await self._dequeue(queues, 1, lease, wait, worker_id)
        return got[0] if got else None

    async def dequeue_many(
        self,
        count: int,
        queues: Sequence[str] | str = ("default",),
        *,
        lease: float | None = None,
        wait: float = 0.0,
        worker_id: str | None = None,
    ) -> list[Claimed]:
        """Claim up to ``count`` tasks at once, in ``dequeue``'s order (fewer if fewer are
        ready; ``wait`` applies until the first one). Each is acked, nacked or extended on
        its own, or with ``ack_many``."""
        if count < 1:
            raise ValueError("count must be at least 1")
        return await self._dequeue(queues, count, lease, wait, worker_id)

    async def _dequeue(
        self,
        queues: Sequence[str] | str,
        count: int,
        lease: float | None,
        wait: float,
        worker_id: str | None,
    ) -> list[Claimed]:
        # One name, or several; anything else (None, bytes, a number) is an invalid name.
        given: Any = queues
        single = isinstance(given, (str, bytes)) or not isinstance(given, Iterable)
        names = [validate_name(name, "queue name") for name in ([given] if single else given)]
        await self._check()
        seconds = self.lease if lease is None else float(lease)
        worker = worker_id or self.worker_id
        deadline = time.monotonic() + max(0.0, wait)
        pause = self.poll_interval
        claimed: list[Claimed] = []
        while True:
            for name in names:
                claimed += await self._claim_from(name, seconds, worker, count - len(claimed))
                if len(claimed) >= count:
                    return claimed
            left = deadline - time.monotonic()
            if claimed or left <= 0:
                return claimed
            await anyio.sleep(min(pause, left))
            pause = min(pause * 1.5, self.max_poll_interval)

    async def _claim_from(self, queue: str, lease: float, worker: str, want: int) -> list[Claimed]:
        current = self._now()
        if current - self._reaped.get(queue, 0.0) >= self.reap_interval:
            await self.reap(queue)
        cache = self._cache.get(queue)
        refreshed = False
        claimed: list[Claimed] = []
        while True:
            if cache is None or not cache.items or current - cache.at > self.refresh_interval:
                if refreshed:
                    return claimed
                items = await self.store.run(self._scan_program(queue))
                cache = self._cache[queue] = _Cache(current, items)
                refreshed = True
            while cache.items:
                picks = [
                    cache.items.pop(self._pick(cache.items))
                    for _ in range(min(want - len(claimed), len(cache.items)))
                ]
                for got in await self.store.run(
                    self._claim_many_program(queue, picks, lease, worker)
                ):
                    if isinstance(got, Claimed):
                        claimed.append(got)
                    elif isinstance(got, Task):
                        log.info("task %s expired before it started", got.id)
                        await self._emit(EventType.EXPIRED, got, attempt=got.attempt)
                if len(claimed) >= want:
                    return claimed
            if refreshed:
                return claimed
            cache = None

    def _claim_many_program(
        self, queue: str, picks: list[L.Candidate], lease: float, worker: str
    ) -> Program[list[Claimed | Task | None]]:
        out: list[Claimed | Task | None] = []
        for candidate in picks:
            try:
                out.append((yield from self._claim_program(queue, candidate, lease, worker)))
            except Exception as exc:
                if not any(isinstance(got, Claimed) for got in out):
                    raise
                # Hand over what is claimed already rather than strand it until its lease ends.
                log.warning("claiming from %s stopped after an error: %s", queue, exc)
                break
        return out

    def _pick(self, items: list[L.Candidate]) -> int:
        """A random index among the first ``spread`` candidates of the top priority, so that
        workers polling the same queue rarely race for the same file."""
        top, window = items[0].rank, min(self.spread, len(items))
        same = next((i for i in range(1, window) if items[i].rank != top), window)
        return random.randrange(same)

    def _scan_program(self, queue: str) -> Program[list[L.Candidate]]:
        found: list[L.Candidate] = []
        for rank_dir in (yield listdirs(f"{queue}/ready")):
            for name in (yield listhead(f"{queue}/ready/{rank_dir}", self.batch)):
                candidate = L.ready_candidate(queue, rank_dir, name)
                if candidate is not None:
                    found.append(candidate)
            if len(found) >= self.batch:
                break
        current_ms = (yield now()) * 1000
        for name in (yield listhead(f"{queue}/due", self.batch)):
            candidate = L.due_candidate(queue, name)
            if candidate is None:
                continue
            if candidate.time_ms > current_ms:
                break
            found.append(candidate)
        found.sort()
        return found[: self.batch]

    def _claim_program(
        self, queue: str, cand: L.Candidate, lease: float, worker: str
    ) -> Program[Claimed | Task | None]:
        body = yield read(cand.key)
        if body is None or body in L.TOMBSTONES:
            # Claimed by someone else meanwhile; or a ready name left behind by a claimer
            # that died right after taking it, now sharing its finished claim's tombstone:
            # its attempt is over either way.
            if body is not None:
                yield delete(cand.key)
            if cand.marker:
                yield delete(cand.marker)
            return None
        try:
            task = codec.decode(body, Task)
            if task.id != cand.task_id or task.attempt != cand.attempt or task.queue != queue:
                raise SerializationError("document does not match its file name")
        except SerializationError as exc:
            if codec.is_newer_schema(body):
                log.warning(
                    "%s was written by a newer OmniQ; left for an upgraded worker", cand.key
                )
                return None
            yield from self._quarantine(cand.key, body, exc)
            if cand.marker:
                yield delete(cand.marker)
            return None
        current = yield now()
        run = L.run_key(queue, task.id, cand.attempt)
        taken: Any = CANNOT_TAKE
        if not task.is_expired(_dt(current)) and self.store.can_take:
            # Locally the ready file itself becomes the claim (a hard link, exclusive like
            # O_EXCL), its mtime the lease: no file is created, which is what a claim costs
            # on most local filesystems. ``take`` removes the ready name itself.
            taken = yield take(cand.key, run, current + lease, worker, L.TOMBSTONE_MAX + 1)
        if taken != CANNOT_TAKE:
            if taken is False:
                yield delete(cand.key)  # a stale copy of a claimed or finished attempt
            if cand.marker:
                yield delete(cand.marker)
            if taken is None or taken is False:
                return None
            return Claimed(
                task=task,
                attempt=cand.attempt,
                lease_until=_dt(current + lease),
                worker_id=worker,
                token=f"{L.INODE_TOKEN}{taken}",
                claimed_at=_dt(current),
            )
        if task.is_expired(_dt(current)):
            won = yield create(run, L.EXPIRED)
            result: Claimed | Task | None = task if won else None
        else:
            claimed = Claimed(
                task=task,
                attempt=cand.attempt,
                lease_until=_dt(current + lease),
                worker_id=worker,
                token=uuid.uuid4().hex,
                claimed_at=_dt(current),
            )
            won = yield create(run, codec.encode(claimed))
            result = claimed if won else None
        # Winner or not, this entry is spent: the winner removes it, and a loser finding the
        # attempt already claimed (or finished) removes a stale copy.
        yield delete(cand.key)
        if cand.marker:
            yield delete(cand.marker)
        return result

    def _quarantine(self, key: str, data: bytes, reason: BaseException) -> Program[None]:
        # Read again first: a file read while its claim was being finished in place (a taken
        # ready file shares its inode with the claim) can look torn; it is not corrupt then.
        if (yield read(key)) != data:
            return
        queue, _, rest = key.partition("/")
        area, _, name = rest.partition("/")
        target = f"{queue}/quarantine/{area}.{name.replace('/', '.')}.{time.time_ns()}"
        yield write(target, data)
        yield delete(key)
        log.warning("moved unreadable %s to %s: %s", key, target, reason)

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
