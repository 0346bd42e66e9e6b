"""Deterministic interleaving explorer for storage programs (test infrastructure).

Several ``Actor`` programs (generators yielding ``omniq.core.fs.Op``) run against one fresh
``World`` per schedule. A schedule is a sequence of choices, each one of

* ``"A"``   -- actor A executes its next op, then resumes up to its following op (or return);
* ``"A!"``  -- actor A executes its next op and crashes: it never sees the result, and none of
  its code runs again (no ``finally``) until the schedule is over;
* ``"+30"`` -- the logical clock ``world.t`` moves 30 s forward.

Worlds are a memory filesystem, a local directory, or (``kind`` "s3", "gcs", "azure") a fresh
prefix of a remote store. Memory and local files are stamped with ``world.t`` as mtime; a
remote store stamps its own (real) time, so a remote world's ``t`` starts at ``time.time()``
and remote scenarios must not move the clock between writes (crash choices only): a file
written after a move would look older than it is.

``check(world, state)`` runs after every choice and ``final(world, state)`` once every actor
has finished, raised or crashed; each returns violation strings (or raises AssertionError).
``explore`` enumerates schedules depth-first when the space is small, else samples seeded
random schedules; any violating schedule can be replayed alone (``OMNIQ_EXPLORE_REPLAY``).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import random
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple, TypeVar

from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from omniq.core._fsspec_ops import FsspecOps
from omniq.core._local_ops import LocalOps
from omniq.core._ops_protocol import Ops
from omniq.core.fs import Op, Program, Store, _as_storage_error, _drive

START_TIME = 1_800_000_000.0
CONTROL = "control "  # scenario names of runs that must find violations
DEFAULT_SEED = 20_240_611  # fixed so CI explores the same schedules every run
DEFAULT_SAMPLES = 10_000
DEFAULT_MAX_SCHEDULES = 2_000
_NAME = re.compile(r"[A-Za-z_][\w.-]*\Z")
R = TypeVar("R")
REMOTE_KINDS = ("s3", "gcs", "azure")


class _Stamped:
    """Files written get the mtime ``world.t`` instead of the wall clock (as a store's own
    clock would stamp them), so listings' mtimes compare with the logical ``now``."""

    clock: Callable[[], float]

    def stamp(self, key: str) -> None:
        raise NotImplementedError

    def write(self, key: str, data: bytes) -> None:
        super().write(key, data)  # type: ignore[misc]
        self.stamp(key)

    def mark(self, key: str, data: bytes) -> None:
        super().mark(key, data)  # type: ignore[misc]
        self.stamp(key)

    def create(self, key: str, data: bytes) -> bool:  # create_many calls it too
        created: bool = super().create(key, data)  # type: ignore[misc]
        if created:
            self.stamp(key)
        return created


class _LocalStamped(_Stamped, LocalOps):
    def stamp(self, key: str) -> None:
        os.utime(self._path(key), (self.clock(), self.clock()))


class _MemoryStamped(_Stamped, FsspecOps):
    def stamp(self, key: str) -> None:
        file = self.fs.fs.store[self.fs._join(key)]
        file.created = file.modified = datetime.datetime.fromtimestamp(
            self.clock(), datetime.timezone.utc
        )


def _memory_dirfs() -> DirFileSystem:
    fs = MemoryFileSystem(skip_instance_cache=True)
    # A private store: the class-level dict is shared with every other test.
    fs.store, fs.pseudo_dirs = {}, [""]
    return DirFileSystem(path="/explore", fs=fs)


_POOL: list[DirFileSystem] = []
_SESSIONS: dict[tuple[str, str], Any] = {}


def _remote_ops(store: Store, storage_options: dict[str, Any] | None) -> FsspecOps:
    """``store``'s sync ops, over one filesystem (one SDK session) per store and options:
    opening a session costs several schedules' requests, so worlds share it."""
    key = (store.protocol, repr(sorted((storage_options or {}).items())))
    if key not in _SESSIONS:
        _SESSIONS[key] = store._sync_ops.fs.fs  # type: ignore[attr-defined]
    return FsspecOps(DirFileSystem(path=store.root, fs=_SESSIONS[key]))


