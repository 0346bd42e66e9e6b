#!/usr/bin/env python3
"""Build every OmniQ wheel and check that the namespace-package split is sound.

Checks, in order:

1. ``uv build --wheel`` succeeds for each distribution under ``packages/``.
2. Each wheel contains only its own leaf package (plus its ``.dist-info``), has
   the leaf ``__init__.py`` and ``py.typed``, and never ships an ``__init__.py``
   for one of the shared PEP 420 namespace levels (``omniq``, ``omniq.storage``,
   ``omniq.storage.file``, ``omniq.backend``).
3. For several install subsets (e.g. core + file-results only) a fresh ``uv venv``
   gets *only* those wheels (third-party dependencies come from the index) and a
   smoke script asserts that the installed leaves import and the others are
   absent. Per-package smoke code can be added through ``EXTRA_SMOKE`` or the
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
import tempfile
import textwrap
import time
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES_DIR = ROOT / "packages"

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
    "omniq.storage.file",
    "omniq.backend",
)
FORBIDDEN_FILES: frozenset[str] = frozenset(
    f"{ns.replace('.', '/')}/__init__.py" for ns in NAMESPACE_PACKAGES
)

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
        """
    ],
}


class CheckError(Exception):
    """A packaging check failed; the message says why."""


@dataclass
class Report:
    wheels: dict[str, Path] = field(default_factory=dict)
    wheel_files: dict[str, int] = field(default_factory=dict)
    smoke_runs: list[tuple[str, ...]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        lines = ["check_wheels: OK"]
        for dist, wheel in self.wheels.items():
            n = self.wheel_files.get(dist, 0)
            lines.append(f"  built   {wheel.name} ({n} files) [{dist}]")
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


def build_wheel(dist: str, out_dir: Path, *, packages_dir: Path = PACKAGES_DIR) -> Path:
    """Build one wheel with ``uv build`` into ``out_dir/dist`` and return its path."""
    if dist not in PACKAGES:
        raise CheckError(f"unknown distribution {dist!r}; known: {', '.join(PACKAGES)}")
    target = out_dir / dist
    target.mkdir(parents=True, exist_ok=True)
    _run(
        [
            find_uv(),
            "build",
            "--wheel",
            "--quiet",
            "--out-dir",
            str(target),
            str(packages_dir / dist),
        ],
        what=f"building {dist}",
    )
    wheels = sorted(target.glob("*.whl"))
    if len(wheels) != 1:
        raise CheckError(f"expected exactly one wheel for {dist} in {target}, found {wheels}")
    return wheels[0]


def build_wheels(
    out_dir: Path,
    dists: Iterable[str] = PACKAGES,
    *,
    packages_dir: Path = PACKAGES_DIR,
) -> dict[str, Path]:
    """Build the wheels (in parallel); return ``{distribution: wheel path}``."""
    names = list(dists)
    with ThreadPoolExecutor(max_workers=len(names) or 1) as pool:
        futures = {
            d: pool.submit(build_wheel, d, out_dir, packages_dir=packages_dir) for d in names
        }
        return {d: f.result() for d, f in futures.items()}


# --------------------------------------------------------------------------- #
# 2. wheel contents
# --------------------------------------------------------------------------- #


def wheel_problems(dist: str, wheel: Path) -> list[str]:
    """Return human-readable problems with ``wheel``'s file list (empty = OK)."""
    leaf = leaf_dir(dist)
    dist_info_prefix = f"{dist.replace('-', '_')}-"
    problems: list[str] = []
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if not n.endswith("/")]
    for name in names:
        top = name.split("/", 1)[0]
        if name in FORBIDDEN_FILES:
            problems.append(f"ships namespace-package file {name} (must not exist: PEP 420)")
        elif top.endswith(".dist-info"):
            if not top.startswith(dist_info_prefix):
                problems.append(f"unexpected dist-info directory {top}")
        elif not name.startswith(leaf + "/"):
            problems.append(f"file outside its leaf package {leaf}/: {name}")
    for required in (f"{leaf}/__init__.py", f"{leaf}/py.typed"):
        if required not in names:
            problems.append(f"missing {required}")
    return [f"{wheel.name}: {p}" for p in problems]


def check_wheel_contents(wheels: Mapping[str, Path]) -> None:
    problems = [p for dist, wheel in wheels.items() for p in wheel_problems(dist, wheel)]
    if problems:
        raise CheckError("wheel content check failed:\n  " + "\n  ".join(problems))


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
            import importlib.resources
            import importlib.util
            import sys

            PRESENT = {present!r}
            ABSENT = {absent!r}
            NAMESPACES = {list(NAMESPACE_PACKAGES)!r}
            SOURCE_TREE = {str(PACKAGES_DIR)!r}

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

            for name in NAMESPACES:
                spec = find(name)
                if spec is not None:
                    mod = importlib.import_module(name)
                    assert getattr(mod, "__file__", None) is None, (
                        f"{{name}} is a regular package ({{mod.__file__}}), expected PEP 420"
                    )

            for name in ABSENT:
                assert find(name) is None, f"{{name}} importable but not installed"
            """
        )
    ]
    for dist in installed:
        for i, snippet in enumerate(extra_smoke.get(dist, ())):
            parts.append(f"\n# --- extra smoke #{i} for {dist}\n")
            parts.append(textwrap.dedent(snippet).strip("\n") + "\n")
    parts.append(f'\nprint("smoke ok: " + {" + ".join(installed)!r})\n')
    return "".join(parts)


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
) -> tuple[str, ...]:
    """Fresh venv with only ``dists`` (+ core) installed from ``wheels``; run smoke code."""
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
    t0 = time.perf_counter()
    report.wheels = build_wheels(work_dir / "dist", packages_dir=packages_dir)
    report.timings["build"] = time.perf_counter() - t0
    check_wheel_contents(report.wheels)
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
