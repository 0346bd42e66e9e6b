"""The blocking twins of the ``Async*`` classes.

One daemon thread per process runs one asyncio event loop, started on first use and shared by
every sync object. Calls from any number of threads are submitted to it; a call from a thread
whose own event loop is running raises :class:`AsyncContextError` at once instead of blocking
that loop. After ``fork`` the child starts a fresh loop thread; at interpreter exit pending work
is cancelled and the loop is closed.

Methods marked ``inline`` (a queue's enqueue, dequeue without wait, ack, ...) of an object whose
storage is a local directory or memory run on the calling thread instead, on a private event
loop of that thread: no hop to the loop thread. Such a call runs only while no other call of the
same object is under way (on any thread or the loop thread); otherwise it takes the loop thread,
and calls that take the loop thread wait for an inline call to end. So no two threads ever run
the same object's code at once, and the async object needs no locks.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import functools
import inspect
import os
import sys
import threading
import weakref
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, ClassVar, Concatenate, Generic, Protocol, TypeVar, overload

import sniffio
from typing_extensions import ParamSpec, Self

from .errors import AsyncContextError

P = ParamSpec("P")
R = TypeVar("R")
A = TypeVar("A")


class Flushable(Protocol):
    async def flush(self) -> None: ...


class _LoopThread:
    """The process-wide event-loop thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.exiting = False
        self.flush_at_exit: weakref.WeakSet[Flushable] = weakref.WeakSet()

    def loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is not None:
            return loop
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                ready = threading.Event()
                thread = threading.Thread(
                    target=self._serve, args=(loop, ready), name="omniq-loop", daemon=True
                )
                thread.start()
                ready.wait()
                self._thread, self._loop = thread, loop
            return self._loop

    @staticmethod
    def _serve(loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        loop.run_forever()

    def in_loop_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    def run(self, make_coro: Callable[[], Coroutine[Any, Any, R]], owner: str) -> R:
        _refuse_async_context(owner)
        if self.in_loop_thread():
            raise AsyncContextError(f"{owner} called from OmniQ's own event-loop thread")
        loop = self.loop()
        call: _Call[R] = _Call(make_coro(), self)
        loop.call_soon_threadsafe(call.start)
        try:
            call.done.wait()
        except KeyboardInterrupt:
            # Cancel the coroutine and let its cleanup finish before the interrupt goes on
            # (``call.start`` was queued first, so the task exists when ``cancel`` runs).
            loop.call_soon_threadsafe(call.cancel)
            call.done.wait(5)
            raise
        return call.outcome(owner)

    def shutdown(self, timeout: float = 5.0) -> None:
        self.exiting = True
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None or not thread.is_alive():
            return

        async def cancel_all() -> None:
            for obj in list(self.flush_at_exit):  # buffered writes first (event writers)
                try:
                    await obj.flush()
                except Exception:
                    pass
            me = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not me]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await loop.shutdown_asyncgens()

        try:
            asyncio.run_coroutine_threadsafe(cancel_all(), loop).result(timeout)
        except BaseException:
            pass
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        if not thread.is_alive():
            loop.close()

    def reset_after_fork(self) -> None:
        # The loop thread does not exist in the child; its loop object must not be reused.
        self._lock = threading.Lock()
        self._loop = None
        self._thread = None
        self.exiting = False
        self.flush_at_exit = weakref.WeakSet()  # the parent's buffered events are its own


