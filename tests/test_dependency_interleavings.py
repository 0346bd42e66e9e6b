"""Dependencies under every interleaving: a dependency's end (ack or dead letter, then the
deferred look at its dependents) against a dependent's enqueue, two dependencies ending at
once, and a process that crashes between its outcome and the look against the reaper. The
explorer (tests/explorer.py) steps the storage programs op by op, with crashes and clock moves.

Invariants, after every step: no waiting task is released before every dependency it waits
for has succeeded (``on_dependency_failure="cancel"``), no document is half-written, no
attempt is claimed twice. Finally (liveness), every process's memory is dropped (nothing owed
is settled by it) and a worker runs with time moved on (reap, claim, ack, settle): every
dependent ends -- done once each dependency succeeded, cancelled if one failed -- released
exactly once and never stranded.

A failing schedule prints its ``OMNIQ_EXPLORE_REPLAY`` value.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from explorer import Actor, State, World, explore, explore_control
from omniq.core import codec
from omniq.core.fs import Program
from omniq.core.models import Claimed, Task, TaskStatus
from omniq.storage.file.queue import _layout as layout
from omniq.storage.file.queue._dependencies import Link
from test_interleavings import (
    ADVANCES,
    LEASE,
    SKEW,
    TTL,
    Q,
    Scene,
    claimer,
    note_written,
    readable,
)
from test_interleavings import world_dir as world_dir  # the fixture

DEP = "dep"


class DepScene(Scene):
    """The queue, its dependencies (claimed in set-up) and the dependent ``T``."""

    def __init__(self, world: World) -> None:
        super().__init__(world)
        self.held: dict[str, Claimed] = {}
        self.dependent = Task(func="m:f", id="T")
        self.seen: dict[str, set[str]] = {}  # dependency -> the outcomes seen written
        self.requeued = False  # a dead dependency may be requeued: T may end either way

    def dependency(self, name: str) -> None:
        self.enqueue(Task(func="m:f", id=name))
        got = self.world.run(claimer(self))
        self.held[name] = next(c for c in got if c.id == name)

    def wait_on(self, *deps: str) -> Task:
        return msgspec.structs.replace(self.dependent, depends_on=list(deps))


def _flush(scene: Scene) -> Program[None]:
    owed, scene.q._owed = scene.q._owed, {}
    yield from scene.q._owed_program(owed)


def ends(name: str, dead: bool = False) -> Callable[[Scene], Program[Any]]:
    """A dependency's holder: its outcome (done, or dead), then the look at its dependents."""

    def program(scene: Scene) -> Program[Any]:
        assert isinstance(scene, DepScene)
        claimed = scene.held[name]
        if dead:
            yield from scene.q._nack_program(claimed, "boom", None, False)
        else:
            yield from scene.q._ack_program(claimed)
        yield from _flush(scene)

    return program


def producer(*deps: str) -> Callable[[Scene], Program[Any]]:
    def program(scene: Scene) -> Program[Any]:
        assert isinstance(scene, DepScene)
        task = scene.wait_on(*deps)
        yield from scene.q._wait_program(task)
        scene.tasks.append(task.id)

    return program


def reaper(scene: Scene) -> Program[Any]:
    return (yield from scene.q._reap_program(Q))


def actor(name: str, fn: Callable[[Scene], Program[Any]]) -> Actor:
    return Actor(name, lambda world: fn(world.obj), crashable=True)


def outcome_state(world: World, task_id: str, attempt: int) -> str | None:
    data = world.ops.read(layout.outcome_key(Q, task_id, attempt))
    rec = None if data is None else layout.parse_outcome(data)
    return None if rec is None else rec.state


def check(world: World, state: State) -> list[str]:
    scene: DepScene = world.obj
    problems = []
    event = state.trace[-1] if state.trace else None
    if event is not None and event.op is not None and event.op.name in ("write", "create"):
        key = event.op.args[0]
        data = world.ops.read(key)
        if data is not None:
            if "/deps/" in key:
                ok = msgspec.json.decode(data, type=Link) is not None
            elif "/met/" in key:
                ok = data.decode() in ("done", "dead", "cancelled", "expired", "gone")
            else:
                ok = readable(key, data)
            if not ok:
                problems.append(f"{key} does not decode: {data[:40]!r}")
            note_written(scene, key, data)
    for dep in scene.held:
        for attempt in (1, 2, 3):
            if (got := outcome_state(world, dep, attempt)) is not None:
                scene.seen.setdefault(dep, set()).add(got)
    released = outcome_state(world, "T", 0) == layout.State.RELEASED or any(
        world.ops.exists(k) for k in (layout.run_key(Q, "T", 1), layout.ready_key(Q, 0, "T", 1))
    )
    if released:
        for dep in scene.held:
            if layout.State.DONE not in scene.seen.get(dep, set()):
                problems.append(f"T released before its dependency {dep} succeeded")
    problems += [f"attempt {a} claimed {n} times" for a, n in scene.claims.items() if n > 1]
    return problems


