"""The attempt protocol under every interleaving: pairs of actors (the queue's own storage
programs) stepped op by op by the explorer (tests/explorer.py), with crashes and clock moves.

Invariants, after every step:

* one holder per attempt: no two actors ever hold a claim of the same attempt, and a holder
  whose lease it still believes in never coexists with a later attempt of its task;
* a fenced holder changes nothing: a heartbeat or finish that was refused wrote no record;
* no partial document: every file under the queue decodes.

Finally (liveness), a worker runs with time moved on (reap, repair, claim, ack): every task
ends done, dead, cancelled or expired, none is stuck, and no attempt ran twice.

``OMNIQ_EXPLORE_SAMPLES=100000 hatch test tests/test_interleavings.py`` explores more;
a failure prints the ``OMNIQ_EXPLORE_REPLAY`` value that replays its schedule.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

from explorer import Actor, Advance, State, World, explore, explore_control
from omniq.core import codec
from omniq.core.errors import SerializationError
from omniq.core.fs import Program
from omniq.core.models import UTC, Claimed, Task, TaskStatus
from omniq.storage.file.queue import AsyncFileQueue
from omniq.storage.file.queue import _layout as layout
from omniq.storage.file.queue._queue import claim_strategy

LEASE, SKEW, TTL = 10.0, 2.0, 60.0
Q = "default"
TERMINAL = {TaskStatus.DONE, TaskStatus.DEAD, TaskStatus.CANCELLED, TaskStatus.EXPIRED}


class Scene:
    """The queue under test in one world, and what its actors did."""

    def __init__(self, world: World) -> None:
        q = AsyncFileQueue("memory://unused", lease=LEASE, clock_skew=SKEW, tombstone_ttl=TTL)
        q.store = world.store
        q.claims = claim_strategy(world.kind)(world.store, q.batch)
        self.q = q
        self.world = world
        self.tasks: list[str] = []
        self.holder: Claimed | None = None  # claimed in set-up: the actors' subject
        self.claims: Counter[tuple[str, int]] = Counter()  # every claim won, by attempt
        self.ended: dict[str, str] = {}  # task id -> how it ended, seen by the final worker

    # -- set-up -------------------------------------------------------------------------
    def enqueue(self, task: Task) -> None:
        self.world.run(self.q._enqueue_program([(task, codec.encode(task))]))
        self.tasks.append(task.id)

    def claim_now(self) -> Claimed:
        got = self.world.run(claimer(self))
        assert len(got) == 1
        return got[0]


def claimer(scene: Scene) -> Program[list[Claimed]]:
    """A worker's dequeue: one listing, then a claim attempt per candidate."""
    got = []
    for cand in (yield from scene.q._scan_program(Q)):
        result = yield from scene.q._claim_program(Q, cand, LEASE, "claimer")
        if isinstance(result, Claimed):
            scene.claims[(result.id, result.attempt)] += 1
            got.append(result)
    return got


def reaper(scene: Scene) -> Program[list[Claimed]]:
    return (yield from scene.q._reap_program(Q))


# -- invariants ---------------------------------------------------------------------------
WRITES = ("write", "create", "mark", "create_many", "link")


def written(state: State) -> list[str]:
    """Keys the op of the last step wrote."""
    event = state.trace[-1] if state.trace else None
    if event is None or event.op is None or event.op.name not in WRITES:
        return []
    if event.op.name == "create_many":
        return [key for key, _ in event.op.args[0]]
    return [event.op.args[1 if event.op.name == "link" else 0]]


def readable(key: str, data: bytes) -> bool:
    if "/run/" in key and key.endswith(".x"):
        return layout.parse_outcome(data) is not None
    if "/run/" in key and not key.endswith(".json"):
        return layout.parse_record(data) is not None
    if "/due/" in key or "/cancel/" in key or ("/run/" in key and layout.tombstone_state(data)):
        return True
    for kind in (Claimed, Task):
        try:
            codec.decode(data, kind)
            return True
        except SerializationError:
            continue
    return False


