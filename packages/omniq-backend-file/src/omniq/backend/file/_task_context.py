"""The worker's side of the task context and of hooks: which functions get a context and how,
progress events (the heartbeat loop that writes the progress is in ``_heartbeats.py``), the
link that forwards a child process's context to the worker, and calling hooks without letting
them hurt a task."""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import math
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_process
import anyio.to_thread

from omniq.core.context import TaskContext
from omniq.core.models import Claimed, EventType, Progress

from ._functions import import_object, is_async

log = logging.getLogger("omniq.worker")

HOOK_METHODS = ("before_task", "after_task", "on_failure")
_NAME = re.compile(r"(?:[A-Za-z_]\w*\.)*TaskContext")
_NO_TIMEOUT = contextlib.nullcontext()


def make_context(claimed: Claimed, worker_id: str) -> TaskContext:
    task = claimed.task
    return TaskContext(
        task_id=task.id,
        attempt=claimed.attempt,
        queue=task.queue,
        func=task.func,
        worker_id=worker_id,
        metadata=task.metadata,
        enqueued_at=task.created_at,
    )


# -- which functions get a context -----------------------------------------------------------
@functools.lru_cache(maxsize=1024)
def context_parameter(func: Callable[..., Any]) -> tuple[int | None, str] | None:
    """Where ``func`` takes a context: (its position, or None if keyword-only; its name), or
    None if no parameter is annotated ``TaskContext`` (the class, or the name as a string)."""
    target = getattr(func, "__omniq_func__", func)
    try:
        params = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):
        return None
    for index, param in enumerate(params):
        ann = param.annotation
        if ann is TaskContext or (isinstance(ann, str) and _NAME.fullmatch(ann.strip(" '\""))):
            positional = param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD)
            return (index if positional else None), param.name
    return None


def with_context(
    where: tuple[int | None, str] | None, args: list[Any], kwargs: dict[str, Any], ctx: Any
) -> tuple[list[Any], dict[str, Any]]:
    """The call's arguments with ``ctx`` in its place: positionally where the task's own
    positional arguments reach it, else by keyword."""
    if where is None:
        return args, kwargs
    index, name = where
    if index is not None and index <= len(args):
        return [*args[:index], ctx, *args[index:]], kwargs
    return args, {**kwargs, name: ctx}


async def call_task(worker: Any, func: Any, claimed: Claimed, ctx: TaskContext) -> Any:
    """Call the task's function where it runs (event loop, thread, or process pool), with
    its context if it takes one, under the task's timeout."""
    task = claimed.task
    where = context_parameter(func)
    timeout = task.timeout if task.timeout and task.timeout > 0 else None
    with anyio.fail_after(timeout) if timeout is not None else _NO_TIMEOUT:
        if worker.processes and not is_async(func):
            link = None if where is None else ChildLink(ctx, where, worker.progress_interval)
            try:
                return await anyio.to_process.run_sync(
                    call_in_process,
                    task.func,
                    task.args,
                    task.kwargs,
                    None if link is None else link.spec(),
                    cancellable=True,
                    limiter=worker._process_limiter,
                )
            finally:
                if link is not None:
                    await link.close()
        args, kwargs = with_context(where, task.args, task.kwargs, ctx)
        if is_async(func):
            return await func(*args, **kwargs)
        call = functools.partial(func, *args, **kwargs)
        if worker._threads is not None:  # asyncio
            return await worker._threads.run(call)
        return await anyio.to_thread.run_sync(call, abandon_on_cancel=True)


# -- progress events ---------------------------------------------------------------------------
async def last_progress_event(
    worker: Any, claimed: Claimed, ctx: TaskContext, state: dict[str, Any]
) -> None:
    """When the task ends: the event of its last progress, unless a write already sent it
    (a write cut short by the task's end did not)."""
    progress, _, _ = ctx._take()
    sent = state.get("evented")
    if progress is not None and (
        sent is None
        or (progress.done, progress.total, progress.message)
        != (sent.done, sent.total, sent.message)
    ):
        await progress_event(worker, claimed, progress)


async def progress_event(worker: Any, claimed: Claimed, progress: Progress) -> None:
    fields = {"done": progress.done, "total": progress.total, "message": progress.message}
    data = {k: v for k, v in fields.items() if v is not None}
    try:
        await worker._event(EventType.PROGRESS, claimed, data=data)
    except Exception as exc:  # an event is a report: losing one must not stop the task
        log.warning("progress event of task %s failed: %s", claimed.id, exc)


