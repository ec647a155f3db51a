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
    """A human-readable rendering: one ``key  value`` line per counter, grouped; sizes in
    decimal units (``progress.format_bytes``), times rounded, empty groups left out."""
    from ocixfs.progress import format_bytes

    log_file = stats.get("log_file")
    lines = [
        f"mountpoint   {stats['mountpoint']}",
        f"image        {stats['image']} ({stats['image_digest']})",
        f"stores       {', '.join(stats['stores'])}",
        f"cache        {stats['cache_dir']}",
        f"daemon       pid {stats['pid']}, up {_duration(stats['uptime_s'])}",
        f"log          {log_file if log_file else 'stderr (a foreground mount)'}",
    ]
    files = stats["image_files"]
    lines.append(
        f"local        {files['files_local']} of {files['files']} files, "
        f"{format_bytes(files['bytes_local'])} of {format_bytes(files['bytes'])}"
    )
    stacked = stats.get("kernel_caching", {}).get("metadata")
    lines.append("metadata     " + ("served by the kernel (stacked: EROFS over FUSE)" if stacked
                                   else "served through FUSE"))
    lines.append(f"profile      {stats.get('profile_files', 0)} files opened so far")
    played = stats.get("played_profile")
    lines.append("played       " + (
        f"{played['description']}: {played['in_tree']} of its {played['paths']} paths are "
        "files of this image" if played else "no profile"))
    for group in ("prefetch", "predict", "reader", "fs"):
        body = _flatten(stats.get(group) or {}, "  ")
        if body:
            lines.append(f"{group}:")
            lines.extend(body)
    return "\n".join(lines)


def _flatten(data: dict[str, Any], indent: str, group: str = "") -> list[str]:
    """``key  value`` lines; the values of a nested group are read by the group's name
    (``bytes_received_by_source: {store: n}`` holds bytes)."""
    lines = []
    for key, value in sorted(data.items()):
        if isinstance(value, dict):
            inner = _flatten(value, indent + "  ", group=key)
            if inner:
                lines.append(f"{indent}{key}:")
                lines.extend(inner)
        else:
            lines.append(f"{indent}{key:<28} {_value(group or key, value)}")
    return lines


def _value(key: str, value: Any) -> str:
    """A counter as a person reads it: bytes in decimal units, seconds rounded."""
    from ocixfs.progress import format_bytes

    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if "bytes" in key or key.endswith("_size"):
        return format_bytes(value)
    if "seconds" in key or key.endswith("_s"):
        return _duration(value)
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    return f"{seconds:.1f} s" if seconds < 600 else f"{seconds / 60:.0f} min"
