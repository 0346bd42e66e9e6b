"""The reaper and the repair pass of a file queue: expired attempts taken over as their
next attempt, decided attempts cleaned up after ``tombstone_ttl``, and the follow-ups of
writers that died between two writes finished. Mixed into ``AsyncFileQueue`` on top of the
attempt protocol (``_leases``): a take-over races the holder for the same names (the lease
epoch as a fence, then the attempt's one outcome), so every transition stays one exclusive
create.
"""

from __future__ import annotations

import heapq
import logging
from array import array
from bisect import bisect_left
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from omniq.core import codec
from omniq.core.errors import SerializationError
from omniq.core.fs import (
    Entry,
    Program,
    create,
    delete_many,
    exists,
    listdir,
    listdirs,
    listhead,
    now,
    read,
    stat,
    write,
)
from omniq.core.models import Claimed, EventType, Task

from . import _layout as layout
from ._layout import State
from ._leases import Attempt, LeaseHandling, group_run

if TYPE_CHECKING:
    from ._bells import Bells
    from ._shards import Shards

log = logging.getLogger("omniq.queue")

_RUN = 4096  # hashes sorted at a time by _Stems.freeze


class _Stems:
    """The hashes of attempt stems (``{id}.{n}``) decided less than ``tombstone_ttl`` ago, met
    by one reaper pass. Those of a first pass (``add`` before ``freeze``) are kept as sorted
    8-byte integers: ``run/`` holds an outcome for every task finished in that time (a tmpfs
    worker drained 75,000 in the first 15 s, and a set of Python integers held ~60 bytes each:
    its pass was the worker's peak memory). Added after ``freeze``: a set."""

    __slots__ = ("_extra", "_new", "_sorted")

    def __init__(self) -> None:
        self._new: array[int] | None = array("q")
        self._sorted: array[int] = array("q")
        self._extra: set[int] = set()

    def add(self, stem_hash: int) -> None:
        if self._new is not None:
            self._new.append(stem_hash)
        elif not self._in_sorted(stem_hash):  # (a second pass meets the first's again)
            self._extra.add(stem_hash)

    def _in_sorted(self, stem_hash: int) -> bool:
        i = bisect_left(self._sorted, stem_hash)
        return i < len(self._sorted) and self._sorted[i] == stem_hash

    def freeze(self) -> None:
        """Sort what was added, a run at a time, then merge the runs (no list of them all)."""
        new, self._new = self._new, None
        if new:
            runs = [array("q", sorted(new[i : i + _RUN])) for i in range(0, len(new), _RUN)]
            self._sorted = array("q", heapq.merge(*runs))

    def __contains__(self, stem_hash: int) -> bool:
        assert self._new is None, "looked up before freeze"
        return stem_hash in self._extra or self._in_sorted(stem_hash)


class Reaping(LeaseHandling):
    """reap, repair."""

    _reaped: dict[str, float]
    _run_empty: set[str]  # storage queues whose last pass here found run/ empty
    shards: Shards
    bells: Bells | None
    takeovers: dict[str, int]
    _spawning: set[tuple[str, str, int]]

    if TYPE_CHECKING:

        async def _emit(self, kind: EventType, task: Task, **fields: Any) -> None: ...
        def _quarantine(self, key: str, data: bytes, reason: BaseException) -> Program[None]: ...
        async def _report_settled(self) -> None: ...
        @staticmethod
        def _note_linked(entry: Entry, linked: set[str], ended: set[str]) -> None: ...
        def _settle_linked(self, queue: str, candidates: set[str]) -> Program[None]: ...
        def _wait_leftovers(
            self, queue: str, task_id: str, delete_them: bool = False
        ) -> Program[list[str]]: ...

    async def reap(self, queue: str = "default") -> list[Claimed]:
        """Requeue tasks whose lease expired (their worker died) as their next attempt, and
        clean up attempts decided over ``tombstone_ttl`` ago. Runs by itself inside
        ``dequeue``; returns the expired claims."""
        taken: list[Claimed] = []
        for name in self.shards.queues(queue):
            taken += await self._reap_queue(name)
        return taken

    def _reap_group(self, queue: str) -> tuple[str, list[str]]:
        """The key of storage queue ``queue``'s reaper turn, and the storage queues that turn
        reaps. A sharded queue's shards and the queue itself take one turn together: an idle
        consumer of ``n`` shards reads one key a turn, not ``n + 1`` (a process without the
        setting, or with another count, keeps its own key: their turns never hold each
        other's queues back)."""
        sharded = self.shards.sharded(queue)
        if sharded is None:
            return layout.reaper_key(queue), [queue]
        return layout.reaper_shards_key(*sharded), self.shards.queues(sharded[0])

    async def _reap_queue(self, queue: str) -> list[Claimed]:
        """``reap`` of one storage queue."""
        # An explicit pass counts: dequeue waits reap_interval.
        self._reaped[self._reap_group(queue)[0]] = self._now()
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
        if queue in self._run_empty:
            # The last pass found run/ empty (an idle queue, tombstone_ttl after its last
            # task): one bounded look, not the listings of deps/ and run/. With run/ empty a
            # pass has nothing to do, whatever deps/ holds (only run/ names end a link).
            if not (yield listhead(f"{queue}/run", 1)):
                return []
            self._run_empty.discard(queue)
        current: float = yield now()
        old = current - self.tombstone_ttl
        suspect = current - self.claims.suspect_after(self.lease, self.clock_skew)
        # Attempts decided less than tombstone_ttl ago are only remembered as a hash of their
        # stem: run/ holds one outcome per task finished in that time (100,000s at a high
        # rate), and all the reaper needs of them is that they are decided.
        recent = _Stems()
        # Dependencies with waiting dependents, and those of them that may have ended
        # (_dependencies.py: what a process that died before settling them left).
        linked, ended = set((yield listdirs(f"{queue}/deps"))), set[str]()

        def note(entry: Entry) -> bool:
            if entry.name.endswith((".x", ".r")) and entry.mtime >= old:
                recent.add(hash(entry.name[:-2]))
                return False
            return True  # old outcomes (to clean up), lease epochs and intents (few)

        seen = 0

        def keep(entry: Entry) -> bool:  # filtered while scanning
            nonlocal seen
            seen += 1
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
        recent.freeze()  # (the second pass notes the outcomes written since: a set)
        attempts = group_run((yield listdir(f"{queue}/run", True, keep)))
        if not seen:
            self._run_empty.add(queue)
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

    async def repair(self, queue: str = "default") -> int:
        """Redo what a process killed between two writes left undone: attempt n+1 (or the
        dead letter) of a decided attempt whose writer died before creating it, and the due
        marker of a delayed task whose marker was never written. Lists ``run/``, ``sched/``
        and ``due/``; the worker runs it every ``sweep_interval``. Returns how many it redid."""
        redone = 0
        for name in self.shards.queues(queue):
            redone += await self.store.run(self._repair_program(name), heavy=True)
        return redone

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
        if redone and self.bells is not None:
            yield from self.bells.ring([queue])
        return redone

    def _pending(self, task: Task) -> Program[bool]:
        """Whether attempt ``task.attempt`` is stored as ready or delayed."""
        ready = layout.ready_key(task.queue, task.priority, task.id, task.attempt)
        if (yield exists(ready)):
            return True
        return bool((yield exists(layout.sched_key(task.queue, task.id, task.attempt))))
