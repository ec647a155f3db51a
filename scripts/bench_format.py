#!/usr/bin/env python3
"""Benchmark OCIX manifest encode/decode on a generated, realistic root filesystem tree.

The tree looks like a distribution image: nested directories under /usr, /etc, /var...,
mostly regular files (some empty, some sharing content), symlinks, hardlinks, device nodes
and, for version 1, xattrs on a few files and chunk lists on large files. Prints one table:
median wall and CPU time of several runs (CPU time is the steadier figure on a shared
machine) and the peak memory traced by tracemalloc during one run, per operation.

    venv/bin/python scripts/bench_format.py [--entries 100000] [--runs 5] [--version 1]
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import random
import statistics
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import cbor2

from ocixfs.image.format import Chunk, Entry, Kind, Manifest, decode, encode, path_sort_key

__all__ = ["generate", "main"]

TOP = ("usr", "etc", "var", "opt", "srv", "home")
WORDS = ("lib", "share", "bin", "python3", "site-packages", "doc", "locale", "man", "include",
         "x86_64-linux-gnu", "perl5", "zoneinfo", "terminfo", "icons", "fonts", "modules")
BASE_TIME = 1_700_000_000 * 10**9


def _digest(seed: int) -> bytes:
    return hashlib.blake2s(seed.to_bytes(8, "big"), digest_size=32).digest()


def generate(entries: int, *, version: int = 1, seed: int = 1) -> Manifest:
    """A deterministic manifest of about ``entries`` entries shaped like an OS image."""
    rng = random.Random(seed)
    tree: dict[str, Entry] = {"/": Entry(Kind.DIRECTORY, mode=0o755, uid=0, gid=0)}
    directories = ["/"]
    regular: list[str] = []
    while len(tree) < entries:
        roll = rng.random()
        where = rng.choice(directories)
        name = f"{rng.choice(WORDS)}{rng.randrange(10**6)}"
        path = ("/" if where == "/" else where + "/") + (rng.choice(TOP) if where == "/" else name)
        if path in tree:
            continue
        # Most files carry one of a few package-install times; the rest are all different.
        if rng.random() < 0.7:
            mtime = BASE_TIME + rng.randrange(50) * 3600 * 10**9
        else:
            mtime = BASE_TIME + rng.randrange(10**15) + rng.choice((0, rng.randrange(10**9)))
        owner: dict[str, Any] = (
            {} if rng.random() < 0.9 else {"uid": 1000, "gid": 1000, "username": "app",
                                           "groupname": "app"}
        )
        if roll < 0.12 or where == "/":
            tree[path] = Entry(Kind.DIRECTORY, mode=0o755, mtime=mtime, **owner)
            directories.append(path)
        elif roll < 0.80:
            tree[path] = _regular(rng, mtime, owner, version)
            regular.append(path)
        elif roll < 0.94:
            target = rng.choice(("../lib/libc.so.6", "/etc/alternatives/editor", "python3.11"))
            tree[path] = Entry(Kind.SYMLINK, mode=0o777, mtime=mtime, target=target, **owner)
        elif roll < 0.99 and regular:
            target = rng.choice(regular[-500:])
            if path_sort_key(target) < path_sort_key(path):
                tree[path] = Entry(Kind.HARDLINK, target=target)
        else:
            kind = rng.choice((Kind.CHARACTER, Kind.BLOCK, Kind.FIFO))
            rdev = None if kind is Kind.FIFO else (rng.randrange(1, 260), rng.randrange(256))
            tree[path] = Entry(kind, mode=0o660, mtime=mtime, rdev=rdev, **owner)
    return Manifest(version, tree)


def _regular(rng: random.Random, mtime: int, owner: dict[str, Any], version: int) -> Entry:
    size = 0 if rng.random() < 0.05 else int(rng.lognormvariate(8.5, 2.0)) + 1
    digest = None if size == 0 else _digest(rng.randrange(10**9 if rng.random() < 0.9 else 50))
    chunks = None
    xattrs = None
    if version >= 1 and size > 4 << 20:
        chunk = 1 << 20
        sizes = [chunk] * (size // chunk) + ([size % chunk] if size % chunk else [])
        chunks = tuple(Chunk(part, _digest(rng.randrange(10**9))) for part in sizes)
    if version >= 1 and rng.random() < 0.01:
        xattrs = {"security.capability": b"\x01\x00\x00\x02" + bytes(16)}
    mode = rng.choice((0o644, 0o644, 0o644, 0o755, 0o4755, 0o600))
    return Entry(Kind.REGULAR, mode=mode, mtime=mtime, size=size, digest=digest, chunks=chunks,
                 xattrs=xattrs, **owner)


def _measure(operation: Callable[[], object], runs: int) -> tuple[float, float, float]:
    """(median wall seconds, median CPU seconds, peak MiB traced during one extra run)."""
    wall, cpu = [], []
    for _ in range(runs):
        gc.collect()
        start, start_cpu = time.perf_counter(), time.process_time()
        operation()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    gc.collect()
    tracemalloc.start()
    operation()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return statistics.median(wall), statistics.median(cpu), peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--version", type=int, default=1, choices=(0, 1))
    args = parser.parse_args()

    manifest = generate(args.entries, version=args.version)
    data = encode(manifest)
    assert decode(data) == manifest
    decoded = cbor2.loads(data)
    counts: dict[str, int] = {}
    for entry in manifest.entries.values():
        counts[entry.kind.value] = counts.get(entry.kind.value, 0) + 1
    print(f"manifest v{args.version}: {len(manifest.entries)} entries, {len(data)} bytes "
          f"({len(data) / len(manifest.entries):.0f} B/entry); "
          + ", ".join(f"{kind} {n}" for kind, n in sorted(counts.items())))
    paths = sorted(len(path.encode()) for path in manifest.entries)
    print(f"median path {paths[len(paths) // 2]} bytes, longest {paths[-1]}")
    print(f"{'operation':<12} {'wall s':>8} {'CPU s':>8} {'entries/s':>11} {'peak MiB':>9}")
    operations: list[tuple[str, Callable[[], object]]] = [
        ("encode", lambda: encode(manifest)),
        ("decode", lambda: decode(data)),
        # For scale on a given machine: cbor2's C decoder on the same bytes, no validation.
        ("cbor2.loads", lambda: cbor2.loads(data)),
        # The C route to a canonical-form check: re-encode what cbor2 decoded, compare bytes.
        ("cbor2.dumps", lambda: cbor2.dumps(decoded, canonical=True) == data),
    ]
    for name, operation in operations:
        seconds, cpu, peak = _measure(operation, args.runs)
        rate = len(manifest.entries) / seconds
        print(f"{name:<12} {seconds:>8.3f} {cpu:>8.3f} {rate:>11,.0f} {peak:>9.1f}")


if __name__ == "__main__":
    main()
