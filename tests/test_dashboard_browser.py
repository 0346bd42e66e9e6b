"""The dashboard in a real headless Chromium (Debian's chromium and chromium-driver, driven by
Selenium with the system driver: no download at test time), on a local directory and on an
emulated S3 bucket, while a worker runs.

Screenshots of each page go to the test's tmp directory (and to $OMNIQ_SCREENSHOTS, if set:
docs/images/ holds one of each). Waits have timeouts; nothing asserts how long anything took.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import shutil
import socket
import threading
from collections.abc import Callable, Iterator
from html import escape
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from omniq.backend.file import FileBackend
from omniq.backend.file.dashboard import create_app
from omniq.core.models import TaskStatus

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SCRIPT = "<script>document.title='pwned'</script>"
WAIT = 60.0
BURST: dict[str, Any] = {"burst": True, "idle_timeout": 0.3, "poll": 0.1}


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    for program in (CHROMIUM, CHROMEDRIVER):
        assert os.access(program, os.X_OK), (
            f"{program} missing: apt-get install chromium chromium-driver"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # with the driver's path below: no Selenium Manager
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1280,860")
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


class Server:
    """The dashboard served by uvicorn on a free loopback port, in a thread."""

    def __init__(self, backend: FileBackend, **options: Any) -> None:
        app = create_app(backend, refresh=0.5, **options)
        self.server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning"))
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> Server:
        self.thread.start()
        wait_for(lambda: self.server.started, "the dashboard to start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(WAIT)
        self.sock.close()


def visit(browser: WebDriver, url: str) -> None:
    """Open ``url`` and wait for its document: right after ``get`` returned, headless
    Chromium now and then answers ``page_source`` with an empty string for 50-150 ms (3 times
    in 3 runs of this file under 4 test workers on 2 cores; it failed 2 runs in 3 before)."""
    browser.get(url)
    wait_for(lambda: browser.page_source, f"the document of {url}")


def wait_for(check: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def click(driver: WebDriver, selector: str) -> None:
    """Click the element ``selector`` finds; found again when the live refresh replaced it
    between the look-up and the click (StaleElementReferenceException)."""

    def attempt() -> bool:
        try:
            driver.find_element(By.CSS_SELECTOR, selector).click()
        except StaleElementReferenceException:
            return False
        return True

    wait_for(attempt, f"a click on {selector}")


def text_of(driver: WebDriver, element_id: str) -> str:
    """The rendered text of element ``element_id``, read in one script call (a live refresh
    may replace the element between a look-up and a read)."""
    found = driver.execute_script(
        "var e = document.getElementById(arguments[0]); return e ? e.innerText : null;",
        element_id,
    )
    assert found is not None, f"no element #{element_id}"
    return str(found)


def count(driver: WebDriver, queue: str, kind: str) -> str:
    """The count shown in the queues table (read through the live DOM)."""
    found = driver.execute_script(
        "var c = document.querySelector('tr[data-queue=\"' + arguments[0] + '\"] "
        "td[data-count=\"' + arguments[1] + '\"]'); return c ? c.textContent.trim() : null;",
        queue,
        kind,
    )
    return str(found)


@pytest.fixture
def shots(tmp_path: Path) -> Callable[[WebDriver, str], None]:
    folder = tmp_path / "screenshots"
    folder.mkdir()
    keep = os.environ.get("OMNIQ_SCREENSHOTS")

    def shot(driver: WebDriver, name: str) -> None:
        path = folder / f"dashboard-{name}.png"
        assert driver.save_screenshot(str(path)), name
        if keep:
            shutil.copy(path, Path(keep) / path.name)

    return shot


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.emulator)])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, Any]]:
    if request.param == "local":
        return str(tmp_path / "store"), {}
    emu = request.getfixturevalue("s3_emulator")
    return emu.url(f"dashboard-{os.getpid()}-{id(tmp_path)}"), dict(emu.storage_options)


def test_a_worker_runs_under_the_dashboard(
    browser: WebDriver, where: tuple[str, dict[str, Any]], shots: Callable[[WebDriver, str], None]
) -> None:
    base_dir, options = where
    with FileBackend(base_dir, options, events=True) as backend:
        # A dead letter with a <script> argument, in a queue no worker serves after this.
        dead = backend.enqueue("worker_tasks:always_fail", [SCRIPT], queue="fails")
        backend.worker(["fails"], **BURST).run()
        assert backend.get_task(dead).status is TaskStatus.DEAD
        done = backend.enqueue("worker_tasks:add", [20, 22], queue="jobs")
        jobs = [backend.enqueue("worker_tasks:sync_sleep", [0.2], queue="jobs") for _ in range(5)]
        held = backend.enqueue("worker_tasks:add", [1, 2], queue="held")
        assert backend.queue.dequeue(["held"], lease=600, worker_id="gpu-box-1") is not None
        backend.schedule("worker_tasks:add", [1, 1], every=600, name="ten-minutes")

        with Server(backend) as server:
            visit(browser, server.url + "/")
            wait_for(lambda: count(browser, "jobs", "ready") == "6", "6 ready jobs")
            browser.execute_script("window.__notReloaded = true;")

            worker = backend.worker(["jobs"], concurrency=2, poll=0.1)
            thread = threading.Thread(target=worker.run, daemon=True)
            thread.start()
            try:
                # The counts change in place: no navigation, the page's script state survives.
                wait_for(lambda: count(browser, "jobs", "ready") == "0", "jobs to be taken")
                wait_for(lambda: count(browser, "jobs", "running") == "0", "jobs to finish")
                assert browser.execute_script("return window.__notReloaded === true;")
                assert count(browser, "fails", "dead") == "1"
                assert count(browser, "held", "running") == "1"
                wait_for(
                    lambda: all(backend.result(j) is not None for j in [done, *jobs]),
                    "the results",
                )
                shots(browser, "queues")
            finally:
                worker.stop()
                thread.join(WAIT)

            visit(browser, server.url + "/running")
            assert held in browser.page_source and "gpu-box-1" in browser.page_source
            shots(browser, "running")
            visit(browser, server.url + "/workers")
            assert "gpu-box-1" in browser.page_source
            shots(browser, "workers")
            visit(browser, server.url + "/schedules")
            assert "ten-minutes" in browser.page_source
            shots(browser, "schedules")

            # A finished task's page: its result and its timeline.
            visit(browser, f"{server.url}/tasks/{done}")
            assert text_of(browser, "task-result") == "42"
            timeline = text_of(browser, "timeline")
            assert "enqueued" in timeline and "started" in timeline and "succeeded" in timeline
            shots(browser, "task")

            # The dead letter, opened from the dead-letters page: the script is only text.
            visit(browser, server.url + "/dead")
            shots(browser, "dead")
            click(browser, f'a[href="/tasks/{dead}"]')
            wait_for(lambda: dead in browser.title, "the task page")
            assert SCRIPT in text_of(browser, "task-args")
            assert "pwned" not in browser.title
            assert "dead_lettered" in text_of(browser, "timeline")
            assert browser.find_elements(By.CSS_SELECTOR, "pre.traceback")
            shots(browser, "task-dead")

            # Requeue it by clicking.
            visit(browser, server.url + "/dead")
            click(browser, f'tr[data-task="{dead}"] button[data-action="requeue"]')
            wait_for(lambda: "Task requeued." in browser.page_source, "the requeue")
            assert backend.get_task(dead).status is TaskStatus.PENDING


@contextlib.contextmanager
def attacker_site(page: str) -> Iterator[str]:
    """Serve ``page`` at ``/`` of a plain HTTP server on another port of 127.0.0.1."""
    body = page.encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_refusals_in_the_browser(
    browser: WebDriver, tmp_path: Path, shots: Callable[[WebDriver, str], None]
) -> None:
    with FileBackend(str(tmp_path / "store"), events=True) as backend:
        dead = backend.enqueue("worker_tasks:always_fail", ["x"], queue="fails")
        backend.worker(["fails"], **BURST).run()
        post = (
            "var done = arguments[arguments.length - 1];"
            "fetch('/actions/requeue', {method: 'POST', body: new URLSearchParams("
            "{queue: 'fails', task_id: arguments[0]})})"
            ".then(function (r) { done(r.status); }, function (e) { done(String(e)); });"
        )
        with Server(backend) as server:
            # A POST from the page's own script but without the form's CSRF token.
            visit(browser, server.url + "/dead")
            assert browser.execute_async_script(post, dead) == 403
            # A form on another origin, even carrying a valid CSRF token, is refused.
            token = browser.find_element(By.CSS_SELECTOR, 'input[name="csrf"]').get_attribute(
                "value"
            )
            page = (
                f'<form id="f" method="post" action="{server.url}/actions/requeue">'
                f'<input name="csrf" value="{escape(token or "")}">'
                f'<input name="queue" value="fails"><input name="task_id" value="{dead}">'
                "</form><script>document.getElementById('f').submit()</script>"
            )
            # Served from 127.0.0.1 on another port: another origin but the same site, so
            # the browser sends the SameSite=Strict session cookie and the token is valid;
            # only the Origin check stands in the way (a file:// page would lose the cookie).
            with attacker_site(page) as other_url:
                visit(browser, other_url)
                wait_for(lambda: "refused" in browser.page_source, "the refusal")
                assert "not come from this dashboard" in browser.page_source
            assert backend.get_task(dead).status is TaskStatus.DEAD

        with Server(backend, read_only=True) as server:
            visit(browser, server.url + "/dead")
            assert dead in browser.page_source and "read-only" in browser.page_source
            assert not browser.find_elements(By.CSS_SELECTOR, "button[data-action]")
            shots(browser, "read-only")
            assert browser.execute_async_script(post, dead) == 403
        assert backend.get_task(dead).status is TaskStatus.DEAD
