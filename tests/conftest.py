"""Shared storage fixtures for OmniQ's tests.

Fixtures (names are a contract, other test modules use them):

* ``storage``         -- parametrized over memory, local, s3, azure, gcs (test ids are those names,
                         so ``-k memory`` or ``-k "s3 or gcs"`` select)
* ``remote_storage``  -- s3, azure, gcs only
* ``local_storage``   -- local only
* ``s3_emulator``, ``azure_emulator``, ``gcs_emulator`` -- session-scoped ``tools/emulators.py``
  objects (``.storage_options``, ``.url(prefix)``, ``.pid``, ``.filesystem()``)

Each storage fixture yields a ``StorageTarget`` with a ``base_dir`` unique to the test. An
emulator starts only when a selected test needs it, once per session, and is stopped at the end
of the session (also on failure or Ctrl-C; an atexit hook is the last resort).

If an emulator cannot start, its tests are skipped with a hint how to enable them, unless
``OMNIQ_REQUIRE_EMULATORS=1`` (CI sets it): then they fail.
"""

from __future__ import annotations

import os

# Must be set before gcsfs is imported anywhere (see tools/emulators.py).
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

import dataclasses
import signal
import sys
import threading
import uuid
from pathlib import Path

import pytest

TOOLS_DIR = Path(__file__).resolve().parent.parent / "tools"
if str(TOOLS_DIR) not in sys.path:
    sys.path.insert(0, str(TOOLS_DIR))

import emulators  # noqa: E402  (tools/emulators.py)

STORAGE_KINDS = ("memory", "local", "s3", "azure", "gcs")
REMOTE_KINDS = ("s3", "azure", "gcs")
PROTOCOLS = {"memory": "memory", "local": "file", "s3": "s3", "azure": "abfs", "gcs": "gs"}

#: PIDs (== process group ids) of every emulator these fixtures started in this session.
STARTED_EMULATOR_PIDS: set[int] = set()


def emulators_required() -> bool:
    return os.environ.get("OMNIQ_REQUIRE_EMULATORS", "").strip().lower() in ("1", "true", "yes")


def emulator_unavailable(name: str, exc: BaseException) -> None:
    """Skip (default) or fail (OMNIQ_REQUIRE_EMULATORS=1) because emulator ``name`` is missing."""
    if emulators_required():
        pytest.fail(
            f"the {name} emulator is required (OMNIQ_REQUIRE_EMULATORS=1) but unavailable: {exc}",
            pytrace=False,
        )
    pytest.skip(f"{name} emulator unavailable: {exc}")


@dataclasses.dataclass(frozen=True)
class StorageTarget:
    """Where a test keeps its data: a base directory URL plus fsspec storage_options."""

    kind: str  # "memory" | "local" | "s3" | "azure" | "gcs"
    base_dir: str  # unique per test
    # {} for memory/local; not part of the hash, so targets can be dict keys / set members
    storage_options: dict = dataclasses.field(default_factory=dict, hash=False)

    @property
    def protocol(self) -> str:
        """The fsspec protocol: memory, file, s3, abfs, gs."""
        return PROTOCOLS[self.kind]

    def filesystem(self):
        """A fresh *sync* fsspec filesystem (no instance cache, no listings cache)."""
        import fsspec

        return fsspec.filesystem(
            self.protocol,
            skip_instance_cache=True,
            use_listings_cache=False,
            **self.storage_options,
        )

    def sub(self, name: str) -> StorageTarget:
        """Same storage, ``base_dir + "/" + name``."""
        return dataclasses.replace(self, base_dir=self.base_dir.rstrip("/") + "/" + name.strip("/"))


# --------------------------------------------------------------------------- emulators

_previous_sigterm = None
_sigterm_lock = threading.Lock()


def _sigterm_to_keyboard_interrupt(signum, frame):
    # pytest tears fixtures down on KeyboardInterrupt, so a SIGTERM to pytest stops emulators too
    # (they live in their own sessions and would not receive it).
    raise KeyboardInterrupt(f"signal {signum}")


