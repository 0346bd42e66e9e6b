"""Bells: an idle consumer reads one small object instead of listing every storage queue.

An idle consumer of an object store looks at its queues every ``max_poll_interval`` at most,
and a look lists each storage queue (its rank directories and ``due/``; a sharded queue has
``n + 1`` storage queues): ~100 listing requests a minute unsharded, ~1,700 with 16 shards.
With bells, whatever makes a task ready or delayed (``_enqueue_program``: enqueue, retry,
requeue, a reaper's take-over, a released dependent) writes ``{name}/bell/rung`` (``name``:
the queue as consumers name it, a sharded queue's own name) after the task, with a value
never written before; a producer rings a name at most once a ``THROTTLE``. An idle
consumer reads the bells of its names (one GET each) and lists a storage queue only when
``quiet`` cannot tell that nothing claimable was added since it last found it empty.

Why a skipped listing misses nothing. Say a consumer reads value ``V`` at a bell, heard first
at ``heard`` (monotonic, after the read that returned it), and its last listing of storage
queue ``q`` that found nothing claimable started at ``empty >= heard + THROTTLE``. Take a
task ``X`` written to ``q`` by a producer that rang this bell after it, or skipped the ring
because its own previous ring began less than ``THROTTLE`` before ``X`` was written. That
ring -- after ``X``, or began before ``X`` -- landed before the read, else the bell would no
longer hold ``V`` (values are never reused), and no later than ``heard``; so ``X`` was
written before ``heard + THROTTLE <= empty`` (durations on the producer's and the
consumer's monotonic clocks: no clock skew is involved; the same constant on both sides, not
a setting one side could change), the empty listing would have shown it, and it had been
claimed. A ring that lands after the read changes the bell, and the next
read lists again. What no ring announces is looked at without one: a delayed task's due
time (the listing that found ``q`` empty noted its earliest future marker), a lease that
ends (the reaper keeps its own turns), and a task written by a producer without bells or
that crashed before ringing: every storage queue is listed at least once a ``fallback``.

Correctness of the queue does not depend on bells: they only decide when to list. A failed
read of a bell lists everything; a failed ring is logged, and its tasks wait for the
``fallback`` listing at most.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable

from omniq.core.errors import StorageError
from omniq.core.fs import Program, read_many, write

from . import _layout as layout

log = logging.getLogger("omniq.queue")

THROTTLE = 1.0  # seconds: a producer rings one bell at most this often (part of the protocol)


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

    def ring(self, names: Iterable[str]) -> Program[None]:
        """Ring the bells of ``names`` (after their tasks were written), each at most once a
        ``THROTTLE``. Never raises: a failed ring leaves its tasks to the ``fallback``."""
        for name in sorted(set(names)):
            began = time.monotonic()
            last = self._rung.get(name)
            if last is not None and 0.0 <= began - last < THROTTLE:
                continue  # the ring that began at ``last`` covers it (module docstring)
            self._rung[name] = began
            try:
                yield write(layout.bell_key(name), f"{time.time_ns()} {uuid.uuid4().hex}".encode())
            except StorageError as exc:
                if self._rung.get(name) == began:
                    del self._rung[name]  # the next enqueue rings again
                log.debug("could not ring the bell of %s: %s", name, exc)

    def listen(self, names: list[str]) -> Program[None]:
        """Read the bells of ``names``; a value not heard before is heard now."""
        keys = {name: layout.bell_key(name) for name in names}
        try:
            values = yield read_many(keys.values())
        except StorageError as exc:
            for name in names:
                self._heard.pop(name, None)  # unknown: every queue of it is listed
            log.debug("could not read the bells of %s: %s", names, exc)
            return
        heard = time.monotonic()
        for name, key in keys.items():
            value = values.get(key)
            known = self._heard.get(name)
            if known is None or known[0] != value:
                self._heard[name] = (value, heard)

    def listed(self, queue: str, began: float, empty: bool) -> None:
        """A listing of storage queue ``queue`` began at ``began`` (monotonic) and found
        nothing claimable (``empty``) or something."""
        if empty:
            self._empty[queue] = max(began, self._empty.get(queue, began))
        else:
            self._empty.pop(queue, None)

    def due_at(self, queue: str, at: float | None) -> None:
        """The earliest due marker of ``queue`` not yet due when it was listed (None: none)."""
        if at is None:
            self._due.pop(queue, None)
        else:
            self._due[queue] = at

    def quiet(self, name: str, queue: str, current: float) -> bool:
        """Whether storage queue ``queue`` of ``name`` needs no listing now (``current``: the
        epoch time due markers are compared with)."""
        known, empty = self._heard.get(name), self._empty.get(queue)
        if known is None or empty is None or empty < known[1] + THROTTLE:
            return False
        if time.monotonic() - empty >= self.fallback:
            return False
        due = self._due.get(queue)
        return due is None or due > current
