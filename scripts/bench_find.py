#!/usr/bin/env python3
"""Metadata speed: `find -ls` over a mounted image against the same tree on local disk.

    sudo venv/bin/python scripts/bench_find.py [--runs 5] [--image large]

Uses an image the start-up benchmark built (`scripts/bench/run`, work directory
/var/tmp/ocixfs-bench or $OCIXFS_BENCH_DIR): its OCIX manifest and local store, and the
unpacked root file system it was made from as the local-disk reference. Nothing touches
the network (`find` reads no file content). Each run, with a fresh cache directory: one
mount and unmount of the image (a first mount keeps the image index and the EROFS
metadata image), then for each kind of mount of the image now seen before, stacked (the
default as root: the kernel serves the metadata) and `--fuse-only`: drop the kernel's
caches, `find -ls` on local disk twice (cold, then from the kernel's caches), mount,
drop caches, `find -ls` twice over the mount. Prints medians as a Markdown table, with
the ratio to local disk, then the median of each run's own ratio (first find over cold
local disk of the same run: steadier on a shared machine), the daemon's CPU time during
the first find (all its threads, from schedstat: barely moved by other load) and the
requests the first find sent it.

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


def first_find(mnt: Path, kind: str, rows: dict[str, list[float]],
               requests: dict[str, list[int]]) -> None:
    """Time the first `find` over a fresh mount; note the daemon's CPU and request counts."""
    pid = int(str(mount_stats(mnt)["pid"]))
    fs_before = mount_stats(mnt)["fs"]
    drop_caches()
    cpu = cpu_seconds(pid)
    rows.setdefault(f"{kind}, first find", []).append(timed_find(mnt))
    rows.setdefault(f"{kind}, daemon CPU", []).append(cpu_seconds(pid) - cpu)
    fs_after = mount_stats(mnt)["fs"]
    assert isinstance(fs_before, dict) and isinstance(fs_after, dict)
    for name in ("listings", "readlinks", "lookups"):
        requests.setdefault(f"{kind}: {name}", []).append(
            int(fs_after[name]) - int(fs_before[name]))


KINDS = {"ocixfs": [], "ocixfs --fuse-only": ["--fuse-only"]}


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
            cache = Path(tmp, f"cache-{run}")
            mount = [*OCIXFS, "mount", str(manifest), str(mnt), "--store", str(store),
                     "--cache-dir", str(cache), "--no-service"]
            subprocess.run(mount, check=True)
            wait_for_metadata_image(cache)
            subprocess.run([*OCIXFS, "umount", str(mnt)], check=True)
            for kind, options in KINDS.items():
                drop_caches()
                rows.setdefault(f"local disk, cold ({kind})", []).append(timed_find(rootfs))
                rows.setdefault(f"local disk, again ({kind})", []).append(timed_find(rootfs))
                subprocess.run([*mount, *options], check=True)
                try:
                    first_find(mnt, kind, rows, requests)
                    rows.setdefault(f"{kind}, again", []).append(timed_find(mnt))
                finally:
                    subprocess.run([*OCIXFS, "umount", str(mnt)], check=True)
    report(args, rows, requests, entries=sum(1 for _ in rootfs.rglob("*")))
    return 0


def wait_for_metadata_image(cache: Path, timeout: float = 120.0) -> None:
    """Wait until the first mount's daemon has kept the image's metadata image."""
    deadline = time.monotonic() + timeout
    while not any((cache / "index").glob("*.erofs")):
        if time.monotonic() > deadline:
            sys.exit("bench_find: the first mount wrote no metadata image")
        time.sleep(0.05)


def report(args: argparse.Namespace, rows: dict[str, list[float]],
           requests: dict[str, list[int]], *, entries: int) -> None:
    medians = {name: statistics.median(times) for name, times in rows.items()}
    print(f"`find -ls` over {args.image} ({entries:,} entries), medians of {args.runs} runs\n")
    print("| find -ls | seconds | x local disk |\n|---|---:|---:|")
    for kind in KINDS:
        for name in ("first find", "again"):
            local = medians[f"local disk, {'cold' if name == 'first find' else 'again'} ({kind})"]
            ours = medians[f"{kind}, {name}"]
            print(f"| local disk, {'cold' if name == 'first find' else 'again'} | "
                  f"{local:.3f} | 1.0 |")
            print(f"| {kind}, {name} | {ours:.3f} | {ours / local:.2f} |")
    print()
    for kind in KINDS:
        ratios = [ours / local for ours, local in
                  zip(rows[f"{kind}, first find"], rows[f"local disk, cold ({kind})"],
                      strict=True)]
        counts = ", ".join(f"{name.split(': ')[1]} {statistics.median(values):,.0f}"
                           for name, values in requests.items() if name.startswith(kind + ":"))
        print(f"{kind}, first find: median of per-run ratios {statistics.median(ratios):.2f}x "
              f"(runs: {', '.join(f'{ratio:.2f}' for ratio in ratios)}); daemon CPU "
              f"{medians[f'{kind}, daemon CPU']:.3f} s; requests: {counts}")


if __name__ == "__main__":
    raise SystemExit(main())
