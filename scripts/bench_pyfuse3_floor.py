#!/usr/bin/env python3
"""The floor under a first `find` over a pyfuse3 mount: what one request costs a minimal
filesystem, against what it costs ocixfs (``scripts/bench_find.py``).

    sudo venv/bin/python scripts/bench_pyfuse3_floor.py [--runs 5]

A child process serves an in-memory tree shaped like the benchmark's python image (1,263
directories, 8 entries each on average, no symlinks) with everything precomputed: a
READDIRPLUS handler that only replies, OPENDIR declined and listings kept by the kernel
(``ocixfs.mount.kernelcache``, as ocixfs mounts do), one-day timeouts. Each run drops the
kernel's caches and times `find -ls` over a fresh mount, reading the child's CPU time (all
its threads, from schedstat) before and after; with and without ``ocixfs.mount.fusetrio``,
alternating. Prints medians: wall time, the child's CPU, requests, CPU per request.
"""

from __future__ import annotations

import argparse
import errno
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_find import cpu_seconds, drop_caches

DIRECTORIES = 1263
FILES_PER_DIRECTORY = 7
DAY = 86400.0


def serve(mountpoint: str, with_fusetrio: bool) -> None:
    import pyfuse3
    import trio

    from ocixfs.mount import fusetrio, kernelcache

    kernelcache.enable(pyfuse3.__file__)
    if with_fusetrio:
        fusetrio.install()

    class Tree(pyfuse3.Operations):
        def __init__(self) -> None:
            super().__init__()
            self.requests = 0
            self.attributes = {1: self.make(1, directory=True)}
            self.children: dict[int, list[tuple[bytes, int]]] = {1: []}
            directories, inode = [1], 2
            for index in range(DIRECTORIES):
                parent = directories[index // 4]
                self.children[parent].append((f"d{index}".encode(), inode))
                self.children[inode] = []
                self.attributes[inode] = self.make(inode, directory=True)
                directories.append(inode)
                inode += 1
            for directory in directories:
                for index in range(FILES_PER_DIRECTORY):
                    self.children[directory].append((f"f{index}".encode(), inode))
                    self.attributes[inode] = self.make(inode, directory=False)
                    inode += 1
            for listing in self.children.values():
                listing.sort()

        @staticmethod
        def make(inode: int, *, directory: bool) -> pyfuse3.EntryAttributes:
            attributes = pyfuse3.EntryAttributes()
            attributes.st_ino = inode
            attributes.st_mode = 0o40755 if directory else 0o100644
            attributes.st_nlink = 2 if directory else 1
            attributes.attr_timeout = attributes.entry_timeout = DAY
            return attributes

        async def getattr(self, inode: int, ctx: object = None) -> pyfuse3.EntryAttributes:
            self.requests += 1
            return self.attributes[inode]

        async def lookup(self, parent: int, name: bytes,
                         ctx: object = None) -> pyfuse3.EntryAttributes:
            self.requests += 1
            for entry, inode in self.children.get(parent, ()):
                if entry == name:
                    return self.attributes[inode]
            raise pyfuse3.FUSEError(errno.ENOENT)

        async def opendir(self, inode: int, ctx: object) -> int:
            self.requests += 1
            raise pyfuse3.FUSEError(errno.ENOSYS)  # kernelcache: the kernel keeps listings

        async def readdir(self, fh: int, start: int, token: object) -> None:
            self.requests += 1
            listing = self.children[fh]
            for index in range(start, len(listing)):
                name, inode = listing[index]
                if not pyfuse3.readdir_reply(token, name, self.attributes[inode], index + 1):
                    return

    operations = Tree()
    pyfuse3.init(operations, mountpoint, {"fsname=floor", "default_permissions"})

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pyfuse3.main)
            with trio.open_signal_receiver(15) as signals:
                async for _ in signals:
                    print(operations.requests, flush=True)
                    pyfuse3.terminate()
                    break

    trio.run(main)
    pyfuse3.close()


def one_run(mountpoint: Path, with_fusetrio: bool) -> tuple[float, float, int]:
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(mountpoint)]
        + (["--fusetrio"] if with_fusetrio else []),
        stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(mountpoint):
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("the minimal filesystem did not mount")
            time.sleep(0.05)
        drop_caches()
        before = cpu_seconds(server.pid)
        start = time.perf_counter()
        subprocess.run(["find", str(mountpoint), "-ls"], check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        cpu = cpu_seconds(server.pid) - before
    finally:
        server.terminate()
        out, _ = server.communicate(timeout=30)
    return wall, cpu, int(out.split()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--serve", metavar="MNT", help=argparse.SUPPRESS)
    parser.add_argument("--fusetrio", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.fusetrio)
        return
    mountpoint = Path("/tmp/ocixfs-pyfuse3-floor")
    mountpoint.mkdir(exist_ok=True)
    results: dict[bool, list[tuple[float, float, int]]] = {False: [], True: []}
    for _ in range(args.runs):
        for with_fusetrio in (False, True):
            results[with_fusetrio].append(one_run(mountpoint, with_fusetrio))
    print("| loop | find s | daemon CPU s | requests | CPU per request |")
    print("|---|---:|---:|---:|---:|")
    for with_fusetrio, rows in results.items():
        wall = statistics.median(r[0] for r in rows)
        cpu = statistics.median(r[1] for r in rows)
        requests = rows[0][2]
        name = "pyfuse3 + fusetrio" if with_fusetrio else "pyfuse3"
        print(f"| {name} | {wall:.3f} | {cpu:.3f} | {requests:,} | {1e6 * cpu / requests:.0f} µs |")


if __name__ == "__main__":
    main()
