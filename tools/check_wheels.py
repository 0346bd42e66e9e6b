#!/usr/bin/env python3
"""Build every OmniQ wheel and check that the namespace-package split is sound.

Checks, in order:

1. ``uv build --wheel`` succeeds for each distribution under ``packages/``.
2. Each wheel contains only its own leaf package (plus its ``.dist-info``), has
   the leaf ``__init__.py`` and ``py.typed``, and never ships an ``__init__.py``
   for one of the shared PEP 420 namespace levels (``omniq``, ``omniq.storage``,
   ``omniq.backend``). ``omniq.storage.file`` is the one shared level with an
   ``__init__.py`` (a pkgutil-style namespace re-exporting the file storages'
   classes): omniq-core ships it and its ``py.typed`` (``OWNED_SHARED_FILES``),
   no other wheel may. It ships the repository's MIT
   ``LICENSE`` as ``.dist-info/licenses/LICENSE`` (PEP 639, named by a
   ``License-File`` line of its METADATA), and so does each sdist (``uv build
   --sdist``). Hatchling takes license files only from inside the project
   directory, so every ``packages/*/LICENSE`` must be a byte-for-byte copy of the
   root ``LICENSE`` (checked first, before building).
3. For several install subsets (e.g. core + file-results only) a fresh ``uv venv``
   gets *only* those wheels (third-party dependencies come from the index) and a
   smoke script asserts that the installed leaves import (each with a
   ``__version__`` equal to its distribution's version) and the others are
   absent; ``from omniq.storage.file import <name>`` gives each installed part's
   class and, for a part not installed, an ImportError naming its distribution;
   with every part installed, mypy (installed into that venv) type-checks a
   program using the six names of ``omniq.storage.file``. Per-package smoke code can be added through ``EXTRA_SMOKE`` or the
   ``extra_smoke`` argument of :func:`run_checks`.

Run as ``python tools/check_wheels.py`` (exit status 1 on failure) or import the
functions from a test (see ``tests/test_packaging.py``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES_DIR = ROOT / "packages"
#: The one license text; every package directory holds a copy (see the module docstring).
LICENSE_FILE = ROOT / "LICENSE"
#: The name of the license file in each package directory (``license-files``), in each
#: wheel's ``.dist-info/licenses/`` and at the top of each sdist.
LICENSE_NAME = "LICENSE"

CORE = "omniq-core"

#: distribution name -> import name of its (only) leaf package
PACKAGES: dict[str, str] = {
    "omniq-core": "omniq.core",
    "omniq-file-queue": "omniq.storage.file.queue",
    "omniq-file-results": "omniq.storage.file.results",
    "omniq-file-events": "omniq.storage.file.events",
    "omniq-backend-file": "omniq.backend.file",
}

#: PEP 420 namespace levels: no distribution may ship an ``__init__.py`` here.
NAMESPACE_PACKAGES: tuple[str, ...] = (
    "omniq",
    "omniq.storage",
    "omniq.backend",
)
FORBIDDEN_FILES: frozenset[str] = frozenset(
    f"{ns.replace('.', '/')}/__init__.py" for ns in NAMESPACE_PACKAGES
)

#: The shared level with an ``__init__.py``: a pkgutil-style namespace (``extend_path``)
#: re-exporting the classes of the file storages, shipped by omniq-core.
AGGREGATOR = "omniq.storage.file"
#: Files outside a distribution's leaf package that it (and only it) ships.
OWNED_SHARED_FILES: dict[str, tuple[str, ...]] = {
    CORE: ("omniq/storage/file/__init__.py", "omniq/storage/file/py.typed"),
}
#: name importable from ``omniq.storage.file`` -> the distribution providing it.
AGGREGATED_NAMES: dict[str, str] = {
    "AsyncFileQueue": "omniq-file-queue",
    "FileQueue": "omniq-file-queue",
    "AsyncFileResultStorage": "omniq-file-results",
    "FileResultStorage": "omniq-file-results",
    "AsyncFileEventStorage": "omniq-file-events",
    "FileEventStorage": "omniq-file-events",
}

#: Install subsets for the venv smoke test. omniq-core is always added.
SUBSETS: tuple[tuple[str, ...], ...] = (
    ("omniq-file-results",),
    ("omniq-file-events",),
    ("omniq-file-queue",),
    tuple(PACKAGES),  # everything, including the backend and its console script
)

#: Extra Python code run in the smoke venv after the import checks, per
#: distribution; it runs whenever that distribution is part of the subset.
#: Snippets are dedented and executed in order in one script; use ``assert``.
#: Example (once the API exists)::
#:
#:     EXTRA_SMOKE["omniq-file-results"] = ['''
#:         from omniq.storage.file.results import ...
#:         ...write a result to memory:// and read it back...
#:     ''']
EXTRA_SMOKE: dict[str, list[str]] = {
    # Each part used for real, installed alone from its wheel: a local directory store.
    "omniq-file-results": [
        """
        import tempfile
        from omniq.core import ResultStatus, TaskResult
        from omniq.storage.file.results import FileResultStorage
        with FileResultStorage(tempfile.mkdtemp()) as results:
            results.set(TaskResult(task_id="t1", status=ResultStatus.SUCCESS, value={"n": 1}))
            got = results.wait("t1", timeout=5)
            assert got.ok and got.value == {"n": 1}, got
        """
    ],
    "omniq-file-events": [
        """
        import tempfile
        from omniq.core import EventType, TaskEvent
        from omniq.storage.file.events import FileEventStorage
        with FileEventStorage(tempfile.mkdtemp()) as events:
            events.log(TaskEvent(task_id="t1", type=EventType.STARTED))
            events.log(TaskEvent(task_id="t1", type=EventType.SUCCEEDED))
            kinds = [e.type for e in events.query(task_id="t1")]
            assert kinds == [EventType.STARTED, EventType.SUCCEEDED], kinds
        """
    ],
    "omniq-file-queue": [
        """
        import tempfile
        from omniq.core import Task
        from omniq.storage.file.queue import FileQueue
        with FileQueue(tempfile.mkdtemp()) as q:
            q.enqueue(Task(func="m:f", args=[1]))
            claimed = q.dequeue()
            assert claimed is not None and claimed.task.args == [1]
            q.ack(claimed)
        """
    ],
    "omniq-backend-file": [
        """
        from importlib.metadata import entry_points
        eps = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
        assert eps.get("omniq") == "omniq.backend.file.cli:main", eps
        # The pytest plugin of the testing mode (pytest itself is not installed here).
        plugins = {ep.name: ep.value for ep in entry_points(group="pytest11")}
        assert plugins.get("omniq") == "omniq.backend.file.testing", plugins
        """
    ],
}


class CheckError(Exception):
    """A packaging check failed; the message says why."""


@dataclass
class Report:
    wheels: dict[str, Path] = field(default_factory=dict)
    sdists: dict[str, Path] = field(default_factory=dict)
    wheel_files: dict[str, int] = field(default_factory=dict)
    smoke_runs: list[tuple[str, ...]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        lines = ["check_wheels: OK"]
        for dist, wheel in self.wheels.items():
            n = self.wheel_files.get(dist, 0)
            lines.append(f"  built   {wheel.name} ({n} files) [{dist}]")
        for dist, sdist in self.sdists.items():
            lines.append(f"  built   {sdist.name} [{dist}]")
        for subset in self.smoke_runs:
            lines.append(f"  smoke   {' + '.join(subset)}")
        lines.append("  timings " + ", ".join(f"{k}={v:.1f}s" for k, v in self.timings.items()))
        return "\n".join(lines)


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #


def find_uv() -> str:
    uv = shutil.which("uv")
    if uv:
        return uv
    try:
        from uv import find_uv_bin  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise CheckError("`uv` not found on PATH (pip install uv)") from None
    return str(find_uv_bin())


def _clean_env() -> dict[str, str]:
    env = dict(os.environ)
    for var in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "UV_PYTHON", "CONDA_PREFIX"):
        env.pop(var, None)
    return env


def _run(cmd: Sequence[str], *, cwd: Path | None = None, what: str) -> str:
    proc = subprocess.run(
        list(cmd),
        cwd=cwd,
        env=_clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise CheckError(
            f"{what} failed (exit {proc.returncode}): {' '.join(map(str, cmd))}\n{proc.stdout}"
        )
    return proc.stdout


def leaf_dir(dist: str) -> str:
    """``omniq-file-queue`` -> ``omniq/storage/file/queue`` (path inside the wheel)."""
    return PACKAGES[dist].replace(".", "/")


def _with_core(dists: Iterable[str]) -> tuple[str, ...]:
    out = [CORE]
    out.extend(d for d in dists if d != CORE)
    return tuple(dict.fromkeys(out))


# --------------------------------------------------------------------------- #
# 1. build
# --------------------------------------------------------------------------- #


def _build(dist: str, out_dir: Path, kind: str, *, packages_dir: Path) -> Path:
    """``uv build --wheel`` or ``--sdist`` into ``out_dir/dist``; return the artifact."""
    if dist not in PACKAGES:
        raise CheckError(f"unknown distribution {dist!r}; known: {', '.join(PACKAGES)}")
    pattern = {"wheel": "*.whl", "sdist": "*.tar.gz"}[kind]
    target = out_dir / dist
    target.mkdir(parents=True, exist_ok=True)
    _run(
        [
            find_uv(),
            "build",
            f"--{kind}",
            "--quiet",
            "--out-dir",
            str(target),
            str(packages_dir / dist),
        ],
        what=f"building {dist} ({kind})",
    )
    found = sorted(target.glob(pattern))
    if len(found) != 1:
        raise CheckError(f"expected exactly one {kind} for {dist} in {target}, found {found}")
    return found[0]


def build_wheel(dist: str, out_dir: Path, *, packages_dir: Path = PACKAGES_DIR) -> Path:
    """Build one wheel with ``uv build`` into ``out_dir/dist`` and return its path."""
    return _build(dist, out_dir, "wheel", packages_dir=packages_dir)


def build_sdist(dist: str, out_dir: Path, *, packages_dir: Path = PACKAGES_DIR) -> Path:
    """Build one sdist with ``uv build`` into ``out_dir/dist`` and return its path."""
    return _build(dist, out_dir, "sdist", packages_dir=packages_dir)


def _build_all(
    build: Callable[..., Path], out_dir: Path, dists: Iterable[str], packages_dir: Path
) -> dict[str, Path]:
    names = list(dists)
    with ThreadPoolExecutor(max_workers=len(names) or 1) as pool:
        futures = {d: pool.submit(build, d, out_dir, packages_dir=packages_dir) for d in names}
        return {d: f.result() for d, f in futures.items()}


def build_wheels(
    out_dir: Path,
    dists: Iterable[str] = PACKAGES,
    *,
    packages_dir: Path = PACKAGES_DIR,
) -> dict[str, Path]:
    """Build the wheels (in parallel); return ``{distribution: wheel path}``."""
    return _build_all(build_wheel, out_dir, dists, packages_dir)


def build_sdists(
    out_dir: Path,
    dists: Iterable[str] = PACKAGES,
    *,
    packages_dir: Path = PACKAGES_DIR,
) -> dict[str, Path]:
    """Build the sdists (in parallel); return ``{distribution: sdist path}``."""
    return _build_all(build_sdist, out_dir, dists, packages_dir)


# --------------------------------------------------------------------------- #
# 2. wheel contents
# --------------------------------------------------------------------------- #


def license_text() -> bytes:
    """The root ``LICENSE``, which every package directory, wheel and sdist must carry."""
    try:
        return LICENSE_FILE.read_bytes()
    except FileNotFoundError:
        raise CheckError(f"{LICENSE_FILE} is missing") from None


def package_license_problems(packages_dir: Path = PACKAGES_DIR) -> list[str]:
    """Each ``packages/<dist>/LICENSE`` must exist and equal the root ``LICENSE``."""
    expected = license_text()
    problems: list[str] = []
    for dist in PACKAGES:
        copy = packages_dir / dist / LICENSE_NAME
        if not copy.is_file():
            problems.append(f"{copy} is missing (copy the root {LICENSE_NAME} there)")
        elif copy.read_bytes() != expected:
            problems.append(f"{copy} differs from the root {LICENSE_NAME}")
    return problems


def _artifact_stem(artifact: Path) -> str:
    """``omniq_core-0.1.0-py3-none-any.whl`` / ``omniq_core-0.1.0.tar.gz`` -> ``omniq_core-0.1.0``."""
    name = artifact.name.removesuffix(".tar.gz").removesuffix(".whl")
    return "-".join(name.split("-")[:2])


def wheel_problems(dist: str, wheel: Path, *, license_bytes: bytes | None = None) -> list[str]:
    """Return human-readable problems with ``wheel``'s file list (empty = OK).

    ``license_bytes`` is the text the wheel's ``.dist-info/licenses/LICENSE`` must hold
    (default: the root ``LICENSE``)."""
    leaf = leaf_dir(dist)
    dist_info_prefix = f"{dist.replace('-', '_')}-"
    dist_info = f"{_artifact_stem(wheel)}.dist-info"
    license_path = f"{dist_info}/licenses/{LICENSE_NAME}"
    expected_license = license_text() if license_bytes is None else license_bytes
    problems: list[str] = []
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if not n.endswith("/")]
        shipped_license = zf.read(license_path) if license_path in names else None
        metadata_name = f"{dist_info}/METADATA"
        metadata = zf.read(metadata_name).decode() if metadata_name in names else ""
    owned = OWNED_SHARED_FILES.get(dist, ())
    owners = {f: d for d, files in OWNED_SHARED_FILES.items() for f in files}
    for name in names:
        top = name.split("/", 1)[0]
        if name in FORBIDDEN_FILES:
            problems.append(f"ships namespace-package file {name} (must not exist: PEP 420)")
        elif name in owned:
            continue
        elif name in owners:
            problems.append(f"ships {name}, which belongs to {owners[name]}")
        elif top.endswith(".dist-info"):
            if not top.startswith(dist_info_prefix):
                problems.append(f"unexpected dist-info directory {top}")
        elif not name.startswith(leaf + "/"):
            problems.append(f"file outside its leaf package {leaf}/: {name}")
    for required in (f"{leaf}/__init__.py", f"{leaf}/py.typed", *owned):
        if required not in names:
            problems.append(f"missing {required}")
    if shipped_license is None:
        problems.append(f"missing its license {license_path} (project.license-files)")
    elif shipped_license != expected_license:
        problems.append(f"{license_path} differs from the root {LICENSE_NAME}")
    if f"License-File: {LICENSE_NAME}" not in metadata.splitlines():
        problems.append(f"{metadata_name} has no 'License-File: {LICENSE_NAME}' line")
    return [f"{wheel.name}: {p}" for p in problems]


def check_wheel_contents(wheels: Mapping[str, Path]) -> None:
    problems = [p for dist, wheel in wheels.items() for p in wheel_problems(dist, wheel)]
    if problems:
        raise CheckError("wheel content check failed:\n  " + "\n  ".join(problems))


def sdist_problems(dist: str, sdist: Path, *, license_bytes: bytes | None = None) -> list[str]:
    """Problems with ``sdist`` (empty = OK): it must hold ``<name>-<version>/LICENSE``
    equal to ``license_bytes`` (default: the root ``LICENSE``)."""
    path = f"{_artifact_stem(sdist)}/{LICENSE_NAME}"
    expected = license_text() if license_bytes is None else license_bytes
    with tarfile.open(sdist) as tf:
        member = tf.getmember(path) if path in tf.getnames() else None
        handle = tf.extractfile(member) if member is not None and member.isfile() else None
        shipped = handle.read() if handle is not None else None
    if shipped is None:
        problems = [f"missing its license {path} (project.license-files)"]
    elif shipped != expected:
        problems = [f"{path} differs from the root {LICENSE_NAME}"]
    else:
        problems = []
    return [f"{sdist.name}: {p}" for p in problems]


def check_sdist_contents(sdists: Mapping[str, Path]) -> None:
    problems = [p for dist, sdist in sdists.items() for p in sdist_problems(dist, sdist)]
    if problems:
        raise CheckError("sdist content check failed:\n  " + "\n  ".join(problems))


# --------------------------------------------------------------------------- #
# 3. isolated install + smoke test
# --------------------------------------------------------------------------- #


def smoke_script(installed: Sequence[str], extra_smoke: Mapping[str, Sequence[str]]) -> str:
    """Python source asserting exactly the ``installed`` leaves are importable."""
    present = [PACKAGES[d] for d in installed]
    absent = [mod for d, mod in PACKAGES.items() if d not in installed]
    parts = [
        textwrap.dedent(
            f"""
            import importlib
            import importlib.metadata
            import importlib.resources
            import importlib.util
            import sys

            PRESENT = {present!r}
            DISTS = {list(installed)!r}
            ABSENT = {absent!r}
            NAMESPACES = {list(NAMESPACE_PACKAGES)!r}
            SOURCE_TREE = {str(PACKAGES_DIR)!r}
            AGGREGATOR = {AGGREGATOR!r}
            AGGREGATED = {AGGREGATED_NAMES!r}

            def find(name):
                try:
                    return importlib.util.find_spec(name)
                except ModuleNotFoundError:  # a parent package is missing too
                    return None

            assert not any(p.startswith(SOURCE_TREE) for p in sys.path), sys.path

            for name in PRESENT:
                mod = importlib.import_module(name)
                assert getattr(mod, "__file__", None), f"{{name}} has no __init__.py"
                assert importlib.resources.files(name).joinpath("py.typed").is_file(), name

            # One version source: the wheel's version is the leaf's __version__.
            for dist, name in zip(DISTS, PRESENT):
                installed = importlib.metadata.version(dist)
                module = importlib.import_module(name).__version__
                assert installed == module, f"{{dist}} {{installed}} but {{name}}.__version__ {{module}}"

            for name in NAMESPACES:
                spec = find(name)
                if spec is not None:
                    mod = importlib.import_module(name)
                    assert getattr(mod, "__file__", None) is None, (
                        f"{{name}} is a regular package ({{mod.__file__}}), expected PEP 420"
                    )

            for name in ABSENT:
                assert find(name) is None, f"{{name}} importable but not installed"

            # omniq.storage.file (shipped by omniq-core): each installed part's classes,
            # the very objects of their own modules; an ImportError naming the others.
            agg = importlib.import_module(AGGREGATOR)
            assert agg.__file__ and importlib.resources.files(AGGREGATOR).joinpath(
                "py.typed"
            ).is_file(), agg
            for name, dist in AGGREGATED.items():
                leaf = PRESENT[DISTS.index(dist)] if dist in DISTS else None
                try:
                    exec(f"from {{AGGREGATOR}} import {{name}} as got", globals())
                except ImportError as exc:
                    assert leaf is None, f"{{name}}: {{exc}}"
                    assert f"install {{dist}}" in str(exc), str(exc)
                else:
                    assert leaf is not None, f"{{name}} importable without {{dist}}"
                    assert got is getattr(importlib.import_module(leaf), name), name
            """
        )
    ]
    for dist in installed:
        for i, snippet in enumerate(extra_smoke.get(dist, ())):
            parts.append(f"\n# --- extra smoke #{i} for {dist}\n")
            parts.append(textwrap.dedent(snippet).strip("\n") + "\n")
    parts.append(f'\nprint("smoke ok: " + {" + ".join(installed)!r})\n')
    return "".join(parts)


#: A program using the six names of ``omniq.storage.file``; mypy must type-check it (strict)
#: against the installed wheels and find each name's real type.
TYPECHECK_PROGRAM = """\
from omniq.storage.file import (
    AsyncFileEventStorage,
    AsyncFileQueue,
    AsyncFileResultStorage,
    FileEventStorage,
    FileQueue,
    FileResultStorage,
)
from omniq.storage.file.queue import AsyncFileQueue as QueueFromLeaf


