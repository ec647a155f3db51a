#!/usr/bin/env python3
"""A warm start, stacked against `--fuse-only`: `ocixfs mount` of the python benchmark
image with a warm cache, then the start-up workload in a chroot, and the requests it sent.

    sudo venv/bin/python scripts/bench_stacked_start.py [--runs 5] [--service]

Uses the image the start-up benchmark built (`scripts/bench/run`, work directory
/var/tmp/ocixfs-bench or $OCIXFS_BENCH_DIR) from its local store. One untimed mount fills
the cache and writes the image index and metadata image; then, alternating run by run,
a stacked mount (the default) and a `--fuse-only` one, each after the page cache was
dropped. Prints medians of the mount command and of the workload, and the FUSE request
counters of the first run of each. `--service` mounts through the host service (the
default as root); without it, in this process (`--no-service`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_find import OCIXFS, WORK, drop_caches, mount_stats

WORKLOAD = ["python3", "-c", "import json, email, http.client"]
KINDS = {"stacked": [], "--fuse-only": ["--fuse-only"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per kind (median shown)")
    parser.add_argument("--service", action="store_true", help="mount through the service")
    args = parser.parse_args()
    manifests = sorted((WORK / "images" / "python").glob("ocix/*/*.ocix"))
    if not manifests:
        sys.exit(f"bench_stacked_start: no python image under {WORK}: run scripts/bench/run")
    manifest = manifests[0]
    times: dict[str, list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="ocixfs-bench-stacked-") as tmp:
        mnt = Path(tmp, "mnt")
        mnt.mkdir()
        mount = [*OCIXFS, "mount", str(manifest), str(mnt), "--store",
                 str(manifest.parent / "store"), "--cache-dir", str(Path(tmp, "cache")),
                 *([] if args.service else ["--no-service"])]
        subprocess.run(mount, check=True, stderr=subprocess.DEVNULL)
        subprocess.run(["chroot", str(mnt), *WORKLOAD], check=True)
        subprocess.run([*OCIXFS, "umount", str(mnt)], check=True)  # writes what it kept
        for run in range(args.runs):
            for kind, options in KINDS.items():
                drop_caches()
                start = time.perf_counter()
                subprocess.run([*mount, *options], check=True, stderr=subprocess.DEVNULL)
                mounted = time.perf_counter()
                subprocess.run(["chroot", str(mnt), *WORKLOAD], check=True)
                done = time.perf_counter()
                stats = mount_stats(mnt)
                subprocess.run([*OCIXFS, "umount", str(mnt)], check=True)
                times.setdefault(kind, []).append((mounted - start, done - mounted))
                if run == 0:
                    fs = stats["fs"]
                    assert isinstance(fs, dict)
                    caching = stats["kernel_caching"]
                    assert isinstance(caching, dict)
                    counts = {key: fs[key] for key in ("lookups", "negative_lookups",
                                                       "listings", "readlinks", "reads")}
                    print(f"{kind}: metadata by the kernel {caching['metadata']}; "
                          f"requests {json.dumps(counts)}")
    print(f"\nmedians of {args.runs} runs ({'service' if args.service else 'in-process'})")
    print("| mount | `ocixfs mount` s | workload s |\n|---|---:|---:|")
    for kind, pairs in times.items():
        print(f"| {kind} | {statistics.median(p[0] for p in pairs):.3f} | "
              f"{statistics.median(p[1] for p in pairs):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
