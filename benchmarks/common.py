"""Shared plumbing of the benchmark suite: sizes, scratch directories, child processes,
statistics, RSS sampling, machine information, and the JSON / Markdown / PNG writers.

Kept free of heavy imports: child processes (``spawn``) import this module, and their peak
RSS is part of what is measured.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata
import importlib.util
import json
import math
import multiprocessing
import os
import platform
import queue as _queue
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(REPO, "tools")
MODES = ("smoke", "quick", "full")
PEER_MODULES = {"huey": "huey", "kombu": "kombu", "persist-queue": "persistqueue"}

SPAWN = multiprocessing.get_context("spawn")
ABSORB_MAX_BATCHES = 60  # absorb_deletions: at most 60,000 empty files a call


# --------------------------------------------------------------------------- statistics
def median(values: Iterable[float]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(vals) if vals else None


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    vals = sorted(values)
    if not vals:
        return None
    rank = max(1, math.ceil(q / 100 * len(vals)))
    return vals[min(rank, len(vals)) - 1]


def summary(values: Sequence[float]) -> dict[str, Any]:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0, "samples": []}
    return {
        "median": statistics.median(vals),
        "min": min(vals),
        "max": max(vals),
        "n": len(vals),
        "samples": [round(v, 6) for v in vals],
    }


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def burst_worker(
    backend: Any,
    concurrency: int,
    *,
    idle_timeout: float = 0.2,
    poll: float = 0.2,
    schedules: bool = False,
) -> Any:
    """The benchmarks' worker: queue "default", burst mode, no signal handlers."""
    return backend.worker(
        "default",
        concurrency=concurrency,
        burst=True,
        idle_timeout=idle_timeout,
        poll=poll,
        handle_signals=False,
        schedules=schedules,
    )


async def enqueue_range(backend: Any, func: str, start: int, stop: int) -> None:
    """``backend.enqueue(func, args=[i])`` for ``start <= i < stop``, then the backend's
    pending events written: a timed enqueue counts its deferred writes."""
    for i in range(start, stop):
        await backend.enqueue(func, args=[i])
    if backend.events is not None:
        await backend.events.flush()


async def drain_timed(
    backend: Any, worker: Any, n: int, at_end: Callable[[], None]
) -> dict[str, int]:
    """Run the burst ``worker`` to its end; ``at_end`` is called once it has counted ``n``
    outcomes and the backend's pending events are written (the end of a timed drain: not
    when the worker has seen the queue empty for its ``idle_timeout``). Returns its stats."""
    import anyio

    async def watch() -> None:
        while worker.stats["succeeded"] + worker.stats["failed"] < n:
            await anyio.sleep(0.002)
        if backend.events is not None:
            await backend.events.flush()
        at_end()

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        stats: dict[str, int] = await worker.run()
    return stats


def paired_ratios(
    runs: Sequence[dict[str, Any]], against: Sequence[dict[str, Any]], what: str
) -> dict[str, Any]:
    """``summary`` of ``run[what] / other[what]`` over runs paired by repetition (their
    children ran close together)."""
    return summary(
        [
            r
            for a, b in zip(runs, against, strict=False)
            if (r := ratio(a[what], b[what])) is not None
        ]
    )