def note_written(scene: Scene, key: str, data: bytes) -> None:
    """Remember how a task ended when the record that says so is written (the clean-up
    removes it later)."""
    name = key.rsplit("/", 1)[-1]
    parsed = layout.parse_run_name(name) if "/run/" in key else None
    if parsed is not None and parsed.part == "x":
        rec = layout.parse_outcome(data)
        if rec is not None and rec.state in ("done", "dead", "cancelled"):
            scene.ended[parsed.task_id] = rec.state
    elif parsed is not None and parsed.part == "json" and (ended := layout.tombstone_state(data)):
        scene.ended[parsed.task_id] = ended


def check(world: World, state: State) -> list[str]:
    scene: Scene = world.obj
    problems = []
    for key in written(state):
        data = world.ops.read(key)
        if data is None:
            continue
        if not readable(key, data):
            problems.append(f"{key} does not decode: {data[:40]!r}")
        note_written(scene, key, data)
    problems += [f"attempt {a} claimed {n} times" for a, n in scene.claims.items() if n > 1]
    holder = scene.holder
    if holder is not None:
        believed = believed_lease(scene, state)
        n = holder.attempt + 1
        later = [
            layout.run_key(Q, holder.id, n),
            layout.ready_key(Q, holder.task.priority, holder.id, n),
            layout.sched_key(Q, holder.id, n),
        ]
        if believed is not None and believed > world.t and any(map(world.ops.exists, later)):
            problems.append(f"holder believes its lease to {believed} while attempt {n} exists")
        problems += fenced_writes(scene, state)
    return problems


def believed_lease(scene: Scene, state: State) -> float | None:
    """The lease the set-up holder believes in: its claim's, or its heartbeat's if that won;
    None once it was told it lost, or finished."""
    assert scene.holder is not None
    lease = scene.holder.lease_until.timestamp()
    for actor in state.actors.values():
        if actor.name != "holder":
            continue
        if actor.status == "finished":
            if isinstance(actor.value, Claimed):
                return actor.value.lease_until.timestamp()
            return None
        if actor.status in ("raised", "crashed"):
            return None if actor.status == "raised" else lease
    return lease


def fenced_writes(scene: Scene, state: State) -> list[str]:
    """A holder whose call was refused wrote no record (its records carry its worker id)."""
    actor = state.actors.get("holder")
    if actor is None or actor.status != "finished" or actor.value not in (None, False):
        return []
    assert scene.holder is not None
    h = scene.holder
    mine = []
    for name in scene.world.ops.listdir(f"{Q}/run", False):
        parsed = layout.parse_run_name(name)
        if parsed is None or (parsed.task_id, parsed.attempt) != (h.id, h.attempt):
            continue
        if parsed.part == "json":
            continue
        rec = layout.parse_record(scene.world.ops.read(f"{Q}/run/{name}") or b"")
        if rec is not None and rec.worker == h.worker_id and rec.state != "cancelled":
            mine.append(f"refused holder still wrote {name} ({rec.state})")
    return mine


def final(world: World, state: State) -> list[str]:
    """A worker runs with time moving on until nothing is left: every task must end, none
    stays stuck, no attempt runs twice."""
    scene: Scene = world.obj
    q = scene.q
    for _ in range(4):
        world.t += TTL + LEASE + SKEW + 5
        # The reaper alone finishes what a crash between two writes left (an intent): no
        # repair pass runs here.
        busy = len(world.run(q._reap_program(Q)))
        while got := world.run(claimer(scene)):
            busy += 1
            for claimed in got:
                world.run(q._ack_program(claimed))
                scene.ended[claimed.id] = "done"
        if not busy:
            break
    problems = [f"attempt {a} claimed {n} times" for a, n in scene.claims.items() if n > 1]
    for task_id in scene.tasks:
        found = world.run(q._locate_program(Q, task_id))
        if found is not None and found[0].status not in TERMINAL:
            problems.append(f"task {task_id} stuck {found[0].status.value}")
        elif task_id not in scene.ended and found is None:
            problems.append(f"task {task_id} lost: it never ended")
    return problems


