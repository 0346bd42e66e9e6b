"""Progress on long CLI work: the text bar, the live display, and that only a terminal sees it
(never a pipe, never ``--json``)."""

from __future__ import annotations

import io
import json
import os
import pty
import select
import sys
import time
from pathlib import Path
from typing import TextIO

import pytest

from omniq.backend.file import FileBackend, _cli_progress
from omniq.backend.file._cli_progress import LiveProgress, bar, live
from omniq.backend.file.cli import main


def test_bar_fills_in_proportion_and_only_when_done():
    assert bar(0.0, 10) == "░" * 10
    assert bar(0.5, 10) == "█" * 5 + "░" * 5
    assert bar(1.0, 10) == "█" * 10
    assert bar(0.999, 10) != bar(1.0, 10)  # rounded down: full means done
    assert bar(0.05, 10) == "▌" + "░" * 9  # half a cell: a small step still shows
    assert bar(2.0, 4) == bar(1.0, 4) and bar(-1.0, 4) == bar(0.0, 4)
    assert bar(float("nan"), 4) == bar(0.0, 4)
    assert all(len(bar(i / 97, 7)) == 7 for i in range(98))
    assert len(bar(0.3)) == 30  # the default width
    assert bar(0.25, 8, ascii=True) == "##------"
    with pytest.raises(ValueError, match="width"):
        bar(0.5, 0)


class FakeTerminal(io.StringIO):
    def __init__(self, tty: bool, encoding: str = "utf-8") -> None:
        super().__init__()
        self.tty = tty
        self._encoding = encoding

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._encoding

    def isatty(self) -> bool:
        return self.tty


def test_live_progress_redraws_in_place_and_erases_itself():
    stream = FakeTerminal(tty=True)
    with LiveProgress("requeue", 4, stream=stream, delay=0, interval=0) as progress:
        progress.advance()
        progress.advance(2)
        assert stream.getvalue().count("\r") == 2
        assert "requeue" in stream.getvalue() and "3/4" in stream.getvalue()
        assert "\n" not in stream.getvalue()  # one line, redrawn
    assert stream.getvalue().endswith("\r\033[K")  # erased: the command's output starts clean


def test_live_progress_waits_before_drawing_and_without_total_counts():
    stream = FakeTerminal(tty=True)
    with LiveProgress("scan", stream=stream, delay=3600) as progress:
        progress.advance(5)
    assert stream.getvalue() == ""  # a quick command never flashes a bar
    with LiveProgress("scan", stream=stream, delay=0, interval=0) as progress:
        progress.advance(5)
        assert "scan 5 " in stream.getvalue()


def test_ascii_bar_when_the_terminal_cannot_encode_blocks():
    stream = FakeTerminal(tty=True, encoding="ascii")
    with LiveProgress("x", 2, stream=stream, delay=0, interval=0) as progress:
        progress.advance()
        assert "###############---------------" in stream.getvalue()


@pytest.mark.parametrize(
    ("tty", "as_json", "enabled"), [(True, False, True), (False, False, False), (True, True, False)]
)
def test_live_is_enabled_only_on_a_terminal_without_json(monkeypatch, tty, as_json, enabled):
    monkeypatch.setattr(sys, "stderr", FakeTerminal(tty=tty))
    assert live("x", json=as_json).enabled is enabled


# -- the omniq command ----------------------------------------------------------------------------
DEAD = 12


@pytest.fixture
def dead_dir(tmp_path: Path) -> Path:
    """A local queue with DEAD dead-lettered tasks (their function does not exist)."""
    base = tmp_path / "q"
    with FileBackend(str(base)) as backend:
        for i in range(DEAD):
            backend.enqueue("no_such_module_here:f", [i], max_retries=0)
        backend.worker(burst=True, idle_timeout=0.05).run()
        assert backend.queue.size("default").dead == DEAD
    return base


