"""An object-store emulator stopped and restarted under a running worker.

The emulators keep their data in memory, so a restart loses the bucket and everything in it:
the assertion is that the worker survives the outage (logging the errors and backing off),
and once the store is back (bucket recreated) it processes newly enqueued tasks.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import fault_stats
import pytest
from fault_proc import spawn

import emulators
from omniq.backend.file import FileBackend
from omniq.core import ResultStatus


def _wait_results(
    base: str, options: dict[str, Any], ids: list[str], proc: Any, timeout: float
) -> None:
    end = time.monotonic() + timeout
    with FileBackend(base, options) as backend:
        while True:
            got = {i: backend.result(i) for i in ids}
            if all(r is not None for r in got.values()):
                assert all(
                    r.status is ResultStatus.SUCCESS and r.value == i for i, r in got.items()
                )
                return
            assert proc.poll() is None, f"the worker died (exit {proc.returncode})"
            assert time.monotonic() < end, f"no results after {timeout} s: {got}"
            time.sleep(0.2)


def _enqueue(base: str, options: dict[str, Any], prefix: str, n: int) -> list[str]:
    with FileBackend(base, options) as backend:
        return [
            backend.enqueue("fault_tasks_ok:echo", [f"{prefix}{i}"], task_id=f"{prefix}{i}")
            for i in range(n)
        ]


# S3: botocore's own retries are turned off so that the outage reaches OmniQ within the
# test's 4 s (s3fs still retries each request for ~2 s): OmniQ retries and logs, then the
# worker logs the StorageError and backs off. gcsfs retries every request for ~30 s by itself
# (a class setting), so a short outage stays inside the plugin there and nothing is logged.
CASES = {
    "s3": (
        {
            "config_kwargs": {
                "retries": {"max_attempts": 1},
                "connect_timeout": 2,
                "read_timeout": 5,
            }
        },
        True,
    ),
    "gcs": ({}, False),
}


@pytest.mark.emulator
@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", list(CASES))
def test_worker_outlives_an_emulator_restart(
    name: str, tmp_path: Path, monkeypatch, require_emulator_program
) -> None:
    extra, errors_reach_omniq = CASES[name]
    require_emulator_program(name)
    emu = emulators.EMULATORS[name](bucket="omniq-restart")
    proc: subprocess.Popen[bytes] | None = None
    try:
        emu.start()
        port = emu.port
        base, options = emu.url("app"), {**emu.storage_options, **extra}
        first = _enqueue(base, options, "before", 3)
        proc = spawn(
            {
                "mode": "worker",
                "base_dir": base,
                "storage_options": options,
                "lease": 5.0,
                "clock_skew": 1.0,
                "concurrency": 2,
                "poll": 0.2,
                "events": True,
            },
            tmp_path / "worker.log",
        )
        _wait_results(base, options, first, proc, timeout=60)

        emu.stop()  # the store goes away under the running worker
        fault_stats.add("emulator outages")
        down_until = time.monotonic() + 4.0
        while time.monotonic() < down_until:
            assert proc.poll() is None, (
                f"the worker died while the store was down:\n"
                f"{(tmp_path / 'worker.log').read_text(errors='replace')[-3000:]}"
            )
            time.sleep(0.2)

        monkeypatch.setattr(emulators, "_free_port", lambda: port)
        emu.start()  # same port, empty store, bucket recreated
        assert emu.port == port
        later = _enqueue(base, options, "after", 3)
        _wait_results(base, options, later, proc, timeout=90)
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        emu.stop()
    log = (tmp_path / "worker.log").read_text(errors="replace")
    assert proc.returncode == 0, f"worker exit {proc.returncode}:\n{log[-3000:]}"
    if errors_reach_omniq:
        assert "retrying " in log or "claiming from default failed" in log, (
            f"the outage was not logged:\n{log[-3000:]}"
        )
    assert "Traceback" not in log, log[-3000:]
