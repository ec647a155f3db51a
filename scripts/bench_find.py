#!/usr/bin/env python3
"""Metadata speed: `find -ls` over a mounted image against the same tree on local disk.

    sudo venv/bin/python scripts/bench_find.py [--runs 5] [--image large]

Uses an image the start-up benchmark built (`scripts/bench/run`, work directory
/var/tmp/ocixfs-bench or $OCIXFS_BENCH_DIR): its OCIX manifest and local store, and the
unpacked root file system it was made from as the local-disk reference. Nothing touches
the network (`find` reads no file content). Each run: drop the kernel's caches, `find -ls`
on local disk twice (cold, then from the kernel's caches); then mount afresh (empty
cache directory), drop caches, `find -ls` twice over the mount. Prints medians as a
Markdown table, with the ratio to local disk, then the median of each run's own ratio
(first find over cold local disk of the same run: steadier on a shared machine), the
daemon's CPU time during the first find (all its threads, from schedstat: barely moved by
other load) and the requests the first find sent it.

The mount bypasses the host service (`--no-service`): as root, `ocixfs mount` would
otherwise hand the mount to a service that may run another checkout's code.
"""

from __future__ import annotations

import argparse
import json
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


def mount_stats(mnt: Path) -> dict[str, object]:
    """The daemon's ``ocixfs stats --json`` document."""
    done = subprocess.run([*OCIXFS, "stats", str(mnt), "--json"], check=True,
                          capture_output=True, text=True)
    stats: dict[str, object] = json.loads(done.stdout)
    return stats


def cpu_seconds(pid: int) -> float:
    """CPU time of all threads of process ``pid`` so far (``/proc/PID/task/*/schedstat``)."""
    tasks = Path(f"/proc/{pid}/task").iterdir()
    return sum(int((task / "schedstat").read_text().split()[0]) for task in tasks) / 1e9


def first_find(mnt: Path, rows: dict[str, list[float]], requests: dict[str, list[int]]) -> None:
    """Time the first `find` over a fresh mount; note the daemon's CPU and request counts."""
    pid = int(str(mount_stats(mnt)["pid"]))
    fs_before = mount_stats(mnt)["fs"]
    drop_caches()
    cpu = cpu_seconds(pid)
    rows.setdefault("ocixfs, first find", []).append(timed_find(mnt))
    rows.setdefault("daemon CPU", []).append(cpu_seconds(pid) - cpu)
    fs_after = mount_stats(mnt)["fs"]
    assert isinstance(fs_before, dict) and isinstance(fs_after, dict)
    for name in ("listings", "readlinks", "lookups"):
        requests.setdefault(name, []).append(int(fs_after[name]) - int(fs_before[name]))


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
    requests: dict[str, list[int]] = {}
    with tempfile.TemporaryDirectory(prefix="ocixfs-bench-find-") as tmp:
        mnt = Path(tmp, "mnt")
        mnt.mkdir()
        for run in range(args.runs):
            drop_caches()
            rows.setdefault("local disk, cold", []).append(timed_find(rootfs))
            rows.setdefault("local disk, again", []).append(timed_find(rootfs))
            cache = Path(tmp, f"cache-{run}")
            subprocess.run([*OCIXFS, "mount", str(manifest), str(mnt), "--store", str(store),
                            "--cache-dir", str(cache), "--no-service"], check=True)
            try:
                first_find(mnt, rows, requests)
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
    ratios = [ours / local for ours, local in
              zip(rows["ocixfs, first find"], rows["local disk, cold"], strict=True)]
    counts = ", ".join(f"{name} {statistics.median(values):,.0f}"
                       for name, values in requests.items())
    print(f"\nfirst find: median of per-run ratios {statistics.median(ratios):.2f}x "
          f"(runs: {', '.join(f'{ratio:.2f}' for ratio in ratios)}); daemon CPU "
          f"{medians['daemon CPU']:.3f} s; requests: {counts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
