"""Logging: one line per event to stderr (journald priority prefixes under systemd),
with a rate limit so a failing read repeated a thousand times logs a handful of lines.

A background mount daemon's stderr is its log file; there every line carries a timestamp
and its level (``timestamp_lines``), and ``only_routine_lines`` tells whether a log holds
anything worth keeping (a warning, an error, or text that did not come from logging)."""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from pathlib import Path

__all__ = ["RateLimitFilter", "only_routine_lines", "setup_logging", "timestamp_lines"]

LOG_FILE_FORMAT = "%(asctime)s %(levelname)s %(message)s"
_ROUTINE_LINE = re.compile(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} (?:INFO|DEBUG) ")
_ROUTINE_LOG_MAX = 1 << 20

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


def timestamp_lines() -> None:
    """From now on, every ``ocixfs`` log line starts with the local time (ISO 8601, with
    its UTC offset) and the level: for a log file, where nothing else dates it."""
    formatter = logging.Formatter(LOG_FILE_FORMAT, datefmt="%Y-%m-%dT%H:%M:%S%z")
    for handler in logging.getLogger("ocixfs").handlers:
        handler.setFormatter(formatter)


def only_routine_lines(path: Path) -> bool:
    """Whether the log file ``path`` holds nothing but INFO and DEBUG lines written with
    ``timestamp_lines`` (so removing it loses nothing anyone needs). A warning, an error,
    any other text (a traceback, libfuse's messages), a log over 1 MiB, or one that
    cannot be read: False."""
    try:
        with path.open("rb") as file:
            text = file.read(_ROUTINE_LOG_MAX + 1)
    except OSError:
        return False
    if len(text) > _ROUTINE_LOG_MAX:
        return False
    return all(_ROUTINE_LINE.match(line) for line in text.splitlines())
