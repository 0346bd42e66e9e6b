#!/usr/bin/env python3
"""Release one OmniQ distribution: new version, sibling pins, dated changelog entry.

    python tools/bump.py PACKAGE VERSION [--dry-run] [--allow-empty] [--date YYYY-MM-DD] [--root DIR]
    python tools/bump.py --check [--root DIR]

Each distribution writes its version once: the ``__version__ = "..."`` line of its
leaf ``__init__.py``. Its ``pyproject.toml`` says ``dynamic = ["version"]`` and
points hatchling's regex version source at that file (``[tool.hatch.version]
path``). A bump, e.g. ``python tools/bump.py omniq-file-queue 0.2.0``:

* rewrites that ``__version__`` line (the new version must be greater);
* re-pins every requirement on the package in ``packages/*/pyproject.toml``
  (``[project] dependencies``, ``[project.optional-dependencies]``,
  ``[dependency-groups]``) to the compatible-release range, keeping extras and
  markers: ``omniq-file-queue[s3]>=0.1,<0.2`` becomes ``omniq-file-queue[s3]>=0.2,<0.3``
  for 0.2.x; for 1.x and later the range is ``>=X.Y,<X+1``; pre-releases use the
  full version as the lower bound. Each re-pinned sibling gets an "Unreleased"
  entry in its changelog saying so;
* moves the entries under ``## Unreleased`` of ``packages/<PACKAGE>/CHANGELOG.md``
  under a new ``## VERSION (DATE)`` heading. With nothing under Unreleased it
  refuses, unless ``--allow-empty``.

Every edit is computed and verified first; on any error nothing is written.
``--check`` reports what breaks these rules in the tree as it is (exit status 1).
Nothing is committed.
"""

from __future__ import annotations

import argparse
import datetime
import re
import sys
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CHANGELOG = "CHANGELOG.md"

VERSION_RE = re.compile(
    r"^(?P<major>0|[1-9]\d*)\.(?P<minor>0|[1-9]\d*)(?:\.(?P<patch>0|[1-9]\d*))?"
    r"(?:(?P<phase>a|b|rc)(?P<pre>\d+))?(?:\.post(?P<post>\d+))?(?:\.dev(?P<dev>\d+))?$"
)
# name [extras] specifier ; marker   (URL requirements, "name @ url", are left alone)
REQUIREMENT_RE = re.compile(
    r"^\s*(?P<name>[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)\s*"
    r"(?P<extras>\[[^\]]*\])?\s*"
    r"(?P<spec>[^;@]*?)\s*"
    r"(?P<marker>;.*)?$"
)
#: hatchling's default pattern for the regex version source (hatchling.version.core).
HATCH_VERSION_PATTERN = r"""(?i)^(__version__|VERSION) *= *(['"])v?(?P<version>.+?)\2"""
UNRELEASED_RE = re.compile(r"^## Unreleased[ \t]*$", re.M)
HEADING_RE = re.compile(r"^## ", re.M)
COMMENT_RE = re.compile(r"<!--.*?-->", re.S)


class BumpError(Exception):
    pass


