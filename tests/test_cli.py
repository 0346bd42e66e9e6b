"""The ``omniq`` command, run for real: the installed console script in subprocesses.

Task functions live in tests/cli_tasks.py; workers import them through ``--path tests``.
Every command's stdout and stderr is checked for the planted storage-option secrets.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

OMNIQ = Path(sys.executable).parent / ("omniq.exe" if os.name == "nt" else "omniq")
TESTS_DIR = Path(__file__).resolve().parent
SECRET = "PLANTED-SECRET-123"
SECRET_KEY = "PLANTED-KEY-456"
# A local directory ignores storage options: the secrets ride along and must never show.
SECRET_OPTIONS = json.dumps({"key": SECRET_KEY, "secret": SECRET})
SUBCOMMANDS = ("worker", "enqueue", "status", "tasks", "result", "events", "dead", "dashboard")

ROOT = Path(__file__).resolve().parent.parent


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNIQ_")}
    env.update(extra or {})
    return env


def _check_no_secret(*texts: str) -> None:
    for text in texts:
        assert SECRET not in text and SECRET_KEY not in text, text


class Cli:
    """Runs ``omniq`` with a working directory of its own (not the tests directory)."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd

    def __call__(
        self, *args: object, env: dict[str, str] | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(OMNIQ), *map(str, args)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_env(env),
            cwd=self.cwd,
        )
        _check_no_secret(proc.stdout, proc.stderr)
        return proc

    def ok(self, *args: object, **kwargs) -> str:
        proc = self(*args, **kwargs)
        assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
        return proc.stdout

    def enqueue(self, base: object, func: str, *args: object) -> str:
        out = self.ok("enqueue", base, func, "--path", TESTS_DIR, "--events", *args)
        task_id = out.strip()
        assert len(task_id) == 26 and "\n" not in task_id, out  # the id only
        return task_id

    def burst(self, base: object, *args: object, **kwargs) -> str:
        return self.ok("worker", base, "--burst", "--events", "--path", TESTS_DIR, *args, **kwargs)


@pytest.fixture
def cli(tmp_path) -> Cli:
    work = tmp_path / "cwd"
    work.mkdir()
    return Cli(work)


@pytest.fixture
def base(tmp_path) -> str:
    return str(tmp_path / "store")


def test_console_script_is_installed():
    assert OMNIQ.is_file(), f"the omniq console script is missing next to {sys.executable}"


def test_help(cli):
    out = cli.ok("--help")
    for name in SUBCOMMANDS:
        assert name in out
    assert "exit codes" in out
    proc = cli()
    assert proc.returncode == 2 and "COMMAND" in proc.stderr


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_subcommand_help(cli, command):
    out = cli.ok(command, "--help")
    assert out.startswith(f"usage: omniq {command}")
    assert "BASE_DIR" in out and "--storage-options" in out


def test_runs_as_python_module(cli):
    proc = subprocess.run(
        [sys.executable, "-m", "omniq.backend.file.cli", "status", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
    )
    assert proc.returncode == 0 and "usage: omniq status" in proc.stdout


def test_process_pool_worker_runs_as_python_module(cli, base):
    """anyio's process workers re-run ``__main__`` by its path: with ``python -m ...cli`` that
    is cli.py itself, whose relative imports failed there, so every task of a
    ``--processes`` worker died with BrokenWorkerProcess before cli.py imported absolutely."""
    task_id = cli.enqueue(base, "cli_tasks:add", "--args", "[20, 22]")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "omniq.backend.file.cli",
            "worker",
            base,
            "--burst",
            "--processes",
            "2",
            "--path",
            str(TESTS_DIR),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
        cwd=cli.cwd,
    )
    assert proc.returncode == 0 and "succeeded=1" in proc.stdout, proc.stdout + proc.stderr
    assert cli.ok("result", base, task_id).strip() == "42"


def test_enqueue_worker_result(cli, base):
    task_id = cli.enqueue(base, "cli_tasks:add", "--args", "[2, 3]")
    out = cli.burst(base)
    assert "worker stopped:" in out and "succeeded=1" in out
    assert cli.ok("result", base, task_id).strip() == "5"
    doc = json.loads(cli.ok("result", base, task_id, "--json"))
    assert doc["status"] == "success" and doc["value"] == 5 and doc["attempt"] == 1


def test_kwargs_and_options(cli, base):
    task_id = cli.enqueue(
        base,
        "cli_tasks:add",
        "--kwargs",
        '{"a": "x", "b": "y"}',
        "-q",
        "other",
        "--priority",
        "5",
        "--timeout",
        "10",
    )
    cli.burst(base, "-q", "other")
    assert json.loads(cli.ok("result", base, task_id)) == "xy"


