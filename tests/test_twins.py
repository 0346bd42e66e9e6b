"""Every public member of an exported ``Async*`` class has a blocking twin with the same call.

The convention (issue 17): ``Async*`` classes are async-first and the class of the same name
without the prefix, exported by the same package (``AsyncFileQueue`` -> ``FileQueue``,
``AsyncWorker`` -> ``Worker``, ...), is their typed blocking twin. The pairs are discovered
from the ``__all__`` of the five distributions' top-level modules, so a new ``Async*`` class
is checked (or must be allow-listed) without editing this file.

For each public member (no leading underscore) that the async class has *on the class*
(methods, properties, class and static methods, inherited ones included, ``object``'s not),
the twin must have:

* the member itself;
* the same kind: a method stays a method, a property a property, a classmethod a classmethod;
* a blocking method: the twin's member is never a coroutine (or async generator) function;
* the same parameters (``self``/``cls`` left out): names, kinds (positional-only, keyword-only,
  ``*args``, ``**kwargs``), defaults and annotations;
* the same return annotation *after awaiting*: ``async def f() -> X`` and ``def f() -> X``
  match, since the twin returns what the await gives.

Annotations are compared as written (strings, under ``from __future__ import annotations``),
after two renamings that make the twins' types the counterparts of the async ones: an
``AsyncFoo`` whose twin ``Foo`` is exported becomes ``Foo`` (``-> AsyncWorker`` matches
``-> Worker``), and ``Self`` becomes the class's own name (``-> Self`` on ``AsyncFileBackend``
matches ``-> FileBackend``). An async return typed ``Any`` (a plain ``def`` handing back an
awaitable, like ``AsyncTaskFunction.enqueue``) accepts any twin return type; a twin typed
``Any`` where the async member is precise is a gap (the twin loses the type).

Not compared: instance attributes set in ``__init__`` (``AsyncFileBackend.queue``,
``AsyncWorker.stats``, ...), which are not on the class, and members only the twin has
(``wrap``, ``async_api``, ``close`` of a twin whose async class has none).

All gaps of all pairs are reported at once. An intentional difference goes into ``ALLOWED``
with its reason; an entry that no longer matches a gap fails the test, so the list cannot rot.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
from typing_extensions import Self

from omniq.backend.file import FileBackend
from omniq.core import EventType, TaskEvent, blocking, delegate

#: The top-level module of each distribution (the public API lives in their ``__all__``).
PACKAGE_MODULES = (
    "omniq.core",
    "omniq.storage.file.queue",
    "omniq.storage.file.results",
    "omniq.storage.file.events",
    "omniq.backend.file",
)

#: Exported ``Async*`` classes that have no blocking twin on purpose.
NO_TWIN: dict[str, str] = {
    # Abstract interfaces for storage implementations: what users call is a concrete class
    # (AsyncFileQueue, AsyncFileResultStorage, AsyncFileEventStorage), whose twin is checked.
    "AsyncQueue": "abstract interface; its implementations' twins are checked",
    "AsyncResultStorage": "abstract interface; its implementations' twins are checked",
    "AsyncEventStorage": "abstract interface; its implementations' twins are checked",
}

#: (async class, member) -> why the twin differs on purpose. Keep each reason specific.
ALLOWED: dict[tuple[str, str], str] = {
    # The async ScheduleStore that the worker's ScheduleRunner (and white-box tests) drive;
    # internal plumbing of the async side with no blocking counterpart. Users go through
    # list/get/pause/resume/delete, which are twinned.
    ("AsyncSchedules", "store"): "async-only plumbing (ScheduleStore) of the schedule runner",
}

#: The pairs the discovery must find at least (guards against it silently finding nothing).
EXPECTED_PAIRS = {
    ("AsyncFileQueue", "FileQueue"),
    ("AsyncFileResultStorage", "FileResultStorage"),
    ("AsyncFileEventStorage", "FileEventStorage"),
    ("AsyncFileBackend", "FileBackend"),
    ("AsyncWorker", "Worker"),
    ("AsyncSchedules", "Schedules"),
    ("AsyncTaskFunction", "TaskFunction"),
}


# --------------------------------------------------------------------------- #
# the checker
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Member:
    """One class member as a caller sees it."""

    kind: str  # "method", "classmethod", "staticmethod", "property" or "attribute"
    signature: inspect.Signature | None  # without self/cls; a property's getter's
    is_async: bool


def describe(cls: type, name: str) -> Member:
    """How ``cls.name`` is called: its kind, signature (without ``self``) and async-ness.

    Descriptors are bound to a stand-in instance, as an instance lookup would: the
    ``blocking`` descriptor of the twins then yields the very callable (and the
    ``__signature__``) that users get."""
    raw = inspect.getattr_static(cls, name)
    if isinstance(raw, (property, functools.cached_property)):
        getter = raw.fget if isinstance(raw, property) else raw.func
        sig = inspect.signature(getter) if getter is not None else None
        return Member("property", sig, False)
    bound: Any
    if isinstance(raw, classmethod):
        kind, bound = "classmethod", raw.__get__(None, cls)
    elif isinstance(raw, staticmethod):
        kind, bound = "staticmethod", raw.__func__
    elif inspect.isfunction(raw) or isinstance(raw, (blocking, delegate)):
        # ``_async`` is what the twins' descriptors read when bound.
        kind, bound = "method", raw.__get__(SimpleNamespace(_async=None), cls)
    else:
        return Member("attribute", None, False)
    is_async = inspect.iscoroutinefunction(bound) or inspect.isasyncgenfunction(bound)
    return Member(kind, inspect.signature(bound), is_async)


def public_members(cls: type) -> list[str]:
    """Public names on ``cls`` and its bases (not ``object``'s), sorted."""
    return sorted(n for n in dir(cls) if not n.startswith("_") and not hasattr(object, n))


def _text(annotation: Any) -> str:
    if annotation is inspect.Parameter.empty:
        return ""
    return annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)


