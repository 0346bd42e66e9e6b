"""The worker: claims tasks, runs them, records results and events, retries, heartbeats.

It is written against the storage contract only (``omniq.core.interfaces``): any backend of
the shape of ``WorkerBackend`` works with it, the file backend being one of them."""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import Any

import anyio
import msgspec
import sniffio

from omniq.core import RedactFilter, codec
from omniq.core.context import TaskContext
from omniq.core.errors import (
    LeaseLostError,
    SerializationError,
    StorageError,
    TaskCancelledError,
)
from omniq.core.interfaces import WorkerBackend, cancelled_result, default_worker_id
from omniq.core.maintenance import TEMP_FILE_AGE
from omniq.core.models import (
    Claimed,
    ErrorInfo,
    EventType,
    ResultStatus,
    TaskEvent,
    TaskResult,
    TaskStatus,
    utcnow,
)
from omniq.core.names import validate_name

from ._claimers import (
    ClaimFailures,
    ClaimHelpers,
    default_claimers,
    hand_out,
    release,
    take_free,
)
from ._functions import FunctionImportError, FunctionNotAllowedError, resolve
from ._groups import first_error as _first_error
from ._heartbeats import Heartbeats
from ._schedules import run_schedules
from ._task_context import Hooks, call_task, last_progress_event, make_context
from ._task_threads import TaskThreads

log = logging.getLogger("omniq.worker")
log.addFilter(RedactFilter())  # storage errors may quote URLs; credentials never show

# Kept importable from here: ``TEMP_FILE_AGE`` (now in omniq.core.maintenance, used by the
# file storages' ``maintain``) and ``cancelled_result`` (now in omniq.core.interfaces).
__all__ = ["TEMP_FILE_AGE", "AsyncWorker", "cancelled_result"]


