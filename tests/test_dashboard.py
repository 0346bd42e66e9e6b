"""The dashboard through Starlette's TestClient: every page on every store, the live fragment,
the actions and their refusals (CSRF, origin, read-only, token), escaping, and credentials never
shown. The real browser drives it in test_dashboard_browser.py."""

from __future__ import annotations

import asyncio
import re
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
from starlette.testclient import TestClient

from omniq.backend.file import AsyncFileBackend, FileBackend
from omniq.backend.file.cli import main
from omniq.backend.file.dashboard import create_app, is_loopback
from omniq.backend.file.dashboard._data import Monitor
from omniq.core import TaskContext, _redact
from omniq.core.models import UTC, EventType, TaskEvent, TaskStatus

SCRIPT = "<script>document.title='pwned'</script>"
HTML = {"accept": "text/html"}
BURST: dict[str, Any] = {"burst": True, "idle_timeout": 0.3, "poll": 0.1}


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
    assert match, "no CSRF token in the page"
    return match.group(1)


GATE = threading.Event()


def report_progress(ctx: TaskContext) -> str:
    """A task (run as ``test_dashboard:report_progress``) that reports progress, then waits."""
    ctx.progress(3, 4, "three of four")
    GATE.wait(60)
    return "ok"


class World:
    """A backend with a pending, a running, a finished and a dead task, and a schedule."""

    def __init__(self, backend: FileBackend) -> None:
        self.backend = backend
        self.done = backend.enqueue("worker_tasks:add", [2, 3], queue="work")
        self.dead = backend.enqueue("worker_tasks:always_fail", ["boom"], queue="work")
        backend.worker(["work"], **BURST).run()
        self.pending = backend.enqueue("worker_tasks:shout", [SCRIPT], queue="inbox")
        self.running_id = backend.enqueue("worker_tasks:add", [1, 1], queue="busy")
        claimed = backend.queue.dequeue(["busy"], lease=300, worker_id="worker-7")
        assert claimed is not None and claimed.id == self.running_id
        self.schedule = backend.schedule("worker_tasks:add", [1, 2], every=3600, name="hourly")


@pytest.fixture
def world(storage: Any) -> Iterator[World]:
    with FileBackend(storage.base_dir, storage.storage_options, events=True) as backend:
        yield World(backend)


def client(backend: FileBackend, **options: Any) -> TestClient:
    return TestClient(create_app(backend, **options), base_url="http://127.0.0.1:8787")


# -- pages -------------------------------------------------------------------------------------
def test_every_page_shows_the_storage(world: World) -> None:
    with client(world.backend) as c:
        home = c.get("/", headers=HTML)
        assert home.status_code == 200
        for queue, counts in {"work": (0, 0, 1), "inbox": (1, 0, 0), "busy": (0, 1, 0)}.items():
            row = re.search(rf'<tr data-queue="{queue}">(.*?)</tr>', home.text, re.S)
            assert row, queue
            shown = [
                int(re.search(rf'data-count="{k}"><a [^>]*>(\d+)<', row.group(1)).group(1))  # type: ignore[union-attr]
                for k in ("ready", "running", "dead")
            ]
            assert tuple(shown) == counts, queue
        assert "Finished tasks per minute" in home.text  # events are on

        running = c.get("/running", headers=HTML).text
        assert world.running_id in running and "worker-7" in running

        pending = c.get("/queues/inbox?status=pending", headers=HTML).text
        assert world.pending in pending and "worker_tasks:shout" in pending

        dead = c.get("/dead", headers=HTML).text
        assert world.dead in dead and "boom" in dead and 'data-action="requeue"' in dead

        task = c.get(f"/tasks/{world.done}", headers=HTML).text
        assert 'id="task-result">5<' in task
        assert re.search(r"<strong>started</strong>.*<strong>succeeded</strong>", task, re.S)
        assert 'id="attempts"' in task

        failed = c.get(f"/tasks/{world.dead}", headers=HTML).text
        assert "always_fail" in failed and "Traceback" in failed and "boom" in failed

        schedules = c.get("/schedules", headers=HTML).text
        assert world.schedule in schedules and "every 3600s" in schedules
        assert 'data-action="pause"' in schedules

        workers = c.get("/workers", headers=HTML).text
        assert "worker-7" in workers


