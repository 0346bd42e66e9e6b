"""AsyncFileQueue: a leased task queue on any fsspec filesystem.

Every multi-step operation is a *program* (a generator of storage ops, see
``omniq.core.fs``) so that a local directory pays one thread hop per operation and object
stores run natively async.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import datetime
from typing import Any

import anyio

from omniq.core import codec
from omniq.core._watch import DirWatch
from omniq.core.errors import LeaseLostError, SerializationError, TaskCancelledError
from omniq.core.fs import (
    Program,
    Store,
    create,
    create_many,
    delete,
    exists,
    listdirs,
    listhead,
    now,
    read,
    write,
)
from omniq.core.interfaces import AsyncQueue
from omniq.core.interfaces import default_worker_id as default_worker_id  # moved to core
from omniq.core.maintenance import sweep_temp_files
from omniq.core.models import (
    UTC,
    Claimed,
    EventType,
    Task,
    TaskEvent,
)
from omniq.core.names import validate_name

from . import _layout as layout
from ._claim_document import DocumentClaims
from ._claim_link import LinkClaims
from ._claim_s3 import S3Claims
from ._dependencies import DependencyHandling, check_dependencies
from ._inspect import QueueInspection
from ._leases import LeaseHandling
from ._listing import QueueListing

log = logging.getLogger("omniq.queue")

EventHook = Callable[[TaskEvent], Awaitable[None]]


class _Cache:
    """Claim candidates from the last listing of one queue, shared by this instance's callers."""

    __slots__ = ("at", "items", "misses", "taken")

    def __init__(self, at: float, items: list[layout.Candidate]) -> None:
        self.at = at
        self.items = items
        self.taken = 0  # claims made from it
        self.misses = 0  # candidates in a row found claimed by others

    def stale(self, current: float, interval: float) -> bool:
        """Whether to list again: the candidates are used up, or three in a row were taken
        by others, or the listing is ``interval`` old and 32 claims were made from it (a
        busy consumer sees new higher priorities within ``interval``) or ten times as old
        (a slow one lists at most every ``10 x interval``: with many consumers a claim
        would otherwise pay for a listing of its own; see docs/design.md)."""
        age = current - self.at
        if not self.items or self.misses >= 3:
            return True
        return age > interval and (self.taken >= 32 or age > 10 * interval)


class _Idle:
    """The polling pace of one set of queues: when the next look is due, and the pause after
    it (``poll_interval`` after a look that found work, growing 1.5x per empty look up to
    ``max_poll_interval``)."""

    __slots__ = ("next", "pause")

    def __init__(self) -> None:
        self.next = 0.0
        self.pause = 0.0

    def looked(self, found: bool, first: float, most: float) -> None:
        if found:
            self.next, self.pause = 0.0, 0.0
            return
        self.pause = first if self.pause == 0.0 else min(self.pause * 1.5, most)
        self.next = time.monotonic() + self.pause


