"""tools/bump.py: the single version source, sibling re-pinning and changelog entries,
run on a copy of packages/ in a temporary directory."""

from __future__ import annotations

import datetime
import importlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = sorted(p.parent.name for p in (ROOT / "packages").glob("*/pyproject.toml"))
#: distribution -> import name of its leaf package
LEAVES = {
    "omniq-core": "omniq.core",
    "omniq-file-queue": "omniq.storage.file.queue",
    "omniq-file-results": "omniq.storage.file.results",
    "omniq-file-events": "omniq.storage.file.events",
    "omniq-backend-file": "omniq.backend.file",
}


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
    """A scratch repo holding a copy of packages/ (manifests, sources, changelogs), with
    every changelog's Unreleased section emptied: the tests add the entries they need, so
    they do not depend on what the real changelogs hold today."""
    shutil.copytree(
        ROOT / "packages",
        tmp_path / "packages",
        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "dist", "build", ".*"),
    )
    for log in (tmp_path / "packages").glob("*/CHANGELOG.md"):
        head, _, rest = log.read_text("utf-8").partition("## Unreleased\n")
        log.write_text(f"{head}## Unreleased\n\n## {rest.split(chr(10) + '## ', 1)[1]}")
    return tmp_path


def _snapshot(repo: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(repo)): p.read_bytes() for p in sorted(repo.rglob("*")) if p.is_file()
    }


def _run(repo: Path, *args: str) -> int:
    code: int = bump.main(["--root", str(repo), *args])
    return code


def _load(repo: Path, name: str) -> dict[str, Any]:
    return tomllib.loads((repo / "packages" / name / "pyproject.toml").read_text("utf-8"))


def _version(repo: Path, name: str) -> str:
    version: str = bump.load_package(repo / "packages" / name).version
    return version


def _changelog(repo: Path, name: str) -> str:
    return (repo / "packages" / name / "CHANGELOG.md").read_text("utf-8")


def _unreleased(text: str) -> str:
    return text.split("## Unreleased\n", 1)[1].split("\n## ", 1)[0].strip()


def _reqs(data: dict[str, Any]) -> list[str]:
    return list(bump.iter_requirements(data))


def _on(reqs: list[str], dist: str) -> list[str]:
    return [r for r in reqs if bump.REQUIREMENT_RE.match(r)["name"] == dist]


def _add_entry(repo: Path, name: str, entry: str) -> None:
    path = repo / "packages" / name / "CHANGELOG.md"
    path.write_text(
        path.read_text("utf-8").replace("## Unreleased\n", f"## Unreleased\n\n- {entry}\n")
    )


