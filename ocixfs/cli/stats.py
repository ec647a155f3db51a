"""``ocixfs stats``: what a running mount has fetched, served and failed."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

NAME = "stats"
HELP = "show a mount's fetch, cache and error counters"
DESCRIPTION = """\
Show what the daemon serving MOUNTPOINT has fetched, served and failed, and how much of the
image is in the local cache.

With --wait, first follow the mount's prefetch (a profile being played, or --prefetch all
filling the cache) until it has finished, with a progress bar on a terminal; the exit status
is 1 if some blobs could not be fetched (reads will fetch them on demand). This pre-warms a
host: 'ocixfs mount --prefetch all IMAGE MNT && ocixfs stats --wait MNT'.
"""

POLL_SECONDS = 0.25


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path)
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--wait", action="store_true",
                        help="first wait for the mount's prefetch to finish, showing progress")
    parser.add_argument("--timeout", type=float, metavar="SECONDS",
                        help="with --wait: give up (exit 1) after this long")


def run(args: argparse.Namespace) -> int:
    from ocixfs.mount.control import request

    mountpoint = Path(os.path.abspath(args.mountpoint))
    failed = wait_for_prefetch(mountpoint, args.timeout) if args.wait else 0
    stats = request(mountpoint, "stats")
    if args.json:
        print(json.dumps(stats, indent=2, sort_keys=True))
    else:
        print(format_stats(stats))
    if failed:
        print(f"ocixfs: {failed} blobs could not be prefetched; reads fetch them on demand",
              file=sys.stderr)
        return 1
    return 0


def wait_for_prefetch(mountpoint: Path, timeout: float | None = None) -> int:
    """Poll the daemon until its prefetch has finished (at once if it runs none); return
    how many blobs failed. Raises ``FetchTimeout`` after ``timeout`` seconds, ``UsageError``
    if the daemon goes away."""
    from ocixfs.errors import FetchTimeout
    from ocixfs.mount.control import request
    from ocixfs.progress import Progress

    give_up = None if timeout is None else time.monotonic() + timeout
    with Progress("prefetching") as bar:
        while True:
            state = request(mountpoint, "prefetch")["prefetch"]
            if state is None:
                return 0
            bar.set_total(state["planned_bytes"])
            bar.advance(state["done_bytes"] - bar.done)
            if state["finished"]:
                return int(state["failed_blobs"])
            if give_up is not None and time.monotonic() > give_up:
                raise FetchTimeout(
                    f"{mountpoint}: prefetch not finished after {timeout:g} s "
                    f"({state['done_blobs']} of {state['planned_blobs']} blobs)"
                )
            time.sleep(POLL_SECONDS)


def format_stats(stats: dict[str, Any]) -> str:
    """A human-readable rendering: one ``key  value`` line per counter, grouped."""
    lines = [
        f"mountpoint   {stats['mountpoint']}",
        f"image        {stats['image']} ({stats['image_digest']})",
        f"stores       {', '.join(stats['stores'])}",
        f"cache        {stats['cache_dir']}",
        f"daemon       pid {stats['pid']}, up {stats['uptime_s']:.0f} s",
    ]
    files = stats["image_files"]
    lines.append(
        f"local        {files['files_local']}/{files['files']} files, "
        f"{_size(files['bytes_local'])}/{_size(files['bytes'])}"
    )
    lines.append(f"profile      {stats.get('profile_files', 0)} files accessed so far")
    for group in ("prefetch", "reader", "fs"):
        if stats.get(group):
            lines.append(f"{group}:")
            lines.extend(_flatten(stats[group], "  "))
    return "\n".join(lines)


def _flatten(data: dict[str, Any], indent: str) -> list[str]:
    lines = []
    for key, value in sorted(data.items()):
        if isinstance(value, dict):
            lines.append(f"{indent}{key}:")
            lines.extend(_flatten(value, indent + "  "))
        else:
            lines.append(f"{indent}{key:<28} {value}")
    return lines


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
