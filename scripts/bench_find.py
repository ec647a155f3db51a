#!/usr/bin/env python3
"""Metadata speed: `find -ls` over a mounted image against the same tree on local disk.

    sudo venv/bin/python scripts/bench_find.py [--runs 5] [--image large]

Uses an image the start-up benchmark built (`scripts/bench/run`, work directory
/var/tmp/ocixfs-bench or $OCIXFS_BENCH_DIR): its OCIX manifest and local store, and the
unpacked root file system it was made from as the local-disk reference. Nothing touches
the network (`find` reads no file content). Each run: drop the kernel's caches, `find -ls`
on local disk twice (cold, then from the kernel's caches); then mount afresh (empty
cache directory), drop caches, `find -ls` twice over the mount. Prints medians as a
Markdown table, with the ratio to local disk.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OCIXFS = [sys.executable, "-m", "ocixfs"]
WORK = Path(os.environ.get("OCIXFS_BENCH_DIR", "/var/tmp/ocixfs-bench"))


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed_find(root: Path) -> float:
    start = time.perf_counter()
    subprocess.run(["find", str(root), "-ls"], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per row (median shown)")
    parser.add_argument("--image", default="large", help="benchmark image name (default large)")
    args = parser.parse_args()
    images = WORK / "images" / args.image
    manifests = sorted(images.glob("ocix/*/*.ocix"))
    rootfs = images / "ref" / "rootfs"
    if not manifests or not rootfs.is_dir():
        sys.exit(f"bench_find: no built image {args.image!r} under {WORK}: run scripts/bench/run")
    manifest = manifests[0]
    store = manifest.parent / "store"
    rows: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="ocixfs-bench-find-") as tmp:
        mnt = Path(tmp, "mnt")
        mnt.mkdir()
        for run in range(args.runs):
            drop_caches()
            rows.setdefault("local disk, cold", []).append(timed_find(rootfs))
            rows.setdefault("local disk, again", []).append(timed_find(rootfs))
            cache = Path(tmp, f"cache-{run}")
            subprocess.run([*OCIXFS, "mount", str(manifest), str(mnt), "--store", str(store),
                            "--cache-dir", str(cache)], check=True)
            try:
                drop_caches()
                rows.setdefault("ocixfs, first find", []).append(timed_find(mnt))
                rows.setdefault("ocixfs, again", []).append(timed_find(mnt))
            finally:
                subprocess.run([*OCIXFS, "umount", str(mnt)], check=True)
    medians = {name: statistics.median(times) for name, times in rows.items()}
    entries = sum(1 for _ in rootfs.rglob("*"))
    print(f"`find -ls` over {args.image} ({entries:,} entries), medians of {args.runs} runs\n")
    print("| find -ls | seconds | x local disk |\n|---|---:|---:|")
    for name, local in (("first find", "local disk, cold"), ("again", "local disk, again")):
        print(f"| local disk, {'cold' if name == 'first find' else 'again'} | "
              f"{medians[local]:.3f} | 1.0 |")
        ours = medians[f"ocixfs, {name}"]
        print(f"| ocixfs, {name} | {ours:.3f} | {ours / medians[local]:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
