"""Bad input: unsafe names, values JSON cannot carry, function paths that do not resolve,
functions outside a worker's allow-list.

Names are refused with InvalidNameError (an OmniQError) by the queue, results, events and the
backend before any I/O; values at enqueue time with SerializationError (never in the worker);
a task whose function cannot be resolved or is not allowed fails once, with a clear error
result, and is dead-lettered without retry.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import fault_stats
import pytest

from omniq.backend.file import AsyncFileBackend, FileBackend
from omniq.core import (
    EventType,
    InvalidNameError,
    OmniQError,
    ResultStatus,
    SerializationError,
    Task,
    TaskEvent,
    TaskResult,
    TaskStatus,
)
from omniq.core.codec import MAX_DEPTH, MAX_DOCUMENT_BYTES

BAD_NAMES: list[Any] = [
    "",
    ".",
    "..",
    "...",
    "../x",
    "../../etc/passwd",
    "a/../../b",
    "a/b",
    "a/",
    "/",
    "//",
    "a\\b",
    "..\\..\\x",
    "\\\\server\\share",
    "/abs",
    "/etc/passwd",
    "C:\\x",
    "C:",
    "c:x",
    "\x00",
    "a\x00b",
    "a\x00/../x",
    "a\nb",
    "a\rb",
    "a\tb",
    "\x1b[31mred",
    "\x7f",
    "\x85",
    "a b",
    " a",
    "a ",
    "x" * 129,
    "y" * 10_000,
    ".hidden",
    "-rf",
    "_expiry",
    "_quarantine",
    "a~b",
    "a:b",
    "a*b",
    "a?b",
    "a|b",
    "a<b",
    "a>b",
    '"a"',
    "a'b",
    "%2e%2e",
    "%2F",
    "~",
    "~root",
    "ａｂｃ",
    "dеfault",  # fullwidth letters; Cyrillic "е" in "default"
    "default\u200b",
    "\u202egnp.exe",
    "café",
    "🙂",
    "a\u2215b",
    "a\u2044b",
    "a\uff0fb",
    "\u2024\u2024",
    "\uff0e\uff0e",
    "a\u0338",
    "ǅ",
    None,
    1,
    1.5,
    b"bytes",
    b"../x",
    object(),
]


def _snapshot(root: Path) -> dict[str, int]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            out[str(path)] = path.lstat().st_size if name in filenames else -1
    return out


def _remote_snapshot(storage: Any) -> set[str]:
    fs = storage.filesystem()
    bucket = storage.base_dir.split("://", 1)[1].split("/", 1)[0]
    try:
        return set(fs.find(bucket))
    except FileNotFoundError:
        return set()


async def _expect_invalid(calls: list[tuple[str, Callable[[], Awaitable[Any]]]]) -> None:
    for label, call in calls:
        try:
            await call()
        except InvalidNameError as exc:
            assert isinstance(exc, OmniQError)
            continue
        except Exception as exc:  # a crash of another kind is a failure too
            raise AssertionError(f"{label}: {type(exc).__name__}: {exc}") from exc
        raise AssertionError(f"{label}: accepted")


def _calls(backend: AsyncFileBackend, bad: Any) -> list[tuple[str, Callable[[], Awaitable[Any]]]]:
    q, results, events = backend.queue, backend.results, backend.events
    assert results is not None and events is not None
    good = Task(func="fault_tasks_ok:echo", id="good1")
    b = repr(bad)[:40]
    calls = [
        (f"queue.enqueue(queue={b})", lambda: q.enqueue(Task(func="m:f", queue=bad))),
        (f"queue.enqueue(id={b})", lambda: q.enqueue(Task(func="m:f", id=bad))),
        (
            f"queue.enqueue_many([good, id={b}])",
            lambda: q.enqueue_many([good, Task(func="m:f", id=bad)]),
        ),
        (f"queue.dequeue({b})", lambda: q.dequeue(bad)),
        (f"queue.dequeue([default, {b}])", lambda: q.dequeue(["default", bad])),
        (f"queue.get_task({b})", lambda: q.get_task(bad)),
        (f"queue.get_task(ok, queue={b})", lambda: q.get_task("ok1", queue=bad)),
        (f"queue.cancel({b})", lambda: q.cancel(bad)),
        (f"queue.cancel(ok, queue={b})", lambda: q.cancel("ok1", queue=bad)),
        (f"queue.size({b})", lambda: q.size(bad)),
        (f"queue.purge({b})", lambda: q.purge(bad)),
        (f"queue.list_dead({b})", lambda: q.list_dead(bad)),
        (f"queue.requeue_dead({b})", lambda: q.requeue_dead(bad)),
        (f"queue.requeue_dead(task_id={b})", lambda: q.requeue_dead("default", task_id=bad)),
        (f"queue.reap({b})", lambda: q.reap(bad)),
        (
            f"results.set({b})",
            lambda: results.set(TaskResult(task_id=bad, status=ResultStatus.SUCCESS, value=1)),
        ),
        (f"results.get({b})", lambda: results.get(bad)),
        (f"results.wait({b})", lambda: results.wait(bad, timeout=0.01)),
        (f"results.delete({b})", lambda: results.delete(bad)),
        (
            f"events.log(task_id={b})",
            lambda: events.log(TaskEvent(task_id=bad, type=EventType.STARTED)),
        ),
        (
            f"events.log(id={b})",
            lambda: events.log(TaskEvent(task_id="ok1", id=bad, type=EventType.STARTED)),
        ),
        (f"events.query(task_id={b})", lambda: events.query(task_id=bad)),
        (
            f"backend.enqueue(queue={b})",
            lambda: backend.enqueue("fault_tasks_ok:echo", [1], queue=bad),
        ),
        (
            f"backend.enqueue(task_id={b})",
            lambda: backend.enqueue("fault_tasks_ok:echo", [1], task_id=bad),
        ),
        (
            f"backend.task(queue={b}).enqueue",
            lambda: backend.task(queue=bad)(_module_level_echo).enqueue(1),
        ),
        (f"backend.result({b})", lambda: backend.result(bad)),
        (f"backend.result({b}, wait)", lambda: backend.result(bad, wait=0.01)),
        (f"backend.get_task({b})", lambda: backend.get_task(bad)),
        (f"backend.cancel({b})", lambda: backend.cancel(bad)),
        (
            f"backend.worker([{b}]).run()",
            lambda: backend.worker([bad], burst=True, idle_timeout=0.1, handle_signals=False).run(),
        ),
    ]
    # None is a meaningful value of these optional arguments ("every queue", "all tasks")
    optional = (
        "get_task(ok, queue=",
        "cancel(ok, queue=",
        "requeue_dead(task_id=",
        "events.query(task_id=",
        "backend.enqueue(task_id=",
    )
    if bad is None:
        calls = [(label, call) for label, call in calls if not any(o in label for o in optional)]
    return calls


def _module_level_echo(value: Any) -> Any:
    return value


@pytest.mark.timeout(120)
def test_unsafe_names_are_refused_everywhere_before_any_io(storage, tmp_path: Path) -> None:
    if storage.kind == "local":
        outside = tmp_path.parent
        before: Any = _snapshot(outside)
    elif storage.kind == "memory":
        fs = storage.filesystem()
        before = set(fs.store) | set(fs.pseudo_dirs)
    else:
        before = _remote_snapshot(storage)
    tried = 0

    async def go() -> int:
        n = 0
        async with AsyncFileBackend(
            storage.base_dir, storage.storage_options, events=True
        ) as backend:
            for bad in BAD_NAMES:
                calls = _calls(backend, bad)
                await _expect_invalid(calls)
                n += len(calls)
        return n

    tried = asyncio.run(go())
    fault_stats.add("bad inputs tried", tried)
    if storage.kind == "local":
        after = _snapshot(outside)
        assert after == before, {k: v for k, v in after.items() if before.get(k) != v}
        assert not Path(storage.base_dir).exists(), "something was written for a refused call"
    elif storage.kind == "memory":
        fs = storage.filesystem()
        assert set(fs.store) | set(fs.pseudo_dirs) == before
    else:
        assert _remote_snapshot(storage) == before
    assert tried == len(BAD_NAMES) * 30 - 5


def test_sync_api_refuses_unsafe_names(tmp_path: Path) -> None:
    with FileBackend(str(tmp_path / "store")) as backend:
        for bad in ("../x", "a/b", "\x00", "ａ"):
            calls: list[Callable[[], Any]] = [
                lambda b=bad: backend.enqueue("fault_tasks_ok:echo", queue=b),
                lambda b=bad: backend.enqueue("fault_tasks_ok:echo", task_id=b),
                lambda b=bad: backend.result(b),
                lambda b=bad: backend.get_task(b),
                lambda b=bad: backend.cancel(b),
            ]
            for call in calls:
                with pytest.raises(InvalidNameError):
                    call()
    fault_stats.add("bad inputs tried", 20)
    assert not (tmp_path / "store").exists()


# --------------------------------------------------------------------------- values


class _Custom:
    pass


def _deep(levels: int, kind: str) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = [value] if kind == "list" else {"k": value}
    return value


def _cycle() -> list[Any]:
    loop: list[Any] = []
    loop.append(loop)
    return loop


BAD_VALUES: dict[str, Any] = {
    "object": object(),
    "custom class": _Custom(),
    "set": {1, 2},
    "frozenset": frozenset([1]),
    "bytes": b"raw",
    "bytearray": bytearray(b"x"),
    "datetime": dt.datetime.now(dt.timezone.utc),
    "date": dt.date.today(),
    "complex": 1j,
    "nan": float("nan"),
    "inf": float("inf"),
    "-inf": float("-inf"),
    "2**64": 2**64,
    "-(2**63)-1": -(2**63) - 1,
    "int key": {1: "a"},
    "tuple key": {(1, 2): "a"},
    "None key": {None: 1},
    "function": _module_level_echo,
    "lambda": lambda: 1,
    "generator": (i for i in range(3)),
    "module": os,
    "type": int,
    "exception": ValueError("x"),
    "Path": Path("/tmp"),
    "range": range(3),
    "nested set": {"a": [1, {"b": {2}}]},
    f"depth {MAX_DEPTH + 1} lists": _deep(MAX_DEPTH + 1, "list"),
    f"depth {MAX_DEPTH + 1} dicts": _deep(MAX_DEPTH + 1, "dict"),
    "depth 100000": _deep(100_000, "list"),
    "self-reference": _cycle(),
    "huge string": "x" * (MAX_DOCUMENT_BYTES + 1),
    "many small items": ["y" * 1000] * (MAX_DOCUMENT_BYTES // 1000 + 10),
}


@pytest.mark.parametrize("where", ["args", "kwargs", "metadata"])
def test_values_json_cannot_carry_fail_at_enqueue(where: str, tmp_path: Path) -> None:
    base = str(tmp_path / "store")
    tried = 0
    with FileBackend(base) as backend:
        send = backend.task(_module_level_echo)
        for label, value in BAD_VALUES.items():
            options: dict[str, Any] = {"args": (), "kwargs": None}
            if where == "args":
                options["args"] = [value]
            elif where == "kwargs":
                options["kwargs"] = {"value": value}
            else:
                options["metadata"] = {"m": value}
            with pytest.raises(SerializationError) as info:
                backend.enqueue(
                    "fault_tasks_ok:echo",
                    options["args"],
                    options["kwargs"],
                    **({"metadata": options["metadata"]} if "metadata" in options else {}),
                )
            assert isinstance(info.value, OmniQError)
            assert str(info.value), label
            tried += 1
            if where != "metadata":
                with pytest.raises(SerializationError):
                    if where == "args":
                        send.enqueue(value)
                    else:
                        send.enqueue(value=value)
                tried += 1
        # one bad task in a batch: the batch is refused whole, nothing is written
        queue = backend.async_api.queue
        good = [backend.make_task("fault_tasks_ok:echo", [i]) for i in range(3)]
        bad = backend.make_task("fault_tasks_ok:echo", [{1, 2}])
        from omniq.core.sync import run_sync

        with pytest.raises(SerializationError):
            run_sync(lambda: queue.enqueue_many([*good, bad]))
        tried += 1
        size = run_sync(lambda: queue.size())
        assert size.total == 0, size
    fault_stats.add("bad inputs tried", tried)
    queue_dir = Path(base) / "queue"
    written = [p for p in queue_dir.rglob("*") if p.is_file() and "_omniq" not in p.parts]
    assert written == [], written


def test_serialization_error_names_the_type_and_place(tmp_path: Path) -> None:
    with FileBackend(str(tmp_path / "store")) as backend:
        with pytest.raises(SerializationError, match=r"args\[0\]\['when'\].*datetime"):
            backend.enqueue("fault_tasks_ok:echo", [{"when": dt.datetime.now()}])
        with pytest.raises(SerializationError, match=str(MAX_DOCUMENT_BYTES)):
            backend.enqueue("fault_tasks_ok:echo", ["x" * (MAX_DOCUMENT_BYTES + 1)])
        with pytest.raises(SerializationError, match="deeper than"):
            backend.enqueue("fault_tasks_ok:echo", [_deep(100_000, "dict")])
    fault_stats.add("bad inputs tried", 3)


def test_results_the_worker_cannot_store_become_failure_results(tmp_path: Path) -> None:
    """The task ran, but its return value cannot be stored: a FAILURE result says why, and
    the task is dead-lettered at once (running it again would give the same value)."""
    with FileBackend(str(tmp_path / "store")) as backend:
        ids = [
            backend.enqueue("fault_tasks_ok:returns_set"),
            backend.enqueue("fault_tasks_ok:returns_huge"),
        ]
        stats = backend.worker(["default"], burst=True, idle_timeout=0.3).run()
        assert stats["claimed"] == 2
        for task_id in ids:
            result = backend.result(task_id)
            assert result is not None and result.status is ResultStatus.FAILURE
            assert result.error is not None and "SerializationError" in result.error.type
            assert result.attempt == 1
            assert backend.get_task(task_id).status is TaskStatus.DEAD
    fault_stats.add("bad inputs tried", 2)


# --------------------------------------------------------------------------- functions


def _run_worker(backend: FileBackend, **options: Any) -> dict[str, int]:
    return backend.worker(["default"], concurrency=2, burst=True, idle_timeout=0.5, **options).run()


def _events_of(backend: FileBackend, task_id: str) -> list[str]:
    from omniq.core.sync import run_sync

    events = backend.async_api.events
    assert events is not None
    return [e.type.value for e in run_sync(lambda: events.query(task_id=task_id))]


def _assert_failed_once(backend: FileBackend, task_id: str, error_type: str, text: str) -> None:
    result = backend.result(task_id)
    assert result is not None, f"{task_id}: no result"
    assert result.status is ResultStatus.FAILURE, result
    assert result.error is not None and result.error.type.endswith(error_type), result.error
    assert text in result.error.message, result.error.message
    assert result.attempt == 1
    info = backend.get_task(task_id)
    assert info.status is TaskStatus.DEAD, info
    kinds = _events_of(backend, task_id)
    assert kinds.count("started") == 1 and "retried" not in kinds, kinds
    assert "dead_lettered" in kinds, kinds


@pytest.mark.timeout(60)
def test_function_paths_that_do_not_resolve_fail_once_without_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "fault_tasks_syntax.py").write_text("def f(:\n    pass\n")
    (tmp_path / "mods" / "fault_tasks_nameerror.py").write_text("x = undefined_name\n")
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    importlib.invalidate_caches()
    paths = {
        "no_such_module_omniq_xyz:f": "cannot import",
        "fault_tasks_ok:missing_function": "cannot import",
        "fault_tasks_ok:NOT_CALLABLE": "not a function",
        "os:path": "not a function",
        "fault_tasks_broken:never": "fault_tasks_broken",
        "fault_tasks_syntax:f": "fault_tasks_syntax",
        "fault_tasks_nameerror:x": "fault_tasks_nameerror",
        "fault_tasks_ok:echo.__class__.mro.nope": "cannot import",
    }
    with FileBackend(str(tmp_path / "store"), events=True) as backend:
        ids = {path: backend.enqueue(path, [1], max_retries=3) for path in paths}
        from omniq.core.sync import run_sync

        queue = backend.async_api.queue
        # paths the producer API refuses (no ":"), stored by a lower-level producer
        raw = [Task(func=func, max_retries=3) for func in ("no_colon", ":f", "mod:")]
        run_sync(lambda: queue.enqueue_many(raw))
        stats = _run_worker(backend)
        for path, task_id in ids.items():
            _assert_failed_once(backend, task_id, "FunctionImportError", paths[path])
        for task in raw:
            _assert_failed_once(backend, task.id, "FunctionImportError", task.func)
        total = len(ids) + len(raw)
        assert stats["dead"] == total and stats["retried"] == 0, stats
        assert len(backend.async_api and run_sync(lambda: queue.list_dead())) == total
    fault_stats.add("bad inputs tried", total)


@pytest.mark.timeout(60)
def test_allow_list_refuses_other_functions_without_importing_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mark = tmp_path / "evil-imported"
    monkeypatch.setenv("OMNIQ_FAULT_EVIL_MARK", str(mark))
    sys.modules.pop("fault_tasks_evil", None)
    with FileBackend(str(tmp_path / "store"), events=True) as backend:
        ok = backend.enqueue("fault_tasks_ok:add", [2, 3], max_retries=3)
        refused = {
            "fault_tasks_evil:boom": backend.enqueue("fault_tasks_evil:boom", max_retries=3),
            "fault_tasks_ok_evil:x": backend.enqueue("fault_tasks_ok_evil:x", max_retries=3),
            "os:system": backend.enqueue("os:system", ["echo pwned"], max_retries=3),
            "builtins:eval": backend.enqueue("builtins:eval", ["1"], max_retries=3),
        }
        stats = _run_worker(backend, allow=["fault_tasks_ok"])
        result = backend.result(ok)
        assert result is not None and result.ok and result.value == 5
        for path, task_id in refused.items():
            _assert_failed_once(backend, task_id, "FunctionNotAllowedError", path)
        assert stats["dead"] == len(refused) and stats["succeeded"] == 1, stats

        # an exact entry allows that function only
        other = backend.enqueue("fault_tasks_ok:echo", ["no"], max_retries=2)
        allowed = backend.enqueue("fault_tasks_ok:add", [1, 1])
        _run_worker(backend, allow=["fault_tasks_ok:add"])
        _assert_failed_once(backend, other, "FunctionNotAllowedError", "fault_tasks_ok:echo")
        assert backend.result(allowed).value == 2
    assert "fault_tasks_evil" not in sys.modules
    assert not mark.exists(), mark.read_text()
    fault_stats.add("bad inputs tried", len(refused) + 1)