# -- a child process's context, forwarded to the worker ---------------------------------------
class ChildLink:
    """The worker's end: a local socket the child connects to (proving itself with a
    one-time token), and a thread applying what the child's context sends to the worker's
    context. Messages are JSON lines, never pickles."""

    TOKEN_TIMEOUT = 2.0
    """Seconds a connection may take to send the token before it is closed."""

    def __init__(self, ctx: TaskContext, where: tuple[int | None, str], interval: float) -> None:
        self.ctx, self.where, self.interval = ctx, where, interval
        self.token = secrets.token_hex(16)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.2)  # the reader looks at ``closed`` this often
        self.closed = False
        self.thread = threading.Thread(target=self._read, name="omniq-progress", daemon=True)
        self.thread.start()

    def spec(self) -> dict[str, Any]:
        """What the child needs (plain data): where to connect, the context's fields."""
        ctx = self.ctx
        return {
            "address": list(self.server.getsockname()[:2]),
            "token": self.token,
            "interval": self.interval,
            "where": list(self.where),
            "fields": {
                "task_id": ctx.task_id,
                "attempt": ctx.attempt,
                "queue": ctx.queue,
                "func": ctx.func,
                "worker_id": ctx.worker_id,
                "metadata": dict(ctx.metadata),
                "enqueued_at": ctx.enqueued_at.isoformat() if ctx.enqueued_at else None,
                "started_at": ctx.started_at.isoformat(),
            },
        }

    def _read(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                if self.closed:  # and no connection waiting: the child never came
                    return
                continue
            except OSError:
                return
            with conn, conn.makefile("rb") as lines:
                # A local process that connects first and says nothing must not keep the
                # child out: a short wait for the token, then back to accepting.
                conn.settimeout(self.TOKEN_TIMEOUT)
                try:
                    token = lines.readline(len(self.token) + 2).strip()
                except OSError:
                    continue
                if token.decode(errors="replace") != self.token:
                    continue  # not our child
                conn.settimeout(None)
                try:
                    for line in lines:
                        self.ctx._apply(json.loads(line))
                except (OSError, ValueError, TypeError) as exc:
                    log.warning("progress from the process of %s: %s", self.ctx.task_id, exc)
                return

    async def close(self) -> None:
        """After the call: read what the child sent last, then stop listening."""
        self.closed = True
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self.thread.join, 5.0)
        self.server.close()


class _Forwarder:
    """The child's end: sends its context's changes to the worker, at most one message per
    ``interval`` (a timer sends the last one), and what is left when the call ends."""

    def __init__(self, ctx: TaskContext, conn: socket.socket, interval: float) -> None:
        self.ctx, self.conn, self.interval = ctx, conn, interval
        self.lock = threading.Lock()
        self.last = -math.inf
        self.timer: threading.Timer | None = None

    def notify(self) -> None:
        with self.lock:
            delay = self.last + self.interval - time.monotonic()
            if delay <= 0:
                self._send()
            elif self.timer is None:
                self.timer = threading.Timer(delay, self.flush)
                self.timer.daemon = True
                self.timer.start()

    def flush(self) -> None:
        with self.lock:
            self.timer = None
            self._send()

    def _send(self) -> None:
        message = self.ctx._snapshot()
        if message:
            self.conn.sendall(json.dumps(message).encode() + b"\n")
            self.last = time.monotonic()

    def close(self) -> None:
        with self.lock:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            self._send()
        self.conn.close()


def call_in_process(
    path: str, args: list[Any], kwargs: dict[str, Any], link: dict[str, Any] | None
) -> Any:
    """Runs in a worker process: import the function and call it, with a context that
    forwards to the worker when ``link`` is given."""
    func = import_object(path)
    func = getattr(func, "__omniq_func__", func)
    if link is None:
        return func(*args, **kwargs)
    from datetime import datetime

    fields = dict(link["fields"])
    for key in ("enqueued_at", "started_at"):
        fields[key] = datetime.fromisoformat(fields[key]) if fields[key] else None
    ctx = TaskContext(**fields)
    host, port = link["address"]
    conn = socket.create_connection((host, port))
    conn.sendall(link["token"].encode() + b"\n")
    forwarder = _Forwarder(ctx, conn, link["interval"])
    ctx._notify = forwarder.notify
    index, name = link["where"]
    args, kwargs = with_context((index, name), args, kwargs, ctx)
    try:
        return func(*args, **kwargs)
    finally:
        forwarder.close()


# -- hooks -----------------------------------------------------------------------------------
def load_hook(path: str) -> Any:
    """The hook at ``"pkg.mod:obj"``; a class is instantiated without arguments."""
    obj = import_object(path)
    return obj() if inspect.isclass(obj) else obj


class Hooks:
    """Calls ``before_task``, ``after_task`` and ``on_failure`` of each hook object that has
    them, in order, sync or async. A hook that raises is logged and skipped."""

    def __init__(self, hooks: Sequence[Any] = ()) -> None:
        self.hooks = list(hooks)
        for hook in self.hooks:
            if not any(callable(getattr(hook, name, None)) for name in HOOK_METHODS):
                raise TypeError(f"hook {hook!r} has none of the methods {', '.join(HOOK_METHODS)}")

    def __bool__(self) -> bool:
        return bool(self.hooks)

    def live(self) -> Hooks:
        """The hooks without those whose ``active`` attribute, if they have one, is false
        now (the worker asks when it starts: a tracing hook without an SDK)."""
        return Hooks([hook for hook in self.hooks if getattr(hook, "active", True)])

    async def call(self, name: str, ctx: TaskContext, *args: Any, timeout: float) -> None:
        """Call ``name`` of every hook; an async hook still running after ``timeout`` seconds
        (all of them together) is cancelled and logged, and the hooks after it are not
        called. A sync hook runs on the event loop and cannot be cut short: it must be quick.
        Only an awaited hook costs a cancel scope (two scopes per task, for sync hooks alone,
        were ~15 % of the worker's CPU for a no-op task)."""
        deadline: float | None = None
        for hook in self.hooks:
            method = getattr(hook, name, None)
            if method is None:
                continue
            try:
                outcome = method(ctx, *args)
                if not inspect.isawaitable(outcome):
                    continue
                if deadline is None:
                    deadline = anyio.current_time() + timeout
                with anyio.move_on_after(deadline - anyio.current_time()) as scope:
                    await outcome
            except Exception:
                log.exception("hook %r.%s failed for task %s", hook, name, ctx.task_id)
                continue
            if scope.cancelled_caught:
                log.warning(
                    "hooks' %s for task %s cancelled after %.1f s", name, ctx.task_id, timeout
                )
                return
