"""The one JSON codec. User values round-trip exactly or are refused at encode time.

JSON carries ``dict`` (string keys), ``list``, ``str``, ``int`` (64-bit), finite ``float``,
``bool`` and ``None``. Tuples are accepted and come back as lists (JSON has no tuple).
Anything else (datetime, bytes, sets, objects, NaN, ...) raises :class:`SerializationError`
naming the type and where it was found. Pickle is never used.
"""

from __future__ import annotations

import math
from typing import Any, TypeVar

import msgspec

from .errors import SerializationError
from .models import SCHEMA_VERSION, Task, TaskEvent, TaskResult

T = TypeVar("T")

MAX_DEPTH = 64
"""Deepest nesting of user values accepted."""

MAX_DOCUMENT_BYTES = 8 * 1024 * 1024
"""Largest encoded task or result accepted (8 MiB); store bigger payloads elsewhere."""

_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1
_SCALARS = (str, bool, type(None))
_EMPTY_OK = (dict, list, tuple, str, bool, type(None), int, float)  # an empty/zero one is valid

_encoder = msgspec.json.Encoder()
_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}


def _plain(value: Any, depth: int) -> bool:
    """Whether ``value`` round-trips (a quick walk with no paths: the usual case; when this
    says no, ``check_json_value`` walks again to say where)."""
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return True
    if kind is int:
        return bool(_INT_MIN <= value <= _INT_MAX)
    if kind is float:
        return math.isfinite(value)
    if depth >= MAX_DEPTH:
        return False
    if kind is dict:
        for key, sub in value.items():
            if type(key) is not str or not _plain(sub, depth + 1):
                return False
        return True
    if kind is list or kind is tuple:
        for sub in value:  # noqa: SIM110 (a loop: all() and its generator cost more here)
            if not _plain(sub, depth + 1):
                return False
        return True
    return False  # a str subclass, say: the full walk decides


def check_json_value(value: Any, where: str = "value") -> None:
    """Raise :class:`SerializationError` unless ``value`` round-trips through JSON exactly."""
    if not value and type(value) in _EMPTY_OK:  # most kwargs and metadata: nothing to walk
        return
    if _plain(value, 0):
        return
    stack: list[tuple[Any, str, int]] = [(value, where, 0)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, _SCALARS):
            continue
        kind = type(item)
        if kind is int:
            if not _INT_MIN <= item <= _INT_MAX:
                raise SerializationError(f"{path}: integer {item} does not fit in 64 bits")
            continue
        if kind is float:
            if not math.isfinite(item):
                raise SerializationError(f"{path}: {item!r} cannot be stored as JSON")
            continue
        if depth >= MAX_DEPTH:
            raise SerializationError(f"{path}: nested deeper than {MAX_DEPTH} levels")
        if kind is dict:
            for key, sub in item.items():
                if type(key) is not str:
                    raise SerializationError(
                        f"{path}: dict key {key!r} of type {type(key).__name__} is not a string; "
                        "JSON object keys must be str"
                    )
                stack.append((sub, f"{path}[{key!r}]", depth + 1))
            continue
        if kind is list or kind is tuple:
            for index, sub in enumerate(item):
                stack.append((sub, f"{path}[{index}]", depth + 1))
            continue
        raise SerializationError(
            f"{path}: value of type {kind.__module__}.{kind.__qualname__} cannot be stored as "
            "JSON; pass plain dicts, lists, strings, numbers, booleans or None"
        )


def check_task(task: Task) -> None:
    check_json_value(task.args, "args")
    check_json_value(task.kwargs, "kwargs")
    check_json_value(task.metadata, "metadata")


def encode(obj: Any) -> bytes:
    """Encode a model (Task, TaskResult, TaskEvent, ...) as JSON bytes."""
    if isinstance(obj, Task):
        check_task(obj)
    elif isinstance(obj, TaskResult):
        check_json_value(obj.value, "result value")
    elif isinstance(obj, TaskEvent):
        check_json_value(obj.data, "event data")
    try:
        data = _encoder.encode(obj)
    except (TypeError, ValueError, OverflowError) as exc:
        raise SerializationError(f"cannot encode {type(obj).__name__}: {exc}") from exc
    if len(data) > MAX_DOCUMENT_BYTES:
        raise SerializationError(
            f"{type(obj).__name__} is {len(data)} bytes encoded; the limit is "
            f"{MAX_DOCUMENT_BYTES} bytes (store large payloads elsewhere and pass a reference)"
        )
    return data


def decode(data: bytes, kind: type[T]) -> T:
    """Decode JSON bytes into ``kind``; any malformed input raises SerializationError."""
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.json.Decoder(kind)
    try:
        return decoder.decode(data)  # type: ignore[no-any-return]
    except (msgspec.DecodeError, ValueError, TypeError) as exc:
        raise SerializationError(f"cannot decode {kind.__name__}: {exc}") from exc


def dumps(value: Any) -> bytes:
    """Encode a plain JSON value (checked)."""
    check_json_value(value)
    return _encoder.encode(value)


def loads(data: bytes) -> Any:
    try:
        return msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        raise SerializationError(f"not valid JSON: {exc}") from exc


def is_newer_schema(data: bytes) -> bool:
    """Whether ``data`` is a document (or a claim holding one) written by a newer OmniQ:
    such files are left in place for upgraded workers instead of being quarantined."""
    try:
        doc = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return False
    if not isinstance(doc, dict):
        return False
    inner = doc.get("task")
    versions = [doc.get("v"), inner.get("v") if isinstance(inner, dict) else None]
    return any(type(v) is int and v > SCHEMA_VERSION for v in versions)
