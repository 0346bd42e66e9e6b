"""Claims as documents: memory, GCS, Azure (and a local directory that cannot hard-link).

Correctness argument. A claim of attempt n is the exclusive create of ``run/{id}.{n}.json``
holding a ``Claimed`` document with a fresh random token:

* memory: ``pipe_file(mode="create")`` checks and writes under the filesystem's lock (one
  process only: the memory filesystem is not shared across processes);
* GCS: a simple upload with ``ifGenerationMatch=0`` -- the server refuses it if any
  generation of the object exists;
* Azure: ``overwrite=False`` -- the service refuses it (409) if the blob exists;
* local without hard links: ``O_EXCL`` on a lock name, then the complete file renamed into
  place (``LocalOps.create``), so no reader sees half a claim.

Exactly one create succeeds, so one worker holds the attempt. An "exists" answer is checked
against the bytes this call wrote (the SDK may have retried a request whose first response
was lost); the token makes the bytes unique. After winning, the ready copy (and the due
marker) are deleted; if that fails the claim is kept -- the copy's next claimer finds the
claim and drops it, and the reaper's clean-up deletes any copy left before it removes the
claim. A lease is the document's ``lease_until``, later the newest lease epoch.

A create that ends in an error may still have landed (the response of the last try lost, and
the look that followed failed too). Its claim is kept as *unsettled*; the next claim from
that queue reads the name first: the claim's own bytes there mean the attempt is this
consumer's, and it is handed out (renewed first if little lease is left). Without that look
the attempt would sit claimed by nobody until its lease ran out.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from omniq.core import codec
from omniq.core.errors import StorageError
from omniq.core.fs import Program, Store, create, delete, delete_many, now, read, stat
from omniq.core.models import Claimed, Task, from_epoch

from . import _layout as layout

log = logging.getLogger("omniq.queue")


@dataclass(frozen=True)
class Unsettled:
    """A claim whose create failed without an answer: it may have landed."""

    cand: layout.Candidate
    run: str
    data: bytes
    claimed: Claimed


class DocumentClaims:
    """Claim by creating a claim document; the base of the other strategies."""

    name = "document"
    batch = 256  # claim candidates kept from one listing in memory (local: _claim_link)
    # On object stores one LIST returns up to 1,000 names for the price of a few: K consumers
    # then spread over four times as many candidates and lose fewer claim races (16 workers
    # on S3: 7.0 -> 5.9 requests a task, benchmarks/README.md).
    remote_batch = 1000
    # Listings come in key order (a claim before its outcome): the reaper scans run/ once.
    scan_outcomes_first = False
    flush_early = False  # deferred deletes of spent copies go beside the next claims

    def __init__(self, store: Store, batch: int | None = None) -> None:
        self.store = store
        self.batch = batch or (self.remote_batch if store.is_remote else self.batch)
        self.unsettled: list[Unsettled] = []

    def suspect_after(self, lease: float, clock_skew: float) -> float:
        """How old a claim file must be before the reaper reads it: a document's mtime is
        when its lease started."""
        return lease

    def claim(
        self, cand: layout.Candidate, task: Task, current: float, lease: float, worker: str
    ) -> Program[Claimed | None]:
        claimed = Claimed(
            task=task,
            attempt=cand.attempt,
            lease_until=from_epoch(current + lease),
            worker_id=worker,
            token=uuid.uuid4().hex,
            claimed_at=from_epoch(current),
        )
        run = layout.run_key(task.queue, task.id, cand.attempt)
        data = codec.encode(claimed)
        try:
            won = yield create(run, data)
        except StorageError:
            self.unsettled.append(Unsettled(cand, run, data, claimed))
            raise
        if won:
            yield from self.spend(cand)
            return claimed
        yield from self.lost(cand, run)
        return None

    def settle(self, queue: str, want: int, grace: float) -> Program[list[Claimed]]:
        """Up to ``want`` unsettled claims of ``queue`` that did land (their bytes are at
        their name). One still unreadable is kept until ``grace`` past its lease (then the
        reaper owns the attempt); one that did not land, or lost to a rival, is forgotten."""
        mine: list[Claimed] = []
        kept: list[Unsettled] = []
        current = yield now()
        looked = list(self.unsettled)
        for item in looked:
            if item.claimed.queue != queue or len(mine) >= want:
                kept.append(item)
                continue
            try:
                stored = yield read(item.run)
            except StorageError:
                if current < item.claimed.lease_until.timestamp() + grace:
                    kept.append(item)
                continue
            if stored == item.data:
                log.info("task %s: a claim whose answer was lost did land", item.claimed.id)
                yield from self.spend(item.cand)
                mine.append(item.claimed)
        # Claims that failed meanwhile (a concurrent claim of this consumer) stay too.
        seen = {id(item) for item in looked}
        self.unsettled = kept + [item for item in self.unsettled if id(item) not in seen]
        return mine

    def lost(self, cand: layout.Candidate, run: str) -> Program[None]:
        """The attempt is claimed (or over): its copy is stale and is removed."""
        yield from self.spend(cand)

    def spend(self, cand: layout.Candidate) -> Program[None]:
        """Remove a copy, then its due marker, whose attempt is claimed or over."""
        for key in (cand.key, cand.marker):
            if key is not None:
                yield from self.delete_spent([key])

    def delete_spent(self, keys: list[str]) -> Program[None]:
        """Delete spent copies (on Azure one request for up to 256). Best effort: a copy
        left behind is harmless (see the module docstring)."""
        if not keys:
            return
        try:
            yield delete(keys[0]) if len(keys) == 1 else delete_many(keys)
        except Exception as exc:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            log.warning("could not remove %s%s (removed later): %s", ", ".join(keys[:3]), more, exc)

    def take_spent(self) -> list[str]:
        """Spent copies whose delete was deferred, handed to the caller to delete beside its
        next claims (``flush_early``); none here."""
        return []

    def decide(
        self, queue: str, task_id: str, attempt: int, record: layout.Record, current: float
    ) -> Program[bool]:
        """Create the attempt's outcome ``record``; True if this call created it."""
        data = layout.encode_record(record)
        return bool((yield create(layout.outcome_key(queue, task_id, attempt), data)))

    def read_claim(self, queue: str, key: str, data: bytes) -> Program[Claimed | None]:
        """The claim file ``key`` (its bytes ``data``) as a Claimed, None if unreadable."""
        yield from ()
        return layout.as_claim(data, 0.0, queue, key)

    def lease_end(self, key: str, claimed: Claimed) -> Program[float | None]:
        """When the lease of a claim without epochs ends (None: the claim is gone)."""
        if claimed.token:
            return claimed.lease_until.timestamp()
        info = yield stat(key)  # a taken ready file (see _claim_link)
        return None if info is None else info.mtime

    def filter(self, queue: str, found: list[layout.Candidate]) -> Program[list[layout.Candidate]]:
        """Candidates worth a claim attempt, from a listing."""
        yield from ()
        return found

    def flush(self) -> Program[None]:
        """Finish deferred clean-up (GCS, S3, Azure)."""
        yield from ()

    @property
    def pending(self) -> int:
        """How many spent copies (and due markers) wait for their deferred delete."""
        return 0
