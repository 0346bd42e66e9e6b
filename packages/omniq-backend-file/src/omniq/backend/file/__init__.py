"""OmniQ's file backend: queue, results and events together, a worker, the ``omniq`` command.

``AsyncFileBackend`` / ``FileBackend`` and their workers ``AsyncWorker`` / ``Worker``.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

from typing_extensions import ParamSpec

from omniq.core.context import TaskContext
from omniq.core.sync import SyncWrapper, blocking, delegate, run_sync
from omniq.storage.file.events import FileEventStorage
from omniq.storage.file.queue import FileQueue
from omniq.storage.file.results import FileResultStorage

from ._backend import AsyncFileBackend, AsyncTaskFunction
from ._config import BackendConfig, resolve_config
from ._functions import FunctionImportError, FunctionNotAllowedError, func_path
from ._schedule_ticks import Schedule, ScheduleInfo
from ._schedules import AsyncSchedules, Schedules, periodic_decorator
from ._worker import AsyncWorker

__version__ = "0.1.0"  # the only copy (pyproject: dynamic); change it with tools/bump.py

log = logging.getLogger("omniq.worker")

P = ParamSpec("P")
R = TypeVar("R")
F = TypeVar("F", bound=Callable[..., Any])


class Worker(SyncWrapper[AsyncWorker]):
    """Blocking twin of :class:`AsyncWorker`: ``worker.run()`` blocks until stopped.

    Runs on OmniQ's shared event-loop thread; SIGINT/SIGTERM received by the main thread
    stop it gracefully (a second signal stops it at once).
    """

    def __init__(self, worker: AsyncWorker) -> None:
        super().__init__(worker)
        worker.handle_signals = False  # signals reach the calling (main) thread instead

    def run(self) -> dict[str, int]:
        """Work until stopped; returns the worker's counters."""
        worker = self._async
        previous: dict[Any, Any] = {}
        if threading.current_thread() is threading.main_thread():

            def handler(signum: int, frame: Any) -> None:
                log.info("received %s; stopping (again to stop now)", signal.Signals(signum).name)
                worker.stop()

            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, handler)
        try:
            return run_sync(worker.run, "Worker.run")
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def stop(self) -> None:
        """Ask the worker to stop gracefully (safe from any thread)."""
        self._async.stop()

    cleanup = blocking(AsyncWorker.cleanup)

    @property
    def stats(self) -> dict[str, int]:
        return self._async.stats

    def close(self) -> None:
        """Nothing to release: the backend owns the storage connections."""


