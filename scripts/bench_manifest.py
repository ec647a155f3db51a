#!/usr/bin/env python3
"""Time loading a manifest into its inode tree, first (decode, validate, build, write the
index) and second (from the host's index), step by step, for generated images.

Prints median CPU and wall seconds of several runs per step; a fresh cache per first load.

    venv/bin/python scripts/bench_manifest.py [--sizes 10000,100000] [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ocixfs.cache import index
from ocixfs.image.format import decode, encode, manifest_digest
from ocixfs.image.packed import pack
from ocixfs.image.tree import Tree
from scripts.bench_format import generate


def _time(step: Callable[[], object], runs: int) -> tuple[float, float]:
    walls, cpus = [], []
    for _ in range(runs):
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print(f"{'entries':>8} {'step':<28} {'wall s':>8} {'CPU s':>8}")
    for size in map(int, args.sizes.split(",")):
        _bench(size, args.runs)


def _bench(size: int, runs: int) -> None:
    """One table block: each step, then whole first loads into fresh caches."""
    data = encode(generate(size))
    manifest = decode(data)
    tree = Tree.from_manifest(manifest)
    with tempfile.TemporaryDirectory() as scratch:
        cache = Path(scratch) / "cache"
        digest = manifest_digest(data)
        steps: list[tuple[str, Callable[[], object]]] = [
            ("digest (BLAKE3)", lambda: manifest_digest(data)),
            ("decode + validate", lambda: decode(data)),
            ("tree build", lambda: Tree.from_manifest(manifest)),
            ("index pack", lambda: pack(tree)),
            ("index write (pack + file)", lambda: index.write_index(cache, digest, tree)),
            ("index load (read, authenticate)", lambda: index.read_index(
                index.index_path(cache, digest), digest)),
            ("second load: load_tree", lambda: index.load_tree(data, digest, cache,
                                                                 source="m").root),
        ]
        for name, step in steps:
            wall, cpu = _time(step, runs)
            print(f"{size:>8} {name:<28} {wall:>8.3f} {cpu:>8.3f}")
        first = []
        for run in range(runs):
            fresh = Path(scratch) / f"fresh{run}"
            first.append(_time(lambda fresh=fresh: index.load_tree(
                data, digest, fresh, source="m"), 1))
        print(f"{size:>8} {'first load: load_tree':<28} "
              f"{statistics.median(w for w, _ in first):>8.3f} "
              f"{statistics.median(c for _, c in first):>8.3f}")


if __name__ == "__main__":
    main()
