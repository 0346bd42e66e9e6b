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
notes them in memory and settles them at its next ``dequeue`` once the last settle is
``_settle_pace`` old (``refresh_interval``; longer while quiet, below), at once in a
``dequeue`` that does not wait and finds nothing, or at ``close``; it then lists ``{dq}/deps/``
once (one LIST per flush, whatever the number of acks) and each ``deps/{D}/`` that is there.
While its looks find no link at all (a queue that does not use dependencies), the pace doubles
up to ``QUIET_PACE`` refresh intervals: a look costs a request on an object store, and a busy
worker's cost should follow its work, not the clock. Only latency depends on the pace (a
dependent registered meanwhile waits for the next look, or the reaper's); a link seen brings
the pace back. A process that dies with settles owed leaves links behind: each reaper pass
lists ``deps/`` once, notes (while scanning ``run/``, which it does anyway) which linked
dependencies have an outcome or an unclaimed end, and settles those; their records are not
cleaned up while links remain. No worker ever scans the waiting tasks.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec

from omniq.core import codec
from omniq.core.errors import (
    DependencyCycleError,
    DependencyError,
    SerializationError,
    UnknownDependencyError,
)
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
GONE = "gone"  # ended, and nothing left to read how: a failure unless its result says success
DEPENDENCY_FAILED = "omniq.DependencyFailed"
MAX_DEPENDENCIES = 1000
"""The most dependencies one task may have (its enqueue locates each one)."""
QUIET_PACE = 8  # busy settles at most this many refresh_intervals apart while no link is seen


def check_dependencies(task_id: str, depends_on: list[str]) -> None:
    """Refuse (ValueError, nothing written) dependency ids that are not safe names (they
    become path components) and more than ``MAX_DEPENDENCIES`` of them."""
    if len(depends_on) > MAX_DEPENDENCIES:
        raise DependencyError(
            f"task {task_id} has {len(depends_on)} dependencies; the limit is "
            f"{MAX_DEPENDENCIES} (chain through an intermediate task for more)",
            [],
        )
    for dep in depends_on:
        validate_name(dep, "task id")


