#!/usr/bin/env python3
"""Sequential reads of a cached file through the mount, by read-ahead window: FUSE's
default 128 KiB against the 1 MiB a mount now sets (``kernelcache.read_ahead``).

    sudo venv/bin/python scripts/bench_readahead.py [--mib 512] [--runs 5]

Builds an image of one file of random bytes (1 MiB chunks) in a local store under
/var/tmp, mounts it (``--no-service``) with ``--prefetch all`` and waits until every
chunk is cached. Each run drops the kernel's caches and reads the file with `cat`, once
per window (set through the mount's ``read_ahead_kb``), alternating; the daemon's READ
requests are counted. Prints medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench_find import OCIXFS, drop_caches, mount_stats

WINDOWS_KIB = (128, 1024)


def reads(mountpoint: Path) -> int:
    fs = mount_stats(mountpoint)["fs"]
    assert isinstance(fs, dict)
    return int(fs["reads"])


def timed_cat(path: Path, mountpoint: Path) -> tuple[float, int]:
    drop_caches()
    before = reads(mountpoint)
    start = time.perf_counter()
    subprocess.run(["cat", str(path)], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start, reads(mountpoint) - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ocixfs-readahead-", dir="/var/tmp") as scratch:
        work = Path(scratch)
        (work / "tree").mkdir()
        with (work / "tree" / "big.bin").open("wb") as file:
            for _ in range(args.mib):
                file.write(os.urandom(1 << 20))
        image = work / "big.ocix"
        subprocess.run([*OCIXFS, "build", f"dir:{work / 'tree'}", "--store", str(work / "store"),
                        "--output", str(image)], check=True, capture_output=True)
        mountpoint = work / "mnt"
        mountpoint.mkdir()
        subprocess.run([*OCIXFS, "mount", "--no-service", str(image), str(mountpoint),
                        "--store", str(work / "store"), "--cache-dir", str(work / "cache"),
                        "--prefetch", "all"], check=True)
        try:
            subprocess.run([*OCIXFS, "stats", str(mountpoint), "--wait"], check=True,
                           stdout=subprocess.DEVNULL)
            device = os.stat(mountpoint).st_dev
            knob = Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb")
            print(f"the mount's window: {knob.read_text().strip()} KiB")
            results: dict[int, list[tuple[float, int]]] = {kib: [] for kib in WINDOWS_KIB}
            for _ in range(args.runs):
                for kib in WINDOWS_KIB:
                    knob.write_text(f"{kib}\n")
                    results[kib].append(timed_cat(mountpoint / "big.bin", mountpoint))
        finally:
            subprocess.run([*OCIXFS, "umount", str(mountpoint)], check=False)
    megabytes = args.mib * 1.048576
    print(f"\n`cat` of a cached {args.mib} MiB file, page cache dropped, medians of "
          f"{args.runs} runs\n")
    print("| read-ahead | seconds | MB/s | READ requests |")
    print("|---|---:|---:|---:|")
    for kib, rows in results.items():
        seconds = statistics.median(r[0] for r in rows)
        print(f"| {kib} KiB | {seconds:.3f} | {megabytes / seconds:,.0f} | "
              f"{statistics.median(r[1] for r in rows):,.0f} |")


if __name__ == "__main__":
    main()