def _install_sigterm_handler() -> None:
    global _previous_sigterm
    with _sigterm_lock:
        if (
            _previous_sigterm is not None
            or threading.current_thread() is not threading.main_thread()
        ):
            return
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            _previous_sigterm = signal.signal(signal.SIGTERM, _sigterm_to_keyboard_interrupt)


def _restore_sigterm_handler() -> None:
    global _previous_sigterm
    with _sigterm_lock:
        if _previous_sigterm is not None and threading.current_thread() is threading.main_thread():
            if signal.getsignal(signal.SIGTERM) is _sigterm_to_keyboard_interrupt:
                signal.signal(signal.SIGTERM, _previous_sigterm)
            _previous_sigterm = None


def _start_emulator(request: pytest.FixtureRequest, name: str):
    emu = emulators.EMULATORS[name]()
    request.addfinalizer(emu.stop)  # registered first: a half-started emulator is stopped too
    problem = None
    try:
        emu.check_available()
        _install_sigterm_handler()
        emu.start()
    except emulators.EmulatorUnavailable as exc:
        problem = exc
    finally:
        if emu.pid is not None:
            STARTED_EMULATOR_PIDS.add(emu.pid)
    if problem is not None:  # outside the except block: no "During handling..." noise
        emulator_unavailable(name, problem)
    return emu


@pytest.fixture(scope="session")
def s3_emulator(request):
    """moto_server, with bucket ``omniq-test``."""
    return _start_emulator(request, "s3")


@pytest.fixture(scope="session")
def azure_emulator(request):
    """azurite (blob), with container ``omniq-test``."""
    return _start_emulator(request, "azure")


@pytest.fixture(scope="session")
def gcs_emulator(request):
    """fake-gcs-server, with bucket ``omniq-test``."""
    return _start_emulator(request, "gcs")


@pytest.fixture
def require_emulator_program():
    """``check(name)``: skip (or fail under OMNIQ_REQUIRE_EMULATORS=1) if emulator ``name``'s
    program is not installed. For tests that run an emulator themselves."""

    def check(name: str) -> None:
        problem = None
        try:
            emulators.EMULATORS[name]().check_available()
        except emulators.EmulatorUnavailable as exc:
            problem = exc
        if problem is not None:
            emulator_unavailable(name, problem)

    return check


# --------------------------------------------------------------------------- storage targets


def _make_target(request: pytest.FixtureRequest, kind: str, tmp_path: Path) -> StorageTarget:
    if kind == "memory":
        return StorageTarget("memory", f"memory://omniq-{uuid.uuid4().hex}", {})
    if kind == "local":
        # Not created: like an object-store prefix, it exists once something is written.
        return StorageTarget("local", str(tmp_path / "store"), {})
    emu = request.getfixturevalue(f"{kind}_emulator")
    return StorageTarget(kind, emu.url(uuid.uuid4().hex), emu.storage_options)


def _cleanup(target: StorageTarget) -> None:
    # The memory filesystem is one global dict per process: free what the test left.
    # (Emulators are in-memory and die with the session; tmp_path is handled by pytest.)
    if target.kind == "memory":
        fs = target.filesystem()
        try:
            if fs.exists(target.base_dir):
                fs.rm(target.base_dir, recursive=True)
        except FileNotFoundError:
            pass


def _remote_params():
    return [pytest.param(kind, marks=pytest.mark.emulator) for kind in REMOTE_KINDS]


@pytest.fixture(params=["memory", "local", *_remote_params()])
def storage(request, tmp_path):
    """A StorageTarget on each of memory, local, s3, azure, gcs."""
    target = _make_target(request, request.param, tmp_path)
    yield target
    _cleanup(target)


@pytest.fixture(params=_remote_params())
def remote_storage(request, tmp_path):
    """A StorageTarget on each of s3, azure, gcs."""
    target = _make_target(request, request.param, tmp_path)
    yield target
    _cleanup(target)


