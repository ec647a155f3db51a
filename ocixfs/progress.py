"""A one-line progress bar for long commands (build, extract, prefetch).

``Progress`` draws on its stream (stderr by default) only when that stream is a terminal,
at most every ``interval`` seconds, and is silent otherwise, so logs and pipes never see
carriage returns. It counts bytes: ``advance(n)`` may be called from any thread. With a
known ``total`` it shows a bar, a percentage and an ETA; without one, the count and the
rate. The rate is measured over the last few seconds, not since the start.
"""

from __future__ import annotations

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


def format_bytes(n: float) -> str:
    """``n`` bytes in decimal units, about three figures: ``"812 B"``, ``"16.0 MB"``."""
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
        """The text of the line for a terminal ``width`` columns wide (without ``\\r``)."""
        now = time.monotonic()
        rate = self._rate(now)
        parts = [self.label]
        if self.total:
            fraction = min(1.0, self.done / self.total)
            parts.append(f"{fraction:4.0%}")
            parts.append(f"{format_bytes(self.done)}/{format_bytes(self.total)}")
        else:
            parts.append(format_bytes(self.done))
        parts.append(f"{format_bytes(rate)}/s")
        if self.total and rate > 0:
            parts.append(f"ETA {format_duration(max(0, self.total - self.done) / rate)}")
        if self.detail:
            parts.append(self.detail)
        text = "  ".join(parts)
        if self.total:
            bar_width = width - len(text) - 4
            if bar_width >= 10:
                filled = int(bar_width * min(1.0, self.done / self.total))
                bar = "[" + "#" * filled + "." * (bar_width - filled) + "]"
                text = f"{parts[0]} {bar} " + "  ".join(parts[1:])
        return text[: max(0, width - 1)]

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

    def _rate(self, now: float) -> float:
        start_time, start_done = self._samples[0]
        elapsed = now - start_time
        return (self.done - start_done) / elapsed if elapsed > 0.05 else 0.0

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
