"""Claim lanes: busy consumers of one queue claim different tasks.

Many consumers listing one shallow queue see the same few candidates, and most of their
claim attempts meet a task another consumer has just taken: each such miss costs a read (and
a refused create and a delete when the race was lost), and soon a listing more. 16 workers
on a GCS queue kept 100 deep sent ~12 requests a task instead of ~5 (docs/queue.md, "Many
consumers of one queue").

A consumer that claimed from a queue in the last ``period`` is *busy* there and says so with an
empty object ``{queue}/lanes/{time}.{consumer}``, written again under a new time every
``period`` (the old one deleted), and withdrawn at its first claim call after ``period``
without a claim there, or when it closes. It lists ``lanes/`` ``ripe`` x 1, 2, 4, ... seconds
apart up to ``period`` (from ``ripe`` again after a look that changed its lane), and ``ripe``
seconds after it found a task of its own lane not yet overdue taken by another consumer (one
that may see another list); a listing in hand is put in the new lane's order at once
(``_claim_from``). The busy consumers get the same sorted list of names; consumer ``i`` of
``k`` owns the tasks whose id hashes to ``i`` modulo ``k``.

What a consumer claims from a listing's top priority (``pick``; the queue's ``_spread``): its
own lane's tasks, then the others' ``OVERDUE`` x ``ripe`` seconds old (their owner is slow or
gone, or the queue has a backlog); when its lane has none, the others' ``ripe`` seconds old (by
the time in the id, or the due time). The others' come lane by lane, the next lane's first,
each from a random place (the owner takes its own from the oldest), so that hungry consumers
rarely reach for the same task. A call that waits stops there: hungry consumers list again for
tasks of their own instead of racing the owners for theirs. A call that does not wait goes on
with the rest of the listing, so it never comes back empty-handed while a task is listed.

Correctness: lanes only choose among the candidates of a listing. A claim is still the
exclusive create of its attempt (``_claim_*``), so lanes cannot cause a second run. No task
waits on its owner for more than ``OVERDUE`` x ``ripe`` seconds (at once if its id carries
no time): a task whose owner died, stalls, or sees another list of consumers (one joined
since it looked) is claimed by the others then. Entries older than ``LIVE`` periods (plus
the tolerated clock skew) are not counted, so a dead owner's lane is handed over; the
consumer of lane 0 (or one alone) removes a few entries older than ``FORGOTTEN`` periods once a
period (every consumer doing so cost 16 workers a listing each a period for nothing). A producer
whose clock runs ahead makes its tasks ripen later for non-owners only; their owner takes
them at once.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import random
import uuid

from omniq.core.errors import StorageError
from omniq.core.fs import Program, delete, listafter, listhead, write

from . import _layout as layout

log = logging.getLogger("omniq.queue")

LIVE, FORGOTTEN = 3, 10  # periods after which an entry is not counted, and is deleted
OVERDUE = 10  # times ``ripe``: another's task this old is claimed even with tasks of one's own
_MOST = 1000  # live entries read from one listing (one LIST on S3)
_TIDY = 10  # the oldest entries looked at (and removed if forgotten) once a period


def lane_of(task_id: str, count: int) -> int:
    """The lane of ``task_id`` among ``count``. Not the shard hash (CRC-32, see ``_shards``):
    within one shard every id has the same CRC residue, which would leave lanes empty."""
    return _hash(task_id) % count


@functools.lru_cache(maxsize=4096)
def _hash(task_id: str) -> int:
    # Cached: after every miss ``pick`` orders a listing's head again (up to 1,000 ids).
    return int.from_bytes(hashlib.blake2b(task_id.encode(), digest_size=8).digest(), "big")


class Lanes:
    """This consumer's presence in the lanes of the queues it claims from, and its lane."""

    def __init__(self, period: float, ripe: float, clock_skew: float) -> None:
        self.id = uuid.uuid4().hex[:16]
        self.period = period
        self.ripe = ripe
        self.clock_skew = clock_skew
        self._claimed: dict[str, float] = {}  # queue -> when this consumer last claimed
        self._entry: dict[str, str] = {}  # queue -> this consumer's entry
        self._looked: dict[str, float] = {}  # queue -> when lanes/ was last listed
        self._written: dict[str, float] = {}  # queue -> when its entry was written
        self._looks: dict[str, int] = {}  # queue -> listings since it became busy
        self._lane: dict[str, tuple[int, int]] = {}  # queue -> (own lane, lanes)
        self._missed: set[str] = set()  # queues where a task was found taken since the look

    def claimed(self, queue: str, current: float) -> None:
        self._claimed[queue] = current

    def missed(self, queue: str, cand: layout.Candidate, current: float) -> None:
        """``cand`` was found taken by another consumer: if it is of this consumer's lane and
        not yet overdue, maybe by one that sees another list of consumers (see ``due``). An
        overdue task is anyone's (``pick``; one whose id carries no time at once): in a
        backlog the next lane's consumer helps with this one's, and a look after each such
        miss cost 16 workers on S3 ~0.1 requests a task more."""
        lane = self._lane.get(queue)
        overdue = (current - OVERDUE * self.ripe) * 1000
        if lane is None or cand.time_ms <= overdue:
            return
        if lane_of(cand.task_id, lane[1]) == lane[0]:
            self._missed.add(queue)

    def busy(self, queue: str, current: float) -> bool:
        return current - self._claimed.get(queue, float("-inf")) < self.period

    def due(self, queue: str, current: float) -> bool:
        """Whether to look at ``queue``'s lanes now: a busy consumer at once when it has no
        entry, then ``ripe`` x 1, 2, 4, ... seconds apart up to ``period`` (again from 1 after
        a look that changed its lane), and ``ripe`` seconds after a look when a task of its
        lane was found taken since (consumers started together see each other within a
        second or two); an idle one to withdraw its entry."""
        if not self.busy(queue, current):
            return queue in self._entry
        since = current - self._looked.get(queue, float("-inf"))
        looks = self._looks.get(queue, 0)
        if queue not in self._entry or queue in self._missed or not looks:
            return since >= self.ripe  # (after a failed look: not before a second)
        return since >= min(self.period, self.ripe * 2.0 ** min(looks - 1, 16))

    def lane(self, queue: str) -> tuple[int, int] | None:
        """(own lane, lanes) of ``queue``, or None: not busy there, or alone."""
        return self._lane.get(queue)

    def look(self, queue: str, current: float) -> Program[None]:
        """Write this consumer's entry if it has none or it is ``period`` old (withdraw it
        when idle), list the others, take the lane."""
        busy = self.busy(queue, current)
        self._missed.discard(queue)
        self._looked[queue] = current  # before any request: a failed look waits its turn too
        old = self._entry.get(queue)
        if not busy:
            self._entry.pop(queue, None)
            self._lane.pop(queue, None)
            self._looks.pop(queue, None)
            yield from _forget([old] if old else [])
            return
        wrote = old is None or current - self._written[queue] >= self.period
        if wrote:
            entry = layout.lane_key(queue, int(current), self.id)
            yield write(entry, b"")  # the new one first: the consumer is never unlisted
            self._entry[queue], self._written[queue] = entry, current
            if old is not None and old != entry:
                yield from _forget([old])
        # From the oldest live time on (names begin with it): entries of the dead are not
        # listed again and again, however many there are.
        oldest = current - LIVE * self.period - self.clock_skew
        live = {self.id}
        for name in (yield listafter(layout.lanes_dir(queue), layout.lane_key_time(oldest), _MOST)):
            parsed = layout.parse_lane_entry(name)
            if parsed is not None and parsed[0] <= current + self.clock_skew:
                live.add(parsed[1])  # (one further ahead than the tolerated skew: not counted)
        ids = sorted(live)
        lane = (ids.index(self.id), len(ids)) if len(ids) > 1 else None
        changed = lane != self._lane.get(queue)
        if lane is not None:
            self._lane[queue] = lane
        else:
            self._lane.pop(queue, None)
        # A changed lane starts the pace again: the others may not have looked yet (consumers
        # started together saw 5, 11, 15, then 16 lanes, each view held up to ``period``).
        self._looks[queue] = 1 if changed else self._looks.get(queue, 0) + 1
        if wrote and (lane is None or lane[0] == 0):  # once a period, by one consumer: a
            # few of the dead's entries removed (anyone may; a wrong view skips a period)
            forgotten = current - FORGOTTEN * self.period - self.clock_skew
            gone = []
            for name in (yield listhead(layout.lanes_dir(queue), _TIDY)):
                parsed = layout.parse_lane_entry(name)
                if parsed is not None and parsed[0] < forgotten:
                    gone.append(f"{layout.lanes_dir(queue)}/{name}")
            yield from _forget(gone)

    def withdraw(self) -> Program[None]:
        """Delete this consumer's entries (at ``close``)."""
        entries = list(self._entry.values())
        self._entry.clear()
        self._lane.clear()
        yield from _forget(entries)

    def pick(
        self, queue: str, items: list[layout.Candidate], current: float
    ) -> list[layout.Candidate] | None:
        """The ``items`` worth this consumer's claims, in claim order: those of its own lane
        (in their order), then the others' ``OVERDUE`` x ``ripe`` seconds old; when its lane
        has none, the others' ``ripe`` seconds old. The others' come by lane, the next one
        first (consumer ``i`` helps ``i + 1`` first), each from a random place
        (``_from_anywhere``): consumers that run out of their own tasks, or work through a
        backlog where all are overdue, rarely reach for the same one. None without a
        lane."""
        lane = self._lane.get(queue)
        if lane is None:
            return None
        own, count = lane
        ripe = (current - self.ripe) * 1000  # ids and due times are in milliseconds
        mine: list[layout.Candidate] = []
        others: list[tuple[int, layout.Candidate]] = []
        for c in items:
            at = lane_of(c.task_id, count)
            if at == own:
                mine.append(c)
            elif c.time_ms <= ripe:
                others.append(((at - own) % count, c))
        if mine:
            overdue = (current - OVERDUE * self.ripe) * 1000
            others = [(at, c) for at, c in others if c.time_ms <= overdue]
        return mine + _from_anywhere(others)


def _from_anywhere(others: list[tuple[int, layout.Candidate]]) -> list[layout.Candidate]:
    """Others' candidates lane by lane, the next lane first, each lane's rotated by a random
    offset: its owner walks it from its oldest, and a helper that did too met the owner's
    claims first (16 workers on a deep S3 queue: ~0.25 lost claim races a task)."""
    by_lane: dict[int, list[layout.Candidate]] = {}
    for at, c in others:
        by_lane.setdefault(at, []).append(c)
    out: list[layout.Candidate] = []
    for at in sorted(by_lane):
        lane = by_lane[at]
        start = random.randrange(len(lane))
        out += lane[start:] + lane[:start]
    return out


def _forget(keys: list[str]) -> Program[None]:
    """Best effort: an entry left behind stops counting after ``LIVE`` periods."""
    for key in keys:
        try:
            yield delete(key)
        except StorageError as exc:
            log.debug("could not remove lane entry %s: %s", key, exc)
