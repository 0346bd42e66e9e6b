"""Claims on S3 and Azure: documents, with the ready copy's delete deferred
(``_claim_deferred``) to the next listing and batched there (S3: one DeleteObjects for up to
1,000 keys; Azure: one blob batch for up to 256).

Correctness argument. The claim is the exclusive create of ``run/{id}.{n}.json`` (S3: a PUT
with ``If-None-Match: *``, refused with 412 when the key exists; Azure: ``overwrite=False``,
refused with 409), as in ``DocumentClaims``. What differs is the clean-up: the winner does not
delete the ready copy at once; the keys wait in memory and go in one batch delete at this
worker's next listing (or at ``close``). Until then the copy is still listed: a listing drops
this worker's own by key, and skips copies whose attempt has a claim (one listing of
``run/`` from the first candidate on: S3 ``StartAfter``, Azure ``startFrom``), deleting both
in that one batch. A copy that slips through (more claims than one listing shows) costs one
failed create, never a second run: its claim exists. If the worker dies with deletes pending,
the copies stay until a listing or the reaper's clean-up removes them, which deletes every
copy of an attempt before its claim.
"""

from __future__ import annotations

from omniq.core.fs import Program, listafter

from . import _layout as layout
from ._claim_deferred import DeferredClaims, drop_spent


class BatchedClaims(DeferredClaims):
    """Claim documents whose spent copies go in one batch delete at the next listing."""

    name = "batched"
    flush_early = False  # at the next listing: a request for up to 1,000 keys (Azure 256)

    def lost(self, cand: layout.Candidate, run: str) -> Program[None]:
        """The copy a lost claim met goes into the batch too: listings skip such copies."""
        yield from self.spend(cand)

    def filter(self, queue: str, found: list[layout.Candidate]) -> Program[list[layout.Candidate]]:
        """Drop (and delete) candidates whose attempt is already claimed or finished: copies
        this worker spent and has not deleted yet (known without a look), and copies left by
        another claimer that deferred their deletion, or died before it (one listing of
        ``run/``). Both go in one batch delete (a flush before the listing, then the
        filter's own, sent two), best effort: a copy left (say, a blob under a lease on
        Azure) is found by the next listing's look at ``run/`` while its claim exists, and
        the clean-up of its attempt deletes it before the claim; a failed delete never fails
        the listing."""
        spent = self.take_spent()
        found = drop_spent(found, spent)
        stale: list[str] = []
        if found:
            first = min(c.task_id for c in found)
            try:
                names = set((yield listafter(f"{queue}/run", first, 1000)))
            except BaseException:
                self._spent = spent + self._spent  # kept for the next listing (or close)
                raise
            keep = []
            for c in found:
                if f"{c.task_id}.{c.attempt}.json" in names:
                    stale += [c.key, c.marker] if c.marker else [c.key]
                else:
                    keep.append(c)
            found = keep
        yield from self.delete_spent(spent + stale)
        return found
