"""The threads plain task functions run in, on asyncio.

``anyio.to_thread.run_sync`` costs ~90 µs of the event loop's CPU per call (a capacity
limiter, cancel scopes and checkpoints), about a sixth of a no-op task's life in the worker,
and caps every process at 40 threads. ``TaskThreads.run`` does what the worker needs with
one future: the function runs in an idle thread (or a new one, when none is idle) with a copy
of the caller's context (so a span the hooks made current is current in the function), and
awaiting it is cancellable at once: a timed-out or cancelled call abandons its thread, which
finishes the function and drops the outcome. Because a call never waits for a busy thread, an
abandoned thread never delays the next task. Threads left idle for ``IDLE_EXIT`` seconds end.
As in anyio's own worker threads, ``anyio.from_thread`` works in them without a token. Under
trio the worker keeps ``anyio.to_thread``.
"""

from __future__ import annotations

import asyncio
import contextvars
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import anyio.lowlevel
import sniffio

try:  # where anyio.from_thread finds the loop of a worker thread (private, anyio 4)
    from anyio._core import _eventloop as _anyio_eventloop
except ImportError:  # pragma: no cover - another anyio: from_thread then needs a token
    _anyio_eventloop = None  # type: ignore[assignment]
_anyio_threadlocals: Any = getattr(_anyio_eventloop, "threadlocals", None)

T = TypeVar("T")
IDLE_EXIT = 10.0

_Job = tuple[
    asyncio.AbstractEventLoop, "asyncio.Future[Any]", contextvars.Context, Callable[[], Any]
]


def _settle(future: asyncio.Future[Any], ok: bool, outcome: Any) -> None:
    if future.cancelled():  # abandoned: nobody waits for it
        return
    if ok:
        future.set_result(outcome)
    else:
        future.set_exception(outcome)


class TaskThreads:
    """Threads for blocking task functions, started as needed (see the module docstring)."""

    def __init__(self, name: str = "omniq-task") -> None:
        """Made on the event loop whose calls it serves."""
        self._name = name
        self._token = anyio.lowlevel.current_token()
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        # Threads waiting for a job that no call has counted on. A call takes one (or starts
        # a thread), so there are always as many uncounted waiters as jobs in the queue.
        self._idle = 0
        self.started = 0
        # Outcomes not handed to the loop yet, and whether a hand-over is already on its way:
        # outcomes that end together wake the loop once (one self-pipe write, one callback).
        self._done: list[tuple[asyncio.Future[Any], bool, Any]] = []
        self._waking = False

    async def run(self, func: Callable[[], T]) -> T:
        """``func()`` in a thread; its value, or its exception raised here. Not started if
        the caller is cancelled already (as ``anyio.to_thread``)."""
        await anyio.lowlevel.checkpoint_if_cancelled()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._lock:
            start = self._idle == 0
            if not start:
                self._idle -= 1
        context = contextvars.copy_context()
        context.run(sniffio.current_async_library_cvar.set, None)  # no event loop there
        if start:  # before the job is queued: a thread that cannot start leaves no job behind
            threading.Thread(target=self._serve, name=self._name, daemon=True).start()
            self.started += 1
        self._jobs.put((loop, future, context, func))
        return await future

    def _hand_over(self) -> None:
        with self._lock:
            done, self._done, self._waking = self._done, [], False
        for future, ok, outcome in done:
            _settle(future, ok, outcome)

    def _serve(self) -> None:
        if _anyio_threadlocals is not None:
            _anyio_threadlocals.current_token = self._token
            _anyio_threadlocals.current_cancel_scope = None  # from_thread.check_cancelled
        while True:
            try:
                loop, future, context, func = self._jobs.get(timeout=IDLE_EXIT)
            except queue.Empty:
                with self._lock:
                    if self._idle > 0:  # nobody counts on this thread: end it
                        self._idle -= 1
                        return
                continue  # a call counted on a waiter: its job is on the way
            outcome: Any = None
            ok = False
            if not future.cancelled():  # a caller cancelled before the start: not run
                try:
                    outcome, ok = context.run(func), True
                except StopIteration as exc:  # a future refuses it and would never settle
                    outcome = RuntimeError("the task function raised StopIteration")
                    outcome.__cause__ = exc
                except BaseException as exc:  # handed to the caller, as a thread pool does
                    outcome = exc
            with self._lock:  # idle before the caller hears back: its next call reuses it
                self._idle += 1
                self._done.append((future, ok, outcome))
                wake, self._waking = not self._waking, True
            if wake:
                try:
                    loop.call_soon_threadsafe(self._hand_over)
                except RuntimeError:  # the loop is closed: the calls were abandoned with it
                    with self._lock:
                        self._done, self._waking = [], False
            del loop, future, context, func, outcome  # no reference kept while idle
