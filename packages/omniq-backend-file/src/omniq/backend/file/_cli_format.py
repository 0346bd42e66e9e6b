"""Helpers of the ``omniq`` command: secret redaction, time parsing, tables and JSON output
(its argument parser: ``_cli_parser``)."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

import msgspec

from omniq.core import _redact
from omniq.core.models import UTC, ErrorInfo, QueueSize, TaskEvent, TaskInfo, TaskResult

ENV_STORAGE_OPTIONS = "OMNIQ_STORAGE_OPTIONS"


class CliError(Exception):
    """An expected failure: printed as ``omniq: error: ...`` and turned into an exit code."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


# -- secrets -----------------------------------------------------------------------------------
class Redactor:
    """Remembers the credentials in storage options and hides them in anything printed to
    stderr (error messages, log records), as well as URL userinfo, AWS key ids and the
    credentials of every store of the process. Public settings such as ``endpoint_url`` stay
    readable (minus any userinfo). ``add_raw`` takes the raw JSON text, valid or not."""

    MIN_LENGTH = 4  # shorter values ("1", "us") are not secrets and would mangle output

    def __init__(self) -> None:
        self.secrets: set[str] = set()

    def add_raw(self, text: str | None) -> None:
        if not text:
            return
        self.secrets.add(text.strip())
        try:
            value = json.loads(text)
        except ValueError:
            # Not JSON: also hide every quoted string and bare token in it, to be safe.
            for token in re.findall(r'"([^"]*)"|([^\s"{}\[\],:]+)', text):
                self._add(token[0] or token[1])
            return
        self.add_value(value)

    def add_value(self, value: Any) -> None:
        if isinstance(value, dict):
            for secret in _redact.option_secrets(value):
                self._add(secret)
        elif isinstance(value, (list, tuple)):
            for item in value:
                self.add_value(item)
        elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
            self._add(str(value))

    def _add(self, text: str) -> None:
        if len(text) >= self.MIN_LENGTH:
            self.secrets.add(text)

    def __call__(self, text: str) -> str:
        for secret in sorted(self.secrets, key=len, reverse=True):
            if secret in text:
                text = text.replace(secret, "***")
        return _redact.redact(text)


class RedactingFormatter(logging.Formatter):
    """A log formatter that passes every formatted record (with traceback) through a Redactor."""

    def __init__(self, fmt: str, redactor: Redactor) -> None:
        super().__init__(fmt)
        self.redactor = redactor

    def format(self, record: logging.LogRecord) -> str:
        return self.redactor(super().format(record))


# -- command line ----------------------------------------------------------------------------------
def json_flag(text: str | None, flag: str, kind: type) -> Any:
    """Parse a JSON flag; the message names the flag and never echoes the value."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        where = (
            f"line {exc.lineno} column {exc.colno}"
            if isinstance(exc, json.JSONDecodeError)
            else "the value"
        )
        raise CliError(f"{flag} is not valid JSON ({where})") from None
    if not isinstance(value, kind):
        expected = "a JSON object ({...})" if kind is dict else "a JSON array ([...])"
        raise CliError(f"{flag} must be {expected}, not a JSON {type(value).__name__}")
    return value


def prepare_argv(argv: list[str]) -> list[str]:
    """``--since -10m`` would look like an option to argparse: glue such values on."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        if i and argv[i - 1] in ("--since", "--until") and arg.startswith("-") and out:
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def storage_options_text(argv: Sequence[str]) -> list[str]:
    """The raw values given to ``--storage-options`` (to hide them before parsing)."""
    found = []
    for i, arg in enumerate(argv):
        if arg == "--storage-options" and i + 1 < len(argv):
            found.append(argv[i + 1])
        elif arg.startswith("--storage-options="):
            found.append(arg.partition("=")[2])
    return found


def leaf(exc: BaseException) -> BaseException:
    """The single exception inside (nested) exception groups, else ``exc``."""
    while isinstance(getattr(exc, "exceptions", None), tuple) and len(exc.exceptions) == 1:  # type: ignore[attr-defined]
        exc = exc.exceptions[0]  # type: ignore[attr-defined]
    return exc


