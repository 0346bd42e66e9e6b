"""OmniQ's web dashboard: queues, running tasks, a task's timeline, dead letters, schedules and
workers, read straight from the storage (no broker, no agent in the workers).

``omniq dashboard BASE_DIR`` serves it; ``backend.dashboard_app()`` (or ``create_app``) gives
the ASGI app to mount in your own. Needs the ``omniq-backend-file[dashboard]`` extra
(Starlette, uvicorn, Jinja2); importing this package does not import them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from omniq.core.errors import MissingDependencyError

from ._security import TOKEN_ENV, is_loopback

if TYPE_CHECKING:
    from starlette.applications import Starlette

EXTRA_HINT = "the dashboard needs: pip install 'omniq-backend-file[dashboard]'"


def create_app(
    backend: Any,
    *,
    read_only: bool = False,
    token: str | None = None,
    refresh: float = 2.0,
    secret: bytes | None = None,
    allowed_hosts: Sequence[str] | None = None,
) -> Starlette:
    """The dashboard of an ``AsyncFileBackend`` or ``FileBackend`` as an ASGI app.

    ``read_only`` refuses every action (requeue, delete, cancel, pause); ``token`` makes
    every request log in first (or send ``Authorization: Bearer TOKEN``); ``refresh`` is the
    live refresh period in seconds; ``secret`` signs the session and CSRF cookies (random per
    process by default).

    Without a token only loopback ``Host`` names (127.0.0.1, localhost, [::1]) are answered,
    which defeats DNS rebinding; ``allowed_hosts`` adds names (``dash.example.com``,
    ``*.example.com``, or ``*`` for any) for a mounted app or a reverse proxy, and a POST
    whose ``Origin`` names one of them is accepted (a proxy that rewrites ``Host``)."""
    try:
        from ._app import create_app as make
    except ImportError as exc:
        raise MissingDependencyError(f"{EXTRA_HINT} ({exc})") from exc
    return make(
        backend,
        read_only=read_only,
        token=token,
        refresh=refresh,
        secret=secret,
        allowed_hosts=allowed_hosts,
    )


__all__ = ["TOKEN_ENV", "create_app", "is_loopback"]