@pytest.fixture(params=["local"])
def local_storage(request, tmp_path):
    """A StorageTarget on the local filesystem."""
    return _make_target(request, "local", tmp_path)


# --------------------------------------------------------------------------- hooks


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    """After fixtures are torn down: every emulator process we started must be gone."""
    leftovers = {pid: emulators.live_pids_in_group(pid) for pid in sorted(STARTED_EMULATOR_PIDS)}
    leftovers = {pid: alive for pid, alive in leftovers.items() if alive}
    emulators.stop_all()  # last resort, also covers emulators started outside these fixtures
    _restore_sigterm_handler()
    if not leftovers:
        return
    for pgid in leftovers:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    message = f"emulator processes still alive at the end of the session (killed now): {leftovers}"
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(message, red=True, bold=True)
    else:
        print(message, file=sys.stderr)
    if session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# --------------------------------------------------------------------------- session summaries
#
# Two summaries are printed at the end of the session: the "interleavings explored" table of
# tests/explorer.py and the "fault suite" counters of tests/faults/fault_stats.py. Both are
# module globals that tests fill as they run. Under pytest-xdist the tests run in worker
# processes and the terminal summary is printed by the controller, whose globals stay empty
# (and which loads only this conftest when no path under tests/faults is named): each worker
# puts the modules' ``export()`` into ``config.workeroutput`` when its session finishes, and
# the controller ``merge``s every worker's data as the worker goes down.

#: Module name -> its file; each has ``export()`` (JSON-able), ``merge(data)``, ``summary_lines()``.
SUMMARY_MODULES = {
    "explorer": Path(__file__).resolve().parent / "explorer.py",
    "fault_stats": Path(__file__).resolve().parent / "faults" / "fault_stats.py",
}
_WORKEROUTPUT_KEY = "omniq_summary_{}"


def _summary_module(name: str, *, load: bool = False):
    """The module ``name`` if some test imported it; with ``load``, import it (by file, as the
    test directories need not be on sys.path here) under the name the tests would use."""
    module = sys.modules.get(name)
    if module is None and load:
        import importlib.util

        spec = importlib.util.spec_from_file_location(name, SUMMARY_MODULES[name])
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return module


class _XdistSummaries:
    """pytest-xdist hooks (registered only with the xdist plugin: its hook names are unknown
    to pytest without it)."""

    def pytest_sessionfinish(self, session):
        workeroutput = getattr(session.config, "workeroutput", None)
        if not hasattr(session.config, "workerinput") or workeroutput is None:
            return  # not an xdist worker
        for name in SUMMARY_MODULES:
            module = _summary_module(name)
            data = module.export() if module is not None else None
            if data:
                workeroutput[_WORKEROUTPUT_KEY.format(name)] = data

    def pytest_testnodedown(self, node, error):
        workeroutput = getattr(node, "workeroutput", None) or {}
        for name in SUMMARY_MODULES:
            data = workeroutput.get(_WORKEROUTPUT_KEY.format(name))
            if data:
                _summary_module(name, load=True).merge(data)


@pytest.hookimpl(specname="pytest_configure")
def pytest_configure_summaries(config):
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_XdistSummaries(), "omniq-xdist-summaries")


@pytest.hookimpl(specname="pytest_terminal_summary")
def pytest_terminal_summary_summaries(terminalreporter, exitstatus, config):
    """The "interleavings explored" table (if any test explored) and the "fault suite"
    counters (if the fault suite counted anything), totals over all xdist workers."""
    explorer = _summary_module("explorer")  # not imported: nothing explored
    lines = explorer.summary_lines() if explorer is not None else []
    if lines:
        terminalreporter.write_sep("=", "interleavings explored")
        for line in lines:
            terminalreporter.write_line(line)
    fault_stats = _summary_module("fault_stats")
    lines = fault_stats.summary_lines() if fault_stats is not None else []
    if lines:
        terminalreporter.write_sep("=", "fault suite")
        for line in lines:
            terminalreporter.write_line(line)