class AsyncWorker:
    """Runs tasks from ``queues`` with at most ``concurrency`` at a time.

    ``backend`` is anything of the shape of ``omniq.core.interfaces.WorkerBackend``: a queue
    (an ``AsyncQueue``), optional result and event storages, ``emit`` and
    ``config.event_retention`` (an ``AsyncFileBackend``, or any other backend built on the
    same abstract classes). Async functions run on the event loop, plain functions in a thread
    pool, or in a process pool with ``processes=N`` (for CPU-bound work). A task never holds
    a slot it does not have: the worker claims only when a slot is free. Leases are extended
    every third of their length while a task runs. On SIGINT/SIGTERM (or ``stop()``) it takes
    nothing new, lets running tasks finish for ``grace`` seconds, then releases the rest so
    another worker gets them at once.

    Args:
        allow: if given, only functions whose path matches an entry run (exact
            ``"pkg.mod:func"`` or a module prefix ``"pkg.mod"``); others fail without retry.
        lease: seconds of each claim (default: the queue's ``lease``); heartbeats every third.
        cleanup_interval: seconds between expiry clean-ups of results and events.
        sweep_interval: seconds (default a day, with 10 % jitter; None: never) between clean-ups
            that also run each storage's ``maintain(sweep=True)`` and the queue's ``repair``
            of the worker's queues. On the file storages the sweep reads every stored result
            (``cleanup_expired(sweep=True)``), the backstop for results whose batched expiry
            marker a killed process never wrote, and removes temporary files an hour old
            (left locally by a process killed mid-write).
        burst: stop once the queues stay empty for ``idle_timeout`` seconds (like
            ``rq worker --burst``) and no delayed or retrying task comes due within
            ``burst_horizon`` seconds (default 60).
        storage_timeout: in burst mode, give up once every claim has failed for this many
            seconds (default 30; None: never): ``run()`` raises ``StorageError`` after running
            tasks finish. Without ``burst`` the worker keeps retrying through outages.
        schedules: fire the due ticks of the schedules (``base_dir/schedules``), read at most
            once per ``schedule_refresh`` seconds (default 1); False: this worker fires none
            (``omniq worker --no-schedules``). Only for a backend that has ``schedules``
            (the file backend); others fire none.
        hooks: objects with any of ``before_task(ctx)``, ``after_task(ctx, result)``,
            ``on_failure(ctx, error)`` (sync or async), called in order around each task
            (docs/worker.md, "Hooks"); a hook that raises is logged, the task unaffected.
            One whose ``active`` attribute is false when ``run`` starts is left out.
        hook_timeout: seconds an async hook may take (default 10; ``before_task`` at most a
            third of the lease, as it runs before the first heartbeat); then it is cancelled.
        progress_interval: seconds; a task's progress and metadata (``TaskContext``) are
            written at most once per interval (default 1), besides the heartbeats.
        claimers: claim calls in flight at once while tasks are waiting (default 1 on a
            local directory or memory, 4 on an object store; at most ``concurrency``). Each
            claims for every free slot; an idle worker polls with one.

    ``run()`` raises the error that stopped the worker itself (``CapabilityError``,
    ``StorageError``, ...), never an exception group; other errors raised at the same time are
    logged and attached to it as notes.
    """

    def __init__(
        self,
        backend: WorkerBackend,
        queues: Sequence[str] | str = ("default",),
        concurrency: int = 4,
        *,
        processes: int | None = None,
        lease: float | None = None,
        grace: float = 30.0,
        allow: Sequence[str] | None = None,
        cleanup_interval: float = 600.0,
        sweep_interval: float | None = 86_400.0,
        poll: float = 1.0,
        burst: bool = False,
        idle_timeout: float = 1.0,
        burst_horizon: float = 60.0,
        storage_timeout: float | None = 30.0,
        worker_id: str | None = None,
        handle_signals: bool = True,
        schedules: bool = True,
        schedule_refresh: float = 1.0,
        hooks: Sequence[Any] = (),
        progress_interval: float = 1.0,
        hook_timeout: float = 10.0,
        claimers: int | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if not schedule_refresh > 0:
            raise ValueError("schedule_refresh must be > 0 seconds")
        self.backend = backend
        self.queue = backend.queue
        # Unsafe names are refused now, not inside run()'s task group.
        given: Any = queues
        single = isinstance(given, (str, bytes)) or not isinstance(given, Iterable)
        self.queues = [validate_name(q, "queue name") for q in ([given] if single else given)]
        self.concurrency = concurrency
        if claimers is not None and claimers < 1:
            raise ValueError("claimers must be >= 1")
        self.claimers = min(concurrency, claimers or default_claimers(self.queue))
        self.processes = processes
        self.lease = lease or self.queue.lease
        self.grace = grace
        self.allow = list(allow) if allow is not None else None
        self.cleanup_interval = cleanup_interval
        self.sweep_interval = sweep_interval
        # Not at start-up: many workers restarting together would each read every result.
        self._next_sweep = time.monotonic() + (sweep_interval or 0.0) * random.uniform(0.9, 1.1)
        self.poll = poll
        self.burst = burst
        self.idle_timeout = idle_timeout
        self.burst_horizon = burst_horizon
        self.storage_timeout = storage_timeout
        self.worker_id = worker_id or default_worker_id()
        self.handle_signals = handle_signals
        self.schedules = schedules
        self.schedule_refresh = schedule_refresh
        self.hooks = Hooks(hooks)
        self._live_hooks = self.hooks  # those active when run() starts (Hooks.live)
        if not hook_timeout > 0:
            raise ValueError("hook_timeout must be > 0 seconds")
        self.hook_timeout = hook_timeout
        if not progress_interval > 0:
            raise ValueError("progress_interval must be > 0 seconds")
        self.progress_interval = progress_interval
        self.schedule_runner: Any = None  # the ScheduleRunner while run() runs
        self.stats = {
            "claimed": 0,
            "succeeded": 0,
            "failed": 0,
            "retried": 0,
            "dead": 0,
            "released": 0,
            "lost": 0,
            "cancelled": 0,
        }
        self.running: dict[str, Claimed] = {}
        self.max_running = 0
        self._stopping = False
        self._scopes: dict[str, anyio.CancelScope] = {}
        self._beats = Heartbeats(self)
        self._threads: TaskThreads | None = None  # set by run() on asyncio

    def __repr__(self) -> str:
        return (
            f"AsyncWorker({self.worker_id!r}, queues={self.queues}, concurrency={self.concurrency})"
        )

    def _stop_requested(self) -> bool:
        # A call, not the attribute: the type checker would narrow ``self._stopping`` to
        # False inside the run loop, although stop() may set it at any await.
        return self._stopping

    def stop(self) -> None:
        """Ask the worker to stop gracefully (thread-safe; a second call stops at once)."""
        if self._stopping:
            self.grace = 0.0
        self._stopping = True

    async def _event(self, kind: EventType, claimed: Claimed, **fields: Any) -> None:
        if self.backend.events is not None:
            await self.backend.emit(
                TaskEvent(
                    task_id=claimed.id,
                    type=kind,
                    queue=claimed.queue,
                    worker_id=self.worker_id,
                    attempt=claimed.attempt,
                    **fields,
                )
            )

    async def run(self) -> dict[str, int]:
        """Work until stopped (or, in burst mode, until the queues are empty).

        Raises the first error that stopped the worker (e.g. ``CapabilityError`` when the
        storage does not enforce exclusive create; in burst mode ``StorageError`` once claims
        have failed for ``storage_timeout`` seconds), never an exception group."""
        error: BaseException | None = None
        try:
            return await self._run()
        except BaseException as exc:
            if not isinstance(getattr(exc, "exceptions", None), tuple):
                raise
            error = _first_error(exc)
            if error is exc:
                raise
        raise error  # outside the except block: its own cause and context stay as they were

    async def _run(self) -> dict[str, int]:
        log.info(
            "worker %s started on %s (concurrency %d)",
            self.worker_id,
            ",".join(self.queues),
            self.concurrency,
        )
        opener = getattr(self.backend, "open", None)
        if opener is not None:  # before any lease is held (AsyncFileBackend.open says why)
            await opener(schedules=self.schedules)
        slots = anyio.Semaphore(self.concurrency)
        self._live_hooks = self.hooks.live()
        self._process_limiter = anyio.CapacityLimiter(self.processes or 1)
        on_asyncio = sniffio.current_async_library() == "asyncio"
        self._threads = TaskThreads() if on_asyncio else None
        async with anyio.create_task_group() as tg:
            if self.handle_signals and threading.current_thread() is threading.main_thread():
                tg.start_soon(self._watch_signals)
            tg.start_soon(self._cleanup_loop)
            self._beats = Heartbeats(self)
            await tg.start(self._beats.run)
            if self.schedules and getattr(self.backend, "schedules", None) is not None:
                tg.start_soon(run_schedules, self)

            def start(claimed: Claimed) -> None:
                self.running[claimed.id] = claimed
                self.max_running = max(self.max_running, len(self.running))
                tg.start_soon(self._run_one, claimed, slots)

            helpers = ClaimHelpers(self, slots, self.claimers - 1)
            helpers.start(tg, start)
            idle_since: float | None = None
            failures = ClaimFailures(self)
            while not self._stopping:
                got_slot = final_look = False
                with anyio.move_on_after(self.poll):
                    await slots.acquire()
                    got_slot = True
                if got_slot:
                    if self._stop_requested():  # stopped while waiting: take nothing new
                        slots.release()
                        break
                    # Not under the poll timeout: a claim cancelled half-way (after its run
                    # file was created) would leave the task claimed by no one until the
                    # lease expired. dequeue's own ``wait`` bounds this call.
                    # Burst mode stops only after a look that found nothing: an idle poller's
                    # dequeue may skip looking (its pace), so the last one before stopping
                    # does not wait and always looks.
                    final_look = (
                        self.burst
                        and idle_since is not None
                        and time.monotonic() - idle_since >= self.idle_timeout
                    )
                    # Every free slot is claimed for in one call: on an object store the
                    # claims then overlap (a batch costs about one claim's latency).
                    free = 1 + take_free(slots)
                    try:
                        batch = await self.queue.dequeue_many(
                            free,
                            self.queues,
                            lease=self.lease,
                            wait=0.0 if final_look else min(self.poll, 0.5),
                            worker_id=self.worker_id,
                        )
                    except (StorageError, OSError) as exc:
                        # Storage trouble (an outage, a store restarting) must not kill the
                        # worker: log it, back off, try again.
                        release(slots, free)
                        delay = failures.failed(exc)
                        if failures.gave_up is not None:
                            break
                        await self._pause(delay)
                        continue
                    except BaseException:
                        release(slots, free)
                        raise
                    failures.reset()
                    # Stopped while polling: what it got is given back.
                    if await hand_out(self, slots, free, batch, start, self._stop_requested()):
                        idle_since = None
                        helpers.found_work()
                        continue
                if self.burst and not self.running:
                    idle_since = idle_since or time.monotonic()
                    if final_look:
                        if not await self._due_soon():
                            # A helper's claim in flight may still land: closed for a burst
                            # end (not a stop), helpers start what they got, and then the
                            # worker goes on without them instead of leaving it behind.
                            await helpers.close()
                            if not self.running:
                                break
                        idle_since = None
            await helpers.close()
            await self._drain()
            tg.cancel_scope.cancel()
        self._stopping = False  # a stop() before run() is honoured; afterwards it may run again
        if failures.gave_up is not None:
            log.error("worker %s stopped: %s", self.worker_id, failures.gave_up)
            raise failures.gave_up
        log.info("worker %s stopped: %s", self.worker_id, self.stats)
        return dict(self.stats)

    async def _due_soon(self) -> bool:
        """Burst mode: whether a delayed or retrying task comes due within burst_horizon."""
        now = utcnow()
        horizon = now + timedelta(seconds=self.burst_horizon)
        for name in self.queues:
            # Only future ones: a task already due that we did not claim is not claimable.
            due = await self.queue.next_due(name, after=now)
            if due is not None and due <= horizon:
                return True
        return False

    async def _pause(self, seconds: float) -> None:
        """Sleep ``seconds``, or less if the worker is asked to stop meanwhile."""
        end = time.monotonic() + seconds
        while not self._stop_requested() and (left := end - time.monotonic()) > 0:
            await anyio.sleep(min(0.1, left))

    async def _drain(self) -> None:
        with anyio.move_on_after(self.grace):
            while self.running:
                await anyio.sleep(0.05)
        for task_id, scope in list(self._scopes.items()):
            log.info("task %s did not finish within the grace period; releasing it", task_id)
            scope.cancel()
        while self.running:
            await anyio.sleep(0.01)

    async def _watch_signals(self) -> None:
        try:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    log.info(
                        "received %s; stopping (again to stop now)", signal.Signals(signum).name
                    )
                    self.stop()
        except (NotImplementedError, RuntimeError, ValueError):
            return

    async def _cleanup_loop(self) -> None:
        while True:
            await anyio.sleep(self.cleanup_interval)
            await self.cleanup()

    def _sweep_due(self) -> bool:
        if self.sweep_interval is None or time.monotonic() < self._next_sweep:
            return False
        self._next_sweep = time.monotonic() + self.sweep_interval * random.uniform(0.9, 1.1)
        return True

    async def cleanup(self) -> None:
        """Drop expired results and old events (runs by itself every cleanup_interval): each
        storage's ``maintain(sweep=...)``, then ``results.cleanup_expired()`` and
        ``events.cleanup(event_retention)``. When a sweep is due (``sweep_interval``),
        ``maintain`` gets ``sweep=True`` (on the file storages: read every result, remove
        stale temporary files) and the queue's ``repair`` runs for each of the worker's
        queues. An error is logged; the next round tries again."""
        try:
            sweep = self._sweep_due()
            await self.queue.maintain(sweep=sweep)
            if sweep:
                for queue in self.queues:  # what a process killed between two writes left
                    if redone := await self.queue.repair(queue):
                        log.warning("repair redid %d interrupted step(s) in %s", redone, queue)
            if self.backend.results is not None:
                await self.backend.results.maintain(sweep=sweep)
                await self.backend.results.cleanup_expired()
            if self.backend.events is not None:
                await self.backend.events.maintain(sweep=sweep)
                retention = self.backend.config.event_retention
                if retention is not None:
                    await self.backend.events.cleanup(timedelta(seconds=retention))
        except Exception:
            log.exception("expiry clean-up failed; will try again")

    # -- one task ----------------------------------------------------------------------------
    async def _run_one(self, claimed: Claimed, slots: anyio.Semaphore) -> None:
        ctx = make_context(claimed, self.worker_id)
        hooks = self._live_hooks
        try:
            if hooks:
                limit = min(self.hook_timeout, self.lease / 3)
                await hooks.call("before_task", ctx, timeout=limit)
                if claimed.remaining() <= timedelta(0):
                    # A sync hook blocked the loop past the lease: another worker may hold
                    # the task now. Running it here could run the attempt twice.
                    self.stats["lost"] += 1
                    log.warning(
                        "task %s: its lease ran out in before_task; not run (attempt %d)",
                        claimed.id,
                        claimed.attempt,
                    )
                    return
            try:
                value, error = await self._execute(claimed, ctx)
            except StorageError as exc:
                log.warning(
                    "task %s: storage failed while recording its outcome (%s: %s); it will "
                    "run again once its lease expires",
                    claimed.id,
                    type(exc).__name__,
                    exc,
                )
                value, error = None, exc
            if not hooks:
                pass
            elif error is None:
                await hooks.call("after_task", ctx, value, timeout=self.hook_timeout)
            else:
                await hooks.call("on_failure", ctx, error, timeout=self.hook_timeout)
        except Exception:
            log.exception("internal error while handling task %s", claimed.id)
        finally:
            self.running.pop(claimed.id, None)
            slots.release()

    async def _execute(
        self, claimed: Claimed, ctx: TaskContext
    ) -> tuple[Any, BaseException | None]:
        """Run the task and record its outcome (in ``ctx.outcome``); returns what the
        function returned, or the error it ended with (None if it returned)."""
        self.stats["claimed"] += 1
        task = claimed.task
        started = ctx.started_at
        log.info("task %s %s started (attempt %d)", task.id, task.func, claimed.attempt)
        await self._event(EventType.STARTED, claimed, data={"func": task.func})
        state: dict[str, Any] = {"claimed": claimed, "lost": False, "cancelled": False}
        outcome: Any = None
        error: BaseException | None = None
        retry = True
        try:
            func = resolve(task.func, self.allow)
        except (FunctionImportError, FunctionNotAllowedError) as exc:
            error, retry = exc, False
        else:
            # Whether the function returned or raised (not ``scope.cancelled_caught``: the
            # heartbeat loop may cancel the scope after the function returned).
            finished = False
            held = self._beats.hold(state, ctx)
            try:
                with anyio.CancelScope() as scope:
                    held.scope = self._scopes[task.id] = scope
                    try:
                        outcome = await call_task(self, func, claimed, ctx)
                        finished = True
                    except Exception as exc:
                        error, finished = exc, True
            finally:
                self._scopes.pop(task.id, None)
                await self._beats.release(held)
            if not finished and not state["lost"] and not state["cancelled"]:
                await self._release(state["claimed"], ctx)
                return None, TaskCancelledError(
                    f"task {task.id} was released: the worker stopped before it finished"
                )
        claimed = state["claimed"]
        await last_progress_event(self, claimed, ctx, state)
        duration = (utcnow() - started).total_seconds()
        if state["lost"]:
            self.stats["lost"] += 1
            ctx.outcome = "lost"
            log.warning("task %s: lease lost to another worker; result discarded", task.id)
            return None, LeaseLostError(f"the lease of task {task.id} was taken over")
        if state["cancelled"]:
            self.stats["cancelled"] += 1
            log.info("task %s cancelled while running", task.id)
            result = cancelled_result(task, claimed.attempt, self.worker_id, started)
            await self._record(msgspec.structs.replace(result, metadata=dict(ctx.metadata)))
            ctx.outcome = "cancelled"
            await self._event(EventType.CANCELLED, claimed, duration=duration)
            return None, TaskCancelledError(f"task {task.id} was cancelled")
        if error is None and self.backend.results is not None and not _small(outcome):
            try:  # a return value that cannot be stored is the task's failure, not a success
                # A full encode, not check_json_value: the size limit applies to the document.
                codec.encode(
                    TaskResult(task_id=task.id, status=ResultStatus.SUCCESS, value=outcome)
                )
            except SerializationError as exc:
                error, retry = exc, False
        if error is None:
            await self._succeed(claimed, outcome, ctx, duration)
            return outcome, None
        await self._fail(claimed, error, retry, ctx, duration)
        return None, error

    async def _release(self, claimed: Claimed, ctx: TaskContext | None = None) -> None:
        try:
            await self.queue.release(claimed)
            self.stats["released"] += 1
            outcome = "released"
        except LeaseLostError:
            self.stats["lost"] += 1
            outcome = "lost"
        if ctx is not None:
            ctx.outcome = outcome

    def _result(
        self,
        claimed: Claimed,
        ctx: TaskContext,
        *,
        value: Any = None,
        error: ErrorInfo | None = None,
    ) -> TaskResult:
        task = claimed.task
        status = ResultStatus.SUCCESS if error is None else ResultStatus.FAILURE
        return TaskResult(
            task_id=task.id,
            status=status,
            value=value,
            error=error,
            attempt=claimed.attempt,
            queue=task.queue,
            func=task.func,
            worker_id=self.worker_id,
            started_at=ctx.started_at,
            metadata=dict(ctx.metadata),
        )

    async def _record(self, result: TaskResult, claimed: Claimed | None = None) -> None:
        if self.backend.results is not None:
            # Inside our lease no later attempt can exist (takers wait for the lease plus the
            # clock skew), so the result storage may skip its read-compare.
            latest = claimed is not None and utcnow() < claimed.lease_until
            await self.backend.results.set(result, check_attempt=not latest)

    async def _succeed(
        self, claimed: Claimed, value: Any, ctx: TaskContext, duration: float
    ) -> None:
        task = claimed.task
        await self._record(self._result(claimed, ctx, value=value), claimed)
        try:
            await self.queue.ack(claimed)
            ctx.outcome = "done"
        except LeaseLostError:
            self.stats["lost"] += 1
            ctx.outcome = "lost"
            log.warning("task %s finished after its lease was taken over", task.id)
            return
        self.stats["succeeded"] += 1
        log.debug("task %s succeeded in %.3fs", task.id, duration)
        await self._event(EventType.SUCCEEDED, claimed, duration=duration)

    async def _fail(
        self, claimed: Claimed, error: BaseException, retry: bool, ctx: TaskContext, duration: float
    ) -> None:
        task = claimed.task
        if isinstance(error, TimeoutError) and not str(error):
            error = TimeoutError(f"task exceeded its timeout of {task.timeout}s")
        info = ErrorInfo.from_exception(error)
        try:
            status = await self.queue.nack(claimed, error=info, retry=retry)
        except LeaseLostError:
            self.stats["lost"] += 1
            ctx.outcome = "lost"
            return
        ctx.outcome = "dead" if status is TaskStatus.DEAD else "retried"
        self.stats["failed"] += 1
        if status is TaskStatus.DEAD:
            self.stats["dead"] += 1
            log.info("task %s failed: %s: %s (dead-lettered)", task.id, info.type, info.message)
            await self._record(self._result(claimed, ctx, error=info))
            await self._event(EventType.FAILED, claimed, error=info, duration=duration)
            await self._event(EventType.DEAD_LETTERED, claimed, error=info)
        else:
            self.stats["retried"] += 1
            log.info("task %s failed: %s: %s (will retry)", task.id, info.type, info.message)
            await self._event(EventType.RETRIED, claimed, error=info, duration=duration)


def _small(value: Any) -> bool:
    """A return value whose result document surely encodes (no need to try it first)."""
    return (
        value is None
        or value is True
        or value is False
        or (type(value) is int and -(2**63) <= value < 2**64)
    )
