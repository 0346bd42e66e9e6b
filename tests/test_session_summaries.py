"""The session summaries of tests/conftest.py ("interleavings explored", "fault suite") show
totals over all pytest-xdist workers, and still work without xdist.

Each case runs a small pytest session in a subprocess with tests/conftest.py loaded as a plugin;
its tests explore a two-step scenario named after their xdist worker and count bad inputs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

TESTS_DIR = Path(__file__).resolve().parent

INNER_TESTS = """
import os

import pytest

import explorer
import fault_stats
from omniq.core.fs import write


def _put(world):
    yield write("k", b"x")


@pytest.mark.parametrize("n", range(4))
def test_tiny(n, tmp_path):
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    actors = [explorer.Actor("A", _put), explorer.Actor("B", _put)]
    report = explorer.explore(f"tiny-{worker}", actors, mode="exhaustive", base_dir=tmp_path)
    assert (report.schedules, report.steps, report.violations) == (2, 4, [])
    fault_stats.add("bad inputs tried", 5)
"""


def _run(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, *args: str
) -> pytest.RunResult:
    pytester.makepyfile(test_inner=INNER_TESTS)
    path = [str(TESTS_DIR), str(TESTS_DIR / "faults"), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, path)))
    # Not inherited from this session: an outer xdist worker's id, or the explorer's knobs.
    for name in (
        "PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID",
        "OMNIQ_EXPLORE_SAMPLES", "OMNIQ_EXPLORE_REPLAY", "OMNIQ_EXPLORE_SEED",
    ):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    # hypothesis' plugin alone makes the xdist session seconds slower; randomly is not needed.
    plugins = ["conftest", "no:cacheprovider", "no:hypothesispytest", "no:randomly"]
    options = [arg for plugin in plugins for arg in ("-p", plugin)]
    result = pytester.runpytest_subprocess(*options, *args, timeout=120)
    result.assert_outcomes(passed=4)
    return result


def _table_rows(result: pytest.RunResult) -> dict[str, list[str]]:
    """The "interleavings explored" table: first column -> the other columns."""
    lines = result.stdout.lines
    starts = [i for i, line in enumerate(lines) if "= interleavings explored =" in line]
    assert starts, f"no 'interleavings explored' table in:\n{result.stdout.str()}"
    rows = {}
    for line in lines[starts[0] + 2 :]:
        if not line.startswith(("tiny-", "total ")):
            break
        name, *fields = line.split()
        rows[name] = fields
    return rows


def test_summaries_add_up_over_xdist_workers(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("xdist")
    result = _run(pytester, monkeypatch, "-n", "2")
    result.stdout.fnmatch_lines(["created: 2/2 workers"])
    rows = _table_rows(result)
    # Both workers ran tests (xdist's first batch gives each two of the four), and the
    # controller printed each worker's row and the sum of all of them.
    assert set(rows) == {"tiny-gw0", "tiny-gw1", "total"}, result.stdout.str()
    assert rows["total"][:3] == ["8", "16", "0"], result.stdout.str()
    result.stdout.fnmatch_lines(["*= fault suite =*", "bad inputs tried: 20"])


def test_summaries_without_xdist(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = _run(pytester, monkeypatch, "-p", "no:xdist")
    rows = _table_rows(result)
    assert rows["tiny-main"][:5] == ["memory", "exhaustive", "8", "16", "0"], result.stdout.str()
    assert rows["total"][:3] == ["8", "16", "0"], result.stdout.str()
    result.stdout.fnmatch_lines(["*= fault suite =*", "bad inputs tried: 20"])
