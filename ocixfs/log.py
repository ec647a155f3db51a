"""Logging: one line per event to stderr (journald priority prefixes under systemd),
with a rate limit so a failing read repeated a thousand times logs a handful of lines."""

from __future__ import annotations

import logging
import os
import sys
import time

__all__ = ["RateLimitFilter", "setup_logging"]

_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


class JournalFormatter(logging.Formatter):
    """Prefix ``<N>`` so journald records the syslog priority of each line."""

    def format(self, record: logging.LogRecord) -> str:
        return f"<{_PRIORITY.get(record.levelno, 6)}>{super().format(record)}"


class RateLimitFilter(logging.Filter):
    """Let through at most ``burst`` records per message template per ``interval`` seconds."""

    def __init__(self, burst: int = 5, interval: float = 60.0) -> None:
        super().__init__()
        self.burst = burst
        self.interval = interval
        self._windows: dict[tuple[str, object], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, record.msg)
        now = time.monotonic()
        start, count = self._windows.get(key, (now, 0))
        if now - start > self.interval:
            start, count = now, 0
        self._windows[key] = (start, count + 1)
        if count + 1 == self.burst + 1:
            record.msg = f"{record.msg} (further messages like this suppressed for a while)"
        return count < self.burst + 1


def setup_logging(*, debug: bool = False) -> None:
    """Configure the ``ocixfs`` logger once: stderr, journald-aware, rate limited."""
    root = logging.getLogger("ocixfs")
    if root.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("ocixfs: %(message)s"))
    handler.addFilter(RateLimitFilter())
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    root.propagate = False
