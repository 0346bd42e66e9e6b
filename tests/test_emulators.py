"""The storage primitive OmniQ relies on, "create only if absent", is enforced on every backend.

Each test goes through real HTTP to the emulators of tools/emulators.py (or the real local
filesystem), with the primitive the project uses there: ``pipe_file(path, data, mode="create")``
on object stores and memory, ``open(path, "xb")`` (O_EXCL) on the local filesystem.
Also checks that the emulator tooling leaves no process behind.
"""

from __future__ import annotations

import os

os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"  # before gcsfs is imported

import asyncio
import concurrent.futures
import contextlib
import json
import multiprocessing
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
import weakref
from pathlib import Path

import fsspec
import pytest

import emulators  # tools/emulators.py, put on sys.path by conftest

TOOLS_DIR = Path(emulators.__file__).resolve().parent
TASKS = 20
PROCESSES = 4


# --------------------------------------------------------------------------- helpers


@contextlib.asynccontextmanager
async def async_filesystem(target):
    """An async fsspec filesystem for ``target``, created inside the running loop."""
    fs = fsspec.filesystem(
        target.protocol,
        asynchronous=True,
        skip_instance_cache=True,
        use_listings_cache=False,
        **target.storage_options,
    )
    if target.kind == "s3":
        await fs.set_session()
    elif target.kind == "gcs":
        await fs._set_session()
    try:
        yield fs
    finally:
        if target.kind == "s3":
            await fs._s3.close()
        elif target.kind == "gcs":
            await fs.session.close()
        elif target.kind == "azure":
            await fs.service_client.close()
            # adlfs registers weakref.finalize(fs, sync, fs.loop, close_service_client, fs): it
            # keeps fs alive and, at interpreter exit, prints "RuntimeError: Loop is not running"
            # because this loop is closed by then. The client is closed already: detach it.
            for finalizer in list(getattr(weakref.finalize, "_registry", {})):
                info = finalizer.peek()
                if info is not None and info[0] is fs:
                    finalizer.detach()


def assert_one_winner(outcomes: dict[bytes, object]) -> bytes:
    """``outcomes`` maps each racer's token to True (created) or the exception it got."""
    winners = [token for token, outcome in outcomes.items() if outcome is True]
    losers = {token: outcome for token, outcome in outcomes.items() if outcome is not True}
    unexpected = {t: o for t, o in losers.items() if not isinstance(o, FileExistsError)}
    assert not unexpected, f"racers failed with something else than FileExistsError: {unexpected}"
    assert len(winners) == 1, f"{len(winners)} winners out of {len(outcomes)} racers"
    return winners[0]


def key_in(target) -> str:
    return target.base_dir + "/claims/the-key"


# --------------------------------------------------------------------------- storage fixture


def test_storage_target_contract(storage, tmp_path):
    fs = storage.filesystem()
    assert storage.kind in ("memory", "local", "s3", "azure", "gcs")
    assert isinstance(storage.storage_options, dict)
    if storage.kind in ("memory", "local"):
        assert storage.storage_options == {}
    if storage.kind == "local":
        assert storage.base_dir == str(tmp_path / "store")
        fs.makedirs(storage.base_dir, exist_ok=True)
    sub = storage.sub("child")
    assert sub.base_dir == storage.base_dir + "/child"
    assert (sub.kind, sub.storage_options) == (storage.kind, storage.storage_options)
    if storage.kind == "local":
        fs.makedirs(sub.base_dir, exist_ok=True)
    fs.pipe_file(sub.base_dir + "/x", b"hello")
    assert storage.filesystem().cat_file(sub.base_dir + "/x") == b"hello"
    assert fs.exists(sub.base_dir + "/x")
    assert fs is not storage.filesystem(), "filesystem() must be a fresh instance"


# --------------------------------------------------------------------------- asyncio race