def normalize(name: str) -> str:
    """PEP 503 normalisation."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _parse_version(version: str) -> re.Match[str]:
    m = VERSION_RE.match(version)
    if not m:
        raise BumpError(f"not a supported version (X.Y[.Z][aN|bN|rcN][.postN][.devN]): {version!r}")
    return m


def version_key(version: str) -> tuple[int, ...]:
    """A sort key following PEP 440 for the versions :data:`VERSION_RE` accepts."""
    m = _parse_version(version)
    release = (int(m["major"]), int(m["minor"]), int(m["patch"] or 0))
    if m["phase"]:
        pre = ("a", "b", "rc").index(m["phase"]), int(m["pre"])
    elif m["dev"] is not None and m["post"] is None:
        pre = -1, 0  # X.Y.devN comes before X.YaN
    else:
        pre = 3, 0  # a final release comes after its pre-releases
    post = int(m["post"]) if m["post"] is not None else -1
    dev = int(m["dev"]) if m["dev"] is not None else sys.maxsize
    return (*release, *pre, post, dev)


def pin_for(version: str) -> str:
    """The specifier siblings use for ``version``: ``>=0.2,<0.3`` / ``>=1.4,<2``."""
    m = _parse_version(version)
    major, minor = int(m["major"]), int(m["minor"])
    lower = version if (m["phase"] or m["dev"]) else f"{major}.{minor}"
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


def repin_text(path: Path, text: str, package: str, spec: str) -> tuple[str, list[str]]:
    """Rewrite every requirement string on ``package`` in ``text`` (a pyproject.toml)."""
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


# --------------------------------------------------------------------------- #
# the version source
# --------------------------------------------------------------------------- #


@dataclass
class Package:
    dir: Path
    name: str  # distribution name, e.g. omniq-file-queue
    data: dict[str, Any]
    version_file: Path
    version: str
    #: (start, end) of the version string in ``version_file``'s text
    span: tuple[int, int]
    #: the name hatchling's pattern matched (``__version__`` unless a custom pattern)
    variable: str

    @property
    def manifest(self) -> Path:
        return self.dir / "pyproject.toml"

    @property
    def changelog(self) -> Path:
        return self.dir / CHANGELOG


def read_version(path: Path, pattern: str = "") -> tuple[str, tuple[int, int], str]:
    """(version, its span, variable name) as hatchling's regex source reads ``path``."""
    text = path.read_text(encoding="utf-8")
    m = re.search(pattern or HATCH_VERSION_PATTERN, text, flags=re.M)
    if not m or "version" not in m.groupdict():
        raise BumpError(f"{path}: no version line (hatchling pattern {pattern or 'default'})")
    groups = m.groups()
    return m["version"], m.span("version"), str(groups[0]) if groups else ""


def load_package(pkg_dir: Path) -> Package:
    """The package in ``pkg_dir``; a :class:`BumpError` unless its version is single-sourced."""
    manifest = pkg_dir / "pyproject.toml"
    data = tomllib.loads(manifest.read_text(encoding="utf-8"))
    project = data.get("project", {})
    name = project.get("name")
    if not isinstance(name, str):
        raise BumpError(f"{manifest}: no [project] name")
    if "version" in project:
        raise BumpError(
            f'{manifest}: static [project] version; use dynamic = ["version"] and '
            "[tool.hatch.version] path = the leaf __init__.py"
        )
    if "version" not in project.get("dynamic", []):
        raise BumpError(f'{manifest}: [project] dynamic does not list "version"')
    config = data.get("tool", {}).get("hatch", {}).get("version", {})
    if config.get("source", "regex") != "regex" or not isinstance(config.get("path"), str):
        raise BumpError(f"{manifest}: [tool.hatch.version] needs path = (regex source)")
    version_file = pkg_dir / config["path"]
    if not version_file.is_file():
        raise BumpError(f"{manifest}: [tool.hatch.version] path {config['path']} does not exist")
    version, span, variable = read_version(version_file, config.get("pattern", ""))
    return Package(pkg_dir, name, data, version_file, version, span, variable)


def find_package_dirs(root: Path) -> list[Path]:
    dirs = sorted(p.parent for p in (root / "packages").glob("*/pyproject.toml"))
    if not dirs:
        raise BumpError(f"no packages/*/pyproject.toml under {root}")
    return dirs


def find_target(dirs: list[Path], package: str) -> Path:
    for pkg_dir in dirs:
        data = tomllib.loads((pkg_dir / "pyproject.toml").read_text(encoding="utf-8"))
        name = data.get("project", {}).get("name")
        if pkg_dir.name == package or (name and normalize(name) == normalize(package)):
            return pkg_dir
    known = ", ".join(d.name for d in dirs)
    raise BumpError(f"unknown package {package!r}; known: {known}")


# --------------------------------------------------------------------------- #
# changelogs
# --------------------------------------------------------------------------- #


def _unreleased(path: Path, text: str) -> tuple[int, int]:
    """(start, end) of the body under ``## Unreleased`` (up to the next ``## `` heading)."""
    m = UNRELEASED_RE.search(text)
    if not m:
        raise BumpError(f"{path}: no '## Unreleased' heading")
    nxt = HEADING_RE.search(text, m.end())
    return m.end(), nxt.start() if nxt else len(text)