# -- scenarios ----------------------------------------------------------------------------
def ready_task(scene: Scene, **fields: Any) -> Task:
    task = Task(func="m:f", **fields)
    scene.enqueue(task)
    return task


def two_tasks(scene: Scene) -> None:
    ready_task(scene)
    ready_task(scene, priority=3)


def stalled_holder(**fields: Any) -> Callable[[World], None]:
    """Set-up: one task claimed by the holder, whose lease then ran out."""

    def setup(world: World) -> None:
        scene: Scene = world.obj
        ready_task(scene, **fields)
        scene.holder = scene.claim_now()
        world.t += LEASE + SKEW + 1

    return setup


def idle_reaper_then_task(world: World) -> None:
    """Set-up: the reaper's pass found run/ empty (its next pass looks at run/ first), then a
    task is enqueued."""
    scene: Scene = world.obj
    assert world.run(scene.q._reap_program(Q)) == [] and Q in scene.q._run_empty
    ready_task(scene)


def holding(call: Callable[[Scene, Claimed], Program[Any]]) -> Actor:
    def program(world: World) -> Program[Any]:
        scene: Scene = world.obj
        assert scene.holder is not None
        return call(scene, scene.holder)

    return Actor("holder", program, crashable=True)


def cancel_running(scene: Scene) -> Program[Any]:
    assert scene.holder is not None
    return (yield from scene.q._cancel_program(Q, scene.holder.id))


def requeue_dead(scene: Scene) -> Program[int]:
    return (yield from scene.q._requeue_dead_program(Q, None))


def _actor(name: str, fn: Callable[[Scene], Program[Any]], skew: float = 0.0) -> Actor:
    return Actor(name, lambda world: fn(world.obj), skew=skew, crashable=True)


def _delayed(scene: Scene, delay: float) -> Program[None]:
    task = Task(func="m:f", eta=datetime.fromtimestamp(scene.world.t + delay, UTC))
    yield from scene.q._enqueue_program([(task, codec.encode(task))])
    scene.tasks.append(task.id)  # enqueued: from here on it must run


def _dead_letter(world: World) -> None:
    scene: Scene = world.obj
    ready_task(scene)
    claimed = scene.claim_now()
    world.run(scene.q._nack_program(claimed, "boom", None, False))
    scene.ended.clear()  # requeued, it must end again


SCENARIOS: dict[str, dict[str, Any]] = {
    "claimer x claimer": dict(
        actors=[_actor("c1", claimer), _actor("c2", claimer)],
        setup=lambda w: two_tasks(w.obj),
    ),
    "ack x reaper": dict(
        actors=[holding(lambda s, c: s.q._ack_program(c)), _actor("reaper", reaper)],
        setup=stalled_holder(),
    ),
    "nack-retry x reaper": dict(
        actors=[
            holding(lambda s, c: s.q._nack_program(c, "boom", 5.0, True)),
            _actor("reaper", reaper),
        ],
        setup=stalled_holder(max_retries=3),
    ),
    "nack-dead x reaper": dict(
        actors=[
            holding(lambda s, c: s.q._nack_program(c, "boom", None, True)),
            _actor("reaper", reaper),
        ],
        setup=stalled_holder(max_retries=0),
    ),
    "release x reaper": dict(
        actors=[holding(lambda s, c: s.q._release_program(c)), _actor("reaper", reaper)],
        setup=stalled_holder(),
    ),
    "extend_lease x reaper": dict(
        actors=[
            holding(lambda s, c: s.q._extend_program(c, LEASE)),
            _actor("reaper", reaper),
        ],
        setup=stalled_holder(),
    ),
    "extend_lease x cancel": dict(
        actors=[
            holding(lambda s, c: s.q._extend_program(c, LEASE)),
            _actor("cancel", cancel_running),
        ],
        setup=stalled_holder(),
    ),
    "ack x claimer x reaper": dict(
        actors=[
            holding(lambda s, c: s.q._ack_program(c)),
            _actor("claimer", claimer),
            _actor("reaper", reaper),
        ],
        setup=stalled_holder(),
    ),
    "claimer x idle reaper": dict(
        # A claimer that dies after its claim leaves the attempt to a reaper that found run/
        # empty before: its look at run/ must bring the whole pass back (final: taken over).
        actors=[_actor("claimer", claimer), _actor("reaper", reaper)],
        setup=idle_reaper_then_task,
    ),
    "delayed enqueue x claimer ahead": dict(
        actors=[
            _actor("producer", lambda s: _delayed(s, 1.0)),
            _actor("claimer", claimer, skew=SKEW),
        ],
        setup=lambda w: None,
    ),
    "nack-retry x claimer ahead": dict(
        actors=[
            holding(lambda s, c: s.q._nack_program(c, "boom", 1.0, True)),
            _actor("claimer", claimer, skew=SKEW),
        ],
        setup=stalled_holder(max_retries=3),
    ),
    "requeue_dead x claimer": dict(
        actors=[_actor("requeue", requeue_dead), _actor("claimer", claimer)],
        setup=_dead_letter,
    ),
    "requeue_dead x requeue_dead": dict(
        actors=[_actor("requeue1", requeue_dead), _actor("requeue2", requeue_dead)],
        setup=_dead_letter,
    ),
}

ADVANCES = [Advance(LEASE + SKEW + 1), Advance(TTL + 1)]


@pytest.fixture
def world_dir(tmp_path: Path) -> Iterator[Path]:
    """Where local worlds live: tmpfs where there is one (the same syscalls as a disk, half
    the time per schedule on this machine), else the test's temporary directory."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="omniq-worlds-", dir=shm))
    yield path
    shutil.rmtree(path, ignore_errors=True)


SAMPLES = {"memory": 2_000, "local": 1_000}


@pytest.mark.parametrize("kind", ["memory", "local"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_interleavings(scenario: str, kind: str, world_dir: Path) -> None:
    spec = SCENARIOS[scenario]
    report = explore(
        scenario,
        spec["actors"],
        kind=kind,
        base_dir=world_dir,
        make=Scene,
        setup=spec["setup"],
        check=check,
        final=final,
        advances=ADVANCES,
        max_crashes=1,
        max_advances=1,
        # After up to 2,000 exhaustive ones: 4,000 schedules per pair on memory, 3,000 on a
        # local directory (the same programs; its own claim strategy) -- what fits the CI
        # run. Deeper runs: OMNIQ_EXPLORE_SAMPLES=30000 (docs/design.md, "How it is tested").
        samples=SAMPLES[kind],
    )
    report.assert_clean()
    assert report.schedules > 0


def test_the_invariants_catch_a_read_then_write_heartbeat(tmp_path: Path) -> None:
    """The explorer and these invariants find the old protocol's fencing hole: a heartbeat
    that checks the claim, then writes, beside a reaper's take-over."""

    def old_heartbeat(scene: Scene, claimed: Claimed) -> Program[Any]:
        from omniq.core.fs import exists, now, write

        current = yield now()
        if not (yield exists(layout.run_key(Q, claimed.id, claimed.attempt))):
            return None
        if (yield exists(layout.outcome_key(Q, claimed.id, claimed.attempt))):
            return None
        data = layout.record("lease", current, lease_until=current + LEASE)
        yield write(layout.epoch_key(Q, claimed.id, claimed.attempt, claimed.epoch + 1), data)
        return msgspec.structs.replace(
            claimed, lease_until=datetime.fromtimestamp(current + LEASE, UTC)
        )

    report = explore_control(
        "control read-then-write heartbeat x reaper",
        [holding(old_heartbeat), _actor("reaper", reaper)],
        make=Scene,
        setup=stalled_holder(),
        check=check,
        final=final,
    )
    assert any("holder believes" in m for v in report.violations for m in v.messages)


def test_the_invariants_catch_a_reaper_that_trusts_an_old_empty_run(tmp_path: Path) -> None:
    """A reaper that, once it found run/ empty, skipped its passes without looking again
    would leave a claim whose holder died: the final worker finds the task stuck."""

    class Trusting(Scene):
        def __init__(self, world: World) -> None:
            super().__init__(world)
            real = self.q._reap_program

            def trusting(queue: str) -> Program[list[Claimed]]:
                if queue in self.q._run_empty:
                    return []
                return (yield from real(queue))

            self.q._reap_program = trusting  # type: ignore[method-assign]

    report = explore_control(
        "control trusting idle reaper",
        [_actor("claimer", claimer), _actor("reaper", reaper)],
        make=Trusting,
        setup=idle_reaper_then_task,
        check=check,
        final=final,
        max_crashes=1,
    )
    assert any("stuck" in m for v in report.violations for m in v.messages)


# -- remote stores --------------------------------------------------------------------------
# A smaller random sample of the key pairs on S3 (moto), GCS (fake-gcs-server) and Azure
# (azurite): every op is a request, so tens of schedules rather than thousands. The store
# stamps mtimes by the real clock, so no clock moves between writes (``advances=()``): the
# stalled holder's set-up moves ``t`` past its lease before the actors start, and ``final``
# moves it only when every actor is done. OMNIQ_EXPLORE_SAMPLES (sized for memory and local)
# does not apply here: OMNIQ_EXPLORE_REMOTE_SAMPLES=N explores more.
REMOTE_SCENARIOS = [
    "claimer x claimer",
    "ack x reaper",
    "extend_lease x reaper",
    "nack-retry x reaper",
    "requeue_dead x requeue_dead",
]
REMOTE_SAMPLES = int(os.environ.get("OMNIQ_EXPLORE_REMOTE_SAMPLES") or 15)


@pytest.mark.parametrize("scenario", REMOTE_SCENARIOS)
def test_interleavings_remote(
    scenario: str, remote_storage: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OMNIQ_EXPLORE_SAMPLES", raising=False)
    spec = SCENARIOS[scenario]
    reaped = Counter[str]()

    def final_counting(world: World, state: State) -> list[str]:
        if "reaper" in state.actors:
            reaper_state = state["reaper"]
            took = reaper_state.status == "finished" and bool(reaper_state.value)
            reaped["won" if took else "lost"] += 1
        return final(world, state)

    report = explore(
        scenario,
        spec["actors"],
        kind=remote_storage.kind,
        base_dir=remote_storage.base_dir,
        storage_options=remote_storage.storage_options,
        make=Scene,
        setup=spec["setup"],
        check=check,
        final=final_counting,
        advances=(),
        max_crashes=1,
        mode="random",
        samples=REMOTE_SAMPLES,
    )
    report.assert_clean()
    assert report.schedules > 0
    if scenario == "ack x reaper" and report.mode == "random":
        # The set-up's lease really ran out by the store's mtimes too: the reaper takes over
        # in some schedules (and the holder's ack wins in others).
        assert reaped["won"] > 0, reaped
        assert reaped["lost"] > 0, reaped


def _look(world: World) -> Program[Any]:
    scene: Scene = world.obj
    return scene.q._locate_program(Q, scene.tasks[0])


def _never_unknown(world: World, state: State) -> list[str]:
    look = state["look"]
    if look.status == "finished" and look.value is None:
        return ["get_task found nothing of an enqueued task"]
    return []


@pytest.mark.parametrize("kind", ["memory", "local"])
def test_get_task_finds_a_task_claimed_between_its_listing_and_its_reads(
    kind: str, world_dir: Path
) -> None:
    """A claim made after get_task listed ``run/`` (no claim yet) and before it read the
    ready copy (gone by then) must not make the task unknown: get_task looks once more.
    Before that second look the explorer found "get_task found nothing" here (and helper
    runs saw NotFoundError on azure)."""
    report = explore(
        "get_task x claimer",
        [Actor("look", _look), _actor("claimer", claimer)],
        kind=kind,
        base_dir=world_dir,
        make=Scene,
        setup=lambda w: ready_task(w.obj),
        check=_never_unknown,
        max_crashes=0,
        max_advances=0,
        samples=200,
    )
    report.assert_clean()
    assert report.schedules > 0
