"""Bells under every interleaving (docs/queue.md "Bells", ``_bells``): producers' enqueue
programs (which ring) and an idle consumer's polls (read the bell, list unless ``quiet``,
claim), stepped op by op by the explorer with clock moves shorter than the ring throttle.

Invariant (liveness without the fallback): once the producers are done, a consumer that goes
on polling for ``THROTTLE`` and one poll more has claimed every task, a delayed one once it is
due. The once-a-minute fallback listing is switched off here, so a skipped listing that
missed a task leaves it unclaimed. A control with the throttle margin left out of ``quiet``
must be caught. ``OMNIQ_EXPLORE_SAMPLES=N`` explores more; a failure prints its replay value.
"""

from __future__ import annotations

import math
import time
import types
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest

from explorer import Actor, Advance, State, World, explore
from omniq.core import codec
from omniq.core.fs import Program, now
from omniq.core.models import UTC, Claimed, Task
from omniq.storage.file.queue import AsyncFileQueue, _bells
from omniq.storage.file.queue._queue import claim_strategy

Q = "default"
POLLS = 3  # the consumer actor's polls; the final check polls on
ADVANCES = [Advance(0.4), Advance(0.7)]  # shorter than THROTTLE: rings are skipped
SKIPPED = [0]  # polls that skipped their listing (the exploration is not vacuous)
SAMPLES = {"memory": 3_000, "local": 1_000}  # per run; OMNIQ_EXPLORE_SAMPLES=N explores more


class Scene:
    """Two producers and one consumer (each its own queue object, so its own bells) on one
    world; the bells' monotonic clock is the world's logical one."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.producers = [self._queue(world) for _ in range(2)]
        self.consumer = self._queue(world)
        assert self.consumer.bells is not None
        self.consumer.bells.fallback = math.inf  # a missed task is not found by the fallback
        self.tasks: list[str] = []
        self.claimed: set[str] = set()

    @staticmethod
    def _queue(world: World) -> AsyncFileQueue:
        q = AsyncFileQueue("memory://unused", bells=True, lease=60.0, clock_skew=0.0)
        q.store = world.store
        q.claims = claim_strategy(world.kind)(world.store, q.batch)
        return q


def enqueue(producer: int, delays: tuple[float | None, ...]) -> Callable[[World], Program[Any]]:
    """A producer's enqueues, one program each (``None``: ready now, else delayed by that)."""

    def program(world: World) -> Program[Any]:
        scene: Scene = world.obj
        q = scene.producers[producer]
        for delay in delays:
            current = yield now()
            eta = None if delay is None else datetime.fromtimestamp(current + delay, UTC)
            task = Task(func="m:f", queue=Q, eta=eta)
            scene.tasks.append(task.id)
            yield from q._enqueue_program([(task, codec.encode(task))])

    return program


def poll(scene: Scene) -> Program[None]:
    """One look of an idle consumer: read the bell, and unless ``quiet`` list and claim all."""
    q, bells = scene.consumer, scene.consumer.bells
    assert bells is not None
    yield from bells.listen([Q])
    current = yield now()
    if bells.quiet(Q, current):
        SKIPPED[0] += 1
        return
    items = yield from q._scan_program(Q)  # (which tells the bells what it found)
    for cand in items:
        got = yield from q._claim_program(Q, cand, 60.0, "consumer")
        if isinstance(got, Claimed):
            scene.claimed.add(got.id)


def consumer(world: World) -> Program[None]:
    for _ in range(POLLS):
        yield from poll(world.obj)


def final(world: World, state: State) -> list[str]:
    scene: Scene = world.obj
    for _ in range(6):  # 2.4 s of polls: THROTTLE and more, and past every due time below
        world.t += 0.4
        world.run(poll(scene))
    missed = sorted(set(scene.tasks) - scene.claimed)
    return [f"tasks never claimed by the polling consumer: {missed}"] if missed else []


@pytest.fixture(autouse=True)
def logical_monotonic(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bells measure on ``time.monotonic``: here the world's clock (set per schedule)."""
    clock = types.SimpleNamespace(monotonic=lambda: _CLOCK[0](), time_ns=time.time_ns)
    monkeypatch.setattr(_bells, "time", clock)


_CLOCK: list[Callable[[], float]] = [time.monotonic]


def make(world: World) -> Scene:
    _CLOCK[0] = world.clock
    return Scene(world)


SCENARIOS = {
    "two enqueues x consumer": [Actor("producer", enqueue(0, (None, None))), Actor("c", consumer)],
    "two producers x consumer": [
        Actor("p1", enqueue(0, (None, None))),
        Actor("p2", enqueue(1, (None,))),
        Actor("c", consumer),
    ],
    "delayed and ready x consumer": [
        Actor("producer", enqueue(0, (1.0, None))),
        Actor("c", consumer),
    ],
}


# What every exploration here shares: the model, its clock's advances, no crashes.
MODEL: dict[str, Any] = {
    "make": make,
    "final": final,
    "advances": ADVANCES,
    "max_advances": 3,
    "max_crashes": 0,
    "mode": "random",
}


@pytest.mark.parametrize("kind", ["memory", "local"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_bell_interleavings(scenario: str, kind: str, tmp_path: Any) -> None:
    SKIPPED[0] = 0
    report = explore(
        f"bells: {scenario}",
        SCENARIOS[scenario],
        kind=kind,
        base_dir=tmp_path,
        **MODEL,
        samples=SAMPLES[kind],
    )
    report.assert_clean()
    assert report.schedules > 0
    assert SKIPPED[0] > 0  # some schedules had the consumer trust its bell


def test_the_invariant_catches_quiet_without_the_throttle_margin(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``quiet`` that trusts any empty listing after the bell was heard misses a task written
    within the throttle of a ring (not rung again) after that listing."""

    def careless(self: _bells.Bells, queue: str, current: float) -> bool:
        known, empty = self._heard.get(queue), self._empty.get(queue)
        return known is not None and empty is not None and empty >= known[1]

    monkeypatch.setattr(_bells.Bells, "quiet", careless)
    report = explore(
        "control bells: quiet without the throttle margin",
        SCENARIOS["two enqueues x consumer"],
        **MODEL,
        samples=3_000,
    )
    assert report.violations, "the explorer missed the unrung task"
    assert any("never claimed" in m for v in report.violations for m in v.messages)
