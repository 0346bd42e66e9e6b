"""Batched expiry markers: the in-memory buffer and the batch marker documents.

``set`` writes only the result and hands its ``(expires_ms, task_id)`` pair to a
:class:`MarkerBuffer`. A flush writes one *batch marker* per expiry hour holding every buffered
pair of that hour::

    results/_expiry/{YYYY-MM-DDTHH}/{min_expires_ms:013d}-{rand}.batch
    {"v": 1, "expiry": [[1714568400123, "TASK1"], [1714568400456, "TASK2"], ...]}

So a worker pays one marker write per flush instead of one per result. A process killed
before its flush leaves results without a marker: ``cleanup_expired(sweep=True)`` finds them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

import msgspec

from omniq.core import codec
from omniq.core.errors import InvalidNameError, SerializationError
from omniq.core.names import validate_name

from . import _layout as layout

MARKER_VERSION = 1
MAX_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z: the last instant a datetime holds
Pair = tuple[int, str]  # (expires_ms, task_id)
HELD_BATCHES = 16  # batches kept in memory while marker writes fail


class ExpiryBatch(msgspec.Struct, kw_only=True):
    """The body of a batch marker (unknown fields are ignored, for forward compatibility)."""

    v: int = MARKER_VERSION
    expiry: list[tuple[int, str]]


class NewerMarkerError(SerializationError):
    """A batch marker written by a newer OmniQ: left in place, not quarantined."""


def encode_batch(pairs: Iterable[Pair]) -> bytes:
    return codec.encode(ExpiryBatch(expiry=sorted(set(pairs))))


def decode_batch(data: bytes) -> list[Pair]:
    """The pairs of a batch marker. SerializationError if it is unreadable (or names an
    invalid task id), NewerMarkerError if a newer OmniQ wrote it."""
    try:
        batch = codec.decode(data, ExpiryBatch)
    except SerializationError:
        doc = _loads_or_none(data)
        version = doc.get("v") if isinstance(doc, dict) else None
        if type(version) is int and version > MARKER_VERSION:
            raise NewerMarkerError(f"batch marker version {version}") from None
        raise
    if batch.v > MARKER_VERSION:
        raise NewerMarkerError(f"batch marker version {batch.v}")
    if batch.v < 1:
        raise SerializationError(f"batch marker version {batch.v} is not valid")
    for ms, task_id in batch.expiry:
        try:
            validate_name(task_id, "task id")
        except InvalidNameError as exc:
            raise SerializationError(f"the batch marker names a bad task id: {exc}") from exc
        if not 0 <= ms <= MAX_MS:
            raise SerializationError(f"expiry {ms} of task {task_id!r} is out of range")
    return list(batch.expiry)


def _loads_or_none(data: bytes) -> object:
    try:
        return codec.loads(data)
    except SerializationError:
        return None


def batch_writes(pairs: Iterable[Pair]) -> list[tuple[str, bytes]]:
    """``(key, body)`` of the batch markers holding ``pairs``: one per expiry hour."""
    by_bucket: dict[str, set[Pair]] = {}
    for pair in pairs:
        by_bucket.setdefault(layout.bucket(pair[0]), set()).add(pair)
    out = []
    for group in by_bucket.values():
        first = min(ms for ms, _ in group)
        out.append((layout.batch_key(first, uuid.uuid4().hex), encode_batch(group)))
    return out


class MarkerBuffer:
    """The ``(expires_ms, task_id)`` pairs of results written but not yet marked.

    Not locked: every method runs without awaiting, so coroutines of one event loop (and the
    blocking twin's loop thread) never interleave inside it.
    """

    def __init__(self, size: int, interval: float) -> None:
        self.size = size
        self.interval = interval
        self.pairs: list[Pair] = []
        self.since = 0.0  # clock reading when the oldest buffered pair was added
        self.hold_until = 0.0  # after a failed flush, no automatic retry before this

    def __len__(self) -> int:
        return len(self.pairs)

    def add(self, pair: Pair, now: float) -> None:
        if not self.pairs:
            self.since = now
        self.pairs.append(pair)

    def due(self, now: float) -> bool:
        """Whether a flush is due: ``size`` pairs buffered, or the oldest has waited
        ``interval`` seconds (or the clock went back)."""
        if not self.pairs or now < self.hold_until:
            return False
        return len(self.pairs) >= self.size or now - self.since >= self.interval or now < self.since

    def take(self) -> list[Pair]:
        pairs, self.pairs = self.pairs, []
        return pairs

    def restore(self, pairs: list[Pair], now: float) -> int:
        """Put back the pairs of a failed flush; automatic retries pause for ``interval``.
        While writes keep failing the buffer holds at most ``HELD_BATCHES`` batches: older
        pairs are dropped (their results are still found by ``cleanup_expired(sweep=True)``,
        the backstop for markers never written). Returns how many were dropped."""
        if not self.pairs:
            self.since = now
        self.pairs[:0] = pairs
        self.hold_until = now + self.interval
        dropped = max(0, len(self.pairs) - HELD_BATCHES * self.size)
        del self.pairs[:dropped]
        return dropped
