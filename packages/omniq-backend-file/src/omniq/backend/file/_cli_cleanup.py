"""``omniq cleanup``: the clean-up a worker does by itself, once, on demand (after an outage, in
a cron job, before a backup). ``cli.py`` hooks it in with ``register``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from omniq.core.maintenance import sweep_temp_files
from omniq.core.sync import run_sync

from . import _cli_format as cli_format
from . import _cli_parser as cli_parser
from ._cli_progress import LiveProgress, live


def register(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``cleanup`` command to the ``omniq`` parser; returns the parser."""
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    text = (
        "Finish what crashed processes left (each queue's repair pass), remove expired "
        "results and events older than the retention; with --sweep also stale temporary "
        "files and every expired result, marked or not. Safe while workers run: they do the "
        "same by themselves (the sweep daily)."
    )
    p = subs.add_parser(
        "cleanup", parents=[cli_parser.common_parser()], help=text, description=text
    )
    p.set_defaults(handler=cmd_cleanup)
    p.add_argument(
        "-q",
        "--queue",
        action="append",
        metavar="QUEUE",
        help="queue to repair (repeatable; default: every queue)",
    )
    p.add_argument(
        "--events-older-than",
        type=float,
        metavar="S",
        help="remove events older than S seconds (default: the backend's event_retention, "
        "30 days unless OMNIQ_EVENT_RETENTION says otherwise)",
    )
    p.add_argument(
        "--sweep",
        action="store_true",
        help="also remove temporary files an hour old (left by killed writers) and read every "
        "stored result to find expired ones whose expiry marker was lost (costs in "
        "proportion to what is stored)",
    )
    p.add_argument("--json", action="store_true", help="print the counts as JSON")
    return parser


async def _cleanup(
    backend: Any,
    queues: Sequence[str] | None,
    events_older_than: float | None,
    sweep: bool,
    bar: LiveProgress,
) -> dict[str, Any]:
    queue = backend.queue
    names = list(queues) if queues else await queue.list_queues()
    stores = [s for s in (backend.results, backend.events) if s is not None]
    bar.total = len(names) + int(sweep) + len(stores)
    repaired: dict[str, int] = {}
    for name in names:
        bar.advance(0, label=f"repair {name}")
        repaired[name] = await queue.repair(name)
        bar.advance()
    if sweep:
        bar.advance(0, label="queue sweep")
        await queue.maintain(sweep=True)
        bar.advance()
    done: dict[str, Any] = {"repaired": repaired, "results_removed": None, "events_removed": None}
    if backend.results is not None:
        bar.advance(0, label="results")
        if sweep:
            await sweep_temp_files(backend.results.store)
        done["results_removed"] = await backend.results.cleanup_expired(sweep=sweep)
        bar.advance()
    if backend.events is not None:
        bar.advance(0, label="events")
        retention = events_older_than
        if retention is None:
            retention = backend.config.event_retention
        await backend.events.maintain(sweep=sweep)
        if retention is not None:
            done["events_removed"] = await backend.events.cleanup(timedelta(seconds=retention))
        bar.advance()
    return done


def cmd_cleanup(ctx: Any) -> int:
    ns = ctx.ns
    if ns.events_older_than is not None and not ns.events_older_than >= 0:
        raise cli_format.CliError("--events-older-than must be >= 0 seconds")
    with ctx.backend(events=True) as backend, live("cleanup", json=ns.json) as bar:
        done = run_sync(
            lambda: _cleanup(backend.async_api, ns.queue, ns.events_older_than, ns.sweep, bar),
            "omniq cleanup",
        )
    if ns.json:
        print(cli_format.to_json(done), flush=True)
        return 0
    for name, count in done["repaired"].items():
        print(f"{name}: repair redid {count} interrupted step(s)")
    if done["results_removed"] is not None:
        print(f"results: removed {done['results_removed']} expired")
    if done["events_removed"] is not None:
        print(f"events: removed {done['events_removed']} old")
    return 0