@pytest.fixture
def instant(monkeypatch):
    """Draw from the first item on, every time (the command is quicker than the delay)."""
    monkeypatch.setattr(_cli_progress, "DELAY", 0.0)
    monkeypatch.setattr(_cli_progress, "INTERVAL", 0.0)


def _on_pty(monkeypatch) -> tuple[int, TextIO]:
    """stderr becomes the slave side of a pseudo-terminal; returns the master fd."""
    master, slave = pty.openpty()
    stream = os.fdopen(slave, "w", encoding="utf-8")
    monkeypatch.setattr(sys, "stderr", stream)
    return master, stream


def _read_all(master: int) -> str:
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 0.2)
        if not ready:
            return b"".join(chunks).decode("utf-8", "replace")
        chunks.append(os.read(master, 65536))


def test_dead_requeue_shows_a_bar_on_a_terminal(monkeypatch, capsys, dead_dir, instant):
    master, stream = _on_pty(monkeypatch)
    try:
        assert main(["dead", str(dead_dir), "--requeue"], environ={}) == 0
        stream.flush()
        drawn = _read_all(master)
    finally:
        stream.close()
        os.close(master)
    assert "requeue" in drawn and f"{DEAD}/{DEAD}" in drawn and "█" in drawn
    assert drawn.endswith("\r\033[K")  # erased before the command's own output
    out = capsys.readouterr().out
    assert out == f"requeued {DEAD} task(s)\n"  # stdout carries the result only
    with FileBackend(str(dead_dir)) as backend:
        assert backend.queue.size("default").ready == DEAD


def test_json_output_on_a_terminal_has_no_bar(monkeypatch, capsys, dead_dir, instant):
    master, stream = _on_pty(monkeypatch)
    try:
        assert main(["dead", str(dead_dir), "--requeue", "--json"], environ={}) == 0
        stream.flush()
        drawn = _read_all(master)
    finally:
        stream.close()
        os.close(master)
    assert drawn == ""
    assert json.loads(capsys.readouterr().out) == {"requeued": DEAD}


def test_piped_output_has_no_bar(capsys, dead_dir, instant):
    assert main(["dead", str(dead_dir)], environ={}) == 0  # capsys: stderr is not a terminal
    captured = capsys.readouterr()
    assert captured.err == "" and "\r" not in captured.out
    assert captured.out.count("no_such_module_here") == DEAD


def test_cleanup_shows_a_bar_on_a_terminal_and_reports_what_it_removed(
    monkeypatch, capsys, tmp_path, instant
):
    base = tmp_path / "c"
    with FileBackend(str(base), events=True, result_ttl=0.01) as backend:
        for queue in ("a", "b"):
            backend.enqueue("no_such_module_here:f", queue=queue, max_retries=0)
        backend.worker(["a", "b"], burst=True, idle_timeout=0.05).run()
    time.sleep(0.05)  # the results' 10 ms time-to-live is over
    master, stream = _on_pty(monkeypatch)
    try:
        args = ["cleanup", str(base), "--events-older-than", "0", "--sweep"]
        assert main(args, environ={}) == 0
        stream.flush()
        drawn = _read_all(master)
    finally:
        stream.close()
        os.close(master)
    # Two queues, the queue's sweep, results and events: five steps. The results expired
    # 10 ms after they were written, but their expiry markers' hour has not begun: only the
    # sweep (which reads every result) finds them.
    assert "5/5" in drawn and "█" in drawn and drawn.endswith("\r\033[K")
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == [
        "a: repair redid 0 interrupted step(s)",
        "b: repair redid 0 interrupted step(s)",
    ]
    assert out[2] == "results: removed 2 expired"
    removed = int(out[3].split()[2])
    assert out[3] == f"events: removed {removed} old" and removed >= 6  # 3 events per task
    with FileBackend(str(base), events=True) as backend:
        assert backend.events is not None and backend.events.query() == []
