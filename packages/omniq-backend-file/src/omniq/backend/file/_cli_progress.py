"""Progress on a terminal: a text bar (``bar``) and a live display for long CLI work
(``LiveProgress``), drawn on stderr only when it is a terminal and the output is not JSON."""

from __future__ import annotations

import math
import shutil
import sys
import time
from types import TracebackType
from typing import TextIO

FULL, EMPTY = "█", "░"
PARTIAL = " ▏▎▍▌▋▊▉"  # eighths of a cell, so that a small step still moves the bar
DELAY = 0.3  # seconds of work before the display appears (a quick command shows nothing)
INTERVAL = 0.1  # seconds between redraws


def bar(fraction: float, width: int = 30, *, ascii: bool = False) -> str:
    """A bar ``width`` cells wide, filled to ``fraction`` (clamped to 0..1; NaN counts as 0).
    Rounded down: the bar is full only when the work is done. ``ascii=True`` draws with
    ``#`` and ``-`` (for terminals that cannot show block characters).

    >>> bar(0.5, 10)
    '█████░░░░░'
    >>> bar(0.25, 8, ascii=True)
    '##------'
    """
    if width < 1:
        raise ValueError(f"width must be at least 1, got {width}")
    if math.isnan(fraction):
        fraction = 0.0
    fraction = min(1.0, max(0.0, fraction))
    if ascii:
        full = math.floor(fraction * width)
        return "#" * full + "-" * (width - full)
    full, part = divmod(math.floor(fraction * width * 8), 8)
    text = FULL * full + (PARTIAL[part] if part else "")
    return text + EMPTY * (width - len(text))


class LiveProgress:
    """A one-line progress display redrawn in place (``\\r``) on ``stream``.

    Nothing is drawn when disabled (not a terminal, ``--json``), nor before ``delay``
    seconds have passed (a quick command never flashes a bar); redraws are at most one per
    ``interval`` seconds, so a tight loop of ``advance()`` costs a clock read each. The line
    is erased on exit, leaving the terminal as it was for the command's own output.
    """

    def __init__(
        self,
        label: str,
        total: int | None = None,
        *,
        stream: TextIO | None = None,
        enabled: bool = True,
        delay: float | None = None,
        interval: float | None = None,
    ) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled
        self.delay = DELAY if delay is None else delay
        self.interval = INTERVAL if interval is None else interval
        self.drawn = False
        self._start = time.monotonic()
        self._next = self._start + self.delay

    def __enter__(self) -> LiveProgress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def advance(self, count: int = 1, *, label: str | None = None) -> None:
        """Count ``count`` more items done (and optionally change the label)."""
        self.done += count
        if label is not None:
            self.label = label
        if self.enabled and time.monotonic() >= self._next:
            self.draw()

    def draw(self) -> None:
        """Redraw now (``advance`` calls it when due)."""
        self._next = time.monotonic() + self.interval
        columns = shutil.get_terminal_size().columns
        self._write("\r" + self.line()[: max(1, columns - 1)] + "\033[K")  # no wrap
        self.drawn = True

    def line(self) -> str:
        """The text of the display: label, bar and counts (without a total: the count)."""
        elapsed = time.monotonic() - self._start
        if self.total:
            fraction = self.done / self.total
            return (
                f"{self.label} {bar(fraction, 30, ascii=not self._unicode())} "
                f"{self.done}/{self.total} {fraction:4.0%} {elapsed:.0f}s"
            )
        return f"{self.label} {self.done} {elapsed:.0f}s"

    def close(self) -> None:
        """Erase the line if it was drawn."""
        if self.drawn:
            self._write("\r\033[K")
            self.drawn = False

    def _unicode(self) -> bool:
        try:
            (FULL + EMPTY + PARTIAL).encode(self.stream.encoding or "ascii")
        except (LookupError, UnicodeEncodeError):
            return False
        return True

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # the terminal went away: the work goes on
            self.enabled = False


def live(label: str, total: int | None = None, *, json: bool = False) -> LiveProgress:
    """A ``LiveProgress`` on stderr, enabled only when stderr is a terminal and the output is
    not JSON (a pipe, a log file or a script never sees it)."""
    stream = sys.stderr
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    return LiveProgress(label, total, stream=stream, enabled=tty and not json)
