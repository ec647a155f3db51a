"""A one-line progress bar for long commands (build, extract, prefetch).

``Progress`` draws on its stream (stderr by default) only when that stream is a terminal,
at most every ``interval`` seconds, and is silent otherwise, so logs and pipes never see
carriage returns. It counts bytes: ``advance(n)`` may be called from any thread. With a
known ``total`` it shows a bar, a percentage and an ETA; without one, the count and the
rate. The rate is measured over the last few seconds, not since the start. Sizes are
decimal (``format_bytes``: 1 MB = 1,000,000 bytes), everywhere ocixfs shows one.
"""

from __future__ import annotations

import math
import shutil
import sys
import threading
import time
from collections import deque
from types import TracebackType
from typing import TextIO

__all__ = ["Progress", "format_bytes", "format_duration"]

DEFAULT_INTERVAL = 0.2
RATE_WINDOW = 5.0
RATE_MIN_SECONDS = 1.0
_BYTES_WIDTH = 7  # "999 MB", "9.99 GB", "99.9 kB": format_bytes is at most this wide
_ETA_WIDTH = 11  # "ETA 1:02:05"
_BAR_MIN, _BAR_MAX = 10, 40


def format_bytes(n: float) -> str:
    """``n`` bytes in decimal units, about three figures: ``"812 B"``, ``"16.0 MB"``. The
    one way ocixfs shows a size (progress bars, summaries, ``stats``, ``cache``, logs)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 999.5 or unit == "TB":
            break
        n /= 1000
    if unit == "B":
        return f"{int(n)} B"
    decimals = 2 if abs(n) < 9.995 else 1 if abs(n) < 99.95 else 0
    return f"{n:.{decimals}f} {unit}"


def format_duration(seconds: float) -> str:
    """``seconds`` as ``m:ss`` or ``h:mm:ss``."""
    seconds = max(0, int(seconds + 0.5))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """A thread-safe byte counter that redraws one terminal line now and then.

    Use as a context manager (``close()`` clears the line)::

        with Progress("building", total=size) as progress:
            progress.advance(len(piece))
    """

    def __init__(self, label: str, *, total: int | None = None, stream: TextIO | None = None,
                 interval: float = DEFAULT_INTERVAL, enabled: bool | None = None) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.detail = ""
        self._stream = stream if stream is not None else sys.stderr
        if enabled is None:
            enabled = _isatty(self._stream)
        self.enabled = enabled
        self._interval = interval
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._last_draw = float("-inf")
        self._samples: deque[tuple[float, int]] = deque([(self._started, 0)])
        self._drawn_width = 0

    def advance(self, n: int) -> None:
        """Count ``n`` more bytes done; redraw if the last redraw is old enough."""
        with self._lock:
            self.done += n
            self._maybe_draw()

    def set_total(self, total: int | None) -> None:
        with self._lock:
            self.total = total
            self._maybe_draw()

    def set_detail(self, detail: str) -> None:
        """A short text shown after the numbers (the current layer, say)."""
        with self._lock:
            self.detail = detail
            self._maybe_draw()

    def close(self) -> None:
        """Erase the line (if anything was drawn)."""
        with self._lock:
            if self.enabled and self._drawn_width:
                self._stream.write("\r" + " " * self._drawn_width + "\r")
                self._stream.flush()
            self._drawn_width = 0
            self.enabled = False

    def render(self, width: int) -> str:
        """The text of the line for a terminal ``width`` columns wide (without ``\\r``).

        Every number has a fixed width, so the bar neither moves nor changes length while
        the numbers change: the percentage is rounded down (``100%`` and a full bar only
        when done), rate and ETA stay blank until ``RATE_MIN_SECONDS`` of progress
        measured a rate, and the ETA is blank again once done."""
        rate = self._rate(time.monotonic())
        rate_text = f"{format_bytes(rate)}/s" if rate is not None else ""
        numbers = [f"{format_bytes(self.done):>{_BYTES_WIDTH}}"]
        fraction = min(1.0, self.done / self.total) if self.total else None
        if self.total and fraction is not None:
            numbers = [f"{math.floor(fraction * 100):3d}%",
                       f"{numbers[0]} / {format_bytes(self.total):<{_BYTES_WIDTH}}"]
        numbers.append(f"{rate_text:>{_BYTES_WIDTH + 2}}")
        if self.total:
            left = self.total - self.done
            eta = format_duration(left / rate) if rate and left > 0 else ""
            numbers.append(f"{'ETA ' + eta if eta else '':<{_ETA_WIDTH}}")
        text = " ".join(numbers)
        detail_room = len(self.detail) + 2 if self.detail else 0
        bar_width = min(_BAR_MAX, width - 1 - len(self.label) - len(text) - 4 - detail_room)
        if fraction is not None and bar_width >= _BAR_MIN:
            filled = math.floor(bar_width * fraction)
            text = f"[{'#' * filled}{'.' * (bar_width - filled)}] {text}"
        line = f"{self.label} {text}"
        if self.detail:
            line += f"  {self.detail}"
        return line[: max(0, width - 1)].rstrip()

    def _maybe_draw(self) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last_draw < self._interval:
            return
        self._last_draw = now
        self._samples.append((now, self.done))
        while len(self._samples) > 2 and now - self._samples[1][0] > RATE_WINDOW:
            self._samples.popleft()
        line = self.render(shutil.get_terminal_size().columns)
        pad = " " * max(0, self._drawn_width - len(line))
        self._stream.write("\r" + line + pad)
        self._stream.flush()
        self._drawn_width = len(line)

    def _rate(self, now: float) -> float | None:
        """Bytes per second over the last ``RATE_WINDOW`` seconds; None until progress has
        been measured for ``RATE_MIN_SECONDS`` (a first frame's rate is noise)."""
        start_time, start_done = self._samples[0]
        elapsed = now - start_time
        if elapsed < RATE_MIN_SECONDS or self.done == 0:
            return None
        return (self.done - start_done) / elapsed

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
