"""Key layout of one queue under ``base_dir``, and the records of an attempt.

::

    {queue}/ready/p{rank:04d}/{id}.{n}.json      ready task, attempt n; rank 0 = priority 999
    {queue}/sched/{id}.{n}.json                  delayed or retrying task (written first)
    {queue}/due/{eta_ms:013d}.{rank:04d}.{id}.{n}  empty marker that makes it due (written second)
    {queue}/run/{id}.{n}.json                    claim of attempt n (exclusive create; locally
                                                 the ready file itself, taken by hard link);
                                                 ``cancelled``/``expired`` when ended unclaimed
    {queue}/run/{id}.{n}.{j}                     lease epoch j >= 1 (heartbeat, or a reaper's
                                                 fence), exclusive create
    {queue}/run/{id}.{n}.x                       the attempt's one outcome, exclusive create
    {queue}/run/{id}.{n}.r                       a dead letter of attempt n requeued (once)
    {queue}/run/{id}.{n}.i                       intent: an outcome that makes attempt n+1
                                                 (or the dead letter) is being written
    {queue}/run/{id}.{n}.q                       intent: a requeue of the dead letter of n
    {queue}/dead/{id}.json                       dead-lettered task with its last error
    {queue}/cancel/{id}.{n}                      cancel request for running attempt n
    {queue}/quarantine/{area}.{name}.{time}      unreadable files, moved aside
    {queue}/reaper/last                          when the last reaper pass began (cadence)
    {queue}/reaper/shards{n:03d}                 when the last pass over all n shards of the
                                                 sharded queue and the queue itself began
    {queue}/lanes/{time:010d}.{consumer}         empty: a consumer busy claiming (_lanes)
    {queue}/bell/rung                            a producer's nonce: tasks were added (_bells)
    {queue}/wait/{id}.json                       task waiting for its dependencies
    {queue}/deps/{dep}/{id}                      link: waiting task {id} (its queue inside)
                                                 depends on {dep} of this queue
    {queue}/met/{id}/{dep}                       dependency {dep} of waiting {id} has ended
    {queue}/run/{id}.0.x                         the wait's one outcome: released (attempt 1
                                                 follows) or cancelled; ``.0.i`` its intent

Every transition of an attempt is the exclusive create of one of its ``run/`` names; the
design and each store's argument are in docs/design.md ("The attempt protocol").
"""

from __future__ import annotations

import functools
import uuid
from typing import Any, NamedTuple

import msgspec

from omniq.core import codec
from omniq.core.errors import SerializationError
from omniq.core.models import MAX_PRIORITY, Claimed, Progress, Task, from_epoch

TOMBSTONE_MAX = 16
"""A claim file this small ended its attempt unclaimed (``cancelled``, ``expired``)."""

CANCELLED, EXPIRED = "cancelled", "expired"


def tombstone(state: str) -> bytes:
    """A claim that ends its attempt unclaimed: the state and a nonce (so that an "exists"
    answer can tell this call's write from another's), at most ``TOMBSTONE_MAX`` bytes."""
    return f"{state} {uuid.uuid4().hex}".encode()[:TOMBSTONE_MAX]


def tombstone_state(data: bytes) -> str | None:
    """``cancelled`` or ``expired`` if ``data`` is such a claim, else None."""
    if len(data) > TOMBSTONE_MAX:
        return None
    state = data.split(b" ", 1)[0].decode(errors="replace")
    return state if state in (CANCELLED, EXPIRED) else None


class State:
    """What a record says. Outcomes end an attempt; ``SPAWNING`` ones made attempt n+1."""

    LEASE = "lease"  # a heartbeat's epoch
    INTENT = "intent"  # a decision with a follow-up is being written
    FENCE = "fence"  # a reaper's epoch: no heartbeat may follow
    DONE, RETRIED, DEAD = "done", "retried", "dead"
    RELEASED, CANCELLED, LOST, REQUEUED = "released", "cancelled", "lost", "requeued"

    SPAWNING = frozenset((RETRIED, RELEASED, LOST, REQUEUED))


