"""The attempt protocol of a file queue: ack, nack, release, extend_lease (the reaper that
takes over expired attempts and cleans up finished ones, and the repair pass, are
``_reaper``). Mixed into ``AsyncFileQueue``; every operation is a storage program.

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
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from omniq.core import codec
from omniq.core.errors import LeaseLostError, TaskCancelledError
from omniq.core.fs import (
    Entry,
    Program,
    Store,
    create,
    delete,
    exists,
    now,
    read,
    write,
)
from omniq.core.models import Claimed, ErrorInfo, Progress, Task, TaskStatus, from_epoch

from . import _layout as layout
from ._layout import State

if TYPE_CHECKING:
    from ._claim_document import DocumentClaims

log = logging.getLogger("omniq.queue")


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
    """ack, ack_many, nack, release, extend_lease (reap and repair: ``_reaper.Reaping``)."""

    store: Store
    lease: float
    clock_skew: float
    tombstone_ttl: float
    claims: DocumentClaims

    if TYPE_CHECKING:

        def _now(self) -> float: ...
        def _enqueue_program(self, items: list[tuple[Task, bytes]]) -> Program[None]: ...
        def _ended(self, queue: str, task_id: str, state: str) -> None: ...
        async def _settle_due(self) -> None: ...

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
            task,
            attempt=claimed.attempt + 1,
            eta=from_epoch(current + delay) if delay > 0 else None,
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
        return msgspec.structs.replace(
            claimed, epoch=epoch, lease_until=from_epoch(current + seconds)
        )


def quietly(op: Any) -> Program[None]:
    """Run a clean-up op whose failure changes nothing (it is redone later)."""
    try:
        yield op
    except Exception as exc:
        log.debug("clean-up %s %r failed: %s", op.name, op.args[0], exc)