class World:
    """One schedule's fresh storage (``ops``, ``store``), logical clock ``t`` and the objects
    under test (``obj``, built by ``explore(make=...)``). A remote world (``kind`` in
    ``REMOTE_KINDS``) is a new prefix under the URL ``base_dir``, opened with
    ``storage_options``; its ``t`` starts at the wall clock (see the module docstring)."""

    def __init__(
        self,
        kind: str = "memory",
        base_dir: str | os.PathLike[str] | None = None,
        storage_options: dict[str, Any] | None = None,
    ):
        self.kind = kind
        self.t = START_TIME
        self.obj: Any = None
        self._dir: str | None = None
        self._dirfs: DirFileSystem | None = None
        self._remote: FsspecOps | None = None
        ops: Ops
        if kind == "memory":
            # Building a DirFileSystem costs more than a short schedule: worlds reuse them.
            self._dirfs = _POOL.pop() if _POOL else _memory_dirfs()
            self.store = Store("memory:///explore", clock=self.clock)
            ops = _MemoryStamped(self._dirfs)
        elif kind == "local":
            self._dir = tempfile.mkdtemp(prefix="world-", dir=base_dir)
            self.store = Store(self._dir, clock=self.clock)
            ops = _LocalStamped(self._dir)
        elif kind in REMOTE_KINDS and base_dir is not None:
            self.t = time.time()  # the store's own mtimes are real: compare like with like
            url = f"{os.fspath(base_dir).rstrip('/')}/w-{uuid.uuid4().hex}"
            self.store = Store(url, storage_options, clock=self.clock)
            ops = self._remote = _remote_ops(self.store, storage_options)
        else:
            raise ValueError(
                f"kind must be 'memory', 'local' or one of {REMOTE_KINDS} (with a base_dir "
                f"URL), not {kind!r}"
            )
        if isinstance(ops, _Stamped):
            ops.clock = self.clock
        self.start = self.t
        self.ops: Ops = ops
        self.store._sync = ops

    def clock(self) -> float:
        """``t`` (the clock of ``store`` and of unskewed actors)."""
        return self.t

    def run(self, program: Program[R], skew: float = 0.0) -> R:
        """Drive ``program`` to completion like ``Store.run``, with the clock ``t + skew``."""
        return _drive(program, self.ops, lambda: self.t + skew)

    def close(self) -> None:
        if self._remote is not None:
            try:  # best effort: the emulators die with the session anyway
                self._remote.fs.fs.rm(self.store.root, recursive=True)
            except Exception:
                pass
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
        if self._dirfs is not None:
            self._dirfs.fs.store.clear()
            self._dirfs.fs.pseudo_dirs[:] = [""]
            _POOL.append(self._dirfs)
            self._dirfs = None


@dataclasses.dataclass(frozen=True)
class Actor:
    """``program(world)`` returns the generator; its ``now`` op answers ``world.t + skew``."""

    name: str
    program: Callable[[World], Program[Any]]
    skew: float = 0.0
    crashable: bool = False


@dataclasses.dataclass(frozen=True)
class Advance:
    """A schedule choice moving ``world.t`` forward by ``seconds`` (plain floats work too)."""

    seconds: float


@dataclasses.dataclass
class ActorState:
    name: str
    status: str = "running"  # running | finished | raised | crashed
    value: Any = None  # the return value once finished
    error: BaseException | None = None  # the exception once raised
    steps: int = 0

    def __str__(self) -> str:
        if self.status == "finished":
            return f"finished({_short(self.value, 40)})"
        if self.status == "raised":
            return f"raised({type(self.error).__name__}: {_short(str(self.error), 40)})"
        return self.status


@dataclasses.dataclass(frozen=True)
class Event:
    """One choice of a schedule: ``actor`` is "" for a time advance, ``op`` None if none ran;
    ``start`` is the world's initial ``t``."""

    n: int
    t: float
    actor: str
    op: Op | None
    detail: str
    start: float = START_TIME

    def __str__(self) -> str:
        return (
            f"{self.n:5d}  t+{self.t - self.start:<7g} {self.actor or '(clock)':<12} {self.detail}"
        )


@dataclasses.dataclass
class State:
    """What invariants see: each actor's state (``state["A"].status``) and the trace so far."""

    actors: dict[str, ActorState]
    trace: list[Event]

    def __getitem__(self, name: str) -> ActorState:
        return self.actors[name]

    @property
    def done(self) -> bool:
        return all(a.status != "running" for a in self.actors.values())

    def with_status(self, *statuses: str) -> list[ActorState]:
        return [a for a in self.actors.values() if a.status in statuses]


Check = Callable[[World, State], "Iterable[str] | None"]


