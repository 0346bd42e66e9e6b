"""Key layout of the result storage under ``base_dir`` (see ``docs/results-events.md``).

::

    results/{task_id}.json                              the result (one JSON document)
    results/_expiry/{YYYY-MM-DDTHH}/{expires_ms:013d}.{task_id}
                                                        empty expiry marker, bucketed by the
                                                        UTC hour in which the result expires
    results/_quarantine/{task_id}.json.{time_ns}-{rand} unreadable result files, moved aside

Task ids never start with ``_`` (``validate_name``), so ``_expiry`` and ``_quarantine`` cannot
collide with a result, and listing ``results/`` returns result files only.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from omniq.core.models import UTC

RESULTS = "results"
EXPIRY = "results/_expiry"
QUARANTINE = "results/_quarantine"
SUFFIX = ".json"
BUCKET_FORMAT = "%Y-%m-%dT%H"
BUCKET_SECONDS = 3600

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
    return datetime.fromtimestamp(expires_ms / 1000, UTC).strftime(BUCKET_FORMAT)


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
