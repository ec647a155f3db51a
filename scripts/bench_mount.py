#!/usr/bin/env python3
"""Measure a real ocixfs mount against the same tree on local disk and print a table.

    sudo venv/bin/python scripts/bench_mount.py [--runs 3] [--large-mib 128]

The tree is a copy of this host's Python standard library (thousands of small files) plus
one large random file; the store is served by nginx on 127.0.0.1 (no emulated link: this
measures ocixfs itself). Every cold measurement starts with a fresh mount, an empty cache
directory where it says "cold", and dropped kernel caches; medians of --runs runs.

Rows:
  mount              `ocixfs mount` until it returns (the mount serves)
  find -ls           metadata of the whole tree (no network by design)
  large file, cold   first read of the large file (fetch + verify + cache)
  large file, warm   read from the ocixfs cache after dropping the page cache
  large, page cache  second read in the same mount (keep_cache)
  small files, cold  every small file read once (`tar c | wc`), nothing cached
  small files, warm  the same with a warm ocixfs cache
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.nginx import Nginx  # noqa: E402

OCIXFS = [sys.executable, "-m", "ocixfs"]


def sh(*args: str) -> None:
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def make_tree(work: Path, large_mib: int) -> tuple[Path, int, int]:
    tree = work / "tree"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    shutil.copytree(
        stdlib, tree / "lib", symlinks=True, ignore=shutil.ignore_patterns("site-packages")
    )
    with open(tree / "large.bin", "wb") as f:
        for _ in range(large_mib):
            f.write(os.urandom(1 << 20))
    small = sum(
        p.stat().st_size for p in (tree / "lib").rglob("*") if p.is_file() and not p.is_symlink()
    )
    files = sum(1 for p in (tree / "lib").rglob("*") if p.is_file())
    return tree, small, files


class Session:
    def __init__(self, work: Path, image: Path, url: str) -> None:
        self.work, self.image, self.url = work, image, url
        self.mnt = work / "mnt"
        self.mnt.mkdir(exist_ok=True)

    def mount(self, cache: Path) -> float:
        args = [
            *OCIXFS,
            "mount",
            str(self.image),
            str(self.mnt),
            "--store",
            self.url,
            "--cache-dir",
            str(cache),
            "--prefetch",
            "none",
        ]
        return timed(lambda: sh(*args))

    def umount(self) -> None:
        sh(*OCIXFS, "umount", str(self.mnt))


def read_all(path: Path) -> None:
    sh("sh", "-c", f"tar cf - -C '{path}' . | wc -c")


def cat(path: Path) -> None:
    sh("sh", "-c", f"cat '{path}' | wc -c")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--large-mib", type=int, default=128)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_mount: needs root (FUSE, drop_caches)")
    results: dict[str, list[float]] = {}

    def record(name: str, seconds: float) -> None:
        results.setdefault(name, []).append(seconds)

    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="ocixfs-bench-mount-") as tmp:
        work = Path(tmp)
        tree, small_bytes, small_files = make_tree(work, args.large_mib)
        store, image = work / "store", work / "image.ocix"
        sh(*OCIXFS, "build", f"dir:{tree}", "--store", str(store), "--output", str(image),
           "--compress", "none")  # the rows read plain blobs, as recorded in the README
        entries = (
            subprocess.run(
                [*OCIXFS, "inspect", str(image), "--summary"],
                check=True,
                capture_output=True,
                text=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        with Nginx(store, work / "nginx") as nginx:
            session = Session(work, image, nginx.url)
            for run in range(args.runs):
                cache = work / f"cache-{run}"
                drop_caches()
                record("local disk: find -ls", timed(lambda: sh("find", str(tree), "-ls")))
                drop_caches()
                record("local disk: large file", timed(lambda: cat(tree / "large.bin")))
                drop_caches()
                record("local disk: small files", timed(lambda: read_all(tree / "lib")))

                drop_caches()
                record("ocixfs: mount", session.mount(cache))
                try:
                    record("ocixfs: find -ls", timed(lambda: sh("find", str(session.mnt), "-ls")))
                    record(
                        "ocixfs: large file, cold", timed(lambda: cat(session.mnt / "large.bin"))
                    )
                    record(
                        "ocixfs: large file, page cache",
                        timed(lambda: cat(session.mnt / "large.bin")),
                    )
                    record(
                        "ocixfs: small files, cold", timed(lambda: read_all(session.mnt / "lib"))
                    )
                finally:
                    session.umount()
                drop_caches()
                session.mount(cache)
                try:
                    record(
                        "ocixfs: large file, warm cache",
                        timed(lambda: cat(session.mnt / "large.bin")),
                    )
                    record(
                        "ocixfs: small files, warm cache",
                        timed(lambda: read_all(session.mnt / "lib")),
                    )
                finally:
                    session.umount()
                shutil.rmtree(cache)

    large = args.large_mib << 20
    print(
        f"tree: {entries}; small files: {small_files}, {small_bytes / 1e6:.1f} MB; "
        f"large file {large / 1e6:.0f} MB; median of {args.runs} runs, "
        f"load {os.getloadavg()[0]:.1f}"
    )
    print(f"{'measurement':<34} {'median s':>9} {'MB/s':>9}")
    for name, values in results.items():
        median = statistics.median(values)
        size = large if "large" in name else small_bytes if "small" in name else 0
        rate = f"{size / median / 1e6:9.0f}" if size else f"{'':>9}"
        print(f"{name:<34} {median:9.3f} {rate}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
