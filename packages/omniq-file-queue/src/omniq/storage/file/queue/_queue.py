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
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

import anyio

from omniq.core import codec
from omniq.core._watch import DirWatch
from omniq.core.fs import (
    Program,
    Store,
    create_many,
    delete,
    now,
    read,
    write,
)
from omniq.core.interfaces import AsyncQueue
from omniq.core.interfaces import default_worker_id as default_worker_id  # moved to core
from omniq.core.maintenance import sweep_temp_files
from omniq.core.models import (
    Claimed,
    EventType,
    Task,
    TaskEvent,
)
from omniq.core.names import validate_name

from . import _layout as layout
from ._bells import Bells
from ._claim_batched import BatchedClaims
from ._claim_deferred import DeferredClaims
from ._claim_document import DocumentClaims
from ._claim_link import LinkClaims
from ._claiming import ClaimHandling, ListingCache, hand_over_or_raise
from ._dependencies import DependencyHandling, check_dependencies
from ._inspect import QueueInspection
from ._lanes import Lanes
from ._listing import QueueListing
from ._shards import Shards

log = logging.getLogger("omniq.queue")

EventHook = Callable[[TaskEvent], Awaitable[None]]


class _Idle:
    """The polling pace of one set of queues: when the next look is due, and the pause after
    it (``poll_interval`` after a look that found work, growing 1.5x per empty look up to
    ``max_poll_interval``). Each wait is drawn between half the pause and the pause: workers
    started together (a deploy) would otherwise look at the same moments for ever, their
    listings arriving at one prefix in bursts; and a task enqueued at a random moment waits
    a median ~0.38x the pause for the next look instead of 0.5x (looks come 1/0.75 as often)."""

    __slots__ = ("next", "pause")

    def __init__(self) -> None:
        self.next = 0.0
        self.pause = 0.0

    def looked(self, found: bool, first: float, most: float) -> None:
        if found:
            self.next, self.pause = 0.0, 0.0
            return
        self.pause = first if self.pause == 0.0 else min(self.pause * 1.5, most)
        self.next = time.monotonic() + random.uniform(self.pause / 2, self.pause)


_STRATEGIES: dict[str, type[DocumentClaims]] = {
    "local": LinkClaims,
    "s3": BatchedClaims,
    "gcs": DeferredClaims,
    "azure": BatchedClaims,
}


def claim_strategy(kind: str) -> type[DocumentClaims]:
    """The claim strategy of a store kind; each module carries its store's correctness
    argument (memory and other filesystems: ``DocumentClaims``)."""
    return _STRATEGIES.get(kind, DocumentClaims)