def test_failed_task_result_exits_1(cli, base):
    task_id = cli.enqueue(base, "cli_tasks:boom", "--kwargs", '{"message": "kaput"}')
    out = cli.burst(base)
    assert "failed=1" in out and "dead=1" in out
    proc = cli("result", base, task_id)
    assert proc.returncode == 1
    assert "ValueError: kaput" in proc.stdout and "Traceback" in proc.stdout
    proc = cli("result", base, task_id, "--json")
    assert proc.returncode == 1
    doc = json.loads(proc.stdout)
    assert doc["status"] == "failure" and doc["error"]["message"] == "kaput"


def test_result_not_found_or_not_ready(cli, base):
    proc = cli("result", base, "01ARZ3NDEKTSV4RRFFQ69G5FAV")
    assert proc.returncode == 2 and "no result" in proc.stderr
    task_id = cli.enqueue(base, "cli_tasks:add", "--args", "[1, 1]")
    proc = cli("result", base, task_id)
    assert proc.returncode == 2 and "pending" in proc.stderr
    proc = cli("result", base, task_id, "--wait", "0.3")
    assert proc.returncode == 2 and "after waiting" in proc.stderr
    proc = cli("result", base, "../../etc")
    assert proc.returncode == 2 and "task id" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_status_json_counts(cli, base):
    cli.enqueue(base, "cli_tasks:add", "--args", "[1, 2]", "-q", "alpha")
    cli.enqueue(base, "cli_tasks:add", "--args", "[1, 2]", "-q", "alpha", "--delay", "300")
    cli.enqueue(base, "cli_tasks:boom", "-q", "beta")
    cli.burst(base, "-q", "beta")
    doc = json.loads(cli.ok("status", base, "--json"))
    assert doc["queues"] == {
        "alpha": {"ready": 1, "scheduled": 1, "running": 0, "dead": 0},
        "beta": {"ready": 0, "scheduled": 0, "running": 0, "dead": 1},
    }
    table = cli.ok("status", base)
    assert table.splitlines()[0].split() == ["QUEUE", "READY", "SCHEDULED", "RUNNING", "DEAD"]
    assert any(line.split() == ["alpha", "1", "1", "0", "0"] for line in table.splitlines())
    only = json.loads(cli.ok("status", base, "--json", "-q", "beta"))
    assert list(only["queues"]) == ["beta"]
    lines = cli.ok("status", base, "--json", "--watch", "0.1", "--iterations", "3").splitlines()
    assert len(lines) == 3 and all(
        json.loads(line)["queues"]["alpha"]["ready"] == 1 for line in lines
    )
    watched = cli.ok("status", base, "--watch", "0.1", "--iterations", "2")
    assert watched.count("QUEUE") == 2


def test_events_show_the_lifecycle(cli, base, tmp_path):
    marker = tmp_path / "flaky.marker"
    task_id = cli.enqueue(
        base,
        "cli_tasks:flaky",
        "--kwargs",
        json.dumps({"marker": str(marker)}),
        "--max-retries",
        "2",
        "--retry-backoff",
        "0.1",
    )
    cli.burst(base, "--idle-timeout", "3")
    events = [
        json.loads(line)
        for line in cli.ok("events", base, "--task", task_id, "--json").splitlines()
    ]
    assert [e["type"] for e in events] == ["enqueued", "started", "retried", "started", "succeeded"]
    assert [e["attempt"] for e in events] == [None, 1, 1, 2, 2]
    assert events[2]["error"]["message"] == "first attempt fails"
    assert all(e["task_id"] == task_id for e in events)
    assert len({e["worker_id"] for e in events[1:]}) == 1

    lines = cli.ok("events", base, "--task", task_id).splitlines()
    assert len(lines) == 5 and "retried" in lines[2] and "ConnectionError" in lines[2]
    assert task_id in lines[0] and "#1" in lines[1]
    only = cli.ok("events", base, "--type", "succeeded", "--since", "-10m").splitlines()
    assert len(only) == 1 and task_id in only[0]
    assert cli.ok("events", base, "--until", "-10m") == ""
    assert len(cli.ok("events", base, "--limit", "2").splitlines()) == 2
    followed = cli.ok(
        "events", base, "--task", task_id, "--follow", "--interval", "0.1", "--iterations", "3"
    ).splitlines()
    assert followed == lines  # nothing printed twice
    proc = cli("events", base, "--since", "last tuesday")
    assert proc.returncode == 2 and "--since" in proc.stderr


