"""AsyncFileBackend: the queue, the results and (optionally) the events under one base_dir."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar

import msgspec
import sniffio
from typing_extensions import ParamSpec, Self

from omniq.core.errors import (
    ConfigurationError,
    MissingDependencyError,
    NotFoundError,
    UnknownDependencyError,
)
from omniq.core.interfaces import AsyncResource, cancelled_result
from omniq.core.models import (
    DEPENDENCY_FAILURE_MODES,
    EventType,
    ResultStatus,
    Task,
    TaskEvent,
    TaskInfo,
    TaskPage,
    TaskResult,
    TaskStatus,
    utcnow,
)
from omniq.storage.file.events import AsyncFileEventStorage
from omniq.storage.file.queue import AsyncFileQueue
from omniq.storage.file.queue._dependencies import DEPENDENCY_FAILED, check_dependencies
from omniq.storage.file.results import AsyncFileResultStorage

from . import _tracing
from ._config import BackendConfig, resolve_config
from ._drain import drain
from ._functions import func_path
from ._schedule_ticks import Schedule, build_schedule
from ._schedules import AsyncSchedules, periodic_decorator
from ._worker import AsyncWorker

log = logging.getLogger("omniq.backend")
P = ParamSpec("P")
R = TypeVar("R")
F = TypeVar("F", bound=Callable[..., Any])


class AsyncFileBackend(AsyncResource):
    """Queue + result storage + event storage on fsspec filesystems.

    ``AsyncFileBackend("s3://bucket/app", {"key": ..., "secret": ...}, events=True)`` keeps
    ``queue/``, ``results/`` and ``events/`` under the base dir; each part can live elsewhere
    (``queue_dir=``/``queue_options=``, ``results_dir=``, ``events_dir=``). Settings also come
    from ``config`` (a dict) and ``OMNIQ_*`` environment variables; precedence: keyword
    arguments > config > environment > defaults.

    ``immediate=True`` (``OMNIQ_IMMEDIATE=1``) is the testing mode: ``enqueue`` runs the task
    (and whatever else is due in its queue) through the worker before it returns, delays and
    retries included; see ``drain`` and docs/testing.md.

    It has the shape of ``omniq.core.interfaces.WorkerBackend`` (``queue``, ``results``,
    ``events``, ``emit``, ``config.event_retention``), which is all ``AsyncWorker`` uses of it,
    plus ``schedules``, which a worker fires.
    """

    def __init__(
        self,
        base_dir: str | os.PathLike[str] | None = None,
        storage_options: dict[str, Any] | None = None,
        *,
        config: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
        clock: Callable[[], float] | None = None,
        **settings: Any,
    ) -> None:
        self.config: BackendConfig = resolve_config(
            {
                "base_dir": os.fspath(base_dir) if base_dir is not None else None,
                "storage_options": storage_options,
                **settings,
            },
            config,
            environ,
        )
        cfg = self.config
        flush = cfg.event_flush_interval
        if flush is not None and (
            isinstance(flush, bool)
            or not isinstance(flush, (int, float))
            or not 0 <= flush < float("inf")
        ):
            raise ConfigurationError(
                "event_flush_interval (OMNIQ_EVENT_FLUSH_INTERVAL) must be None or seconds "
                f">= 0, not {flush!r}"
            )
        queue_part = cfg.part("queue")
        self.queue = AsyncFileQueue(
            queue_part.base_dir,
            queue_part.storage_options,
            lease=cfg.lease,
            clock_skew=cfg.clock_skew,
            on_event=self._queue_event,
            shards=cfg.queue_shards,
            clock=clock,
        )
        self.results: AsyncFileResultStorage | None = None
        if cfg.results:
            part = cfg.part("results")
            self.results = AsyncFileResultStorage(
                part.base_dir,
                part.storage_options,
                clock=clock,
                default_ttl=None if cfg.result_ttl is None else timedelta(seconds=cfg.result_ttl),
            )
        self.events: AsyncFileEventStorage | None = None
        if cfg.events:
            part = cfg.part("events")
            self.events = AsyncFileEventStorage(part.base_dir, part.storage_options, clock=clock)
            if flush is not None:
                self.events.flush_interval = flush
        self.queue.dependency_succeeded = self._succeeded  # a dependency the queue forgot
        self.schedules = AsyncSchedules(self, clock)
        """The schedules under ``base_dir/schedules`` (list, get, pause, resume, delete)."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **settings: Any) -> Self:
        """Configure from ``OMNIQ_*`` variables (``OMNIQ_BASE_DIR``,
        ``OMNIQ_STORAGE_OPTIONS`` as JSON, ``OMNIQ_EVENTS``, ...), overridden by ``settings``."""
        return cls(environ=environ, **settings)

    def __repr__(self) -> str:
        parts = [repr(self.queue.store.url)]
        parts.append(f"results={self.results.store.url!r}" if self.results else "results=off")
        parts.append(f"events={self.events.store.url!r}" if self.events else "events=off")
        return f"{type(self).__name__}({', '.join(parts)})"

    async def close(self) -> None:
        """Close every part (pending events are written), then raise the first error."""
        error: BaseException | None = None
        for part in (self.queue, self.results, self.events, self.schedules):
            if part is not None:
                try:
                    await part.close()
                except Exception as exc:
                    error = error or exc
        if error is not None:
            raise error

    async def open(self, schedules: bool = False) -> None:
        """Make the object-store clients of the queue, results and events (and, with
        ``schedules``, of the schedules) on this event loop now (``Store.open``). A worker
        calls it before its first claim: made at its first result or event write, a client
        would stall the loop, and the heartbeats of the leases it holds, for up to seconds."""
        await self.queue.store.open()
        if self.results is not None:
            await self.results.store.open()
        if self.events is not None:
            await self.events.store.open()
        if schedules and self.schedules.available:
            await self.schedules.store.store.open()

    async def emit(self, event: TaskEvent) -> None:
        """Record an event if event storage is on (never raises for storage trouble): by
        default before returning, so that a worker killed right after still leaves it; with
        ``event_flush_interval`` set, through the events' background writer (batch files
        within that many seconds; what is pending when a process is killed is lost). Under
        trio, which has no background writer, each event is written at once either way."""
        if self.events is None:
            return
        if self.config.event_flush_interval is None or sniffio.current_async_library() != "asyncio":
            await self.events.log(event)
        else:
            await self.events.submit(event)

    async def _queue_event(self, event: TaskEvent) -> None:
        await self.emit(event)
        if (
            event.type is EventType.CANCELLED
            and event.error is not None
            and event.error.type == DEPENDENCY_FAILED
            and self.results is not None
        ):  # a waiting task cancelled by a failed dependency: waiters of its result stop
            await self.results.set(
                TaskResult(
                    task_id=event.task_id,
                    status=ResultStatus.FAILURE,
                    error=event.error,
                    attempt=0,
                    queue=event.queue,
                    func=event.data.get("func"),
                )
            )

    async def _enqueue(self, task: Task) -> None:
        """The queue's enqueue; a dependency the queue no longer knows (finished and cleaned
        up) counts as met if its stored result says it succeeded."""
        try:
            await self.queue.enqueue(task)
        except UnknownDependencyError as exc:
            met = set()
            for dep in exc.task_ids:
                if not await self._succeeded(dep):
                    raise
                met.add(dep)
            left = [dep for dep in task.depends_on if dep not in met]
            await self.queue.enqueue(msgspec.structs.replace(task, depends_on=left))
        if task.depends_on:
            data = {"func": task.func, "depends_on": list(task.depends_on)}
            await self.emit(
                TaskEvent(task_id=task.id, type=EventType.WAITING, queue=task.queue, data=data)
            )

    async def _succeeded(self, task_id: str) -> bool:
        """Whether the stored result of ``task_id`` says it succeeded."""
        found = await self.results.get(task_id) if self.results is not None else None
        return found is not None and found.ok

    async def chain(self, *tasks: Task) -> list[str]:
        """Enqueue ``tasks`` (from ``make_task``) so that each runs after the previous one
        succeeded (each depends on the one before it, besides its own ``depends_on``); if one
        fails for good the rest are cancelled (with ``on_dependency_failure="run"`` a task runs
        anyway). Returns their ids, in order."""
        ids: list[str] = []
        for task in tasks:
            if ids and ids[-1] not in task.depends_on:
                task = msgspec.structs.replace(task, depends_on=[ids[-1], *task.depends_on])
            ids.append(await self.enqueue_task(task))
        return ids

    # -- producing ---------------------------------------------------------------------------
    def make_task(
        self,
        func: Callable[..., Any] | str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        queue: str = "default",
        priority: int = 0,
        delay: float | timedelta | None = None,
        eta: datetime | None = None,
        ttl: float | timedelta | None = None,
        max_retries: int | None = None,
        retry_backoff: float | None = None,
        timeout: float | None = None,
        task_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        depends_on: Sequence[str] | None = None,
        on_dependency_failure: str = "cancel",
    ) -> Task:
        """Build the Task that ``enqueue`` would store (no I/O)."""
        if delay is not None and eta is not None:
            raise ConfigurationError("give delay or eta, not both")
        now = utcnow()
        if delay is not None:
            eta = now + (delay if isinstance(delay, timedelta) else timedelta(seconds=delay))
        expires = None
        if ttl is not None:
            expires = (eta or now) + (ttl if isinstance(ttl, timedelta) else timedelta(seconds=ttl))
        fields: dict[str, Any] = {
            "func": func_path(func),
            "args": list(args),
            "kwargs": dict(kwargs or {}),
            "queue": queue,
            "priority": priority,
            "eta": eta,
            "expires_at": expires,
            "max_retries": self.config.max_retries if max_retries is None else max_retries,
            "timeout": self.config.timeout if timeout is None else timeout,
            "metadata": dict(metadata or {}),
        }
        if retry_backoff is not None:
            fields["retry_backoff"] = retry_backoff
        if task_id is not None:
            fields["id"] = task_id
        if depends_on:
            if isinstance(depends_on, str):
                raise ConfigurationError("depends_on is a list of task ids, not one string")
            fields["depends_on"] = list(dict.fromkeys(depends_on))
            check_dependencies(task_id or "(new)", fields["depends_on"])
        if on_dependency_failure not in DEPENDENCY_FAILURE_MODES:
            raise ConfigurationError(
                f"on_dependency_failure must be 'cancel' or 'run', not {on_dependency_failure!r}"
            )
        fields["on_dependency_failure"] = on_dependency_failure
        return Task(**fields)

    async def enqueue(
        self,
        /,
        func: Callable[..., Any] | str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> str:
        """Queue ``func(*args, **kwargs)``; returns the task id.

        Options: queue, priority, delay (s or timedelta), eta, ttl, max_retries,
        retry_backoff, timeout, task_id, metadata, depends_on (task ids that must succeed
        first; unknown ids and cycles raise DependencyError) and on_dependency_failure
        (``"cancel"``, the default, or ``"run"``): see docs/dependencies.md. ``args``/``kwargs`` are explicit, so a
        user argument named ``queue`` or ``timeout`` never collides with an option.
        """
        task = self.make_task(func, args, kwargs, **options)
        with _tracing.enqueue_span(task):
            await self._enqueue(task)
        await self.emit(
            TaskEvent(
                task_id=task.id, type=EventType.ENQUEUED, queue=task.queue, data={"func": task.func}
            )
        )
        if self.config.immediate:
            await self.drain(task.queue, include_scheduled=True)
        return task.id

    async def enqueue_task(self, task: Task) -> str:
        with _tracing.enqueue_span(task):
            await self._enqueue(task)
        await self.emit(
            TaskEvent(
                task_id=task.id, type=EventType.ENQUEUED, queue=task.queue, data={"func": task.func}
            )
        )
        if self.config.immediate:
            await self.drain(task.queue, include_scheduled=True)
        return task.id

    # -- testing mode (docs/testing.md) ------------------------------------------------------
    async def drain(
        self,
        /,
        queues: Sequence[str] | str | None = None,
        *,
        include_scheduled: bool = False,
        concurrency: int = 1,
        max_rounds: int = 1000,
        **worker_options: Any,
    ) -> dict[str, int]:
        """Run here, through the real worker, every ready task of ``queues`` (None: every
        queue) until none is left, tasks enqueued meanwhile included; returns the worker's
        counters (``claimed``, ``succeeded``, ``failed``, ``retried``, ``dead``, ...).

        With ``include_scheduled``, delayed and retrying tasks are treated as due (in the
        order they come due), so retries run to their end. Results and events are written as
        in production. Meant for tests: ``concurrency`` tasks at a time (default one);
        ``worker_options`` go to ``AsyncWorker`` (``allow``, ``processes``, ...).
        RuntimeError after ``max_rounds`` worker runs that still left scheduled tasks."""
        return await drain(
            self,
            queues,
            include_scheduled=include_scheduled,
            concurrency=concurrency,
            max_rounds=max_rounds,
            **worker_options,
        )

    async def result(self, task_id: str, wait: float | None = None) -> TaskResult | None:
        """The task's result; with ``wait`` seconds, wait for it (ResultTimeoutError)."""
        if self.results is None:
            raise ConfigurationError("result storage is off for this backend (results=False)")
        if wait is None:
            return await self.results.get(task_id)
        return await self.results.wait(task_id, timeout=wait)

    async def requeue_dead(self, queue: str = "default", task_id: str | None = None) -> list[str]:
        """Put dead-lettered tasks (one, or all of ``queue``) back as ready; their stale
        failure results are deleted and an ``enqueued`` event records the requeue."""
        if task_id is not None:
            ids = [task_id]
        else:
            ids = [
                info.task.id
                for info in await self.queue.list_dead(queue, limit=None)
                if info.task is not None
            ]
        done = []
        for one in ids:
            if self.results is not None:
                try:
                    dead = (await self.queue.get_task(one, queue)).status is TaskStatus.DEAD
                except NotFoundError:
                    dead = False
                if not dead:
                    continue
                # Before the requeue: once ready, a fast worker may store the new attempt's
                # result, which a delete after the requeue would remove.
                await self.results.delete(one)
            if await self.queue.requeue_dead(queue, one):
                await self.emit(
                    TaskEvent(
                        task_id=one, type=EventType.ENQUEUED, queue=queue, data={"requeued": True}
                    )
                )
                done.append(one)
        return done

    async def delete_dead(self, queue: str, task_id: str) -> bool:
        """Discard one dead-lettered task (its failure result stays); False if it is not
        dead-lettered in ``queue``."""
        return await self.queue.delete_dead(queue, task_id)

    async def get_task(self, task_id: str) -> TaskInfo:
        return await self.queue.get_task(task_id)

    async def list_tasks(
        self,
        queue: str | None = None,
        status: TaskStatus | str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> TaskPage:
        """One page of tasks by status (``pending``, ``scheduled``, ``waiting``, ``running``,
        ``dead``; None: all) of ``queue`` (None: every queue); ``after`` is the previous
        page's ``next``. See ``AsyncFileQueue.list_tasks``."""
        return await self.queue.list_tasks(queue, status, limit, after)

    async def cancel(self, task_id: str) -> bool:
        """Cancel a task. A pending or scheduled one never runs (a CANCELLED event and a
        FAILURE result record it now); a running one stops at its next heartbeat."""
        try:
            info = await self.queue.get_task(task_id)
        except NotFoundError:
            return False
        if not await self.queue.cancel(task_id, info.task.queue if info.task else None):
            return False
        withdrawn = (TaskStatus.PENDING, TaskStatus.SCHEDULED, TaskStatus.WAITING)
        if info.status in withdrawn and info.task is not None:
            if self.results is not None:
                await self.results.set(cancelled_result(info.task, info.attempt or 1, None))
            await self.emit(
                TaskEvent(
                    task_id=task_id,
                    type=EventType.CANCELLED,
                    queue=info.task.queue,
                    attempt=info.attempt,
                )
            )
        return True

    def dashboard_app(
        self,
        *,
        read_only: bool = False,
        token: str | None = None,
        allowed_hosts: Sequence[str] | None = None,
    ) -> Any:
        """The web dashboard of this backend as an ASGI app, to mount in your own (needs the
        ``omniq-backend-file[dashboard]`` extra). ``read_only`` refuses every action;
        ``token`` makes every page ask for it; without a token only loopback ``Host`` names
        are answered unless ``allowed_hosts`` names more. See docs/dashboard.md."""
        from .dashboard import create_app

        return create_app(self, read_only=read_only, token=token, allowed_hosts=allowed_hosts)

    # -- schedules ---------------------------------------------------------------------------
    def make_schedule(
        self,
        func: Callable[..., Any] | str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> Schedule:
        """Check the arguments of ``schedule`` and build the Schedule (no I/O)."""
        return build_schedule(
            func, args, kwargs, now=self.schedules.now(), defaults=self.config, **options
        )

    async def schedule(
        self,
        /,
        func: Callable[..., Any] | str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        cron: str | None = None,
        every: float | timedelta | None = None,
        at: datetime | None = None,
        tz: str | None = None,
        name: str | None = None,
        queue: str = "default",
        priority: int = 0,
        max_retries: int | None = None,
        timeout: float | None = None,
        ttl: float | timedelta | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
        misfire: str = "latest",
        misfire_grace: float | timedelta = 60.0,
        jitter: float | timedelta | None = None,
    ) -> str:
        """Run ``func(*args, **kwargs)`` on a schedule; returns the schedule id.

        Exactly one of ``cron="*/5 * * * *"`` (in time zone ``tz``, default UTC), ``every=``
        (seconds or a timedelta) or ``at=`` (one datetime; naive means wall-clock time in
        ``tz``). ``name`` is the id: scheduling the same name again updates that schedule.
        Each tick enqueues one task (``queue``, ``priority``, ``max_retries``, ``timeout``,
        ``ttl`` counted from the tick) whatever the number of workers; ticks before ``start``
        or after ``end`` do not fire. A tick no worker fired within ``misfire_grace`` seconds
        (workers were down) is missed: ``misfire="latest"`` fires the newest missed one,
        ``"skip"`` none, ``"all"`` each (the newest 100). ``jitter`` delays each tick by up
        to that many seconds. Bad arguments raise ConfigurationError and store nothing.
        """
        schedule = self.make_schedule(
            func,
            args,
            kwargs,
            cron=cron,
            every=every,
            at=at,
            tz=tz,
            name=name,
            queue=queue,
            priority=priority,
            max_retries=max_retries,
            timeout=timeout,
            ttl=ttl,
            start=start,
            end=end,
            misfire=misfire,
            misfire_grace=misfire_grace,
            jitter=jitter,
        )
        return await self.schedules.add(schedule)

    def periodic(self, **options: Any) -> Callable[[F], F]:
        """Decorator: ``@backend.periodic(cron="0 * * * *")`` schedules the function (named
        after it unless ``name=``; ``args=``/``kwargs=`` for its arguments; the options of
        ``schedule``). The function is returned unchanged. On this async backend the
        schedule is stored by ``await backend.schedules.sync()`` or when a worker of this
        backend starts (FileBackend stores it at once)."""

        def register(schedule: Schedule) -> None:
            self.schedules.pending[schedule.id] = schedule

        return periodic_decorator(self, register, dict(options))

    def task(self, func: Callable[P, R] | None = None, **options: Any) -> Any:
        """Decorator: ``@backend.task(queue="mail")`` then ``await send.enqueue(to=...)``."""

        def wrap(fn: Callable[P, R]) -> AsyncTaskFunction[P, R]:
            return AsyncTaskFunction(self, fn, options)

        return wrap(func) if func is not None else wrap

    def worker(
        self,
        queues: Sequence[str] | str = ("default",),
        concurrency: int = 4,
        *,
        metrics_port: int | None = None,
        metrics_host: str = "127.0.0.1",
        **options: Any,
    ) -> AsyncWorker:
        """A worker running tasks from ``queues`` (see AsyncWorker for the options).

        ``metrics_port``: serve Prometheus metrics on ``http://metrics_host:PORT/metrics``
        (the ``[metrics]`` extra). With ``opentelemetry-api`` installed, a tracing hook comes
        first in ``hooks`` (docs/observability.md)."""
        hooks = [*_tracing.worker_hooks(), *options.pop("hooks", ())]
        if metrics_port is not None:
            try:
                from ._metrics import worker_hooks
            except ImportError as exc:
                raise MissingDependencyError(
                    "metrics need prometheus-client: pip install 'omniq-backend-file[metrics]'"
                    f" ({exc})"
                ) from exc
            hooks += worker_hooks(self, metrics_port, metrics_host)
        if hooks:
            options["hooks"] = hooks
        return AsyncWorker(self, queues, concurrency, **options)


class AsyncTaskFunction(Generic[P, R]):
    """A function registered with ``@backend.task``; still callable directly."""

    def __init__(self, backend: Any, func: Callable[P, R], options: Mapping[str, Any]) -> None:
        self.backend = backend
        self.func = func
        self.options = dict(options)
        self.__wrapped__ = func
        self.__omniq_func__ = func
        self.__name__ = getattr(func, "__name__", "task")
        self.__doc__ = func.__doc__
        self.path = func_path(func)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.func(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<task {self.path}>"

    def enqueue(self, *args: P.args, **kwargs: P.kwargs) -> Any:
        """Queue a call with the decorator's options (``await`` it on the async backend)."""
        return self.backend.enqueue(self.path, args, kwargs, **self.options)

    def enqueue_with(
        self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, **options: Any
    ) -> Any:
        """Queue a call overriding options (delay, priority, queue, ...)."""
        return self.backend.enqueue(self.path, args, kwargs, **{**self.options, **options})
