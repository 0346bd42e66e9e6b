"""The ``omniq`` command: run workers, enqueue tasks and look at queues, results and events.

Every subcommand takes the base directory (a local path or an fsspec URL such as
``s3://bucket/app``) first. Storage options (credentials, endpoints) come from
``--storage-options JSON`` or else from the ``OMNIQ_STORAGE_OPTIONS`` environment variable;
other settings from ``OMNIQ_*`` variables (flags win over the environment). They are never
printed.

Exit codes: 0 success; 1 the task failed (``result``); 2 usage error, bad input (an unknown or
invalid storage option included), not found (a local BASE_DIR that does not exist, for the
commands that only read) or timed out; 3 storage unreachable or failing (a burst worker gives up
after ``--storage-timeout`` seconds; a store without exclusive create); 4 internal error (a bug:
please report it); 130 interrupted.
"""

from __future__ import annotations

# Absolute imports only: ``python -m omniq.backend.file.cli worker --processes N`` makes this
# file ``__main__``, and anyio's process workers re-run ``__main__`` by its path (as
# multiprocessing's spawn does), where a relative import fails.
import argparse
import json
import logging
import os
import re
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import msgspec

from omniq.backend.file import _cli_cleanup, _cli_schedule
from omniq.backend.file import _cli_format as cli_format
from omniq.backend.file import _cli_parser as cli_parser
from omniq.backend.file._cli_format import CliError, Redactor
from omniq.backend.file._cli_progress import LiveProgress, live
from omniq.backend.file._task_context import load_hook
from omniq.backend.file.dashboard import _cli as dashboard_cli
from omniq.core import redact_logs
from omniq.core.errors import (
    CapabilityError,
    MissingDependencyError,
    NotFoundError,
    OmniQError,
    ResultTimeoutError,
    StorageError,
)
from omniq.core.fs import redact_url
from omniq.core.models import UTC, QueueSize, TaskEvent, TaskInfo
from omniq.core.sync import run_sync

ENV_STORAGE_OPTIONS = cli_format.ENV_STORAGE_OPTIONS
LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
EXIT_FAILED, EXIT_USAGE, EXIT_STORAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 1, 2, 3, 4, 130


class _Context:
    def __init__(
        self, ns: argparse.Namespace, environ: Mapping[str, str], redactor: Redactor
    ) -> None:
        self.ns = ns
        self.environ = environ
        self.redact = redactor

    def backend(self, **settings: Any) -> Any:
        """A FileBackend for BASE_DIR; ``--storage-options`` wins over OMNIQ_STORAGE_OPTIONS
        (which the backend's configuration reads from ``environ`` itself)."""
        from omniq.backend.file import FileBackend

        options = cli_format.json_flag(self.ns.storage_options, "--storage-options", dict)
        base_dir = self.ns.base_dir
        if base_dir.startswith("memory://"):
            print(
                "omniq: warning: memory:// storage lives inside this process only; other "
                "processes (workers, other commands) will not see it",
                file=sys.stderr,
            )
        settings = {k: v for k, v in settings.items() if v is not None}
        return FileBackend(base_dir, options, environ=self.environ, **settings)


def _add_paths(paths: Sequence[str] | None) -> None:
    """Make task modules importable: each --path DIR, then the current directory (like celery
    and rq do), go to the front of sys.path."""
    wanted = [os.path.abspath(p) for p in (paths or [])] + [os.getcwd()]
    for entry in reversed(wanted):
        if entry in sys.path:
            sys.path.remove(entry)
        sys.path.insert(0, entry)


def _setup_logging(level: str, redactor: Redactor, fmt_text: str) -> None:
    """Log records (the worker's, and storage warnings of every command) go to stderr with
    storage-option values hidden."""
    redact_logs()  # every record of the process, the SDKs' DEBUG lines included
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(cli_format.RedactingFormatter(fmt_text, redactor))
    handler.set_name("omniq-cli")
    root = logging.getLogger()
    for old in list(root.handlers):  # from an earlier main() in this process
        if old.get_name() == "omniq-cli":
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def _sleep(seconds: float) -> None:
    time.sleep(max(0.0, seconds))