def test_the_live_fragment_is_the_page_block_alone(world: World) -> None:
    with client(world.backend) as c:
        whole = c.get("/dead", headers=HTML).text
        part = c.get("/dead", headers={"x-omniq-fragment": "1"}).text
    assert "<html" in whole and "<html" not in part and "<nav>" not in part
    assert world.dead in part and part.strip() in whole


def test_unknown_task_and_bad_names(world: World) -> None:
    with client(world.backend) as c:
        assert c.get("/tasks/01HZZZZZZZZZZZZZZZZZZZZZZZ", headers=HTML).status_code == 404
        assert c.get("/tasks/..%2Fescape", headers=HTML).status_code in (400, 404)
        assert c.get("/queues/inbox?status=bogus", headers=HTML).status_code == 400


# -- actions -----------------------------------------------------------------------------------
def test_requeue_needs_the_csrf_token_and_the_same_origin(world: World) -> None:
    backend = world.backend
    form = {"queue": "work", "task_id": world.dead, "next": "/dead"}
    with client(backend) as c:
        token = csrf_of(c.get("/dead", headers=HTML).text)
        refused = c.post("/actions/requeue", data=form, follow_redirects=False)
        assert refused.status_code == 403 and "CSRF" in refused.text
        wrong = c.post("/actions/requeue", data={**form, "csrf": "0" * 64})
        assert wrong.status_code == 403
        other_site = c.post(
            "/actions/requeue",
            data={**form, "csrf": token},
            headers={"origin": "http://evil.example"},
        )
        assert other_site.status_code == 403
        assert backend.get_task(world.dead).status is TaskStatus.DEAD  # nothing changed

        done = c.post(
            "/actions/requeue",
            data={**form, "csrf": token},
            headers={"origin": "http://127.0.0.1:8787"},
            follow_redirects=False,
        )
        assert done.status_code == 303 and done.headers["location"] == "/dead?done=requeued"
    assert backend.get_task(world.dead).status is TaskStatus.PENDING


def test_a_token_from_another_session_is_refused(world: World) -> None:
    with client(world.backend) as first, client(world.backend) as second:
        token = csrf_of(first.get("/dead", headers=HTML).text)
        second.get("/dead", headers=HTML)  # a session cookie of its own
        form = {"queue": "work", "task_id": world.dead, "csrf": token}
        assert second.post("/actions/delete", data=form).status_code == 403
    assert world.backend.get_task(world.dead).status is TaskStatus.DEAD


def test_delete_cancel_pause_resume(world: World) -> None:
    backend = world.backend
    with client(backend) as c:
        token = csrf_of(c.get("/dead", headers=HTML).text)

        def act(verb: str, **fields: str) -> str:
            response = c.post(
                f"/actions/{verb}", data={**fields, "csrf": token}, follow_redirects=False
            )
            assert response.status_code == 303, response.text
            return response.headers["location"]

        assert act("delete", queue="work", task_id=world.dead).endswith("done=deleted")
        assert backend.queue.list_dead("work") == []
        assert act("delete", queue="work", task_id=world.dead).endswith("done=missing")
        assert act("cancel", task_id=world.pending).endswith("done=cancelled")
        assert backend.get_task(world.pending).status is TaskStatus.CANCELLED
        act("pause", schedule_id=world.schedule)
        assert backend.schedules.get(world.schedule).paused
        act("resume", schedule_id=world.schedule)
        assert not backend.schedules.get(world.schedule).paused
        shown = c.get("/?done=deleted", headers=HTML).text
        assert "Dead letter deleted." in shown


