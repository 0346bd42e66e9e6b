"""Key layout of the event storage under ``base_dir`` (see ``docs/events.md``).

::

    events/by-time/{YYYY-MM-DD}/{HH}/{time_ms:013d}~{event_id}~{type}~{task_id}.json
        the event (primary copy), partitioned by the UTC day and hour of ``event.time``
    events/by-task/{task_id}/{time_ms:013d}~{event_id}~{type}.json
        the same document again: the per-task index (a hard link to the primary copy on a
        local directory, where links work: no second file)
    events/by-task-time/{group}/{task_id}~{time_ms:013d}~{event_id}~{type}.json
        the per-task index on a local directory, for task ids that are ULIDs (OmniQ's own):
        one directory per 4 ms in which task ids were made (``task_group``), not one per
        task, because there each new directory is a new inode, as costly as the event's own
        file. Entries written by 0.1.0 stay in ``by-task/{task_id}/``, still read.

Events written in batches (``log_many``, and the background writer behind ``submit``; the
backend and the worker use ``log``) share files instead::

    events/by-time/{YYYY-MM-DD}/{HH}/{min_ms:013d}~{max_ms:013d}~{batch_id}.jsonl
        the batch: one JSON document per line, all of one hour, times min_ms..max_ms
    events/by-task/{task_id}/{min_ms:013d}~{max_ms:013d}~{batch_id}.jsonl
        an index entry per task with events in the batch: an empty object (locally, for
        task ids that are not ULIDs, a hard link to the batch file: no new file); readers
        read the batch under ``by-time`` (its key follows from the name) and keep that
        task's lines
    events/by-task-time/{span}/{first_id}~{last_id}~{min_ms:013d}~{max_ms:013d}~{batch_id}.jsonl
        on a local directory, for ULID task ids: one index entry per 32 ms span of ids
        with tasks in the batch (``batch_group``, nine characters: a hard link to the batch
        file), not one per task (a link per task was 8 of the 9.5 us an event cost to
        write), named by the first and last of the span's task ids in the batch. A query by
        task reads the span's batches whose id range holds the task and keeps that task's
        lines: tasks made one after another and run in about that order have their events
        in the same few batches, so the ranges of a span's batches overlap little (run out
        of order, more batches are read: a range covers up to 32 ms of ids).
    events/by-task-time/{group}/{first_id}~{last_id}~{min_ms:013d}~{max_ms:013d}~{batch_id}.jsonl
        the same entry in the 4 ms group instead, when the batch's tasks of the span are
        ``DENSE`` and all of one 4 ms (ids made in bulk: a span then holds dozens of batches,
        a group a few); a query by task lists the group anyway, for single events.

``~`` separates the fields because no task id, event id or event type can contain it
(``validate_name`` allows only ``[A-Za-z0-9_.-]``). A file name alone therefore tells the
time, id, type and task of an event: queries filter on names before reading anything, and
``cleanup`` finds the per-task copy of every event it deletes without reading it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import NamedTuple

from omniq.core.models import UTC

ROOT = "events"
BY_TIME = "events/by-time"
BY_TASK = "events/by-task"
BY_TASK_TIME = "events/by-task-time"
SEP = "~"
SUFFIX = ".json"
BATCH_SUFFIX = ".jsonl"
DAY_FORMAT = "%Y-%m-%d"
HOUR = 3600.0
HOUR_MS = 3_600_000
DAY = 86400.0

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


def epoch_ms(value: datetime) -> int:
    """Milliseconds since the epoch, exact (integer arithmetic)."""
    return (value - _EPOCH) // _MS


class Name(NamedTuple):
    """What an event file name says about the event."""

    time_ms: int
    event_id: str
    type: str
    task_id: str

    @property
    def sort_key(self) -> tuple[int, str]:
        return self.time_ms, self.event_id


def day_of(time_ms: int) -> str:
    t = time.gmtime(time_ms // 1000)  # not strftime: this runs for every batch a query reads
    return f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}"


def hour_of(time_ms: int) -> str:
    return f"{time_ms // HOUR_MS % 24:02d}"


def time_key(n: Name) -> str:
    return (
        f"{BY_TIME}/{day_of(n.time_ms)}/{hour_of(n.time_ms)}/"
        f"{n.time_ms:013d}{SEP}{n.event_id}{SEP}{n.type}{SEP}{n.task_id}{SUFFIX}"
    )


_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_ULID_CHARS = frozenset(_CROCKFORD)
ULID_LENGTH = 26
# A batch entry of ULID ids starts with its range: the first id, ``~``, the last id, ``~``.
RANGE_FIRST = slice(0, ULID_LENGTH)
RANGE_LAST = slice(ULID_LENGTH + 1, 2 * ULID_LENGTH + 1)
_FIRST_SEP = slice(ULID_LENGTH, ULID_LENGTH + 1)  # slices: a shorter name is no range
_LAST_SEP = slice(2 * ULID_LENGTH + 1, 2 * ULID_LENGTH + 2)
# The tenth character of a ULID is its millisecond's lowest five bits: rounded down to a
# multiple of 4, nine characters and it name the 4 ms in which the id was made. A by-task
# query lists the group (~0.5 us an entry on ext4): 4 ms bound it to the tasks a producer
# makes in 4 ms, while a producer of 1,000 tasks a second makes 4x fewer directories.
_FOUR_MS = {c: _CROCKFORD[i & ~3] for i, c in enumerate(_CROCKFORD)}


def task_group(task_id: str) -> str | None:
    """The 4 ms in which a ULID task id was made, as ten characters; None for other ids."""
    if len(task_id) != ULID_LENGTH or not _ULID_CHARS.issuperset(task_id):
        return None
    return task_id[:9] + _FOUR_MS[task_id[9]]


def batch_group(task_id: str) -> str | None:
    """The 32 ms in which a ULID task id was made (its first nine characters), where a
    batch's index entries go; None for other ids. Coarser than ``task_group``: a local disk
    makes up to 8x fewer directories and links (with 4 ms, a producer of 1,400 tasks a
    second wrote about one link and one directory per five events); the price is a longer
    listing per query by task, and for tasks run out of order wider id ranges, so more
    batches read."""
    return task_id[:9] if task_group(task_id) is not None else None


def task_dirs(task_id: str, grouped: bool) -> list[tuple[str, str]]:
    """Where ``task_id``'s index entries are, as (directory, name lead) pairs, the one a
    single event's entry goes to first. ``grouped`` (a local directory): a ULID id's single
    entries go to its ``by-task-time`` 4 ms group and its batch entries to its 32 ms span
    (or the group: ``batch_index_keys``); its own directory is still read, and cleaned, for
    the entries written there before."""
    own = (f"{BY_TASK}/{task_id}", "")
    group = task_group(task_id) if grouped else None
    if group is None:
        return [own]
    lead = f"{task_id}{SEP}"
    return [
        (f"{BY_TASK_TIME}/{group}", lead),
        (f"{BY_TASK_TIME}/{batch_group(task_id)}", lead),
        own,
    ]


def _entry(task_id: str, name: str, grouped: bool) -> str:
    directory, lead = task_dirs(task_id, grouped)[0]
    return f"{directory}/{lead}{name}"


def entry_name(n: Name) -> str:
    """The name of a single event's index entry (after the lead, in a group)."""
    return f"{n.time_ms:013d}{SEP}{n.event_id}{SEP}{n.type}{SUFFIX}"


