"""Print scripts/demo's summary: what a lazy mount fetched against the size of its image.

Usage: ocixfs stats MNT --json | demo_report.py HTTP_LOG T0 T1 T2
(HTTP_LOG is python -m http.server's request log; T0..T2 are the times around the cold
and the warm run of the program, in seconds.)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

__all__ = ["main", "report"]


def report(stats: dict[str, object], requests: int, cold: float, warm: float) -> str:
    image = stats["image_files"]
    reader = stats["reader"]
    assert isinstance(image, dict) and isinstance(reader, dict)
    share = 100 * reader["bytes_fetched"] / max(image["bytes"], 1)
    return "\n".join([
        f"    image      {image['files']:,} files, {_mb(image['bytes'])}",
        f"    fetched    {reader['blobs_fetched']:,} blobs, {_mb(reader['bytes_fetched'])}"
        f" ({share:.1f} % of the image) in {requests} HTTP requests, each verified",
        f"    python3    {cold:.2f} s the first time (fetching), {warm:.2f} s again (cached)",
    ])


def main(argv: list[str]) -> int:
    log, t0, t1, t2 = argv[0], *(float(t) for t in argv[1:4])
    requests = sum("GET /blobs/" in line for line in Path(log).read_text().splitlines())
    print(report(json.load(sys.stdin), requests, t1 - t0, t2 - t1))
    return 0


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
