"""A fault-injecting fsspec filesystem, for OmniQ's fault tests and benchmarks.

``FaultyFileSystem`` wraps another (sync) fsspec filesystem -- memory by default, or a local
directory -- and makes a share of its calls fail the way a flaky object store does: connection
resets, timeouts and HTTP 503 answers. A fault is injected either *before* the wrapped call (it
never happened) or *after* it (it happened, but the caller cannot know): the second kind is what
makes a retried exclusive create or delete ambiguous::

    import faulty_fs

    faulty_fs.register()  # protocol "faulty"
    faults = faulty_fs.Faults(rate=0.2, seed=7)
    queue = AsyncFileQueue("faulty://bucket/app", {"faults": faults, "target_protocol": "memory"})
    ...
    print(faults.summary())  # what was injected, per operation

``faults`` is shared by every filesystem built with it (the queue, results and events each build
their own), so its counters cover all of them. ``Faults(plan=...)`` replaces the random choice by
a function ``plan(op, path, call_number) -> "before" | "after" | None`` for scripted scenarios.

Exclusive create (``pipe_file(mode="create")``) is made atomic inside the wrapper (a lock around
check-and-write), like the conditional PUT of a real object store; the memory and local fsspec
implementations alone are not atomic between threads.

The filesystem is synchronous (``async_impl = False``): ``omniq.core.fs.Store`` runs such
plugins through its sync path in a worker thread, which is the path under test.
"""

from __future__ import annotations

import errno
import random
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import fsspec
from fsspec.spec import AbstractFileSystem

__all__ = ["PROTOCOL", "Faults", "FaultyFileSystem", "register", "transient_error"]

PROTOCOL = "faulty"

#: The operations that can fail (names of the wrapper's methods).
OPS = ("cat_file", "cat", "pipe_file", "create", "rm_file", "rm", "ls", "exists", "info")

_KINDS = ("reset", "timeout", "503")


def transient_error(kind: str, op: str, path: str) -> Exception:
    """An exception like those a flaky object store raises (all retryable)."""
    if kind == "reset":
        return ConnectionResetError(errno.ECONNRESET, f"Connection reset by peer ({op})")
    if kind == "timeout":
        return TimeoutError(f"Read timed out ({op})")
    return OSError(f"503 Service Unavailable: SlowDown, please reduce your request rate ({op})")


class Faults:
    """Decides which calls fail, and counts calls and injected faults.

    Args:
        rate: share of calls that fail (0..1).
        after_share: share of the injected faults raised *after* the wrapped call succeeded.
        ops: operations that may fail (default: all in ``OPS``).
        seed: seed of the random choice (reproducible runs).
        plan: scripted mode: ``plan(op, path, n)`` returns "before", "after" or None, where
            ``n`` counts the calls of ``op`` so far (1-based); ``rate`` is then ignored.
    """

    def __init__(
        self,
        rate: float = 0.2,
        *,
        after_share: float = 0.5,
        ops: Iterable[str] | None = None,
        seed: int | None = None,
        plan: Callable[[str, str, int], str | None] | None = None,
    ) -> None:
        self.rate = rate
        self.after_share = after_share
        self.ops = frozenset(ops if ops is not None else OPS)
        self.plan = plan
        self.enabled = True
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.calls: Counter[str] = Counter()
        self.injected: Counter[tuple[str, str, str]] = Counter()  # (op, when, kind)

    def __repr__(self) -> str:
        return f"Faults(rate={self.rate}, injected={self.total})"

    @property
    def total(self) -> int:
        """Number of faults injected so far."""
        return sum(self.injected.values())

    def count(self, op: str | None = None, when: str | None = None) -> int:
        return sum(
            n
            for (o, w, _), n in self.injected.items()
            if (op is None or o == op) and (when is None or w == when)
        )

    def summary(self) -> str:
        parts = [f"{op}/{when}/{kind}={n}" for (op, when, kind), n in sorted(self.injected.items())]
        return f"{self.total} faults in {sum(self.calls.values())} calls: " + ", ".join(parts)

    def decide(self, op: str, path: str) -> tuple[str, Exception] | None:
        """``(when, exception)`` to inject into this call, or None."""
        with self._lock:
            self.calls[op] += 1
            if not self.enabled or op not in self.ops:
                return None
            if self.plan is not None:
                when = self.plan(op, path, self.calls[op])
                kind = _KINDS[self.calls[op] % len(_KINDS)]
            else:
                if self._rng.random() >= self.rate:
                    return None
                when = "after" if self._rng.random() < self.after_share else "before"
                kind = self._rng.choice(_KINDS)
            if when is None:
                return None
            if when not in ("before", "after"):
                raise ValueError(f"plan returned {when!r}; expected 'before', 'after' or None")
            self.injected[(op, when, kind)] += 1
            return when, transient_error(kind, op, path)