def test_read_only_refuses_every_action_and_shows_none(world: World) -> None:
    backend = world.backend
    with client(backend, read_only=True) as c:
        page = c.get("/dead", headers=HTML).text
        assert "read-only" in page and "data-action" not in page
        # A CSRF token from a writable dashboard of the same process does not help.
        for verb, fields in (
            ("requeue", {"queue": "work", "task_id": world.dead}),
            ("delete", {"queue": "work", "task_id": world.dead}),
            ("cancel", {"task_id": world.pending}),
            ("pause", {"schedule_id": world.schedule}),
        ):
            response = c.post(f"/actions/{verb}", data={**fields, "csrf": "x"})
            assert response.status_code == 403 and "read-only" in response.text
    assert backend.get_task(world.dead).status is TaskStatus.DEAD
    assert backend.get_task(world.pending).status is TaskStatus.PENDING
    assert not backend.schedules.get(world.schedule).paused


def test_a_token_guards_every_page(world: World) -> None:
    secret = "let-me-in-please"
    with client(world.backend, token=secret) as c:
        assert c.get("/", headers=HTML, follow_redirects=False).headers["location"] == "/login"
        assert c.get("/dead").status_code == 401
        assert c.get("/metrics").status_code == 401
        assert c.post("/actions/requeue", data={}).status_code == 401
        assert c.post("/login", data={"token": "wrong-token!"}).status_code == 403
        assert c.get("/dead", headers={"authorization": f"Bearer {secret}"}).status_code == 200
        login = c.post("/login", data={"token": secret}, follow_redirects=False)
        assert login.status_code == 303 and secret not in login.headers["set-cookie"]
        assert world.dead in c.get("/dead", headers=HTML).text  # the cookie now


# -- escaping and credentials ------------------------------------------------------------------
def test_a_script_argument_is_shown_as_text(world: World) -> None:
    with client(world.backend) as c:
        for path in (f"/tasks/{world.pending}", "/queues/inbox?status=pending"):
            page = c.get(path, headers=HTML)
            assert SCRIPT not in page.text
            assert "&lt;script&gt;document.title=" in page.text
            assert "script-src 'self'" in page.headers["content-security-policy"]


def test_credentials_never_shown(s3_emulator: Any) -> None:
    """Storage options with a key and a secret (moto takes any), and a dead task whose error
    echoes them and a URL with userinfo: no page, error or header shows them."""
    key, secret = "AKIADASHBOARDKEY4242", "dashboard-secret-Zq8Xw3"
    options = {**s3_emulator.storage_options, "key": key, "secret": secret}
    base_dir = s3_emulator.url("dashboard-creds")
    with FileBackend(base_dir, options, events=True) as backend:
        leaky = f"cannot reach s3://{key}:{secret}@bucket/x with secret {secret}"
        dead = backend.enqueue("worker_tasks:always_fail", [leaky], queue="work")
        backend.worker(["work"], **BURST).run()
        with client(backend) as c:
            pages = [c.get(p, headers=HTML) for p in ("/", "/dead", f"/tasks/{dead}")]
            pages.append(c.get("/queues/work?status=dead", headers=HTML))
            pages.append(c.get("/tasks/..bad..", headers=HTML))
            assert "dashboard-creds" in pages[0].text  # the storage is named...
            for page in pages:
                text = page.text + str(page.headers)
                assert key not in text and secret not in text  # ...its credentials are not
            assert "***" in pages[2].text


# -- command line ------------------------------------------------------------------------------
def test_cli_refuses_a_public_address_without_a_token(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["dashboard", str(tmp_path), "--host", "0.0.0.0"], environ={}) == 2
    assert "without a token" in capsys.readouterr().err
    short = main(["dashboard", str(tmp_path), "--host", "::", "--token", "abc"], environ={})
    assert short == 2
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2")


