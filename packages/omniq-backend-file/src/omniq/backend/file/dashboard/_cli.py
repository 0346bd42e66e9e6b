"""``omniq dashboard BASE_DIR``: serve the web dashboard with uvicorn."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .._cli_format import CliError
from .._cli_parser import common_parser
from ._security import TOKEN_ENV, Guard, is_loopback

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8787


def register(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``dashboard`` command to the ``omniq`` parser; returns the parser."""
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    text = (
        "Serve the web dashboard (queues, running tasks, task timelines, dead letters, "
        "schedules, workers) until Ctrl-C. Needs omniq-backend-file[dashboard]."
    )
    p = subs.add_parser("dashboard", parents=[common_parser()], help=text, description=text)
    p.set_defaults(handler=cmd_dashboard)
    p.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"address to bind (default: {DEFAULT_HOST}; any other needs --token)",
    )
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    p.add_argument(
        "--read-only",
        action="store_true",
        help="refuse every action (requeue, delete, cancel, pause): look only",
    )
    p.add_argument(
        "--token",
        metavar="TOKEN",
        help=f"ask for this token before showing anything (default: ${TOKEN_ENV}); "
        "required when --host is not a loopback address",
    )
    p.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also answer this Host name and accept its origin (repeatable; '*.example.com', "
        "'*' for any): the name a reverse proxy or a mounted app is reached by. Without a "
        "token only 127.0.0.1, localhost and [::1] are answered (DNS rebinding)",
    )
    p.add_argument(
        "--refresh",
        type=float,
        default=2.0,
        metavar="S",
        help="live refresh period of the pages in seconds (default: 2; 0 turns it off)",
    )
    return parser


def cmd_dashboard(ctx: Any) -> int:
    ns = ctx.ns
    token = ns.token or ctx.environ.get(TOKEN_ENV) or None
    if token is not None:
        ctx.redact.add_value([token])
        if len(token) < 8:
            raise CliError("the dashboard token must have at least 8 characters")
    if not is_loopback(ns.host) and token is None:
        raise CliError(
            f"refusing to serve the dashboard on {ns.host} without a token: anyone who can "
            f"reach it could act on the queue. Give --token (or ${TOKEN_ENV}), or bind "
            f"{DEFAULT_HOST}"
        )
    try:
        import uvicorn

        from . import create_app
    except ImportError as exc:
        raise CliError(
            f"the dashboard needs: pip install 'omniq-backend-file[dashboard]' ({exc})"
        ) from None
    try:
        Guard(token=token, allowed_hosts=ns.allow_host)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    with ctx.backend(events=True) as backend:
        app = create_app(
            backend,
            read_only=ns.read_only,
            token=token,
            refresh=ns.refresh,
            allowed_hosts=ns.allow_host,
        )
        host = f"[{ns.host}]" if ":" in ns.host else ns.host
        mode = " (read-only)" if ns.read_only else ""
        print(
            f"omniq dashboard on http://{host}:{ns.port}/{mode}; Ctrl-C stops",
            file=sys.stderr,
            flush=True,
        )
        config = uvicorn.Config(
            app, host=ns.host, port=ns.port, log_level="warning", lifespan="off"
        )
        uvicorn.Server(config).run()
    return 0
