"""Many blobs deleted in one request on Azure: a blob batch (up to 256 deletes a request).
adlfs' ``rm`` sends one DELETE a blob. Called with the filesystem inside the
``DirFileSystem``; ``_fsspec_ops`` runs it on the right loop and retries it (deleting is
idempotent: a blob already gone is not an error)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from ._azure_rest import container_client

BATCH = 256  # the most sub-requests Azure takes in one batch
_ACCEPTED, _GONE = 202, 404
# The batch itself refused (an account, a token or an emulator without blob batches):
# each blob on its own. Any other status (408, 429, 5xx) is raised, to be retried.
_REFUSED = frozenset({400, 403, 404, 405, 501})


async def azure_delete(azure: Any, paths: list[str]) -> None:
    """Delete ``paths`` (``container/key``), absent ones included: one batch request per
    ``BATCH`` blobs. A blob the batch did not delete (say, a lease on it) is deleted on its
    own, so that its error is the one a single delete raises."""
    from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

    keys: defaultdict[str, list[str]] = defaultdict(list)
    for path in paths:
        container, key, _ = azure.split_path(path)
        keys[container].append(key)
    for container, names in keys.items():
        client = container_client(azure, container)
        left: list[str] = []
        for start in range(0, len(names), BATCH):
            chunk = names[start : start + BATCH]
            try:
                replies = await client.delete_blobs(*chunk, raise_on_any_failure=False)
            except HttpResponseError as exc:
                if exc.status_code not in _REFUSED:
                    raise
                left += chunk
                continue
            statuses = [reply.status_code async for reply in replies]
            left += [n for n, s in zip(chunk, statuses, strict=True) if s not in (_ACCEPTED, _GONE)]
        for name in left:
            try:
                await client.delete_blob(name)
            except ResourceNotFoundError:
                pass