def normaliser(twins: dict[str, str]) -> Callable[[Any, str], str]:
    """``norm(annotation, own_class)``: annotation text with ``Self`` -> ``own_class`` and
    each ``AsyncFoo`` of ``twins`` (async name -> twin name) -> ``Foo``."""

    def norm(annotation: Any, own: str) -> str:
        text = re.sub(r"\bSelf\b", own, _text(annotation))
        return re.sub(r"\b(Async\w+)\b", lambda m: twins.get(m[1], m[1]), text)

    return norm


def _params(sig: inspect.Signature, own: str, norm: Callable[[Any, str], str]) -> list[Any]:
    return [(p.name, p.kind, p.default, norm(p.annotation, own)) for p in sig.parameters.values()]


class _Shown(str):
    """Annotation text that ``inspect`` prints unquoted."""

    def __repr__(self) -> str:
        return str(self)


def _show(sig: inspect.Signature) -> str:
    params = [p.replace(annotation=_Shown(_text(p.annotation))) for p in sig.parameters.values()]
    return str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty))


def twin_gaps(async_cls: type, twin_cls: type, twins: dict[str, str]) -> dict[tuple[str, str], str]:
    """``{(async class, member): what is wrong}`` for every gap between the two classes."""
    norm = normaliser(twins)
    a_name, t_name = async_cls.__name__, twin_cls.__name__
    gaps: dict[tuple[str, str], str] = {}
    for name in public_members(async_cls):
        where = f"{t_name}.{name} (twin of {a_name}.{name})"
        key = (a_name, name)
        a = describe(async_cls, name)
        if not hasattr(twin_cls, name):
            gaps[key] = f"{where}: missing ({a.kind})"
            continue
        t = describe(twin_cls, name)
        problems: list[str] = []
        if a.kind != t.kind:
            problems.append(f"is a {t.kind}, the async member a {a.kind}")
        if t.is_async:
            problems.append("is async; a twin must block")
        if a.signature is not None and t.signature is not None:
            if a.kind != "property" and _params(a.signature, a_name, norm) != _params(
                t.signature, t_name, norm
            ):
                problems.append(
                    f"parameters {_show(t.signature)} differ from the async {_show(a.signature)}"
                )
            a_ret = norm(a.signature.return_annotation, a_name)
            t_ret = norm(t.signature.return_annotation, t_name)
            if a_ret not in (t_ret, "Any"):
                problems.append(f"returns {t_ret or '(unannotated)'}, the async one {a_ret}")
        if problems:
            gaps[key] = f"{where}: " + "; ".join(problems)
    return gaps


def discover_pairs(
    modules: tuple[str, ...] = PACKAGE_MODULES,
) -> tuple[list[tuple[type, type]], list[str]]:
    """The exported ``(Async*, twin)`` pairs, and the exported ``Async*`` classes without a
    twin (exceptions such as ``AsyncContextError`` are not API classes and are skipped)."""
    pairs: list[tuple[type, type]] = []
    lonely: list[str] = []
    for module_name in modules:
        module: ModuleType = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            if not (name.startswith("Async") and isinstance(obj, type)):
                continue
            if issubclass(obj, BaseException):
                continue
            twin = getattr(module, name.removeprefix("Async"), None)
            if isinstance(twin, type) and twin.__name__ in module.__all__:
                pairs.append((obj, twin))
            else:
                lonely.append(f"{module_name}.{name}")
    return pairs, lonely


# --------------------------------------------------------------------------- #
# the product's twins
# --------------------------------------------------------------------------- #


def test_discovery_finds_the_known_pairs() -> None:
    pairs, _ = discover_pairs()
    found = {(a.__name__, t.__name__) for a, t in pairs}
    assert found >= EXPECTED_PAIRS, EXPECTED_PAIRS - found


def test_every_exported_async_class_has_a_twin() -> None:
    _, lonely = discover_pairs()
    unexpected = [name for name in lonely if name.rsplit(".", 1)[1] not in NO_TWIN]
    stale = set(NO_TWIN) - {name.rsplit(".", 1)[1] for name in lonely}
    assert not unexpected, f"exported Async* classes without a blocking twin: {unexpected}"
    assert not stale, f"NO_TWIN entries that now have a twin (or are gone): {sorted(stale)}"


