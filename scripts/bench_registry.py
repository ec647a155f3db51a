#!/usr/bin/env python3
"""Registry against a static HTTP store, on loopback: push time, then a cold mount and a
python-ish workload (read every file of the image, as an interpreter's start-up reads its
modules), from a real docker-registry and from nginx serving the same store.

    venv/bin/python scripts/bench_registry.py [--tree /usr/lib/python3.11] [--runs 5]

Prints medians (and every run) as one JSON document. Each cold run uses a fresh cache.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.mounting import OCIXFS, force_unmount  # noqa: E402
from tests.nginx import Nginx  # noqa: E402
from tests.registries import Registry  # noqa: E402


def ocixfs(*args: str) -> str:
    return subprocess.run([*OCIXFS, *args], check=True, capture_output=True, text=True).stdout


def workload(root: Path) -> int:
    """Read every regular file under ``root`` once, in path order; bytes read."""
    total = 0
    for directory, _dirs, files in sorted(os.walk(root)):
        for name in sorted(files):
            path = os.path.join(directory, name)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as file:
                    total += len(file.read())
    return total


def cold_run(image: str, stores: list[str], work: Path, n: int) -> dict[str, float]:
    mountpoint, cache = work / f"mnt{n}", work / f"cache{n}"
    mountpoint.mkdir()
    started = time.monotonic()
    ocixfs("mount", image, os.fspath(mountpoint), "--cache-dir", os.fspath(cache),
           "--prefetch", "none", *[arg for store in stores for arg in ("--store", store)])
    mounted = time.monotonic()
    try:
        workload(mountpoint)
        done = time.monotonic()
    finally:
        ocixfs("umount", os.fspath(mountpoint))
        force_unmount(mountpoint)
    return {"mount_s": mounted - started, "workload_s": done - mounted}


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: round(statistics.median(run[key] for run in runs), 3) for key in runs[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", default="/usr/lib/python3.11/email")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ocixfs-bench-registry-") as temp:
        work = Path(temp)
        store = work / "store"
        store.mkdir()
        built = json.loads(ocixfs("build", f"dir:{args.tree}", "--store", os.fspath(store),
                                  "--output", os.fspath(store / "image.ocix"), "--json"))
        with Registry(work / "registry") as registry, Nginx(store, work / "nginx") as nginx:
            ref = registry.ref("bench/image:v1")
            started = time.monotonic()
            pushed = json.loads(ocixfs("push", os.fspath(store / "image.ocix"), ref, "--json"))
            push_s = time.monotonic() - started
            started = time.monotonic()
            ocixfs("push", os.fspath(store / "image.ocix"), ref, "--json")
            repush_s = time.monotonic() - started
            results: dict[str, list[dict[str, float]]] = {"registry": [], "nginx": []}
            for n in range(args.runs):
                results["registry"].append(cold_run(ref, [], work, 2 * n))
                results["nginx"].append(cold_run(f"{nginx.url}image.ocix", [nginx.url],
                                                 work, 2 * n + 1))
        print(json.dumps({
            "tree": args.tree, "files": built.get("regular_files"), "blobs": pushed["blobs"],
            "bytes_stored": pushed["uploaded_bytes"], "push_s": round(push_s, 3),
            "repush_all_skipped_s": round(repush_s, 3),
            "median": {name: median_of(runs) for name, runs in results.items()},
            "runs": results,
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
