"""``omniq schedule add|list|pause|resume|delete``, ``omniq worker --no-schedules`` and the
schedule count of ``omniq status``. ``cli.py`` hooks them in with ``register``."""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import msgspec

from . import _cli_format as cli_format
from . import _cli_parser as cli_parser
from ._cli_format import CliError
from ._schedule_ticks import MISFIRE_POLICIES, ScheduleInfo

_RELATIVE = re.compile(r"[+-]?\d+(?:\.\d+)?[smhdw]")


# -- parser ----------------------------------------------------------------------------------------
def register(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``schedule`` command to the ``omniq`` parser, and ``--no-schedules`` to
    ``worker``; returns the parser."""
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    worker = subs.choices.get("worker")
    if worker is not None:
        worker.add_argument(
            "--no-schedules",
            action="store_true",
            help="do not fire schedules (by default every worker fires the due ticks; the "
            "storage makes it one task per tick)",
        )
    common = cli_parser.common_parser()
    text = "Periodic and cron tasks: add, list, pause, resume, delete."
    top = subs.add_parser("schedule", help=text, description=text)
    actions = top.add_subparsers(
        dest="action", metavar="ACTION", required=True, parser_class=cli_parser.Parser
    )

    def action(name: str, text: str, handler: Any) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = actions.add_parser(
            name, parents=[common], help=text, description=text
        )
        p.set_defaults(handler=handler)
        return p

    p = action(
        "add",
        "Schedule calls of pkg.mod:func (exactly one of --cron, --every, --at); prints the "
        "schedule id. The same --name again updates that schedule.",
        cmd_add,
    )
    p.add_argument("func", metavar="FUNC", help="import path 'package.module:function'")
    when = p.add_mutually_exclusive_group(required=True)
    when.add_argument(
        "--cron",
        metavar="EXPR",
        help="cron expression, e.g. '*/5 * * * *' (6 fields: seconds first)",
    )
    when.add_argument("--every", type=float, metavar="S", help="every S seconds")
    when.add_argument("--at", metavar="WHEN", help="once, at this time (ISO, or +10m)")
    p.add_argument("--tz", metavar="ZONE", help="time zone of --cron and naive times (default UTC)")
    p.add_argument("--name", metavar="NAME", help="schedule id (default: a new id)")
    p.add_argument("--args", metavar="JSON", help="positional arguments as a JSON array")
    p.add_argument("--kwargs", metavar="JSON", help="keyword arguments as a JSON object")
    p.add_argument("-q", "--queue", help="queue of the tasks (default: default)")
    p.add_argument("--priority", type=int, metavar="N", help="-999..999, higher runs first")
    p.add_argument("--max-retries", type=int, metavar="N", help="retries after a failure")
    p.add_argument("--timeout", type=float, metavar="S", help="per-attempt time limit")
    p.add_argument(
        "--ttl", type=float, metavar="S", help="drop a tick's task not started within S seconds"
    )
    p.add_argument("--start", metavar="WHEN", help="no tick before (ISO; naive: in --tz)")
    p.add_argument("--end", metavar="WHEN", help="no tick after (ISO; naive: in --tz)")
    p.add_argument(
        "--misfire",
        choices=MISFIRE_POLICIES,
        help="ticks missed while no worker ran: fire the latest (default), skip, or all",
    )
    p.add_argument(
        "--misfire-grace",
        type=float,
        metavar="S",
        help="a tick not fired within S seconds is missed (default 60)",
    )
    p.add_argument("--jitter", type=float, metavar="S", help="delay each tick by up to S seconds")
    cli_parser.add_import_check(p)

    p = action(
        "list",
        "Every schedule: its timing, state, next tick and last fired tick (UTC).",
        cmd_list,
    )
    p.add_argument("--json", action="store_true", help="one JSON array")
    for name, text, handler in (
        ("pause", "Stop firing a schedule (workers see it within a second).", cmd_pause),
        ("resume", "Fire a paused schedule again, from now on.", cmd_resume),
        ("delete", "Delete a schedule and its fired-tick records.", cmd_delete),
    ):
        action(name, text, handler).add_argument("schedule_id", metavar="ID")
    return parser


# -- commands --------------------------------------------------------------------------------------
def _when(text: str | None, flag: str) -> datetime | None:
    """ISO (naive: wall-clock time in --tz) or relative (``+10m``, ``now``)."""
    if text is None:
        return None
    value = text.strip()
    if value.lower() == "now" or _RELATIVE.fullmatch(value):
        return cli_format.parse_when(value, flag)
    try:
        return datetime.fromisoformat(value[:-1] + "+00:00" if value[-1:] in "Zz" else value)
    except ValueError:
        raise CliError(
            f"{flag}: {text!r} is neither an ISO time (2026-01-31T12:00:00, Z or +01:00 for a "
            "zone) nor a relative time like +10m"
        ) from None


def cmd_add(ctx: Any) -> int:
    from .cli import checked_function

    ns = ctx.ns
    path, args, kwargs = checked_function(ns)
    options = {
        "cron": ns.cron,
        "every": ns.every,
        "at": _when(ns.at, "--at"),
        "tz": ns.tz,
        "name": ns.name,
        "queue": ns.queue,
        "priority": ns.priority,
        "max_retries": ns.max_retries,
        "timeout": ns.timeout,
        "ttl": ns.ttl,
        "start": _when(ns.start, "--start"),
        "end": _when(ns.end, "--end"),
        "misfire": ns.misfire,
        "misfire_grace": ns.misfire_grace,
        "jitter": ns.jitter,
    }
    with ctx.backend() as backend:
        schedule_id = backend.schedule(
            path, args, kwargs, **{k: v for k, v in options.items() if v is not None}
        )
    print(schedule_id, flush=True)
    return 0


def _row(info: ScheduleInfo) -> list[Any]:
    s = info.schedule
    ended = info.next_tick is None and not s.paused
    state = "paused" if s.paused else ("done" if ended else "active")
    return [
        s.id,
        cli_format.clip(s.func, 40),
        s.when,
        state,
        cli_format.fmt_time(info.next_tick),
        cli_format.fmt_time(info.last_tick),
        s.queue,
    ]


def schedules_table(infos: Sequence[ScheduleInfo]) -> str:
    if not infos:
        return "(no schedules)"
    return cli_format.table(
        ["SCHEDULE", "FUNCTION", "WHEN", "STATE", "NEXT", "LAST FIRED", "QUEUE"],
        [_row(info) for info in infos],
    )


def _info_json(info: ScheduleInfo) -> dict[str, Any]:
    doc: dict[str, Any] = msgspec.to_builtins(info.schedule)
    doc["next_tick"] = None if info.next_tick is None else cli_format.fmt_time(info.next_tick)
    doc["last_tick"] = None if info.last_tick is None else cli_format.fmt_time(info.last_tick)
    return doc


def cmd_list(ctx: Any) -> int:
    with ctx.backend() as backend:
        infos = backend.schedules.list()
    if ctx.ns.json:
        print(json.dumps([_info_json(i) for i in infos], ensure_ascii=False), flush=True)
    else:
        print(schedules_table(infos), flush=True)
    return 0


def _set_state(ctx: Any, verb: str) -> int:
    with ctx.backend() as backend:
        info = getattr(backend.schedules, verb)(ctx.ns.schedule_id)
    print(schedules_table([info]), flush=True)
    return 0


def cmd_pause(ctx: Any) -> int:
    return _set_state(ctx, "pause")


def cmd_resume(ctx: Any) -> int:
    return _set_state(ctx, "resume")


def cmd_delete(ctx: Any) -> int:
    with ctx.backend() as backend:
        if not backend.schedules.delete(ctx.ns.schedule_id):
            raise CliError(f"schedule {ctx.ns.schedule_id} not found")
    print(f"deleted {ctx.ns.schedule_id}", flush=True)
    return 0


# -- omniq status ----------------------------------------------------------------------------------
def counts(backend: Any) -> tuple[int, int]:
    """(schedules, paused ones) for ``omniq status``."""
    infos = backend.schedules.list()
    return len(infos), sum(1 for info in infos if info.paused)


def status_line(found: tuple[int, int]) -> str:
    total, paused = found
    if not total:
        return ""
    return f"\nschedules: {total}" + (f" ({paused} paused)" if paused else "")


def status_json(text: str, found: tuple[int, int]) -> str:
    doc = json.loads(text)
    doc["schedules"] = {"total": found[0], "paused": found[1]}
    return cli_format.to_json(doc)