_create_lock = threading.Lock()


class FaultyFileSystem(AbstractFileSystem):  # type: ignore[misc]
    """A sync fsspec filesystem that forwards to ``target_protocol`` and injects ``faults``."""

    protocol = (PROTOCOL,)
    root_marker = "/"
    async_impl = False

    def __init__(
        self,
        faults: Faults | None = None,
        target_protocol: str = "memory",
        target_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("use_listings_cache", None)
        kwargs.pop("listings_expiry_time", None)
        super().__init__(**kwargs)
        self.faults = faults if faults is not None else Faults(rate=0.0)
        self.target = fsspec.filesystem(target_protocol, **(target_options or {}))

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        path = str(path)
        if path.startswith(PROTOCOL + "://"):
            path = path[len(PROTOCOL) + 3 :]
        path = path.strip("/")
        return "/" + path if path else ""

    def _call(self, op: str, path: Any, fn: Callable[[], Any]) -> Any:
        fault = self.faults.decide(op, str(path))
        if fault is not None and fault[0] == "before":
            raise fault[1]
        result = fn()
        if fault is not None:
            raise fault[1]
        return result

    # -- reads -----------------------------------------------------------------------------
    def cat_file(
        self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any
    ) -> bytes:
        return self._call("cat_file", path, lambda: self.target.cat_file(path, start, end))  # type: ignore[no-any-return]

    def cat(
        self, path: Any, recursive: bool = False, on_error: str = "raise", **kwargs: Any
    ) -> Any:
        if isinstance(path, str):
            return self.cat_file(path)

        def go() -> dict[str, Any]:
            out: dict[str, Any] = {}
            for p in path:
                try:
                    out[p] = self.target.cat_file(p)
                except Exception as exc:
                    if on_error == "raise":
                        raise
                    if on_error == "return":
                        out[p] = exc
            return out

        return self._call("cat", path, go)

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> Any:
        return self._call("ls", path, lambda: self.target.ls(path, detail=detail))

    def info(self, path: str, **kwargs: Any) -> Any:
        return self._call("info", path, lambda: self.target.info(path))

    def exists(self, path: str, **kwargs: Any) -> bool:
        return self._call("exists", path, lambda: self.target.exists(path))  # type: ignore[no-any-return]

    # -- writes ----------------------------------------------------------------------------
    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any) -> None:
        if mode == "create":

            def create() -> None:
                with _create_lock:  # a conditional PUT is atomic on a real store
                    if self.target.exists(path):
                        raise FileExistsError(errno.EEXIST, "exists", path)
                    self.target.pipe_file(path, value)

            self._call("create", path, create)
            return
        self._call("pipe_file", path, lambda: self.target.pipe_file(path, value))

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        return self.target._open(path, mode=mode, **kwargs)

    def rm_file(self, path: str) -> None:
        self._call("rm_file", path, lambda: self.target.rm_file(path))

    def rm(self, path: Any, recursive: bool = False, maxdepth: int | None = None) -> None:
        paths = [path] if isinstance(path, str) else list(path)

        def go() -> None:
            missing = []
            for p in paths:
                try:
                    self.target.rm_file(p)
                except FileNotFoundError:
                    missing.append(p)
            if missing:
                raise FileNotFoundError(errno.ENOENT, "not found", missing[0])

        self._call("rm", paths, go)

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        self.target.mkdir(path, create_parents=create_parents, **kwargs)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self.target.makedirs(path, exist_ok=exist_ok)


def register() -> None:
    """Register ``FaultyFileSystem`` under the protocol ``faulty`` (idempotent)."""
    fsspec.register_implementation(PROTOCOL, FaultyFileSystem, clobber=True)