def test_metrics_are_served_behind_the_token(world: World) -> None:
    secret = "metrics-scraper-token"
    with client(world.backend, token=secret) as c:
        assert c.get("/metrics").status_code == 401
        page = c.get("/metrics", headers={"authorization": f"Bearer {secret}"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/plain")
    assert re.search(
        r'omniq_queue_depth\{[^}]*queue="inbox"[^}]*state="ready"[^}]*\} 1\.0', page.text
    ), page.text


def test_running_tasks_show_their_progress(storage: Any) -> None:
    GATE.clear()
    with FileBackend(storage.base_dir, storage.storage_options) as backend:
        task_id = backend.enqueue("test_dashboard:report_progress", queue="slow")
        worker = backend.worker(["slow"], progress_interval=0.05, poll=0.1)
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        try:
            with client(backend) as c:
                deadline = time.monotonic() + 60
                while "three of four" not in (page := c.get("/running", headers=HTML).text):
                    assert time.monotonic() < deadline, "no progress shown"
                    time.sleep(0.1)
                assert task_id in page and '<progress max="1" value="0.750">' in page
                assert "75%" in c.get(f"/tasks/{task_id}", headers=HTML).text
        finally:
            GATE.set()
            worker.stop()
            thread.join(60)


# -- hosts and origins (DNS rebinding, reverse proxies) ----------------------------------------
def test_a_rebound_host_name_can_neither_read_nor_act() -> None:
    """DNS rebinding: a page on rebind.attacker.example whose name resolves to 127.0.0.1 is
    same-origin with a dashboard that answers any Host; without a token only loopback names
    are answered, so it reads nothing (no task argument, no CSRF token) and changes nothing."""
    attacker = "rebind.attacker.example:8787"
    with FileBackend(f"memory://rebind-{uuid.uuid4().hex}", events=True) as backend:
        dead = backend.enqueue("worker_tasks:always_fail", ["private-argument"], queue="work")
        backend.worker(["work"], **BURST).run()
        assert backend.get_task(dead).status is TaskStatus.DEAD
        with TestClient(create_app(backend), base_url=f"http://{attacker}") as c:
            page = c.get("/dead", headers=HTML)
            token = re.search(r'name="csrf" value="([0-9a-f]+)"', page.text)
            acted = c.post(
                "/actions/delete",
                data={"queue": "work", "task_id": dead, "csrf": token.group(1) if token else ""},
                headers={"origin": f"http://{attacker}"},
                follow_redirects=False,
            )
        assert page.status_code == 400 and "private-argument" not in page.text
        assert acted.status_code >= 400
        assert backend.get_task(dead).status is TaskStatus.DEAD
        for loopback in ("127.0.0.1:8787", "localhost:9000", "[::1]:8787"):
            with TestClient(create_app(backend), base_url=f"http://{loopback}") as c:
                assert c.get("/dead", headers=HTML).status_code == 200, loopback
        # A token (the attacker cannot have it) or allowed_hosts lets other names in.
        with TestClient(create_app(backend, token="x" * 12), base_url=f"http://{attacker}") as c:
            assert c.get("/dead").status_code == 401
        app = create_app(backend, allowed_hosts=["dash.example.com"])
        with TestClient(app, base_url="http://dash.example.com") as c:
            assert "private-argument" in c.get("/dead", headers=HTML).text
        with TestClient(app, base_url=f"http://{attacker}") as c:
            assert c.get("/dead", headers=HTML).status_code == 400
    with pytest.raises(ValueError, match="without a port"):
        create_app(backend, allowed_hosts=["dash.example.com:443"])


def test_behind_a_proxy_that_rewrites_host(world: World) -> None:
    """nginx's default proxy_pass sends Host 127.0.0.1:8787 while the browser's Origin names
    the proxy: with allowed_hosts naming it, login and actions are accepted; another origin
    is still refused. A comma-separated X-Forwarded-Host (chained proxies) is split."""
    secret = "let-me-in-please"
    proxy = {"origin": "https://dash.example.com"}
    with client(world.backend, token=secret) as c:  # no allowed_hosts: refused
        assert c.post("/login", data={"token": secret}, headers=proxy).status_code == 403
    with client(world.backend, token=secret, allowed_hosts=["dash.example.com"]) as c:
        evil = c.post("/login", data={"token": secret}, headers={"origin": "https://evil.example"})
        assert evil.status_code == 403
        login = c.post("/login", data={"token": secret}, headers=proxy, follow_redirects=False)
        assert login.status_code == 303
        token = csrf_of(c.get("/dead", headers=HTML).text)
        form = {"queue": "work", "task_id": world.dead, "csrf": token, "next": "/dead"}
        done = c.post("/actions/requeue", data=form, headers=proxy, follow_redirects=False)
        assert done.status_code == 303
    assert world.backend.get_task(world.dead).status is TaskStatus.PENDING
    with client(world.backend) as c:
        token = csrf_of(c.get("/queues/inbox?status=pending", headers=HTML).text)
        chained = {"origin": "https://outer.example", "x-forwarded-host": "outer.example, inner"}
        form = {"queue": "work", "task_id": world.pending, "csrf": token}
        assert c.post("/actions/cancel", data=form, headers=chained).status_code == 200


def test_a_credential_cut_by_the_listing_truncation_is_still_hidden() -> None:
    secret = "review16-secret-Zq8Xw3Lm9"
    _redact.register([secret])
    with FileBackend(f"memory://cut-{uuid.uuid4().hex}") as backend:
        # json.dumps(["x" * 100, secret]): the secret starts at character 106 of 130.
        backend.enqueue("worker_tasks:add", ["x" * 100, secret], queue="inbox")
        with client(backend) as c:
            page = c.get("/queues/inbox?status=pending", headers=HTML).text
    assert "xxxx" in page  # the arguments are shown (truncated)
    assert secret[:10] not in page, "the first part of a registered secret is shown"


# -- cost --------------------------------------------------------------------------------------
@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_the_throughput_chart_reads_only_the_events_recorded_since_its_last_read(
    storage: Any, anyio_backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """200 tasks finished two minutes ago (single-event files in the current hour's
    partition), then 3 more and 2 started events (a batch and single files): the next
    refresh lists and reads those 5 files only, and the chart counts 203."""
    async with AsyncFileBackend(storage.base_dir, storage.storage_options, events=True) as b:
        events = b.events
        assert events is not None
        now = time.time()

        def event(kind: EventType, at: float, n: int) -> TaskEvent:
            when = datetime.fromtimestamp(at, UTC)
            return TaskEvent(task_id=f"t{n}", type=kind, queue="q", time=when)

        for start in range(0, 200, 50):
            await asyncio.gather(
                *(
                    events.log(event(EventType.SUCCEEDED, now - 120, n))
                    for n in range(start, start + 50)
                )
            )
        clock = [now]
        monitor = Monitor(b, clock=lambda: clock[0])
        first = await monitor.throughput()
        assert first is not None and sum(c for _, c in first) == 200

        listed, read = [], []
        real_run = events.store.run

        def spy(program: Any) -> Any:
            try:
                op = next(program)
                while True:
                    value = yield op
                    if op.name in ("listdir", "listafter"):
                        listed.extend(value)
                    elif op.name == "read_many":
                        read.extend(op.args[0])
                    op = program.send(value)
            except StopIteration as stop:
                return stop.value

        monkeypatch.setattr(events.store, "run", lambda p, **kw: real_run(spy(p), **kw))
        # Stamped with the real time, as the events storage's clock is: the next read lists
        # from its last read's real time minus the settle time, and events stamped before
        # that (``now + 1`` once, when the first 200 writes took over 10 s on a loaded
        # machine) were not seen.
        later = time.time()
        await events.log_many([event(EventType.DEAD_LETTERED, later, n) for n in (200, 201)])
        await events.log(event(EventType.FAILED, later, 202))
        await events.log(event(EventType.STARTED, later, 203))
        await events.log(event(EventType.STARTED, later, 204))
        clock[0] = later + 5
        second = await monitor.throughput()
        assert second is not None and sum(c for _, c in second) == 203
        assert len(listed) == 4, listed  # the batch, the failed and the two started files
        assert len(read) == 2, read  # the batch and the failed event, not the started ones
