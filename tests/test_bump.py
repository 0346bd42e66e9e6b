"""tools/bump.py: version rewrite and sibling re-pinning on a copy of packages/*/pyproject.toml."""

from __future__ import annotations

import importlib.util
import shutil
import sys
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = sorted(p.parent.name for p in (ROOT / "packages").glob("*/pyproject.toml"))


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


bump = _load_tool("bump")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A scratch repo containing only copies of packages/*/pyproject.toml."""
    for name in PACKAGES:
        (tmp_path / "packages" / name).mkdir(parents=True)
        shutil.copy2(ROOT / "packages" / name / "pyproject.toml", tmp_path / "packages" / name)
    return tmp_path


def _load(repo: Path, name: str) -> dict[str, Any]:
    return tomllib.loads((repo / "packages" / name / "pyproject.toml").read_text("utf-8"))


def _reqs(data: dict[str, Any]) -> list[str]:
    return list(bump.iter_requirements(data))


def _on(reqs: list[str], dist: str) -> list[str]:
    return [r for r in reqs if bump.REQUIREMENT_RE.match(r)["name"] == dist]


@pytest.mark.parametrize(
    ("version", "pin"),
    [
        ("0.2.0", ">=0.2,<0.3"),
        ("0.2", ">=0.2,<0.3"),
        ("0.10.3", ">=0.10,<0.11"),
        ("1.0.0", ">=1.0,<2"),
        ("2.7.1", ">=2.7,<3"),
        ("0.3.0rc1", ">=0.3.0rc1,<0.4"),
        ("1.2.0.dev3", ">=1.2.0.dev3,<2"),
    ],
)
def test_pin_for(version: str, pin: str) -> None:
    assert bump.pin_for(version) == pin


@pytest.mark.parametrize("bad", ["1", "1.x", "v1.2.3", "01.2.0", ""])
def test_pin_for_rejects_bad_versions(bad: str) -> None:
    with pytest.raises(bump.BumpError):
        bump.pin_for(bad)


@pytest.mark.parametrize(
    ("req", "new"),
    [
        ("omniq-core>=0.1,<0.2", "omniq-core>=0.2,<0.3"),
        ("omniq-core >= 0.1, < 0.2", "omniq-core >=0.2,<0.3"),
        ("omniq_core>=0.1,<0.2", "omniq_core>=0.2,<0.3"),
        ("omniq-core[s3,gcs]>=0.1,<0.2", "omniq-core[s3,gcs]>=0.2,<0.3"),
        ("omniq-core", "omniq-core>=0.2,<0.3"),
        ("omniq-core[s3]", "omniq-core[s3]>=0.2,<0.3"),
        (
            "omniq-core>=0.1,<0.2; python_version >= '3.11'",
            "omniq-core>=0.2,<0.3; python_version >= '3.11'",
        ),
        ("omniq-core-extra>=0.1", None),
        ("omniq-corex>=0.1", None),
        ("omniq-core @ file:///tmp/x.whl", None),
    ],
)
def test_repin(req: str, new: str | None) -> None:
    assert bump.repin(req, "omniq-core", ">=0.2,<0.3") == new


def test_bump_file_queue(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = {name: _load(repo, name) for name in PACKAGES}
    text_before = {
        name: (repo / "packages" / name / "pyproject.toml").read_text("utf-8") for name in PACKAGES
    }

    assert bump.main(["--root", str(repo), "omniq-file-queue", "0.2.0"]) == 0
    assert "version 0.1.0 -> 0.2.0" in capsys.readouterr().out

    after = {name: _load(repo, name) for name in PACKAGES}
    assert after["omniq-file-queue"]["project"]["version"] == "0.2.0"

    backend = _reqs(after["omniq-backend-file"])
    queue_reqs = _on(backend, "omniq-file-queue")
    assert "omniq-file-queue>=0.2,<0.3" in backend
    for extra in ("s3", "gcs", "azure", "cloud"):
        assert f"omniq-file-queue[{extra}]>=0.2,<0.3" in backend
    assert len(queue_reqs) == len(_on(_reqs(before["omniq-backend-file"]), "omniq-file-queue"))
    assert all(r.endswith(">=0.2,<0.3") for r in queue_reqs)
    # other pins untouched
    assert "omniq-core>=0.1,<0.2" in backend
    assert "omniq-file-results[s3]>=0.1,<0.2" in backend

    # everything except the rewritten strings is byte-for-byte identical
    for name in PACKAGES:
        if name == "omniq-file-queue":
            data = after[name]
            assert data["project"]["name"] == "omniq-file-queue"
            assert {k: v for k, v in data["project"].items() if k != "version"} == {
                k: v for k, v in before[name]["project"].items() if k != "version"
            }
            continue
        text = (repo / "packages" / name / "pyproject.toml").read_text("utf-8")
        expected = text_before[name].replace(">=0.1,<0.2", "\0")
        actual = text.replace(">=0.1,<0.2", "\0").replace(">=0.2,<0.3", "\0")
        assert actual == expected, name
        assert after[name]["project"]["version"] == before[name]["project"]["version"]


def test_bump_core_to_1x_repins_everyone(repo: Path) -> None:
    assert bump.main(["--root", str(repo), "omniq-core", "1.4.2"]) == 0
    assert _load(repo, "omniq-core")["project"]["version"] == "1.4.2"
    for name in PACKAGES:
        if name == "omniq-core":
            continue
        core = _on(_reqs(_load(repo, name)), "omniq-core")
        assert core == ["omniq-core>=1.4,<2"], name


def test_bump_twice_and_dry_run(repo: Path) -> None:
    assert bump.main(["--root", str(repo), "omniq-file-events", "0.2.0"]) == 0
    assert bump.main(["--root", str(repo), "omniq-file-events", "0.3.1"]) == 0
    assert _load(repo, "omniq-file-events")["project"]["version"] == "0.3.1"
    backend = _reqs(_load(repo, "omniq-backend-file"))
    assert "omniq-file-events[cloud]>=0.3,<0.4" in backend

    snapshot = (repo / "packages" / "omniq-backend-file" / "pyproject.toml").read_text("utf-8")
    assert bump.main(["--root", str(repo), "--dry-run", "omniq-file-events", "0.9.0"]) == 0
    assert (repo / "packages" / "omniq-backend-file" / "pyproject.toml").read_text(
        "utf-8"
    ) == snapshot
    assert _load(repo, "omniq-file-events")["project"]["version"] == "0.3.1"


def test_bump_rewrites_literal_dunder_version(repo: Path) -> None:
    init = repo / "packages" / "omniq-file-results" / "src" / "omniq" / "storage" / "file"
    init = init / "results" / "__init__.py"
    init.parent.mkdir(parents=True)
    init.write_text('"""Results."""\n\n__version__ = "0.1.0"\n', "utf-8")
    assert bump.main(["--root", str(repo), "omniq-file-results", "0.1.1"]) == 0
    assert '__version__ = "0.1.1"' in init.read_text("utf-8")


def test_unknown_package_and_bad_version(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert bump.main(["--root", str(repo), "omniq-nope", "0.2.0"]) == 1
    assert "unknown package" in capsys.readouterr().err
    assert bump.main(["--root", str(repo), "omniq-core", "two"]) == 1
    assert _load(repo, "omniq-core")["project"]["version"] == "0.1.0"