class Record(msgspec.Struct, kw_only=True, omit_defaults=True):
    """An epoch, outcome or requeue record of one attempt (small JSON, readable with cat).

    ``nonce`` makes every record's bytes unique, so a create answered "exists" can tell its
    own write (a lost response retried) from another writer's. ``next`` is what the record's
    writer must create after winning: attempt n+1 (spawning states) or the dead letter; a
    repair pass redoes it if the writer died first. A lease epoch may carry the task's
    ``progress`` and ``meta`` (its task context): every later epoch repeats them, so the
    newest epoch holds the latest."""

    state: str
    nonce: str
    at: float
    lease_until: float | None = None
    worker: str | None = None
    next: Task | None = None
    progress: Progress | None = None  # a lease epoch: what the task last reported
    meta: dict[str, Any] | None = None  # a lease epoch: the task's metadata (ctx.update)
    reason: str | None = None  # a wait cancelled: the dependency that failed, and how


def record(state: str, at: float, **fields: Any) -> bytes:
    return encode_record(Record(state=state, nonce="", at=at, **fields))


def encode_record(rec: Record) -> bytes:
    """The record's bytes, with a fresh nonce."""
    return msgspec.json.encode(msgspec.structs.replace(rec, nonce=uuid.uuid4().hex[:16]))


def parse_record(data: bytes) -> Record | None:
    try:
        return msgspec.json.decode(data, type=Record)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def parse_outcome(data: bytes) -> Record | None:
    """An outcome record. Locally ``done`` is the claim file itself linked to the outcome
    name (no file is created to ack): a claim document or task there reads as ``done``."""
    rec = parse_record(data)
    if rec is not None:
        return rec
    for kind in (Claimed, Task):
        try:
            codec.decode(data, kind)
        except SerializationError:
            continue
        return Record(state=State.DONE, nonce="", at=0.0)
    return None


_CROCKFORD = {c: i for i, c in enumerate("0123456789ABCDEFGHJKMNPQRSTVWXYZ")}


def rank(priority: int) -> str:
    return f"p{MAX_PRIORITY - priority:04d}"


def ready_key(queue: str, priority: int, task_id: str, attempt: int) -> str:
    return f"{queue}/ready/{rank(priority)}/{task_id}.{attempt}.json"


def sched_key(queue: str, task_id: str, attempt: int) -> str:
    return f"{queue}/sched/{task_id}.{attempt}.json"


def due_key(queue: str, eta_ms: int, priority: int, task_id: str, attempt: int) -> str:
    return f"{queue}/due/{eta_ms:013d}.{MAX_PRIORITY - priority:04d}.{task_id}.{attempt}"


def reaper_key(queue: str) -> str:
    return f"{queue}/reaper/last"


def reaper_shards_key(queue: str, shards: int) -> str:
    return f"{queue}/reaper/shards{shards:03d}"


def bell_key(queue: str) -> str:
    return f"{queue}/bell/rung"


def lanes_dir(queue: str) -> str:
    return f"{queue}/lanes"


def lane_key(queue: str, stamp: int, consumer: str) -> str:
    return f"{queue}/lanes/{lane_key_time(stamp)}.{consumer}"


def lane_key_time(stamp: float) -> str:
    """The time part of a lane entry's name (whole seconds: names sort by it)."""
    return f"{max(0, int(stamp)):010d}"


def parse_lane_entry(name: str) -> tuple[int, str] | None:
    """(time, consumer) of a lane entry's name; None if it is not one."""
    stamp, _, consumer = name.partition(".")
    if len(stamp) != 10 or not (stamp.isascii() and stamp.isdigit()) or not consumer:
        return None
    return int(stamp), consumer


def run_key(queue: str, task_id: str, attempt: int) -> str:
    return f"{queue}/run/{task_id}.{attempt}.json"


def epoch_key(queue: str, task_id: str, attempt: int, epoch: int) -> str:
    return f"{queue}/run/{task_id}.{attempt}.{epoch}"


def outcome_key(queue: str, task_id: str, attempt: int) -> str:
    return f"{queue}/run/{task_id}.{attempt}.x"


def requeue_key(queue: str, task_id: str, attempt: int) -> str:
    return f"{queue}/run/{task_id}.{attempt}.r"


def intent_key(queue: str, task_id: str, attempt: int, requeue: bool = False) -> str:
    """The intent of attempt n's outcome, or (``requeue``) of the requeue of its dead letter."""
    return f"{queue}/run/{task_id}.{attempt}.{'q' if requeue else 'i'}"


