"""Claims on S3: documents, with the ready copy's delete deferred and batched.

Correctness argument. The claim is the exclusive create of ``run/{id}.{n}.json`` by a PUT
with ``If-None-Match: *`` (S3 refuses it with 412 when the key exists), as in
``DocumentClaims``. What differs is the clean-up: the winner does not DELETE the ready copy
at once; the keys wait in memory and go in one DeleteObjects at this worker's next listing
(or at ``close``). Until then the copy is still listed, so every listing skips copies whose
attempt has a claim (one LIST of ``run/`` with ``StartAfter``, deleting them too). A copy
that slips through (more claims than one LIST shows) costs one failed create, never a second
run: its claim exists. If the worker dies with deletes pending, the copies stay until a
listing or the reaper's clean-up removes them, which deletes every copy of an attempt before
its claim.
"""

from __future__ import annotations

import logging

from omniq.core.fs import Program, Store, delete_many, listafter

from . import _layout as layout
from ._claim_document import DocumentClaims

log = logging.getLogger("omniq.queue")


class S3Claims(DocumentClaims):
    name = "s3"

    def __init__(self, store: Store, batch: int | None = None) -> None:
        super().__init__(store, batch)
        self._spent: list[str] = []

    def spend(self, cand: layout.Candidate) -> Program[None]:
        self._spent += [cand.key, cand.marker] if cand.marker else [cand.key]
        if len(self._spent) >= self.batch:
            try:
                yield from self.flush()
            except Exception as exc:  # kept for the next try; the claim stands
                log.warning("could not delete %d spent ready copies: %s", len(self._spent), exc)

    def flush(self) -> Program[None]:
        spent, self._spent = self._spent, []
        if not spent:
            return
        try:
            yield delete_many(spent)
        except BaseException:
            self._spent = spent + self._spent
            raise

    @property
    def pending(self) -> bool:
        return bool(self._spent)

    def filter(self, queue: str, found: list[layout.Candidate]) -> Program[list[layout.Candidate]]:
        """Drop (and delete) candidates whose attempt is already claimed or finished: copies
        left by a claimer that deferred their deletion, or died before it."""
        if not found:
            return found
        first = min(c.task_id for c in found)
        names = set((yield listafter(f"{queue}/run", first, 1000)))
        keep, spent = [], []
        for c in found:
            if f"{c.task_id}.{c.attempt}.json" in names:
                spent += [c.key, c.marker] if c.marker else [c.key]
            else:
                keep.append(c)
        if spent:
            yield delete_many(spent)
        return keep