# -- worker ----------------------------------------------------------------------------------------
def cmd_worker(ctx: _Context) -> int:
    ns = ctx.ns
    _add_paths(ns.path)
    with ctx.backend(events=ns.events) as backend:
        worker = backend.worker(
            ns.queue or ["default"],
            ns.concurrency,
            processes=ns.processes,
            allow=ns.allow,
            lease=ns.lease,
            grace=ns.grace,
            burst=ns.burst,
            idle_timeout=ns.idle_timeout,
            storage_timeout=ns.storage_timeout,
            schedules=not ns.no_schedules,
            hooks=[load_hook(path) for path in ns.hook or ()],
            progress_interval=ns.progress_interval,
            claimers=ns.claimers,
            metrics_port=ns.metrics_port,
            metrics_host=ns.metrics_host,
            **({"worker_id": ns.worker_id} if ns.worker_id else {}),
        )
        logging.getLogger("omniq.cli").info(
            "storage %s; Ctrl-C or SIGTERM stops gracefully", backend.async_api
        )
        stats = worker.run()
    print("worker stopped: " + " ".join(f"{k}={v}" for k, v in stats.items()), flush=True)
    return 0


# -- enqueue ---------------------------------------------------------------------------------------
def checked_function(ns: Any) -> tuple[str, list[Any], dict[str, Any]]:
    """The function path, args and kwargs of an ``enqueue`` or ``schedule add`` command line;
    the function is imported first (unless ``--no-check``) to catch typos before storing."""
    from omniq.backend.file._functions import func_path, resolve

    args = cli_format.json_flag(ns.args, "--args", list) or []
    kwargs = cli_format.json_flag(ns.kwargs, "--kwargs", dict) or {}
    path = func_path(ns.func)
    if not ns.no_check:
        _add_paths(ns.path)
        try:
            resolve(path)
        except OmniQError as exc:
            raise CliError(
                f"{exc} (is it importable here? use --path DIR, or --no-check to skip this check)"
            ) from None
        except Exception as exc:
            raise CliError(
                f"importing {path} raised {type(exc).__name__}: {exc} (--no-check skips this check)"
            ) from None
    return path, args, kwargs


def cmd_enqueue(ctx: _Context) -> int:
    ns = ctx.ns
    path, args, kwargs = checked_function(ns)
    options = {
        "queue": ns.queue,
        "priority": ns.priority,
        "delay": ns.delay,
        "ttl": ns.ttl,
        "max_retries": ns.max_retries,
        "retry_backoff": ns.retry_backoff,
        "timeout": ns.timeout,
        "task_id": ns.task_id,
    }
    with ctx.backend(events=ns.events) as backend:
        try:
            task_id = backend.enqueue(
                path, args, kwargs, **{k: v for k, v in options.items() if v is not None}
            )
        except ValueError as exc:
            if isinstance(exc, OmniQError):
                raise
            raise CliError(f"invalid task: {exc}") from None
    print(task_id, flush=True)
    return 0


# -- status ----------------------------------------------------------------------------------------
async def _sizes(backend: Any, queues: Sequence[str] | None) -> dict[str, QueueSize]:
    queue = backend.queue
    names = list(queues) if queues else await queue.list_queues()
    return {name: await queue.size(name) for name in names}


def _require_local_dir(ctx: _Context) -> None:
    """Commands that only read: a local BASE_DIR that does not exist is a typo (or nothing
    has run there yet), not an empty queue. Object stores have no directories to check."""
    from fsspec.core import split_protocol

    base_dir = ctx.ns.base_dir
    protocol, path = split_protocol(base_dir)
    if protocol not in (None, "file", "local"):
        return
    if any(ctx.environ.get(f"OMNIQ_{part}_DIR") for part in ("QUEUE", "RESULTS", "EVENTS")):
        return  # the parts live elsewhere
    root = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(root):
        what = "is not a directory" if os.path.exists(root) else "does not exist"
        raise CliError(
            f"{redact_url(base_dir)}: {what} (check BASE_DIR; a worker or an enqueue creates it)"
        )


def cmd_status(ctx: _Context) -> int:
    ns = ctx.ns
    interval = ns.watch
    if interval is None:
        _require_local_dir(ctx)
    with ctx.backend() as backend:
        shown = 0
        tty = sys.stdout.isatty()
        try:
            while True:
                if ns.task is not None:
                    _task_status(backend, ns, tty, interval is not None and shown > 0)
                    shown += 1
                    if interval is None or (ns.iterations and shown >= ns.iterations):
                        return 0
                    _sleep(interval)
                    continue
                sizes = run_sync(lambda: _sizes(backend.async_api, ns.queue), "omniq status")
                schedules = _cli_schedule.counts(backend)
                now = datetime.now(UTC)
                if ns.json:
                    print(
                        _cli_schedule.status_json(cli_format.status_json(sizes, now), schedules),
                        flush=True,
                    )
                else:
                    if interval is not None and tty:
                        sys.stdout.write("\033[H\033[J")
                    elif shown:
                        print()
                    if interval is not None:
                        print(
                            f"{redact_url(ns.base_dir)}  {cli_format.fmt_time(now)}  "
                            f"(every {interval:g}s, Ctrl-C to stop)"
                        )
                    print(
                        cli_format.status_table(sizes) + _cli_schedule.status_line(schedules),
                        flush=True,
                    )
                shown += 1
                if interval is None or (ns.iterations and shown >= ns.iterations):
                    return 0
                _sleep(interval)
        except KeyboardInterrupt:
            return 0


