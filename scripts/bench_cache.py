#!/usr/bin/env python3
"""Cache lifecycle costs: publishing under the quota, scanning and evicting a big cache,
and fsck throughput. Prints a table.

    venv/bin/python scripts/bench_cache.py [--blobs 100000] [--fsck-mib 256] [--dir DIR]

Runs in a temporary directory on the filesystem of --dir (default: the system temp dir).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import blake3
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ocixfs.cache.blobs import Cache  # noqa: E402
from ocixfs.cache.directory import CacheDirectory  # noqa: E402
from ocixfs.cache.fsck import check  # noqa: E402
from ocixfs.cache.layout import scan_blobs  # noqa: E402
from ocixfs.config import CacheConfig, CacheQuota  # noqa: E402
from ocixfs.image.format import Chunk  # noqa: E402

UNLIMITED = CacheQuota(share=None, cap=None)


def row(what: str, value: str, detail: str = "") -> None:
    print(f"| {what:<44} | {value:>14} | {detail:<36} |")


def fake_blobs(root: Path, count: int, size: int) -> None:
    """``count`` files named like blobs (content not matching: eviction never hashes),
    with random last-use times over the past month."""
    payload = b"x" * size
    now = time.time()
    rng = random.Random(1)
    for i in range(count):
        name = blake3.blake3(i.to_bytes(8, "little")).hexdigest()
        path = root / "blobs" / name[:2] / name
        path.write_bytes(payload)
        when = now - rng.uniform(0, 30 * 86400)
        os.utime(path, (when, when))


async def publish_many(root: Path, count: int, size: int, quota: CacheQuota) -> float:
    config = CacheConfig(quota=quota, fsync=False)
    with Cache(root, config, rescan=False) as cache:
        started = time.perf_counter()
        for i in range(count):
            data = i.to_bytes(8, "little") * (size // 8)
            writer = cache.fill(Chunk(len(data), blake3.blake3(data).digest()))
            try:
                writer.write(data)
                await cache.commit(writer)
            finally:
                writer.abort()
        return time.perf_counter() - started


def bench_publish(base: Path) -> None:
    count = 3000
    quotas = (("unlimited", UNLIMITED), ("quota, no eviction", CacheQuota(size=1 << 40)))
    for label, quota in quotas:
        root = Path(tempfile.mkdtemp(dir=base))
        seconds = trio.run(publish_many, root, count, 4096, quota)
        row(f"fill 4 KiB blobs ({label})", f"{seconds / count * 1e6:.0f} µs/blob",
            "fsync off; thread hop, hash, link, counter")
    root = Path(tempfile.mkdtemp(dir=base))
    directory = CacheDirectory(root, CacheConfig(quota=UNLIMITED))
    started = time.perf_counter()
    for _ in range(20000):
        directory.usage.publish(1, None, lambda: True)
    row("usage counter update (flock, pread, pwrite)",
        f"{(time.perf_counter() - started) / 20000 * 1e6:.1f} µs", "per fill")
    directory.close()


def bench_evict(base: Path, count: int) -> None:
    root = Path(tempfile.mkdtemp(dir=base))
    size = 4096
    Cache(root, rescan=False).close()
    started = time.perf_counter()
    fake_blobs(root, count, size)
    row(f"create {count} blobs (setup)", f"{time.perf_counter() - started:.1f} s")
    started = time.perf_counter()
    scan = scan_blobs(root / "blobs")
    row(f"scan {len(scan.blobs)} blobs (lstat each)", f"{time.perf_counter() - started:.2f} s")
    limit = count * size
    directory = CacheDirectory(root, CacheConfig(quota=CacheQuota(size=limit)))
    result = directory.rescan(wait=10)
    assert result is not None
    started = time.perf_counter()
    directory.publish(size, lambda: True)  # at the limit: evicts just enough, itself
    row(f"fill at the limit, {count} blobs", f"{time.perf_counter() - started:.2f} s",
        "scan + sort + 1 unlink (read path)")
    started = time.perf_counter()
    directory.settle()
    seconds = time.perf_counter() - started
    _, evicted, _ = directory.statistics()
    row("background eviction to 90 %", f"{seconds:.2f} s",
        f"{evicted - 1} unlinks, off the read path")
    started = time.perf_counter()
    for _ in range(100):
        directory.publish(size, lambda: True)
    row("fill with room left (counter only)",
        f"{(time.perf_counter() - started) / 100 * 1e6:.0f} µs")
    directory.close()


def bench_fsck(base: Path, mib: int) -> None:
    root = Path(tempfile.mkdtemp(dir=base))
    Cache(root, rescan=False).close()
    for i in range(mib):
        data = blake3.blake3(i.to_bytes(8, "little")).digest(length=1 << 20)
        name = blake3.blake3(data).hexdigest()
        (root / "blobs" / name[:2] / name).write_bytes(data)
    directory = CacheDirectory(root, create=False)
    for threads in (1, 2, 4):
        report = check(directory, threads=threads, remove=False)
        row(f"fsck {mib} x 1 MiB blobs, {threads} thread(s)",
            f"{report.bytes / report.seconds / 1e6:.0f} MB/s", "page cache warm")
    small = Path(tempfile.mkdtemp(dir=base))
    Cache(small, rescan=False).close()
    for i in range(20000):
        data = i.to_bytes(8, "little") * 512
        name = blake3.blake3(data).hexdigest()
        (small / "blobs" / name[:2] / name).write_bytes(data)
    small_dir = CacheDirectory(small, create=False)
    report = check(small_dir, threads=2, remove=False)
    row("fsck 20000 x 4 KiB blobs, 2 threads", f"{report.blobs / report.seconds:.0f} blobs/s")
    small_dir.close()
    directory.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--blobs", type=int, default=100_000)
    parser.add_argument("--fsck-mib", type=int, default=256)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="ocixfs-bench-cache-") as tmp:
        base = Path(tmp)
        print(f"| {'measure':<44} | {'result':>14} | {'notes':<36} |")
        print(f"|{'-' * 46}|{'-' * 16}|{'-' * 38}|")
        bench_publish(base)
        bench_evict(base, args.blobs)
        bench_fsck(base, args.fsck_mib)


if __name__ == "__main__":
    main()
