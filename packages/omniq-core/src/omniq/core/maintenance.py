"""Housekeeping shared by the file storages' ``maintain``: the sweep of stale temporary files.

A local directory's writes go through a temporary file (``.tmp-*``) renamed or linked into
place milliseconds later, unless the file is made nameless (``O_TMPFILE``, where that is the
faster way: see ``_local_ops``); a process killed in between leaves one behind (never read as
data).
Each file storage's ``maintain(sweep=True)`` removes those under its own directory.
"""

from __future__ import annotations

import logging

from ._redact import RedactFilter
from .fs import Store

# The worker's logger, where this warning was logged before the sweep moved into the
# storages: filters and levels set on "omniq.worker" still apply to it.
log = logging.getLogger("omniq.worker")
if not any(isinstance(f, RedactFilter) for f in log.filters):
    log.addFilter(RedactFilter())  # storage errors may quote URLs; credentials never show

TEMP_FILE_AGE = 3600
"""Seconds after which a temporary file counts as left by a killed process (one hour)."""


async def sweep_temp_files(store: Store, older_than: float = TEMP_FILE_AGE) -> list[str]:
    """Remove the temporary files older than ``older_than`` seconds under ``store`` (any
    depth; only local directories have them) and log a warning naming how many. Returns
    their keys."""
    removed = await store.sweep_temp(older_than=older_than)
    if removed:
        log.warning(
            "removed %d temporary file(s) older than %d s under %s, left by a process "
            "killed while writing (first: %s)",
            len(removed),
            older_than,
            store.url,
            removed[0],
        )
    return removed