def wait_key(queue: str, task_id: str) -> str:
    return f"{queue}/wait/{task_id}.json"


def link_key(queue: str, dep: str, task_id: str) -> str:
    """The link by which dependency ``dep`` (of ``queue``) finds its dependent ``task_id``."""
    return f"{queue}/deps/{dep}/{task_id}"


def met_key(queue: str, task_id: str, dep: str) -> str:
    """Dependency ``dep`` of the waiting ``task_id`` (of ``queue``) has ended."""
    return f"{queue}/met/{task_id}/{dep}"


def dead_key(queue: str, task_id: str) -> str:
    return f"{queue}/dead/{task_id}.json"


def cancel_key(queue: str, task_id: str, attempt: int) -> str:
    return f"{queue}/cancel/{task_id}.{attempt}"


class RunName(NamedTuple):
    """A parsed ``run/`` name: attempt ``(task_id, attempt)`` and which record (``"json"``
    for the claim, ``"x"``, ``"r"``, ``"i"``, ``"q"``, or the epoch number as digits)."""

    task_id: str
    attempt: int
    part: str


def parse_run_name(name: str) -> RunName | None:
    stem, _, part = name.rpartition(".")
    if part != "json" and part not in ("x", "r", "i", "q") and not part.isdigit():
        return None
    parsed = split_id_attempt(stem)
    return None if parsed is None else RunName(parsed[0], parsed[1], part)


class Candidate(NamedTuple):
    """A claimable entry found by a listing, ordered by (rank, time, id)."""

    rank: int
    time_ms: int
    task_id: str
    attempt: int
    key: str  # the entry holding the body
    marker: str | None  # due marker to remove with it (scheduled tasks)


def split_id_attempt(stem: str) -> tuple[str, int] | None:
    """``"ID.3"`` -> ("ID", 3); None if malformed."""
    task_id, _, attempt = stem.rpartition(".")
    if not task_id or not attempt.isdigit():
        return None
    return task_id, int(attempt)


def id_time_ms(task_id: str) -> int:
    """Creation time carried by an OmniQ id (0 for ids supplied by users)."""
    return _head_ms(task_id[:10]) if len(task_id) == 26 else 0


@functools.lru_cache(maxsize=1024)
def _head_ms(head: str) -> int:
    # Ids made together share their first ten characters (their millisecond): a listing of
    # 2,000 ids enqueued in a loop held three, decoded 0.86 -> 0.18 us an id.
    value = 0
    for char in head:
        digit = _CROCKFORD.get(char)
        if digit is None:
            return 0
        value = value * 32 + digit
    return value


def ready_candidate(queue: str, rank_dir: str, name: str) -> Candidate | None:
    if not name.endswith(".json") or not rank_dir[1:].isdigit():
        return None
    parsed = split_id_attempt(name[:-5])
    if parsed is None:
        return None
    task_id, attempt = parsed
    return Candidate(
        int(rank_dir[1:]),
        id_time_ms(task_id),
        task_id,
        attempt,
        f"{queue}/ready/{rank_dir}/{name}",
        None,
    )


def due_candidate(queue: str, name: str) -> Candidate | None:
    eta, _, rest = name.partition(".")
    rank_text, _, stem = rest.partition(".")
    parsed = split_id_attempt(stem)
    if parsed is None or not eta.isdigit() or not rank_text.isdigit():
        return None
    task_id, attempt = parsed
    return Candidate(
        int(rank_text),
        int(eta),
        task_id,
        attempt,
        sched_key(queue, task_id, attempt),
        f"{queue}/due/{name}",
    )


def as_claim(data: bytes, mtime: float, queue: str, key: str) -> Claimed | None:
    """A claim file as a Claimed: a claim document, or a taken ready file (the task itself,
    its lease end in ``mtime``). None if it is neither, or does not match its name."""
    try:
        return codec.decode(data, Claimed)
    except SerializationError:
        pass
    try:
        task = codec.decode(data, Task)
    except SerializationError:
        return None
    name = key.rsplit("/", 1)[-1]
    if task.queue != queue or name != f"{task.id}.{task.attempt}.json":
        return None
    return Claimed(
        task=task,
        attempt=task.attempt,
        lease_until=from_epoch(mtime),
        worker_id="",
        token="",
        claimed_at=from_epoch(mtime),
    )
