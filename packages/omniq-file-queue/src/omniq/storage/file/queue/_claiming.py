"""How a file queue claims: the listing of candidates shared by one instance's callers,
spreading consumers over the head of a queue, the claim attempts (concurrent on object stores,
one program locally), and what comes back with its lease nearly spent. Mixed into
``AsyncFileQueue``; the claim itself is a store's strategy (``_claim_link``, ``_claim_batched``,
``_claim_document``: each carries its store's correctness argument).
"""

from __future__ import annotations

import itertools
import logging
import random
from typing import Any

import anyio

from omniq.core import codec
from omniq.core.errors import (
    LeaseLostError,
    SerializationError,
    StorageError,
    TaskCancelledError,
)
from omniq.core.fs import Program, create, delete, exists, listhead, listtree, now, read, write
from omniq.core.models import Claimed, EventType, Task, from_epoch

from . import _layout as layout
from ._bells import Bells
from ._lanes import Lanes
from ._reaper import Reaping

log = logging.getLogger("omniq.queue")

MISSES = 3  # candidates in a row found taken before a listing is made again (see _tolerated)
REAP_AT_ONCE = 16  # reaper passes of a sharded queue's group run at once on an object store


class ListingCache:
    """Claim candidates from the last listing of one queue, shared by this instance's callers."""

    __slots__ = ("at", "items", "missed", "misses", "patient", "taken", "tolerated")

    def __init__(
        self,
        at: float,
        items: list[layout.Candidate],
        tolerated: int = MISSES,
        patient: bool = False,
    ) -> None:
        self.at = at
        self.items = items
        self.patient = patient  # ordered for a waiting call (see _spread)
        self.taken = 0  # claims made from it
        self.misses = 0  # candidates in a row found claimed by others
        self.missed = False  # a candidate found claimed by another since the listing
        self.tolerated = tolerated  # misses in a row before listing again

    def stale(self, current: float, interval: float) -> bool:
        """Whether to list again: the candidates are used up, or ``tolerated`` in a row were
        taken by others, or the listing is ``interval`` old and 32 claims were made from it
        (a busy consumer sees new higher priorities within ``interval``), or one of its
        candidates was found taken (others claim from the same part of it: the next listing's
        look at claims drops theirs), or it is ten times as old (a slow one lists at most
        every ``10 x interval``: with many consumers a claim would otherwise pay for a
        listing of its own; see docs/design.md)."""
        age = current - self.at
        if not self.items or self.misses >= self.tolerated:
            return True
        return age > interval and (self.taken >= 32 or self.missed or age > 10 * interval)