def _hatchling_metadata(pkg_dir: Path) -> dict[str, Any]:
    """Core metadata as hatchling computes it for ``pkg_dir`` (its ``hatchling`` command,
    else hatchling run through ``uv tool run``; both work offline once installed/cached)."""
    candidates = []
    if exe := shutil.which("hatchling"):
        candidates.append([exe])
    if uv := shutil.which("uv"):
        candidates.append([uv, "tool", "run", "--from", "hatchling>=1.27", "hatchling"])
    if not candidates:
        pytest.skip("neither hatchling nor uv on PATH")
    errors = []
    for cmd in candidates:
        proc = subprocess.run(
            [*cmd, "metadata", "--compact"],
            cwd=pkg_dir,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if proc.returncode == 0:
            metadata: dict[str, Any] = json.loads(proc.stdout)
            return metadata
        errors.append(f"{cmd[0]}: {proc.stderr.strip()[-2000:]}")
    pytest.fail("hatchling metadata failed:\n" + "\n".join(errors))


# --------------------------------------------------------------------------- #
# versions and pins
# --------------------------------------------------------------------------- #


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


@pytest.mark.parametrize("bad", ["1", "1.x", "v1.2.3", "01.2.0", "", "0.2.0-rc1", "0.2.0 "])
def test_pin_for_rejects_bad_versions(bad: str) -> None:
    with pytest.raises(bump.BumpError, match="not a supported version"):
        bump.pin_for(bad)


def test_version_key_follows_pep440() -> None:
    versions = [
        "0.1.0",
        "0.1.1.dev0",
        "0.1.1a1",
        "0.1.1b2",
        "0.1.1rc1",
        "0.1.1",
        "0.1.1.post1",
        "0.2.dev1",
        "0.2.0rc1.dev1",
        "0.2.0rc1",
        "0.2.0",
        "0.10.0",
        "1.0.0",
    ]
    assert sorted(versions, key=bump.version_key) == sorted(versions, key=Version)
    assert bump.version_key("0.2") == bump.version_key("0.2.0")


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


# --------------------------------------------------------------------------- #
# the repository as it is
# --------------------------------------------------------------------------- #


def test_the_repo_follows_the_rules() -> None:
    assert bump.check(ROOT) == []
    for name in PACKAGES:
        project = _load(ROOT, name)["project"]
        assert "version" not in project, f"{name}: the version belongs in __version__ only"
        assert project["dynamic"] == ["version"], name
        leaf = importlib.import_module(LEAVES[name])
        assert leaf.__version__ == _version(ROOT, name), name


def test_hatchling_reads_the_single_source(repo: Path) -> None:
    init = bump.load_package(repo / "packages" / "omniq-file-results").version_file
    init.write_text(init.read_text("utf-8").replace('"0.1.0"', '"0.1.7"', 1), "utf-8")
    assert _hatchling_metadata(repo / "packages" / "omniq-file-results")["version"] == "0.1.7"


# --------------------------------------------------------------------------- #
# bumping
# --------------------------------------------------------------------------- #


def test_bump_file_queue(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _add_entry(repo, "omniq-file-queue", "An intent file before every spawning outcome.")
    before = _snapshot(repo)
    old_queue_log = _changelog(repo, "omniq-file-queue")
    entries = _unreleased(old_queue_log)
    assert entries == "- An intent file before every spawning outcome."

    assert _run(repo, "omniq-file-queue", "0.2.0", "--date", "2026-12-24") == 0
    out = capsys.readouterr().out
    assert "version 0.1.0 -> 0.2.0" in out
    assert "'omniq-file-queue[s3]>=0.1,<0.2' -> 'omniq-file-queue[s3]>=0.2,<0.3'" in out

    # the single source: the __version__ line, and nothing else in that file
    queue = bump.load_package(repo / "packages" / "omniq-file-queue")
    assert queue.version == "0.2.0"
    rel = str(queue.version_file.relative_to(repo))
    assert queue.version_file.read_bytes() == before[rel].replace(
        b'__version__ = "0.1.0"', b'__version__ = "0.2.0"'
    )
    assert (repo / "packages/omniq-file-queue/pyproject.toml").read_bytes() == before[
        "packages/omniq-file-queue/pyproject.toml"
    ]

    # siblings re-pinned (extras kept), other pins untouched
    backend = _reqs(_load(repo, "omniq-backend-file"))
    queue_reqs = _on(backend, "omniq-file-queue")
    assert len(queue_reqs) == 5
    assert "omniq-file-queue>=0.2,<0.3" in backend
    for extra in ("s3", "gcs", "azure", "cloud"):
        assert f"omniq-file-queue[{extra}]>=0.2,<0.3" in backend
    assert "omniq-core>=0.1,<0.2" in backend
    assert "omniq-file-results[s3]>=0.1,<0.2" in backend
    # ... and the manifest is otherwise byte-for-byte what it was
    text = (repo / "packages/omniq-backend-file/pyproject.toml").read_text("utf-8")
    old = before["packages/omniq-backend-file/pyproject.toml"].decode()
    assert text.replace(">=0.1,<0.2", "\0").replace(">=0.2,<0.3", "\0") == old.replace(
        ">=0.1,<0.2", "\0"
    )

    # the changelog: Unreleased emptied, its entries under the dated heading
    log = _changelog(repo, "omniq-file-queue")
    assert _unreleased(log) == ""
    assert log == old_queue_log.replace(
        "## Unreleased\n\n", f"## Unreleased\n\n## 0.2.0 (2026-12-24)\n\n{entries}\n\n", 1
    ).replace(f"{entries}\n\n## 0.1.0", "## 0.1.0", 1)
    assert log.index("## 0.2.0 (2026-12-24)") < log.index(entries) < log.index("## 0.1.0")
    # the re-pinned sibling notes its new requirement
    assert _unreleased(_changelog(repo, "omniq-backend-file")) == (
        "- Requires `omniq-file-queue>=0.2,<0.3` (omniq-file-queue 0.2.0)."
    )

    # nothing else changed, and the result passes --check
    after = _snapshot(repo)
    changed = {k for k in after if after[k] != before.get(k)}
    assert changed == {
        rel,
        "packages/omniq-file-queue/CHANGELOG.md",
        "packages/omniq-backend-file/pyproject.toml",
        "packages/omniq-backend-file/CHANGELOG.md",
    }
    assert bump.check(repo) == []


def test_hatchling_sees_the_bump(repo: Path) -> None:
    assert _run(repo, "omniq-core", "0.2.0", "--allow-empty") == 0
    core = _hatchling_metadata(repo / "packages" / "omniq-core")
    assert core["version"] == "0.2.0"
    queue = _hatchling_metadata(repo / "packages" / "omniq-file-queue")
    assert queue["version"] == "0.1.0"
    [req] = [Requirement(r) for r in queue["dependencies"] if r.startswith("omniq-core")]
    assert req.specifier == SpecifierSet(">=0.2,<0.3")
    assert Version("0.2.0") in req.specifier


def test_bump_core_to_1x_repins_everyone(repo: Path) -> None:
    assert _run(repo, "omniq-core", "1.4.2", "--allow-empty", "--date", "2027-01-05") == 0
    assert _version(repo, "omniq-core") == "1.4.2"
    log = _changelog(repo, "omniq-core")
    assert "## 1.4.2 (2027-01-05)\n\n- No changes of its own.\n\n## 0.1.0" in log
    for name in PACKAGES:
        if name == "omniq-core":
            continue
        assert _on(_reqs(_load(repo, name)), "omniq-core") == ["omniq-core>=1.4,<2"], name
        assert "- Requires `omniq-core>=1.4,<2` (omniq-core 1.4.2)." in _unreleased(
            _changelog(repo, name)
        )
    assert bump.check(repo) == []


def test_bump_dates_today_by_default(repo: Path) -> None:
    _add_entry(repo, "omniq-file-results", "Something users notice.")
    assert _run(repo, "omniq-file-results", "0.1.1") == 0
    today = datetime.date.today().isoformat()
    assert f"## 0.1.1 ({today})\n\n- Something users notice.\n" in _changelog(
        repo, "omniq-file-results"
    )


def test_bump_twice_and_dry_run(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _add_entry(repo, "omniq-file-events", "First change.")
    assert _run(repo, "omniq-file-events", "0.2.0") == 0
    _add_entry(repo, "omniq-file-events", "Second change.")
    assert _run(repo, "omniq-file-events", "0.3.1") == 0
    assert _version(repo, "omniq-file-events") == "0.3.1"
    assert "omniq-file-events[cloud]>=0.3,<0.4" in _reqs(_load(repo, "omniq-backend-file"))
    backend_log = _unreleased(_changelog(repo, "omniq-backend-file"))
    assert backend_log.count("- Requires `omniq-file-events") == 2
    log = _changelog(repo, "omniq-file-events")
    assert log.index("## 0.3.1") < log.index("Second change") < log.index("## 0.2.0")
    assert log.index("## 0.2.0") < log.index("First change") < log.index("## 0.1.0")

    _add_entry(repo, "omniq-file-events", "Third change.")
    snapshot = _snapshot(repo)
    capsys.readouterr()
    assert _run(repo, "--dry-run", "omniq-file-events", "0.9.0") == 0
    assert "would update packages/omniq-backend-file/pyproject.toml" in capsys.readouterr().out
    assert _snapshot(repo) == snapshot


def test_refuses_an_empty_unreleased_section(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    snapshot = _snapshot(repo)
    assert _run(repo, "omniq-core", "0.2.0") == 1
    err = capsys.readouterr().err
    assert "omniq-core/CHANGELOG.md: nothing under '## Unreleased'" in err
    assert "--allow-empty" in err
    assert _snapshot(repo) == snapshot
    # an HTML comment is not an entry, and stays under Unreleased
    _add_entry(repo, "omniq-core", "x")
    path = repo / "packages/omniq-core/CHANGELOG.md"
    path.write_text(path.read_text("utf-8").replace("- x\n", "<!-- one line per change -->\n"))
    assert _run(repo, "omniq-core", "0.2.0") == 1
    assert _run(repo, "omniq-core", "0.2.0", "--allow-empty") == 0
    assert _unreleased(_changelog(repo, "omniq-core")) == "<!-- one line per change -->"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["omniq-nope", "0.2.0"], "unknown package 'omniq-nope'; known: omniq-backend-file"),
        (["omniq-file-queue", "two"], "not a supported version"),
        (["omniq-file-queue", "v0.2.0"], "not a supported version"),
        (["omniq-file-queue", "0.1.0"], "omniq-file-queue is at 0.1.0; the new version 0.1.0"),
        (["omniq-file-queue", "0.0.9"], "must be greater"),
        (["omniq-file-queue", "0.1.0rc1"], "must be greater"),
        (["omniq-file-queue", "0.1"], "must be greater"),
    ],
)
def test_bad_input_changes_nothing(
    repo: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    snapshot = _snapshot(repo)
    assert _run(repo, *args) == 1
    err = capsys.readouterr().err
    assert err.startswith("bump: error: ") and message in err, err
    assert _snapshot(repo) == snapshot


def test_bad_date_and_missing_arguments(repo: Path) -> None:
    snapshot = _snapshot(repo)
    for args in (["omniq-file-queue", "0.2.0", "--date", "24.12.2026"], ["omniq-file-queue"]):
        with pytest.raises(SystemExit) as exc:
            _run(repo, *args)
        assert exc.value.code == 2
    assert _snapshot(repo) == snapshot


def test_refuses_a_static_version(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = repo / "packages/omniq-file-events/pyproject.toml"
    manifest.write_text(
        manifest.read_text("utf-8").replace('dynamic = ["version"]', 'version = "0.1.0"')
    )
    _add_entry(repo, "omniq-file-events", "x")
    snapshot = _snapshot(repo)
    assert _run(repo, "omniq-file-events", "0.2.0") == 1
    assert "static [project] version" in capsys.readouterr().err
    assert _snapshot(repo) == snapshot


def test_check_reports_drift(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(repo, "--check") == 0
    # a hand-edited __version__ without the pins and changelog the bump writes
    init = bump.load_package(repo / "packages" / "omniq-core").version_file
    init.write_text(init.read_text("utf-8").replace('"0.1.0"', '"0.2.0"', 1), "utf-8")
    problems = "\n".join(bump.check(repo))
    assert "omniq-core/CHANGELOG.md: no '## 0.2.0 (YYYY-MM-DD)' section" in problems
    for name in ("omniq-file-queue", "omniq-backend-file"):
        assert f"{name}/pyproject.toml: 'omniq-core>=0.1,<0.2' should pin >=0.2,<0.3" in problems
    capsys.readouterr()
    assert _run(repo, "--check") == 1
    assert "should pin" in capsys.readouterr().err


def test_changelog_edits_at_end_of_file() -> None:
    path = Path("CHANGELOG.md")
    text = "# Changelog\n\n## Unreleased\n\n- a\n- b\n"
    new, n = bump.release_changelog(path, text, "1.0.0", "2026-12-24", allow_empty=False)
    assert n == 2
    assert new == "# Changelog\n\n## Unreleased\n\n## 1.0.0 (2026-12-24)\n\n- a\n- b\n"
    with pytest.raises(bump.BumpError, match=re.escape("already has a '## 1.0.0' section")):
        bump.release_changelog(path, new, "1.0.0", "2026-12-25", allow_empty=True)
    assert bump.add_unreleased_entry(path, text, "c") == (
        "# Changelog\n\n## Unreleased\n\n- a\n- b\n- c\n"
    )