class _Call(Generic[R]):
    """One coroutine submitted to the loop thread, and the caller thread waiting for it."""

    def __init__(self, coro: Coroutine[Any, Any, R], owner: _LoopThread) -> None:
        self.coro = coro
        self.owner = owner
        self.done = threading.Event()
        self.task: asyncio.Task[None] | None = None
        self.value: R | None = None
        self.error: BaseException | None = None

    def start(self) -> None:  # in the loop thread
        self.task = asyncio.get_running_loop().create_task(self._guarded())
        self.task.add_done_callback(self._finished)

    def cancel(self) -> None:  # in the loop thread
        if self.task is not None:
            self.task.cancel()

    async def _guarded(self) -> None:
        try:
            self.value = await self.coro
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # SystemExit/KeyboardInterrupt too: they go to the
            self.error = exc  # caller and must not kill the loop thread (hanging every call)

    def _finished(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() and self.owner.exiting:
            # Cancelled by the shutdown at interpreter exit: the waiting (daemon) thread stays
            # blocked and dies with the interpreter instead of raising into it mid-shutdown.
            return
        self.done.set()

    def outcome(self, owner: str) -> R:
        task = self.task
        if task is None or task.cancelled():
            self.coro.close()  # never started: no "coroutine was never awaited" warning
            raise asyncio.CancelledError(f"{owner} was cancelled")
        error, self.error = self.error, None
        if error is not None:
            raise error
        return self.value  # type: ignore[return-value]


class _Gate:
    """Keeps an inline call of an object apart from every other call of that object."""

    __slots__ = ("cond", "inline", "lock", "others", "waiting")

    def __init__(self) -> None:
        # The inline path takes the plain lock (a C context manager) and notifies only when
        # a call waits: it runs once per call of a blocking twin.
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.inline = False
        self.others = 0  # calls on the loop thread, under way
        self.waiting = 0  # calls waiting for an inline call to end

    def try_inline(self) -> bool:
        with self.lock:
            if self.inline or self.others:
                return False
            self.inline = True
            return True

    def end_inline(self) -> None:
        with self.lock:
            self.inline = False
            if self.waiting:
                self.cond.notify_all()

    def begin_other(self) -> None:
        with self.cond:
            while self.inline:
                self.waiting += 1
                try:
                    self.cond.wait()
                finally:
                    self.waiting -= 1
            self.others += 1

    def end_other(self) -> None:
        with self.lock:
            self.others -= 1


_GATES: weakref.WeakKeyDictionary[Any, _Gate] = weakref.WeakKeyDictionary()
_GATES_LOCK = threading.Lock()


def _gate(target: Any) -> _Gate:
    gate = _GATES.get(target)
    if gate is None:
        with _GATES_LOCK:
            gate = _GATES.setdefault(target, _Gate())
    return gate


class _ThreadLoop(threading.local):
    """The calling thread's private event loop for inline calls (closed with the thread)."""

    loop: asyncio.AbstractEventLoop | None = None

    def get(self) -> asyncio.AbstractEventLoop:
        loop = self.loop
        if loop is None or loop.is_closed():
            loop = self.loop = asyncio.new_event_loop()
            weakref.finalize(threading.current_thread(), loop.close)
        return loop


_HERE = _ThreadLoop()


def _complete(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, R]) -> R:
    """``loop.run_until_complete(coro)`` for a loop that runs nothing else, without its
    set-up per call (half its ~28 µs here): run its steps until the task is done."""
    step = getattr(loop, "_run_once", None)
    ready: collections.deque[asyncio.Handle] | None = getattr(loop, "_ready", None)
    if step is None or ready is None:  # not a BaseEventLoop
        return loop.run_until_complete(coro)
    task = loop.create_task(coro)
    asyncio.events._set_running_loop(loop)
    try:
        while not task.done():
            if ready:
                # What is ready runs without a look at the selector (an epoll_wait each):
                # an inline call of a local store awaits no I/O, only its own steps.
                _run_ready(ready, len(ready))
            else:
                step()  # waits for a timer or another thread (the selector's wake-up)
        # The task's done callbacks are queued (call_soon), not run yet: anyio stops the
        # worker threads a ``to_thread`` call started from one of them. Skipped, those
        # non-daemon threads idle forever and the interpreter hangs at exit, joining them.
        # Only then is there anything ready: the common call pays nothing more.
        _run_ready(ready, len(ready))
    finally:
        asyncio.events._set_running_loop(None)
    return task.result()


