"""Packaging checks: wheel and sdist contents (with the LICENSE) and isolated installs
(drives tools/check_wheels.py).

The build/install tests need `uv` and access to the package index (for msgspec,
anyio, fsspec, sniffio); they take a few seconds with a warm uv cache.
"""

from __future__ import annotations

import importlib.util
import io
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

import omniq.storage.file
import omniq.storage.file.events
import omniq.storage.file.queue
import omniq.storage.file.results
from omniq.storage.file import (
    AsyncFileEventStorage,
    AsyncFileQueue,
    AsyncFileResultStorage,
    FileEventStorage,
    FileQueue,
    FileResultStorage,
)

ROOT = Path(__file__).resolve().parent.parent


def _load_tool(name: str) -> ModuleType:
    module_name = f"_omniq_tools_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, ROOT / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


cw = _load_tool("check_wheels")


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    built: dict[str, Path] = cw.build_wheels(tmp_path_factory.mktemp("dist"))
    return built


@pytest.fixture(scope="module")
def sdists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    built: dict[str, Path] = cw.build_sdists(tmp_path_factory.mktemp("sdist"))
    return built


# --------------------------------------------------------------------------- #
# fast unit tests of the checker itself
# --------------------------------------------------------------------------- #


LICENSE = (ROOT / "LICENSE").read_bytes()
QUEUE_INFO = "omniq_file_queue-0.1.0.dist-info"
#: What a good omniq-file-queue wheel holds besides its modules.
QUEUE_META: dict[str, str | bytes] = {
    f"{QUEUE_INFO}/METADATA": "Metadata-Version: 2.4\nLicense-Expression: MIT\nLicense-File: LICENSE\n",
    f"{QUEUE_INFO}/licenses/LICENSE": LICENSE,
    f"{QUEUE_INFO}/RECORD": "",
}


def _fake_wheel(path: Path, dist: str, names: list[str] | dict[str, str | bytes]) -> Path:
    wheel = path / f"{dist.replace('-', '_')}-0.1.0-py3-none-any.whl"
    files = names if isinstance(names, dict) else dict.fromkeys(names, "")
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return wheel