def test_exclusive_create_20_async_tasks(storage):
    """20 concurrent creates of one key from asyncio tasks: exactly one winner."""
    path = key_in(storage)

    async def race_remote():
        async with async_filesystem(storage) as fs:
            start = asyncio.Event()

            async def racer(token):
                await start.wait()
                try:
                    await fs._pipe_file(path, token, mode="create")
                    return True
                except Exception as exc:
                    return exc

            tokens = [f"task-{i}-{uuid.uuid4().hex}".encode() for i in range(TASKS)]
            tasks = [asyncio.create_task(racer(t)) for t in tokens]
            await asyncio.sleep(0)
            start.set()
            outcomes = dict(zip(tokens, await asyncio.gather(*tasks), strict=True))
            return outcomes, await fs._cat_file(path)

    async def race_memory():
        # Memory is process-local and synchronous: a backend calls it from the loop, so racing
        # tasks interleave between calls, never inside one.
        fs = storage.filesystem()

        async def racer(token):
            await asyncio.sleep(0)
            try:
                fs.pipe_file(path, token, mode="create")
                return True
            except Exception as exc:
                return exc

        tokens = [f"task-{i}-{uuid.uuid4().hex}".encode() for i in range(TASKS)]
        outcomes = dict(zip(tokens, await asyncio.gather(*(racer(t) for t in tokens)), strict=True))
        return outcomes, fs.cat_file(path)

    async def race_local():
        # Blocking O_EXCL creates in threads: a real concurrent race on the kernel.
        os.makedirs(os.path.dirname(path), exist_ok=True)
        barrier = threading.Barrier(TASKS)

        def create(token):
            barrier.wait(timeout=30)
            try:
                with open(path, "xb") as f:
                    f.write(token)
                return True
            except Exception as exc:
                return exc

        tokens = [f"task-{i}-{uuid.uuid4().hex}".encode() for i in range(TASKS)]
        loop = asyncio.get_running_loop()
        with concurrent.futures.ThreadPoolExecutor(TASKS) as pool:  # one thread per racer
            results = await asyncio.gather(*(loop.run_in_executor(pool, create, t) for t in tokens))
        return dict(zip(tokens, results, strict=True)), Path(path).read_bytes()

    race = {"memory": race_memory, "local": race_local}.get(storage.kind, race_remote)
    outcomes, content = asyncio.run(race())
    winner = assert_one_winner(outcomes)
    assert content == winner, "the stored bytes are not the winner's"


# --------------------------------------------------------------------------- process race


