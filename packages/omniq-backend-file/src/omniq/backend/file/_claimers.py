"""How the worker claims: its extra claimers (more claims in flight while tasks are waiting),
and the main claim loop's back-off through storage trouble.

On an object store a claim is a read and a conditional create (two request latencies) and a
listing refresh three more, so one claim loop caps a worker at a few batches a second
however many slots it has. While the worker's main loop finds work, ``ClaimHelpers`` run
``count`` more loops that each take the free slots and claim for them (``dequeue_many``
with a token wait, ``HELPER_WAIT``: a waiting call, which with claim lanes leaves other
consumers' new tasks to them; it shares the main loop's pace of empty looks). A helper that
finds nothing parks until the main loop claims again, so an idle worker polls with one loop
only: its requests per minute do not grow with helpers.

A helper never leaves a claim half-done: ``close`` cancels it only while it waits for a
slot; a claim in flight is finished, what it got started or given back, then the helper
exits. Cancelling a claim could strand a task whose claim file was created but not
returned.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import anyio

from omniq.core.errors import StorageError
from omniq.core.models import Claimed

log = logging.getLogger("omniq.worker")

HELPER_WAIT = 0.001  # seconds: a helper does not wait for tasks, it parks (see _loop)


def take_free(slots: anyio.Semaphore) -> int:
    """Acquire every slot that is free now, without waiting; returns how many."""
    taken = 0
    while True:
        try:
            slots.acquire_nowait()
        except anyio.WouldBlock:
            return taken
        taken += 1


def release(slots: anyio.Semaphore, count: int) -> None:
    for _ in range(count):
        slots.release()


async def hand_out(
    worker: Any,
    slots: anyio.Semaphore,
    free: int,
    batch: list[Claimed],
    start: Callable[[Claimed], None],
    stopping: bool,
) -> bool:
    """What one claim call for ``free`` slots got: started (or given back when the worker
    is ``stopping``), the slots it did not use released. Returns whether any task started."""
    if batch and stopping:
        for claimed in batch:
            await worker._release(claimed)
        batch = []
    release(slots, free - len(batch))
    for claimed in batch:
        start(claimed)
    return bool(batch)


class ClaimFailures:
    """The main claim loop's storage trouble: consecutive failed claims, the back-off before
    the next try, and in burst mode the error to give up with after ``storage_timeout``."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.count = 0
        self.since: float | None = None
        self.gave_up: StorageError | None = None

    def reset(self) -> None:
        self.count, self.since = 0, None

    def failed(self, exc: BaseException) -> float:
        """Record a failed claim; returns the seconds to wait before the next (``gave_up`` is
        set instead when a burst worker's ``storage_timeout`` has passed)."""
        worker = self.worker
        self.count += 1
        self.since = self.since or time.monotonic()
        down = time.monotonic() - self.since
        timeout: float | None = worker.storage_timeout if worker.burst else None
        if timeout is not None and down >= timeout:
            self.gave_up = StorageError(
                f"worker {worker.worker_id}: storage unavailable for {down:.0f} s "
                f"({self.count} failed claims; burst mode gives up after "
                f"storage_timeout={timeout:g} s); last error: {type(exc).__name__}: {exc}"
            )
            self.gave_up.__cause__ = exc
            return 0.0
        delay = min(5.0, 0.1 * 2.0 ** min(self.count, 6))
        if timeout is not None:
            delay = min(delay, max(0.0, timeout - down))
        log.warning(
            "worker %s: claiming from %s failed (%s: %s); retrying in %.1f s",
            worker.worker_id,
            ",".join(worker.queues),
            type(exc).__name__,
            exc,
            delay,
        )
        return delay


def default_claimers(queue: Any) -> int:
    """Claim loops per worker: 1 where a claim is a few local syscalls (memory, a local
    directory: nothing to overlap), 4 on an object store."""
    return 4 if getattr(getattr(queue, "store", None), "is_remote", False) else 1


class ClaimHelpers:
    """``count`` claim loops besides the worker's own (see the module docstring)."""

    def __init__(self, worker: Any, slots: anyio.Semaphore, count: int) -> None:
        self.worker = worker
        self.slots = slots
        self.count = count
        self._work = anyio.Event()  # set (and replaced) each time the main loop claims
        self._open = True
        self._left = count
        self._done = anyio.Event()
        self._waiting: set[anyio.CancelScope] = set()
        if count == 0:
            self._done.set()

    def start(self, tg: anyio.abc.TaskGroup, start_task: Callable[[Claimed], None]) -> None:
        for _ in range(self.count):
            tg.start_soon(self._loop, start_task)

    def found_work(self) -> None:
        """The main loop claimed something: parked helpers claim too."""
        work, self._work = self._work, anyio.Event()
        work.set()

    async def close(self) -> None:
        """Stop the helpers after the claims in flight (what they claim is given back if the
        worker is stopping, else started); returns when all have exited. Idempotent."""
        self._open = False
        self.found_work()
        for scope in self._waiting:
            scope.cancel()
        await self._done.wait()

    async def _loop(self, start_task: Callable[[Claimed], None]) -> None:
        worker = self.worker
        try:
            await self._park()
            while self._open:
                got = False
                scope = anyio.CancelScope()
                self._waiting.add(scope)
                with scope:  # cancelled by close: no claim is in flight here
                    await self.slots.acquire()
                    got = True
                self._waiting.discard(scope)
                if not got:
                    return
                if not self._open or worker._stop_requested():
                    self.slots.release()
                    return
                free = 1 + take_free(self.slots)
                try:
                    # A waiting call (however briefly), as the main loop's: with claim
                    # lanes it leaves other consumers' new tasks to them (docs/queue.md).
                    batch = await worker.queue.dequeue_many(
                        free,
                        worker.queues,
                        lease=worker.lease,
                        wait=HELPER_WAIT,
                        worker_id=worker.worker_id,
                    )
                except (StorageError, OSError) as exc:
                    release(self.slots, free)  # the main loop backs off and retries
                    log.debug("worker %s: a helper's claim failed: %s", worker.worker_id, exc)
                    await self._park()
                    continue
                except BaseException:
                    release(self.slots, free)
                    raise
                # Closed for a burst end, a helper starts what it got (the main loop then
                # goes on); only a worker that was asked to stop gives it back.
                stopping = worker._stop_requested()
                if not await hand_out(worker, self.slots, free, batch, start_task, stopping):
                    await self._park()
        finally:
            self._left -= 1
            if self._left == 0:
                self._done.set()

    async def _park(self) -> None:
        """Wait until the main loop claims again (or the helpers are closed)."""
        if self._open:
            await self._work.wait()
