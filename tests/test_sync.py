"""The sync bridge (``omniq.core.sync``): one shared loop thread, blocking twins, exceptions,
async-context refusal, fork, interpreter exit and Ctrl-C."""

from __future__ import annotations

import asyncio
import inspect
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import traceback
import uuid
from pathlib import Path

import pytest

import omniq.core
from omniq.core import sync
from omniq.core.errors import AsyncContextError, OmniQError
from omniq.core.sync import SyncWrapper, blocking, run_sync, shared_loop

pytestmark = pytest.mark.timeout(60)

SRC_DIR = str(Path(omniq.core.__file__).resolve().parents[2])  # .../omniq-core/src


# --------------------------------------------------------------------------- the test twin


class CustomError(Exception):
    def __init__(self, code: int, detail: dict) -> None:
        super().__init__(f"custom failure {code}")
        self.code = code
        self.detail = detail


class AsyncThing:
    def __init__(self, name: str = "thing") -> None:
        self.name = name
        self.closed = False
        self.raised: BaseException | None = None
        self.cancelled = threading.Event()

    def __repr__(self) -> str:
        return f"AsyncThing({self.name!r})"

    async def add(self, a: int, b: int) -> int:
        """Add two numbers on the event loop."""
        await asyncio.sleep(0)
        return a + b

    async def where(self) -> tuple[int, str]:
        """The thread the coroutine runs in."""
        thread = threading.current_thread()
        return thread.ident or 0, thread.name

    async def fail_deep_inside(self, code: int) -> None:
        await asyncio.sleep(0)
        try:
            {}["missing-key"]
        except KeyError as root:
            exc = CustomError(code, {"k": [1, 2]})
            self.raised = exc
            raise exc from root

    async def sleep(self, seconds: float) -> str:
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return "slept"

    async def close(self) -> None:
        await asyncio.sleep(0)
        self.closed = True


class Thing(SyncWrapper[AsyncThing]):
    """Blocking twin of AsyncThing."""

    def __init__(self, name: str = "thing") -> None:
        super().__init__(AsyncThing(name))

    add = blocking(AsyncThing.add)
    where = blocking(AsyncThing.where)
    fail_deep_inside = blocking(AsyncThing.fail_deep_inside)
    sleep = blocking(AsyncThing.sleep)


def _script_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (SRC_DIR, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


THING_SOURCE = """
import asyncio, sys, threading, time
from omniq.core.sync import SyncWrapper, blocking, shared_loop

class AsyncThing:
    started = threading.Event()

    async def sleep(self, seconds, cleanup=0.0):
        self.started.set()
        print("STARTED", flush=True)
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            await asyncio.sleep(cleanup)  # cleanup that takes a moment
            print("CANCELLED", flush=True)
            raise
        finally:
            print("FINALLY", flush=True)

class Thing(SyncWrapper[AsyncThing]):
    sleep = blocking(AsyncThing.sleep)
"""


# --------------------------------------------------------------------------- 1. basic call


def test_plain_call_and_one_shared_loop_thread() -> None:
    a, b = Thing("a"), Thing("b")
    assert a.add(2, 3) == 5
    assert b.add("x", "y") == "xy"

    ident_a, name_a = a.where()
    ident_b, name_b = b.where()
    assert name_a == name_b == "omniq-loop"
    assert ident_a == ident_b != threading.get_ident()

    seen: list[tuple[int, str]] = []
    threads = [threading.Thread(target=lambda t=t: seen.append(t.where())) for t in (a, b, a)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(10)
    assert seen == [(ident_a, "omniq-loop")] * 3
    assert sum(t.name == "omniq-loop" for t in threading.enumerate()) == 1
    assert shared_loop() is shared_loop()
    assert run_sync(lambda: a.async_api.add(1, 1)) == 2


# --------------------------------------------------------------------------- 2. many threads


def test_32_threads_at_once() -> None:
    things = [Thing(f"t{i}") for i in range(4)]
    calls = 150
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(32)

    def work(n: int) -> None:
        try:
            barrier.wait(10)
            thing = things[n % len(things)]
            results[n] = [thing.add(n, i) for i in range(calls)]
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,), daemon=True) for n in range(32)]
    for th in threads:
        th.start()
    deadline = time.monotonic() + 30
    for th in threads:
        th.join(max(0.0, deadline - time.monotonic()))
    assert not [th for th in threads if th.is_alive()], "deadlock: threads still running"
    assert errors == []
    assert results == {n: [n + i for i in range(calls)] for n in range(32)}