def _run_ready(ready: collections.deque[asyncio.Handle], count: int) -> None:
    """Run the first ``count`` ready callbacks, as one step of the loop would."""
    for _ in range(count):
        handle = ready.popleft()
        if not handle._cancelled:
            handle._run()


def _inline_ok(target: Any) -> bool:
    """Whether ``target``'s storage is a local directory or memory (no network session, no
    state tied to one event loop) and it calls no hooks (a backend's event hook keeps a
    writer on the loop it runs on)."""
    store = getattr(target, "store", None)
    return (
        getattr(store, "kind", None) in ("local", "memory")
        and getattr(target, "on_event", None) is None
    )


def _run(
    target: Any,
    inline: bool,
    make_coro: Callable[[], Coroutine[Any, Any, R]],
    owner: str,
    gate: _Gate | None = None,
) -> R:
    if inline and not _LOOP.in_loop_thread():
        gate = gate or _gate(target)
        if gate.try_inline():
            try:
                _refuse_async_context(owner)
                return _complete(_HERE.get(), make_coro())
            finally:
                gate.end_inline()
        gate.begin_other()
        try:
            return _LOOP.run(make_coro, owner)
        finally:
            gate.end_other()
    known = _GATES.get(target)
    if known is None:  # never called inline: nothing to keep apart
        return _LOOP.run(make_coro, owner)
    known.begin_other()
    try:
        return _LOOP.run(make_coro, owner)
    finally:
        known.end_other()


_LOOP = _LoopThread()
atexit.register(_LOOP.shutdown)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_LOOP.reset_after_fork)


def _refuse_async_context(owner: str) -> None:
    if (
        asyncio._get_running_loop() is None
        and sniffio.thread_local.name is None
        and sniffio.current_async_library_cvar.get() is None
        and "curio" not in sys.modules
    ):
        # What sniffio would find, without the two exceptions it raises and catches to say
        # so (~1 µs of each inline call): no loop runs on this thread, no library says so.
        return
    try:
        library = sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        return
    raise AsyncContextError(
        f"{owner} is the blocking API and was called inside a running {library} event loop; "
        f"it would block that loop. Use the async class (Async{owner.split('.')[0]}) and await it."
    )


def run_sync(make_coro: Callable[[], Coroutine[Any, Any, R]], owner: str = "OmniQ") -> R:
    """Run a coroutine on the shared loop thread and return its result (blocking)."""
    return _LOOP.run(make_coro, owner)


def in_shared_loop() -> bool:
    """Whether the caller runs on the shared loop thread (inside a blocking twin's call)."""
    return _LOOP.in_loop_thread()


def flush_at_exit(obj: Flushable) -> None:
    """Have ``await obj.flush()`` run on the shared loop at interpreter exit, before its
    pending work is cancelled (held weakly: a collected object is forgotten)."""
    _LOOP.flush_at_exit.add(obj)


def shared_loop() -> asyncio.AbstractEventLoop:
    """The shared event loop (started if needed)."""
    return _LOOP.loop()


class _TwinMethod:
    """What ``blocking`` and ``delegate`` share: the wrapped method's name, docstring and
    signature without ``self``."""

    def __init__(self, method: Callable[..., Any]) -> None:
        self._method = method
        self._name = method.__name__
        self.__doc__ = method.__doc__
        self._signature: inspect.Signature | None = None

    def _bound_signature(self) -> inspect.Signature | None:
        if self._signature is None:
            try:
                sig = inspect.signature(self._method)
            except (TypeError, ValueError):
                return None
            self._signature = sig.replace(parameters=list(sig.parameters.values())[1:])
        return self._signature

    def __set_name__(self, owner: type, name: str) -> None:
        self._owner_name = f"{owner.__name__}.{name}"
        self._attr = name