def release_changelog(
    path: Path, text: str, version: str, date: str, *, allow_empty: bool
) -> tuple[str, int]:
    """``text`` with the Unreleased entries moved under ``## version (date)``; and how
    many top-level entries moved."""
    if re.search(rf"^## {re.escape(version)}\b", text, re.M):
        raise BumpError(f"{path}: already has a '## {version}' section")
    start, end = _unreleased(path, text)
    body = text[start:end]
    comments = COMMENT_RE.findall(body)
    entries = COMMENT_RE.sub("", body).strip("\n")
    if not entries.strip():
        if not allow_empty:
            raise BumpError(
                f"{path}: nothing under '## Unreleased'; add what changed there "
                "(see CONTRIBUTING.md) or pass --allow-empty"
            )
        entries = "- No changes of its own."
    kept = "".join(f"\n{c}\n" for c in comments)
    section = f"\n{kept}\n## {version} ({date})\n\n{entries}\n\n"
    count = len(re.findall(r"^[-*] ", entries, re.M))
    rest = text[end:].lstrip("\n")
    return text[:start] + (section if rest else section[:-1]) + rest, count


def add_unreleased_entry(path: Path, text: str, entry: str) -> str:
    """``text`` with ``- entry`` appended to the Unreleased entries."""
    start, end = _unreleased(path, text)
    body = text[start:end].rstrip("\n") or "\n"  # a blank line after the heading
    rest = text[end:]
    gap = "\n" if rest else ""  # and before the next one
    return f"{text[:start]}{body}\n- {entry}\n{gap}{rest}"


# --------------------------------------------------------------------------- #
# planning and checking
# --------------------------------------------------------------------------- #


@dataclass
class Change:
    path: Path
    before: str
    after: str
    notes: list[str] = field(default_factory=list)


def plan(
    root: Path,
    package: str,
    new_version: str,
    *,
    date: str | None = None,
    allow_empty: bool = False,
) -> list[Change]:
    """Every edit the bump makes (nothing written). Raises :class:`BumpError`."""
    date = date or datetime.date.today().isoformat()
    dirs = find_package_dirs(root)
    target = load_package(find_target(dirs, package))
    spec = pin_for(new_version)  # validates the version
    if version_key(new_version) <= version_key(target.version):
        raise BumpError(
            f"{target.name} is at {target.version}; the new version {new_version} must be greater"
        )
    changes: list[Change] = []

    # 1. the single version source
    before = target.version_file.read_text(encoding="utf-8")
    start, end = target.span
    after = before[:start] + new_version + before[end:]
    changes.append(
        Change(target.version_file, before, after, [f"version {target.version} -> {new_version}"])
    )

    # 2. the changelog entry
    if not target.changelog.is_file():
        raise BumpError(f"{target.changelog}: missing")
    before = target.changelog.read_text(encoding="utf-8")
    after, n = release_changelog(
        target.changelog, before, new_version, date, allow_empty=allow_empty
    )
    changes.append(
        Change(
            target.changelog,
            before,
            after,
            [f"## {new_version} ({date}): {n} entr{'y' if n == 1 else 'ies'}"],
        )
    )

    # 3. siblings' requirements (+ a line in their changelogs)
    for pkg_dir in dirs:
        manifest = pkg_dir / "pyproject.toml"
        before = manifest.read_text(encoding="utf-8")
        after, notes = repin_text(manifest, before, target.name, spec)
        if after == before:
            continue
        changes.append(Change(manifest, before, after, notes))
        changelog = pkg_dir / CHANGELOG
        if not changelog.is_file():
            raise BumpError(f"{changelog}: missing")
        before = changelog.read_text(encoding="utf-8")
        line = f"Requires `{target.name}{spec}` ({target.name} {new_version})."
        changes.append(
            Change(changelog, before, add_unreleased_entry(changelog, before, line), [line])
        )

    # Verify what hatchling will read, before anything is written.
    written = {c.path: c.after for c in changes}
    pattern = target.data.get("tool", {}).get("hatch", {}).get("version", {}).get("pattern", "")
    m = re.search(pattern or HATCH_VERSION_PATTERN, written[target.version_file], flags=re.M)
    if not m or m["version"] != new_version:
        raise BumpError(f"{target.version_file}: rewrite did not yield version {new_version}")
    return changes