# --------------------------------------------------------------------------- 3. async context


def test_refused_inside_running_asyncio_loop() -> None:
    thing = Thing()

    async def main() -> tuple[float, AsyncContextError | None, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0.05)
        before = ticks
        start = time.monotonic()
        error = None
        try:
            thing.sleep(5)  # must not block this loop for 5 s
        except AsyncContextError as exc:
            error = exc
        elapsed = time.monotonic() - start
        await asyncio.sleep(0.1)
        task.cancel()
        return elapsed, error, ticks - before

    elapsed, error, ticked = asyncio.run(main())
    assert error is not None, "no AsyncContextError inside a running asyncio loop"
    assert elapsed < 4  # refused at once: well short of the 5 s a blocking call takes
    assert ticked >= 3, "the caller's loop was frozen"
    message = str(error)
    assert "asyncio" in message and "Thing.sleep" in message
    assert "AsyncThing" in message and "await" in message
    assert isinstance(error, OmniQError) and isinstance(error, RuntimeError)
    assert not thing.async_api.cancelled.is_set()


def test_refused_inside_running_trio_loop() -> None:
    trio = pytest.importorskip("trio")
    thing = Thing()

    async def main() -> tuple[float, AsyncContextError | None, int]:
        ticks = 0
        error = None
        elapsed = 0.0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await trio.sleep(0.01)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            await trio.sleep(0.05)
            before = ticks
            start = time.monotonic()
            try:
                thing.add(1, 2)
            except AsyncContextError as exc:
                error = exc
            elapsed = time.monotonic() - start
            await trio.sleep(0.1)
            nursery.cancel_scope.cancel()
        return elapsed, error, ticks - before

    elapsed, error, ticked = trio.run(main)
    assert error is not None, "no AsyncContextError inside a running trio loop"
    assert elapsed < 4  # refused at once: well short of the 5 s a blocking call takes
    assert ticked >= 3
    assert "trio" in str(error) and "AsyncThing" in str(error) and "await" in str(error)


def test_refused_on_the_shared_loop_itself() -> None:
    thing = Thing()

    async def nested() -> int:
        return thing.add(1, 2)  # blocking call made by a coroutine on omniq's own loop

    start = time.monotonic()
    with pytest.raises(AsyncContextError):
        run_sync(nested)
    assert time.monotonic() - start < 4  # refused, not deadlocked on its own loop
    assert thing.add(1, 2) == 3  # the loop is still serving


# --------------------------------------------------------------------------- 4. exceptions


def test_exception_identity_cause_and_traceback() -> None:
    thing = Thing()
    with pytest.raises(CustomError) as info:
        thing.fail_deep_inside(42)
    exc = info.value
    assert type(exc) is CustomError
    assert exc is thing.async_api.raised  # the very object raised in the coroutine
    assert exc.code == 42 and exc.detail == {"k": [1, 2]}
    assert str(exc) == "custom failure 42"
    assert isinstance(exc.__cause__, KeyError) and exc.__cause__.args == ("missing-key",)
    text = "".join(traceback.format_exception(exc))
    assert "fail_deep_inside" in text  # the coroutine's frame
    assert "direct cause" in text and "missing-key" in text
    # the caller's frame is there too
    assert "test_exception_identity_cause_and_traceback" in text


def test_base_exceptions_and_cancellation_surface() -> None:
    async def boom() -> None:
        raise SystemExit(3)

    with pytest.raises(SystemExit) as info:
        run_sync(boom)
    assert info.value.code == 3
    assert run_sync(lambda: asyncio.sleep(0, "still-works")) == "still-works"


# --------------------------------------------------------------------------- 5. fork


needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="no os.fork on this platform")


