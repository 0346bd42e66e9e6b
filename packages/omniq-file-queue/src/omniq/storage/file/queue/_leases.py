"""The attempt protocol of a file queue: ack, nack, release, extend_lease, the reaper that
takes over expired attempts and cleans up finished ones, and the repair pass. Mixed into
``AsyncFileQueue``; every operation is a storage program.

Every transition of an attempt is one exclusive create (docs/design.md, "The attempt protocol"):

* its outcome is ``run/{id}.{n}.x`` -- ack, nack, release, cancel and a take-over all race
  for that one name, so an attempt has exactly one outcome; only its writer creates attempt
  n+1 or the dead letter (the record says which). Such a writer first writes the intent
  ``run/{id}.{n}.i`` (a requeue of the dead letter: ``.q``) and deletes it once the
  follow-up exists: a writer that died, failed or stalled in between leaves the intent, and
  the next reaper pass finishes its follow-up;
* a heartbeat creates lease epoch ``run/{id}.{n}.{j+1}``; a reaper first creates that same
  epoch as a fence, so a heartbeat racing a take-over either lands first (the reaper then
  backs off) or fails with LeaseLostError, having extended nothing.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import msgspec

from omniq.core import codec
from omniq.core.errors import LeaseLostError, SerializationError, TaskCancelledError
from omniq.core.fs import (
    Entry,
    Program,
    Store,
    create,
    delete,
    delete_many,
    exists,
    listdir,
    listdirs,
    now,
    read,
    stat,
    write,
)
from omniq.core.models import UTC, Claimed, ErrorInfo, EventType, Progress, Task, TaskStatus
from omniq.core.names import validate_name

from . import _layout as layout
from ._layout import State

if TYPE_CHECKING:
    from ._claim_document import DocumentClaims

log = logging.getLogger("omniq.queue")


def _dt(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def _error_info(error: ErrorInfo | BaseException | str | None) -> ErrorInfo | None:
    if error is None or isinstance(error, ErrorInfo):
        return error
    if isinstance(error, BaseException):
        return ErrorInfo.from_exception(error)
    return ErrorInfo(type="error", message=str(error))


class Attempt:
    """The ``run/`` names of one attempt seen by a listing."""

    __slots__ = ("claim", "epochs", "intents", "outcome", "requeued")

    def __init__(self) -> None:
        self.claim: Entry | None = None
        self.epochs: dict[int, Entry] = {}
        self.outcome: Entry | None = None
        self.requeued: Entry | None = None
        self.intents: dict[bool, Entry] = {}  # requeue? -> its intent

    def add(self, part: str, entry: Entry) -> None:
        if part == "json":
            self.claim = entry
        elif part == "x":
            self.outcome = entry
        elif part == "r":
            self.requeued = entry
        elif part in ("i", "q"):
            self.intents[part == "q"] = entry
        else:
            self.epochs[int(part)] = entry

    @property
    def decided(self) -> bool:
        return self.outcome is not None or self.requeued is not None

    def names(self) -> list[str]:
        return [e.name for e in (self.claim, *self.records()) if e is not None]

    def records(self) -> list[Entry]:
        """Its entries other than the claim."""
        entries = [*self.epochs.values(), self.outcome, self.requeued, *self.intents.values()]
        return [e for e in entries if e is not None]


def group_run(entries: list[Entry]) -> dict[tuple[str, int], Attempt]:
    """``run/`` entries grouped by attempt."""
    attempts: dict[tuple[str, int], Attempt] = {}
    for entry in entries:
        parsed = layout.parse_run_name(entry.name)
        if parsed is not None:
            key = (parsed.task_id, parsed.attempt)
            attempts.setdefault(key, Attempt()).add(parsed.part, entry)
    return attempts


class LeaseHandling:
    """ack, ack_many, nack, release, extend_lease, reap, repair."""

    store: Store
    lease: float
    clock_skew: float
    tombstone_ttl: float
    claims: DocumentClaims
    _reaped: dict[str, float]
    takeovers: dict[str, int]
    _spawning: set[tuple[str, str, int]]

    if TYPE_CHECKING:

        def _now(self) -> float: ...
        async def _emit(self, kind: EventType, task: Task, **fields: Any) -> None: ...
        def _enqueue_program(self, items: list[tuple[Task, bytes]]) -> Program[None]: ...
        def _quarantine(self, key: str, data: bytes, reason: BaseException) -> Program[None]: ...
        def _ended(self, queue: str, task_id: str, state: str) -> None: ...
        async def _report_settled(self) -> None: ...
        async def _settle_due(self) -> None: ...
        @staticmethod
        def _note_linked(entry: Entry, linked: set[str], ended: set[str]) -> None: ...
        def _settle_linked(self, queue: str, candidates: set[str]) -> Program[None]: ...
        def _wait_leftovers(
            self, queue: str, task_id: str, delete_them: bool = False
        ) -> Program[list[str]]: ...

    def _lost(self, claimed: Claimed, action: str) -> LeaseLostError:
        return LeaseLostError(
            f"{action} of task {claimed.id} attempt {claimed.attempt} refused: the lease was "
            "taken over or the attempt already finished; nothing was changed"
        )

    def _too_late(self, claimed: Claimed, current: float) -> bool:
        """Past its lease by ``tombstone_ttl``, an attempt's records may be cleaned up and
        its names free again: such a holder must not write at all."""
        return current >= claimed.lease_until.timestamp() + self.tombstone_ttl

    # -- outcomes ----------------------------------------------------------------------------
    def _decide(self, claimed: Claimed, state: str, nxt: Task | None) -> Program[bool]:
        """Create the attempt's outcome; the winner alone runs its follow-up."""
        current = yield now()
        if self._too_late(claimed, current):
            return False
        return (
            yield from self._outcome(
                claimed.queue, claimed.id, claimed.attempt, state, nxt, current, claimed.worker_id
            )
        )

    def _outcome(
        self,
        queue: str,
        task_id: str,
        attempt: int,
        state: str,
        nxt: Task | None,
        current: float,
        worker: str = "",
    ) -> Program[bool]:
        record = layout.Record(state=state, nonce="", at=current, worker=worker or None, next=nxt)
        intent = layout.intent_key(queue, task_id, attempt)
        if nxt is not None:
            # Before the outcome: whoever dies after it leaves this for the reaper. A writer
            # that loses the race leaves it too (the winner may still be on its follow-up).
            yield write(intent, layout.record(State.INTENT, current))
        if not (yield from self.claims.decide(queue, task_id, attempt, record, current)):
            return False
        self._ended(queue, task_id, state)  # done, dead, cancelled: settle its dependents
        if (yield from self._follow_up(state, nxt, current)) and nxt is not None:
            yield from quietly(delete(intent))
        return True

    def _follow_up(self, state: str, nxt: Task | None, since: float) -> Program[bool]:
        """Create what a won decision (made at ``since``) promised: attempt n+1, or the dead
        letter. Idempotent. A failure here is logged, not raised (False): the decision stands,
        and the reaper redoes this when it finds the intent left behind. A writer that stalled
        meanwhile leaves it to the reaper too: attempt n+1 may have been made, run and cleaned
        up since, and must not be made again."""
        if nxt is None:
            return True
        if (yield now()) > since + self.tombstone_ttl / 2:
            log.warning("task %s: stalled before creating attempt %d; left", nxt.id, nxt.attempt)
            return False
        try:
            if state == State.DEAD:
                yield write(layout.dead_key(nxt.queue, nxt.id), codec.encode(nxt))
            else:
                yield from self._enqueue_program([(nxt, codec.encode(nxt))])
        except Exception as exc:
            log.warning(
                "task %s: could not create attempt %d after %s (the reaper will): %s",
                nxt.id,
                nxt.attempt,
                state,
                exc,
            )
            return False
        return True

    def _followed(self, rec: layout.Record) -> Program[bool]:
        """Whether the follow-up of decision ``rec`` exists. Attempt n+1 is looked for by its
        claim, which stays until ``tombstone_ttl`` after n+1 ends (its copy may be claimed at
        any moment: re-creating a claimed copy is harmless, its claimers find the claim); the
        dead letter before its requeue record (a requeue creates the record, then deletes
        the letter)."""
        nxt = rec.next
        assert nxt is not None
        if rec.state != State.DEAD:
            return bool((yield exists(layout.run_key(nxt.queue, nxt.id, nxt.attempt))))
        if (yield exists(layout.dead_key(nxt.queue, nxt.id))):
            return True
        return bool((yield exists(layout.requeue_key(nxt.queue, nxt.id, nxt.attempt))))

    def _finish_intent(
        self, queue: str, task_id: str, attempt: int, requeue: bool, current: float
    ) -> Program[str]:
        """An intent left behind: finish the follow-up of the decision it announced (if that
        decision was made), then remove it. Returns ``"redone"``, ``"cleared"`` (nothing was
        missing) or ``"left"`` (undecided, or the follow-up failed: the intent stays)."""
        key = layout.requeue_key if requeue else layout.outcome_key
        data = yield read(key(queue, task_id, attempt))
        if data is None:
            return "left"  # undecided: its writer died first (a take-over decides) or is slow
        rec = layout.parse_outcome(data)
        status = "cleared"
        if rec is not None and rec.next is not None and not (yield from self._followed(rec)):
            if not (yield from self._follow_up(rec.state, rec.next, current)):
                return "left"
            status = "redone"
        yield from quietly(delete(layout.intent_key(queue, task_id, attempt, requeue)))
        return status

    async def ack(self, claimed: Claimed) -> None:
        """The attempt succeeded: the task is done. Raises LeaseLostError after a take-over."""
        if not await self.store.run(self._ack_program(claimed)):
            raise self._lost(claimed, "ack")

    def _ack_program(self, claimed: Claimed) -> Program[bool]:
        return (yield from self._decide(claimed, State.DONE, None))

    async def ack_many(self, claims: Sequence[Claimed]) -> None:
        """``ack`` each of ``claims`` in one storage program. Every claim still held is
        acked; then LeaseLostError is raised if any was taken over (naming the first)."""
        lost = await self.store.run(self._ack_many_program(list(claims)))
        if lost:
            raise LeaseLostError(
                f"ack of {len(lost)} of {len(claims)} tasks refused (the lease was taken over "
                f"or the attempt already finished), first: task {lost[0].id} attempt "
                f"{lost[0].attempt}; the others were acked"
            )

    def _ack_many_program(self, claims: list[Claimed]) -> Program[list[Claimed]]:
        lost = []
        for claimed in claims:
            if not (yield from self._ack_program(claimed)):
                lost.append(claimed)
        return lost

    async def nack(
        self,
        claimed: Claimed,
        *,
        error: ErrorInfo | BaseException | str | None = None,
        retry_in: float | None = None,
        retry: bool = True,
    ) -> TaskStatus:
        """The attempt failed. Retried with exponential backoff and jitter while retries
        remain (returns SCHEDULED, or PENDING for an immediate retry), else dead-lettered
        (returns DEAD) with the error kept. ``retry=False`` dead-letters at once (for
        failures no retry can fix, such as a function that does not import)."""
        status = await self.store.run(self._nack_program(claimed, error, retry_in, retry))
        if status is None:
            raise self._lost(claimed, "nack")
        return status

    def _nack_program(
        self,
        claimed: Claimed,
        error: ErrorInfo | BaseException | str | None,
        retry_in: float | None,
        retry: bool,
    ) -> Program[TaskStatus | None]:
        task = msgspec.structs.replace(
            claimed.task, failures=claimed.task.failures + 1, last_error=_error_info(error)
        )
        if not retry or task.failures > task.max_retries:
            won = yield from self._decide(claimed, State.DEAD, task)
            return TaskStatus.DEAD if won else None
        delay = (
            task.retry_delay(task.failures, random.random())
            if retry_in is None
            else max(0.0, retry_in)
        )
        current = yield now()
        nxt = msgspec.structs.replace(
            task, attempt=claimed.attempt + 1, eta=_dt(current + delay) if delay > 0 else None
        )
        if not (yield from self._decide(claimed, State.RETRIED, nxt)):
            return None
        return TaskStatus.SCHEDULED if delay > 0 else TaskStatus.PENDING

    async def release(self, claimed: Claimed) -> None:
        """Give the task back now, without counting a failure (e.g. on shutdown)."""
        if not await self.store.run(self._release_program(claimed)):
            raise self._lost(claimed, "release")

    def _release_program(self, claimed: Claimed) -> Program[bool]:
        nxt = msgspec.structs.replace(claimed.task, attempt=claimed.attempt + 1, eta=None)
        return (yield from self._decide(claimed, State.RELEASED, nxt))

    # -- heartbeats --------------------------------------------------------------------------
    async def extend_lease(
        self,
        claimed: Claimed,
        seconds: float | None = None,
        *,
        progress: Progress | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Claimed:
        """Heartbeat: the lease now ends ``seconds`` (default: the queue's lease) from now.
        Use the returned claim from then on. ``progress`` and ``metadata`` (the task's
        context) go into the new lease epoch, where ``get_task`` reads them.

        Raises LeaseLostError if another worker took the task over (nothing is extended),
        TaskCancelledError if it was cancelled (the attempt is then recorded as cancelled).
        """
        got = await self.store.run(
            self._extend_program(claimed, seconds or self.lease, progress, metadata)
        )
        await self._settle_due()  # a worker busy with one long task makes no dequeue
        if got is None:
            raise self._lost(claimed, "extend_lease")
        if isinstance(got, bool):
            raise TaskCancelledError(f"task {claimed.id} was cancelled")
        return got

    def _extend_program(
        self,
        claimed: Claimed,
        seconds: float,
        progress: Progress | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Program[Claimed | bool | None]:
        queue, task_id, attempt = claimed.queue, claimed.id, claimed.attempt
        current = yield now()
        if self._too_late(claimed, current):
            return None
        cancel = layout.cancel_key(queue, task_id, attempt)
        if (yield exists(cancel)):
            if not (yield from self._decide(claimed, State.CANCELLED, None)):
                return None
            yield from quietly(delete(cancel))
            return False
        epoch = claimed.epoch + 1
        data = layout.record(
            State.LEASE,
            current,
            lease_until=current + seconds,
            worker=claimed.worker_id,
            progress=progress,
            meta=metadata,
        )
        if not (yield create(layout.epoch_key(queue, task_id, attempt, epoch), data)):
            return None  # a reaper's fence (or a finished attempt's clean-up) came first
        if claimed.epoch:  # the newest two epochs are enough for anyone
            yield from quietly(delete(layout.epoch_key(queue, task_id, attempt, claimed.epoch)))
        return msgspec.structs.replace(claimed, epoch=epoch, lease_until=_dt(current + seconds))

    # -- the reaper ------------------------------------------------------------------------
    async def reap(self, queue: str = "default") -> list[Claimed]:
        """Requeue tasks whose lease expired (their worker died) as their next attempt, and
        clean up attempts decided over ``tombstone_ttl`` ago. Runs by itself inside
        ``dequeue``; returns the expired claims."""
        validate_name(queue, "queue name")
        self._reaped[queue] = self._now()  # an explicit pass counts: dequeue waits reap_interval
        taken = await self.store.run(self._reap_program(queue), heavy=True)
        await self._report_settled()  # waits its dependency settling decided
        if taken:
            self.takeovers[queue] = self.takeovers.get(queue, 0) + len(taken)
        for claimed in taken:
            log.warning(
                "lease of task %s attempt %d%s expired; requeued",
                claimed.id,
                claimed.attempt,
                f" (worker {claimed.worker_id})" if claimed.worker_id else "",
            )
            await self._emit(
                EventType.LEASE_EXPIRED,
                claimed.task,
                attempt=claimed.attempt,
                worker_id=claimed.worker_id or None,
            )
        return taken

    def _reap_program(self, queue: str) -> Program[list[Claimed]]:
        current: float = yield now()
        old = current - self.tombstone_ttl
        suspect = current - self.claims.suspect_after(self.lease, self.clock_skew)
        # Attempts decided less than tombstone_ttl ago are only remembered as a hash of their
        # stem: run/ holds one outcome per task finished in that time (100,000s at a high
        # rate), and all the reaper needs of them is that they are decided.
        recent: set[int] = set()
        # Dependencies with waiting dependents, and those of them that may have ended
        # (_dependencies.py: what a process that died before settling them left).
        linked, ended = set((yield listdirs(f"{queue}/deps"))), set[str]()

        def note(entry: Entry) -> bool:
            if entry.name.endswith((".x", ".r")) and entry.mtime >= old:
                recent.add(hash(entry.name[:-2]))
                return False
            return True  # old outcomes (to clean up), lease epochs and intents (few)

        def keep(entry: Entry) -> bool:  # filtered while scanning
            if linked:
                self._note_linked(entry, linked, ended)
            name = entry.name
            if not name.endswith(".json"):
                return note(entry)
            if entry.size <= layout.TOMBSTONE_MAX:
                return entry.mtime < old
            return entry.mtime < suspect and hash(name[:-5]) not in recent

        if self.claims.scan_outcomes_first:
            # A directory scan comes in no order: a first pass notes the recent outcomes, so
            # that the second keeps only the claims still undecided (not every finished one).
            yield listdir(f"{queue}/run", True, lambda entry: note(entry) and False)
        attempts = group_run((yield listdir(f"{queue}/run", True, keep)))
        # Forget what another worker cleaned up meanwhile.
        self._spawning -= {s for s in self._spawning if s[0] == queue and s[1:] not in attempts}

        def decided(task_id: str, attempt: int) -> bool:
            names = attempts.get((task_id, attempt))
            return (names is not None and names.decided) or hash(f"{task_id}.{attempt}") in recent

        spent: list[tuple[str, int, Attempt]] = []
        taken: list[Claimed] = []
        # While attempt n has an intent, attempt n+1 is not cleaned up: its claim is how
        # _finish_intent knows that n+1 exists, however late that runs.
        announced = {key for key, names in attempts.items() if names.intents}
        for (task_id, attempt), names in attempts.items():
            left = False  # an intent of this attempt stays
            for requeue, intent in names.intents.items():
                # An intent older than the skew was left by a writer that died or failed.
                if intent.mtime >= current - self.clock_skew:
                    left = True
                    continue
                status = yield from self._finish_intent(queue, task_id, attempt, requeue, current)
                left = left or status == "left"
                if status == "redone":
                    log.warning("finished the follow-up of task %s attempt %d", task_id, attempt)
            if hash(f"{task_id}.{attempt}") in recent:
                continue  # decided, and not old enough to clean up
            held = left or (task_id, attempt - 1) in announced  # see `announced`
            if names.decided:
                if not held and (
                    yield from self._cleanable(queue, task_id, attempt, names, decided)
                ):
                    spent.append((task_id, attempt, names))
            elif names.claim is not None and names.claim.size <= layout.TOMBSTONE_MAX:
                if not held:
                    spent.append((task_id, attempt, names))  # ended unclaimed, over ttl ago
            elif names.claim is not None:
                claimed = yield from self._take_over(queue, task_id, attempt, names, current)
                if claimed is not None:
                    taken.append(claimed)
            elif max(e.mtime for e in names.records()) < old and not (
                yield exists(layout.run_key(queue, task_id, attempt))
            ):
                # Left by a partial clean-up (the claim goes before the records). A claim
                # younger than the listing's cut is live: its records are not touched.
                spent.append((task_id, attempt, names))
        if ended:
            yield from self._settle_linked(queue, ended)
        # A dependency is kept while it has links: settling them reads how it ended.
        spent = [s for s in spent if s[0] not in linked]
        if spent:
            yield from self._clean_up(queue, spent)
        return taken

    def _cleanable(
        self,
        queue: str,
        task_id: str,
        attempt: int,
        names: Attempt,
        decided: Callable[[str, int], bool],
    ) -> Program[bool]:
        """A decided attempt (its decision ``tombstone_ttl`` old: the listing kept it) is
        removed, unless it made attempt n+1 and that one is undecided: its record is then
        what ``get_task`` and ``repair`` find the task by, however long it waits."""
        if decided(task_id, attempt + 1):
            return True
        if (queue, task_id, attempt) in self._spawning:
            return False
        if names.requeued is not None:
            spawning = True
        else:
            data = yield read(layout.outcome_key(queue, task_id, attempt))
            rec = None if data is None else layout.parse_outcome(data)
            spawning = rec is None or rec.state in State.SPAWNING  # unreadable: kept
        if spawning:
            self._spawning.add((queue, task_id, attempt))
        return not spawning

    def _take_over(
        self, queue: str, task_id: str, attempt: int, names: Attempt, current: float
    ) -> Program[Claimed | None]:
        key = layout.run_key(queue, task_id, attempt)
        data = yield read(key)
        if data is None or len(data) <= layout.TOMBSTONE_MAX:
            return None
        claimed = layout.as_claim(data, 0.0, queue, key)
        if claimed is None:
            if not codec.is_newer_schema(data):
                yield from self._quarantine(key, data, SerializationError("unreadable claim"))
            return None
        epoch = max(names.epochs, default=0)
        fenced = False
        if epoch:
            raw = yield read(layout.epoch_key(queue, task_id, attempt, epoch))
            rec = None if raw is None else layout.parse_record(raw)
            if rec is None:
                return None  # replaced by a newer heartbeat since the listing
            fenced = rec.state == State.FENCE  # a reaper died between fence and outcome
            lease_end = rec.lease_until or 0.0
        elif claimed.token:
            lease_end = claimed.lease_until.timestamp()
        else:  # a taken ready file: its lease is its mtime *now*, not at the listing
            info = yield stat(key)
            if info is None:
                return None
            lease_end = info.mtime
        if not fenced:
            if current <= lease_end + self.clock_skew:
                return None
            # The fence: the epoch the holder's next heartbeat would create. Whoever creates
            # it first wins; a heartbeat landing later fails and extends nothing.
            fence = layout.record(State.FENCE, current)
            if not (yield create(layout.epoch_key(queue, task_id, attempt, epoch + 1), fence)):
                return None
        nxt = msgspec.structs.replace(claimed.task, attempt=attempt + 1, eta=None)
        if not (yield from self._outcome(queue, task_id, attempt, State.LOST, nxt, current)):
            return None  # the holder finished first
        return claimed

    def _clean_up(self, queue: str, spent: list[tuple[str, int, Attempt]]) -> Program[None]:
        """Remove decided attempts: first every copy of the attempt that may be left (a ready
        copy at any priority, a delayed copy, a cancel request), then its claim, then its
        records. In that order a crash leaves records without a claim (harmless), never a
        claimable copy or a claim without its outcome."""
        ranks = yield listdirs(f"{queue}/ready")
        copies, claims, records = [], [], []
        for task_id, attempt, names in spent:
            copies += [f"{queue}/ready/{r}/{task_id}.{attempt}.json" for r in ranks]
            copies += [
                layout.sched_key(queue, task_id, attempt),
                layout.cancel_key(queue, task_id, attempt),
            ]
            if attempt == 0:  # a decided wait: its document and markers, if left
                copies += yield from self._wait_leftovers(queue, task_id)
            # The claim by its name: a claim younger than the listing's cut (a lease longer
            # than tombstone_ttl) is not in the listing, and must go before its outcome.
            claims.append(layout.run_key(queue, task_id, attempt))
            records += [f"{queue}/run/{n}" for n in names.names() if not n.endswith(".json")]
            self._spawning.discard((queue, task_id, attempt))
        yield delete_many(copies)
        yield delete_many(claims)
        yield delete_many(records)

    # -- repair ----------------------------------------------------------------------------
    async def repair(self, queue: str = "default") -> int:
        """Redo what a process killed between two writes left undone: attempt n+1 (or the
        dead letter) of a decided attempt whose writer died before creating it, and the due
        marker of a delayed task whose marker was never written. Lists ``run/``, ``sched/``
        and ``due/``; the worker runs it every ``sweep_interval``. Returns how many it redid."""
        validate_name(queue, "queue name")
        return await self.store.run(self._repair_program(queue), heavy=True)

    def _repair_program(self, queue: str) -> Program[int]:
        current = yield now()
        settle = current - max(60.0, 2 * self.clock_skew)
        attempts = group_run((yield listdir(f"{queue}/run", True)))
        redone = 0
        for (task_id, attempt), names in attempts.items():
            last = names.requeued or names.outcome
            if last is None or last.mtime >= settle or (task_id, attempt + 1) in attempts:
                continue
            data = yield read(f"{queue}/run/{last.name}")
            rec = None if data is None else layout.parse_outcome(data)
            if rec is None or rec.next is None:
                continue
            if rec.state == State.DEAD:
                if (yield exists(layout.dead_key(queue, task_id))):
                    continue
            elif (yield from self._pending(rec.next)):
                continue
            yield from self._follow_up(rec.state, rec.next, current)
            redone += 1
        markers = {
            (c.task_id, c.attempt)
            for name in (yield listdir(f"{queue}/due"))
            if (c := layout.due_candidate(queue, name)) is not None
        }
        for entry in (yield listdir(f"{queue}/sched", True)):
            parsed = layout.split_id_attempt(entry.name.removesuffix(".json"))
            if parsed is None or parsed in markers or entry.mtime >= settle:
                continue
            body = yield read(f"{queue}/sched/{entry.name}")
            try:
                task = codec.decode(body or b"", Task)
            except SerializationError:
                continue
            eta = task.eta.timestamp() if task.eta else current
            yield write(layout.due_key(queue, int(eta * 1000), task.priority, *parsed), b"")
            redone += 1
        return redone

    def _pending(self, task: Task) -> Program[bool]:
        """Whether attempt ``task.attempt`` is stored as ready or delayed."""
        ready = layout.ready_key(task.queue, task.priority, task.id, task.attempt)
        if (yield exists(ready)):
            return True
        return bool((yield exists(layout.sched_key(task.queue, task.id, task.attempt))))


def quietly(op: Any) -> Program[None]:
    """Run a clean-up op whose failure changes nothing (it is redone later)."""
    try:
        yield op
    except Exception as exc:
        log.debug("clean-up %s %r failed: %s", op.name, op.args[0], exc)