def make(base: str) -> tuple[FileQueue, FileResultStorage, FileEventStorage]:
    return FileQueue(base), FileResultStorage(base), FileEventStorage(base)


def make_async(base: str) -> tuple[QueueFromLeaf, AsyncFileResultStorage, AsyncFileEventStorage]:
    return AsyncFileQueue(base), AsyncFileResultStorage(base), AsyncFileEventStorage(base)
"""
#: What mypy must reject in the same environment: proof that the names have real types.
TYPECHECK_WRONG = "from omniq.storage.file import FileQueue\nwrong: int = FileQueue('x')\n"


def typecheck_smoke(venv_python: Path, work_dir: Path) -> None:
    """Install mypy into the venv at ``venv_python``; check ``TYPECHECK_PROGRAM`` passes
    ``mypy --strict`` and ``TYPECHECK_WRONG`` fails with an assignment error."""
    _run(
        [find_uv(), "pip", "install", "--quiet", "--python", str(venv_python), "mypy"],
        what="installing mypy",
    )
    good, wrong = work_dir / "uses_aggregator.py", work_dir / "wrong_type.py"
    good.write_text(TYPECHECK_PROGRAM, encoding="utf-8")
    wrong.write_text(TYPECHECK_WRONG, encoding="utf-8")
    mypy = [str(venv_python), "-I", "-m", "mypy", "--strict", "--no-incremental"]
    _run([*mypy, good.name], cwd=work_dir, what="mypy on omniq.storage.file's names")
    proc = subprocess.run(
        [*mypy, wrong.name], cwd=work_dir, env=_clean_env(), capture_output=True, text=True
    )
    if proc.returncode == 0 or '"FileQueue", variable has type "int"' not in proc.stdout:
        raise CheckError(f"mypy did not see FileQueue's type:\n{proc.stdout}{proc.stderr}")


def create_venv(path: Path, *, python: str | None = None) -> Path:
    """``uv venv`` at ``path``; return the interpreter path."""
    _run(
        [find_uv(), "venv", "--quiet", "--python", python or sys.executable, str(path)],
        what="creating venv",
    )
    bindir = "Scripts" if sys.platform == "win32" else "bin"
    exe = "python.exe" if sys.platform == "win32" else "python"
    return path / bindir / exe


def install_wheels(venv_python: Path, wheels: Iterable[Path]) -> None:
    _run(
        [find_uv(), "pip", "install", "--quiet", "--python", str(venv_python), *map(str, wheels)],
        what="installing wheels",
    )


def smoke_test(
    wheels: Mapping[str, Path],
    dists: Iterable[str],
    work_dir: Path,
    *,
    extra_smoke: Mapping[str, Sequence[str]] | None = None,
    typecheck: bool = True,
) -> tuple[str, ...]:
    """Fresh venv with only ``dists`` (+ core) installed from ``wheels``; run smoke code
    (and, when every distribution is installed and ``typecheck``, :func:`typecheck_smoke`)."""
    installed = _with_core(dists)
    missing = [d for d in installed if d not in wheels]
    if missing:
        raise CheckError(f"no wheel built for {', '.join(missing)}")
    smoke = EXTRA_SMOKE if extra_smoke is None else extra_smoke
    slug = "+".join(d.removeprefix("omniq-") for d in installed)
    venv_dir = work_dir / f"venv-{slug}"
    python = create_venv(venv_dir)
    install_wheels(python, (wheels[d] for d in installed))
    script = work_dir / f"smoke-{slug}.py"
    script.write_text(smoke_script(installed, smoke), encoding="utf-8")
    # Run from work_dir (not the repo) so the checkout cannot leak onto sys.path.
    _run([str(python), "-I", str(script)], cwd=work_dir, what=f"smoke test [{slug}]")
    if typecheck and set(installed) == set(PACKAGES):
        typecheck_smoke(python, work_dir)
    return installed


# --------------------------------------------------------------------------- #
# driver
# --------------------------------------------------------------------------- #


def run_checks(
    work_dir: Path,
    *,
    subsets: Iterable[Iterable[str]] = SUBSETS,
    extra_smoke: Mapping[str, Sequence[str]] | None = None,
    packages_dir: Path = PACKAGES_DIR,
) -> Report:
    """Build, inspect and smoke-test; raise :class:`CheckError` on the first failure."""
    report = Report()
    problems = package_license_problems(packages_dir)
    if problems:
        raise CheckError("license check failed:\n  " + "\n  ".join(problems))
    t0 = time.perf_counter()
    report.wheels = build_wheels(work_dir / "dist", packages_dir=packages_dir)
    report.sdists = build_sdists(work_dir / "sdist", packages_dir=packages_dir)
    report.timings["build"] = time.perf_counter() - t0
    check_wheel_contents(report.wheels)
    check_sdist_contents(report.sdists)
    for dist, wheel in report.wheels.items():
        with zipfile.ZipFile(wheel) as zf:
            report.wheel_files[dist] = len(zf.namelist())
    t1 = time.perf_counter()
    for subset in subsets:
        report.smoke_runs.append(
            smoke_test(report.wheels, subset, work_dir, extra_smoke=extra_smoke)
        )
    report.timings["smoke"] = time.perf_counter() - t1
    report.timings["total"] = time.perf_counter() - t0
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="keep wheels/venvs here instead of a temporary directory",
    )
    args = parser.parse_args(argv)

    try:
        if args.work_dir:
            args.work_dir.mkdir(parents=True, exist_ok=True)
            report = run_checks(args.work_dir.resolve())
        else:
            with tempfile.TemporaryDirectory(prefix="omniq-check-wheels-") as tmp:
                report = run_checks(Path(tmp))
    except CheckError as exc:
        print(f"check_wheels: FAILED\n{exc}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