class TaskFunction(Generic[P, R]):
    """A function registered with ``@FileBackend.task``: ``send.enqueue(...)`` blocks and
    returns the task id; calling ``send(...)`` runs it here."""

    def __init__(self, inner: AsyncTaskFunction[P, R]) -> None:
        self._inner = inner
        self.__wrapped__ = inner.func
        self.__omniq_func__ = inner.func
        self.__name__ = inner.__name__
        self.__doc__ = inner.__doc__
        self.path = inner.path

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self._inner.func(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<task {self.path}>"

    def enqueue(self, *args: P.args, **kwargs: P.kwargs) -> str:
        inner = self._inner
        return run_sync(lambda: inner.enqueue(*args, **kwargs), "TaskFunction.enqueue")  # type: ignore[no-any-return]

    def enqueue_with(
        self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, **options: Any
    ) -> str:
        inner = self._inner
        task_id: str = run_sync(
            lambda: inner.enqueue_with(args, kwargs, **options), "TaskFunction.enqueue_with"
        )
        return task_id


class FileBackend(SyncWrapper[AsyncFileBackend]):
    """Blocking twin of :class:`AsyncFileBackend` (same arguments and method names)."""

    def __init__(
        self,
        base_dir: str | os.PathLike[str] | None = None,
        storage_options: dict[str, Any] | None = None,
        **settings: Any,
    ) -> None:
        super().__init__(AsyncFileBackend(base_dir, storage_options, **settings))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **settings: Any) -> FileBackend:
        return cls(environ=environ, **settings)

    @property
    def config(self) -> BackendConfig:
        return self._async.config

    @property
    def queue(self) -> FileQueue:
        """The blocking queue (size, list_queues, list_dead, purge, get_task, ...)."""
        return FileQueue.wrap(self._async.queue)

    @property
    def results(self) -> FileResultStorage | None:
        """The blocking result storage, or None when results are off."""
        part = self._async.results
        return None if part is None else FileResultStorage.wrap(part)

    @property
    def events(self) -> FileEventStorage | None:
        """The blocking event storage (``query``), or None when events are off."""
        part = self._async.events
        return None if part is None else FileEventStorage.wrap(part)

    @property
    def schedules(self) -> Schedules:
        """The blocking schedules: ``list``, ``get``, ``pause``, ``resume``, ``delete``."""
        return Schedules.wrap(self._async.schedules)

    open = blocking(AsyncFileBackend.open)
    emit = blocking(AsyncFileBackend.emit)
    enqueue = blocking(AsyncFileBackend.enqueue)
    enqueue_task = blocking(AsyncFileBackend.enqueue_task)
    chain = blocking(AsyncFileBackend.chain)
    drain = blocking(AsyncFileBackend.drain)
    requeue_dead = blocking(AsyncFileBackend.requeue_dead)
    delete_dead = blocking(AsyncFileBackend.delete_dead)
    result = blocking(AsyncFileBackend.result)
    get_task = blocking(AsyncFileBackend.get_task)
    list_tasks = blocking(AsyncFileBackend.list_tasks)
    cancel = blocking(AsyncFileBackend.cancel)
    schedule = blocking(AsyncFileBackend.schedule)
    make_task = delegate(AsyncFileBackend.make_task)
    dashboard_app = delegate(AsyncFileBackend.dashboard_app)

    def make_schedule(
        self,
        func: Callable[..., Any] | str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> Schedule:
        """Check the arguments of ``schedule`` and build the Schedule (no I/O)."""
        return self._async.make_schedule(func, args, kwargs, **options)

    def periodic(self, **options: Any) -> Callable[[F], F]:
        """Decorator: ``@backend.periodic(every=60)`` stores a schedule for the function now
        (named after it unless ``name=``; the options of ``schedule``) and returns it
        unchanged. Importing the module again updates the same schedule."""
        schedules = self.schedules

        def register(schedule: Schedule) -> None:
            schedules.add(schedule)

        return periodic_decorator(self._async, register, dict(options))

    def task(self, func: Callable[P, R] | None = None, **options: Any) -> Any:
        """Decorator: ``@backend.task(queue="mail")`` then ``send.enqueue(to=...)``."""

        def wrap(fn: Callable[P, R]) -> TaskFunction[P, R]:
            return TaskFunction(AsyncTaskFunction(self._async, fn, options))

        return wrap(func) if func is not None else wrap

    def worker(
        self,
        queues: Sequence[str] | str = ("default",),
        concurrency: int = 4,
        *,
        metrics_port: int | None = None,
        metrics_host: str = "127.0.0.1",
        **options: Any,
    ) -> Worker:
        """A blocking worker; ``.run()`` works until SIGINT/SIGTERM or ``.stop()``."""
        return Worker(
            self._async.worker(
                queues,
                concurrency,
                metrics_port=metrics_port,
                metrics_host=metrics_host,
                **options,
            )
        )


__all__ = [
    "AsyncFileBackend",
    "AsyncSchedules",
    "AsyncTaskFunction",
    "AsyncWorker",
    "BackendConfig",
    "FileBackend",
    "FunctionImportError",
    "FunctionNotAllowedError",
    "Schedule",
    "ScheduleInfo",
    "Schedules",
    "TaskContext",
    "TaskFunction",
    "Worker",
    "func_path",
    "resolve_config",
]
