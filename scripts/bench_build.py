#!/usr/bin/env python3
"""Benchmark ``ocixfs build``: throughput on a rootfs-like tree of real files.

Copies about ``--size`` MB of this machine's /usr/share (many small files) and /usr/lib
(libraries, some large) into a scratch tree, then times ``ocixfs build`` (a fresh store
each run, median of ``--runs``) from ``dir:``, with ``--compress zstd`` at a few levels,
with ``--format-version 0``, and from a plain, a gzip and a zstd tarball of the same tree.

Prints MB/s of file content and files/s (wall clock), and the CPU seconds the build used
(user + system) with MB per CPU-second: on a shared machine the wall clock measures the
neighbours too, the CPU time does not. ``--work /dev/shm/x`` keeps tree and store in
memory, which takes the disk out of the measurement; ``--cold`` drops the page cache
before each run instead (root only).

    venv/bin/python scripts/bench_build.py [--size 200] [--runs 3] [--work DIR] [--quick]
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
import tarfile
import tempfile
import time
from pathlib import Path

import zstandard

SOURCES = (("/usr/share", 0.45), ("/usr/lib/x86_64-linux-gnu", 0.35), ("/usr/lib", 0.20))
MAX_FILE = 64 << 20


# Rows without "--compress zstd" in their label build plain stores (the default is zstd).
PLAIN = ["--compress", "none"]

def make_tree(dest: Path, total: int) -> tuple[int, int]:
    """Copy regular files and symlinks until ``total`` bytes; return (files, bytes)."""
    files = size = 0
    for source, share in SOURCES:
        budget = int(total * share)
        for dirpath, dirnames, filenames in os.walk(source):
            dirnames.sort()
            for name in sorted(filenames):
                src = Path(dirpath, name)
                dst = dest / src.relative_to("/")
                if dst.exists() or dst.is_symlink():
                    continue
                try:
                    st = src.lstat()
                    if src.is_symlink():
                        dst.parent.mkdir(parents=True, exist_ok=True)
                        os.symlink(os.readlink(src), dst)
                        continue
                    if not src.is_file() or st.st_size > MAX_FILE:
                        continue
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, dst)
                except OSError:
                    continue
                files += 1
                size += st.st_size
                budget -= st.st_size
                if budget <= 0:
                    break
            if budget <= 0:
                break
    return files, size


def run_build(source: str, store: Path, output: Path, extra: list[str],
              cold: bool) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one build into a fresh store."""
    shutil.rmtree(store, ignore_errors=True)
    if cold:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    command = [sys.executable, "-m", "ocixfs", "build", source, "--store", str(store),
               "--output", str(output), "--json", "--no-progress", *extra]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    json.loads(result.stdout)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return elapsed, cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=200, help="MB of file content")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work", type=Path,
                        help="work here and keep the tree for the next run (default: a "
                             "temporary directory, removed at the end)")
    parser.add_argument("--cold", action="store_true", help="drop page caches before runs")
    parser.add_argument("--quick", action="store_true", help="only dir: and dir: + zstd-3")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="ocixfs-bench-"))
    tree = work / "rootfs"
    if not tree.exists():
        tree.mkdir(parents=True)
        files, size = make_tree(tree, args.size * 1_000_000)
    else:
        files = size = 0
        for dirpath, _, filenames in os.walk(tree):
            for name in filenames:
                st = os.lstat(os.path.join(dirpath, name))
                if not os.path.islink(os.path.join(dirpath, name)):
                    files += 1
                    size += st.st_size
    print(f"tree: {files} regular files, {size / 1e6:.1f} MB, in {tree}")
    print(f"cpus: {os.cpu_count()}, python {sys.version.split()[0]}")

    cases: list[tuple[str, str, list[str]]] = [
        ("dir:", f"dir:{tree}", PLAIN),
        ("dir: --compress zstd (level 3)", f"dir:{tree}", ["--compress", "zstd"]),
    ]
    if not args.quick:
        tarballs = (("rootfs.tar", "w"), ("rootfs.tar.gz", "w:gz"))
        for name, mode in tarballs:
            if not (work / name).exists():
                with tarfile.open(work / name, mode) as archive:
                    archive.add(tree, arcname=".")
        if not (work / "rootfs.tar.zst").exists():
            with (work / "rootfs.tar").open("rb") as src, \
                    (work / "rootfs.tar.zst").open("wb") as dst:
                zstandard.ZstdCompressor(level=3).copy_stream(src, dst)
        cases += [
            ("dir: --compress zstd --zstd-level 1", f"dir:{tree}",
             ["--compress", "zstd", "--zstd-level", "1"]),
            ("dir: --compress zstd --zstd-level 9", f"dir:{tree}",
             ["--compress", "zstd", "--zstd-level", "9"]),
            ("dir: --format-version 0", f"dir:{tree}", [*PLAIN, "--format-version", "0"]),
            ("tar: (plain)", f"tar:{work / 'rootfs.tar'}", PLAIN),
            ("tar: (gzip)", f"tar:{work / 'rootfs.tar.gz'}", PLAIN),
            ("tar: (zstd)", f"tar:{work / 'rootfs.tar.zst'}", PLAIN),
        ]
    print(f"\n{'case':38} {'wall s':>7} {'MB/s':>6} {'files/s':>8} {'CPU s':>6} "
          f"{'MB/CPU-s':>9} {'zst MB':>7}")
    for label, source, extra in cases:
        runs = [run_build(source, work / "store", work / "image.ocix", extra, args.cold)
                for _ in range(args.runs)]
        wall = statistics.median(r[0] for r in runs)
        cpu = statistics.median(r[1] for r in runs)
        zst = sum(p.stat().st_size for p in (work / "store" / "blobs" / "blake3").iterdir()
                  if p.name.endswith(".zst"))
        zst_text = f"{zst / 1e6:7.1f}" if zst else f"{'-':>7}"
        print(f"{label:38} {wall:7.2f} {size / 1e6 / wall:6.1f} {files / wall:8.0f} "
              f"{cpu:6.2f} {size / 1e6 / cpu:9.1f} {zst_text}")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (on {os.cpu_count()} CPUs)")
    if args.work is None:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
