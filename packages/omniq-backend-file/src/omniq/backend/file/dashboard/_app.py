"""The dashboard's Starlette app: pages (server-rendered Jinja2), actions (CSRF-checked POSTs)
and the live refresh of each page's ``live`` block."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import anyio
import jinja2
from markupsafe import Markup
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from omniq.core import _redact
from omniq.core.errors import NotFoundError, OmniQError
from omniq.core.fs import redact_url
from omniq.core.models import from_epoch

from . import _charts
from ._data import LISTED, Monitor, age, lease_left, short_duration, status_of
from ._security import AUTH_COOKIE, HEADERS, SESSION_COOKIE, Guard

HERE = Path(__file__).parent
FRAGMENT_HEADER = "x-omniq-fragment"
PAGE_SIZE = 50
#: Messages an action redirects with (``?done=KEY``): fixed texts, nothing echoed.
MESSAGES = {
    "requeued": "Task requeued.",
    "deleted": "Dead letter deleted.",
    "cancelled": "Cancel requested.",
    "paused": "Schedule paused.",
    "resumed": "Schedule resumed.",
    "missing": "Nothing done: the task is no longer there (or no longer in that state).",
}

Handler = Callable[[Request], Awaitable[Response]]


def _finalize(value: Any) -> Any:
    """Every value a template prints passes here: credentials are hidden wherever they
    appear (an error message that echoes a URL, a task argument), None prints nothing."""
    if value is None:
        return ""
    if isinstance(value, Markup):
        return Markup(_redact.redact(str(value)))
    return _redact.redact(value if isinstance(value, str) else str(value))


def _json(value: Any, limit: int | None = None) -> str:
    text = json.dumps(value, ensure_ascii=False, indent=None if limit else 2, default=str)
    # Redact before cutting: a credential cut at the limit would no longer be recognised.
    text = _redact.redact(text)
    if limit is not None and len(text) > limit:
        return text[: limit - 1] + "…"
    return text


def make_environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        finalize=_finalize,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        json=_json,
        age=age,
        epoch_age=lambda t: age(from_epoch(t)),
        duration=lambda s: "" if s is None else short_duration(float(s)),
        lease_left=lease_left,
        status_of=status_of,
    )
    env.globals.update(sparkline=_charts.sparkline, bars=_charts.bars, statuses=LISTED)
    return env


class Dashboard:
    """Routes and rendering; one per app."""

    def __init__(self, backend: Any, guard: Guard, refresh: float) -> None:
        self.monitor = Monitor(backend)
        self.guard = guard
        self.refresh = refresh
        self.env = make_environment()
        url = str(backend.config.base_dir or backend.queue.store.url)
        self.label = _redact.redact(redact_url(url))

    # -- rendering ---------------------------------------------------------------------------
    def render(self, request: Request, name: str, page: str, **context: Any) -> Response:
        session = request.cookies.get(SESSION_COOKIE) or self.guard.new_session()
        root = request.scope.get("root_path", "")
        done = request.query_params.get("done")
        context.update(
            request=request,
            root=root,
            page=page,
            label=self.label,
            read_only=self.guard.read_only,
            csrf=self.guard.csrf_token(session),
            here=request.url.path + (f"?{request.url.query}" if request.url.query else ""),
            refresh=self.refresh,
            events_on=self.monitor.events_on,
            results_on=self.monitor.results_on,
            has_listing=self.monitor.has_listing,
            message=MESSAGES.get(done or ""),
            qs=lambda **kw: urlencode({k: v for k, v in kw.items() if v is not None}),
        )
        template = self.env.get_template(name)
        if request.headers.get(FRAGMENT_HEADER):
            block = template.blocks["live"]
            html = "".join(block(template.new_context(context)))
        else:
            html = template.render(context)
        response = HTMLResponse(html, headers=HEADERS)
        if SESSION_COOKIE not in request.cookies:
            response.set_cookie(
                SESSION_COOKIE, session, httponly=True, samesite="strict", path=root or "/"
            )
        return response

    # -- pages -------------------------------------------------------------------------------
    async def queues(self, request: Request) -> Response:
        rows = await self.monitor.queues()
        throughput = await self.monitor.throughput()
        return self.render(request, "queues.html", "queues", rows=rows, throughput=throughput)

    async def queue(self, request: Request) -> Response:
        name = request.path_params["queue"]
        status = request.query_params.get("status", "pending")
        after = request.query_params.get("after")
        if status not in LISTED:
            raise HTTPException(400, f"unknown status (one of {', '.join(LISTED)})")
        size = await self.monitor.backend.queue.size(name)
        listing = await self.monitor.listing(name, status, PAGE_SIZE, after)
        return self.render(
            request,
            "queue.html",
            "queues",
            queue=name,
            status=status,
            size=size,
            listing=listing,
            after=after,
        )

    async def running(self, request: Request) -> Response:
        after = request.query_params.get("after")
        listing = await self.monitor.listing(None, "running", PAGE_SIZE, after)
        return self.render(request, "running.html", "running", listing=listing, after=after)

    async def dead(self, request: Request) -> Response:
        queue = request.query_params.get("queue") or None
        after = request.query_params.get("after")
        listing = await self.monitor.listing(queue, "dead", PAGE_SIZE, after)
        return self.render(request, "dead.html", "dead", listing=listing, queue=queue, after=after)

    async def task(self, request: Request) -> Response:
        view = await self.monitor.task(request.path_params["task_id"])
        if not view.found:
            raise HTTPException(404, "no such task (unknown, or its records have expired)")
        return self.render(request, "task.html", "task", view=view)

    async def schedules(self, request: Request) -> Response:
        infos = await self.monitor.schedules()
        return self.render(request, "schedules.html", "schedules", infos=infos)

    async def workers(self, request: Request) -> Response:
        workers, whole = await self.monitor.workers()
        return self.render(request, "workers.html", "workers", workers=workers, whole=whole)

    async def metrics(self, request: Request) -> Response:
        try:
            from .._metrics import exposition
        except ImportError:
            raise HTTPException(404, "metrics need the omniq-backend-file[metrics] extra") from None
        # It blocks (a queue-depth refresh on OmniQ's loop thread): not on this event loop.
        body, content_type = await anyio.to_thread.run_sync(exposition, self.monitor.backend)
        return Response(body, headers={"Content-Type": content_type, "Cache-Control": "no-store"})

    # -- login -------------------------------------------------------------------------------
    async def login(self, request: Request) -> Response:
        failed = False
        if request.method == "POST":
            form = await request.form()
            sent = form.get("token")
            if self.guard.same_origin(request.headers, request.url.scheme) and (
                self.guard.token_ok(sent if isinstance(sent, str) else None)
            ):
                root = request.scope.get("root_path", "")
                redirect = RedirectResponse(f"{root}/", status_code=303)
                redirect.set_cookie(
                    AUTH_COOKIE,
                    self.guard.auth_cookie(),
                    httponly=True,
                    samesite="strict",
                    path=root or "/",
                )
                return redirect
            failed = True
        response = self.render(request, "login.html", "login", failed=failed)
        if failed:
            response.status_code = 403
        return response

    # -- actions -----------------------------------------------------------------------------
    async def action(self, request: Request) -> Response:
        """``POST /actions/{verb}``: requeue, delete, cancel, pause, resume."""
        if self.guard.read_only:
            raise HTTPException(403, "read-only dashboard: actions are switched off")
        if not self.guard.same_origin(request.headers, request.url.scheme):
            raise HTTPException(403, "refused: the request does not come from this dashboard")
        form = await request.form()
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        if not self.guard.csrf_ok(request.cookies.get(SESSION_COOKIE), fields.get("csrf")):
            raise HTTPException(403, "refused: missing or wrong CSRF token (reload the page)")
        verb = request.path_params["verb"]
        task_id, queue = fields.get("task_id", ""), fields.get("queue", "")
        monitor = self.monitor
        if verb == "requeue":
            ok = await monitor.requeue(queue, task_id)
            done = "requeued"
        elif verb == "delete":
            ok = await monitor.delete_dead(queue, task_id)
            done = "deleted"
        elif verb == "cancel":
            ok = await monitor.cancel(task_id)
            done = "cancelled"
        elif verb in ("pause", "resume"):
            await monitor.set_paused(fields.get("schedule_id", ""), verb == "pause")
            ok, done = True, f"{verb}d"
        else:
            raise HTTPException(404, "unknown action")
        back = fields.get("next", "")
        root = request.scope.get("root_path", "")
        if not back.startswith("/") or back.startswith("//") or "\\" in back:
            back = "/"
        base, _, query = back.partition("?")
        params = [p for p in query.split("&") if p and not p.startswith("done=")]
        params.append(f"done={done if ok else 'missing'}")
        return RedirectResponse(f"{root}{base}?{'&'.join(params)}", status_code=303)

    # -- errors ------------------------------------------------------------------------------
    def error(self, request: Request, status: int, text: str) -> Response:
        clean = _redact.redact(text)
        if request.headers.get(FRAGMENT_HEADER) or "text/html" not in request.headers.get(
            "accept", ""
        ):
            return PlainTextResponse(clean, status_code=status, headers=HEADERS)
        response = self.render(request, "error.html", "error", status=status, text=clean)
        response.status_code = status
        return response


def _guarded(dashboard: Dashboard, handler: Handler, *, login: bool = False) -> Handler:
    """Wrap a page: the access token first, then storage errors shown without credentials."""

    async def endpoint(request: Request) -> Response:
        guard = dashboard.guard
        if not login and not guard.authorized(request.headers, request.cookies):
            if request.method == "GET" and "text/html" in request.headers.get("accept", ""):
                root = request.scope.get("root_path", "")
                return RedirectResponse(f"{root}/login", status_code=303)
            return PlainTextResponse(
                "token required", status_code=401, headers={"WWW-Authenticate": "Bearer"}
            )
        try:
            return await handler(request)
        except HTTPException as exc:
            return dashboard.error(request, exc.status_code, str(exc.detail))
        except NotFoundError as exc:
            return dashboard.error(request, 404, str(exc))
        except ValueError as exc:  # a bad name in the URL or the form (InvalidNameError)
            return dashboard.error(request, 400, f"{type(exc).__name__}: {exc}")
        except (OmniQError, OSError) as exc:
            return dashboard.error(request, 502, f"storage error: {type(exc).__name__}: {exc}")

    return endpoint


def create_app(
    backend: Any,
    *,
    read_only: bool = False,
    token: str | None = None,
    refresh: float = 2.0,
    secret: bytes | None = None,
    allowed_hosts: Sequence[str] | None = None,
) -> Starlette:
    """The dashboard of an ``AsyncFileBackend`` (or ``FileBackend``) as an ASGI app.

    ``read_only`` refuses every action; ``token`` makes every request log in first (or send
    ``Authorization: Bearer TOKEN``); ``refresh`` is the live refresh period in seconds;
    ``allowed_hosts`` the extra ``Host`` names answered and origins accepted (see Guard)."""
    backend = getattr(backend, "async_api", backend)
    guard = Guard(token=token, read_only=read_only, secret=secret, allowed_hosts=allowed_hosts)
    dash = Dashboard(backend, guard, refresh)

    def page(path: str, handler: Handler, methods: list[str] | None = None) -> Route:
        return Route(path, _guarded(dash, handler), methods=methods or ["GET"])

    routes = [
        page("/", dash.queues),
        page("/queues/{queue}", dash.queue),
        page("/running", dash.running),
        page("/dead", dash.dead),
        page("/tasks/{task_id}", dash.task),
        page("/schedules", dash.schedules),
        page("/workers", dash.workers),
        page("/metrics", dash.metrics),
        page("/actions/{verb}", dash.action, ["POST"]),
        Route("/login", _guarded(dash, dash.login, login=True), methods=["GET", "POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    hosts = Middleware(TrustedHostMiddleware, allowed_hosts=list(guard.hosts), www_redirect=False)
    app = Starlette(routes=routes, middleware=[hosts])
    app.state.dashboard = dash
    return app
