"""The ``omniq`` command's argument parser: every subcommand and option, with argparse errors
(which echo bad tokens) redacted."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping
from typing import Any

from omniq.core.models import EventType

from ._cli_format import ENV_STORAGE_OPTIONS, Redactor

DESCRIPTION = "OmniQ: run workers, enqueue tasks, look at queues, results and events."
EPILOG = f"""\
BASE_DIR is a local directory or an fsspec URL (s3://bucket/app, gs://..., abfs://...).
Storage options: --storage-options JSON, else ${ENV_STORAGE_OPTIONS}; other settings from
OMNIQ_* variables (flags win). Credentials are never printed.

exit codes: 0 ok, 1 task failed (result), 2 usage / bad input / unknown storage option /
            no such directory / not found / timeout, 3 storage unreachable or failing (also:
            no exclusive create), 4 internal error (a bug), 130 interrupted

Start with `omniq COMMAND --help`."""


class Parser(argparse.ArgumentParser):
    """argparse, but its error messages (which echo bad tokens) go through the redactor."""

    redactor: Redactor = Redactor()

    def error(self, message: str) -> Any:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {self.redactor(message)}\n")


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    convert.__name__ = kind.__name__
    return convert


def add_import_check(p: argparse.ArgumentParser) -> None:
    """``--path`` and ``--no-check``: where to import FUNC from to check that it exists."""
    p.add_argument(
        "--path",
        action="append",
        metavar="DIR",
        help="directory to import FUNC from for the check (repeatable)",
    )
    p.add_argument(
        "--no-check", action="store_true", help="do not import FUNC here to check that it exists"
    )


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
    add_import_check(p)

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
