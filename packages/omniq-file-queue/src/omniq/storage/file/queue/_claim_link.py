"""Claims by hard link: a local directory.

Correctness argument. A claim of attempt n takes the ready file itself:
``utime(ready, lease end)``, then ``link(ready, run/{id}.{n}.json)``. ``link(2)`` fails with
EEXIST when the name exists, exactly like ``O_EXCL``, so one claimer wins; the winner then
unlinks the ready name and stamps the lease again if a loser stamped its own between the first
stamp and the unlink (the stat the winner makes anyway shows it). No file is created: the
claim is the task's own inode, its lease is the file's mtime until the first heartbeat
creates a lease epoch.

* The link is made after the stamp, so a claim never exists without a lease.
* A claimer killed between link and unlink leaves the ready name beside the claim (the same
  inode, two links): the next claimer sees two links and the claim, and only drops the name;
  it does not stamp it, so an orphaned claim's lease is not extended.
* If the unlink or the stamp fails after the link, the claim is kept (the name is dropped
  later, see above).
* An ack links the claim to the outcome name ``run/{id}.{n}.x`` (exclusive like every other
  outcome); the outcome then reads as the claim's own bytes, which means ``done``.
* A file that cannot be taken (another user's, links refused by the filesystem: some FUSE
  and SMB mounts) is claimed with a document instead (``DocumentClaims``), whose create then
  never shows half a file (``LocalOps.create``).
"""

from __future__ import annotations

import msgspec

from omniq.core.fs import Program, TakeStatus, exists, link, owner, stat, take
from omniq.core.models import Claimed, Task, from_epoch

from . import _layout as layout
from ._claim_document import DocumentClaims


class LinkClaims(DocumentClaims):
    name = "link"

    def decide(
        self, queue: str, task_id: str, attempt: int, record: layout.Record, current: float
    ) -> Program[bool]:
        # An ack links the claim file itself to the outcome name (exclusive, EEXIST like any
        # create) and stamps the time: no file is created, which is what an ack cost before
        # outcomes were exclusive. A name there already decided the attempt first.
        if record.state == layout.State.DONE:
            made = yield link(
                layout.run_key(queue, task_id, attempt),
                layout.outcome_key(queue, task_id, attempt),
                current,
            )
            if made is not None:
                return bool(made)
        return (yield from super().decide(queue, task_id, attempt, record, current))

    def lost(self, cand: layout.Candidate, run: str) -> Program[None]:
        # Without hard links a create is decided by a lock name before the file appears
        # (LocalOps._create_excl): the copy goes only once the claim is there to guard it.
        if (yield exists(run)):
            yield from self.spend(cand)

    batch = 2048  # a local listing reads the whole directory whatever the batch
    # A finished local claim looks like a suspect to the reaper's scan (its mtime is its
    # ack's time): outcomes are noted in a first pass, so finished claims are never held.
    scan_outcomes_first = True

    def read_claim(self, queue: str, key: str, data: bytes) -> Program[Claimed | None]:
        claimed = layout.as_claim(data, 0.0, queue, key)
        if claimed is None or claimed.token:
            return claimed
        # A taken ready file: its lease is its mtime, its worker the extended attribute.
        info = yield stat(key)
        worker = yield owner(key)
        return msgspec.structs.replace(
            claimed,
            lease_until=from_epoch(info.mtime if info is not None else 0.0),
            worker_id=worker or "",
        )

    def suspect_after(self, lease: float, clock_skew: float) -> float:
        return clock_skew  # a taken file's mtime is when its lease ends

    def claim(
        self, cand: layout.Candidate, task: Task, current: float, lease: float, worker: str
    ) -> Program[Claimed | None]:
        run = layout.run_key(task.queue, task.id, cand.attempt)
        taken = yield take(cand.key, run, current + lease, worker)
        if taken.status is TakeStatus.REFUSED:
            return (yield from super().claim(cand, task, current, lease, worker))
        if taken.status is TakeStatus.GONE:
            return None  # claimed by someone else meanwhile: they remove the marker
        if taken.status is TakeStatus.EXISTS:  # a stale name of a claimed or finished attempt
            yield from self.spend(cand)
            return None
        if cand.marker:
            yield from self.spend(cand._replace(key=cand.marker, marker=None))
        return Claimed(
            task=task,
            attempt=cand.attempt,
            lease_until=from_epoch(current + lease),
            worker_id=worker,
            token=f"ino:{taken.ino}",
            claimed_at=from_epoch(current),
        )