def test_dead_lists_and_requeues(cli, base):
    first = cli.enqueue(base, "cli_tasks:boom", "--kwargs", '{"message": "bad record"}')
    second = cli.enqueue(base, "cli_tasks:boom", "-q", "other")
    cli.burst(base, "-q", "default", "-q", "other")
    listing = cli.ok("dead", base)
    assert first in listing and second in listing and "ValueError: bad record" in listing
    doc = json.loads(cli.ok("dead", base, "--json", "-q", "default"))
    assert [d["task"]["id"] for d in doc] == [first]
    assert doc[0]["queue"] == "default" and doc[0]["error"]["message"] == "bad record"

    assert "requeued 1 task" in cli.ok("dead", base, "--requeue", first)
    counts = json.loads(cli.ok("status", base, "--json"))["queues"]
    assert counts["default"]["ready"] == 1 and counts["default"]["dead"] == 0
    assert counts["other"]["dead"] == 1
    proc = cli("dead", base, "--requeue", first)
    assert proc.returncode == 2 and "not dead-lettered" in proc.stderr
    assert json.loads(cli.ok("dead", base, "--requeue", "--json")) == {"requeued": 1}
    counts = json.loads(cli.ok("status", base, "--json"))["queues"]
    assert counts["other"] == {"ready": 1, "scheduled": 0, "running": 0, "dead": 0}
    assert "no dead-lettered tasks" in cli.ok("dead", base)


@pytest.mark.parametrize(
    "flag, value, expected",
    [
        ("--args", "[1, 2", "--args is not valid JSON"),
        ("--args", '{"a": 1}', "--args must be a JSON array"),
        ("--kwargs", "[1]", "--kwargs must be a JSON object"),
        ("--kwargs", "{'a': 1}", "--kwargs is not valid JSON"),
    ],
)
def test_bad_json_exits_2_naming_the_flag(cli, base, flag, value, expected):
    proc = cli("enqueue", base, "cli_tasks:add", flag, value, "--path", TESTS_DIR)
    assert proc.returncode == 2
    assert expected in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize(
    "func, expected",
    [
        ("cli_tasks:no_such_function", "no attribute 'no_such_function'"),
        ("no_such_module_xyz:run", "No module named 'no_such_module_xyz'"),
        ("no_colon_here", "must look like 'package.module:function'"),
    ],
)
def test_unknown_function_exits_2(cli, base, func, expected):
    proc = cli("enqueue", base, func, "--path", TESTS_DIR)
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr and "Traceback" not in proc.stderr
    status = cli("status", base, "--json")  # nothing was stored: not even the directory
    assert status.returncode == 2 and "does not exist" in status.stderr, status.stderr


def test_no_check_skips_the_import(cli, base):
    task_id = cli.ok("enqueue", base, "elsewhere.tasks:run", "--no-check").strip()
    doc = json.loads(cli.ok("status", base, "--json"))
    assert doc["queues"]["default"]["ready"] == 1 and len(task_id) == 26


def test_storage_failure_exits_3(cli, tmp_path):
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("x")
    proc = cli("enqueue", not_a_dir, "cli_tasks:add", "--path", TESTS_DIR)
    assert proc.returncode == 3
    assert proc.stderr.startswith("omniq: storage error:") and "Traceback" not in proc.stderr


