"""Security: credentials never leak, nothing is unpickled, files respect the umask.

* A secret planted in ``storage_options`` must not appear in any repr, exception (message,
  chained causes, traceback text), log record (DEBUG, every logger), stdout/stderr, event,
  result or queue file -- on a working S3 store, on failing ones, and for Azure.
* A worker run end to end in a fresh process never calls an unpickling function.
* Files and directories created on a local disk never widen the process umask.
"""

from __future__ import annotations

import base64
import json
import logging
import stat
import subprocess
import traceback
import uuid
from pathlib import Path
from typing import Any

import fault_stats
import pytest
from fault_proc import spawn

from omniq.backend.file import FileBackend
from omniq.core import ConfigurationError, OmniQError, ResultStatus
from omniq.core.sync import run_sync


def _canary() -> str:
    return f"CANARY{uuid.uuid4().hex}SECRET"


class Evidence:
    """Everything an attacker could read: texts gathered during the test."""

    def __init__(self) -> None:
        self.texts: list[tuple[str, str]] = []

    def add(self, where: str, value: Any) -> None:
        self.texts.append((where, value if isinstance(value, str) else repr(value)))

    def exception(self, where: str, exc: BaseException) -> None:
        self.add(f"{where}: str", str(exc))
        self.add(f"{where}: repr", repr(exc))
        self.add(f"{where}: traceback", "".join(traceback.format_exception(exc)))

    def call(self, where: str, fn: Any) -> BaseException | None:
        try:
            fn()
        except Exception as exc:  # the point is to look at it
            self.exception(where, exc)
            return exc
        return None

    def assert_clean(self, *secrets: str) -> None:
        leaks = [
            (where, text[max(0, text.find(s) - 200) : text.find(s) + 50])
            for where, text in self.texts
            for s in secrets
            if s in text
        ]
        assert not leaks, f"secret leaked in: {leaks[:5]}"
        assert len(self.texts) > 5, "nothing was gathered: the check proves nothing"


def _log_texts(caplog: pytest.LogCaptureFixture) -> str:
    parts = [caplog.text]
    for record in caplog.records:
        parts.append(record.getMessage())
        parts.append(repr(record.args))
        if record.exc_info and record.exc_info[1] is not None:
            parts.append("".join(traceback.format_exception(record.exc_info[1])))
    return "\n".join(parts)


@pytest.mark.emulator
@pytest.mark.timeout(120)
def test_s3_secret_never_leaks(
    s3_emulator: Any,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = _canary()
    options = {**s3_emulator.storage_options, "secret": secret}  # moto accepts any secret
    base = s3_emulator.url(f"sec-{uuid.uuid4().hex}")
    seen = Evidence()
    with FileBackend(base, options, events=True) as backend:
        ok = backend.enqueue("fault_tasks_ok:echo", ["hello"])
        bad = backend.enqueue("fault_tasks_ok:fail", ["boom"])
        nowhere = backend.enqueue("fault_tasks_missing:f")
        worker = backend.worker(["default"], concurrency=2, burst=True, idle_timeout=1.5)
        stats = worker.run()
        assert stats["succeeded"] == 1 and stats["dead"] == 2, stats
        for task_id in (ok, bad, nowhere):
            result = backend.result(task_id)
            assert result is not None
            seen.add(f"result {task_id}", result)
            seen.add(f"task {task_id}", backend.get_task(task_id))
        assert backend.result(ok).status is ResultStatus.SUCCESS
        events = backend.async_api.events
        seen.add("events", run_sync(lambda: events.query()))
        for name, obj in [
            ("backend", backend),
            ("async backend", backend.async_api),
            ("config", backend.config),
            ("worker", worker),
            ("async worker", worker.async_api),
            ("queue", backend.async_api.queue),
            ("results", backend.async_api.results),
            ("events", events),
            ("store", backend.async_api.queue.store),
        ]:
            seen.add(f"repr {name}", repr(obj))
            seen.add(f"str {name}", str(obj))
        for part in ("queue", "results", "events"):
            seen.add(f"config part {part}", backend.config.part(part))
        seen.call("wait for nothing", lambda: backend.result("never-enqueued", wait=0.05))
        seen.call("unknown setting", lambda: FileBackend(base, options, leese=3))
        # every stored byte
        fs = s3_emulator.filesystem()
        stored = {p: fs.cat_file(p) for p in fs.find(base.split("://", 1)[1])}
        assert len(stored) > 10
        for path, data in stored.items():
            seen.add(f"stored {path}", data.decode("utf-8", "replace"))

    # failing configurations: a bucket that does not exist, an endpoint nobody listens on
    monkeypatch.setattr(
        "omniq.core._fsspec_ops.RETRIES", 1
    )  # fail fast; retries are tested elsewhere
    missing = s3_emulator.url("x").replace("omniq-test", f"no-such-bucket-{uuid.uuid4().hex}")
    with FileBackend(missing, options) as backend:
        assert isinstance(
            seen.call("missing bucket", lambda: backend.enqueue("fault_tasks_ok:echo", [1])),
            (OmniQError, OSError),
        )
    dead_end = {
        "key": "testing",
        "secret": secret,
        "endpoint_url": "http://127.0.0.1:9",
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1},
    }
    with FileBackend(base, dead_end) as backend:
        assert isinstance(
            seen.call("closed port", lambda: backend.enqueue("fault_tasks_ok:echo", [1])),
            OmniQError,
        )
        seen.add("closed port backend", repr(backend))
    out, err = capfd.readouterr()
    seen.add("stdout", out)
    seen.add("stderr", err)
    seen.add("logs", _log_texts(caplog))
    fault_stats.add("bad inputs tried", 4)
    seen.assert_clean(secret)