class ClaimHandling(Reaping):
    """The claim side of ``dequeue``: listing, spreading, claiming, renewing stale claims."""

    batch: int
    spread: int
    refresh_interval: float
    reap_interval: float
    lanes: Lanes | None
    bells: Bells | None
    _cache: dict[str, ListingCache]
    _listing: set[str]
    _picked: dict[str, float]

    async def _fresh(self, claims: list[Claimed], lease: float) -> list[Claimed]:
        """The claims to hand out. A claim whose requests took long (retried or slowed through
        an outage) may come back with its lease nearly spent: it is renewed before the caller
        starts it, or dropped if it was taken over meanwhile. Renewals run at once, and the
        claims are judged again after them (a slow renewal must not spend the lease of a
        claim judged fresh before it), up to three rounds; a claim whose lease ran out even
        so is dropped (the reaper requeues it), never started."""
        out: list[Claimed] = list(claims)
        for _ in range(3):
            current = self._now()
            stale = [
                i for i, c in enumerate(out) if c.lease_until.timestamp() - current < lease / 3
            ]
            if not stale:
                return out
            kept: list[Claimed | None] = list(out)
            async with anyio.create_task_group() as tg:
                for i in stale:
                    tg.start_soon(self._renew, kept, i, lease)
            out = [c for c in kept if c is not None]
        current = self._now()
        for claimed in out:
            if claimed.lease_until.timestamp() <= current:
                log.warning(
                    "task %s: its lease ran out before it started (attempt %d)",
                    claimed.id,
                    claimed.attempt,
                )
        return [c for c in out if c.lease_until.timestamp() > current]

    async def _renew(self, claims: list[Claimed | None], i: int, lease: float) -> None:
        """Renew ``claims[i]`` in place; None if it was lost or could not be renewed."""
        claimed = claims[i]
        assert claimed is not None
        try:
            claims[i] = await self.extend_lease(claimed, lease)
        except LeaseLostError:
            claims[i] = None
            log.warning(
                "task %s: claim lost before it started (attempt %d)", claimed.id, claimed.attempt
            )
        except TaskCancelledError:
            claims[i] = None
            log.info(
                "task %s: cancelled before it started (attempt %d)", claimed.id, claimed.attempt
            )
        except Exception as exc:  # unreachable storage: let the lease run out
            claims[i] = None
            log.warning(
                "task %s: a stale claim could not be renewed (attempt %d): %s: %s",
                claimed.id,
                claimed.attempt,
                type(exc).__name__,
                exc,
            )

    def _held_too_long(self, lease: float, *groups: list[Claimed]) -> bool:
        """Whether the claims in hand have waited long enough for more claims: once one has
        spent a third of its lease, the next claim round would leave it to ``_fresh``."""
        limit = self._now() + lease * 2 / 3
        return any(c.lease_until.timestamp() < limit for group in groups for c in group)

    async def _claim_from(
        self,
        queue: str,
        lease: float,
        worker: str,
        want: int,
        held: list[Claimed],
        patient: bool = False,
    ) -> list[Claimed]:
        """Up to ``want`` claims from ``queue``; ``held`` are the claims the caller already
        has (from other queues); a ``patient`` caller (one that waits) leaves other lanes'
        new tasks to their owners (``_spread``). A storage error after some claims were made
        is logged and what was claimed is returned: raising would strand those claims until
        their lease ends."""
        claimed: list[Claimed] = []
        lanes = self.lanes
        if lanes is not None and lanes.due(queue, self._now()):
            before = lanes.lane(queue)
            try:
                await self.store.run(lanes.look(queue, self._now()))
            except StorageError as exc:  # lanes only order claims: claim without them
                log.debug("could not look at the lanes of %s: %s", queue, exc)
            cache = self._cache.get(queue)
            if cache is not None and lanes.lane(queue) != before:
                # The listing in hand was ordered for the old lane: its first candidates are
                # others' now (16 workers starting on a deep S3 queue claimed 0.14-0.44 tasks
                # a task from such orders, in other consumers' lanes, until the next listing).
                cache.items = self._spread(queue, cache.items, cache.patient)
        try:
            await self._claim_rounds(queue, lease, worker, want, held, claimed, patient)
        except Exception as exc:
            hand_over_or_raise(queue, claimed, exc)
        if claimed and lanes is not None:
            lanes.claimed(queue, self._now())
        return claimed

    async def _claim_rounds(
        self,
        queue: str,
        lease: float,
        worker: str,
        want: int,
        held: list[Claimed],
        claimed: list[Claimed],
        patient: bool,
    ) -> None:
        # Claims made are appended to ``claimed`` as they come (kept if a later step fails).
        if self._held_too_long(lease, held):
            return  # slow requests: start what is in hand, claim more later
        current = self._now()
        cache = self._cache.get(queue)
        refreshed = False
        if queue in await self._reap_if_due(queue, current):
            cache = None  # requeued tasks: list again to see them
        if self.claims.unsettled:
            claimed += await self.store.run(self.claims.settle(queue, want, self.tombstone_ttl))
            if len(claimed) >= want:
                return
        while True:
            if refreshed and (cache is None or cache.stale(current, self.refresh_interval)):
                return
            if queue in self._listing:
                # Another call of this instance is listing the queue: no second listing;
                # claim from the last one meanwhile, if anything is left of it.
                if cache is None or not cache.items:
                    return
            elif cache is None or cache.stale(current, self.refresh_interval):
                if self._held_too_long(lease, held, claimed):
                    return  # no listing while the claims in hand age
                self._listing.add(queue)
                try:
                    items = await self.store.run(self._scan_program(queue))
                finally:
                    self._listing.discard(queue)
                # Stamped when the listing ended: a slow listing must not make the next
                # dequeue list again at once.
                order = self._spread(queue, self._unpicked(items), patient)
                cache = self._cache[queue] = ListingCache(
                    self._now(), order, self._tolerated(items), patient
                )
                refreshed = True
            elif patient and not cache.patient and self.lanes is not None:
                # Ordered for a call that did not wait: what lanes leave to others goes.
                cache.items, cache.patient = self._spread(queue, cache.items, True), True
            # A listing made by this call is trusted for MISSES (they are races under way);
            # one kept from an earlier call for what ``_tolerated`` says.
            while cache.items and cache.misses < (MISSES if refreshed else cache.tolerated):
                if (
                    cache.missed
                    and not refreshed
                    and cache.stale(self._now(), self.refresh_interval)
                ):
                    break  # (a candidate of a listing kept from an earlier call was taken)
                if self._held_too_long(lease, held, claimed):
                    return  # slow requests: start what is in hand, claim more later
                # One slice off the front (a pop(0) a pick moved the rest of a listing of up
                # to 2,048 candidates each time).
                picks = cache.items[: max(0, want - len(claimed))]
                del cache.items[: len(picks)]
                # Noted before the tries: a listing made by another call meanwhile leaves
                # them out (see _unpicked).
                remote = self.store.is_remote
                if remote:
                    self._picked.update((c.key, current) for c in picks)
                try:
                    results = await self._claim_picks(queue, picks, lease, worker)
                except BaseException:
                    if remote:
                        for c in picks:
                            self._picked.pop(c.key, None)
                    raise
                if len(results) < len(picks):
                    # A try failed. Locally it ended the batch: the rest were not tried. (On
                    # an object store the failed ones are dropped from the results and were
                    # forgotten by _claim_picks; locally nothing was noted.)
                    picks = []  # results no longer pair with picks: no lanes hint
                for pick, got in itertools.zip_longest(picks, results):
                    if isinstance(got, Claimed):
                        claimed.append(got)
                        cache.taken, cache.misses = cache.taken + 1, 0
                    elif isinstance(got, Task):
                        log.info("task %s expired before it started", got.id)
                        await self._emit(EventType.EXPIRED, got, attempt=got.attempt)
                    else:  # taken by another consumer, who walks on from there: jump away
                        cache.items = self._spread(queue, cache.items, patient)
                        cache.misses, cache.missed = cache.misses + 1, True
                        if self.lanes is not None and pick is not None:
                            self.lanes.missed(queue, pick, self._now())
                if len(claimed) >= want:
                    return
            if refreshed or queue in self._listing:
                return
            cache = None

    def _unpicked(self, items: list[layout.Candidate]) -> list[layout.Candidate]:
        """``items`` without those this instance tried in the last two ``refresh_interval``s.
        Its claim calls run side by side (the worker's claim loops) and share one listing:
        a listing made while another call's claims are in flight, or before their ready
        copies are deleted (deferred on object stores), shows those tasks again, and each
        such pick costs a read and a refused create. An attempt's key is never claimable
        twice; a try that failed on an error is not counted. Only object stores note tries
        (``_claim_rounds``): a local pick of a task taken meanwhile is one failed system call,
        and a drain on tmpfs noted ~15,000 keys at a time (a sixth of a worker's memory growth
        draining 100,000 tasks, and a dict kept up at every claim)."""
        if not self._picked:  # (always, locally: no copy of a listing of up to 2,048)
            return items
        horizon = self._now() - 2 * self.refresh_interval
        self._picked = {k: at for k, at in self._picked.items() if at > horizon}
        return [c for c in items if c.key not in self._picked]

    def _tolerated(self, items: list[layout.Candidate]) -> int:
        """Misses in a row a listing is trusted for by later calls. On an object store a
        listing of a shallow queue (under half of ``spread`` candidates: every consumer's
        listing shows the same few) goes stale fast; each miss costs a read (and a refused
        create and a read more when the race was lost), a new listing one request: one miss
        and the next call lists again. Over a deep head misses are rare and scattered:
        ``MISSES``."""
        return 1 if self.store.is_remote and len(items) < self.spread // 2 else MISSES

    def _drop_cache_below(self, tasks: list[tuple[Task, bytes]]) -> None:
        """Forget a listing whose candidates rank below a task just enqueued here: this
        instance's next claim then sees it (other producers' are seen at the next listing)."""
        for task, _ in tasks:
            cache = self._cache.get(task.queue)
            rank = int(layout.rank(task.priority)[1:])
            if cache is not None and (not cache.items or rank < cache.items[0].rank):
                del self._cache[task.queue]

    async def _reap_if_due(self, queue: str, current: float) -> set[str]:
        """Reap ``queue`` (with the rest of its group: ``_reap_group``) if its turn has come
        (``_reap_turn``); the storage queues in which tasks were requeued, whose listings
        are dropped."""
        turn, queues = self._reap_group(queue)
        if current - self._reaped.get(turn, 0.0) < self.reap_interval:
            return set()
        if not await self.store.run(self._reap_turn(turn, current)):
            return set()
        requeued: set[str] = set()
        failed: list[Exception] = []
        limiter = anyio.CapacityLimiter(REAP_AT_ONCE)

        async def reap(name: str) -> None:
            async with limiter:
                try:
                    if await self._reap_queue(name):
                        requeued.add(name)
                except Exception as exc:  # the other passes go on; the first error is raised
                    failed.append(exc)

        if self.store.is_remote and len(queues) > 1:
            # A group's passes side by side: one after another, a 16-shard turn held the
            # winner's dequeue 17 request latencies (256 shards: seconds).
            async with anyio.create_task_group() as tg:
                for name in queues:
                    tg.start_soon(reap, name)
        else:
            for name in queues:
                await reap(name)
        for name in requeued:
            self._cache.pop(name, None)
        if failed:
            raise failed[0]
        return requeued

    def _reap_turn(self, turn: str, current: float) -> Program[bool]:
        """Whether this consumer reaps now: one reaper pass per ``reap_interval`` per queue
        (or group of shards), whatever the number of consumers. The pass's start time is kept
        in the ``turn`` key; a consumer that finds it fresh waits for the next interval. Two
        consumers that both find it stale both reap, which is safe (every transition of the
        reaper is an exclusive create); a clock far off makes the time look stale."""
        data = yield read(turn)
        try:
            last = float(data or b"")
        except ValueError:
            last = 0.0
        if 0.0 <= current - last < self.reap_interval:
            self._reaped[turn] = last + random.uniform(0.0, self.reap_interval / 4)
            return False
        yield write(turn, repr(current).encode())
        return True

    async def _claim_picks(
        self, queue: str, picks: list[layout.Candidate], lease: float, worker: str
    ) -> list[Claimed | Task | None]:
        """Claim attempts on ``picks``, in their order. On an object store they run
        concurrently: each is a read and a create, so a batch of n costs two request
        latencies, not 2n. Locally one program runs them (no request latency to overlap).
        Copies spent by earlier claims whose delete was deferred (``flush_early``) are
        deleted beside them, off the path of the tasks claimed then."""
        spent = self.claims.take_spent() if self.claims.flush_early else []
        if (len(picks) == 1 and not spent) or not self.store.is_remote:
            return await self.store.run(self._claim_many_program(queue, picks, lease, worker))
        out: list[Claimed | Task | BaseException | None] = [None] * len(picks)

        async def attempt(i: int, cand: layout.Candidate) -> None:
            try:
                out[i] = await self.store.run(self._claim_program(queue, cand, lease, worker))
            except Exception as exc:
                out[i] = exc

        async with anyio.create_task_group() as tg:
            if spent:
                tg.start_soon(self.store.run, self.claims.delete_spent(spent))
            for i, cand in enumerate(picks):
                tg.start_soon(attempt, i, cand)
        for c, item in zip(picks, out, strict=True):
            if isinstance(item, BaseException):
                self._picked.pop(c.key, None)  # not tried to the end: may be tried again
        got = [item for item in out if not isinstance(item, BaseException)]
        for error in out:
            if isinstance(error, BaseException):
                hand_over_or_raise(queue, got, error)
                break
        return got

    def _claim_many_program(
        self, queue: str, picks: list[layout.Candidate], lease: float, worker: str
    ) -> Program[list[Claimed | Task | None]]:
        out: list[Claimed | Task | None] = []
        for candidate in picks:
            try:
                out.append((yield from self._claim_program(queue, candidate, lease, worker)))
            except Exception as exc:
                hand_over_or_raise(queue, out, exc)
                break
        return out

    def _spread(
        self, queue: str, items: list[layout.Candidate], patient: bool = False
    ) -> list[layout.Candidate]:
        """``items`` in claim order: the first ``spread`` candidates of the top priority
        rotated by a random offset, so that consumers listing the same head start at
        different places and walk it without meeting (a random pick per claim collides more
        as the head is used up), then the rest in order. With a claim lane (``_lanes``) the
        top candidates the lanes give this consumer come first, in the lanes' order; a
        ``patient`` caller (one that waits) takes only those (none: it waits, and lower
        priorities wait for a listing where the top one is gone), another the rest after
        them."""
        if not items:
            return items
        top, window = items[0].rank, min(self.spread, len(items))
        same = next((i for i in range(1, window) if items[i].rank != top), window)
        head, rest = items[:same], items[same:]
        given = None if self.lanes is None else self.lanes.pick(queue, head, self._now())
        if given is None:
            given = []
        elif patient:
            return given
        else:
            chosen = {c.key for c in given}
            head = [c for c in head if c.key not in chosen]
        if head:
            start = random.randrange(len(head))
            head = head[start:] + head[:start]
        return given + head + rest

    def _scan_program(self, queue: str) -> Program[list[layout.Candidate]]:
        # Copies spent here whose delete was deferred are listed again; the claims' filter
        # drops them and deletes them with its own (S3, Azure: in one request). The listing asks
        # for that many more names; when they would be most of it, they go first.
        spent = self.claims.pending
        if spent > self.batch // 2:
            yield from self.claims.flush()
            spent = 0
        want = self.batch + spent
        began = Bells.clock()  # (for bells) before the first listing request
        found: list[layout.Candidate] = []
        # The head over the priority directories, top priority first: one flat listing on an
        # object store (a listing of the directories and one of the first were two).
        for entry in (yield listtree(f"{queue}/ready", want)):
            rank_dir, _, name = entry.partition("/")
            candidate = layout.ready_candidate(queue, rank_dir, name)
            if candidate is not None:
                found.append(candidate)
        current_ms = (yield now()) * 1000
        later: float | None = None  # the first marker not due yet
        for name in (yield listhead(f"{queue}/due", want)):
            candidate = layout.due_candidate(queue, name)
            if candidate is None:
                continue
            if candidate.time_ms > current_ms:
                later = candidate.time_ms / 1000
                break
            found.append(candidate)
        if self.bells is not None:  # empty: not even a spent copy the claims filter would drop
            self.bells.listed(queue, began, not found, later)
        found.sort()
        return (yield from self.claims.filter(queue, found[:want]))[: self.batch]

    def _claim_program(
        self, queue: str, cand: layout.Candidate, lease: float, worker: str
    ) -> Program[Claimed | Task | None]:
        body = yield read(cand.key)
        if body is None:  # claimed by someone else meanwhile, or a marker without its body
            if cand.marker:
                yield from self._unbodied_marker(queue, cand)
            return None
        try:
            task = codec.decode(body, Task)
            if task.id != cand.task_id or task.attempt != cand.attempt or task.queue != queue:
                raise SerializationError("document does not match its file name")
        except SerializationError as exc:
            if codec.is_newer_schema(body):
                log.warning(
                    "%s was written by a newer OmniQ; left for an upgraded worker", cand.key
                )
                return None
            yield from self._quarantine(cand.key, body, exc)
            if cand.marker:
                yield delete(cand.marker)
            return None
        current = yield now()
        if task.is_expired(from_epoch(current)):
            won = yield create(
                layout.run_key(queue, task.id, cand.attempt), layout.tombstone(layout.EXPIRED)
            )
            yield from self.claims.spend(cand)
            if won:
                self._ended(queue, task.id, layout.EXPIRED)
            return task if won else None
        return (yield from self.claims.claim(cand, task, current, lease, worker))

    def _unbodied_marker(self, queue: str, cand: layout.Candidate) -> Program[None]:
        """A due marker whose body is missing: its attempt was claimed (the claimer died
        before removing the marker) -- remove it; else the body may still be on its way
        (bodies are written first, but a retried PUT can be slow): leave it until it is
        ``tombstone_ttl`` past due, then remove it as orphaned."""
        assert cand.marker is not None
        current = yield now()
        claimed = yield exists(layout.run_key(queue, cand.task_id, cand.attempt))
        if claimed or current * 1000 > cand.time_ms + self.tombstone_ttl * 1000:
            if not claimed:
                log.warning("removing orphaned due marker %s (no body)", cand.marker)
            yield delete(cand.marker)


def hand_over_or_raise(queue: str, got: list[Any], error: BaseException) -> None:
    """A batch claim that failed part-way: raise ``error`` if nothing was claimed, else log
    it and let the caller hand over what was claimed rather than strand it until its lease
    ends."""
    if not any(isinstance(item, Claimed) for item in got):
        raise error
    log.warning(
        "claiming from %s stopped after an error: %s: %s", queue, type(error).__name__, error
    )
