"""One heartbeat loop for all the tasks a worker runs: it extends each held lease every third
of it and writes a task's progress and metadata (``TaskContext``) as an early heartbeat, at
most once per ``progress_interval``. A task costs an entry in a dict, not a task of its own."""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel

from omniq.core.context import TaskContext
from omniq.core.errors import LeaseLostError, TaskCancelledError

from ._task_context import progress_event

log = logging.getLogger("omniq.worker")


class Held:
    """One running task's claim as the heartbeat loop sees it. ``state`` is shared with the
    worker: ``claimed`` (the latest lease), and ``lost`` / ``cancelled`` / ``evented`` set
    by the loop."""

    __slots__ = ("beat", "ctx", "done", "last_write", "next_beat", "over", "scope", "state")

    def __init__(self, state: dict[str, Any], ctx: TaskContext, next_beat: float) -> None:
        self.state = state
        self.ctx = ctx
        self.scope: anyio.CancelScope | None = None  # the task's: cancelled if the lease goes
        self.next_beat = next_beat
        self.last_write = -math.inf
        self.beat: anyio.CancelScope | None = None  # a write in flight
        self.done: anyio.Event | None = None  # set when that write ends
        self.over = False  # lease lost or task cancelled: nothing more to write


class Heartbeats:
    """The worker's heartbeat loop (``run`` in the worker's task group). ``hold`` before a
    task runs, ``release`` after: a write still in flight for it is cancelled and awaited,
    so the worker acks or releases with the latest lease and no write after it."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.held: dict[int, Held] = {}
        self._wake = anyio.Event()
        self._token: Any = None
        self._thread = 0
        self._warned = -math.inf

    def hold(self, state: dict[str, Any], ctx: TaskContext) -> Held:
        # A claim whose requests were slow comes with less than its lease left: its first
        # beat is due half-way through what is left, and the loop, which may be asleep for
        # up to a third of a lease, is woken to see it. Otherwise no wake-up: the loop never
        # sleeps longer than a beat, so it looks at this task before its first beat is due.
        left = state["claimed"].remaining().total_seconds()
        first = max(0.0, min(self.worker.lease / 3, left / 2))
        held = Held(state, ctx, time.monotonic() + first)
        self.held[id(held)] = held
        ctx._notify = self.notify
        if first < self.worker.lease / 3:
            self._wake.set()  # hold runs on the loop's thread
        return held

    async def release(self, held: Held) -> None:
        self.held.pop(id(held), None)
        held.ctx._notify = None
        if held.beat is not None and held.done is not None:
            held.beat.cancel()
            with anyio.CancelScope(shield=True):
                await held.done.wait()

    def notify(self) -> None:
        """A context has something to write (called from the loop's thread or any other)."""
        if threading.get_ident() == self._thread:
            self._wake.set()
            return
        try:
            anyio.from_thread.run_sync(self._set_wake, token=self._token)
        except RuntimeError:  # the loop is gone: the attempt is over anyway
            pass

    def _set_wake(self) -> None:
        self._wake.set()

    async def run(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        self._token = anyio.lowlevel.current_token()
        self._thread = threading.get_ident()
        interval = self.worker.progress_interval
        async with anyio.create_task_group() as tg:
            task_status.started()
            while True:
                self._wake = anyio.Event()  # before looking: a notify from now on wakes it
                now = time.monotonic()
                until = now + self.worker.lease / 3
                for held in list(self.held.values()):
                    if held.beat is not None or held.over:
                        continue
                    due = held.next_beat
                    if held.ctx._pending():
                        due = min(due, held.last_write + interval)
                    if due <= now:
                        held.beat = anyio.CancelScope()
                        held.done = anyio.Event()
                        tg.start_soon(self._write, held)
                    else:
                        until = min(until, due)
                with anyio.move_on_after(until - now):
                    await self._wake.wait()
                self._check_late(time.monotonic() - until)

    def _check_late(self, late: float) -> None:
        """Warn (at most once a lease) when the loop woke over a third of a lease late: the
        event loop was blocked, and tasks held through a stall of about a lease are taken
        over by other workers."""
        lease = self.worker.lease
        if late <= lease / 3 or time.monotonic() - self._warned < lease:
            return
        self._warned = time.monotonic()
        log.warning(
            "the worker's event loop was blocked: heartbeats ran %.1f s late (a sync hook,"
            " CPU-bound code in an async task, an overloaded machine); tasks held through a"
            " stall of the lease (%g s) plus the clock skew are taken over by other workers",
            late,
            lease,
        )

    async def _write(self, held: Held) -> None:
        """Extend the lease, with the context's values if any; a write is a heartbeat: a
        holder that lost its lease fails it the same way and extends nothing."""
        worker, state, ctx = self.worker, held.state, held.ctx
        assert held.beat is not None and held.done is not None
        try:
            with held.beat:
                progress, meta, changed = ctx._take()
                extra: dict[str, Any] = {}
                if progress is not None or meta is not None:
                    extra = {"progress": progress, "metadata": meta}
                try:
                    state["claimed"] = await worker.queue.extend_lease(
                        state["claimed"], worker.lease, **extra
                    )
                except LeaseLostError:
                    state["lost"] = held.over = True
                    if held.scope is not None:
                        held.scope.cancel()
                    return
                except TaskCancelledError:
                    ctx._mark_cancelled()
                    state["cancelled"] = held.over = True
                    if held.scope is not None:
                        held.scope.cancel()
                    return
                except Exception as exc:
                    log.warning("heartbeat for task %s failed: %s", state["claimed"].id, exc)
                else:
                    if changed and progress is not None:
                        await progress_event(worker, state["claimed"], progress)
                        state["evented"] = progress
                held.last_write = time.monotonic()
                held.next_beat = held.last_write + worker.lease / 3
        finally:
            held.beat = None
            held.done.set()
            self._wake.set()  # its next beat is due later: the loop recomputes its sleep
