"""Claims on GCS: documents, with the ready copy's delete deferred off the task's path. (S3
and Azure defer it further, to the next listing, and batch it there: ``_claim_batched``.)

Correctness argument. The claim is the exclusive create of ``run/{id}.{n}.json``
(``ifGenerationMatch=0``), as in ``DocumentClaims``. What differs is the clean-up: the winner
does not DELETE the ready copy (and due marker) before handing the task out; the keys wait in
memory and are deleted at this consumer's next claim call, beside its claims, in one
``delete_many`` (gcsfs' batch on Google's endpoint, a DELETE each against an emulator), or at
its next listing, ``size`` or ``close``. Until then the copy is still listed: a consumer that
picks it loses the exclusive create to the claim and deletes the copy at once (``lost``), so
it costs requests, never a second run. A consumer that dies with deletes pending leaves the
copies to those claimers and to the reaper's clean-up, which deletes every copy of an attempt
before its claim. What it buys: a task's life has one request fewer in a row (read, create;
then the result and the outcome), so under request latency a worker reaches more of
``concurrency / (requests per task x latency)``.
"""

from __future__ import annotations

import logging

from omniq.core.fs import Program, Store

from . import _layout as layout
from ._claim_document import DocumentClaims

log = logging.getLogger("omniq.queue")


class DeferredClaims(DocumentClaims):
    """Claim documents whose spent copies are deleted later (see the module docstring)."""

    name = "deferred"
    flush_early = True  # delete spent copies beside the next claims (S3, Azure: next listing)

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

    def lost(self, cand: layout.Candidate, run: str) -> Program[None]:
        """A copy met by a claim that lost is deleted at once: it may be another consumer's
        spent copy, and every claimer that picks it before its delete pays a read and a
        failed create (16 workers on GCS: ~0.3 requests a task more when deferred too)."""
        yield from DocumentClaims.spend(self, cand)

    def filter(self, queue: str, found: list[layout.Candidate]) -> Program[list[layout.Candidate]]:
        """A listing shows the copies spent here whose delete was deferred: they are dropped,
        and deleted now."""
        spent = self.take_spent()
        yield from self.delete_spent(spent)
        return drop_spent(found, spent)

    def take_spent(self) -> list[str]:
        spent, self._spent = self._spent, []
        return spent

    def flush(self) -> Program[None]:
        yield from self.delete_spent(self.take_spent())

    @property
    def pending(self) -> int:
        return len(self._spent)


def drop_spent(found: list[layout.Candidate], spent: list[str]) -> list[layout.Candidate]:
    """``found`` without the candidates whose copy is among ``spent``."""
    if not spent:
        return found
    gone = set(spent)
    return [c for c in found if c.key not in gone]