# -- time ----------------------------------------------------------------------------------------
_RELATIVE = re.compile(r"([+-]?)(\d+(?:\.\d+)?)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_when(text: str, flag: str, now: datetime | None = None) -> datetime:
    """``2026-01-31T12:00:00Z`` (naive means UTC), ``now``, or relative ``10m`` / ``-10m``
    (ago) and ``+10m`` (ahead); units s, m, h, d, w."""
    now = now or datetime.now(UTC)
    value = text.strip()
    if value.lower() == "now":
        return now
    match = _RELATIVE.fullmatch(value)
    if match:
        sign, amount, unit = match.groups()
        delta = timedelta(seconds=float(amount) * _UNITS[unit])
        return now + delta if sign == "+" else now - delta
    try:
        when = datetime.fromisoformat(
            value[:-1] + "+00:00" if value.endswith(("Z", "z")) else value
        )
    except ValueError:
        raise CliError(
            f"{flag}: {text!r} is neither an ISO time (2026-01-31T12:00:00Z) nor a "
            "relative time like -10m, 2h, 1d"
        ) from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def fmt_time(when: datetime | None) -> str:
    if when is None:
        return "-"
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- values --------------------------------------------------------------------------------------
def to_json(obj: Any) -> str:
    """Compact JSON for a model or a plain value (datetimes as ISO strings)."""
    return msgspec.json.encode(msgspec.to_builtins(obj)).decode()


def short_type(name: str) -> str:
    return name[len("builtins.") :] if name.startswith("builtins.") else name


def fmt_error(error: ErrorInfo | None, width: int | None = None) -> str:
    if error is None:
        return ""
    text = f"{short_type(error.type)}: {error.message}" if error.message else short_type(error.type)
    text = " ".join(text.split())
    return clip(text, width)


def clip(text: str, width: int | None) -> str:
    if width is not None and len(text) > width:
        return text[: max(1, width - 1)] + "…"
    return text


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], right: Sequence[int] = ()) -> str:
    """Columns aligned on the widest cell; column indexes in ``right`` are right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


# -- the commands' output ------------------------------------------------------------------------
def status_table(sizes: dict[str, QueueSize]) -> str:
    if not sizes:
        return "(no queues yet)"
    rows: list[list[Any]] = [
        [name, s.ready, s.scheduled, s.running, s.dead] for name, s in sorted(sizes.items())
    ]
    if len(rows) > 1:
        rows.append(["(total)", *(sum(s[i] for s in rows) for i in range(1, 5))])
    return table(["QUEUE", "READY", "SCHEDULED", "RUNNING", "DEAD"], rows, right=(1, 2, 3, 4))


def task_status_text(info: TaskInfo, task_id: str, *, tty: bool) -> str:
    """``omniq status --task``: where the task stands and, while it runs, what it reported
    (a progress bar on a terminal, a percentage otherwise) and its metadata."""
    from ._cli_progress import bar

    head = f"task {task_id}  {info.status.value}"
    details = [
        f"attempt {info.attempt}" if info.attempt is not None else "",
        f"worker {info.worker_id}" if info.worker_id else "",
        f"lease until {fmt_time(info.lease_until)}" if info.lease_until else "",
    ]
    if any(details):
        head += "  (" + ", ".join(d for d in details if d) + ")"
    lines = [head]
    if info.task is not None:
        lines.append(f"func      {info.task.func}  queue {info.task.queue}")
    progress = info.progress
    if progress is not None:
        count = f"{progress.done:g}" + (f"/{progress.total:g}" if progress.total else "")
        fraction = progress.fraction
        shown = count if fraction is None else f"{fraction:.0%} ({count})"
        if fraction is not None and tty:
            shown = f"{bar(fraction)} {shown}"
        message = f"  {progress.message}" if progress.message else ""
        lines.append(f"progress  {shown}{message}  at {fmt_time(progress.at)}")
    if info.metadata:
        lines.append(f"metadata  {to_json(info.metadata)}")
    if info.error is not None:
        lines.append(f"error     {fmt_error(info.error)}")
    return "\n".join(lines)


def status_json(sizes: dict[str, QueueSize], when: datetime) -> str:
    return to_json(
        {
            "time": fmt_time(when),
            "queues": {
                name: {
                    "ready": s.ready,
                    "scheduled": s.scheduled,
                    "running": s.running,
                    "dead": s.dead,
                }
                for name, s in sorted(sizes.items())
            },
        }
    )


def event_line(event: TaskEvent) -> str:
    """time  type  task  #attempt  worker  [duration]  [error]"""
    parts = [
        fmt_time(event.time),
        f"{event.type.value:<13}",
        event.task_id,
        f"#{event.attempt}" if event.attempt is not None else "#-",
        event.worker_id or "-",
    ]
    if event.duration is not None:
        parts.append(f"{event.duration:.3f}s")
    if event.error is not None:
        parts.append(fmt_error(event.error, 120))
    return "  ".join(parts)


def dead_table(items: list[tuple[str, TaskInfo]]) -> str:
    if not items:
        return "(no dead-lettered tasks)"
    rows = []
    for queue, info in items:
        task = info.task
        rows.append(
            [
                task.id if task else "?",
                queue,
                task.func if task else "?",
                task.attempt if task else "-",
                fmt_time(task.created_at) if task else "-",
                fmt_error(info.error, 80),
            ]
        )
    return table(
        ["TASK", "QUEUE", "FUNCTION", "ATTEMPTS", "CREATED", "LAST ERROR"], rows, right=(3,)
    )


def tasks_table(items: list[TaskInfo], *, tty: bool = False) -> str:
    """``omniq tasks``: one row per task. WHEN is the due time of a scheduled task, the lease
    end of a running one, else the creation time; NOTE the progress of a running task (a bar
    on a terminal) or the last error."""
    from ._cli_progress import bar

    if not items:
        return "(no tasks)"
    rows = []
    for info in items:
        task = info.task
        when = None if task is None else task.created_at
        if task is not None and info.status.value == "scheduled":
            when = task.eta
        elif info.status.value == "running":
            when = info.lease_until
        note = fmt_error(info.error, 60)
        progress = info.progress
        if progress is not None:
            fraction = progress.fraction
            note = f"{progress.done:g}" + (f"/{progress.total:g}" if progress.total else "")
            if fraction is not None:
                note = (f"{bar(fraction, 10)} " if tty else "") + f"{fraction:.0%} ({note})"
            note = clip(f"{note} {progress.message or ''}".rstrip(), 60)
        rows.append(
            [
                task.id if task else "?",
                task.queue if task else "?",
                info.status.value,
                task.func if task else "?",
                info.attempt if info.attempt is not None else "-",
                fmt_time(when),
                info.worker_id or "-",
                note,
            ]
        )
    headers = ["TASK", "QUEUE", "STATUS", "FUNCTION", "ATTEMPT", "WHEN", "WORKER", "NOTE"]
    return table(headers, rows, right=(4,))


def failure_text(result: TaskResult) -> str:
    error = result.error
    head = f"task {result.task_id} failed on attempt {result.attempt}"
    if error is None:
        return head
    lines = [head, f"{short_type(error.type)}: {error.message}"]
    if error.traceback:
        lines += ["", error.traceback.rstrip()]
    return "\n".join(lines)
