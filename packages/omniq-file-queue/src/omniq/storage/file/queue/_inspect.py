"""Inspection and maintenance of a file queue: status lookup, cancel, counts, purge, dead
letters. Mixed into ``AsyncFileQueue``; every operation is a storage program."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

import msgspec

from omniq.core import codec
from omniq.core.errors import NotFoundError, SerializationError
from omniq.core.fs import (
    Entry,
    Program,
    Store,
    count,
    create,
    delete,
    delete_many,
    listafter,
    listdir,
    listdirs,
    listhead,
    now,
    read,
    read_many,
    write,
)
from omniq.core.models import ErrorInfo, QueueSize, Task, TaskInfo, TaskStatus, from_epoch
from omniq.core.names import validate_name

from . import _layout as layout
from ._layout import State
from ._leases import group_run, quietly

if TYPE_CHECKING:
    from ._claim_document import DocumentClaims
    from ._dependencies import Settled
    from ._shards import Shards

_OUTCOME_STATUS = {
    State.DONE: TaskStatus.DONE,
    State.CANCELLED: TaskStatus.CANCELLED,
}


class QueueInspection:
    """get_task, cancel, size, list_queues, purge, list_dead, requeue_dead, delete_dead,
    next_due."""

    store: Store
    _cache: dict[str, Any]
    shards: Shards

    claims: DocumentClaims

    if TYPE_CHECKING:

        def _quarantine(self, key: str, data: bytes, reason: BaseException) -> Program[None]: ...
        def _follow_up(self, state: str, nxt: Task | None, since: float) -> Program[bool]: ...
        def _ended(self, queue: str, task_id: str, state: str) -> None: ...
        async def _report_settled(self) -> None: ...
        async def _settle_now(self) -> None: ...
        def _cascade(self, settled: list[Settled]) -> Program[None]: ...
        def _decide_wait(
            self, queue: str, task_id: str, state: str, reason: str | None
        ) -> Program[list[Settled]]: ...

    # -- inspection --------------------------------------------------------------------------
    async def _queues_for(self, queue: str | None, task_id: str | None = None) -> list[str]:
        """The storage queues to look in: ``queue``'s (its shards, the one ``task_id`` falls
        in first, then itself), or every queue stored."""
        if queue is not None:
            return self.shards.queues(queue, task_id)
        return await self._stored_queues()

    async def get_task(self, task_id: str, queue: str | None = None) -> TaskInfo:
        """Where the task stands (searches every queue when ``queue`` is None)."""
        validate_name(task_id, "task id")
        for name in await self._queues_for(queue, task_id):
            found = await self.store.run(self._locate_program(name, task_id), heavy=True)
            if found is not None:
                return found[0]
        raise NotFoundError(f"task {task_id} not found")

    def _locate_program(self, queue: str, task_id: str) -> Program[tuple[TaskInfo, str] | None]:
        """Where task ``task_id`` stands, and the key that shows it. The records of its
        newest attempt say (a spawning outcome is kept while its next attempt waits, so a
        requeued task is found however long it waits); with none, attempt 1 is pending, or
        the task is unknown. One listing of ``run/`` from the id on (on S3 one LIST with
        ``StartAfter``), then a few reads: the cost does not grow with the queue's depth.

        A task moves on between the listing and the reads (claimed: its ready copy is gone
        but the listing had no claim; cleaned up: a listed record is gone), so a look that
        finds nothing is made once more before the task counts as unknown."""
        found = yield from self._locate_once(queue, task_id)
        if found is None:
            found = yield from self._locate_once(queue, task_id)
        return found

    def _locate_once(self, queue: str, task_id: str) -> Program[tuple[TaskInfo, str] | None]:
        names = yield listafter(f"{queue}/run", f"{task_id}.", 1000)
        attempts = group_run(
            [
                Entry(n, 0, 0.0)
                for n in names
                if (p := layout.parse_run_name(n)) is not None
                and p.task_id == task_id
                and p.part not in ("i", "q")  # an intent says nothing about where it stands
            ]
        )
        if not attempts:
            found = yield from self._pending_copy(queue, task_id, 1, None)
            if found is not None:
                return found
            key = layout.wait_key(queue, task_id)  # waiting for its dependencies
            if (body := (yield read(key))) is not None:
                return self._info(body, TaskStatus.WAITING, 1), key
            return (yield from self._dead_letter(queue, task_id))
        attempt = max(n for _, n in attempts)
        names_of = attempts[(task_id, attempt)]
        last = names_of.requeued or names_of.outcome
        if last is not None:
            data = yield read(f"{queue}/run/{last.name}")
            rec = None if data is None else layout.parse_outcome(data)
            if rec is None:
                return None
            if rec.state in State.SPAWNING and rec.next is not None:
                found = yield from self._pending_copy(queue, task_id, attempt + 1, rec.next)
                return found or (TaskInfo(task=rec.next, status=TaskStatus.RUNNING), "")
            if rec.state == State.DEAD:
                return (yield from self._dead_letter(queue, task_id))
            status = _OUTCOME_STATUS.get(rec.state, TaskStatus.DONE)
            error = None if rec.reason is None else ErrorInfo(type="cancelled", message=rec.reason)
            return TaskInfo(task=None, status=status, attempt=attempt, error=error), ""
        run = layout.run_key(queue, task_id, attempt)
        data = yield read(run)
        if data is None:
            return None
        if (ended := layout.tombstone_state(data)) is not None:
            return TaskInfo(task=None, status=TaskStatus(ended), attempt=attempt), ""
        claimed = yield from self.claims.read_claim(queue, run, data)
        if claimed is None:
            return None
        lease_until = claimed.lease_until
        epoch = max(names_of.epochs, default=0)
        rec = None
        if epoch:
            raw = yield read(layout.epoch_key(queue, task_id, attempt, epoch))
            if raw is None:  # replaced by a heartbeat since the listing: read its successor
                raw = yield read(layout.epoch_key(queue, task_id, attempt, epoch + 1))
            rec = None if raw is None else layout.parse_record(raw)
            if rec is not None and rec.lease_until is not None:
                lease_until = from_epoch(rec.lease_until)
        return TaskInfo(
            task=claimed.task,
            status=TaskStatus.RUNNING,
            attempt=attempt,
            worker_id=claimed.worker_id or None,
            lease_until=lease_until,
            progress=rec.progress if rec is not None else None,  # what the task reported
            metadata=rec.meta or {} if rec is not None else {},
        ), run

    def _pending_copy(
        self, queue: str, task_id: str, attempt: int, task: Task | None
    ) -> Program[tuple[TaskInfo, str] | None]:
        """Attempt ``attempt`` stored as ready (at the priority of ``task``, else at any) or
        delayed."""
        ranks = [layout.rank(task.priority)] if task else (yield listdirs(f"{queue}/ready"))
        for rank_dir in ranks:
            key = f"{queue}/ready/{rank_dir}/{task_id}.{attempt}.json"
            body = yield read(key)
            if body is not None:
                return self._info(body, TaskStatus.PENDING, attempt), key
        key = layout.sched_key(queue, task_id, attempt)
        body = yield read(key)
        if body is not None:
            return self._info(body, TaskStatus.SCHEDULED, attempt), key
        return None

    def _dead_letter(self, queue: str, task_id: str) -> Program[tuple[TaskInfo, str] | None]:
        key = layout.dead_key(queue, task_id)
        body = yield read(key)
        if body is None:
            return None
        return self._info(body, TaskStatus.DEAD, None), key

    @staticmethod
    def _info(body: bytes, status: TaskStatus, attempt: int | None) -> TaskInfo:
        try:
            task: Task | None = codec.decode(body, Task)
        except SerializationError:
            task = None
        if attempt is None and task is not None:
            attempt = task.attempt
        return TaskInfo(
            task=task, status=status, attempt=attempt, error=task.last_error if task else None
        )

    async def cancel(self, task_id: str, queue: str | None = None) -> bool:
        """A pending or scheduled task is withdrawn; a running one is asked to stop (its
        next ``extend_lease`` raises TaskCancelledError). False if it already finished."""
        validate_name(task_id, "task id")
        for name in await self._queues_for(queue, task_id):
            result = await self.store.run(self._cancel_program(name, task_id), heavy=True)
            await self._report_settled()  # dependents cancelled with it
            if result is not None:
                await self._settle_now()  # its dependents (a producer may make no other call)
                return result
        return False

    def _cancel_program(self, queue: str, task_id: str) -> Program[bool | None]:
        found = yield from self._locate_program(queue, task_id)
        if found is None:
            return None
        info, key = found
        if info.status is TaskStatus.WAITING:
            # Its wait's outcome, exclusive: a release racing this cancel wins or loses whole.
            settled = yield from self._decide_wait(queue, task_id, State.CANCELLED, None)
            if settled:
                yield from self._cascade(settled)  # its own dependents end too
                return True
            found = yield from self._locate_program(queue, task_id)  # released just now
            if found is None:
                return False
            info, key = found
        if info.status in (TaskStatus.PENDING, TaskStatus.SCHEDULED):
            assert info.attempt is not None
            # The claim name, exclusive: a claimer racing this cancel wins or loses it whole.
            if (
                yield create(
                    layout.run_key(queue, task_id, info.attempt), layout.tombstone(layout.CANCELLED)
                )
            ):
                self._ended(queue, task_id, State.CANCELLED)
                yield delete(key)
                task = info.task
                if info.status is TaskStatus.SCHEDULED and task is not None and task.eta:
                    yield delete(
                        layout.due_key(
                            queue,
                            int(task.eta.timestamp() * 1000),
                            task.priority,
                            task_id,
                            info.attempt,
                        )
                    )
                return True
            found = yield from self._locate_program(queue, task_id)  # claimed just now
            if found is None:
                return False
            info = found[0]
        if info.status is TaskStatus.RUNNING and info.attempt is not None:
            # Per attempt: a request that arrives after the attempt ended cancels nothing
            # later, and is removed with the attempt's records.
            yield write(layout.cancel_key(queue, task_id, info.attempt), b"")
            return True
        return False

    async def size(self, queue: str = "default") -> QueueSize:
        """Counts of ready, scheduled, running and dead tasks (lists the queue). A copy left
        by a claimer that died before removing it does not count: its attempt has a claim."""
        names = self.shards.queues(queue)
        if self.claims.pending:  # this instance's spent copies go first (a batch: S3, Azure)
            await self.store.run(self.claims.flush())
        sizes = [await self.store.run(self._size_program(name), heavy=True) for name in names]
        return QueueSize(
            ready=sum(s.ready for s in sizes),
            scheduled=sum(s.scheduled for s in sizes),
            running=sum(s.running for s in sizes),
            dead=sum(s.dead for s in sizes),
        )

    def _size_program(self, queue: str) -> Program[QueueSize]:
        # run/ first: a ready or scheduled copy whose attempt has a claim there is stale (its
        # claimer's delete is deferred, failed, or never ran), as ``filter`` and list_tasks
        # see it. A task claimed between the listings may count in neither, never in both.
        attempts = group_run((yield listdir(f"{queue}/run", True)))
        claimed = {a.claim.name for a in attempts.values() if a.claim is not None}
        # Running: claims (not ended unclaimed) of attempts without an outcome.
        running = sum(
            1
            for a in attempts.values()
            if a.claim is not None and a.claim.size > layout.TOMBSTONE_MAX and not a.decided
        )
        ready = 0
        for rank_dir in (yield listdirs(f"{queue}/ready")):
            ready += yield count(f"{queue}/ready/{rank_dir}", skip=claimed)
        scheduled = yield count(f"{queue}/sched", skip=claimed)
        dead = yield count(f"{queue}/dead")
        return QueueSize(ready=ready, scheduled=scheduled, running=running, dead=dead)

    async def next_due(
        self, queue: str = "default", after: datetime | None = None
    ) -> datetime | None:
        """When the earliest delayed or retrying task of ``queue`` (due after ``after``, if
        given) comes due; None if there is none (among the next 256)."""
        found = [await self._next_due(name, after) for name in self.shards.queues(queue)]
        return min((due for due in found if due is not None), default=None)

    async def _next_due(self, queue: str, after: datetime | None) -> datetime | None:
        for name in await self.store.run(_head(f"{queue}/due", 256)):
            candidate = layout.due_candidate(queue, name)
            if candidate is None:
                continue
            due = from_epoch(candidate.time_ms / 1000)
            if after is None or due > after:
                return due
        return None

    async def list_queues(self) -> list[str]:
        """The queues stored (the shards of a sharded queue shown as that queue)."""
        return self.shards.collapse(await self._stored_queues())

    async def _stored_queues(self) -> list[str]:
        valid = []
        for name in await self.store.listdirs(""):
            try:
                valid.append(validate_name(name, "queue name"))
            except ValueError:
                continue
        return valid

    async def purge(self, queue: str = "default") -> int:
        """Delete every ready and scheduled task of ``queue``; returns how many."""
        purged = 0
        for name in self.shards.queues(queue):
            self._cache.pop(name, None)
            purged += await self.store.run(self._purge_program(name), heavy=True)
        return purged

    def _purge_program(self, queue: str) -> Program[int]:
        keys = []
        for rank_dir in (yield listdirs(f"{queue}/ready")):
            keys += [
                f"{queue}/ready/{rank_dir}/{n}"
                for n in (yield listdir(f"{queue}/ready/{rank_dir}"))
            ]
        sched = [f"{queue}/sched/{n}" for n in (yield listdir(f"{queue}/sched"))]
        markers = [f"{queue}/due/{n}" for n in (yield listdir(f"{queue}/due"))]
        yield delete_many(markers + keys + sched)
        return len(keys) + len(sched)

    async def list_dead(self, queue: str = "default", limit: int | None = 100) -> list[TaskInfo]:
        """Dead-lettered tasks, oldest first, with their last error."""
        names, found = self.shards.queues(queue), list[TaskInfo]()
        for name in names:  # each shard's oldest, merged by id (time-ordered)
            found += await self.store.run(self._list_dead_program(name, limit), heavy=True)
        if len(names) > 1:
            found.sort(key=lambda info: info.task.id if info.task is not None else "")
        return found[:limit]

    def _list_dead_program(self, queue: str, limit: int | None) -> Program[list[TaskInfo]]:
        names = (yield listdir(f"{queue}/dead"))[:limit]
        bodies = yield read_many(f"{queue}/dead/{n}" for n in names)
        return [
            self._info(body, TaskStatus.DEAD, None) for body in bodies.values() if body is not None
        ]

    async def requeue_dead(self, queue: str = "default", task_id: str | None = None) -> int:
        """Put dead-lettered tasks (one, or all) back as ready, with their failures reset."""
        if task_id is not None:
            validate_name(task_id, "task id")
        requeued = 0
        for name in self.shards.queues(queue, task_id):
            requeued += await self.store.run(self._requeue_dead_program(name, task_id), heavy=True)
            if task_id is not None and requeued:
                break
        return requeued

    def _requeue_dead_program(self, queue: str, task_id: str | None) -> Program[int]:
        names = [f"{task_id}.json"] if task_id else (yield listdir(f"{queue}/dead"))
        count = 0
        for name in names:
            key = f"{queue}/dead/{name}"
            body = yield read(key)
            if body is None:
                continue
            try:
                task = codec.decode(body, Task)
            except SerializationError as exc:
                if not codec.is_newer_schema(body):  # a newer OmniQ's task stays for it
                    yield from self._quarantine(key, body, exc)
                continue
            nxt = msgspec.structs.replace(task, attempt=task.attempt + 1, failures=0, eta=None)
            current = yield now()
            # Exclusive per dead attempt: two requeues of one dead letter make one attempt.
            # The intent first, as for an outcome (see _leases).
            intent = layout.intent_key(queue, task.id, task.attempt, requeue=True)
            yield write(intent, layout.record(State.INTENT, current))
            data = layout.record(State.REQUEUED, current, next=nxt)
            if (yield create(layout.requeue_key(queue, task.id, task.attempt), data)):
                if (yield from self._follow_up(State.REQUEUED, nxt, current)):
                    yield from quietly(delete(intent))
                count += 1
            yield delete(key)  # requeued now, or earlier by a call that died before this
        return count

    async def delete_dead(self, queue: str, task_id: str) -> bool:
        """Discard one dead-lettered task; False if it is not (or no longer) dead-lettered.
        A ``requeue_dead`` racing it may still requeue the task (it read the letter first)."""
        validate_name(task_id, "task id")
        for name in self.shards.queues(queue, task_id):
            if await self.store.run(self._delete_dead_program(name, task_id)):
                return True
        return False

    def _delete_dead_program(self, queue: str, task_id: str) -> Program[bool]:
        key = layout.dead_key(queue, task_id)
        if (yield read(key)) is None:  # S3 says a delete succeeded whether or not it existed
            return False
        return bool((yield delete(key)))


def _head(prefix: str, limit: int) -> Program[list[str]]:
    return (yield listhead(prefix, limit))  # type: ignore[no-any-return]