def test_every_async_member_has_a_matching_blocking_twin() -> None:
    pairs, _ = discover_pairs()
    twins = {a.__name__: t.__name__ for a, t in pairs}
    gaps: dict[tuple[str, str], str] = {}
    for async_cls, twin_cls in pairs:
        gaps.update(twin_gaps(async_cls, twin_cls, twins))
    unexpected = [msg for key, msg in sorted(gaps.items()) if key not in ALLOWED]
    stale = [f"{a}.{m}" for a, m in sorted(ALLOWED) if (a, m) not in gaps]
    report = []
    if unexpected:
        report.append(f"{len(unexpected)} twin gap(s):\n  " + "\n  ".join(unexpected))
    if stale:
        report.append("ALLOWED entries that are no longer gaps: " + ", ".join(stale))
    assert not report, "\n".join(report)


def test_the_added_twins_work(tmp_path: Path) -> None:
    # The members this test found missing (or loosely typed) on the twins, used for real.
    with FileBackend(tmp_path, environ={}, events=True, max_retries=2) as backend:
        backend.emit(TaskEvent(task_id="t1", type=EventType.STARTED))
        assert backend.events is not None
        assert [e.type for e in backend.events.query(task_id="t1")] == [EventType.STARTED]
        assert backend.queue.repair("default") == 0
        assert backend.schedules.available
        now = backend.schedules.now()
        assert now.tzinfo is not None
        assert abs((now - datetime.now(timezone.utc)).total_seconds()) < 60
        task = backend.make_task("m:f", [1], queue="mail", delay=timedelta(hours=1))
        assert (task.func, task.args, task.queue, task.max_retries) == ("m:f", [1], "mail", 2)
        assert task.eta is not None and task.eta > now
        schedule = backend.make_schedule("m:f", every=60, name="tick")
        assert schedule.id == "tick"
    with FileBackend(queue_dir=str(tmp_path / "q"), results=False, environ={}) as queue_only:
        assert not queue_only.schedules.available  # no base_dir: nowhere to keep schedules


# --------------------------------------------------------------------------- #
# the checker catches what it should
# --------------------------------------------------------------------------- #


class AsyncThing:
    @classmethod
    def open(cls, path: str) -> Self:
        raise NotImplementedError

    @property
    def size(self) -> int:
        return 0

    async def get(self, key: str, default: int = 0) -> int:
        return default

    async def put(self, key: str, *, ttl: float | None = None) -> None:
        pass

    async def child(self) -> AsyncThing:
        return self

    async def lost(self) -> bool:
        return True

    def plain(self, n: int) -> int:
        return n

    def loose(self) -> str:
        return ""


class Thing:
    def __init__(self) -> None:
        self._async = AsyncThing()

    @classmethod
    def open(cls, path: str) -> Thing:
        raise NotImplementedError

    @property
    def size(self) -> int:
        return 0

    def get(self, key: str, default: int = 1) -> int:  # default differs
        return default

    async def put(self, key: str, ttl: float | None = None) -> None:  # async, not keyword-only
        pass

    def child(self) -> Thing:  # AsyncThing -> Thing: fine
        return self

    def plain(self) -> int:  # parameter dropped
        return 0

    def loose(self) -> Any:  # loses the type
        return ""


def test_checker_reports_each_kind_of_gap() -> None:
    gaps = twin_gaps(AsyncThing, Thing, {"AsyncThing": "Thing"})
    assert set(gaps) == {
        ("AsyncThing", "get"),
        ("AsyncThing", "put"),
        ("AsyncThing", "lost"),
        ("AsyncThing", "plain"),
        ("AsyncThing", "loose"),
    }, gaps
    assert "default: int = 1" in gaps["AsyncThing", "get"]
    assert "is async; a twin must block" in gaps["AsyncThing", "put"]
    assert "*, ttl" in gaps["AsyncThing", "put"]
    assert gaps["AsyncThing", "lost"].endswith("missing (method)")
    assert "parameters ()" in gaps["AsyncThing", "plain"]
    assert "returns Any, the async one str" in gaps["AsyncThing", "loose"]


def test_checker_reports_a_kind_change() -> None:
    class AsyncBox:
        @property
        def full(self) -> bool:
            return False

    class Box:
        def full(self) -> bool:
            return False

    gaps = twin_gaps(AsyncBox, Box, {})
    assert "is a method, the async member a property" in gaps["AsyncBox", "full"]


@pytest.mark.parametrize(
    ("annotation", "own", "expected"),
    [
        ("Self", "AsyncFileBackend", "FileBackend"),
        ("AsyncFileResultStorage | None", "X", "FileResultStorage | None"),
        ("list[AsyncWorker]", "X", "list[Worker]"),
        ("AsyncUnknown", "X", "AsyncUnknown"),  # no twin: left alone
        ("SelfTest", "X", "SelfTest"),  # whole words only
    ],
)
def test_normaliser(annotation: str, own: str, expected: str) -> None:
    twins = {
        "AsyncFileBackend": "FileBackend",
        "AsyncFileResultStorage": "FileResultStorage",
        "AsyncWorker": "Worker",
    }
    assert normaliser(twins)(annotation, own) == expected
