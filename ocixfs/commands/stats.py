"""``ocixfs stats``: what a running mount has fetched, served and failed."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

NAME = "stats"
HELP = "show a mount's fetch, cache and error counters"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path)
    parser.add_argument("--json", action="store_true", help="print one JSON document")


def run(args: argparse.Namespace) -> int:
    from ..control import request

    stats = request(Path(os.path.abspath(args.mountpoint)), "stats")
    if args.json:
        print(json.dumps(stats, indent=2, sort_keys=True))
    else:
        print(format_stats(stats))
    return 0


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