class AsyncFileQueue(DependencyHandling, ClaimHandling, QueueInspection, QueueListing, AsyncQueue):
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
        batch: claim candidates kept from one listing of a queue's head (default 1,000 on
            object stores, what one LIST returns; 2,048 on a local directory; 256 in memory).
        spread: consumers start claiming at a random place among the first ``spread``
            candidates of the top priority, so that many rarely race for the same task
            (default 256; on object stores the whole listed head); ``1``: strictly oldest
            first.
        fsync: fsync local files before they become visible (slower; survives power loss).
        local_io: ``"inline"`` (default without ``fsync``) runs a local directory's short
            operations on the event loop (a few syscalls, cheaper than a thread hop);
            ``"thread"`` (default with ``fsync``) runs each in a worker thread, for slow
            network mounts. Scans of large directories (reaper, inspection) always use a thread.
        on_event: async callback for events the queue itself observes (expired tasks, lease
            take-overs); the worker reports the rest.
        shards: ``{queue: n}``: each task of that queue is stored in one of ``n`` shards
            (queues named ``{queue}.shard000`` ...) chosen by its id, so that one queue's
            writes spread over ``n`` key ranges of the store; every call that names the queue
            reads all of them. Producers, workers and tools must use the same counts
            (docs/queue.md, "Sharded queues").
        lanes: consumers busy claiming from a queue announce themselves there, and each
            claims the tasks of its own lane (a hash of the id) first; a call that waits
            takes the others' only once they are ``refresh_interval`` old (its lane empty)
            or ten times that, so that many consumers of a shallow queue rarely race for
            one task (docs/queue.md, "Many consumers of one queue"). None (default): on
            object stores, unless ``spread=1``.
        bells: whatever adds a task to a queue rings its bell (a small object written at
            most once a second by each queue object), and a waiting call that has polled
            for a few seconds without work (its pause grown to ``max_poll_interval``) reads
            the bells of its queues and lists only the queues and shards that may have
            changed since it found them empty (each at least every 60 ``refresh_interval``s),
            instead of every one at every look (docs/queue.md, "Bells"). None (default): on
            object stores. Producers and consumers should agree: tasks of a producer without
            bells wait up to that minute when the consumers are idle.
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
        spread: int | None = None,
        fsync: bool = False,
        local_io: str | None = None,
        watch: bool = True,
        on_event: EventHook | None = None,
        shards: Mapping[str, int] | None = None,
        lanes: bool | None = None,
        bells: bool | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if lease <= 0:
            raise ValueError("lease must be positive")
        if not refresh_interval > 0:
            raise ValueError(f"refresh_interval must be positive seconds, not {refresh_interval!r}")
        # A consumer begins its claims at one shard for ten listing lives (see _shards).
        self.shards = Shards(shards, period=10 * refresh_interval)
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
        self.on_event = on_event
        self.worker_id = default_worker_id()
        self._checked = False
        self._cache: dict[str, ListingCache] = {}
        self._listing: set[str] = set()  # queues a call of this instance is listing now
        self._picked: dict[str, float] = {}  # candidates' keys this instance tried, and when
        self._reaped: dict[str, float] = {}
        self._run_empty: set[str] = set()
        self._idle: dict[tuple[str, ...], _Idle] = {}
        self.takeovers: dict[str, int] = {}  # expired leases this reaper requeued (metrics)
        self._spawning: set[tuple[str, str, int]] = set()
        self._owed: dict[str, dict[str, str]] = {}  # ended here; dependents not settled yet
        self._owed_at = 0.0
        self._settle_pace = refresh_interval
        self._unreported = []  # waits decided here, events not sent yet
        self._gone = []  # dependencies ended with nothing left to read how
        self._unfinished = {}  # linked tasks the reaper found running: not looked at again
        self.dependency_succeeded = None  # the backend's result look-up
        self.watch = watch
        self._watches: dict[tuple[str, ...], DirWatch | None] = {}
        self.claims: DocumentClaims = claim_strategy(self.store.kind)(self.store, batch)
        self.batch = self.claims.batch
        if spread is None:  # object stores: the whole head (a lost race there costs requests)
            spread = self.batch if self.store.is_remote else 256
        self.spread = max(1, spread)
        if lanes is None:  # (spread=1 asks for strict order: lanes would bend it)
            lanes = self.store.is_remote and self.spread > 1
        # A busy consumer says so every ten listing lives; a waiting call leaves the others'
        # new tasks to them for one listing life when its own lane is empty, ten otherwise.
        self.lanes = Lanes(10 * refresh_interval, refresh_interval, clock_skew) if lanes else None
        if bells is None:
            bells = self.store.is_remote
        # A queue unlisted for sixty listing lives is listed even if its bell is quiet.
        self.bells = Bells(60 * refresh_interval) if bells else None

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
        if self.lanes is not None:
            try:
                await self.store.run(self.lanes.withdraw())
            except Exception as exc:  # entries of the closed stop counting after 30 s
                log.warning("could not withdraw from the claim lanes: %s", exc)
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
        tasks = [self.shards.route(task) for task in tasks]
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
        if self.bells is not None:  # after the tasks: a consumer that hears it lists them
            yield from self.bells.ring(task.queue for task, _ in items)

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
        order = self.shards.claim_order(names)  # sharded: a shard a period first
        await self._check()
        seconds = self.lease if lease is None else float(lease)
        worker = worker_id or self.worker_id
        deadline = time.monotonic() + max(0.0, wait)
        pause = self.poll_interval
        watch = self._watch(names, order) if wait > 0 else None  # before the first look: no gap
        # A poller (waiting, no watch) keeps its pace across calls: looks stay max_poll_interval
        # apart while the queues stay empty, however short each call's wait.
        idle = self._idle.setdefault(tuple(names), _Idle()) if wait > 0 and watch is None else None
        claimed: list[Claimed] = []
        if self._settle_is_due():
            await self._settle_owed()  # busy: the dependents of what ended, at its pace
        while True:
            early = 0.0 if idle is None else idle.next - time.monotonic()
            if early > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                await anyio.sleep(min(early, left))
                continue
            quiet: set[str] = set()
            if self.bells is not None and idle is not None and idle.pause >= self.max_poll_interval:
                # Idle for a few looks: a worker of a busy fleet that finds nothing now and
                # then lists as before (a bell read there would cost a GET, and save nothing
                # while producers ring every second).
                quiet = await self._quiet(order)
            for name in order:
                if name in quiet:
                    continue
                try:
                    got = await self._claim_from(
                        name, seconds, worker, count - len(claimed), claimed, patient=wait > 0
                    )
                except Exception as exc:  # claims from earlier queues are handed out, not stranded
                    hand_over_or_raise(name, claimed, exc)
                    break
                claimed += got
                if got:
                    self.shards.claimed_from(name)
                if len(claimed) >= count:
                    break
            # Idle: settle, and look again if dependents may have been released. A call that
            # waits keeps the settles' pace (a hungry fleet's worker finds nothing after most
            # acks: a settle each time cost 16 workers on S3 kept 100 deep 0.33 LISTs of
            # deps/ a task, now 0.05); one that does not wait settles at once, so that an
            # empty answer (a burst worker's last look, a script's loop) means nothing is owed.
            settle = not claimed and self._owed and (wait <= 0 or self._settle_is_due())
            if settle and await self._settle_owed():
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

    async def _quiet(self, queues: list[str]) -> set[str]:
        """The storage queues among ``queues`` that a poll need not list: their bells say
        nothing was added since they were found empty (``_bells``). A queue whose reaper turn
        has come is reaped here, and listed if that requeued anything; one whose claim lane
        is due a look (to withdraw, after a busy spell) is listed."""
        assert self.bells is not None
        if self.claims.unsettled:  # claims whose landing is unknown: settled by the next look
            return set()
        await self.store.run(self.bells.listen(queues))
        quiet: set[str] = set()
        requeued: set[str] = set()  # a shard's turn reaps its siblings too
        for queue in queues:
            current = self._now()
            if not self.bells.quiet(queue, current):
                continue
            if self.lanes is not None and self.lanes.due(queue, current):
                continue
            requeued |= await self._reap_if_due(queue, current)
            quiet.add(queue)
        return quiet - requeued

    def _watch(self, names: list[str], queues: list[str]) -> DirWatch | None:
        """A wake-up on new ready tasks and due markers of ``queues``, the storage queues of
        ``names`` (a local directory on Linux: inotify), else None: the caller polls. Kept
        for the queue's lifetime."""
        key = tuple(names)
        if key not in self._watches:
            dirs = [
                f"{self.store.root}/{n}/{area}" for n in sorted(queues) for area in ("ready", "due")
            ]
            local = self.watch and self.store.kind == "local"
            self._watches[key] = DirWatch.open(dirs) if local else None
        return self._watches[key]

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
