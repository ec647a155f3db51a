#!/usr/bin/env python3
"""Benchmark ``ocixfs extract``: a whole image from a local nginx-served store.

For each OCIX image (built beforehand into ``--store``), serves the store with a
throw-away nginx on loopback and times ``ocixfs extract`` three ways: with an empty cache
(``cold``: every blob over HTTP, verified, cached, then copied out), again with the
cache it filled (``warm``: copies only), and ``cp -a`` of the extracted tree (what the
disk alone allows, measured in the same minute). Prints MB/s of file content, the blob
requests nginx saw, and the CPU seconds used (on a shared machine the wall clock also
measures the neighbours; the CPU time does not). Median of ``--runs``.

    venv/bin/python scripts/bench_extract.py IMAGE.ocix... --store DIR [--runs 3] [--jobs 16]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.nginx import Nginx  # noqa: E402


def timed(command: list[str]) -> tuple[float, float, str]:
    """Run ``command``; return (wall seconds, child CPU seconds, stdout)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True)
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed: {result.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, result.stdout


def extract(image: Path, dest: Path, url: str, cache: Path, jobs: int) -> tuple[float, float,
                                                                              dict[str, Any]]:
    wall, cpu, out = timed([sys.executable, "-m", "ocixfs", "extract", str(image), str(dest),
                            "--store", url, "--cache-dir", str(cache), "--jobs", str(jobs),
                            "--json", "--no-progress"])
    return wall, cpu, json.loads(out)


def bench_image(image: Path, store: Path, work: Path, runs: int,
                jobs: int) -> list[tuple[str, float, float, int]]:
    results: dict[str, list[tuple[float, float, int]]] = {"cold": [], "warm": [], "cp -a": []}
    summary: dict[str, Any] = {}
    with Nginx(store, work / "nginx") as server:
        for _ in range(runs):
            cache = work / "cache"
            shutil.rmtree(cache, ignore_errors=True)
            for label, dest in (("cold", work / "a"), ("warm", work / "b")):
                shutil.rmtree(dest, ignore_errors=True)
                seen = len(server.requests())
                wall, cpu, summary = extract(image, dest, server.url, cache, jobs)
                requests = sum("/blobs/" in p for p in server.requests()[seen:])
                results[label].append((wall, cpu, requests))
            shutil.rmtree(work / "c", ignore_errors=True)
            wall, cpu, _ = timed(["cp", "-a", str(work / "a"), str(work / "c")])
            results["cp -a"].append((wall, cpu, 0))
            for name in ("a", "b", "c"):
                shutil.rmtree(work / name, ignore_errors=True)
    rows = []
    for label, samples in results.items():
        wall = statistics.median(s[0] for s in samples)
        cpu = statistics.median(s[1] for s in samples)
        rows.append((label, wall, cpu, samples[-1][2]))
    print(f"\n{image.name}: {summary['files']} files, {summary['bytes'] / 1e6:.0f} MB of content, "
          f"{summary['blobs']} blobs ({summary['blob_bytes'] / 1e6:.0f} MB distinct)")
    print(f"{'run':<8}{'seconds':>9}{'MB/s':>8}{'CPU s':>8}{'requests':>10}")
    for label, wall, cpu, requests in rows:
        rate = summary["bytes"] / wall / 1e6
        print(f"{label:<8}{wall:>9.1f}{rate:>8.1f}{cpu:>8.1f}{requests:>10}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--work", type=Path, help="scratch directory (default: under /var/tmp)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="ocixfs-bench-extract-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    try:
        for image in args.images:
            bench_image(image.resolve(), args.store.resolve(), work, args.runs, args.jobs)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