@dataclasses.dataclass
class Violation:
    scenario: str
    kind: str
    mode: str
    schedule: int  # 1-based index within the exploration
    messages: list[str]
    path: tuple[str, ...]
    seed: int | None  # the schedule's own seed (random mode), else None: replay by path
    trace: list[Event]
    statuses: dict[str, str]
    master_seed: int

    @property
    def token(self) -> str:
        return str(self.seed) if self.seed is not None else ",".join(self.path) or "-"

    def replay_hint(self) -> str:
        env = f"OMNIQ_EXPLORE_REPLAY='{self.scenario}/{self.kind}@{self.token}'"
        test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]
        return f"{env} hatch test '{test}'" if test else env

    def format(self) -> str:
        start = self.trace[0].start if self.trace else START_TIME
        lines = [
            f"{self.scenario!r} on {self.kind} ({self.mode}): violation in schedule "
            f"{self.schedule} (master seed {self.master_seed})",
            *(f"  ! {m}" for m in self.messages),
            "  actors: " + ", ".join(f"{k}={v}" for k, v in self.statuses.items()),
            f"  path: {','.join(self.path) or '-'}",
            f"  trace (t+ is seconds after {start:.0f}):",
            *(f"  {e}" for e in self.trace),
            f"  replay: {self.replay_hint()}",
        ]
        return "\n".join(lines)


@dataclasses.dataclass
class Report:
    """One ``explore`` call; also kept in ``RESULTS`` for the terminal summary."""

    scenario: str
    kind: str
    mode: str  # exhaustive | exhaustive-partial | random | replay
    schedules: int = 0
    steps: int = 0
    seconds: float = 0.0
    master_seed: int = DEFAULT_SEED
    violations: list[Violation] = dataclasses.field(default_factory=list)
    complete: bool = False  # every schedule of the bounded space was explored

    def assert_clean(self, limit: int = 3) -> None:
        if self.violations:
            shown = "\n\n".join(v.format() for v in self.violations[:limit])
            raise AssertionError(
                f"{len(self.violations)} violating schedule(s) among {self.schedules} "
                f"explored:\n\n{shown}"
            )


RESULTS: list[Report] = []

#: Summary rows (``export()``'s dicts) of other processes: pytest-xdist's controller merges
#: its workers' rows here (tests/conftest.py), as its own ``RESULTS`` stay empty.
MERGED: list[dict[str, Any]] = []


class _Choice(NamedTuple):
    label: str
    actor: int  # index into the actors, -1 for a time advance
    crash: bool = False
    seconds: float = 0.0


Chooser = Callable[[list[_Choice]], int]


class _Outcome(NamedTuple):
    levels: list[tuple[list[_Choice], int]]  # the options at each choice and the one taken
    steps: int
    messages: list[str]
    trace: list[Event]
    statuses: dict[str, str]


def _short(value: Any, width: int = 60) -> str:
    text = getattr(value, "__name__", None) if callable(value) else None
    text = text or repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _op_text(op: Op) -> str:
    return f"{op.name}({', '.join(_short(a, 40) for a in op.args)})"


def _verdict(fn: Check | None, where: str, world: World, state: State) -> list[str]:
    if fn is None:
        return []
    try:
        found = fn(world, state)
    except AssertionError as exc:
        return [f"{where}: {exc or 'AssertionError'}"]
    return [f"{where}: {m}" for m in found or ()]