def _task_status(backend: Any, ns: Any, tty: bool, again: bool) -> None:
    """``omniq status --task ID``: one view of the task (not found: exit 2)."""
    try:
        info = backend.get_task(ns.task)
    except NotFoundError:
        raise CliError(f"task {ns.task} not found") from None
    if ns.json:
        print(cli_format.to_json(info), flush=True)
        return
    if again:
        print("\033[H\033[J" if tty else "", end="")
    print(cli_format.task_status_text(info, ns.task, tty=tty), flush=True)


# -- result ----------------------------------------------------------------------------------------
def cmd_result(ctx: _Context) -> int:
    ns = ctx.ns
    with ctx.backend() as backend:
        try:
            result = backend.result(ns.task_id, wait=ns.wait)
        except ResultTimeoutError as exc:
            raise CliError(str(exc)) from None
        if result is None:
            try:
                info = backend.get_task(ns.task_id)
            except NotFoundError:
                raise CliError(
                    f"no result for task {ns.task_id} (unknown task, or its result expired)"
                ) from None
            raise CliError(
                f"task {ns.task_id} has no result yet (it is "
                f"{info.status.value}); --wait SECONDS waits for it"
            ) from None
    if ns.json:
        print(cli_format.to_json(result), flush=True)
    elif result.ok:
        print(json.dumps(result.value, ensure_ascii=False), flush=True)
    else:
        print(cli_format.failure_text(result), flush=True)
    return 0 if result.ok else EXIT_FAILED


# -- events ----------------------------------------------------------------------------------------
FOLLOW_LOOKBACK = 10.0  # seconds re-read on every poll: events may land out of order


def cmd_events(ctx: _Context) -> int:
    from datetime import timedelta

    ns = ctx.ns
    since = cli_format.parse_when(ns.since, "--since") if ns.since else None
    until = cli_format.parse_when(ns.until, "--until") if ns.until else None
    printed = 0
    seen: dict[str, datetime] = {}
    if not ns.follow:
        _require_local_dir(ctx)
    with ctx.backend(events=True) as backend:
        storage = backend.async_api.events

        def fetch(start: datetime | None) -> list[TaskEvent]:
            limit = None if ns.limit is None else ns.limit - printed + len(seen)
            return run_sync(
                lambda: storage.query(ns.task, ns.type, start, until, limit), "omniq events"
            )

        polls = 0
        try:
            while True:
                start = since
                if seen:
                    newest = max(seen.values())
                    start = newest - timedelta(seconds=FOLLOW_LOOKBACK)
                    if since is not None:
                        start = max(start, since)
                    seen = {k: t for k, t in seen.items() if t >= start}
                for event in fetch(start):
                    if event.id in seen:
                        continue
                    seen[event.id] = event.time
                    print(
                        cli_format.to_json(event) if ns.json else cli_format.event_line(event),
                        flush=True,
                    )
                    printed += 1
                    if ns.limit is not None and printed >= ns.limit:
                        return 0
                polls += 1
                if not ns.follow or (ns.iterations and polls >= ns.iterations):
                    if not printed and not ns.follow:
                        print(
                            "omniq: no events match (events are recorded only with --events "
                            "or OMNIQ_EVENTS=1)",
                            file=sys.stderr,
                        )
                    return 0
                _sleep(ns.interval)
        except KeyboardInterrupt:
            return 0


# -- dead ------------------------------------------------------------------------------------------
async def _dead(
    backend: Any, queues: Sequence[str] | None, requeue: str | None, progress: LiveProgress
) -> tuple[list[tuple[str, TaskInfo]], int]:
    queue = backend.queue
    names = list(queues) if queues else await queue.list_queues()
    found: list[tuple[str, TaskInfo]] = []
    if requeue in (None, "*"):  # requeue all: list first, so that the bar knows the total
        progress.total = len(names)
        for name in names:
            found += [(name, info) for info in await queue.list_dead(name, limit=None)]
            progress.advance()
        if requeue is None:
            return found, 0
    wanted = (
        [(name, info.task.id) for name, info in found if info.task is not None]
        if requeue == "*"
        else [(name, requeue) for name in names]
    )
    progress.label, progress.total, progress.done = "requeue", len(wanted), 0
    count = 0
    for name, task_id in wanted:
        # Through the backend: it also drops the stale failure result and records an event.
        count += len(await backend.requeue_dead(name, task_id))
        progress.advance()
        if count and requeue != "*":
            break
    return [], count