def check(root: Path) -> list[str]:
    """What breaks the release rules in the tree under ``root`` (empty = fine)."""
    problems: list[str] = []
    packages: list[Package] = []
    for pkg_dir in find_package_dirs(root):
        try:
            packages.append(load_package(pkg_dir))
        except (BumpError, OSError, tomllib.TOMLDecodeError) as exc:
            problems.append(str(exc))
    versions = {normalize(p.name): p.version for p in packages}
    for pkg in packages:
        if pkg.variable != "__version__":
            problems.append(f"{pkg.version_file}: hatchling reads {pkg.variable}, not __version__")
        try:
            text = pkg.changelog.read_text(encoding="utf-8")
            _unreleased(pkg.changelog, text)
            if not re.search(rf"^## {re.escape(pkg.version)} \(\d{{4}}-\d\d-\d\d\)", text, re.M):
                problems.append(f"{pkg.changelog}: no '## {pkg.version} (YYYY-MM-DD)' section")
        except (BumpError, OSError) as exc:
            problems.append(str(exc))
        for req in iter_requirements(pkg.data):
            m = REQUIREMENT_RE.match(req)
            if not m or normalize(m["name"]) not in versions or "@" in req.split(";", 1)[0]:
                continue
            try:
                expected = pin_for(versions[normalize(m["name"])])
            except BumpError as exc:
                problems.append(f"{pkg.version_file}: {exc}")
                continue
            if m["spec"].replace(" ", "") != expected:
                problems.append(f"{pkg.manifest}: {req!r} should pin {expected}")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Bump an OmniQ package version, re-pin it in sibling packages and "
        "date its changelog entries."
    )
    parser.add_argument(
        "package", nargs="?", help="distribution (or packages/ directory) name, e.g. omniq-core"
    )
    parser.add_argument("version", nargs="?", help="new version, e.g. 0.2.0")
    parser.add_argument(
        "--root", type=Path, default=ROOT, help="repository root (default: this repo)"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="show what would change, write nothing"
    )
    parser.add_argument(
        "--allow-empty",
        action="store_true",
        help="release even with nothing under '## Unreleased' in the changelog",
    )
    parser.add_argument("--date", help="release date YYYY-MM-DD (default: today)")
    parser.add_argument(
        "--check",
        action="store_true",
        help="only report what breaks the versioning rules (no PACKAGE/VERSION)",
    )
    args = parser.parse_args(argv)
    root = args.root.resolve()

    if args.check:
        if args.package or args.version:
            parser.error("--check takes no PACKAGE or VERSION")
        try:
            problems = check(root)
        except BumpError as exc:
            problems = [str(exc)]
        for problem in problems:
            print(f"bump: {problem}", file=sys.stderr)
        if not problems:
            print("versions, pins and changelogs are consistent")
        return 1 if problems else 0

    if not (args.package and args.version):
        parser.error("PACKAGE and VERSION are required (or --check)")
    if args.date is not None and not re.fullmatch(r"\d{4}-\d\d-\d\d", args.date):
        parser.error(f"--date must be YYYY-MM-DD, not {args.date!r}")
    try:
        changes = plan(
            root, args.package, args.version, date=args.date, allow_empty=args.allow_empty
        )
    except (BumpError, OSError, tomllib.TOMLDecodeError) as exc:
        print(f"bump: error: {exc}", file=sys.stderr)
        return 1

    for change in changes:
        if not args.dry_run:
            change.path.write_text(change.after, encoding="utf-8")
        try:
            shown: Path = change.path.relative_to(root)
        except ValueError:
            shown = change.path
        print(f"{'would update' if args.dry_run else 'updated'} {shown}")
        for note in change.notes:
            print(f"    {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