@dataclasses.dataclass
class _Runner:
    """Runs one schedule at a time; ``choose`` picks among the options at each point."""

    actors: Sequence[Actor]
    kind: str
    base_dir: str | os.PathLike[str] | None
    storage_options: dict[str, Any] | None
    make: Callable[[World], Any] | None
    setup: Callable[[World], None] | None
    check: Check | None
    final: Check | None
    advances: tuple[float, ...]
    max_advances: int
    max_crashes: int
    max_steps: int

    def options(self, state: State, crashes: int, advances: int) -> list[_Choice]:
        live = [i for i, a in enumerate(self.actors) if state[a.name].status == "running"]
        if not live:
            return []
        out = [_Choice(self.actors[i].name, i) for i in live]
        if crashes < self.max_crashes:
            out += [
                _Choice(f"{self.actors[i].name}!", i, True)
                for i in live
                if self.actors[i].crashable
            ]
        if advances < self.max_advances:
            out += [_Choice(f"+{s:g}", -1, seconds=s) for s in self.advances]
        return out

    def run(self, choose: Chooser) -> _Outcome:
        world = World(self.kind, self.base_dir, self.storage_options)
        gens: list[Program[Any]] = []
        levels: list[tuple[list[_Choice], int]] = []
        try:
            if self.make is not None:
                world.obj = self.make(world)
            if self.setup is not None:
                self.setup(world)
            gens = [a.program(world) for a in self.actors]
            pending: list[Op | None] = [None] * len(gens)
            state = State({a.name: ActorState(a.name) for a in self.actors}, [])
            crashes = advances = steps = 0
            messages: list[str] = []
            while options := self.options(state, crashes, advances):
                if len(levels) >= self.max_steps:
                    messages = [f"no end after {self.max_steps} choices (livelock?)"]
                    break
                index = choose(options)
                choice = options[index]
                levels.append((options, index))
                n = len(levels)
                if choice.actor < 0:
                    world.t += choice.seconds
                    advances += 1
                    detail = f"advance {choice.label}s"
                    state.trace.append(Event(n, world.t, "", None, detail, world.start))
                else:
                    steps += 1
                    crashes += choice.crash
                    self._step(world, state, gens, pending, choice, n)
                messages = _verdict(self.check, f"after choice {n}", world, state)
                if messages:
                    break
            if not messages:
                messages = _verdict(self.final, "final", world, state)
            statuses = {name: str(a) for name, a in state.actors.items()}
            return _Outcome(levels, steps, messages, state.trace, statuses)
        except Exception as exc:  # a bug of the test (setup, check, ...), not a violation
            if hasattr(exc, "add_note"):
                exc.add_note(f"explorer: after path {','.join(o[i].label for o, i in levels)}")
            raise
        finally:
            # Crashed and unfinished programs are closed only now, so their cleanup code
            # never ran during the schedule; what it does now cannot reach the storage.
            for gen in gens:
                try:
                    gen.close()
                except Exception:
                    pass
            world.close()

    def _step(
        self,
        world: World,
        state: State,
        gens: list[Program[Any]],
        pending: list[Op | None],
        choice: _Choice,
        n: int,
    ) -> None:
        actor = self.actors[choice.actor]
        gen, me, t = gens[choice.actor], state[actor.name], world.t
        me.steps += 1
        op = pending[choice.actor]
        detail = ""
        try:
            if op is None:  # first step: run the program up to its first op
                op = next(gen)
            error: Exception | None = None
            result: Any = None
            try:
                result = (
                    world.t + actor.skew
                    if op.name == "now"
                    else getattr(world.ops, op.name)(*op.args)
                )
                detail = f"{_op_text(op)} -> {_short(result)}"
            except Exception as exc:
                error = _as_storage_error(op, exc)
                detail = f"{_op_text(op)} -> {type(error).__name__}: {_short(str(error))}"
            if choice.crash:
                # Dropped in its suspended state: it never sees the result.
                me.status = "crashed"
                detail += "  [crashed]"
            elif error is not None:
                pending[choice.actor] = gen.throw(error)
            else:
                pending[choice.actor] = gen.send(result)
        except StopIteration as stop:
            me.status, me.value = "finished", stop.value
            detail += f"; returned {_short(stop.value)}"
        except Exception as exc:  # the actor's outcome, judged by the invariants
            me.status, me.error = "raised", exc
            detail += f"; raised {type(exc).__name__}: {_short(str(exc))}"
        state.trace.append(Event(n, t, actor.name, op, detail.lstrip("; "), world.start))


def _forced(path: Sequence[str]) -> Chooser:
    """Follow ``path`` (choice labels), then take the first option at every new point."""
    level = 0

    def choose(options: list[_Choice]) -> int:
        nonlocal level
        level += 1
        if level > len(path):
            return 0
        labels = [c.label for c in options]
        if path[level - 1] not in labels:
            raise RuntimeError(
                f"choice {level} {path[level - 1]!r} is not among {labels}: the scenario is not "
                f"deterministic (or the replay path is from another scenario)"
            )
        return labels.index(path[level - 1])

    return choose


def _random(seed: int, crash_prob: float, advance_prob: float) -> Chooser:
    rng = random.Random(seed)

    def choose(options: list[_Choice]) -> int:
        clock = [i for i, c in enumerate(options) if c.actor < 0]
        if clock and rng.random() < advance_prob:
            return rng.choice(clock)
        index = rng.choice([i for i, c in enumerate(options) if c.actor >= 0 and not c.crash])
        crash = [i for i, c in enumerate(options) if c.crash and c.actor == options[index].actor]
        return crash[0] if crash and rng.random() < crash_prob else index

    return choose


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    return int(value) if value else None