class Link(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What a dependency's ``deps/{D}/{T}`` says of its dependent ``T``."""

    queue: str
    deps: int  # how many distinct dependencies T has
    run: bool = False  # on_dependency_failure == "run"
    nonce: str = ""


class Gone(NamedTuple):
    """A dependency that ended with nothing left to read how (``_settle_gone``): of one
    dependent (``waiter``: its queue and id) or, with None, of every linked one."""

    queue: str
    dep: str
    waiter: tuple[str, str] | None


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
    _settle_pace: float  # seconds between busy settles: refresh_interval, longer while quiet
    _unreported: list[Settled]
    _gone: list[Gone]  # dependencies whose end is unknowable here: settled by their result
    _unfinished: dict[tuple[str, str], int]  # (queue, id) -> newest attempt, found not ended
    dependency_succeeded: Callable[[str], Awaitable[bool]] | None
    """Set by the backend: whether a task the queue no longer knows succeeded (its result)."""

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
        stored = yield from self._locate_program(task.queue, task.id)
        if stored is not None:
            # Already stored: idempotent, unless these dependencies lead back to it.
            if (yield from self._reaches(task.id, found)):
                raise DependencyCycleError(
                    f"task {task.id} would depend on itself through {', '.join(ids)}; nothing "
                    "was enqueued",
                    [task.id],
                )
            if stored[0].status is not TaskStatus.WAITING or stored[0].task is None:
                return  # enqueued before (and maybe released since): nothing to do
            # Still waiting: redo the registration and the check of the *stored* document
            # (a producer that died during its enqueue); this call's list is not used.
            task = stored[0].task
            found = {}
            for dep in dict.fromkeys(task.depends_on):
                hit = yield from self._find(dep, task.queue)
                if hit is None:  # ended and cleaned up since: unknowable here
                    self._gone.append(Gone(task.queue, dep, (task.queue, task.id)))
                else:
                    found[dep] = hit
        link = _link(task, len(task.depends_on))
        waiting = {dep: hit for dep, hit in found.items() if hit[1].status not in ENDED}
        # Registration: the links first, so that a link never lacks its document for long
        # (a producer killed in between leaves links whose document never comes: settling
        # them finds no document and drops them), then the document -- unless stored, or
        # decided and tidied away since the look above: never written again then.
        yield create_many(
            [(layout.link_key(q, dep, task.id), link) for dep, (q, _) in waiting.items()]
        )
        if stored is None:
            yield create(layout.wait_key(task.queue, task.id), codec.encode(task))
        # Then the check: a dependency that ended before its link was written was not
        # settled by its look (see the module docstring); this sees its outcome.
        ended: list[tuple[str, str, str]] = []
        for dep, (queue, info) in found.items():
            if info.status not in ENDED:
                again = yield from self._locate_program(queue, dep)
                if again is None:  # ended and cleaned up while this call stalled: its result
                    self._gone.append(Gone(queue, dep, (task.queue, task.id)))
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
        and decide its wait if that was the last (or a failure that cancels it). The stored
        document decides, not the link: a link left by another registration of the same id
        (a producer that died before writing its document) names a dependency the document
        may not have, and may count another number of them."""
        waiting = link.queue
        settled: list[Settled] = []
        task = yield from self._wait_document(waiting, task_id)
        # No document: decided and tidied, or its enqueue has not written it yet (that
        # enqueue's own check settles this dependency then).
        if task is not None and dep in task.depends_on:
            if state == State.DONE or task.on_dependency_failure == "run":
                yield write(layout.met_key(waiting, task_id, dep), state.encode())
                met = yield listdir(f"{waiting}/met/{task_id}")
                if set(task.depends_on) <= set(met):
                    settled = yield from self._decide_wait(
                        waiting, task_id, State.RELEASED, None, task
                    )
            else:
                reason = f"dependency {dep} ended {state}"
                settled = yield from self._decide_wait(
                    waiting, task_id, State.CANCELLED, reason, task
                )
        yield delete(layout.link_key(queue, dep, task_id))
        return settled

    def _wait_document(self, queue: str, task_id: str) -> Program[Task | None]:
        """The stored document of the waiting ``task_id``; None if absent or unreadable."""
        key = layout.wait_key(queue, task_id)
        body = yield read(key)
        if body is None:
            return None
        try:
            return codec.decode(body, Task)
        except SerializationError as exc:
            log.warning("waiting task %s is unreadable; left as it is: %s", key, exc)
            return None

    def _decide_wait(
        self, queue: str, task_id: str, state: str, reason: str | None, task: Task | None = None
    ) -> Program[list[Settled]]:
        """Release (attempt 1 follows) or cancel the waiting ``task_id`` (its document
        ``task``, read here if not given): the exclusive create of its attempt 0's outcome.
        [] if another call decided it first, or if its document is not there (decided and
        tidied, or its enqueue has not written it yet: that enqueue's own check decides)."""
        if task is None:
            task = yield from self._wait_document(queue, task_id)
            if task is None:
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

    async def _settle_owed(self) -> bool:
        """Settle the dependents of the tasks this process ended since the last call; whether
        any of their ``deps/`` had links (dependents may have been released)."""
        if not self._owed:
            return False
        owed, self._owed = self._owed, {}
        self._owed_at = self._now()
        try:
            linked = await self.store.run(self._owed_program(owed))
        except BaseException:
            for queue, ids in owed.items():  # kept for the next try (the reaper's otherwise)
                self._owed[queue] = {**ids, **self._owed.get(queue, {})}
            raise
        finally:
            await self._report_settled()
        # Quiet (no dependent linked to anything): the next busy look may wait longer, up to
        # QUIET_PACE looks' worth; any link seen brings back one look per refresh_interval.
        quiet = min(self._settle_pace * 2, self.refresh_interval * QUIET_PACE)
        self._settle_pace = self.refresh_interval if linked else quiet
        return linked

    def _settle_is_due(self) -> bool:
        """Something is owed and the last settle is ``_settle_pace`` old (busy settles)."""
        return bool(self._owed) and self._now() - self._owed_at >= self._settle_pace

    async def _settle_due(self) -> None:
        """Settle what is owed if a busy settle is due: called by the public calls a process
        may make alone (a heartbeat while a long task runs, a producer's enqueue). A failure
        is logged: the links stay for the next call or the reaper."""
        if self._settle_is_due():
            await self._settle_now()

    async def _settle_now(self) -> None:
        """Settle what is owed now (``cancel``: rare, and maybe a producer's only call)."""
        try:
            await self._settle_owed()
        except Exception as exc:
            log.warning("could not settle the dependents of finished tasks: %s", exc)

    def _owed_program(self, owed: dict[str, dict[str, str]]) -> Program[bool]:
        """Settle the dependents of ``owed``; returns whether any ``deps/`` listed had links."""
        ended: list[tuple[str, str, str]] = []
        any_linked = False
        for queue, ids in owed.items():
            linked = set((yield listdirs(f"{queue}/deps")))  # one LIST for any number of acks
            any_linked = any_linked or bool(linked)
            for task_id, state in ids.items():
                if task_id not in linked:
                    continue
                if state != State.DONE:  # a failure may be undone since (requeue_dead): look
                    found = yield from self._locate_program(queue, task_id)
                    if found is None:
                        self._gone.append(Gone(queue, task_id, None))
                        continue
                    if found[0].status not in ENDED:
                        continue  # requeued: its dependents wait for its new attempt
                    state = ENDED[found[0].status]
                ended.append((queue, task_id, state))
        if ended:
            yield from self._settle_program(ended)
        return any_linked

    # -- the reaper's part -------------------------------------------------------------------
    @staticmethod
    def _note_linked(entry: Entry, linked: set[str], ended: set[str]) -> None:
        """While the reaper scans ``run/``: a linked dependency with an outcome or an
        unclaimed end (cancelled or expired) may have ended; ``_settle_linked`` looks.
        ``ended`` gets the entry's name (its attempt tells a new end from one seen before)."""
        parsed = layout.parse_run_name(entry.name)
        if parsed is None or parsed.task_id not in linked:
            return
        if parsed.part == "x" or (parsed.part == "json" and entry.size <= layout.TOMBSTONE_MAX):
            ended.add(entry.name)

    def _settle_linked(self, queue: str, candidates: set[str]) -> Program[None]:
        """Settle the dependents of the noted ``candidates`` (run/ names) that ended for
        good: what a process that died before its flush left (and what another process
        settles anyway, harmlessly). One found not ended (a released or retried task now
        running) is remembered with its newest noted attempt and not looked at again until
        a newer attempt ends. One with nothing left to locate (its dead letter deleted) is
        settled as gone."""
        newest: dict[str, int] = {}
        for name in candidates:
            parsed = layout.parse_run_name(name)
            if parsed is not None:
                newest[parsed.task_id] = max(parsed.attempt, newest.get(parsed.task_id, -1))
        for key in [k for k in self._unfinished if k[0] == queue and k[1] not in newest]:
            del self._unfinished[key]  # no longer linked, or its outcome cleaned up
        ended = []
        for task_id, attempt in sorted(newest.items()):
            if self._unfinished.get((queue, task_id)) == attempt:
                continue
            found = yield from self._locate_program(queue, task_id)
            if found is None:
                self._gone.append(Gone(queue, task_id, None))
            elif found[0].status in ENDED:
                ended.append((queue, task_id, ENDED[found[0].status]))
            else:
                self._unfinished[(queue, task_id)] = attempt
                continue
            self._unfinished.pop((queue, task_id), None)
        if ended:
            yield from self._settle_program(ended)

    async def _settle_gone(self) -> None:
        """Settle the dependencies found ended with nothing left to read how: as met if
        ``dependency_succeeded`` (the backend's result look-up) says so, else as failed. Kept
        for the next call if the look-up or the storage fails."""
        pending, self._gone = self._gone, []
        for i, gone in enumerate(pending):
            try:
                ok = self.dependency_succeeded is not None and (
                    await self.dependency_succeeded(gone.dep)
                )
                state = State.DONE if ok else GONE
                await self.store.run(self._gone_program(gone, state))
            except Exception as exc:
                log.warning("could not settle the dependents of %s: %s", gone.dep, exc)
                self._gone += pending[i:]
                return

    def _gone_program(self, gone: Gone, state: str) -> Program[None]:
        if gone.waiter is None:
            yield from self._settle_program([(gone.queue, gone.dep, state)])
            return
        queue, task_id = gone.waiter
        link = Link(queue=queue, deps=0)
        yield from self._cascade(
            (yield from self._settle_one(gone.queue, gone.dep, state, task_id, link))
        )

    async def _report_settled(self) -> None:
        """Events for the waits decided by this process's programs (after settling what they
        found gone)."""
        if self._gone:
            await self._settle_gone()
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