def task_key(n: Name, grouped: bool = False) -> str:
    """The index entry of a single event (see ``task_dirs`` for ``grouped``)."""
    return _entry(n.task_id, entry_name(n), grouped)


def parse_time_name(name: str) -> Name | None:
    """Parse a ``by-time`` file name; None if it is not one."""
    if not name.endswith(SUFFIX):
        return None
    parts = name[: -len(SUFFIX)].split(SEP)
    if len(parts) != 4 or not parts[0].isdigit() or not all(parts[1:]):
        return None
    return Name(int(parts[0]), parts[1], parts[2], parts[3])


def parse_task_name(task_id: str, name: str) -> Name | None:
    """Parse a ``by-task/{task_id}`` file name; None if it is not one."""
    if not name.endswith(SUFFIX):
        return None
    parts = name[: -len(SUFFIX)].split(SEP)
    if len(parts) != 3 or not parts[0].isdigit() or not all(parts[1:]):
        return None
    return Name(int(parts[0]), parts[1], parts[2], task_id)


def day_start(name: str) -> float | None:
    """Epoch seconds at which day partition ``name`` starts; None if not a day name."""
    try:
        return datetime.strptime(name, DAY_FORMAT).replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


def hour_start(day: float, name: str) -> float | None:
    """Epoch seconds at which hour partition ``name`` of a day starts; None if malformed."""
    if len(name) != 2 or not name.isdigit() or int(name) > 23:
        return None
    return day + int(name) * HOUR


