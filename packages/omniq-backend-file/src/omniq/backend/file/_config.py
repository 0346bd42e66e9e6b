"""Backend configuration from keyword arguments, a dict and environment variables.

Precedence, highest first: keyword arguments > the ``config`` dict > ``OMNIQ_*`` environment
variables > defaults. ``storage_options`` are never printed (``repr`` hides them).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from omniq.core.errors import ConfigurationError

ENV_PREFIX = "OMNIQ_"


@dataclasses.dataclass
class PartConfig:
    """Where one part (queue, results or events) keeps its files."""

    base_dir: str
    storage_options: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    def __repr__(self) -> str:
        from omniq.core.fs import redact_url

        hidden = ", storage_options=<hidden>" if self.storage_options else ""
        return f"PartConfig({redact_url(self.base_dir)!r}{hidden})"


@dataclasses.dataclass
class BackendConfig:
    """Resolved settings of a backend (see ``BackendConfig.FIELDS`` for the env names)."""

    base_dir: str | None = None
    storage_options: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)
    results: bool = True
    events: bool = False
    # None: each event is written before the call that made it returns. Seconds: events go
    # to the events' background writer, in batch files, within that long.
    event_flush_interval: float | None = None
    # {queue: n}: that queue's tasks are stored in n shards (docs/queue.md, "Sharded queues").
    queue_shards: dict[str, int] | None = None
    queue_dir: str | None = None
    queue_options: dict[str, Any] | None = dataclasses.field(default=None, repr=False)
    results_dir: str | None = None
    results_options: dict[str, Any] | None = dataclasses.field(default=None, repr=False)
    events_dir: str | None = None
    events_options: dict[str, Any] | None = dataclasses.field(default=None, repr=False)
    result_ttl: float | None = 7 * 24 * 3600.0
    event_retention: float | None = 30 * 24 * 3600.0
    lease: float = 60.0
    clock_skew: float = 5.0
    max_retries: int = 0
    timeout: float | None = None
    immediate: bool = False

    def __repr__(self) -> str:
        from omniq.core.fs import redact_url

        # Directory URLs may carry ``user:password@``; options are never shown.
        shown: list[str] = []
        for field in dataclasses.fields(self):
            if field.repr:
                value = getattr(self, field.name)
                if field.name.endswith("_dir") and isinstance(value, str):
                    value = redact_url(value)
                shown.append(f"{field.name}={value!r}")
        return f"BackendConfig({', '.join(shown)})"

    def part(self, name: str) -> PartConfig:
        own_dir = getattr(self, f"{name}_dir")
        own_options = getattr(self, f"{name}_options")
        if own_dir is None:
            if self.base_dir is None:
                raise ConfigurationError(
                    f"no storage for {name}: give base_dir (or OMNIQ_BASE_DIR), or {name}_dir"
                )
            own_dir = f"{self.base_dir.rstrip('/')}/{name}"
            options = self.storage_options if own_options is None else own_options
        else:
            options = (
                own_options
                if own_options is not None
                else (self.storage_options if self.base_dir is None else {})
            )
        return PartConfig(own_dir, dict(options))


_BOOL = {
    "1": True,
    "true": True,
    "yes": True,
    "on": True,
    "0": False,
    "false": False,
    "no": False,
    "off": False,
}


def _convert(name: str, value: Any, kind: Any) -> Any:
    if value is None:
        return None
    text_kind = str(kind)
    try:
        if "bool" in text_kind and isinstance(value, str):
            return _BOOL[value.strip().lower()]
        if "dict" in text_kind and isinstance(value, str):
            parsed = json.loads(value)
            if not isinstance(parsed, dict):
                raise ValueError("not a JSON object")
            return parsed
        if "float" in text_kind and isinstance(value, str):
            return None if value.strip().lower() in ("", "none") else float(value)
        if "int" in text_kind and isinstance(value, str):
            return int(value)
    except (KeyError, ValueError) as exc:
        # The value may be a secret (storage options): name the setting, never the value.
        raise ConfigurationError(
            f"setting {name} has an invalid value ({type(exc).__name__})"
        ) from None
    return value


def resolve_config(
    kwargs: Mapping[str, Any],
    config: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> BackendConfig:
    """Merge the three sources; unknown keys are an error (typos must not pass silently)."""
    fields = {f.name: f for f in dataclasses.fields(BackendConfig)}
    values: dict[str, Any] = {}
    env = os.environ if environ is None else environ
    for name, field in fields.items():
        key = ENV_PREFIX + name.upper()
        if key in env:
            values[name] = _convert(key, env[key], field.type)
    for source, label in ((config or {}, "config"), (kwargs, "argument")):
        for name, value in source.items():
            if name not in fields:
                raise ConfigurationError(f"unknown {label} {name!r}; known: {sorted(fields)}")
            if value is not None or label == "config":
                values[name] = _convert(name, value, fields[name].type)
    if isinstance(values.get("base_dir"), os.PathLike):
        values["base_dir"] = os.fspath(values["base_dir"])
    return BackendConfig(**values)