def _wait_child(pid: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("forked child hung")


@needs_fork
def test_os_fork_child_gets_a_fresh_loop_thread() -> None:
    thing = Thing()
    parent_ident, _ = thing.where()
    parent_thread = sync._LOOP._thread
    assert parent_thread is not None and parent_thread.is_alive()

    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            ok = thing.add(20, 22) == 42
            _, name = thing.where()
            child_thread = sync._LOOP._thread
            ok = ok and name == "omniq-loop" and child_thread is not parent_thread
            ok = ok and child_thread is not None and child_thread.is_alive()
            ok = ok and sum(t.name == "omniq-loop" for t in threading.enumerate()) == 1
            code = 0 if ok else 1
        finally:
            os._exit(code)

    assert _wait_child(pid) == 0, "the twin did not work in the forked child"
    # the parent still works, on the same loop thread as before
    assert thing.add(1, 1) == 2
    assert thing.where()[0] == parent_ident
    assert sync._LOOP._thread is parent_thread


def _mp_child(base_dir: str) -> None:
    from omniq.core import Task
    from omniq.storage.file.queue import FileQueue

    with FileQueue(base_dir) as queue:
        assert queue.size().ready == 1  # the parent's task came along in the forked memory
        task = Task(func="pkg.mod:child")
        queue.enqueue(task)
        claimed = queue.dequeue()
        assert claimed is not None
        queue.ack(claimed)
        claimed = queue.dequeue()
        assert claimed is not None and claimed.task.func == "pkg.mod:parent"
        queue.ack(claimed)
        assert queue.size().total == 0
    sys.exit(0)


@needs_fork
def test_multiprocessing_fork_context() -> None:
    pytest.importorskip("omniq.storage.file.queue")
    from omniq.core import Task
    from omniq.storage.file.queue import FileQueue

    base_dir = f"memory://omniq-sync-{uuid.uuid4().hex}"
    queue = FileQueue(base_dir)
    parent_task = Task(func="pkg.mod:parent", priority=-5)
    queue.enqueue(parent_task)
    assert queue.size().ready == 1

    ctx = multiprocessing.get_context("fork")
    proc = ctx.Process(target=_mp_child, args=(base_dir,))
    proc.start()
    proc.join(10)
    if proc.is_alive():
        proc.kill()
        proc.join()
        raise AssertionError("multiprocessing child hung")
    assert proc.exitcode == 0

    # the parent's memory filesystem and loop are untouched by the child
    assert queue.size().ready == 1
    claimed = queue.dequeue()
    assert claimed is not None and claimed.task.id == parent_task.id
    queue.ack(claimed)
    queue.close()


# --------------------------------------------------------------------------- 6. exit


def test_exit_with_pending_work_is_clean() -> None:
    script = THING_SOURCE + textwrap.dedent("""
        thing = Thing(AsyncThing())
        # a daemon thread blocked in a twin call, and a task nobody waits for
        threading.Thread(target=thing.sleep, args=(60,), daemon=True).start()
        assert AsyncThing.started.wait(10)
        asyncio.run_coroutine_threadsafe(asyncio.sleep(60), shared_loop())
        print("MAIN EXITS", flush=True)
    """)
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=30,
        env=_script_env(),
    )
    elapsed = time.monotonic() - start
    assert elapsed < 10
    assert proc.returncode == 0, proc.stderr
    assert "MAIN EXITS" in proc.stdout
    assert "CANCELLED" in proc.stdout  # pending work was cancelled, its cleanup ran
    for noise in ("Task was destroyed but it is pending", "Exception ignored", "Traceback"):
        assert noise not in proc.stderr, proc.stderr