class Batch(NamedTuple):
    """What a batch file name says: the time span of its events and its unique id."""

    min_ms: int
    max_ms: int
    batch_id: str

    @property
    def name(self) -> str:
        return f"{self.min_ms:013d}{SEP}{self.max_ms:013d}{SEP}{self.batch_id}{BATCH_SUFFIX}"


def batch_time_key(b: Batch) -> str:
    return f"{BY_TIME}/{day_of(b.min_ms)}/{hour_of(b.min_ms)}/{b.name}"


# A batch's slice of a span with this many tasks, all made in one 4 ms: a producer made ids
# faster than one every 0.5 ms there, so the span holds many batches; the entry goes to the
# 4 ms group instead (still one link), where a query by task lists a few entries, not dozens.
DENSE = 8


def batch_index_keys(task_ids: Iterable[str], b: Batch, grouped: bool = False) -> list[str]:
    """The index entries of batch ``b`` holding events of ``task_ids``: one per task, but
    with ``grouped`` (a local directory) one per 32 ms span of ULID task ids, named by the
    range of the span's ids in the batch, in the span's directory or, for a dense slice
    (``DENSE``), in its 4 ms group's. The same ids give the same keys (``cleanup`` finds them
    from the batch's contents)."""
    keys: list[str] = []
    spans: dict[str, list[str]] = {}
    for task_id in dict.fromkeys(task_ids):
        span = batch_group(task_id) if grouped else None
        if span is None:
            keys.append(f"{BY_TASK}/{task_id}/{b.name}")
        else:
            spans.setdefault(span, []).append(task_id)
    for span, ids in spans.items():
        first, last = min(ids), max(ids)
        group = task_group(first)
        where = group if len(ids) >= DENSE and group == task_group(last) else span
        keys.append(f"{BY_TASK_TIME}/{where}/{first}{SEP}{last}{SEP}{b.name}")
    return keys


def split_range_name(name: str) -> tuple[str, str, str] | None:
    """Split a group's batch entry into its first and last task ids and the batch's name
    (``parse_batch_name`` it once the range is known to matter); None if it is not one."""
    if name.count(SEP) != 4 or not name.endswith(BATCH_SUFFIX):
        return None
    first, last, batch_name = name.split(SEP, 2)
    return first, last, batch_name


def range_may_hold(name: str, task_id: str) -> bool:
    """Whether a group's batch entry ``name`` may hold events of ``task_id``: False for a
    range of ULID ids (a span's entries all are) that does not hold it, read from the name's
    fixed places without splitting it."""
    return not (
        name[_FIRST_SEP] == name[_LAST_SEP] == SEP
        and not name[RANGE_FIRST] <= task_id <= name[RANGE_LAST]
    )


def group_keep(task_id: str, lead: str) -> Callable[[str], bool]:
    """Which names of a group (``task_dirs``) a query by ``task_id`` reads: its single
    entries, led by ``lead``, and the batch entries whose range may hold it. Most of a
    group's names are other tasks': dropped while listing, before any parsing."""

    def keep(name: str) -> bool:
        return name.startswith(lead) or (
            name.endswith(BATCH_SUFFIX) and range_may_hold(name, task_id)
        )

    return keep


def index_keys(task_id: str, name: str, grouped: bool) -> list[str]:
    """Every place the index entry ``name`` (``entry_name``) of a single event of
    ``task_id`` may be (not a batch's span): ``cleanup`` removes them all."""
    dirs = task_dirs(task_id, grouped)
    singles = dirs if len(dirs) == 1 else [dirs[0], dirs[-1]]  # the 4 ms group, its own
    return [f"{directory}/{lead}{name}" for directory, lead in singles]


def parse_batch_name(name: str) -> Batch | None:
    """Parse a batch file name (under ``by-time`` or ``by-task``); None if it is not one."""
    if not name.endswith(BATCH_SUFFIX):
        return None
    parts = name[: -len(BATCH_SUFFIX)].split(SEP)
    if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit() or not parts[2]:
        return None
    return Batch(int(parts[0]), int(parts[1]), parts[2])