def _fake_sdist(path: Path, dist: str, files: dict[str, bytes]) -> Path:
    stem = f"{dist.replace('-', '_')}-0.1.0"
    sdist = path / f"{stem}.tar.gz"
    with tarfile.open(sdist, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{stem}/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return sdist


def test_checker_accepts_good_wheel(tmp_path: Path) -> None:
    wheel = _fake_wheel(
        tmp_path,
        "omniq-file-queue",
        {
            "omniq/storage/file/queue/__init__.py": "",
            "omniq/storage/file/queue/py.typed": "",
            **QUEUE_META,
        },
    )
    assert cw.wheel_problems("omniq-file-queue", wheel) == []


@pytest.mark.parametrize("drop", [f"{QUEUE_INFO}/licenses/LICENSE", f"{QUEUE_INFO}/METADATA"])
def test_checker_rejects_wheel_without_license(tmp_path: Path, drop: str) -> None:
    files = {
        "omniq/storage/file/queue/__init__.py": "",
        "omniq/storage/file/queue/py.typed": "",
        **QUEUE_META,
    }
    del files[drop]
    wheel = _fake_wheel(tmp_path, "omniq-file-queue", files)
    problems = "\n".join(cw.wheel_problems("omniq-file-queue", wheel))
    if drop.endswith("LICENSE"):
        assert f"missing its license {QUEUE_INFO}/licenses/LICENSE" in problems
    else:
        assert "has no 'License-File: LICENSE' line" in problems


def test_checker_rejects_wheel_with_other_license_text(tmp_path: Path) -> None:
    files = {
        "omniq/storage/file/queue/__init__.py": "",
        "omniq/storage/file/queue/py.typed": "",
        **QUEUE_META,
        f"{QUEUE_INFO}/licenses/LICENSE": "All rights reserved.\n",
    }
    wheel = _fake_wheel(tmp_path, "omniq-file-queue", files)
    problems = cw.wheel_problems("omniq-file-queue", wheel)
    assert problems == [
        f"{wheel.name}: {QUEUE_INFO}/licenses/LICENSE differs from the root LICENSE"
    ]


def test_checker_sdist_license(tmp_path: Path) -> None:
    good = _fake_sdist(tmp_path, "omniq-core", {"LICENSE": LICENSE, "pyproject.toml": b""})
    assert cw.sdist_problems("omniq-core", good) == []
    (tmp_path / "bad").mkdir()
    bad = _fake_sdist(tmp_path / "bad", "omniq-core", {"pyproject.toml": b""})
    assert cw.sdist_problems("omniq-core", bad) == [
        f"{bad.name}: missing its license omniq_core-0.1.0/LICENSE (project.license-files)"
    ]


def test_root_license_is_mit() -> None:
    text = LICENSE.decode()
    assert text.startswith("MIT License\n")
    assert "Copyright (c) 2026 the OmniQ developers" in text


def test_every_package_carries_the_root_license() -> None:
    # Hatchling reads license-files only inside the package directory: each has a copy.
    assert cw.package_license_problems() == []
    for dist in cw.PACKAGES:
        pyproject = tomllib.loads((ROOT / "packages" / dist / "pyproject.toml").read_text())
        assert pyproject["project"]["license"] == "MIT", dist
        assert pyproject["project"]["license-files"] == ["LICENSE"], dist


def test_checker_rejects_missing_or_stale_package_license(tmp_path: Path) -> None:
    for dist in cw.PACKAGES:
        (tmp_path / dist).mkdir()
        (tmp_path / dist / "LICENSE").write_bytes(LICENSE)
    (tmp_path / "omniq-core" / "LICENSE").unlink()
    (tmp_path / "omniq-file-events" / "LICENSE").write_bytes(LICENSE.replace(b"2026", b"2025"))
    problems = "\n".join(cw.package_license_problems(tmp_path))
    assert "omniq-core/LICENSE is missing" in problems
    assert "omniq-file-events/LICENSE differs" in problems
    assert "omniq-file-queue" not in problems


@pytest.mark.parametrize("bad", sorted(cw.FORBIDDEN_FILES))
def test_checker_rejects_namespace_init(tmp_path: Path, bad: str) -> None:
    wheel = _fake_wheel(
        tmp_path,
        "omniq-file-queue",
        [
            bad,
            "omniq/storage/file/queue/__init__.py",
            "omniq/storage/file/queue/py.typed",
            f"{QUEUE_INFO}/METADATA",
        ],
    )
    problems = cw.wheel_problems("omniq-file-queue", wheel)
    assert any("namespace-package" in p and bad in p for p in problems), problems


CORE_INFO = "omniq_core-0.1.0.dist-info"
CORE_GOOD: dict[str, str | bytes] = {
    "omniq/core/__init__.py": "",
    "omniq/core/py.typed": "",
    "omniq/storage/file/__init__.py": "",
    "omniq/storage/file/py.typed": "",
    f"{CORE_INFO}/METADATA": "Metadata-Version: 2.4\nLicense-File: LICENSE\n",
    f"{CORE_INFO}/licenses/LICENSE": LICENSE,
}


def test_checker_wants_the_aggregator_in_the_core_wheel(tmp_path: Path) -> None:
    assert cw.wheel_problems("omniq-core", _fake_wheel(tmp_path, "omniq-core", CORE_GOOD)) == []
    (tmp_path / "bad").mkdir()
    files = dict(CORE_GOOD)
    del files["omniq/storage/file/__init__.py"], files["omniq/storage/file/py.typed"]
    wheel = _fake_wheel(tmp_path / "bad", "omniq-core", files)
    assert cw.wheel_problems("omniq-core", wheel) == [
        f"{wheel.name}: missing omniq/storage/file/__init__.py",
        f"{wheel.name}: missing omniq/storage/file/py.typed",
    ]


@pytest.mark.parametrize("dist", ["omniq-file-queue", "omniq-file-results", "omniq-backend-file"])
def test_checker_rejects_the_aggregator_in_other_wheels(tmp_path: Path, dist: str) -> None:
    leaf = cw.leaf_dir(dist)
    info = f"{dist.replace('-', '_')}-0.1.0.dist-info"
    files: dict[str, str | bytes] = {
        f"{leaf}/__init__.py": "",
        f"{leaf}/py.typed": "",
        "omniq/storage/file/__init__.py": "",
        f"{info}/METADATA": "License-File: LICENSE\n",
        f"{info}/licenses/LICENSE": LICENSE,
    }
    wheel = _fake_wheel(tmp_path, dist, files)
    assert cw.wheel_problems(dist, wheel) == [
        f"{wheel.name}: ships omniq/storage/file/__init__.py, which belongs to omniq-core"
    ]


def test_checker_rejects_foreign_files(tmp_path: Path) -> None:
    wheel = _fake_wheel(
        tmp_path,
        "omniq-file-results",
        [
            "omniq/storage/file/results/__init__.py",
            "omniq/storage/file/results/py.typed",
            "omniq/storage/file/queue/__init__.py",
            "omniq/core/models.py",
            "omniq_core-0.1.0.dist-info/METADATA",
        ],
    )
    problems = "\n".join(cw.wheel_problems("omniq-file-results", wheel))
    assert "omniq/storage/file/queue/__init__.py" in problems
    assert "omniq/core/models.py" in problems
    assert "omniq_core-0.1.0.dist-info" in problems


def test_smoke_script_includes_extra_snippets() -> None:
    script = cw.smoke_script(
        ("omniq-core", "omniq-file-results"),
        {"omniq-file-results": ["x = 1\nassert x == 1"], "omniq-file-queue": ["boom()"]},
    )
    compile(script, "<smoke>", "exec")
    assert "assert x == 1" in script
    assert "boom()" not in script  # queue is not installed in this subset


# --------------------------------------------------------------------------- #
# the import path omniq.storage.file, from the workspace (editable installs)
# --------------------------------------------------------------------------- #


def test_aggregator_names_are_the_leaf_objects() -> None:
    # The workspace installs each distribution editable: five separate src/ directories.
    assert AsyncFileQueue is omniq.storage.file.queue.AsyncFileQueue
    assert FileQueue is omniq.storage.file.queue.FileQueue
    assert AsyncFileResultStorage is omniq.storage.file.results.AsyncFileResultStorage
    assert FileResultStorage is omniq.storage.file.results.FileResultStorage
    assert AsyncFileEventStorage is omniq.storage.file.events.AsyncFileEventStorage
    assert FileEventStorage is omniq.storage.file.events.FileEventStorage
    assert sorted(omniq.storage.file.__all__) == sorted(cw.AGGREGATED_NAMES)
    assert set(cw.AGGREGATED_NAMES) <= set(dir(omniq.storage.file))


def test_aggregator_is_shipped_by_core_and_spans_the_parts() -> None:
    agg = Path(omniq.storage.file.__file__ or "")
    assert agg == ROOT / "packages/omniq-core/src/omniq/storage/file/__init__.py"
    paths = {Path(p) for p in omniq.storage.file.__path__}
    for dist in ("omniq-file-queue", "omniq-file-results", "omniq-file-events"):
        assert ROOT / "packages" / dist / "src/omniq/storage/file" in paths, dist
    # omniq.storage stays a PEP 420 namespace (no __init__.py anywhere).
    assert getattr(sys.modules["omniq.storage"], "__file__", None) is None
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        omniq.storage.file.Nope  # noqa: B018


def _run_with_src_dirs(dists: list[str], code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter whose sys.path holds, of the workspace's
    editable src/ directories, only those of ``dists`` (as if only they were installed)."""
    srcs = [str(ROOT / "packages" / d / "src") for d in dists]
    prelude = (
        "import sys\n"
        f"sys.path[:] = [p for p in sys.path if not p.startswith({str(ROOT / 'packages')!r})]"
        f" + {srcs!r}\n"
    )
    return subprocess.run(
        [sys.executable, "-c", prelude + code], capture_output=True, text=True, check=False
    )


def test_aggregator_with_only_core_and_queue_from_src_dirs() -> None:
    proc = _run_with_src_dirs(
        ["omniq-core", "omniq-file-queue"],
        "from omniq.storage.file import AsyncFileQueue\n"
        "import omniq.storage.file.queue as leaf\n"
        "assert AsyncFileQueue is leaf.AsyncFileQueue\n"
        "from omniq.storage.file import FileResultStorage\n",
    )
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: cannot import name 'FileResultStorage'"), last
    assert "install omniq-file-results" in last, last


def test_aggregator_keeps_a_broken_parts_own_error() -> None:
    # A part that is installed but fails to import (here: its dependency omniq.core is
    # absent) must show that error, not claim the part is missing.
    proc = _run_with_src_dirs(
        ["omniq-file-events"], "from omniq.storage.file.events import FileEventStorage\n"
    )
    assert "No module named 'omniq.core'" in proc.stderr, proc.stderr
    proc = _run_with_src_dirs(
        ["omniq-core"],
        "import sys\n"
        "sys.modules['msgspec'] = None  # a broken dependency of an installed part\n"
        f"sys.path.append({str(ROOT / 'packages/omniq-file-events/src')!r})\n"
        "from omniq.storage.file import FileEventStorage\n",
    )
    last = proc.stderr.strip().splitlines()[-1]
    assert "msgspec" in last and "install omniq-file-events" not in last, last


# --------------------------------------------------------------------------- #
# real builds + isolated installs
# --------------------------------------------------------------------------- #


@pytest.mark.slow
@pytest.mark.parametrize("dist", list(cw.PACKAGES))
def test_wheel_contains_only_its_leaf_package(wheels: dict[str, Path], dist: str) -> None:
    # ... and its license (.dist-info/licenses/LICENSE): wheel_problems checks both.
    assert cw.wheel_problems(dist, wheels[dist]) == []


@pytest.mark.slow
@pytest.mark.parametrize("dist", list(cw.PACKAGES))
def test_sdist_ships_the_license(sdists: dict[str, Path], dist: str) -> None:
    assert cw.sdist_problems(dist, sdists[dist]) == []


@pytest.mark.slow
@pytest.mark.parametrize(
    "subset",
    [pytest.param(s, id="+".join(s)) for s in cw.SUBSETS],
)
def test_isolated_install(wheels: dict[str, Path], subset: tuple[str, ...], tmp_path: Path) -> None:
    installed = cw.smoke_test(wheels, subset, tmp_path)
    assert installed[0] == "omniq-core"
    assert set(subset) <= set(installed)


@pytest.mark.slow
def test_isolated_install_detects_missing_module(wheels: dict[str, Path], tmp_path: Path) -> None:
    # A smoke snippet that fails must surface as CheckError with its traceback.
    with pytest.raises(cw.CheckError, match="no_such_module"):
        cw.smoke_test(
            wheels,
            ("omniq-file-events",),
            tmp_path,
            extra_smoke={"omniq-file-events": ["import no_such_module"]},
        )


@pytest.mark.slow
def test_wheels_core_and_queue_only(wheels: dict[str, Path], tmp_path: Path) -> None:
    # The case, spelled out (the generic smoke run checks it for every subset).
    python = cw.create_venv(tmp_path / "venv")
    cw.install_wheels(python, [wheels["omniq-core"], wheels["omniq-file-queue"]])
    code = (
        "from omniq.storage.file import AsyncFileQueue, FileQueue\n"
        "import omniq.storage.file.queue as leaf\n"
        "assert (AsyncFileQueue, FileQueue) == (leaf.AsyncFileQueue, leaf.FileQueue)\n"
        "try:\n"
        "    from omniq.storage.file import FileResultStorage\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [str(python), "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout
    assert "cannot import name 'FileResultStorage'" in out, out
    assert "install omniq-file-results" in out, out


@pytest.mark.slow
def test_typecheck_needs_the_aggregators_py_typed(wheels: dict[str, Path], tmp_path: Path) -> None:
    # The all-parts smoke run passes typecheck_smoke; without omniq.storage.file's py.typed
    # mypy ignores the installed package's types, and the check says so.
    python = cw.create_venv(tmp_path / "venv")
    cw.install_wheels(python, [wheels[d] for d in cw.PACKAGES])
    found = subprocess.run(
        [str(python), "-I", "-c", "import omniq.storage.file as m; print(m.__file__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(found).parent / "py.typed").unlink()
    with pytest.raises(cw.CheckError, match="has no attribute"):
        cw.typecheck_smoke(python, tmp_path)