def final(world: World, state: State) -> list[str]:
    """Every process that acted is gone (what it owed in memory is lost): a worker alone, with
    time moving on, must finish each dependent."""
    scene: DepScene = world.obj
    q = scene.q
    q._owed = {}
    for _ in range(4):
        world.t += TTL + LEASE + SKEW + 5
        busy = len(world.run(q._reap_program(Q)))
        while got := world.run(claimer(scene)):
            busy += 1
            for claimed in got:
                world.run(q._ack_program(claimed))
                scene.ended[claimed.id] = "done"
        if q._owed:
            world.run(_flush(scene))
            busy += 1
        if not busy:
            break
    problems = [f"attempt {a} claimed {n} times" for a, n in scene.claims.items() if n > 1]
    if "T" not in scene.tasks:
        return problems  # its enqueue crashed before it returned: it need not exist
    found = world.run(q._locate_program(Q, "T"))
    status = None if found is None else found[0].status
    failed = any(layout.State.DEAD in s for s in scene.seen.values())
    expected = TaskStatus.CANCELLED if failed else TaskStatus.DONE
    if scene.requeued and failed:  # cancelled if settled before the requeue, else done
        failed = status is not TaskStatus.DONE and scene.ended.get("T") != "done"
        expected = TaskStatus.CANCELLED if failed else TaskStatus.DONE
    if scene.ended.get("T") == expected.value:
        return problems  # ended so (and its records may be cleaned up since)
    if status is not expected:
        problems.append(f"T ended {status} (expected {expected.value}): stranded or wrong")
    if scene.claims[("T", 1)] and failed:
        problems.append("T ran although a dependency failed")
    return problems


def setup(
    *deps: str, waiting: bool = False, on: tuple[str, ...] = (), requeued: bool = False
) -> Callable[[World], None]:
    def run(world: World) -> None:
        scene: DepScene = world.obj
        scene.requeued = requeued
        for dep in deps:
            scene.dependency(dep)
        if waiting:
            world.run(scene.q._wait_program(scene.wait_on(*(on or deps))))
            scene.tasks.append("T")
        scene.q._owed = {}

    return run


def requeuer(scene: Scene) -> Program[Any]:
    return (yield from scene.q._requeue_dead_program(Q, "A"))


SCENARIOS: dict[str, dict[str, Any]] = {
    # T waits on A only; enqueued again with C, which succeeds: T must keep waiting for A.
    "re-enqueue x ack": dict(
        actors=[actor("holder", ends("C")), actor("producer", producer("C"))],
        setup=setup("A", "C", waiting=True, on=("A",)),
    ),
    # A dead-lettered, then requeued (before, during or after its dependents' settle).
    "requeue_dead x settle": dict(
        actors=[actor("holder", ends("A", dead=True)), actor("requeuer", requeuer)],
        setup=setup("A", waiting=True, requeued=True),
    ),
    "dependency ack x dependent enqueue": dict(
        actors=[actor("holder", ends("A")), actor("producer", producer("A"))],
        setup=setup("A"),
    ),
    "dependency dead x dependent enqueue": dict(
        actors=[actor("holder", ends("A", dead=True)), actor("producer", producer("A"))],
        setup=setup("A"),
    ),
    "two dependencies acking x one dependent": dict(
        actors=[actor("h1", ends("A")), actor("h2", ends("B"))],
        setup=setup("A", "B", waiting=True),
    ),
    "two acks x dependent enqueue": dict(
        actors=[
            actor("h1", ends("A")),
            actor("h2", ends("B")),
            actor("producer", producer("A", "B")),
        ],
        setup=setup("A", "B"),
    ),
    "ack crashing before release x reaper": dict(
        actors=[actor("holder", ends("A")), actor("reaper", reaper)],
        setup=setup("A", waiting=True),
    ),
}


@pytest.mark.parametrize("kind", ["memory", "local"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_dependency_interleavings(scenario: str, kind: str, world_dir: Path) -> None:
    spec = SCENARIOS[scenario]
    report = explore(
        scenario,
        spec["actors"],
        kind=kind,
        base_dir=world_dir,
        make=DepScene,
        setup=spec["setup"],
        check=check,
        final=final,
        advances=ADVANCES,
        max_crashes=1,
        max_advances=1,
        samples=600 if kind == "memory" else 400,  # more: OMNIQ_EXPLORE_SAMPLES=N
    )
    report.assert_clean()
    assert report.schedules > 0


def test_the_invariants_catch_a_release_that_does_not_wait(world_dir: Path) -> None:
    """Control: an enqueue that skips the registration (writes the document and releases at
    once) is caught releasing before its dependency succeeded."""

    def eager(scene: Scene) -> Program[Any]:
        assert isinstance(scene, DepScene)
        task = scene.wait_on("A")
        yield from scene.q._enqueue_program([(task, codec.encode(task))])
        scene.tasks.append(task.id)

    explore_control(
        "control release without waiting",
        [actor("holder", ends("A")), actor("producer", eager)],
        make=DepScene,
        setup=setup("A"),
        check=check,
        final=final,
    )