def cmd_dead(ctx: _Context) -> int:
    ns = ctx.ns
    _require_local_dir(ctx)
    with ctx.backend() as backend, live("dead letters", json=ns.json) as progress:
        found, count = run_sync(
            lambda: _dead(backend.async_api, ns.queue, ns.requeue, progress), "omniq dead"
        )
    if ns.requeue is not None:
        if ns.requeue != "*" and not count:
            raise CliError(
                f"task {ns.requeue} is not dead-lettered"
                + (f" in {', '.join(ns.queue)}" if ns.queue else "")
            )
        print(cli_format.to_json({"requeued": count}) if ns.json else f"requeued {count} task(s)")
        return 0
    if ns.json:
        print(cli_format.to_json([{"queue": q, **msgspec.to_builtins(i)} for q, i in found]))
    else:
        print(cli_format.dead_table(found))
    return 0


# -- tasks -----------------------------------------------------------------------------------------
def cmd_tasks(ctx: _Context) -> int:
    ns = ctx.ns
    _require_local_dir(ctx)
    with ctx.backend() as backend:
        try:
            page = backend.list_tasks(ns.queue, ns.status, ns.limit, ns.after)
        except ValueError as exc:
            if isinstance(exc, OmniQError):
                raise
            raise CliError(str(exc)) from None
    if ns.json:
        print(cli_format.to_json(page), flush=True)
        return 0
    print(cli_format.tasks_table(page.items, tty=sys.stdout.isatty()), flush=True)
    if page.next is not None:
        print(f"(more: --after {page.next})", flush=True)
    return 0


HANDLERS = {
    "worker": cmd_worker,
    "enqueue": cmd_enqueue,
    "status": cmd_status,
    "result": cmd_result,
    "events": cmd_events,
    "dead": cmd_dead,
    "tasks": cmd_tasks,
}


# -- entry point -----------------------------------------------------------------------------------
def _exit_code(exc: BaseException) -> int | None:
    if isinstance(exc, (ResultTimeoutError, NotFoundError)):
        return EXIT_USAGE
    if isinstance(exc, (StorageError, CapabilityError, MissingDependencyError, OSError)):
        return EXIT_STORAGE
    if isinstance(exc, OmniQError):
        return EXIT_USAGE
    return None


def main(argv: Sequence[str] | None = None, *, environ: Mapping[str, str] | None = None) -> int:
    """Run the ``omniq`` command; returns the exit code."""
    env = os.environ if environ is None else environ
    args = list(sys.argv[1:] if argv is None else argv)
    redactor = Redactor()
    redactor.add_raw(env.get(ENV_STORAGE_OPTIONS))
    for text in cli_format.storage_options_text(args):
        redactor.add_raw(text)
    for arg in args:  # user:password@ in a URL: the whole, the user and the password
        for userinfo in re.findall(r"://([^/@]+)@", arg):
            redactor.add_value([userinfo, *userinfo.split(":", 1)])
    cli_parser.Parser.redactor = redactor
    try:
        parser = _cli_schedule.register(cli_parser.build_parser(HANDLERS))
        parser = dashboard_cli.register(parser)
        parser = _cli_cleanup.register(parser)
        ns = parser.parse_args(cli_format.prepare_argv(args))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    _setup_logging(
        getattr(ns, "log_level", "WARNING"),
        redactor,
        LOG_FORMAT if ns.command == "worker" else "omniq: %(levelname)s: %(message)s",
    )
    try:
        return int(ns.handler(_Context(ns, env, redactor)))
    except KeyboardInterrupt:
        print("omniq: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # stdout closed early (`omniq events ... | head`): not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes at exit
        return 0
    except CliError as exc:
        print(f"omniq: error: {redactor(str(exc))}", file=sys.stderr)
        return exc.code
    except BaseException as exc:
        leaf = cli_format.leaf(exc)
        code = _exit_code(leaf)
        if code is None:
            if not isinstance(leaf, Exception):
                raise
            text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            print(redactor(text), file=sys.stderr)
            print(
                f"omniq: internal error: {redactor(f'{type(leaf).__name__}: {leaf}')}",
                file=sys.stderr,
            )
            return EXIT_INTERNAL
        kind = "storage error" if code == EXIT_STORAGE else "error"
        message = str(leaf) if isinstance(leaf, OmniQError) else f"{type(leaf).__name__}: {leaf}"
        print(f"omniq: {kind}: {redactor(message)}", file=sys.stderr)
        return code


if __name__ == "__main__":
    raise SystemExit(main())