def test_planted_secret_is_never_printed(cli, base, tmp_path):
    """Every command, success or error, with the secret in --storage-options or in the
    environment: ``Cli`` asserts on each output that the secret is absent."""
    opts = ("--storage-options", SECRET_OPTIONS)
    task_id = cli.enqueue(base, "cli_tasks:add", "--args", "[1, 2]", *opts)
    failing = cli.enqueue(base, "cli_tasks:boom", *opts)
    env = {"OMNIQ_STORAGE_OPTIONS": SECRET_OPTIONS}
    cli.burst(base, "--log-level", "DEBUG", env=env)
    for args in (
        ("status", base),
        ("status", base, "--json"),
        ("result", base, task_id),
        ("result", base, failing),
        ("events", base),
        ("dead", base),
        ("dead", base, "--json"),
    ):
        assert cli(*args, *opts).returncode in (0, 1)
        assert cli(*args, env=env).returncode in (0, 1)
    errors = [
        ("result", base, "01ARZ3NDEKTSV4RRFFQ69G5FAV", *opts),
        ("enqueue", base, "nope:nope", *opts),
        ("enqueue", base, "cli_tasks:add", "--args", "[", *opts),
        # invalid JSON holding the secret, and the secret as a stray argument
        ("status", base, "--storage-options", '{"secret": "' + SECRET + '"'),
        ("status", base, "--storage-options", SECRET_OPTIONS, SECRET),
        ("status", base, "--storage-options", "[" + json.dumps(SECRET) + "]"),
        ("enqueue", tmp_path / "missing" / "x", "cli_tasks:add", "--bogus", *opts),
    ]
    for args in errors:
        proc = cli(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
    proc = cli("status", base, env={"OMNIQ_STORAGE_OPTIONS": '{"secret": "' + SECRET})
    assert proc.returncode == 2 and "OMNIQ_STORAGE_OPTIONS" in proc.stderr


def test_flags_win_over_environment(cli, base):
    # OMNIQ_EVENTS=false from the environment, --events on the command line wins.
    task_id = cli.ok(
        "enqueue",
        base,
        "cli_tasks:add",
        "--args",
        "[1, 1]",
        "--path",
        TESTS_DIR,
        "--events",
        env={"OMNIQ_EVENTS": "false"},
    ).strip()
    events = cli.ok("events", base, "--task", task_id, "--json").splitlines()
    assert [json.loads(e)["type"] for e in events] == ["enqueued"]
    other = cli.ok(
        "enqueue",
        base,
        "cli_tasks:add",
        "--args",
        "[1, 1]",
        "--path",
        TESTS_DIR,
        env={"OMNIQ_EVENTS": "false"},
    ).strip()
    assert cli.ok("events", base, "--task", other) == ""


def _wait_for(path: Path, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text():
        assert time.monotonic() < deadline, f"{text!r} not seen in:\n{path.read_text()}"
        time.sleep(0.05)


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
def test_worker_stops_gracefully_on_sigterm(cli, base, tmp_path):
    log = tmp_path / "worker.log"
    with log.open("w") as stderr:
        worker = subprocess.Popen(
            [
                str(OMNIQ),
                "worker",
                base,
                "--path",
                str(TESTS_DIR),
                "-c",
                "2",
                "--grace",
                "20",
                "--storage-options",
                SECRET_OPTIONS,
            ],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=_env(),
            cwd=cli.cwd,
        )
        try:
            _wait_for(log, "started on default")
            quick = cli.enqueue(base, "cli_tasks:add", "--args", "[20, 22]")
            assert cli.ok("result", base, quick, "--wait", "20").strip() == "42"
            napping = cli.enqueue(base, "cli_tasks:nap", "--args", "[1.5]")
            _wait_for(log, f"task {napping} cli_tasks:nap started")
            began = time.monotonic()
            worker.send_signal(signal.SIGTERM)
            out, _ = worker.communicate(timeout=15)
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    assert worker.returncode == 0, log.read_text()
    assert time.monotonic() - began < 10
    assert "worker stopped:" in out and "succeeded=2" in out
    _check_no_secret(out, log.read_text())
    # The running task finished within the grace period instead of being abandoned.
    assert cli.ok("result", base, napping).strip() == "1.5"


def test_demo(tmp_path):
    began = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py"), "--dir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "Event timeline of the flaky task" in out
    timeline = out.split("Event timeline", 1)[1].split("Look around", 1)[0]
    kinds = [line.split()[2] for line in timeline.splitlines()[2:] if line.strip()]
    assert kinds == ["enqueued", "started", "retried", "started", "succeeded"]
    assert "omniq status" in out and "--task" in out
    # The progress of resize_images(8) was read by get_task while it ran, in order.
    seen = out.split("seen by get_task while it ran: ", 1)[1].splitlines()[0].split(", ")
    done = [int(step.split("/")[0]) for step in seen]
    assert len(done) >= 2 and done == sorted(done) and all(step.endswith("/8") for step in seen)
    assert "published album" in out and "waited for" in out
    assert "Everything behaved as expected" in out
    assert time.monotonic() - began < 60


@pytest.mark.emulator
def test_against_s3_emulator(cli, s3_emulator):
    base = s3_emulator.url(f"cli-{uuid.uuid4().hex}")
    options = {**s3_emulator.storage_options, "key": SECRET_KEY, "secret": SECRET}
    opts = ("--storage-options", json.dumps(options))
    task_id = cli.enqueue(base, "cli_tasks:add", "--args", "[40, 2]", *opts)
    failing = cli.enqueue(base, "cli_tasks:boom", *opts)
    out = cli.burst(base, *opts)
    assert "succeeded=1" in out and "dead=1" in out
    assert cli.ok("result", base, task_id, *opts).strip() == "42"
    assert cli("result", base, failing, *opts).returncode == 1
    doc = json.loads(cli.ok("status", base, "--json", *opts))
    assert doc["queues"]["default"] == {"ready": 0, "scheduled": 0, "running": 0, "dead": 1}
    # The same through the environment variable.
    env = {"OMNIQ_STORAGE_OPTIONS": json.dumps(options)}
    kinds = [
        json.loads(e)["type"]
        for e in cli.ok("events", base, "--task", task_id, "--json", env=env).splitlines()
    ]
    assert kinds == ["enqueued", "started", "succeeded"]
    assert failing in cli.ok("dead", base, env=env)