class blocking(_TwinMethod, Generic[P, R]):
    """Descriptor that turns an ``async def`` method of the wrapped object into a blocking one.

    ``enqueue = blocking(AsyncFileQueue.enqueue)`` gives ``FileQueue().enqueue(task) -> str``
    with the same signature, docstring and return type as the async method. ``inline`` (True,
    or a test of the call's keyword arguments) lets a call run on the calling thread when the
    object's storage is local or memory (see the module docstring); only for methods that do
    not wait (no sleeps, no background tasks left behind).
    """

    def __init__(
        self,
        method: Callable[Concatenate[Any, P], Coroutine[Any, Any, R]],
        *,
        inline: bool | Callable[[dict[str, Any]], bool] = False,
    ) -> None:
        super().__init__(method)
        self._inline = inline

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> Self: ...
    @overload
    def __get__(self, obj: object, owner: type | None = None) -> Callable[P, R]: ...
    def __get__(self, obj: object | None, owner: type | None = None) -> Any:
        if obj is None:
            return self
        target = obj._async  # type: ignore[attr-defined]
        name, owner_name = self._name, getattr(self, "_owner_name", self._name)
        rule = self._inline if rule_allowed(self._inline, target) else False
        gate = _gate(target) if rule is not False else None

        @functools.wraps(self._method)
        def call(*args: P.args, **kwargs: P.kwargs) -> R:
            method: Callable[P, Coroutine[Any, Any, R]] = getattr(target, name)
            inline = rule is True or (callable(rule) and rule(kwargs))
            return _run(target, inline, lambda: method(*args, **kwargs), owner_name, gate)

        call.__signature__ = self._bound_signature()  # type: ignore[attr-defined]  # no self
        attr = getattr(self, "_attr", None)
        if rule is not False and attr:  # built once per object: later look-ups skip this
            obj.__dict__[attr] = call
        return call


def rule_allowed(rule: object, target: Any) -> bool:
    return rule is not False and _inline_ok(target)


def no_wait(kwargs: dict[str, Any]) -> bool:
    """``inline`` rule for ``dequeue``-like methods: only a call that does not wait."""
    return not kwargs.get("wait")


class delegate(_TwinMethod, Generic[P, R]):
    """Descriptor for a plain (non-async) method of the wrapped object, such as
    ``make_task``: the twin calls it directly, with the same signature and return type."""

    def __init__(self, method: Callable[Concatenate[Any, P], R]) -> None:
        super().__init__(method)

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> Self: ...
    @overload
    def __get__(self, obj: object, owner: type | None = None) -> Callable[P, R]: ...
    def __get__(self, obj: object | None, owner: type | None = None) -> Any:
        if obj is None:
            return self
        target, name = obj._async, self._name  # type: ignore[attr-defined]

        @functools.wraps(self._method)
        def call(*args: P.args, **kwargs: P.kwargs) -> R:
            method: Callable[P, R] = getattr(target, name)
            return method(*args, **kwargs)

        call.__signature__ = self._bound_signature()  # type: ignore[attr-defined]  # no self
        return call


class SyncWrapper(Generic[A]):
    """Base of the blocking twins: holds the async object and closes it on ``with`` exit."""

    _async: A

    def __init__(self, wrapped: A) -> None:
        self._async = wrapped

    @classmethod
    def wrap(cls, wrapped: A) -> Self:
        """The blocking twin of an existing async object (shares its connections)."""
        twin = cls.__new__(cls)
        SyncWrapper.__init__(twin, wrapped)
        return twin

    @property
    def async_api(self) -> A:
        """The async object this twin drives (use it from async code)."""
        return self._async

    def close(self) -> None:
        """Release the storage connections of the wrapped object."""
        close = getattr(self._async, "close", None)
        if close is not None:
            _run(self._async, False, close, f"{type(self).__name__}.close")

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._async!r})"


class StorageTwin(SyncWrapper[A]):
    """Base of the storages' blocking twins: built from the same arguments as the async class
    (``base_dir``, ``storage_options``, keyword options). Safe from many threads; raises
    AsyncContextError if called inside a running event loop."""

    async_class: ClassVar[type[Any]]

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        storage_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(self.async_class(base_dir, storage_options, **kwargs))
