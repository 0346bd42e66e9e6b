#!/usr/bin/env python3
"""Bump one OmniQ distribution's version and re-pin it in its siblings.

    python tools/bump.py omniq-core 0.2.0 [--root DIR] [--dry-run]

* ``packages/<PACKAGE>/pyproject.toml``: ``[project] version = "..."`` is rewritten
  (the version must be static). If the leaf package's ``__init__.py`` contains a
  literal ``__version__ = "<old>"`` it is rewritten as well.
* Every ``packages/*/pyproject.toml``: each requirement on ``<PACKAGE>`` in
  ``[project] dependencies``, ``[project.optional-dependencies]`` and
  ``[dependency-groups]`` gets the compatible-release range for the new version,
  keeping extras and markers: ``omniq-file-queue[s3]>=0.1,<0.2`` becomes
  ``omniq-file-queue[s3]>=0.2,<0.3`` for 0.2.x; for 1.x and later the range is
  ``>=X.Y,<X+1``. Pre-releases use the full version as the lower bound.

Files are edited textually (formatting and comments are preserved) and re-read
with :mod:`tomllib` to verify the result. Nothing is committed.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

VERSION_RE = re.compile(
    r"^(?P<major>0|[1-9]\d*)\.(?P<minor>0|[1-9]\d*)(?:\.(?P<patch>0|[1-9]\d*))?"
    r"(?P<pre>(?:a|b|rc)\d+)?(?P<post>\.post\d+)?(?P<dev>\.dev\d+)?$"
)
# name [extras] specifier ; marker   (URL requirements, "name @ url", are left alone)
REQUIREMENT_RE = re.compile(
    r"^\s*(?P<name>[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)\s*"
    r"(?P<extras>\[[^\]]*\])?\s*"
    r"(?P<spec>[^;@]*?)\s*"
    r"(?P<marker>;.*)?$"
)
PROJECT_VERSION_RE = re.compile(r"""^(?P<pre>version\s*=\s*)(?P<q>["'])(?P<v>[^"']*)(?P=q)""", re.M)
SECTION_RE = re.compile(r"^\s*\[(?P<name>[^\[\]]+)\]\s*(?:#.*)?$", re.M)


class BumpError(Exception):
    pass


def normalize(name: str) -> str:
    """PEP 503 normalisation."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pin_for(version: str) -> str:
    """The specifier siblings use for ``version``: ``>=0.2,<0.3`` / ``>=1.4,<2``."""
    m = VERSION_RE.match(version)
    if not m:
        raise BumpError(f"not a supported version (X.Y[.Z][aN|bN|rcN][.postN][.devN]): {version!r}")
    major, minor = int(m["major"]), int(m["minor"])
    lower = version if (m["pre"] or m["dev"]) else f"{major}.{minor}"
    upper = f"0.{minor + 1}" if major == 0 else f"{major + 1}"
    return f">={lower},<{upper}"


def repin(requirement: str, package: str, spec: str) -> str | None:
    """``requirement`` with its specifier replaced if it names ``package``, else None."""
    m = REQUIREMENT_RE.match(requirement)
    if not m or normalize(m["name"]) != normalize(package):
        return None
    if "@" in requirement.split(";", 1)[0]:
        return None  # direct URL reference: leave alone
    start, end = m.span("spec")
    if start == end:  # no specifier: insert right after name/extras
        start = end = m.end("extras") if m["extras"] else m.end("name")
    return requirement[:start] + spec + requirement[end:]


def iter_requirements(data: dict[str, Any]) -> Iterator[str]:
    project = data.get("project", {})
    yield from project.get("dependencies", [])
    for reqs in project.get("optional-dependencies", {}).values():
        yield from reqs
    for reqs in data.get("dependency-groups", {}).values():
        yield from (r for r in reqs if isinstance(r, str))


def _section_spans(text: str) -> list[tuple[str, int, int]]:
    heads = [(m["name"].strip(), m.start(), m.end()) for m in SECTION_RE.finditer(text)]
    spans = []
    for i, (name, _start, body) in enumerate(heads):
        end = heads[i + 1][1] if i + 1 < len(heads) else len(text)
        spans.append((name, body, end))
    return spans


@dataclass
class Change:
    path: Path
    before: str
    after: str
    notes: list[str]


def set_project_version(path: Path, text: str, new_version: str) -> tuple[str, str]:
    """Return (new text, old version) with ``[project] version`` replaced."""
    data = tomllib.loads(text)
    project = data.get("project")
    if not isinstance(project, dict) or "version" not in project:
        raise BumpError(f"{path}: no static [project] version (is it dynamic?)")
    old = str(project["version"])
    for name, start, end in _section_spans(text):
        if name != "project":
            continue
        body = text[start:end]
        new_body, n = PROJECT_VERSION_RE.subn(
            lambda m: f"{m['pre']}{m['q']}{new_version}{m['q']}", body, count=1
        )
        if n:
            return text[:start] + new_body + text[end:], old
    raise BumpError(f"{path}: could not find `version = ...` in the [project] table")


def repin_text(path: Path, text: str, package: str, spec: str) -> tuple[str, list[str]]:
    """Rewrite every requirement string on ``package`` in ``text``."""
    data = tomllib.loads(text)
    rewrites: dict[str, str] = {}
    for req in iter_requirements(data):
        new = repin(req, package, spec)
        if new is not None and new != req:
            rewrites[req] = new
    if not rewrites:
        return text, []

    out_lines = []
    for line in text.splitlines(keepends=True):
        if not re.match(r"\s*name\s*=", line):
            for old, new in rewrites.items():
                for q in ('"', "'"):
                    line = line.replace(f"{q}{old}{q}", f"{q}{new}{q}")
        out_lines.append(line)
    new_text = "".join(out_lines)

    # Verify: every requirement on `package` now carries the new specifier.
    expected = sorted(rewrites.get(r, r) for r in iter_requirements(data))
    actual = sorted(iter_requirements(tomllib.loads(new_text)))
    if expected != actual:
        raise BumpError(f"{path}: textual rewrite did not produce the expected requirements")
    return new_text, [f"{old!r} -> {new!r}" for old, new in rewrites.items()]


def _leaf_init(pkg_dir: Path, data: dict[str, Any]) -> Path | None:
    wheel = (
        data.get("tool", {}).get("hatch", {}).get("build", {}).get("targets", {}).get("wheel", {})
    )
    includes = wheel.get("only-include", [])
    if len(includes) == 1:
        init = pkg_dir / str(includes[0]) / "__init__.py"
        if init.is_file():
            return init
    return None


def plan(root: Path, package: str, new_version: str) -> list[Change]:
    packages_dir = root / "packages"
    manifests = sorted(packages_dir.glob("*/pyproject.toml"))
    if not manifests:
        raise BumpError(f"no packages/*/pyproject.toml under {root}")

    target = None
    for manifest in manifests:
        name = tomllib.loads(manifest.read_text(encoding="utf-8")).get("project", {}).get("name")
        if manifest.parent.name == package or (name and normalize(name) == normalize(package)):
            target = manifest
            break
    if target is None:
        known = ", ".join(m.parent.name for m in manifests)
        raise BumpError(f"unknown package {package!r}; known: {known}")

    spec = pin_for(new_version)
    dist_name = tomllib.loads(target.read_text(encoding="utf-8"))["project"]["name"]
    changes: list[Change] = []
    old_version = None
    for manifest in manifests:
        before = manifest.read_text(encoding="utf-8")
        after, notes = before, []
        if manifest == target:
            after, old_version = set_project_version(manifest, after, new_version)
            notes.append(f"version {old_version} -> {new_version}")
        after, pin_notes = repin_text(manifest, after, dist_name, spec)
        notes.extend(pin_notes)
        if after != before:
            changes.append(Change(manifest, before, after, notes))

    init = _leaf_init(target.parent, tomllib.loads(target.read_text(encoding="utf-8")))
    if init is not None and old_version is not None:
        before = init.read_text(encoding="utf-8")
        pattern = re.compile(
            rf"""^(__version__\s*(?::\s*str\s*)?=\s*)(["']){re.escape(old_version)}\2""", re.M
        )
        after = pattern.sub(lambda m: f"{m[1]}{m[2]}{new_version}{m[2]}", before, count=1)
        if after != before:
            changes.append(Change(init, before, after, [f"__version__ -> {new_version}"]))
    return changes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Bump an OmniQ package version and re-pin it in sibling packages."
    )
    parser.add_argument(
        "package", help="distribution (or packages/ directory) name, e.g. omniq-core"
    )
    parser.add_argument("version", help="new version, e.g. 0.2.0")
    parser.add_argument(
        "--root", type=Path, default=ROOT, help="repository root (default: this repo)"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="show what would change, write nothing"
    )
    args = parser.parse_args(argv)

    try:
        changes = plan(args.root.resolve(), args.package, args.version)
    except (BumpError, OSError, tomllib.TOMLDecodeError) as exc:
        print(f"bump: error: {exc}", file=sys.stderr)
        return 1

    for change in changes:
        if not args.dry_run:
            change.path.write_text(change.after, encoding="utf-8")
        try:
            shown = change.path.relative_to(args.root.resolve())
        except ValueError:
            shown = change.path
        print(f"{'would update' if args.dry_run else 'updated'} {shown}")
        for note in change.notes:
            print(f"    {note}")
    if not changes:
        print("nothing to change")
    return 0


if __name__ == "__main__":
    sys.exit(main())