def race_processes(protocol: str, storage_options: dict, path: str) -> tuple[bytes, dict]:
    """PROCESSES spawned processes race on emulators.exclusive_create; returns (winner, codes)."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES)
    tokens = [f"proc-{i}-{uuid.uuid4().hex}".encode() for i in range(PROCESSES)]
    procs = [
        ctx.Process(
            target=emulators.race_child,
            args=(protocol, storage_options, path, token, barrier),
            daemon=True,
        )
        for token in tokens
    ]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=90)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    codes = {token: p.exitcode for token, p in zip(tokens, procs, strict=True)}
    bad = {t: c for t, c in codes.items() if c not in (emulators.RACE_WON, emulators.RACE_LOST)}
    assert not bad, f"racing processes crashed (exit codes): {bad}"
    winners = [t for t, c in codes.items() if c == emulators.RACE_WON]
    assert len(winners) == 1, f"{len(winners)} winners out of {PROCESSES} processes: {codes}"
    return winners[0], codes


def test_exclusive_create_4_processes(remote_storage):
    """4 processes, sync ``pipe_file(mode="create")``: one winner, and its bytes are stored."""
    path = key_in(remote_storage)
    winner, _ = race_processes(remote_storage.protocol, remote_storage.storage_options, path)
    assert remote_storage.filesystem().cat_file(path) == winner


def test_local_open_xb_4_processes(local_storage):
    """Local: ``open(path, "xb")`` across 4 processes gives one winner (pipe_file(mode="create")
    is an exists()-then-write there and is not atomic)."""
    path = key_in(local_storage)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    winner, _ = race_processes("file", {}, path)
    assert Path(path).read_bytes() == winner


def test_second_create_after_race_still_refused(remote_storage):
    """A create after the fact is refused with FileExistsError, and does not change the bytes."""
    fs = remote_storage.filesystem()
    path = key_in(remote_storage)
    fs.pipe_file(path, b"first", mode="create")
    with pytest.raises(FileExistsError):
        fs.pipe_file(path, b"second", mode="create")
    assert fs.cat_file(path) == b"first"


# --------------------------------------------------------------------------- no process left


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line.rstrip("\n"))
    lines.put(None)


def _wait_gone(pgids: list[int], timeout: float) -> dict[int, list[int]]:
    deadline = time.monotonic() + timeout
    while True:
        alive = {pgid: emulators.live_pids_in_group(pgid) for pgid in pgids}
        alive = {pgid: pids for pgid, pids in alive.items() if pids}
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("name", "sig"),
    [
        pytest.param("s3", signal.SIGTERM, id="s3-sigterm", marks=pytest.mark.emulator),
        pytest.param("azure", signal.SIGTERM, id="azure-sigterm", marks=pytest.mark.emulator),
        pytest.param("gcs", signal.SIGTERM, id="gcs-sigterm", marks=pytest.mark.emulator),
        pytest.param("gcs", signal.SIGINT, id="gcs-sigint", marks=pytest.mark.emulator),
    ],
)
def test_cli_leaves_no_process(name, sig, require_emulator_program):
    """``python tools/emulators.py NAME``: the printed storage works; on SIGTERM/Ctrl-C the
    emulator's whole process group is gone within a few seconds."""
    require_emulator_program(name)
    proc = subprocess.Popen(
        [sys.executable, str(TOOLS_DIR / "emulators.py"), name],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
    output: list[str] = []
    pids: dict[str, int] = {}
    options: dict[str, dict] = {}
    base_dirs: dict[str, str] = {}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail("emulators.py did not get ready in 60 s:\n" + "\n".join(output))
            if line is None:
                pytest.fail(f"emulators.py exited ({proc.wait()}):\n" + "\n".join(output))
            output.append(line)
            if m := re.fullmatch(r"(\w+): pid=(\d+) base_dir=(\S+)", line):
                pids[m[1]] = int(m[2])
                base_dirs[m[1]] = m[3]
            elif m := re.fullmatch(r"(\w+): storage_options=(.*)", line):
                options[m[1]] = json.loads(m[2])
            elif line.startswith("ready"):
                break
        assert list(pids) == [name]
        pid = pids[name]
        assert emulators.live_pids_in_group(pid), "the printed PID is not running"

        protocol = emulators.EMULATORS[name].protocol
        fs = fsspec.filesystem(
            protocol, skip_instance_cache=True, use_listings_cache=False, **options[name]
        )
        fs.pipe_file(base_dirs[name] + "/probe", b"ok", mode="create")
        assert fs.cat_file(base_dirs[name] + "/probe") == b"ok"

        proc.send_signal(sig)
        assert proc.wait(timeout=15) == 0, "\n".join(output)
        alive = _wait_gone([pid], timeout=5)
        assert not alive, f"emulator processes left after {sig.name}: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pgid in pids.values():  # never leave anything behind, even when failing
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)


def test_emulator_stop_kills_process_group(require_emulator_program):
    """Emulator.stop() ends the whole process group and is idempotent."""
    require_emulator_program("gcs")
    emu = emulators.GCSEmulator().start()
    pid = emu.pid
    assert pid is not None and emulators.live_pids_in_group(pid)
    assert os.getpgid(pid) == pid, "an emulator must lead its own process group"
    emu.stop()
    emu.stop()
    assert emu.pid is None and not emu.running
    assert not emulators.live_pids_in_group(pid)


def test_missing_program_raises_emulator_unavailable(monkeypatch, tmp_path):
    monkeypatch.setattr(emulators, "TOOLS_DIR", tmp_path)
    with pytest.raises(emulators.EmulatorUnavailable, match="npm ci --prefix tools"):
        emulators.AzureEmulator().start()
