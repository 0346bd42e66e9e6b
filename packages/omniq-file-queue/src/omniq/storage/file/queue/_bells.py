"""Bells: an idle consumer reads one small object instead of listing every storage queue.

An idle consumer of an object store looks at its queues every ``max_poll_interval`` at most,
and a look lists each storage queue (its rank directories and ``due/``; a sharded queue has
``n + 1`` storage queues): ~100 listing requests a minute unsharded, ~1,700 with 16 shards.
With bells, whatever makes a task ready or delayed (``_enqueue_program``: enqueue, retry,
requeue, a reaper's take-over, a released dependent, ``repair``) writes
``{name}/bell/rung`` after the task (``name``: the storage queue's, a shard's being its
queue's: ``bell_name``), with a value never written before; a producer rings a name at most
once a ``THROTTLE``. A consumer idle for a few looks reads the bells of its queues (one GET
each) and lists a storage queue only when ``quiet`` cannot tell that nothing claimable was
added since a listing found nothing there (no ready copy, not even one a claim has spent,
and no due marker).

Why a skipped listing misses nothing. Say a consumer reads value ``V`` at a bell, heard first
at ``heard`` (monotonic, after the read that returned it), and its last listing of storage
queue ``q`` that found nothing started at ``empty >= heard + THROTTLE``. Take a
task ``X`` written to ``q`` by a producer that rang this bell after it, or skipped the ring
because its own previous ring began less than ``THROTTLE`` before ``X`` was written. That
ring -- after ``X``, or began before ``X`` -- landed before the read, else the bell would no
longer hold ``V`` (values are never reused), and no later than ``heard``; so ``X`` was
written before ``heard + THROTTLE <= empty`` (durations on the producer's and the
consumer's monotonic clocks: no clock skew is involved; the same constant on both sides, not
a setting one side could change), the empty listing would have shown it, so it had been
claimed (its ready copy deleted; a copy whose delete a claim deferred counts as something,
so a listing cut to ``batch`` spent copies is never taken for empty). A ring that lands
after the read changes the bell, and the next read lists again. A consumer holding claims
whose landing it does not know yet (``unsettled``) lists as without bells. What no ring
announces is looked at without one: a delayed task's due time (the listing that found ``q``
empty noted its earliest future marker), a lease that ends (the reaper keeps its own turns),
and a task written by a producer without bells or that crashed before ringing: every storage
queue is listed at least once a ``fallback``.

Correctness of the queue does not depend on bells: they only decide when to list. A failed
read of a bell lists everything; a failed ring is logged (a warning, the first time per bell)
and its tasks wait for the next ring or the ``fallback`` listing at most. ``time.monotonic``
stops while a machine sleeps: a producer resumed within ``THROTTLE`` of a ring may skip one
it owes, which the ``fallback`` covers.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable

from omniq.core.errors import StorageError
from omniq.core.fs import Program, read_many, write

from . import _layout as layout
from ._shards import parse_shard

log = logging.getLogger("omniq.queue")

THROTTLE = 1.0  # seconds: a producer rings one bell at most this often (part of the protocol)


def bell_name(queue: str) -> str:
    """The bell a storage queue rings and is heard by: a shard's is its queue's (by the name
    alone, whatever the shard settings of the process: producers, tools and consumers agree)."""
    shard = parse_shard(queue)
    return queue if shard is None else shard[0]


class Bells:
    """One queue object's bells: the rings it made and the bells and listings it has seen.
    ``fallback``: the longest a storage queue goes unlisted by an idle consumer (the queue
    gives sixty ``refresh_interval``s)."""

    def __init__(self, fallback: float) -> None:
        self.fallback = fallback
        self._rung: dict[str, float] = {}  # name -> when this object's last ring of it began
        self._heard: dict[str, tuple[bytes | None, float]] = {}  # name -> value, first heard
        self._empty: dict[str, float] = {}  # storage queue -> start of its last empty listing
        self._due: dict[str, float] = {}  # storage queue -> its next due marker's time (epoch)
        self._warned: set[str] = set()  # bells whose failed ring was logged as a warning

    @staticmethod
    def clock() -> float:
        """The clock of rings, bells heard and listings begun (monotonic: durations only)."""
        return time.monotonic()

    def ring(self, queues: Iterable[str]) -> Program[None]:
        """Ring the bells of storage queues ``queues`` (after their tasks were written), each
        at most once a ``THROTTLE``. Never raises: a failed ring leaves its tasks (and those
        written meanwhile without a ring of their own) to the next ring, or the ``fallback``."""
        for name in sorted({bell_name(q) for q in queues}):
            began = self.clock()
            last = self._rung.get(name)
            if last is not None and 0.0 <= began - last < THROTTLE:
                continue  # the ring that began at ``last`` covers it (module docstring)
            self._rung[name] = began
            landed = False
            try:
                yield write(layout.bell_key(name), f"{time.time_ns()} {uuid.uuid4().hex}".encode())
                landed = True
            except StorageError as exc:
                level = logging.DEBUG if name in self._warned else logging.WARNING
                self._warned.add(name)
                log.log(level, "could not ring the bell of %s (idle consumers find its new "
                        "tasks within a minute): %s", name, exc)  # fmt: skip
            finally:  # (also when cancelled) the next enqueue rings again
                if not landed and self._rung.get(name) == began:
                    del self._rung[name]

    def listen(self, queues: list[str]) -> Program[None]:
        """Read the bells of storage queues ``queues``; a value not heard before is heard now."""
        names = sorted({bell_name(q) for q in queues})
        keys = {name: layout.bell_key(name) for name in names}
        try:
            values = yield read_many(keys.values())
        except StorageError as exc:
            for name in names:
                self._heard.pop(name, None)  # unknown: every queue of it is listed
            log.debug("could not read the bells of %s: %s", names, exc)
            return
        heard = self.clock()
        for name, key in keys.items():
            value = values.get(key)
            known = self._heard.get(name)
            if known is None or known[0] != value:
                self._heard[name] = (value, heard)

    def listed(self, queue: str, began: float, empty: bool, due: float | None) -> None:
        """A listing of storage queue ``queue`` began at ``began`` (monotonic) and found no
        ready task or due marker at all (``empty``: not even a copy a claim has spent), or
        something; ``due``: its earliest marker not due yet (epoch; None: none)."""
        if empty:
            self._empty[queue] = max(began, self._empty.get(queue, began))
        else:
            self._empty.pop(queue, None)
        if due is None:
            self._due.pop(queue, None)
        else:
            self._due[queue] = due

    def quiet(self, queue: str, current: float) -> bool:
        """Whether storage queue ``queue`` needs no listing now (``current``: the epoch time
        due markers are compared with)."""
        known, empty = self._heard.get(bell_name(queue)), self._empty.get(queue)
        if known is None or empty is None or empty < known[1] + THROTTLE:
            return False
        if self.clock() - empty >= self.fallback:
            return False
        due = self._due.get(queue)
        return due is None or due > current
