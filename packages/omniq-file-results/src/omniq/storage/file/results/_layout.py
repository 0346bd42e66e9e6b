"""Key layout of the result storage under ``base_dir`` (see ``docs/results-events.md``).

::

    results/{task_id}.json                              the result (one JSON document)
    results/_expiry/{YYYY-MM-DDTHH}/{min_expires_ms:013d}-{rand}.batch
                                                        batch expiry marker: a JSON list of
                                                        (expires_ms, task_id) pairs expiring in
                                                        that UTC hour (see ``_markers``)
    results/_expiry/{YYYY-MM-DDTHH}/{expires_ms:013d}.{task_id}
                                                        single expiry marker (empty): written by
                                                        ``marker_batch=1`` and by OmniQ <= 0.1.0
    results/_quarantine/{task_id}.json.{time_ns}-{rand} unreadable result files, moved aside

Task ids never start with ``_`` (``validate_name``), so ``_expiry`` and ``_quarantine`` cannot
collide with a result, and listing ``results/`` returns result files only. A batch marker's
name has a ``-`` right after its digits, where a single marker has a ``.``: the two cannot be
confused, and the single-marker parser of older versions skips batch markers.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta

from omniq.core.models import UTC, from_epoch

RESULTS = "results"
EXPIRY = "results/_expiry"
QUARANTINE = "results/_quarantine"
SUFFIX = ".json"
BUCKET_FORMAT = "%Y-%m-%dT%H"
BUCKET_SECONDS = 3600
BATCH_SUFFIX = ".batch"
_BATCH = re.compile(r"(\d{13,})-[0-9a-f]{32}\.batch")

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


def epoch_ms(value: datetime) -> int:
    """Milliseconds since the epoch (exact integer arithmetic, never negative)."""
    return max(0, (value - _EPOCH) // _MS)


def result_key(task_id: str) -> str:
    return f"{RESULTS}/{task_id}{SUFFIX}"


def task_id_of(name: str) -> str | None:
    """``"ID.json"`` -> ``"ID"``; None for anything else."""
    if not name.endswith(SUFFIX) or len(name) <= len(SUFFIX):
        return None
    return name[: -len(SUFFIX)]


def bucket(expires_ms: int) -> str:
    return from_epoch(expires_ms / 1000).strftime(BUCKET_FORMAT)


def bucket_start(name: str) -> float | None:
    """Epoch seconds at which bucket ``name`` starts; None if it is not a bucket name."""
    try:
        return datetime.strptime(name, BUCKET_FORMAT).replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


def marker_key(expires_ms: int, task_id: str) -> str:
    return f"{EXPIRY}/{bucket(expires_ms)}/{expires_ms:013d}.{task_id}"


def parse_marker(name: str) -> tuple[int, str] | None:
    """``"0001714568400123.ID"`` -> (1714568400123, "ID"); None if malformed."""
    ms, _, task_id = name.partition(".")
    if not ms.isdigit() or not task_id:
        return None
    return int(ms), task_id


def batch_key(expires_ms: int, token: str) -> str:
    """Key of a batch marker whose earliest pair expires at ``expires_ms`` (``token``: 32 hex
    digits, random per marker, so that no two writers ever pick the same key)."""
    return f"{EXPIRY}/{bucket(expires_ms)}/{expires_ms:013d}-{token}{BATCH_SUFFIX}"


def parse_batch(name: str) -> int | None:
    """``"0001714568400123-<32 hex>.batch"`` -> 1714568400123 (its earliest expiry); None if
    ``name`` is not a batch marker."""
    match = _BATCH.fullmatch(name)
    return None if match is None else int(match.group(1))
