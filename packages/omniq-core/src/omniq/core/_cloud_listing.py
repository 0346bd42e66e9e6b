"""One-request listings on S3, GCS and Azure, called with the filesystem inside the
``DirFileSystem`` (``_fsspec_ops`` runs them on the right loop and retries them): the entries
of a prefix (its files and sub-directories), and the names after a given one in key order. The
fsspec plugins' own listings look again at an empty prefix (is it a file?), adlfs' walks the
parent level first, and none can start after a name; and the head of a two-level prefix (its
sub-directories' files in key order) in one flat listing. Azure's are read from the List Blobs
XML (``_azure_rest``: the SDK's pager cost several times the CPU)."""

from __future__ import annotations

import functools
from email.utils import parsedate_to_datetime
from typing import Any

from ._azure_rest import AzureBlob, azure_page, container_client


def _prefix(key: str) -> str:
    """The listing prefix of the "directory" ``key`` (the bucket's root: empty)."""
    return f"{key.rstrip('/')}/" if key else ""


async def s3_files(s3: Any, path: str) -> list[dict[str, Any]]:
    """The detailed listing of ``path`` (its files and sub-directories, as fsspec's ``ls``
    gives them; [] if absent): one LIST request per 1,000 entries, none for the parent (an
    idle queue's reaper pass paid one for its empty ``run/``)."""
    try:
        return list(await s3._lsdir(s3._strip_protocol(path).rstrip("/"), refresh=True))
    except FileNotFoundError:
        return []


async def gcs_files(gcs: Any, path: str) -> list[dict[str, Any]]:
    """The detailed listing of ``path`` ([] if absent): object-listing pages with a delimiter,
    no GET of the object ``path`` when it is empty (gcsfs' ``ls`` makes one: is it a file?)."""
    bucket, key, _ = gcs.split_path(path)
    prefix = _prefix(key)
    out: list[dict[str, Any]] = []
    more: dict[str, Any] = {}
    while True:
        page = await gcs._call_list_objects(
            bucket, delimiter="/", prefix=prefix or None, maxResults=1000, **more
        )
        out += [
            {"name": f"{bucket}/{p.rstrip('/')}", "size": 0, "type": "directory"}
            for p in page.get("prefixes", [])
        ]
        out += [
            gcs._process_object(bucket, item)
            for item in page.get("items", [])
            if not item["name"].endswith("/")  # a "directory" placeholder object
        ]
        if not page.get("nextPageToken"):
            return out
        more = {"pageToken": page["nextPageToken"]}


def _azure_container(azure: Any, path: str) -> tuple[Any, str]:
    """The container client of ``path`` and the listing prefix inside it."""
    container, key, _ = azure.split_path(path)
    return container_client(azure, container), _prefix(key)


def _azure_query(prefix: str, per_page: int, **more: str) -> dict[str, str]:
    return {"maxresults": str(per_page), **({"prefix": prefix} if prefix else {}), **more}


def _azure_info(container: str, blob: AzureBlob) -> dict[str, Any]:
    """fsspec's entry of a listed blob: a directory for a prefix or for Data Lake's folder
    blob (metadata ``hdi_isfolder``), else a file with its size and last modified time."""
    name = f"{container}/{blob.name.rstrip('/')}"
    folder = any(
        m.tag.lower() == "hdi_isfolder" and (m.text or "").lower() == "true"
        for m in blob.node.iterfind("Metadata/*")
    )
    if blob.prefix or blob.name.endswith("/") or folder:
        return {"name": name, "size": 0, "type": "directory"}
    modified = blob.node.findtext("Properties/Last-Modified")
    return {
        "name": name,
        "size": int(blob.node.findtext("Properties/Content-Length") or 0),
        "type": "file",
        "last_modified": parsedate_to_datetime(modified) if modified else None,
    }


async def azure_files(azure: Any, path: str) -> list[dict[str, Any]]:
    """The detailed listing of ``path`` ([] if absent): one walk with a delimiter inside the
    prefix. adlfs' ``ls`` walks the parent level first (two listing requests) and HEADs
    an empty prefix (is it a file?)."""
    client, prefix = _azure_container(azure, path)
    out: list[dict[str, Any]] = []
    query = _azure_query(prefix, 1000, delimiter="/", include="metadata")
    while True:
        page, query["marker"] = await azure_page(client, query)
        out += [_azure_info(client.container_name, blob) for blob in page]
        if not query["marker"]:
            return out