class AsyncFileQueue(DependencyHandling, LeaseHandling, QueueInspection, QueueListing, AsyncQueue):
    """A task queue whose state is files under ``base_dir``; safe for many workers.

    Args:
        base_dir: local path or fsspec URL (``s3://bucket/prefix``, ``gs://...``,
            ``abfs://container/prefix``, ``memory://name``).
        storage_options: passed to fsspec (credentials, endpoint); never shown.
        lease: default seconds a claim lasts unless extended.
        poll_interval: first pause between empty polls when ``dequeue(wait=...)``; grows to
            ``max_poll_interval``.
        watch: on a local directory under Linux, a waiting ``dequeue`` is woken by inotify
            when a task or due marker is written, instead of at its next poll (the polls go
            on as a fallback: changes made on another machine of a network mount are seen
            only by polling). False: poll only.
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
        spread: int = 256,
        fsync: bool = False,
        local_io: str | None = None,
        watch: bool = True,
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
        self.spread = max(1, spread)
        self.on_event = on_event
        self.worker_id = default_worker_id()
        self._checked = False
        self._cache: dict[str, _Cache] = {}
        self._listing: set[str] = set()  # queues a call of this instance is listing now
        self._reaped: dict[str, float] = {}
        self._idle: dict[tuple[str, ...], _Idle] = {}
        self.takeovers: dict[str, int] = {}  # expired leases this reaper requeued (metrics)
        self._spawning: set[tuple[str, str, int]] = set()
        self._owed: dict[str, dict[str, str]] = {}  # ended here; dependents not settled yet
        self._owed_at = 0.0
        self._unreported = []  # waits decided here, events not sent yet
        self._gone = []  # dependencies ended with nothing left to read how
        self._unfinished = {}  # linked tasks the reaper found running: not looked at again
        self.dependency_succeeded = None  # the backend's result look-up
        self.watch = watch
        self._watches: dict[tuple[str, ...], DirWatch | None] = {}
        # One claim strategy per store; each module carries its store's correctness argument.
        strategy = {"local": LinkClaims, "s3": S3Claims}.get(self.store.kind, DocumentClaims)
        self.claims: DocumentClaims = strategy(self.store, batch)
        self.batch = self.claims.batch

    def __repr__(self) -> str:
        return f"AsyncFileQueue({self.store.url!r})"

    async def close(self) -> None:
        try:
            await self._settle_owed()
        except Exception as exc:  # links stay: a reaper pass settles them
            log.warning("could not settle the dependents of finished tasks: %s", exc)
        for watch in self._watches.values():
            if watch is not None:
                watch.close()
        self._watches.clear()
        if self.claims.pending:
            try:
                await self.store.run(self.claims.flush())
            except Exception as exc:  # the next listing of any worker removes them
                log.warning("could not finish deferred clean-up: %s", exc)
        await self.store.aclose()

    async def maintain(self, *, sweep: bool = False) -> None:
        """With ``sweep``: remove the temporary files an hour old under this queue's
        directory, left by a process killed while writing (local directories only)."""
        if sweep:
            await sweep_temp_files(self.store)

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
        check_dependencies(task.id, task.depends_on)

    async def enqueue(self, task: Task) -> str:
        """Store ``task``; ready now, or at ``task.eta``. Idempotent for the same id.

        With ``task.depends_on`` it waits until those tasks have succeeded (see
        docs/dependencies.md); unknown ids and cycles raise DependencyError, storing nothing."""
        return (await self.enqueue_many([task]))[0]

    async def enqueue_many(self, tasks: Sequence[Task]) -> list[str]:
        """Store many tasks in one batch (one thread hop locally, concurrent PUTs remotely)."""
        for task in tasks:
            self._check_task(task)
        encoded = [(task, codec.encode(task)) for task in tasks]  # errors before any write
        await self._check()
        ready = [(task, data) for task, data in encoded if not task.depends_on]
        if ready:
            await self.store.run(self._enqueue_program(ready))
            self._idle.clear()  # a poller of this instance looks at once
            self._drop_cache_below(ready)
        for task in tasks:
            if task.depends_on:  # in order: one may depend on an earlier one
                await self._enqueue_waiting(task)
        await self._settle_due()  # a producer may make no other call
        return [task.id for task in tasks]

    def _enqueue_program(self, items: list[tuple[Task, bytes]]) -> Program[None]:
        current = yield now()
        ready: list[tuple[str, bytes]] = []
        for task, data in items:
            if task.eta is not None and task.eta.timestamp() > current:
                eta_ms = int(task.eta.timestamp() * 1000)
                # Body first: a claimer that lists the marker finds the body. A crash between
                # the two leaves a body without a marker, which ``repair`` marks.
                yield write(layout.sched_key(task.queue, task.id, task.attempt), data)
                yield write(
                    layout.due_key(task.queue, eta_ms, task.priority, task.id, task.attempt), b""
                )
            else:
                ready.append(
                    (layout.ready_key(task.queue, task.priority, task.id, task.attempt), data)
                )
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
        watch = self._watch(names) if wait > 0 else None  # before the first look: no gap
        # A poller (waiting, no watch) keeps its pace across calls: looks stay max_poll_interval
        # apart while the queues stay empty, however short each call's wait.
        idle = self._idle.setdefault(tuple(names), _Idle()) if wait > 0 and watch is None else None
        claimed: list[Claimed] = []
        if self._owed and self._now() - self._owed_at >= self.refresh_interval:
            await self._settle_owed()  # busy: the dependents of what ended, once per interval
        while True:
            early = 0.0 if idle is None else idle.next - time.monotonic()
            if early > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                await anyio.sleep(min(early, left))
                continue
            for name in names:
                claimed += await self._claim_from(name, seconds, worker, count - len(claimed))
                if len(claimed) >= count or self._held_too_long(claimed, seconds):
                    break
            if not claimed and self._owed:
                await self._settle_owed()  # idle: settle now, then look again (released tasks)
                continue
            left = deadline - time.monotonic()
            if claimed or left <= 0 or idle is not None:
                if idle is not None:
                    idle.looked(bool(claimed), self.poll_interval, self.max_poll_interval)
                if claimed or left <= 0:
                    return await self._fresh(claimed, seconds)
                continue
            if watch is not None and await watch.wait(min(pause, left)):
                pause = self.poll_interval  # woken by a new file: look now
                continue
            if watch is None:
                await anyio.sleep(min(pause, left))
            pause = min(pause * 1.5, self.max_poll_interval)

    def _watch(self, names: list[str]) -> DirWatch | None:
        """A wake-up on new ready tasks and due markers of ``names`` (a local directory on
        Linux: inotify), else None: the caller polls. Kept for the queue's lifetime."""
        key = tuple(names)
        if key not in self._watches:
            dirs = [f"{self.store.root}/{n}/{area}" for n in names for area in ("ready", "due")]
            local = self.watch and self.store.kind == "local"
            self._watches[key] = DirWatch.open(dirs) if local else None
        return self._watches[key]

    async def _fresh(self, claims: list[Claimed], lease: float) -> list[Claimed]:
        """Claims with most of their lease left. A claim whose requests took long (retried
        or slowed through an outage) may come back with its lease nearly spent: it is
        renewed before the caller starts it, or dropped if it was taken over meanwhile.
        Renewals run at once, and the claims are judged again after them: a slow renewal
        must not spend the lease of a claim judged fresh before it."""
        out: list[Claimed] = list(claims)
        for _ in range(3):
            current = self._now()
            stale = [
                i for i, c in enumerate(out) if c.lease_until.timestamp() - current < lease / 3
            ]
            if not stale:
                break
            kept: list[Claimed | None] = list(out)
            async with anyio.create_task_group() as tg:
                for i in stale:
                    tg.start_soon(self._renew, kept, i, lease)
            out = [c for c in kept if c is not None]
        return out

    async def _renew(self, claims: list[Claimed | None], i: int, lease: float) -> None:
        """Renew ``claims[i]`` in place; None if it was lost or could not be renewed."""
        claimed = claims[i]
        assert claimed is not None
        try:
            claims[i] = await self.extend_lease(claimed, lease)
        except (LeaseLostError, TaskCancelledError):
            claims[i] = None
            log.warning(
                "task %s: claim lost before it started (attempt %d)", claimed.id, claimed.attempt
            )
        except Exception as exc:  # unreachable storage: let the lease run out
            claims[i] = None
            log.warning(
                "task %s: a stale claim could not be renewed (attempt %d): %s",
                claimed.id,
                claimed.attempt,
                exc,
            )

    def _held_too_long(self, claimed: list[Claimed], lease: float) -> bool:
        """Whether the claims in hand have waited long enough for more claims: once one has
        spent a third of its lease, the next claim round would leave it to ``_fresh``."""
        current = self._now()
        return any(c.lease_until.timestamp() - current < lease * 2 / 3 for c in claimed)

    async def _claim_from(self, queue: str, lease: float, worker: str, want: int) -> list[Claimed]:
        current = self._now()
        cache = self._cache.get(queue)
        refreshed = False
        due = current - self._reaped.get(queue, 0.0) >= self.reap_interval
        if due and await self.store.run(self._reap_turn(queue, current)) and await self.reap(queue):
            cache = None  # requeued tasks: list again to see them
        claimed: list[Claimed] = []
        if self.claims.unsettled:
            claimed += await self.store.run(self.claims.settle(queue, want, self.tombstone_ttl))
            if len(claimed) >= want:
                return claimed
        while True:
            if refreshed and (cache is None or cache.stale(current, self.refresh_interval)):
                return claimed
            if queue in self._listing:
                # Another call of this instance is listing the queue: no second listing;
                # claim from the last one meanwhile, if anything is left of it.
                if cache is None or not cache.items:
                    return claimed
            elif cache is None or cache.stale(current, self.refresh_interval):
                self._listing.add(queue)
                try:
                    items = await self.store.run(self._scan_program(queue))
                finally:
                    self._listing.discard(queue)
                # Stamped when the listing ended: a slow listing must not make the next
                # dequeue list again at once.
                cache = self._cache[queue] = _Cache(self._now(), self._spread(items))
                refreshed = True
            while cache.items and cache.misses < 3:
                if self._held_too_long(claimed, lease):
                    return claimed  # slow requests: start what is in hand, claim more later
                picks = [
                    cache.items.pop(0) for _ in range(min(want - len(claimed), len(cache.items)))
                ]
                for got in await self._claim_picks(queue, picks, lease, worker):
                    if isinstance(got, Claimed):
                        claimed.append(got)
                        cache.taken, cache.misses = cache.taken + 1, 0
                    elif isinstance(got, Task):
                        log.info("task %s expired before it started", got.id)
                        await self._emit(EventType.EXPIRED, got, attempt=got.attempt)
                    else:  # taken by another consumer, who walks on from there: jump away
                        cache.items = self._spread(cache.items)
                        cache.misses += 1
                if len(claimed) >= want:
                    return claimed
            if refreshed or queue in self._listing:
                return claimed
            cache = None

    def _drop_cache_below(self, tasks: list[tuple[Task, bytes]]) -> None:
        """Forget a listing whose candidates rank below a task just enqueued here: this
        instance's next claim then sees it (other producers' are seen at the next listing)."""
        for task, _ in tasks:
            cache = self._cache.get(task.queue)
            rank = int(layout.rank(task.priority)[1:])
            if cache is not None and (not cache.items or rank < cache.items[0].rank):
                del self._cache[task.queue]

    def _reap_turn(self, queue: str, current: float) -> Program[bool]:
        """Whether this consumer reaps ``queue`` now: one reaper pass per ``reap_interval``
        per queue, whatever the number of consumers. The pass's start time is kept in
        ``{queue}/reaper/last``; a consumer that finds it fresh waits for the next interval.
        Two consumers that both find it stale both reap, which is safe (every transition of
        the reaper is an exclusive create); a clock far off makes the time look stale."""
        data = yield read(layout.reaper_key(queue))
        try:
            last = float(data or b"")
        except ValueError:
            last = 0.0
        if 0.0 <= current - last < self.reap_interval:
            self._reaped[queue] = last + random.uniform(0.0, self.reap_interval / 4)
            return False
        yield write(layout.reaper_key(queue), repr(current).encode())
        return True

    async def _claim_picks(
        self, queue: str, picks: list[layout.Candidate], lease: float, worker: str
    ) -> list[Claimed | Task | None]:
        """Claim attempts on ``picks``, in their order. On an object store they run
        concurrently: each is a read and a create, so a batch of n costs two request
        latencies, not 2n. Locally one program runs them (no request latency to overlap)."""
        if len(picks) == 1 or self.store.kind in ("memory", "local"):
            return await self.store.run(self._claim_many_program(queue, picks, lease, worker))
        out: list[Claimed | Task | BaseException | None] = [None] * len(picks)

        async def attempt(i: int, cand: layout.Candidate) -> None:
            try:
                out[i] = await self.store.run(self._claim_program(queue, cand, lease, worker))
            except Exception as exc:
                out[i] = exc

        async with anyio.create_task_group() as tg:
            for i, cand in enumerate(picks):
                tg.start_soon(attempt, i, cand)
        got = [item for item in out if not isinstance(item, BaseException)]
        for error in out:
            if isinstance(error, BaseException):
                _hand_over_or_raise(queue, got, error)
                break
        return got

    def _claim_many_program(
        self, queue: str, picks: list[layout.Candidate], lease: float, worker: str
    ) -> Program[list[Claimed | Task | None]]:
        out: list[Claimed | Task | None] = []
        for candidate in picks:
            try:
                out.append((yield from self._claim_program(queue, candidate, lease, worker)))
            except Exception as exc:
                _hand_over_or_raise(queue, out, exc)
                break
        return out

    def _spread(self, items: list[layout.Candidate]) -> list[layout.Candidate]:
        """``items`` in claim order: the first ``spread`` candidates of the top priority
        rotated by a random offset, so that consumers listing the same head start at
        different places and walk it without meeting (a random pick per claim collides more
        as the head is used up), then the rest in order."""
        if not items:
            return items
        top, window = items[0].rank, min(self.spread, len(items))
        same = next((i for i in range(1, window) if items[i].rank != top), window)
        start = random.randrange(same)
        return items[start:same] + items[:start] + items[same:]

    def _scan_program(self, queue: str) -> Program[list[layout.Candidate]]:
        if self.claims.pending:  # deferred deletes first: the listing then no longer shows them
            yield from self.claims.flush()
        found: list[layout.Candidate] = []
        for rank_dir in (yield listdirs(f"{queue}/ready")):
            for name in (yield listhead(f"{queue}/ready/{rank_dir}", self.batch)):
                candidate = layout.ready_candidate(queue, rank_dir, name)
                if candidate is not None:
                    found.append(candidate)
            if len(found) >= self.batch:
                break
        current_ms = (yield now()) * 1000
        for name in (yield listhead(f"{queue}/due", self.batch)):
            candidate = layout.due_candidate(queue, name)
            if candidate is None:
                continue
            if candidate.time_ms > current_ms:
                break
            found.append(candidate)
        found.sort()
        return (yield from self.claims.filter(queue, found[: self.batch]))

    def _claim_program(
        self, queue: str, cand: layout.Candidate, lease: float, worker: str
    ) -> Program[Claimed | Task | None]:
        body = yield read(cand.key)
        if body is None:  # claimed by someone else meanwhile, or a marker without its body
            if cand.marker:
                yield from self._unbodied_marker(queue, cand)
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
        if task.is_expired(datetime.fromtimestamp(current, UTC)):
            won = yield create(
                layout.run_key(queue, task.id, cand.attempt), layout.tombstone(layout.EXPIRED)
            )
            yield from self.claims.spend(cand)
            if won:
                self._ended(queue, task.id, layout.EXPIRED)
            return task if won else None
        return (yield from self.claims.claim(cand, task, current, lease, worker))

    def _unbodied_marker(self, queue: str, cand: layout.Candidate) -> Program[None]:
        assert cand.marker is not None
        """A due marker whose body is missing: its attempt was claimed (the claimer died
        before removing the marker) -- remove it; else the body may still be on its way
        (bodies are written first, but a retried PUT can be slow): leave it until it is
        ``tombstone_ttl`` past due, then remove it as orphaned."""
        current = yield now()
        claimed = yield exists(layout.run_key(queue, cand.task_id, cand.attempt))
        if claimed or current * 1000 > cand.time_ms + self.tombstone_ttl * 1000:
            if not claimed:
                log.warning("removing orphaned due marker %s (no body)", cand.marker)
            yield delete(cand.marker)

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


def _hand_over_or_raise(queue: str, got: list[Any], error: BaseException) -> None:
    """A batch claim that failed part-way: raise ``error`` if nothing was claimed, else log
    it and let the caller hand over what was claimed rather than strand it until its lease
    ends."""
    if not any(isinstance(item, Claimed) for item in got):
        raise error
    log.warning("claiming from %s stopped after an error: %s", queue, error)
