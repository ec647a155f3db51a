#!/usr/bin/env python3
"""Measure the data path (reader → cache → fetcher) without FUSE and print a table.

A throw-away store is served by a stdlib HTTP server on 127.0.0.1 (and read as file://);
each cold run starts with an empty cache. Reads are 128 KiB, like the kernel's.

    venv/bin/python scripts/bench_reader.py [--mib 64]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import blake3
import trio
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ocixfs.config import CacheConfig, ReaderConfig  # noqa: E402
from ocixfs.fetch.reader import Reader, open_reader  # noqa: E402
from ocixfs.image.format import Chunk  # noqa: E402
from ocixfs.store.spec import parse_stores

READ = 128 * 1024
Work = Callable[["Reader"], Awaitable[tuple[int, int]]]


def write_store(root: Path, contents: list[bytes]) -> list[Chunk]:
    directory = root / "blobs" / "blake3"
    directory.mkdir(parents=True, exist_ok=True)
    compressor = zstandard.ZstdCompressor(level=3)
    chunks = []
    for content in contents:
        chunk = Chunk(len(content), blake3.blake3(content).digest())
        (directory / chunk.hex).write_bytes(content)
        (directory / f"{chunk.hex}.zst").write_bytes(compressor.compress(content))
        chunks.append(chunk)
    return chunks


_SERVER = """
import functools, http.server, sys
class Handler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like any real server
    def log_message(self, *args):
        pass
handler = functools.partial(Handler, directory=sys.argv[1])
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


def serve(root: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A stdlib HTTP server in its own process (so it does not share our GIL)."""
    process = subprocess.Popen([sys.executable, "-c", _SERVER, str(root)], stdout=subprocess.PIPE)
    assert process.stdout is not None
    return process, f"http://127.0.0.1:{int(process.stdout.readline())}"


async def sequential(reader: Reader, blobs: tuple[Chunk, ...]) -> tuple[int, int]:
    """Read a file start to end; returns (bytes, reads)."""
    size = sum(chunk.size for chunk in blobs)
    for offset in range(0, size, READ):
        await reader.read(blobs, offset, READ)
    return size, -(-size // READ)


async def many_files(reader: Reader, files: Sequence[tuple[Chunk, ...]]) -> tuple[int, int]:
    """Read every (small) file at once, as a starting program does; returns (bytes, reads)."""
    async with trio.open_nursery() as nursery:
        for blobs in files:
            nursery.start_soon(reader.read, blobs, 0, READ)
    return sum(blobs[0].size for blobs in files), len(files)


def timed(
    store: str, cache: Path, config: ReaderConfig, work: Work
) -> tuple[float, int, int]:
    async def main() -> tuple[float, int, int]:
        async with open_reader(parse_stores([store]), cache, config) as reader:
            started = time.perf_counter()
            size, reads = await work(reader)
            return time.perf_counter() - started, size, reads

    return trio.run(main)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64, help="size of the big file (MiB)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        plain, packed = base / "plain", base / "zstd"
        big = os.urandom(args.mib << 20)
        text = (b"ocixfs benchmark line of fairly compressible text %d\n" * 20000)[: 1 << 20]
        small = [os.urandom(4096) + bytes([i % 256, i // 256]) for i in range(300)]
        pieces = [big[i : i + (1 << 20)] for i in range(0, len(big), 1 << 20)]
        contents = [big, *pieces, *small, text * 8]
        for root in (plain, packed):
            chunks = write_store(root, contents)
        (packed / "ocix-store.json").write_text('{"compression": ["zstd"]}')
        whole = (chunks[0],)
        chunked = tuple(chunks[1 : 1 + len(pieces)])
        files = [(c,) for c in chunks[1 + len(pieces) : -1]]
        texty = (chunks[-1],)
        server, url = serve(base)
        rows: list[tuple[str, float, int, str]] = []
        default = ReaderConfig()
        no_fsync = ReaderConfig(cache=CacheConfig(fsync=False))
        threaded = ReaderConfig(cache=CacheConfig(inline_read_max=0))
        cases: list[tuple[str, str, ReaderConfig, Work, bool]] = [
            ("cold, whole-file blob, http", f"{url}/plain", default,
             lambda r: sequential(r, whole), True),
            ("cold, whole-file blob, http, no fsync", f"{url}/plain", no_fsync,
             lambda r: sequential(r, whole), True),
            ("cold, 1 MiB chunks + readahead, http", f"{url}/plain", default,
             lambda r: sequential(r, chunked), True),
            ("cold, whole-file blob, file://", plain.as_uri(), default,
             lambda r: sequential(r, whole), True),
            ("cold, 300 x 4 KiB files at once, http", f"{url}/plain", default,
             lambda r: many_files(r, files), True),
            ("cold, 300 x 4 KiB files at once, http, no fsync", f"{url}/plain", no_fsync,
             lambda r: many_files(r, files), True),
            ("cold, 300 x 4 KiB files at once, file://", plain.as_uri(), default,
             lambda r: many_files(r, files), True),
            ("cold, 8 MiB text, http zstd", f"{url}/zstd", default,
             lambda r: sequential(r, texty), True),
            ("cold, 8 MiB text, http plain", f"{url}/plain", default,
             lambda r: sequential(r, texty), True),
            ("warm, whole-file blob (inline pread)", f"{url}/plain", default,
             lambda r: sequential(r, whole), False),
            ("warm, whole-file blob (pread in thread)", f"{url}/plain", threaded,
             lambda r: sequential(r, whole), False),
        ]
        cache = base / "cache"
        for name, store, config, work, cold in cases:
            if cold and cache.exists():
                shutil.rmtree(cache)
            if not cold:
                timed(store, cache, config, work)  # make sure it is cached
            seconds, size, reads = timed(store, cache, config, work)
            rows.append((name, seconds, size, f"{seconds / reads * 1e6:8.1f}"))
        server.terminate()
        server.wait()
    print(f"{'case':44} {'seconds':>8} {'MB/s':>8} {'us/read':>8}")
    for name, seconds, size, per_read in rows:
        print(f"{name:44} {seconds:8.3f} {size / seconds / 1e6:8.1f} {per_read}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