@pytest.mark.emulator
@pytest.mark.timeout(120)
def test_azure_account_key_never_leaks(
    azure_emulator: Any,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setattr("omniq.core._fsspec_ops.RETRIES", 1)
    secret = _canary()
    key = base64.b64encode(secret.encode()).decode()
    endpoint = azure_emulator.endpoint
    seen = Evidence()
    # (A closed port is not tried here: the Azure SDK retries a refused connection for
    # about a minute on its own.)
    for label, blob_endpoint in (("wrong key", f"{endpoint}/devstoreaccount1"),):
        conn = (
            f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
            f"AccountKey={key};BlobEndpoint={blob_endpoint};"
        )
        with FileBackend(
            azure_emulator.url(f"sec-{uuid.uuid4().hex}"), {"connection_string": conn}
        ) as backend:
            seen.add(f"{label} repr", repr(backend))
            seen.add(f"{label} config", repr(backend.config))
            exc = seen.call(label, lambda b=backend: b.enqueue("fault_tasks_ok:echo", [1]))
            assert exc is not None, f"{label}: the bad key was accepted"
    out, err = capfd.readouterr()
    seen.add("stdout", out)
    seen.add("stderr", err)
    seen.add("logs", _log_texts(caplog))
    fault_stats.add("bad inputs tried", 2)
    seen.assert_clean(secret, key)


def test_url_credentials_and_env_settings_are_never_echoed(tmp_path: Path) -> None:
    secret = _canary()
    seen = Evidence()
    backend = FileBackend(f"s3://user:{secret}@bucket/app", {"secret": secret})
    for obj in (
        backend,
        backend.async_api,
        backend.config,
        backend.config.part("queue"),
        backend.async_api.queue,
        backend.async_api.queue.store,
    ):
        seen.add("repr", repr(obj))
        seen.add("str", str(obj))
    bad_env = [
        {"OMNIQ_STORAGE_OPTIONS": '{"secret": "' + secret},
        {"OMNIQ_STORAGE_OPTIONS": json.dumps([secret])},
        {"OMNIQ_LEASE": secret},
        {"OMNIQ_EVENTS": secret},
        {"OMNIQ_MAX_RETRIES": secret},
    ]
    for env in bad_env:
        exc = seen.call(
            f"env {list(env)}",
            lambda env=env: FileBackend.from_env(
                environ={"OMNIQ_BASE_DIR": str(tmp_path / "store"), **env}
            ),
        )
        assert isinstance(exc, ConfigurationError), (env, exc)
    fault_stats.add("bad inputs tried", len(bad_env))
    seen.assert_clean(secret)


# --------------------------------------------------------------------------- pickle


@pytest.mark.timeout(120)
def test_no_code_path_unpickles(tmp_path: Path) -> None:
    """A fresh process with every unpickling entry point trapped runs producer, worker,
    results and events end to end (plus an unreadable task to quarantine)."""
    base = tmp_path / "store"
    proc = spawn(
        {
            "mode": "e2e",
            "base_dir": str(base),
            "count": 20,
            "events": True,
            "corrupt": True,
            "forbid_pickle": True,
            "lease": 5.0,
        },
        tmp_path / "e2e.log",
    )
    assert proc.wait(timeout=90) == 0, (tmp_path / "e2e.log").read_text()
    lines = (tmp_path / "e2e.out").read_text().splitlines()
    report, trap = json.loads(lines[0]), json.loads(lines[-1])
    assert all(report["ok"]) and report["values"] == [i + 1 for i in range(20)], report
    assert report["events_of_first_task"] >= 3, report
    assert report["stats"]["succeeded"] == 20, report
    assert trap == {"pickle_calls": []}, trap
    assert list((base / "queue" / "default" / "quarantine").iterdir()), "nothing quarantined"


# --------------------------------------------------------------------------- umask


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("umask", "file_bits", "dir_bits"), [(0o027, 0o640, 0o750), (0o077, 0o600, 0o700)]
)
def test_created_files_respect_the_umask(
    tmp_path: Path, umask: int, file_bits: int, dir_bits: int
) -> None:
    base = tmp_path / "store"
    proc = spawn(
        {
            "mode": "e2e",
            "base_dir": str(base),
            "count": 10,
            "events": True,
            "corrupt": True,
            "umask": umask,
            "lease": 5.0,
        },
        tmp_path / "e2e.log",
    )
    try:
        assert proc.wait(timeout=90) == 0, (tmp_path / "e2e.log").read_text()
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    too_open = []
    count = 0
    for path in [base, *base.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        allowed = dir_bits if path.is_dir() else file_bits
        count += 1
        if mode & ~allowed:
            too_open.append(f"{path.relative_to(tmp_path)} {oct(mode)}")
    assert count > 30, count
    assert list((base / "queue" / "default" / "quarantine").iterdir())
    assert not too_open, too_open
