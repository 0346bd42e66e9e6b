"""Listing the tasks of a file queue by status, a page at a time. Mixed into
``AsyncFileQueue``; each page is one storage program.

Where each status lives (see ``_layout``), in the order a page walks them:

* ``pending``: ``ready/p{rank}/``, by priority, then by id (creation time);
* ``scheduled``: the due markers ``due/``, by due time (each body read from ``sched/``);
* ``waiting``: ``wait/{id}.json``, tasks held until their dependencies succeed, by id;
* ``running``: the claims ``run/{id}.{n}.json`` without an outcome, by id;
* ``dead``: ``dead/{id}.json``, by id.

A page lists each area from the cursor on with ``listafter`` and reads only the entries it
returns, so its cost follows the page (docs/queue.md, "Listing tasks", has the numbers per
store). A ready or delayed copy whose attempt has a claim is stale (on S3 and Azure its
delete is deferred, see ``_claim_batched``) and is not listed.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import msgspec

from omniq.core.fs import Program, Store, listafter, listdirs, read_many
from omniq.core.models import TaskInfo, TaskPage, TaskStatus, from_epoch
from omniq.core.names import validate_name

from . import _layout as layout

if TYPE_CHECKING:
    from ._claim_document import DocumentClaims
    from ._shards import Shards

LISTED = (
    TaskStatus.PENDING,
    TaskStatus.SCHEDULED,
    TaskStatus.WAITING,
    TaskStatus.RUNNING,
    TaskStatus.DEAD,
)
"""The statuses ``list_tasks`` lists, in the order a page with ``status=None`` walks them."""

_PAGE = 1000  # the most names one S3 LIST returns: fewer means the listing reached the end
_REST = 1 << 20  # "the rest": one LIST on S3 (capped at _PAGE), one listing elsewhere
_CURSOR_VERSION = 1
_RANK = re.compile(r"p\d{4}")


class Cursor(NamedTuple):
    """Where a page ended: the queue, the status, and the last name listed in its area."""

    queue: str
    status: TaskStatus
    pos: str

    def encode(self) -> str:
        raw = json.dumps([_CURSOR_VERSION, self.queue, self.status.value, self.pos])
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, text: object) -> Cursor:
        """The cursor ``text`` (a page's ``next``); ValueError if it is not one."""
        if not isinstance(text, str) or not text or len(text) > 1024:
            raise ValueError("after: not a cursor (pass the `next` of the previous page)")
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            version, queue, status, pos = json.loads(raw)
        except (ValueError, TypeError, binascii.Error):
            raise ValueError("after: not a cursor (pass the `next` of the previous page)") from None
        if version != _CURSOR_VERSION or not isinstance(pos, str):
            raise ValueError("after: not a cursor of this OmniQ version")
        cursor = cls(validate_name(queue, "queue name"), parse_status(status), pos)
        if pos and not _valid_pos(cursor.status, pos):
            raise ValueError("after: not a cursor (pass the `next` of the previous page)")
        return cursor


def _valid_pos(status: TaskStatus, pos: str) -> bool:
    parts = pos.split("/")
    if status is TaskStatus.PENDING and (len(parts) != 2 or not _RANK.fullmatch(parts[0])):
        return False
    if status is not TaskStatus.PENDING and len(parts) != 1:
        return False
    try:
        for part in parts:
            validate_name(part, "cursor")
    except ValueError:
        return False
    return True


def parse_status(status: object) -> TaskStatus:
    """``status`` as one of the listed statuses; ValueError otherwise."""
    try:
        found = TaskStatus(status)
    except ValueError:
        found = None
    if found not in LISTED:
        names = ", ".join(s.value for s in LISTED)
        raise ValueError(f"status {status!r} cannot be listed; use one of {names} (or None)")
    assert found is not None
    return found


def check_limit(limit: object) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive integer, got {limit!r}")
    return limit


class _Item(NamedTuple):
    pos: str  # the name listed in its area, the cursor of a page ending here
    info: TaskInfo


class QueueListing:
    """list_tasks."""

    store: Store
    claims: DocumentClaims
    shards: Shards

    if TYPE_CHECKING:

        async def _queues_for(self, queue: str | None, task_id: str | None = None) -> list[str]: ...

        @staticmethod
        def _info(body: bytes, status: TaskStatus, attempt: int | None) -> TaskInfo: ...

    async def list_tasks(
        self,
        queue: str | None = None,
        status: TaskStatus | str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> TaskPage:
        """One page of tasks of ``queue`` (None: every queue) in ``status`` (``pending``,
        ``scheduled``, ``waiting``, ``running``, ``dead``; None: all five), at most
        ``limit``; pass the page's ``next`` as ``after`` for the following one (None: the
        last page). Within a queue: pending by priority then age, scheduled by due time,
        the others by id. Each page costs a few listings from the cursor on and one read
        per task listed (a running task: its claim and newest lease record), whatever the
        queue's depth (docs/queue.md, "Listing tasks")."""
        statuses = list(LISTED) if status is None else [parse_status(status)]
        check_limit(limit)
        own = None if queue is None else self.shards.queues(queue)  # a sharded queue: its shards
        cursor = None if after is None else Cursor.decode(after)
        if cursor is not None and (
            (own is not None and cursor.queue not in own) or cursor.status not in statuses
        ):
            raise ValueError("after: this cursor belongs to a listing of another queue or status")
        names = sorted(own if own is not None else await self._queues_for(None))
        if cursor is not None:
            names = [n for n in names if n >= cursor.queue]
        return await self.store.run(self._page_program(names, statuses, limit, cursor), heavy=True)

    def _page_program(
        self, queues: list[str], statuses: list[TaskStatus], limit: int, cursor: Cursor | None
    ) -> Program[TaskPage]:
        found: list[tuple[str, TaskStatus, _Item]] = []
        for queue in queues:
            for status in statuses:
                pos = ""
                if cursor is not None and queue == cursor.queue:
                    if LISTED.index(status) < LISTED.index(cursor.status):
                        continue
                    if status is cursor.status:
                        pos = cursor.pos
                # One more than the page: whether a next page exists.
                items = yield from self._list_area(queue, status, pos, limit + 1 - len(found))
                found += [(queue, status, item) for item in items]
                if len(found) > limit:
                    queue_, status_, last = found[limit - 1]
                    return TaskPage(
                        [item.info for _, _, item in found[:limit]],
                        Cursor(queue_, status_, last.pos).encode(),
                    )
        return TaskPage([item.info for _, _, item in found], None)

    def _list_area(
        self, queue: str, status: TaskStatus, pos: str, want: int
    ) -> Program[list[_Item]]:
        if status is TaskStatus.PENDING:
            return (yield from self._list_ready(queue, pos, want))
        if status is TaskStatus.SCHEDULED:

            def due(name: str) -> layout.Candidate | None:
                return layout.due_candidate(queue, name)

            return (yield from self._list_copies(queue, f"{queue}/due", pos, want, status, due))
        if status is TaskStatus.RUNNING:
            return (yield from self._list_running(queue, pos, want))
        area = "wait" if status is TaskStatus.WAITING else "dead"
        return (yield from self._list_documents(queue, area, pos, want, status))

    def _list_ready(self, queue: str, pos: str, want: int) -> Program[list[_Item]]:
        rank_pos, _, name_pos = pos.partition("/")
        out: list[_Item] = []
        for rank_dir in sorted((yield listdirs(f"{queue}/ready"))):
            if not _RANK.fullmatch(rank_dir) or rank_dir < rank_pos:
                continue

            def candidate(name: str, rank_dir: str = rank_dir) -> layout.Candidate | None:
                return layout.ready_candidate(queue, rank_dir, name)

            after = name_pos if rank_dir == rank_pos else ""
            out += yield from self._list_copies(
                queue,
                f"{queue}/ready/{rank_dir}",
                after,
                want - len(out),
                TaskStatus.PENDING,
                candidate,
                f"{rank_dir}/",
            )
            if len(out) >= want:
                break
        return out

    def _list_copies(
        self,
        queue: str,
        prefix: str,
        after: str,
        want: int,
        status: TaskStatus,
        candidate: Callable[[str], layout.Candidate | None],
        pos_prefix: str = "",
    ) -> Program[list[_Item]]:
        """Ready or delayed copies listed under ``prefix`` after ``after``, without the stale
        ones (whose attempt has a claim): each listed copy is read with its claim name."""
        out: list[_Item] = []
        while len(out) < want:
            ask = min(want - len(out), _PAGE)
            names = yield listafter(prefix, after, ask)
            found = [(n, c) for n in names if (c := candidate(n)) is not None]
            runs = [layout.run_key(queue, c.task_id, c.attempt) for _, c in found]
            bodies = (yield read_many(c.key for _, c in found)) if found else {}
            claims = (yield read_many(runs)) if found else {}
            for (name, c), run in zip(found, runs, strict=True):
                body = bodies.get(c.key)
                if body is not None and claims.get(run) is None:
                    out.append(_Item(pos_prefix + name, self._info(body, status, c.attempt)))
            if len(names) < ask:
                break
            after = names[-1]
        return out[:want]

    def _list_documents(
        self, queue: str, area: str, after: str, want: int, status: TaskStatus
    ) -> Program[list[_Item]]:
        """Task documents ``{id}.json`` in ``area`` (``wait``, ``dead``) after ``after``. A
        wait is attempt 0 of its task: one whose outcome exists (released or cancelled, its
        document not yet removed) is not waiting any more."""
        prefix = f"{queue}/{area}"
        out: list[_Item] = []
        while len(out) < want:
            ask = min(want - len(out), _PAGE)
            names = yield listafter(prefix, after, ask)
            found = [n for n in names if n.endswith(".json")]
            bodies = (yield read_many(f"{prefix}/{n}" for n in found)) if found else {}
            decided: dict[str, bytes | None] = {}
            if found and status is TaskStatus.WAITING:
                decided = yield read_many(layout.outcome_key(queue, n[:-5], 0) for n in found)
            for name in found:
                body = bodies.get(f"{prefix}/{name}")
                if body is None or decided.get(layout.outcome_key(queue, name[:-5], 0)):
                    continue
                out.append(_Item(name, self._info(body, status, None)))
            if len(names) < ask:
                break
            after = names[-1]
        return out[:want]

    def _list_running(self, queue: str, after: str, want: int) -> Program[list[_Item]]:
        """Claims without an outcome, in name order. ``run/`` also holds the records of the
        attempts decided in the last ``tombstone_ttl`` (the reaper removes them after): the
        listing passes over those names too, 1,000 per LIST on S3."""
        prefix = f"{queue}/run"
        attempts: dict[tuple[str, int], _Seen] = {}
        done: set[tuple[str, int]] = set()
        out: list[_Item] = []
        while True:
            names = yield listafter(prefix, after, _REST)
            ended = len(names) < _PAGE
            for name in names:
                parsed = layout.parse_run_name(name)
                if parsed is not None:
                    attempts.setdefault(parsed[:2], _Seen()).add(parsed.part)
            last = names[-1] if names else after
            # An attempt is known once its outcome's name is passed ("x" sorts after every
            # other record of the attempt), or the listing ended.
            ready = []
            for key in sorted(k for k, a in attempts.items() if a.claim and k not in done):
                if attempts[key].decided:
                    done.add(key)
                    continue
                if not ended and f"{key[0]}.{key[1]}.x" > last:
                    break
                ready.append(key)
            while ready and len(out) < want:
                batch, ready = ready[: want - len(out)], ready[want - len(out) :]
                done.update(batch)
                out += yield from self._read_running_page(queue, batch, attempts)
            if len(out) >= want or ended:
                return out[:want]
            after = last

    def _read_running_page(
        self, queue: str, keys: list[tuple[str, int]], attempts: dict[tuple[str, int], _Seen]
    ) -> Program[list[_Item]]:
        claims = yield read_many(layout.run_key(queue, i, n) for i, n in keys)
        newest = {key: max(attempts[key].epochs) for key in keys if attempts[key].epochs}
        epochs = {key: layout.epoch_key(queue, *key, n) for key, n in newest.items()}
        records = dict((yield read_many(epochs.values()))) if epochs else {}
        # An epoch replaced by a heartbeat since the listing: its successor is the newest.
        gone = {
            key: layout.epoch_key(queue, *key, newest[key] + 1)
            for key, epoch in epochs.items()
            if records.get(epoch) is None
        }
        if gone:
            records.update((yield read_many(gone.values())))
            epochs.update(gone)
        out = []
        for task_id, attempt in keys:
            run = layout.run_key(queue, task_id, attempt)
            data = claims.get(run)
            if data is None or layout.tombstone_state(data) is not None:
                continue  # cleaned up since the listing, or ended unclaimed
            claimed = yield from self.claims.read_claim(queue, run, data)
            if claimed is None:
                continue
            info = TaskInfo(
                task=claimed.task,
                status=TaskStatus.RUNNING,
                attempt=attempt,
                worker_id=claimed.worker_id or None,
                lease_until=claimed.lease_until,
            )
            raw = records.get(epochs.get((task_id, attempt), ""))
            rec = None if raw is None else layout.parse_record(raw)
            if rec is not None:
                info = _with_record(info, rec)
            out.append(_Item(run.rsplit("/", 1)[1], info))
        return out


class _Seen:
    """The ``run/`` records of one attempt a listing has shown (names only)."""

    __slots__ = ("claim", "decided", "epochs")

    def __init__(self) -> None:
        self.claim = False
        self.decided = False
        self.epochs: list[int] = []

    def add(self, part: str) -> None:
        if part == "json":
            self.claim = True
        elif part in ("x", "r"):
            self.decided = True
        elif part.isdigit():
            self.epochs.append(int(part))


def _with_record(info: TaskInfo, rec: layout.Record) -> TaskInfo:
    """``info`` with what the newest lease record says: the lease end, and the progress and
    metadata the task context persisted there (see ``_layout.Record``)."""
    lease_until = info.lease_until
    if rec.lease_until is not None:
        lease_until = from_epoch(rec.lease_until)
    return msgspec.structs.replace(
        info, lease_until=lease_until, progress=rec.progress, metadata=rec.meta or {}
    )
