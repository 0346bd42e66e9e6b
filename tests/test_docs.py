"""The documentation's examples run, its links resolve, and README.md stays short.

Every ```python block of README.md, docs/*.md and packages/*/README.md runs here, page by page: in a temporary
working directory, in one fresh module per page (a later block uses what an earlier block of
the same page defined). A block whose first line is a comment naming a file (``# tasks.py``)
is written to that file instead, so the next blocks can import it. A block that cannot run
here is marked on the line before its fence with ``<!-- not-run: the reason -->``: it must
still compile, and the marked blocks are counted (EXPECTED_NOT_RUN) so none goes unnoticed.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import sys
import types
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README_LIMIT = 8192  # bytes

#: How many python blocks are marked not-run. Change it only with a reason in the marker.
EXPECTED_NOT_RUN = 3

FENCE = re.compile(r"^```\s*([\w+-]*)\s*$")
MARKER = re.compile(r"^<!--\s*not-run\b(.*?)-->\s*$")
FILE_BLOCK = re.compile(r"^#\s*([\w./-]+\.py)\b")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")


def _pages() -> list[Path]:
    packages = sorted(ROOT.glob("packages/*/README.md"))  # each distribution's PyPI page
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md")), *packages]


def _name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


@dataclasses.dataclass
class Block:
    page: str
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    marker: str | None  # the text after "not-run" in the marker on the line before, if any

    @property
    def reason(self) -> str:
        return (self.marker or "").lstrip(" :").strip()

    @property
    def file(self) -> str | None:
        first = self.code.lstrip("\n").split("\n", 1)[0]
        match = FILE_BLOCK.match(first)
        return match.group(1) if match else None

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def _blocks(page: Path) -> list[Block]:
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        start = i
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            i += 1
        assert i < len(lines), f"{_name(page)}:{start + 1}: unclosed code fence"
        marker = MARKER.match(lines[start - 1]) if start else None
        blocks.append(
            Block(
                page=_name(page),
                line=start + 1,
                lang=match.group(1).lower(),
                code="\n".join(lines[start + 1 : i]) + "\n",
                marker=marker.group(1) if marker else None,
            )
        )
        i += 1
    return blocks


def _python_blocks() -> list[Block]:
    return [b for page in _pages() for b in _blocks(page) if b.lang in ("python", "py")]


def _runnable_pages() -> list[str]:
    return sorted({b.page for b in _python_blocks() if b.marker is None})


def _not_run() -> list[Block]:
    return [b for b in _python_blocks() if b.marker is not None]


# -- the examples run ---------------------------------------------------------------------------
def _memory_store_keys() -> tuple[set[str], set[str]]:
    from fsspec.implementations.memory import MemoryFileSystem

    return set(MemoryFileSystem.store), set(MemoryFileSystem.pseudo_dirs)


def _forget_memory_store(before: tuple[set[str], set[str]]) -> None:
    from fsspec.implementations.memory import MemoryFileSystem

    for key in set(MemoryFileSystem.store) - before[0]:
        MemoryFileSystem.store.pop(key, None)
    MemoryFileSystem.pseudo_dirs[:] = [
        d for d in MemoryFileSystem.pseudo_dirs if d in before[1] or d == ""
    ]


@pytest.mark.parametrize("page", _runnable_pages())
def test_page_examples_run(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    module_name = "docs_example_" + re.sub(r"\W", "_", page.removesuffix(".md"))
    module = types.ModuleType(module_name)
    module.__file__ = str(tmp_path / f"{module_name}.py")
    written: list[str] = []
    memory_before = _memory_store_keys()
    sys.modules[module_name] = module  # functions defined here are importable by a worker
    try:
        for block in (b for b in _python_blocks() if b.page == page and b.marker is None):
            if block.file:
                path = tmp_path / block.file
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(block.code, encoding="utf-8")
                name = block.file.removesuffix(".py").replace("/", ".")
                sys.modules.pop(name, None)  # another page's module of the same name
                written.append(name)
                importlib.invalidate_caches()
                continue
            try:
                exec(compile(block.code, str(block), "exec"), module.__dict__)
            except BaseException as exc:
                exc.add_note(f"in the python block at {block}")
                raise
    finally:
        sys.modules.pop(module_name, None)
        for name in written:
            sys.modules.pop(name, None)
        _forget_memory_store(memory_before)


def test_some_examples_run() -> None:
    runnable = [b for b in _python_blocks() if b.marker is None and not b.file]
    assert len(runnable) >= 10, [str(b) for b in runnable]
    assert any(b.page == "README.md" for b in runnable)


# -- blocks marked not-run -----------------------------------------------------------------------
@pytest.mark.parametrize("block", _not_run(), ids=str)
def test_not_run_block_has_a_reason_and_compiles(block: Block) -> None:
    assert block.reason, f'{block}: write the reason: "<!-- not-run: needs S3 credentials -->"'
    compile(block.code, str(block), "exec")


def test_not_run_blocks_are_counted() -> None:
    listed = "\n".join(f"  {b}: {b.reason or '(no reason)'}" for b in _not_run())
    assert len(_not_run()) == EXPECTED_NOT_RUN, (
        f"{len(_not_run())} python blocks are marked not-run, EXPECTED_NOT_RUN is "
        f"{EXPECTED_NOT_RUN}:\n{listed}"
    )


def test_markers_stand_before_python_blocks() -> None:
    marked = {(b.page, b.line - 1) for b in _not_run()}
    stray = [
        f"{_name(page)}:{n}"
        for page in _pages()
        for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1)
        if "not-run" in line and line.lstrip().startswith("<!--") and (_name(page), n) not in marked
    ]
    assert not stray, f"not-run markers that are not on the line before a python fence: {stray}"


# -- size and links ------------------------------------------------------------------------------
def test_readme_is_short() -> None:
    size = len((ROOT / "README.md").read_bytes())
    assert size < README_LIMIT, f"README.md is {size} bytes; keep it under {README_LIMIT}"


def test_readme_starts_with_the_commands_block() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    first_block = _blocks(ROOT / "README.md")[0]
    assert first_block.lang == "bash"
    assert text.split("```", 1)[0].strip().startswith("# ")  # only the title comes before it


def _slugs(page: Path) -> set[str]:
    """Anchors of the headings (python-markdown's for mkdocs and GitHub's, when they agree),
    and of the objects that mkdocstrings renders (``::: omniq.core``)."""
    text = page.read_text(encoding="utf-8")
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    slugs: set[str] = set()
    for line in text.splitlines():
        if line.startswith(":::"):  # mkdocstrings: the object's dotted path is its anchor
            slugs.add(line.removeprefix(":::").strip())
            continue
        match = HEADING.match(line)
        if not match:
            continue
        title = re.sub(r"`([^`]*)`", r"\1", match.group(2))
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title)
        ascii_title = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode()
        mkdocs = re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", ascii_title).strip().lower())
        github = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        if mkdocs == github:
            slugs.add(mkdocs)
    return slugs


def _links(page: Path) -> list[str]:
    text = page.read_text(encoding="utf-8")
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    text = re.sub(r"`[^`\n]*`", "", text)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    return [m.group(1) for m in LINK.finditer(text)]


@pytest.mark.parametrize("page", [_name(p) for p in _pages()])
def test_relative_links_resolve(page: str) -> None:
    source = ROOT / page
    broken: list[str] = []
    for link in _links(source):
        if re.match(r"^[a-z][a-z0-9+.-]*:", link):  # https:, mailto:, ...
            continue
        path, _, anchor = link.partition("#")
        target = (source.parent / path).resolve() if path else source
        if not target.exists() or not target.resolve().is_relative_to(ROOT):
            broken.append(f"{link}: no such file")
        elif anchor and target.suffix == ".md" and anchor not in _slugs(target):
            broken.append(f"{link}: no heading #{anchor} in {target.relative_to(ROOT)}")
    assert not broken, f"{page}: broken links:\n  " + "\n  ".join(broken)


def test_every_docs_page_is_in_the_nav() -> None:
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    missing = [
        p.name
        for p in DOCS.glob("*.md")
        if not re.search(rf":\s*{re.escape(p.name)}\s*$", config, re.M)
    ]
    assert not missing, f"docs pages missing from mkdocs.yml's nav: {missing}"
