"""Helpers of the ``omniq`` command: its argument parser, secret redaction, time parsing,
tables and JSON output."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import msgspec

from omniq.core import _redact
from omniq.core.models import UTC, ErrorInfo, EventType, QueueSize, TaskEvent, TaskInfo, TaskResult

ENV_STORAGE_OPTIONS = "OMNIQ_STORAGE_OPTIONS"
DESCRIPTION = "OmniQ: run workers, enqueue tasks, look at queues, results and events."
EPILOG = f"""\
BASE_DIR is a local directory or an fsspec URL (s3://bucket/app, gs://..., abfs://...).
Storage options: --storage-options JSON, else ${ENV_STORAGE_OPTIONS}; other settings from
OMNIQ_* variables (flags win). Credentials are never printed.

exit codes: 0 ok, 1 task failed (result), 2 usage / bad input / unknown storage option /
            no such directory / not found / timeout, 3 storage unreachable or failing (also:
            no exclusive create), 4 internal error (a bug), 130 interrupted

Start with `omniq COMMAND --help`."""


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
class Parser(argparse.ArgumentParser):
    """argparse, but its error messages (which echo bad tokens) go through the redactor."""

    redactor: Redactor = Redactor()

    def error(self, message: str) -> Any:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {self.redactor(message)}\n")


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


# -- parser ----------------------------------------------------------------------------------------
def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    convert.__name__ = kind.__name__
    return convert


def common_parser() -> Parser:
    """The arguments every subcommand takes: the base directory and its storage options."""
    common = Parser(add_help=False)
    common.add_argument(
        "base_dir",
        metavar="BASE_DIR",
        help="local directory or fsspec URL (s3://bucket/prefix, gs://..., "
        "abfs://container/prefix)",
    )
    common.add_argument(
        "--storage-options",
        metavar="JSON",
        help="fsspec storage options as a JSON object (credentials, endpoint); "
        f"default: ${ENV_STORAGE_OPTIONS}. Never printed.",
    )
    return common


def build_parser(handlers: Mapping[str, Callable[[Any], int]]) -> argparse.ArgumentParser:
    """The ``omniq`` parser; ``handlers`` maps each subcommand to its function."""
    parser = Parser(
        prog="omniq",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common = common_parser()
    subs = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=Parser
    )

    def sub(name: str, text: str) -> argparse.ArgumentParser:
        p = subs.add_parser(name, parents=[common], help=text, description=text)
        p.set_defaults(handler=handlers[name])
        return p

    p = sub(
        "worker",
        "Run a worker until Ctrl-C / SIGTERM (or, with --burst, "
        "until the queues are empty); prints its counters at the end.",
    )
    p.add_argument(
        "-q",
        "--queue",
        action="append",
        metavar="QUEUE",
        help="queue to work on (repeatable; default: default)",
    )
    p.add_argument(
        "-c",
        "--concurrency",
        type=_positive(int),
        default=4,
        metavar="N",
        help="tasks run at the same time (default: 4)",
    )
    p.add_argument(
        "--claimers",
        type=_positive(int),
        metavar="N",
        help="claim calls in flight at once while tasks wait (default: 1 on a local "
        "directory, 4 on an object store; at most --concurrency)",
    )
    p.add_argument(
        "--events",
        action="store_true",
        default=None,
        help="record task events (default: $OMNIQ_EVENTS, else off)",
    )
    p.add_argument(
        "--burst",
        action="store_true",
        help="stop once the queues stay empty for --idle-timeout seconds",
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=1.0,
        metavar="S",
        help="with --burst: how long the queues must stay empty (default: 1)",
    )
    p.add_argument(
        "--storage-timeout",
        type=_positive(float),
        default=30.0,
        metavar="S",
        help="with --burst: exit 3 once every claim has failed for S seconds "
        "(storage unreachable; default: 30). Without --burst the worker keeps retrying",
    )
    p.add_argument(
        "--processes",
        type=_positive(int),
        metavar="N",
        help="run plain functions in a pool of N processes (CPU-bound work)",
    )
    p.add_argument(
        "--allow",
        action="append",
        metavar="PREFIX",
        help="only run functions under this module or exact 'pkg.mod:func' "
        "(repeatable); others fail without retry",
    )
    p.add_argument(
        "--lease",
        type=_positive(float),
        metavar="S",
        help="seconds a claim lasts before renewal (default: $OMNIQ_LEASE or 60)",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=30.0,
        metavar="S",
        help="on stop, seconds running tasks may finish before release (default: 30)",
    )
    p.add_argument(
        "--worker-id", metavar="ID", help="name in events and results (default: host-pid-random)"
    )
    p.add_argument(
        "--hook",
        action="append",
        metavar="PKG.MOD:OBJ",
        help="an object with before_task/after_task/on_failure methods (a class is "
        "instantiated; repeatable, called in order)",
    )
    p.add_argument(
        "--progress-interval",
        type=_positive(float),
        default=1.0,
        metavar="S",
        help="write a task's reported progress at most once per S seconds (default: 1)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        metavar="N",
        help="serve Prometheus metrics on http://HOST:N/metrics (needs the [metrics] extra; "
        "0: any free port, logged)",
    )
    p.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        metavar="HOST",
        help="address the metrics server binds (default: 127.0.0.1; 0.0.0.0 for every interface)",
    )
    p.add_argument(
        "--path",
        action="append",
        metavar="DIR",
        help="directory to import task modules from (repeatable; the current "
        "directory is always searched)",
    )
    p.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="(default: INFO)",
    )

    p = sub("enqueue", "Queue a call of pkg.mod:func; prints the task id only.")
    p.add_argument("func", metavar="FUNC", help="import path 'package.module:function'")
    p.add_argument("--args", metavar="JSON", help="positional arguments as a JSON array")
    p.add_argument("--kwargs", metavar="JSON", help="keyword arguments as a JSON object")
    p.add_argument("-q", "--queue", help="queue name (default: default)")
    p.add_argument("--priority", type=int, metavar="N", help="-999..999, higher runs first")
    p.add_argument("--delay", type=float, metavar="S", help="run no sooner than S seconds from now")
    p.add_argument(
        "--ttl",
        type=_positive(float),
        metavar="S",
        help="drop the task if not started within S seconds of being due",
    )
    p.add_argument("--max-retries", type=int, metavar="N", help="retries after a failure")
    p.add_argument(
        "--retry-backoff",
        type=float,
        metavar="S",
        help="first retry delay, doubled each time (default: 1)",
    )
    p.add_argument("--timeout", type=_positive(float), metavar="S", help="per-attempt time limit")
    p.add_argument(
        "--task-id", metavar="ID", help="explicit task id (enqueue is idempotent per id)"
    )
    p.add_argument("--events", action="store_true", default=None, help="record the enqueued event")
    p.add_argument(
        "--path",
        action="append",
        metavar="DIR",
        help="directory to import FUNC from for the check (repeatable)",
    )
    p.add_argument(
        "--no-check", action="store_true", help="do not import FUNC here to check that it exists"
    )

    p = sub("status", "Ready / scheduled / running / dead counts per queue.")
    p.add_argument(
        "-q", "--queue", action="append", metavar="QUEUE", help="only this queue (repeatable)"
    )
    p.add_argument(
        "--watch",
        nargs="?",
        type=_positive(float),
        const=2.0,
        metavar="SECONDS",
        help="refresh every SECONDS (default 2) until Ctrl-C",
    )
    p.add_argument(
        "--iterations",
        type=_positive(int),
        metavar="N",
        help="with --watch: stop after N refreshes",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per refresh")
    p.add_argument(
        "--task",
        metavar="ID",
        help="one task instead: its status, progress (a bar on a terminal) and metadata",
    )

    p = sub(
        "result",
        "Print a task's return value as JSON, or its failure. "
        "Exit 0 success, 1 failed, 2 not found / no result yet.",
    )
    p.add_argument("task_id", metavar="TASK_ID")
    p.add_argument("--wait", type=float, metavar="S", help="wait up to S seconds for the result")
    p.add_argument("--json", action="store_true", help="the whole result document as JSON")

    p = sub(
        "events",
        "Task events, oldest first: time, type, task, attempt, "
        "worker, duration, error. Times are UTC.",
    )
    p.add_argument("--task", metavar="ID", help="only this task's events")
    p.add_argument(
        "--type",
        choices=[t.value for t in EventType],
        metavar="TYPE",
        help="only this type: " + ", ".join(t.value for t in EventType),
    )
    p.add_argument(
        "--since", metavar="WHEN", help="ISO time (UTC if no zone) or relative: -10m, 2h, 1d"
    )
    p.add_argument("--until", metavar="WHEN", help="like --since (exclusive)")
    p.add_argument("--limit", type=_positive(int), metavar="N", help="print at most N events")
    p.add_argument("--follow", "-f", action="store_true", help="keep polling for new events")
    p.add_argument(
        "--interval",
        type=_positive(float),
        default=1.0,
        metavar="S",
        help="with --follow: seconds between polls (default: 1)",
    )
    p.add_argument(
        "--iterations", type=_positive(int), metavar="N", help="with --follow: stop after N polls"
    )
    p.add_argument("--json", action="store_true", help="one JSON object per event")

    p = sub("dead", "List dead-lettered tasks with their last error, or requeue them.")
    p.add_argument(
        "-q", "--queue", action="append", metavar="QUEUE", help="only this queue (repeatable)"
    )
    p.add_argument(
        "--requeue",
        nargs="?",
        const="*",
        metavar="TASK_ID",
        help="put dead tasks back as ready: one, or all without TASK_ID",
    )
    p.add_argument("--json", action="store_true", help="JSON output")

    p = sub(
        "tasks",
        "List tasks by status, a page at a time: pending, scheduled, waiting, running, dead.",
    )
    p.add_argument("-q", "--queue", metavar="QUEUE", help="only this queue (default: every queue)")
    p.add_argument(
        "--status",
        choices=["pending", "scheduled", "waiting", "running", "dead"],
        help="only this status (default: all five)",
    )
    p.add_argument(
        "--limit",
        type=_positive(int),
        default=100,
        metavar="N",
        help="tasks per page (default: 100)",
    )
    p.add_argument(
        "--after", metavar="CURSOR", help="the next page: the cursor the previous page printed"
    )
    p.add_argument("--json", action="store_true", help='{"items": [...], "next": CURSOR|null}')
    return parser
