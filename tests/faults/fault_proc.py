"""Worker and producer processes of the fault suite, and how tests start them.

A child runs ``python -m fault_proc CONFIG_JSON`` where CONFIG says what to do:

* ``{"mode": "worker", ...}``: a ``FileBackend`` worker until SIGTERM (or burst); prints its
  counters as JSON on stdout when it stops.
* ``{"mode": "enqueue", ...}``: enqueue tasks ``{prefix}{i:05d}`` one by one, appending each id
  to ``log`` only once ``enqueue`` returned (what the producer was told).
* ``{"mode": "e2e", ...}``: enqueue, work (burst), read results and events back; prints a JSON
  report (used by the pickle and umask checks).

``"crash": {"call": "write"|"link"|"replace"|"unlink", "match": SUBSTRING, "nth": N,
"how": "half"|"before"|"after", "data": TEXT}`` makes the child die with
``os._exit(CRASH_EXIT)`` -- no cleanup, no ``finally``, like SIGKILL -- at the N-th matching
system call (a path containing SUBSTRING -- ``PREFIX*SUFFIX``: containing PREFIX and ending
in SUFFIX; for ``write``, optionally only writes of exactly TEXT): ``half`` writes half of the buffer first, ``before``/``after`` die just before or just
after the call. New local files are made nameless (``O_TMPFILE``) where the filesystem allows,
without the timed trial of ``LocalOps``; ``"named_temp": true`` turns ``O_TMPFILE`` off, so
that they go through a named temp file (linked or renamed into place) instead.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CRASH_EXIT = 86
# Written to the log (stderr) once SIGTERM means a clean exit; a SIGTERM sent before it (while
# Python is still starting) kills the child with -15 instead.
READY = "fault_proc: SIGTERM handled"
FAULTS_DIR = Path(__file__).resolve().parent
TESTS_DIR = FAULTS_DIR.parent
TOOLS_DIR = TESTS_DIR.parent / "tools"


# --------------------------------------------------------------------------- parent side


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(FAULTS_DIR), str(TESTS_DIR), str(TOOLS_DIR)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
    env.pop("COVERAGE_PROCESS_START", None)
    env.update(extra or {})
    return env


def spawn(
    config: dict[str, Any], log_path: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start a child; its stderr (the log) goes to ``log_path``, stdout to ``log_path.out``."""
    out = open(log_path.with_suffix(".out"), "wb")  # noqa: SIM115 - owned by the child
    err = open(log_path, "wb")  # noqa: SIM115
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "fault_proc", json.dumps(config)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=child_env(env),
            cwd=str(FAULTS_DIR),
        )
    finally:
        out.close()
        err.close()


def wait_ready(proc: subprocess.Popen[bytes], log_path: Path, timeout: float = 60.0) -> bool:
    """Wait until the child wrote ``READY`` (or exited), so that a SIGTERM stops it cleanly;
    False if it did neither within ``timeout`` (the caller still stops it)."""
    end = time.monotonic() + timeout
    while proc.poll() is None and READY not in log_path.read_text(errors="replace"):
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


# --------------------------------------------------------------------------- crash points