def explore(
    name: str,
    actors: Sequence[Actor],
    *,
    kind: str = "memory",
    base_dir: str | os.PathLike[str] | None = None,
    storage_options: dict[str, Any] | None = None,
    make: Callable[[World], Any] | None = None,
    setup: Callable[[World], None] | None = None,
    check: Check | None = None,
    final: Check | None = None,
    advances: Sequence[float | Advance] = (),
    max_advances: int = 1,
    max_crashes: int = 1,
    mode: str = "auto",
    max_schedules: int = DEFAULT_MAX_SCHEDULES,
    samples: int = DEFAULT_SAMPLES,
    seed: int | None = None,
    max_steps: int = 1_000,
    max_violations: int = 1,
    crash_prob: float = 0.1,
    advance_prob: float = 0.1,
    replay: int | str | Sequence[str] | None = None,
) -> Report:
    """Explore schedules of ``actors`` and return (and register) a ``Report``.

    ``mode``: "exhaustive" (depth-first, stops at ``max_schedules``), "random" (``samples``
    seeded schedules) or "auto" (exhaustive if the space fits in ``max_schedules``, else
    random as well). Per schedule at most ``max_crashes`` crashes of ``crashable`` actors and
    ``max_advances`` clock moves taken from ``advances``. Exploration stops after
    ``max_violations`` violating schedules. ``replay`` (a schedule seed or a path of choice
    labels) runs that one schedule; so does ``OMNIQ_EXPLORE_REPLAY=name/kind@token``.
    ``kind``, ``base_dir`` and ``storage_options`` are ``World``'s (each schedule's world).
    """
    names = [a.name for a in actors]
    if len(set(names)) != len(names) or not all(_NAME.match(n) for n in names):
        raise ValueError(f"actor names must be unique identifiers, not {names}")
    if mode not in ("auto", "exhaustive", "random"):
        raise ValueError(f"mode must be auto, exhaustive or random, not {mode!r}")
    runner = _Runner(
        actors, kind, base_dir, storage_options, make, setup, check, final,
        tuple(a.seconds if isinstance(a, Advance) else float(a) for a in advances),
        max_advances, max_crashes, max_steps,
    )  # fmt: skip
    master = seed if seed is not None else (_env_int("OMNIQ_EXPLORE_SEED") or DEFAULT_SEED)
    if (more := _env_int("OMNIQ_EXPLORE_SAMPLES")) is not None:
        samples, max_schedules = more, max(max_schedules, more)
    wanted = os.environ.get("OMNIQ_EXPLORE_REPLAY", "").strip()
    if replay is None and wanted:
        key, _, token = wanted.rpartition("@")
        if key in ("", f"{name}/{kind}"):
            replay = token
    report = Report(name, kind, "replay" if replay is not None else mode, master_seed=master)
    started = time.perf_counter()

    def one(choose: Chooser, schedule_seed: int | None) -> _Outcome:
        outcome = runner.run(choose)
        report.schedules += 1
        report.steps += outcome.steps
        if outcome.messages:
            path = tuple(opts[i].label for opts, i in outcome.levels)
            report.violations.append(
                Violation(name, kind, report.mode, report.schedules, outcome.messages, path,
                          schedule_seed, outcome.trace, outcome.statuses, master)
            )  # fmt: skip
        return outcome

    try:
        if replay is not None:
            if isinstance(replay, int) or (isinstance(replay, str) and replay.isdigit()):
                outcome = one(_random(int(replay), crash_prob, advance_prob), int(replay))
            else:
                labels = replay.split(",") if isinstance(replay, str) else list(replay)
                outcome = one(_forced([x for x in labels if x not in ("", "-")]), None)
            print(report.violations[0].format() if report.violations else "replayed: clean")
            if not report.violations:
                print("\n".join(f"  {e}" for e in outcome.trace))
            return report
        if mode in ("auto", "exhaustive"):
            report.mode = "exhaustive"
            path: list[str] | None = []
            while path is not None and report.schedules < max_schedules:
                if len(report.violations) >= max_violations:
                    return report
                path = _next_path(one(_forced(path), None).levels)
            report.complete = path is None
            if report.complete or mode == "exhaustive":
                report.mode = "exhaustive" if report.complete else "exhaustive-partial"
                return report
        report.mode = "random"
        seeds = random.Random(f"{master}/{name}/{kind}")
        for _ in range(samples):
            if len(report.violations) >= max_violations:
                break
            schedule_seed = seeds.getrandbits(48)
            one(_random(schedule_seed, crash_prob, advance_prob), schedule_seed)
        return report
    finally:
        report.seconds = time.perf_counter() - started
        RESULTS.append(report)


