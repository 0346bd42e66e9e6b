"""mkdocs hook: links from docs/ to repository files outside it (``../benchmarks/README.md``).

Such links work where the Markdown is read in the repository, but the site holds only docs/.
For each one this hook checks that the target exists (a missing one is a warning, which fails
``mkdocs build --strict``) and shows the link as the file's repository path in code font.
Links inside docs/ are left to mkdocs' own validation.
"""

from __future__ import annotations

import logging
import posixpath
import re
from pathlib import Path
from typing import Any

log = logging.getLogger("mkdocs.hooks.repo_links")

# [text](target) and [text](target#anchor); not images, URLs or absolute paths.
LINK = re.compile(r"(?<!!)\[(?P<text>[^\]]+)\]\((?P<target>[^)\s#:]+)(?P<anchor>#[^)\s]*)?\)")


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    docs_dir = Path(config["docs_dir"]).resolve()
    page_dir = posixpath.dirname(page.file.src_uri)

    def replace(match: re.Match[str]) -> str:
        target = match.group("target")
        inside = posixpath.normpath(posixpath.join(page_dir, target))
        if target.startswith("/") or not inside.startswith("../"):
            return match.group(0)  # absolute, or inside docs/: mkdocs validates it
        path = (docs_dir / page_dir / target).resolve()
        try:
            shown = path.relative_to(docs_dir.parent).as_posix()
        except ValueError:
            shown = target
        if not path.exists():
            log.warning("%s links to %s, which does not exist", page.file.src_uri, shown)
            return match.group(0)
        text = match.group("text")
        return f"`{shown}`" if text.strip("`") == shown else f"{text} (`{shown}`)"

    return LINK.sub(replace, markdown)