def install_crash(spec: dict[str, Any]) -> None:
    """Die at the ``nth`` system call ``call`` whose path contains ``match``."""
    call, match, nth, how = spec["call"], spec["match"], int(spec["nth"]), spec["how"]
    if spec.get("named_temp") and hasattr(os, "O_TMPFILE"):
        del os.O_TMPFILE
    else:  # no timed trial of the two ways: the crash points must be reached in every run
        from omniq.core import _local_ops

        _local_ops.TRIAL_FILES = 0
    real = {
        name: getattr(os, name) for name in ("open", "write", "close", "link", "replace", "unlink")
    }
    fds: dict[int, str] = {}
    seen = [0]

    head, _, tail = match.partition("*")  # "PREFIX*SUFFIX": paths ending in SUFFIX only

    def hit(path: Any) -> bool:
        text = os.fsdecode(path)
        if head not in text or not text.endswith(tail):
            return False
        seen[0] += 1
        return seen[0] == nth

    def die() -> None:
        os._exit(CRASH_EXIT)

    def _open(path: Any, flags: int, mode: int = 0o777, *args: Any, **kwargs: Any) -> int:
        fd = real["open"](path, flags, mode, *args, **kwargs)
        fds[fd] = os.fsdecode(path)
        return fd

    def _close(fd: int) -> None:
        fds.pop(fd, None)
        real["close"](fd)

    wanted = spec["data"].encode() if spec.get("data") is not None else None

    def _write(fd: int, data: Any) -> int:
        path = fds.get(fd)
        if (
            path is not None
            and call == "write"
            and (wanted is None or bytes(data) == wanted)
            and hit(path)
        ):
            if how == "half":
                real["write"](fd, bytes(data)[: max(1, len(data) // 2)])
            elif how == "after":
                real["write"](fd, data)
            die()
        return real["write"](fd, data)  # type: ignore[no-any-return]

    def two_paths(name: str) -> Any:
        def wrapped(src: Any, dst: Any, *args: Any, **kwargs: Any) -> Any:
            if call == name and hit(dst):
                if how == "before":
                    die()
                try:
                    real[name](src, dst, *args, **kwargs)
                except OSError:
                    # Did not happen (a claim's first link into a missing run/ directory is
                    # retried after a makedirs): the crash point is the next one that does.
                    seen[0] -= 1
                    raise
                die()
            return real[name](src, dst, *args, **kwargs)

        return wrapped

    def _unlink(path: Any, *args: Any, **kwargs: Any) -> None:
        if call == "unlink" and hit(path):
            if how == "before":
                die()
            try:
                real["unlink"](path, *args, **kwargs)
            except OSError:
                seen[0] -= 1
                raise
            die()
        real["unlink"](path, *args, **kwargs)

    os.open = _open  # type: ignore[assignment]
    os.close = _close  # type: ignore[assignment]
    os.write = _write  # type: ignore[assignment]
    os.link = two_paths("link")  # type: ignore[assignment]
    os.replace = two_paths("replace")  # type: ignore[assignment]
    os.unlink = _unlink  # type: ignore[assignment]


# --------------------------------------------------------------------------- child modes


def _backend(config: dict[str, Any]) -> Any:
    from omniq.backend.file import FileBackend

    return FileBackend(
        config["base_dir"],
        config.get("storage_options") or {},
        lease=config.get("lease", 1.0),
        clock_skew=config.get("clock_skew", 0.3),
        events=config.get("events", True),
    )


def run_worker(config: dict[str, Any]) -> None:
    with _backend(config) as backend:
        worker = backend.worker(
            config.get("queues", ["default"]),
            concurrency=config.get("concurrency", 4),
            burst=config.get("burst", False),
            idle_timeout=config.get("idle_timeout", 1.0),
            poll=config.get("poll", 0.5),
            allow=config.get("allow"),
        )
        stats = worker.run()
    print(json.dumps(stats), flush=True)


def run_enqueue(config: dict[str, Any]) -> None:
    log = os.open(config["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    with _backend(config) as backend:
        for i in range(config["count"]):
            task_id = f"{config['prefix']}{i:05d}"
            delay = (
                config.get("delay")
                if config.get("delay_every") and i % config["delay_every"] == 0
                else None
            )
            backend.enqueue("fault_tasks_ok:echo", [task_id], task_id=task_id, delay=delay)
            os.write(log, f"{task_id}\n".encode())
    os.close(log)


def run_e2e(config: dict[str, Any]) -> None:
    from omniq.core import ResultStatus

    with _backend(config) as backend:
        ids = [backend.enqueue("fault_tasks_ok:add", [i, 1]) for i in range(config["count"])]
        if config.get("corrupt"):  # an unreadable task the worker must move to quarantine
            ready = Path(config["base_dir"]) / "queue" / "default" / "ready" / "p0999"
            (ready / "01ZZZZZZZZZZZZZZZZZZZZZZZZ.1.json").write_bytes(b"{not json")
        stats = backend.worker(["default"], concurrency=2, burst=True, idle_timeout=0.5).run()
        results = [backend.result(i) for i in ids]
        events = backend.async_api.events
        seen = 0
        if events is not None:
            from omniq.core.sync import run_sync

            seen = len(run_sync(lambda: events.query(task_id=ids[0])))
        report = {
            "stats": stats,
            "ok": [r is not None and r.status is ResultStatus.SUCCESS for r in results],
            "values": [r.value if r is not None else None for r in results],
            "events_of_first_task": seen,
        }
    print(json.dumps(report), flush=True)


def forbid_pickle() -> list[str]:
    """Make every unpickling entry point raise (and record the call), before anything else
    is imported, so that ``from pickle import loads`` elsewhere gets the trap too."""
    import _pickle
    import pickle

    calls: list[str] = []

    def trap(name: str) -> Any:
        def refuse(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            raise RuntimeError(f"pickle.{name} called: OmniQ must never unpickle")

        return refuse

    for module in (pickle, _pickle):
        for name in ("loads", "load", "_loads", "_load"):
            if hasattr(module, name):
                setattr(module, name, trap(name))

    class TrapUnpickler(pickle.Unpickler):
        def load(self) -> Any:
            return trap("Unpickler.load")()

    pickle.Unpickler = TrapUnpickler  # type: ignore[misc]
    return calls


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    # Until the worker installs its own handler (graceful stop), SIGTERM means exit now.
    raise SystemExit(0)


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    print(READY, file=sys.stderr, flush=True)
    config = json.loads(argv[1])
    if config.get("umask") is not None:
        os.umask(int(config["umask"]))
    logging.basicConfig(
        level=getattr(logging, config.get("log_level", "WARNING")),
        stream=sys.stderr,
        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s",
    )
    if config.get("crash"):
        install_crash(config["crash"])
    pickle_calls = forbid_pickle() if config.get("forbid_pickle") else None
    mode = config["mode"]
    if mode == "worker":
        run_worker(config)
    elif mode == "enqueue":
        run_enqueue(config)
    elif mode == "e2e":
        run_e2e(config)
        if pickle_calls is not None:
            print(json.dumps({"pickle_calls": pickle_calls}), flush=True)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