def test_a_script_using_a_local_queue_from_threads_exits(tmp_path) -> None:
    """Inline calls (a local directory) from the main thread and from other threads start
    anyio worker threads on the callers' private loops; the script still exits when its main
    thread ends (the interpreter joins non-daemon threads, so one left idle hangs it)."""
    script = textwrap.dedent(f"""
        import threading
        from omniq.core import Task
        from omniq.storage.file.queue import FileQueue

        queue = FileQueue({str(tmp_path / "q")!r})
        ids = queue.enqueue_many([Task(func="m:f", args=[i]) for i in range(3)])
        queue.ack(queue.dequeue())

        def calls() -> None:
            for _ in range(5):
                queue.size("default")
                queue.get_task(ids[1], "default")

        threads = [threading.Thread(target=calls) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        calls()
        print("MAIN EXITS", flush=True)
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env=_script_env(),
    )
    assert proc.returncode == 0, proc.stderr
    assert "MAIN EXITS" in proc.stdout


# --------------------------------------------------------------------------- 7. Ctrl-C


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT delivery differs on Windows")
def test_ctrl_c_cancels_the_coroutine_and_raises_keyboard_interrupt() -> None:
    script = THING_SOURCE + textwrap.dedent("""
        thing = Thing(AsyncThing())
        t0 = time.monotonic()
        try:
            thing.sleep(60, cleanup=0.3)
        except KeyboardInterrupt:
            print("KEYBOARDINTERRUPT %.2f" % (time.monotonic() - t0), flush=True)
            sys.exit(0)
        print("NO INTERRUPT", flush=True)
        sys.exit(3)
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_script_env(),
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.strip() == "STARTED", first + proc.stderr.read()
        time.sleep(0.5)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
        elapsed = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = out.split()
    assert proc.returncode == 0, (out, err)
    assert elapsed < 5
    assert "CANCELLED" in lines and "FINALLY" in lines, out
    # the coroutine was cancelled (and finished its cleanup) before the caller saw the interrupt
    assert out.index("CANCELLED") < out.index("KEYBOARDINTERRUPT"), out
    assert out.index("FINALLY") < out.index("KEYBOARDINTERRUPT"), out
    assert "Traceback" not in err, err


# --------------------------------------------------------------------------- 8. with / repr


def test_context_manager_closes_and_repr() -> None:
    with Thing("ctx") as thing:
        assert thing.add(1, 2) == 3
        assert not thing.async_api.closed
    assert thing.async_api.closed
    assert repr(thing) == "Thing(AsyncThing('ctx'))"

    class Plain:  # no close method: close() is a no-op
        pass

    with SyncWrapper(Plain()) as plain:
        pass
    assert repr(plain).startswith("SyncWrapper(")


def test_file_queue_twin_on_memory() -> None:
    pytest.importorskip("omniq.storage.file.queue")
    from omniq.core import Task, TaskStatus
    from omniq.storage.file.queue import FileQueue

    base_dir = f"memory://omniq-sync-{uuid.uuid4().hex}"
    with FileQueue(base_dir) as queue:
        assert base_dir in repr(queue) and repr(queue).startswith("FileQueue(")
        tasks = [Task(func="pkg.mod:fn", args=[i]) for i in range(20)]
        ids: list[str] = []
        lock = threading.Lock()

        def enqueue(task: Task) -> None:
            task_id = queue.enqueue(task)
            with lock:
                ids.append(task_id)

        threads = [threading.Thread(target=enqueue, args=(t,)) for t in tasks]
        for th in threads:
            th.start()
        for th in threads:
            th.join(10)
        assert sorted(ids) == sorted(t.id for t in tasks)
        assert queue.size().ready == 20
        claimed = queue.dequeue()
        assert claimed is not None
        assert queue.get_task(claimed.id).status is TaskStatus.RUNNING
        queue.ack(claimed)
        assert queue.get_task(claimed.id).status is TaskStatus.DONE
        assert queue.purge() == 19

        async def inside() -> None:
            queue.size()

        with pytest.raises(AsyncContextError, match="AsyncFileQueue"):
            asyncio.run(inside())


# --------------------------------------------------------------------------- 9. typing


def test_blocking_preserves_name_doc_and_signature() -> None:
    thing = Thing()
    assert thing.add.__name__ == "add"
    assert thing.add.__doc__ == AsyncThing.add.__doc__ == "Add two numbers on the event loop."
    assert thing.add.__wrapped__ is AsyncThing.add
    assert Thing.add.__doc__ == AsyncThing.add.__doc__  # help(Thing) shows it
    assert isinstance(Thing.__dict__["add"], blocking)
    assert not inspect.iscoroutinefunction(thing.add)
    # the bound twin's signature is the async method's without ``self``
    assert list(inspect.signature(thing.add).parameters) == ["a", "b"]
    assert inspect.signature(thing.add).return_annotation in (int, "int")


# --------------------------------------------------------------------------- inline calls


def _threads_running_programs(q) -> list[str]:
    """Names of the threads that ran each storage program of ``q`` (recorded from now on)."""
    seen: list[str] = []
    real = q.async_api.store.run

    async def recording(program, **kwargs):
        seen.append(threading.current_thread().name)
        return await real(program, **kwargs)

    q.async_api.store.run = recording
    return seen


def test_a_local_queue_runs_its_calls_on_the_calling_thread(tmp_path):
    from omniq.core import Task
    from omniq.storage.file.queue import FileQueue

    with FileQueue(tmp_path / "q") as q:
        q.size()  # start-up (probe, first reaper pass) out of the way
        seen = _threads_running_programs(q)
        q.enqueue(Task(func="m:f"))
        claimed = q.dequeue()
        assert claimed is not None
        q.ack(claimed)
        assert set(seen) == {threading.current_thread().name}
        seen.clear()
        assert q.dequeue(wait=0.05) is None  # a call that waits takes the loop thread
        assert seen and set(seen) == {"omniq-loop"}


def test_an_inline_call_does_not_look_at_the_selector(tmp_path, monkeypatch):
    """A local enqueue awaits nothing but its own steps: stepping its task through the
    loop's selector (an epoll_wait each) was ~5 % of a blocking enqueue. A call that hands
    work to a thread still waits on the selector for it."""
    from omniq.core import Task
    from omniq.core import sync as sync_module
    from omniq.storage.file.queue import FileQueue

    with FileQueue(tmp_path / "q") as q:
        q.size()  # start-up out of the way; the thread's private loop exists now
        loop = sync_module._HERE.get()
        looks: list[object] = []
        real = loop._selector.select  # type: ignore[attr-defined]
        monkeypatch.setattr(
            loop._selector,  # type: ignore[attr-defined]
            "select",
            lambda timeout=None: looks.append(timeout) or real(timeout),
        )
        for i in range(20):
            q.enqueue(Task(func="m:f", args=[i]))
        assert looks == []
        claimed = q.dequeue()
        assert claimed is not None
        q.ack(claimed)
        assert q.size().ready == 19


@pytest.mark.parametrize("library", ["asyncio", "trio"])
def test_an_inline_call_is_refused_inside_a_running_loop(tmp_path, library):
    """The inline path's own check (no loop of this thread runs, none says so) must still
    refuse a call made inside a running loop, and store nothing."""
    from omniq.core import Task
    from omniq.storage.file.queue import FileQueue

    with FileQueue(tmp_path / "q") as q:
        q.size()

        async def main() -> None:
            q.enqueue(Task(func="m:f"))

        with pytest.raises(AsyncContextError, match=library):
            if library == "trio":
                import trio

                trio.run(main)
            else:
                asyncio.run(main())
        assert q.size().ready == 0
        q.enqueue(Task(func="m:f"))  # outside the loop it runs
        assert q.size().ready == 1


def test_a_queue_with_an_event_hook_keeps_to_the_loop_thread(tmp_path):
    from omniq.core import Task
    from omniq.storage.file.queue import AsyncFileQueue, FileQueue

    async def hook(event):
        pass

    q = FileQueue.wrap(AsyncFileQueue(tmp_path / "q", on_event=hook))
    seen = _threads_running_programs(q)
    q.enqueue(Task(func="m:f"))
    assert set(seen) == {"omniq-loop"}
    q.close()


def test_inline_calls_from_many_threads_lose_and_duplicate_nothing(tmp_path):
    from omniq.core import Task
    from omniq.storage.file.queue import FileQueue

    got: list[int] = []
    errors: list[BaseException] = []
    with FileQueue(tmp_path / "q") as q:

        def work(k: int) -> None:
            try:
                for i in range(50):
                    q.enqueue(Task(func="m:f", args=[k * 50 + i]))
                    # Some calls take the loop thread meanwhile (a dequeue that waits).
                    if i % 5 == 0 and (waited := q.dequeue(wait=0.001)) is not None:
                        got.append(waited.task.args[0])
                        q.ack(waited)
                while (claimed := q.dequeue()) is not None:
                    got.append(claimed.task.args[0])
                    q.ack(claimed)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert errors == []
    assert sorted(got) == list(range(400))  # every task once
