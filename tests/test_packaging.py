"""Packaging checks: wheel and sdist contents (with the LICENSE) and isolated installs
(drives tools/check_wheels.py).

The build/install tests need `uv` and access to the package index (for msgspec,
anyio, fsspec, sniffio); they take a few seconds with a warm uv cache.
"""

from __future__ import annotations

import importlib.util
import io
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

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