def fmt(value: float | None, digits: int = 0, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if digits == 0:
        return f"{value:,.0f}{unit}"
    return f"{value:,.{digits}f}{unit}"


# --------------------------------------------------------------------------- context
@dataclass
class Context:
    """What every figure module gets: the mode, repetitions, scratch bases and a logger."""

    mode: str = "full"
    repeat: int = 3
    disk_base: str = "/tmp"
    tmpfs_base: str | None = "/dev/shm"
    out: str = ""
    notes: list[str] = field(default_factory=list)
    verbose: bool = True
    kept: list[str] = field(default_factory=list)  # disk scratch directories, until the end

    def size(self, table: dict[str, Any]) -> Any:
        """The entry of ``table`` (keyed by mode) for the current mode."""
        return table[self.mode]

    def log(self, message: str) -> None:
        if self.verbose:
            stamp = time.strftime("%H:%M:%S")
            print(f"[{stamp}] {message}", file=sys.stderr, flush=True)

    def note(self, message: str) -> None:
        self.log(f"NOTE: {message}")
        self.notes.append(message)

    def filesystems(self) -> list[tuple[str, str]]:
        """``[(label, base_dir)]``: local disk, then tmpfs when available."""
        out = [("disk", self.disk_base)]
        if self.tmpfs_base and os.path.isdir(self.tmpfs_base):
            out.append(("tmpfs", self.tmpfs_base))
        return out

    @contextlib.contextmanager
    def scratch(self, base: str, tag: str) -> Iterator[str]:
        """A fresh empty directory under ``base``. On tmpfs it is removed afterwards; on the
        disk it stays until the run ends (``remove_scratch``): ext4 will not reuse an inode
        freed in the last 60-300 s (``recently_deleted`` in its inode allocator) and scans
        past every such one for each file it creates. A configuration that ran right after
        another's thousands of files were deleted paid about a millisecond of kernel CPU a
        file: OmniQ's `drain` 497-888 tasks/s after a deletion, 2,632-3,240 without, the
        floor 948-1,464 against 8,767 (results/drain-2026-12-04.md)."""
        path = tempfile.mkdtemp(prefix=f"omniq-bench-{tag}-", dir=base)
        try:
            yield path
        finally:
            if base == self.tmpfs_base:
                shutil.rmtree(path, ignore_errors=True)
            else:
                self.kept.append(path)
            settle()

    def absorb_deletions(self, base: str) -> int:
        """On the disk, create empty files (kept until the run ends) until five thousands in a
        row are each made within 1.5x of the fastest thousand's time; the number made. After
        thousands of files were deleted (by a peer that deletes its files as it acks), ext4
        makes the next few thousand creations slow, whoever makes them, and then none:
        measured, after 12,000 deletions, ~36,000 files a second, then ~1,600-8,900 for 6,000
        files, then ~38,000 again. Whatever queue came first after such a deletion paid."""
        if base == self.tmpfs_base:
            return 0
        path, made, rates = tempfile.mkdtemp(prefix="omniq-bench-absorb-", dir=base), 0, []
        self.kept.append(path)
        while len(rates) < ABSORB_MAX_BATCHES:
            t0 = time.perf_counter()
            for i in range(made, made + 1000):
                os.close(os.open(os.path.join(path, str(i)), os.O_CREAT | os.O_WRONLY, 0o644))
            made += 1000
            rates.append(1000 / (time.perf_counter() - t0))
            if len(rates) >= 5 and min(rates[-5:]) >= max(rates) / 1.5:
                break
        settle()
        return made

    def remove_scratch(self) -> None:
        """Delete the disk's scratch directories kept by ``scratch`` (at the end of a run)."""
        while self.kept:
            shutil.rmtree(self.kept.pop(), ignore_errors=True)


def settle() -> None:
    """Flush dirty pages between measurements so one run's writeback does not land in the
    next run's timing."""
    with contextlib.suppress(Exception):
        os.sync()


def peers_available() -> dict[str, bool]:
    return {name: importlib.util.find_spec(mod) is not None for name, mod in PEER_MODULES.items()}


# --------------------------------------------------------------------------- child processes
def maxrss_kb() -> int:
    """Peak resident set size of this process in KiB.

    ``VmHWM`` from /proc/self/status: the high-water mark of this process's own memory map.
    (``ru_maxrss`` is no good in a spawned child: Linux carries the forking parent's peak
    over ``execve`` into it.)
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _child_entry(
    fn: Callable[..., dict[str, Any]], args: tuple[Any, ...], index: int, messages: Any, go: Any
) -> None:
    def ready() -> None:
        # What the set-up wrote (and what the previous run's clean-up removed) is flushed
        # before the timed window; unflushed, the disk wrote it back during the next timed
        # part (in `drain`, the system after `floor` ran at about half its speed).
        os.sync()
        messages.put(("ready", index, None))
        go.wait()

    try:
        result = fn(*args, ready=ready)
        result["maxrss_kb"] = maxrss_kb()
        messages.put(("done", index, result))
    except BaseException:  # reported to the parent, which raises
        messages.put(("error", index, traceback.format_exc()))


class ChildError(RuntimeError):
    pass


def run_children(
    fn: Callable[..., dict[str, Any]],
    arg_list: Sequence[tuple[Any, ...]],
    timeout: float = 900.0,
    on_start: Callable[[list[Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run ``fn(*args, ready=ready)`` in one fresh (spawned) process per ``args``.

    Each child does its set-up (imports, opening its queue), calls ``ready()`` (which first
    calls ``sync(2)``), and blocks there until every child is ready: the timed parts start
    together. Returns each child's
    result dict plus its ``maxrss_kb``. ``on_start(processes)`` runs once all are ready.
    """
    messages = SPAWN.Queue()
    go = SPAWN.Event()
    procs = [
        SPAWN.Process(target=_child_entry, args=(fn, args, i, messages, go), daemon=True)
        for i, args in enumerate(arg_list)
    ]
    for proc in procs:
        proc.start()
    results: list[dict[str, Any] | None] = [None] * len(procs)
    deadline = time.monotonic() + timeout
    waiting_ready = set(range(len(procs)))
    waiting_done = set(range(len(procs)))
    try:
        while waiting_done:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChildError(f"{fn.__qualname__}: children did not finish within {timeout}s")
            try:
                kind, index, payload = messages.get(timeout=min(left, 1.0))
            except _queue.Empty:
                dead = [p for i, p in enumerate(procs) if i in waiting_done and not p.is_alive()]
                if dead:
                    # a last message may still be in flight
                    try:
                        kind, index, payload = messages.get(timeout=2.0)
                    except _queue.Empty:
                        raise ChildError(
                            f"{fn.__qualname__}: a child died (exit code {dead[0].exitcode})"
                        ) from None
                else:
                    continue
            if kind == "error":
                raise ChildError(f"{fn.__qualname__} failed in a child:\n{payload}")
            if kind == "ready":
                waiting_ready.discard(index)
                if not waiting_ready:
                    if on_start is not None:
                        on_start(procs)
                    go.set()
            elif kind == "done":
                results[index] = payload
                waiting_done.discard(index)
        for proc in procs:
            proc.join(10)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        messages.close()
    return [r for r in results if r is not None]


class RssSampler:
    """Samples the RSS of a process (and its children) every ``interval`` s in a thread."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def _run(self) -> None:
        import psutil

        try:
            proc = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._stop.is_set():
            try:
                rss = proc.memory_info().rss
                for child in proc.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        rss += child.memory_info().rss
            except psutil.Error:
                return
            self.peak = max(self.peak, rss)
            self.samples += 1
            self._stop.wait(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self.peak


# --------------------------------------------------------------------------- machine info
def fs_type(path: str) -> dict[str, str]:
    """Filesystem type and device of ``path`` (longest matching mount in /proc/mounts)."""
    real = os.path.realpath(path)
    best = ("", "?", "?")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                device, mount, kind = parts[0], parts[1].replace("\\040", " "), parts[2]
                inside = real == mount or real.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best[0]):
                    best = (mount, kind, device)
    except OSError:
        pass
    return {"path": path, "mount": best[0], "type": best[1], "device": best[2]}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git() -> dict[str, Any]:
    import subprocess

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    # porcelain lines are "XY path": do not strip the leading space of the first one
    changed = [line[3:] for line in git("status", "--porcelain", "packages").splitlines()]
    return {
        "commit": git("rev-parse", "--short", "HEAD").strip(),
        "uncommitted_package_files": changed,
    }


def machine_info(ctx: Context) -> dict[str, Any]:
    try:
        import psutil

        memory = psutil.virtual_memory().total
        logical = psutil.cpu_count(logical=True)
        physical = psutil.cpu_count(logical=False)
    except ImportError:
        memory, logical, physical = None, os.cpu_count(), None
    cpu_model = None
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    dists = [
        "omniq-core",
        "omniq-file-queue",
        "omniq-file-results",
        "omniq-file-events",
        "omniq-backend-file",
        "fsspec",
        "anyio",
        "msgspec",
        "huey",
        "kombu",
        "persist-queue",
        "s3fs",
        "aiobotocore",
        "moto",
        "psutil",
        "matplotlib",
    ]
    return {
        "git": _git(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpu_logical": logical,
        "cpu_physical": physical,
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model,
        "memory_bytes": memory,
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "filesystems": {label: fs_type(base) for label, base in ctx.filesystems()},
        "versions": {d: v for d in dists if (v := _version(d)) is not None},
        "loadavg_start": list(os.getloadavg()),
    }


# --------------------------------------------------------------------------- writers
def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else round(value, 6)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_json(path: str, data: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(_jsonable(data), f, indent=1, sort_keys=False)
        f.write("\n")


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def plt():
    """matplotlib.pyplot on the Agg backend (imported only when charts are drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot
