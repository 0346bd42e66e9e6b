"""Dependencies: a task that waits until the tasks it depends on have succeeded. Mixed into
``AsyncFileQueue``; every operation is a storage program (docs/design.md, "Dependencies").

Layout. A waiting task ``T`` is ``{tq}/wait/{T}.json``; for each dependency ``D`` (of queue
``dq``) not ended at enqueue, a *link* ``{dq}/deps/{D}/{T}`` names ``T``'s queue and how many
dependencies it has. When ``D`` ends, whoever settles it writes ``{tq}/met/{T}/{D}``, lists
``{tq}/met/{T}/`` and, once every dependency is there, *releases* ``T``. A dependency that
failed for good (dead, cancelled, expired) cancels ``T`` instead (``on_dependency_failure=
"run"``: it counts as met).

Decided once. The wait is attempt 0 of ``T``: releasing and cancelling race to create its
outcome ``{tq}/run/{T}.0.x`` (exclusive, like every outcome). The release is a spawning
outcome (``released``, next = attempt 1), written with the attempt protocol's intent: only
its writer creates attempt 1, and the reaper finishes that if the writer died. Settling a
dependency twice, or by two processes at once, writes the same marker twice and loses one
race for the outcome: harmless.

No lost release. A dependency's end is *outcome, then look*: its outcome is created, then
(later, see below) its ``deps/{D}/`` is listed. A dependent's enqueue is *registration, then
check*: its links and document are written, then each dependency's status is read. On a
strongly consistent store, if the look comes before the link is written, the check comes
after the outcome and sees it; otherwise the look sees the link. Either way at least one side
settles the pair. Likewise two dependencies ending at once each write their marker, then
list the markers: the later lister sees both.

At least once, and cost. The look is deferred and batched: a process that decided outcomes
notes them in memory and settles them at its next ``dequeue`` when idle, at most
``refresh_interval`` later when busy, or at ``close``; it then lists ``{dq}/deps/`` once (one
LIST per flush, whatever the number of acks) and each ``deps/{D}/`` that is there. A process
that dies with settles owed leaves links behind: each reaper pass lists ``deps/`` once, notes
(while scanning ``run/``, which it does anyway) which linked dependencies have an outcome or
an unclaimed end, and settles those; their records are not cleaned up while links remain.
No worker ever scans the waiting tasks.
"""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec

from omniq.core import codec
from omniq.core.errors import DependencyCycleError, SerializationError, UnknownDependencyError
from omniq.core.fs import (
    Entry,
    Program,
    Store,
    create,
    create_many,
    delete,
    delete_many,
    listdir,
    listdirs,
    now,
    read,
    read_many,
    remove_dir,
    write,
)
from omniq.core.models import ErrorInfo, EventType, Task, TaskInfo, TaskStatus
from omniq.core.names import validate_name

from . import _layout as layout
from ._layout import State

if TYPE_CHECKING:
    from ._claim_document import DocumentClaims

log = logging.getLogger("omniq.queue")

ENDED = {
    TaskStatus.DONE: State.DONE,
    TaskStatus.DEAD: State.DEAD,
    TaskStatus.CANCELLED: State.CANCELLED,
    TaskStatus.EXPIRED: layout.EXPIRED,
}
"""Statuses a task never leaves (short of ``requeue_dead``), as the state a marker records."""
_FINAL_STATES = frozenset(ENDED.values())
GONE = "gone"  # ended and cleaned up before the check could read how: counts as a failure
DEPENDENCY_FAILED = "omniq.DependencyFailed"


class Link(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What a dependency's ``deps/{D}/{T}`` says of its dependent ``T``."""

    queue: str
    deps: int  # how many distinct dependencies T has
    run: bool = False  # on_dependency_failure == "run"
    nonce: str = ""


class Settled(NamedTuple):
    """A waiting task whose wait this process decided: ``released`` or ``cancelled``."""

    task: Task
    state: str
    reason: str | None


def _link(task: Task, deps: int) -> bytes:
    run = task.on_dependency_failure == "run"
    link = Link(queue=task.queue, deps=deps, run=run, nonce=uuid.uuid4().hex[:16])
    return msgspec.json.encode(link)


def _parse_link(data: bytes | None) -> Link | None:
    try:
        return None if data is None else msgspec.json.decode(data, type=Link)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


class DependencyHandling:
    """Waiting tasks: their enqueue, and the settling of their dependencies' ends."""

    store: Store
    refresh_interval: float
    claims: DocumentClaims
    _owed: dict[str, dict[str, str]]  # queue -> {task id: state}: ended here, not settled yet
    _owed_at: float
    _unreported: list[Settled]

    if TYPE_CHECKING:

        def _now(self) -> float: ...
        async def _emit(self, kind: EventType, task: Task, **fields: Any) -> None: ...
        def _locate_program(
            self, queue: str, task_id: str
        ) -> Program[tuple[TaskInfo, str] | None]: ...
        def _outcome(
            self,
            queue: str,
            task_id: str,
            attempt: int,
            state: str,
            nxt: Task | None,
            current: float,
            worker: str = "",
        ) -> Program[bool]: ...

    def _ended(self, queue: str, task_id: str, state: str) -> None:
        """Task ``task_id`` ended for good (``state``) by this process: its dependents are
        settled at the next flush (``_settle_owed``). Called by the programs that decide."""
        if state in _FINAL_STATES:
            self._owed.setdefault(queue, {})[task_id] = state

    # -- enqueue -----------------------------------------------------------------------------
    async def _enqueue_waiting(self, task: Task) -> None:
        await self.store.run(self._wait_program(task), heavy=True)
        await self._report_settled()

    def _find(self, task_id: str, queue: str) -> Program[tuple[str, TaskInfo] | None]:
        """Where task ``task_id`` is: its queue (``queue`` first, then every other) and info."""
        found = yield from self._locate_program(queue, task_id)
        if found is not None:
            return queue, found[0]
        for other in (yield listdirs("")):
            try:
                validate_name(other, "queue name")
            except ValueError:
                continue
            if other != queue and (found := (yield from self._locate_program(other, task_id))):
                return other, found[0]
        return None

    def _reaches(self, target: str, start: dict[str, tuple[str, TaskInfo]]) -> Program[bool]:
        """Whether ``target`` is among the (transitive) dependencies of the waiting tasks in
        ``start``, by their stored documents."""
        seen: set[str] = set()
        todo = list(start.items())
        while todo:
            task_id, (queue, info) = todo.pop()
            if task_id == target:
                return True
            if task_id in seen or info.status is not TaskStatus.WAITING or info.task is None:
                continue
            seen.add(task_id)
            for dep in info.task.depends_on:
                hit = yield from self._find(dep, queue)
                if hit is not None:
                    todo.append((dep, hit))
        return False

    def _wait_program(self, task: Task) -> Program[None]:
        """Enqueue ``task`` as waiting: refuse unknown ids and cycles (writing nothing), then
        register (links, then the document), then check each dependency."""
        ids = list(dict.fromkeys(task.depends_on))
        if task.id in ids:
            raise DependencyCycleError(f"task {task.id} cannot depend on itself", [task.id])
        found: dict[str, tuple[str, TaskInfo]] = {}
        for dep in ids:
            hit = yield from self._find(dep, task.queue)
            if hit is not None:
                found[dep] = hit
        unknown = [dep for dep in ids if dep not in found]
        if unknown:
            raise UnknownDependencyError(
                f"task {task.id} depends on unknown task(s) {', '.join(unknown)}: never "
                "enqueued, or finished and cleaned up; nothing was enqueued",
                unknown,
            )
        if (yield from self._locate_program(task.queue, task.id)) is not None:
            # Already stored: idempotent, unless these dependencies lead back to it.
            if (yield from self._reaches(task.id, found)):
                raise DependencyCycleError(
                    f"task {task.id} would depend on itself through {', '.join(ids)}; nothing "
                    "was enqueued",
                    [task.id],
                )
            found_self = yield from self._locate_program(task.queue, task.id)
            if found_self is None or found_self[0].status is not TaskStatus.WAITING:
                return  # enqueued before (and maybe released since): nothing to do
        link = _link(task, len(ids))
        waiting = {dep: hit for dep, hit in found.items() if hit[1].status not in ENDED}
        # Registration: the links first, so that a link never lacks its document for long
        # (a producer killed in between leaves links whose document never comes: settling
        # them finds no document and drops them), then the document.
        yield create_many(
            [(layout.link_key(q, dep, task.id), link) for dep, (q, _) in waiting.items()]
        )
        yield create(layout.wait_key(task.queue, task.id), codec.encode(task))
        # Then the check: a dependency that ended before its link was written was not
        # settled by its look (see the module docstring); this sees its outcome.
        ended: list[tuple[str, str, str]] = []
        for dep, (queue, info) in found.items():
            if info.status not in ENDED:
                again = yield from self._locate_program(queue, dep)
                if again is None:  # ended and cleaned up while this call stalled: unknowable
                    ended.append((queue, dep, GONE))
                    continue
                info = again[0]
            if info.status in ENDED:
                ended.append((queue, dep, ENDED[info.status]))
        parsed = _parse_link(link)
        assert parsed is not None
        settled: list[Settled] = []
        for queue, dep, state in ended:
            settled += yield from self._settle_one(queue, dep, state, task.id, parsed)
        yield from self._cascade(settled)

    # -- settling ----------------------------------------------------------------------------
    def _settle_one(
        self, queue: str, dep: str, state: str, task_id: str, link: Link
    ) -> Program[list[Settled]]:
        """Dependency ``dep`` (of ``queue``) ended with ``state``: record it for ``task_id``
        and decide its wait if that was the last (or a failure that cancels it)."""
        waiting = link.queue
        settled: list[Settled] = []
        if state == State.DONE or link.run:
            yield write(layout.met_key(waiting, task_id, dep), state.encode())
            met = yield listdir(f"{waiting}/met/{task_id}")
            if len(met) >= link.deps:
                settled = yield from self._decide_wait(waiting, task_id, State.RELEASED, None)
        else:
            reason = f"dependency {dep} ended {state}"
            settled = yield from self._decide_wait(waiting, task_id, State.CANCELLED, reason)
        yield delete(layout.link_key(queue, dep, task_id))
        return settled

    def _decide_wait(
        self, queue: str, task_id: str, state: str, reason: str | None
    ) -> Program[list[Settled]]:
        """Release (attempt 1 follows) or cancel the waiting ``task_id``: the exclusive create
        of its attempt 0's outcome. [] if another call decided it first, or if its document is
        not there (decided and tidied, or its enqueue has not written it yet: that enqueue's
        own check decides then)."""
        key = layout.wait_key(queue, task_id)
        body = yield read(key)
        if body is None:
            return []
        try:
            task = codec.decode(body, Task)
        except SerializationError as exc:
            log.warning("waiting task %s is unreadable; left as it is: %s", key, exc)
            return []
        current = yield now()
        if state == State.RELEASED:
            won = yield from self._outcome(queue, task_id, 0, State.RELEASED, task, current)
        else:
            rec = layout.Record(state=state, nonce="", at=current, reason=reason)
            won = yield from self.claims.decide(queue, task_id, 0, rec, current)
        if not won:
            return []
        # The winner tidies (the reaper's clean-up of attempt 0 does it too, if this fails).
        yield from self._wait_leftovers(queue, task_id, delete_them=True)
        settled = Settled(task, state, reason)
        self._unreported.append(settled)
        return [settled]

    def _wait_leftovers(
        self, queue: str, task_id: str, delete_them: bool = False
    ) -> Program[list[str]]:
        """The document and markers of a decided wait (deleted with ``delete_them``)."""
        met = yield listdir(f"{queue}/met/{task_id}")
        keys = [layout.met_key(queue, task_id, dep) for dep in met]
        keys.append(layout.wait_key(queue, task_id))
        if delete_them:
            try:
                yield delete_many(keys)
                yield remove_dir(f"{queue}/met/{task_id}")
            except Exception as exc:  # left for the reaper's clean-up
                log.debug("tidying the wait of %s failed: %s", task_id, exc)
        return keys

    def _cascade(self, settled: list[Settled]) -> Program[None]:
        """A cancelled waiting task has ended for good too: settle its own dependents."""
        ended = [(s.task.queue, s.task.id, s.state) for s in settled if s.state != State.RELEASED]
        if ended:
            yield from self._settle_program(ended)

    def _settle_program(self, ended: list[tuple[str, str, str]]) -> Program[None]:
        """Settle the dependents of tasks that ended for good: ``(queue, id, state)``."""
        todo, seen = list(ended), set()
        while todo:
            queue, dep, state = todo.pop()
            if (queue, dep) in seen:
                continue
            seen.add((queue, dep))
            names = yield listdir(f"{queue}/deps/{dep}")
            bodies = yield read_many(layout.link_key(queue, dep, n) for n in names)
            for name in names:
                link = _parse_link(bodies.get(layout.link_key(queue, dep, name)))
                if link is None:  # settled meanwhile, or unreadable: nobody can use it
                    yield delete(layout.link_key(queue, dep, name))
                    continue
                got = yield from self._settle_one(queue, dep, state, name, link)
                todo += [
                    (s.task.queue, s.task.id, s.state) for s in got if s.state != State.RELEASED
                ]
            yield remove_dir(f"{queue}/deps/{dep}")

    async def _settle_owed(self) -> None:
        """Settle the dependents of the tasks this process ended since the last call."""
        if not self._owed:
            return
        owed, self._owed = self._owed, {}
        self._owed_at = self._now()
        try:
            await self.store.run(self._owed_program(owed))
        except BaseException:
            for queue, ids in owed.items():  # kept for the next try (the reaper's otherwise)
                self._owed[queue] = {**ids, **self._owed.get(queue, {})}
            raise
        finally:
            await self._report_settled()

    def _owed_program(self, owed: dict[str, dict[str, str]]) -> Program[None]:
        ended: list[tuple[str, str, str]] = []
        for queue, ids in owed.items():
            linked = set((yield listdirs(f"{queue}/deps")))  # one LIST for any number of acks
            ended += [
                (queue, task_id, state) for task_id, state in ids.items() if task_id in linked
            ]
        if ended:
            yield from self._settle_program(ended)

    # -- the reaper's part -------------------------------------------------------------------
    @staticmethod
    def _note_linked(entry: Entry, linked: set[str], ended: set[str]) -> None:
        """While the reaper scans ``run/``: a linked dependency with an outcome or an
        unclaimed end (cancelled or expired) may have ended; ``_settle_linked`` looks."""
        parsed = layout.parse_run_name(entry.name)
        if parsed is None or parsed.task_id not in linked:
            return
        if parsed.part == "x" or (parsed.part == "json" and entry.size <= layout.TOMBSTONE_MAX):
            ended.add(parsed.task_id)

    def _settle_linked(self, queue: str, candidates: set[str]) -> Program[None]:
        """Settle the dependents of ``candidates`` that ended for good: what a process that
        died before its flush left (and what another process settles anyway, harmlessly)."""
        ended = []
        for task_id in sorted(candidates):
            found = yield from self._locate_program(queue, task_id)
            if found is not None and found[0].status in ENDED:
                ended.append((queue, task_id, ENDED[found[0].status]))
        if ended:
            yield from self._settle_program(ended)

    async def _report_settled(self) -> None:
        """Events for the waits decided by this process's programs."""
        pending, self._unreported = self._unreported, []
        for settled in pending:
            task = settled.task
            if settled.state == State.RELEASED:
                log.debug("task %s: dependencies met, released", task.id)
                continue
            if settled.reason is None:  # cancelled by a user: the caller reports it
                continue
            log.info("task %s cancelled: %s", task.id, settled.reason)
            await self._emit(
                EventType.CANCELLED,
                task,
                attempt=0,
                error=ErrorInfo(type=DEPENDENCY_FAILED, message=settled.reason or "cancelled"),
                data={"func": task.func, "reason": settled.reason},
            )
