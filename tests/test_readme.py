"""README.md and .ci/run agree: CI runs exactly the test command the README shows first."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block is not None, "README.md must start with a bash block of commands"
    return [line.split("#", 1)[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_readme_starts_with_the_demo_and_the_test_command() -> None:
    demo, tests = _readme_commands()[:2]
    assert demo == "pip install hatch && hatch run demo"
    assert tests.startswith("pip install hatch && ")


def test_ci_runs_the_readme_test_command() -> None:
    tests = _readme_commands()[1].removeprefix("pip install hatch && ")
    script = (ROOT / ".ci" / "run").read_text()
    match = re.search(r'^TEST_COMMAND="([^"]+)"$', script, re.M)
    assert match is not None, ".ci/run must define TEST_COMMAND"
    assert match.group(1) == tests
    assert 'eval "$TEST_COMMAND"' in script