async def gcs_after(gcs: Any, path: str, after: str, limit: int) -> list[str]:
    """Up to ``limit`` file names under ``path`` after ``after``: one GET of the object
    listing with ``startOffset`` (inclusive: one more is asked for) and ``maxResults``."""
    bucket, key, _ = gcs.split_path(path)
    prefix = _prefix(key)
    extra = 1 if after else 0
    page = await gcs._call_list_objects(
        bucket,
        delimiter="/",
        prefix=prefix or None,
        startOffset=f"{prefix}{after}" if after else None,
        maxResults=limit + extra,
    )
    names = [item["name"][len(prefix) :] for item in page.get("items", [])]
    return [n for n in names if n > after and "/" not in n][:limit]


@functools.cache
def azure_starts_from() -> bool:
    """Whether the installed azure-storage-blob sends ``startFrom`` (12.28 and later; the
    storage distributions' ``azure`` extras require it, adlfs alone does not)."""
    from importlib.metadata import version

    major, minor = (int(part) for part in version("azure-storage-blob").split(".")[:2])
    return (major, minor) >= (12, 28)


async def azure_after(azure: Any, path: str, after: str, limit: int) -> list[str]:
    """Up to ``limit`` blob names under ``path`` after ``after``: a listing page from
    ``after`` on (``startFrom``, inclusive: one more is asked for; service version
    2026-02-06), and more pages only if sub-directories took places. With an SDK older than
    12.28, pages from the prefix's start until ``limit`` names after ``after``."""
    client, prefix = _azure_container(azure, path)
    out: list[str] = []
    start = {"startFrom": f"{prefix}{after}"} if after and azure_starts_from() else {}
    query = _azure_query(prefix, limit + len(start), delimiter="/", **start)
    while len(out) < limit:
        page, query["marker"] = await azure_page(client, query)
        for blob in page:
            name = blob.name[len(prefix) :]
            if name and not blob.prefix and "/" not in name and name > after:
                out.append(name)
        if not query["marker"]:
            break
    return out[:limit]


async def s3_after(s3: Any, path: str, after: str, limit: int) -> list[str]:
    """Up to ``limit`` file names under ``path`` that sort after ``after``: one LIST request
    (``StartAfter``), wherever in a large prefix they are."""
    bucket, key, _ = s3.split_path(path)
    prefix = _prefix(key)
    response = await s3._call_s3(
        "list_objects_v2",
        Bucket=bucket,
        Prefix=prefix,
        Delimiter="/",
        StartAfter=f"{prefix}{after}",
        MaxKeys=limit,
    )
    return [item["Key"][len(prefix) :] for item in response.get("Contents", [])]


def _two_levels(names: list[str]) -> list[str]:
    """``dir/name`` entries of a flat listing (no deeper keys, directory markers or hidden
    names), in key order. (A Data Lake folder blob one level down would pass: ``listtree``
    is for directories of files.)"""
    out = []
    for name in names:
        parts = name.split("/")
        if len(parts) == 2 and all(p and not p.startswith(".") for p in parts):
            out.append(name)
    return out


async def s3_tree(s3: Any, path: str, limit: int) -> list[str]:
    """The first ``limit`` keys below ``path``'s sub-directories, as ``dir/name``: one LIST
    without a delimiter (more only if deeper keys took places in it)."""
    bucket, key, _ = s3.split_path(path)
    prefix = _prefix(key)
    names: list[str] = []
    more: dict[str, Any] = {}
    while True:
        response = await s3._call_s3(
            "list_objects_v2", Bucket=bucket, Prefix=prefix, MaxKeys=limit, **more
        )
        keys = [item["Key"][len(prefix) :] for item in response.get("Contents", [])]
        names += _two_levels(keys)
        if len(names) >= limit or not response.get("IsTruncated"):
            return names[:limit]
        more = {"ContinuationToken": response["NextContinuationToken"]}


async def gcs_tree(gcs: Any, path: str, limit: int) -> list[str]:
    """As ``s3_tree``: a GET of the object listing without a delimiter."""
    bucket, key, _ = gcs.split_path(path)
    prefix = _prefix(key)
    names: list[str] = []
    more: dict[str, Any] = {}
    while True:
        page = await gcs._call_list_objects(bucket, prefix=prefix or None, maxResults=limit, **more)
        names += _two_levels([item["name"][len(prefix) :] for item in page.get("items", [])])
        if len(names) >= limit or not page.get("nextPageToken"):
            return names[:limit]
        more = {"pageToken": page["nextPageToken"]}


async def azure_tree(azure: Any, path: str, limit: int) -> list[str]:
    """As ``s3_tree``: pages of a flat blob listing until ``limit`` names (usually one
    request; the service may also return a short page with a continuation)."""
    client, prefix = _azure_container(azure, path)
    names: list[str] = []
    query = _azure_query(prefix, limit)
    while len(names) < limit:
        page, query["marker"] = await azure_page(client, query)
        names += _two_levels([blob.name[len(prefix) :] for blob in page])
        if not query["marker"]:
            break
    return names[:limit]