def explore_control(
    name: str, actors: Sequence[Actor], *, max_crashes: int = 0, **options: Any
) -> Report:
    """Explore every schedule of a known-broken program (``name`` starts with "control"), with
    no clock moves, and require the invariants to catch it; the report, for what caught it."""
    report = explore(
        name, actors, mode="exhaustive", max_crashes=max_crashes, max_advances=0, **options
    )
    assert report.violations, f"the explorer missed a known-broken program: {name}"
    return report


def _next_path(levels: list[tuple[list[_Choice], int]]) -> list[str] | None:
    """Depth-first successor of a schedule: its choices up to the deepest point with an
    untried option, then that option; None once every schedule was run."""
    depth = len(levels) - 1
    while depth >= 0 and levels[depth][1] + 1 >= len(levels[depth][0]):
        depth -= 1
    if depth < 0:
        return None
    path = [opts[i].label for opts, i in levels[:depth]]
    path.append(levels[depth][0][levels[depth][1] + 1].label)
    return path


def replay(
    token: int | str | Sequence[str], name: str, actors: Sequence[Actor], **kwargs: Any
) -> Report:
    """Run one schedule (a seed from a random exploration, or a path) with ``explore``'s
    arguments; prints its trace."""
    return explore(name, actors, replay=token, **kwargs)


def export() -> list[dict[str, Any]]:
    """What ``summary_lines`` needs of every ``explore`` call of this process (and of those
    merged into it), as JSON-able dicts: a pytest-xdist worker hands them to the controller."""
    own = [
        {
            "scenario": r.scenario,
            "kind": r.kind,
            "mode": r.mode,
            "schedules": r.schedules,
            "steps": r.steps,
            "seconds": r.seconds,
            "master_seed": r.master_seed,
            "violations": len(r.violations),
            "complete": r.complete,
        }
        for r in RESULTS
    ]
    return own + [dict(r) for r in MERGED]


def merge(rows: Iterable[dict[str, Any]]) -> None:
    """Add another process's ``export()`` to the summary."""
    MERGED.extend(dict(r) for r in rows)


def summary_lines() -> list[str]:
    """The "interleavings explored" table: one line per scenario, store and mode, and totals
    (over this process's ``explore`` calls and the merged ones)."""
    results = export()
    if not results:
        return []
    rows: dict[tuple[str, str, str], list[float]] = {}
    for r in results:
        row = rows.setdefault((r["scenario"], r["kind"], r["mode"]), [0, 0, 0, 0.0])
        for i, key in enumerate(("schedules", "steps", "violations", "seconds")):
            row[i] += r[key]
    head = f"{'scenario':<36} {'store':<7} {'mode':<19} {'schedules':>10} {'steps':>11} {'violations':>10} {'seconds':>8}"
    lines = [head]
    # Scenarios named "control ..." must find violations (they prove the explorer and the
    # invariants can fail): listed apart, not in the total.
    for controls in (False, True):
        chosen = {k: r for k, r in rows.items() if k[0].startswith(CONTROL) == controls}
        if controls and chosen:
            lines.append("controls (violations expected: a known-broken program must be caught)")
        for (scenario, kind, mode), (s, st, v, sec) in sorted(chosen.items()):
            lines.append(
                f"{scenario:<36} {kind:<7} {mode:<19} {s:>10.0f} {st:>11.0f} {v:>10.0f} {sec:>8.2f}"
            )
        if not controls:
            total = [sum(row[i] for row in chosen.values()) for i in range(4)]
            lines.append(
                f"{'total':<64} {total[0]:>10.0f} {total[1]:>11.0f} {total[2]:>10.0f} "
                f"{total[3]:>8.2f}"
            )
    seeds = sorted({r["master_seed"] for r in results})
    lines.append(
        f"master seed {', '.join(map(str, seeds))} (OMNIQ_EXPLORE_SEED); more samples: "
        f"OMNIQ_EXPLORE_SAMPLES=N; one schedule: OMNIQ_EXPLORE_REPLAY=scenario/store@token"
    )
    return lines
