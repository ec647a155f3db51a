#!/usr/bin/env python3
"""Benchmark building the inode table, and what FUSE metadata requests then cost.

Builds synthetic manifests shaped like a distribution root filesystem (nested directories,
regular files, some chunked, symlinks, hardlinks, implicit parents), in canonical order, and
prints the median over several runs of:

- build: ``Tree.from_manifest``
- totals: the first ``tree.totals`` (walks every inode once; what ``statfs`` needs)
- walk: resolving every path name by name from the root (what lookups do)
- attrs: building every inode's ``EntryAttributes`` (cached per inode afterwards)
- MiB: memory held by the tree (tracemalloc, separate run)

Usage: venv/bin/python scripts/bench_tree.py [--sizes 10000,100000,300000] [--runs 5] [--cpu]
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ocixfs.image.format import Chunk, Entry, Kind, Manifest  # noqa: E402
from ocixfs.image.tree import Tree  # noqa: E402
from ocixfs.mount.fs import Operations  # noqa: E402

NS = 1_700_000_000_000_000_000


def synthetic_manifest(count: int, seed: int = 1) -> Manifest:
    """About ``count`` entries: ~8 % directories, 85 % files, 5 % symlinks, 2 % hardlinks."""
    rng = random.Random(seed)
    entries: dict[str, Entry] = {"/": Entry(Kind.DIRECTORY, mode=0o755, mtime=NS)}
    directories = ["/"]
    files: list[str] = []
    while len(entries) < count:
        roll = rng.random()
        parent = rng.choice(directories)
        path = f"{parent.rstrip('/')}/n{len(entries):x}{'_' * rng.randrange(8)}"
        if roll < 0.08:
            # Every other new directory is left implicit: only a child names it.
            if rng.random() < 0.5:
                entries[path] = Entry(Kind.DIRECTORY, mode=0o755, mtime=NS)
                directories.append(path)
            else:
                directories.append(path)
                child = f"{path}/init"
                entries[child] = _file(rng)
                files.append(child)
        elif roll < 0.93:
            entries[path] = _file(rng)
            files.append(path)
        elif roll < 0.98:
            entries[path] = Entry(Kind.SYMLINK, mode=0o777, mtime=NS, target="../lib/x")
        elif files:
            entries[path] = Entry(Kind.HARDLINK, target=rng.choice(files))
    ordered = sorted(entries.items(), key=lambda item: (len(item[0].encode()), item[0].encode()))
    return Manifest(version=1, entries=dict(ordered))


def _file(rng: random.Random) -> Entry:
    size = rng.choice((0, 100, 4096, 70_000, 3_000_000))
    digest = rng.randbytes(32)
    chunks = None
    if size > 1_000_000:
        chunks = tuple(
            Chunk(size // 3 + (size % 3 if i == 2 else 0), rng.randbytes(32)) for i in range(3)
        )
    return Entry(
        Kind.REGULAR,
        mode=0o644,
        uid=0,
        gid=0,
        mtime=NS,
        size=size,
        digest=digest if size else None,
        chunks=chunks,
    )


CLOCK = time.perf_counter


def median_ms(
    fn: Callable[[], object], runs: int, setup: Callable[[], None] | None = None
) -> float:
    times = []
    for _ in range(runs):
        if setup is not None:
            setup()
        gc.collect()
        start = CLOCK()
        fn()
        times.append(CLOCK() - start)
    return statistics.median(times) * 1e3


def walk_all(tree: Tree, paths: list[str]) -> None:
    """Resolve every path component by component, as a series of FUSE lookups would."""
    for path in paths:
        node = tree.root
        for name in path.split("/")[1:]:
            found = node.child(name.encode())
            assert found is not None
            node = found


def attrs_all(tree: Tree) -> None:
    ops = Operations(tree, _NoReader())
    for node in tree.iter_nodes():
        ops._attributes(node)


class _NoReader:
    async def read(self, blobs: object, offset: int, size: int) -> bytes:
        raise AssertionError("not used")


def tree_mib(manifest: Manifest) -> float:
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    tree = Tree.from_manifest(manifest)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del tree
    return (after - before) / 2**20


def bench(size: int, runs: int) -> str:
    manifest = synthetic_manifest(size)
    tree = Tree.from_manifest(manifest)
    paths = [path for path in manifest.entries if path != "/"]
    fresh: list[Tree] = []

    def new_tree() -> None:
        fresh[:] = [Tree.from_manifest(manifest)]

    build = median_ms(partial(Tree.from_manifest, manifest), runs)
    totals = median_ms(lambda: fresh[0].totals, runs, setup=new_tree)
    walk = median_ms(partial(walk_all, tree, paths), runs)
    attrs = median_ms(partial(attrs_all, tree), runs)
    mib = tree_mib(manifest)
    return (
        f"{tree.entry_count:>9} {tree.inode_count:>8} {build:>9.1f} {totals:>9.1f} "
        f"{walk:>8.1f} {attrs:>9.1f} {mib:>9.1f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,300000")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--cpu", action="store_true", help="time with process CPU time (steadier on a busy host)"
    )
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.cpu else time.perf_counter
    clock = "CPU" if args.cpu else "wall-clock"
    print(f"Python {sys.version.split()[0]}, median {clock} time of {args.runs} runs")
    print(
        f"{'entries':>9} {'inodes':>8} {'build ms':>9} {'totals ms':>9} {'walk ms':>8} "
        f"{'attrs ms':>9} {'tree MiB':>9}"
    )
    for size in (int(s) for s in args.sizes.split(",")):
        print(bench(size, args.runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
