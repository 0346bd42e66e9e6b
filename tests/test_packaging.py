"""Packaging checks: wheel contents and isolated installs (drives tools/check_wheels.py).

The build/install tests need `uv` and access to the package index (for msgspec,
anyio, fsspec, sniffio); they take a few seconds with a warm uv cache.
"""

from __future__ import annotations

import importlib.util
import sys
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


# --------------------------------------------------------------------------- #
# fast unit tests of the checker itself
# --------------------------------------------------------------------------- #


def _fake_wheel(path: Path, dist: str, names: list[str]) -> Path:
    wheel = path / f"{dist.replace('-', '_')}-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name in names:
            zf.writestr(name, "")
    return wheel


def test_checker_accepts_good_wheel(tmp_path: Path) -> None:
    wheel = _fake_wheel(
        tmp_path,
        "omniq-file-queue",
        [
            "omniq/storage/file/queue/__init__.py",
            "omniq/storage/file/queue/py.typed",
            "omniq_file_queue-0.1.0.dist-info/METADATA",
            "omniq_file_queue-0.1.0.dist-info/RECORD",
        ],
    )
    assert cw.wheel_problems("omniq-file-queue", wheel) == []


@pytest.mark.parametrize("bad", sorted(cw.FORBIDDEN_FILES))
def test_checker_rejects_namespace_init(tmp_path: Path, bad: str) -> None:
    wheel = _fake_wheel(
        tmp_path,
        "omniq-file-queue",
        [
            bad,
            "omniq/storage/file/queue/__init__.py",
            "omniq/storage/file/queue/py.typed",
            "omniq_file_queue-0.1.0.dist-info/METADATA",
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
    assert cw.wheel_problems(dist, wheels[dist]) == []


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
