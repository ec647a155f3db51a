"""The local blob cache: verified fills, atomic renames, reads, leftovers, sharing."""

from __future__ import annotations

import fcntl
import os
import subprocess
import time
from pathlib import Path

import blake3
import pytest
import trio

from ocixfs.cache.blobs import Cache, default_cache_dir
from ocixfs.config import CacheConfig
from ocixfs.errors import BlobCorrupt, CacheError
from ocixfs.image.format import Chunk


def chunk_of(content: bytes) -> Chunk:
    return Chunk(len(content), blake3.blake3(content).digest())


async def fill(cache: Cache, content: bytes, chunk: Chunk | None = None) -> Chunk:
    chunk = chunk or chunk_of(content)
    writer = cache.fill(chunk)
    try:
        writer.write(content)
        await cache.commit(writer)
    finally:
        writer.abort()
    return chunk


def tmp_files(root: Path) -> list[str]:
    return sorted(os.listdir(root / "tmp"))


def blob_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "blobs").rglob("*") if p.is_file())


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert default_cache_dir() == Path("/var/cache/ocixfs")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "ocixfs"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "ocixfs"


async def test_fill_verifies_then_serves(tmp_path: Path) -> None:
    with Cache(tmp_path) as cache:
        content = os.urandom(10_000)
        chunk = await fill(cache, content)
        assert cache.contains(chunk)
        assert await cache.read(chunk, 0, chunk.size) == content
        assert await cache.read(chunk, 9_990, 100) == content[9_990:]
        assert await cache.read(chunk, 10_000, 5) == b""
        assert blob_files(tmp_path) == [cache.path_of(chunk)]
        assert cache.path_of(chunk).parent.name == chunk.hex[:2]
        assert tmp_files(tmp_path) == []
        assert cache.statistics().stored_blobs == 1
        assert cache.statistics().stored_bytes == 10_000
        assert oct(cache.path_of(chunk).stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize(
    "written",
    [b"x" * 99 + b"y", b"x" * 99, b""],
    ids=["wrong-bytes", "short", "nothing"],
)
async def test_bad_fill_leaves_nothing(tmp_path: Path, written: bytes) -> None:
    chunk = chunk_of(b"x" * 100)
    with Cache(tmp_path) as cache:
        writer = cache.fill(chunk)
        writer.write(written)
        with pytest.raises(BlobCorrupt):
            await cache.commit(writer)
        writer.abort()
        assert not cache.contains(chunk)
        assert await cache.read(chunk, 0, 100) is None
    assert blob_files(tmp_path) == []
    assert tmp_files(tmp_path) == []


async def test_overlong_write_refused_at_once(tmp_path: Path) -> None:
    chunk = chunk_of(b"abc")
    with Cache(tmp_path) as cache:
        writer = cache.fill(chunk)
        writer.write(b"ab")
        with pytest.raises(BlobCorrupt, match="more than 3 bytes"):
            writer.write(b"cd")
        writer.abort()
    assert tmp_files(tmp_path) == []


async def test_empty_blob(tmp_path: Path) -> None:
    with Cache(tmp_path) as cache:
        chunk = await fill(cache, b"")
        assert cache.contains(chunk)
        assert await cache.read(chunk, 0, 10) == b""


async def test_large_reads_go_through_threads(tmp_path: Path) -> None:
    content = os.urandom(300_000)
    with Cache(tmp_path, CacheConfig(inline_read_max=4096)) as cache:
        chunk = await fill(cache, content)
        assert await cache.read(chunk, 1, 299_998) == content[1:299_999]
        assert await cache.read(chunk, 5, 100) == content[5:105]


async def test_open_files_are_bounded(tmp_path: Path) -> None:
    contents = [os.urandom(100) for _ in range(6)]
    with Cache(tmp_path, CacheConfig(open_files=2)) as cache:
        chunks = [await fill(cache, content) for content in contents]
        for _ in range(2):
            for chunk, content in zip(chunks, contents, strict=True):
                assert await cache.read(chunk, 0, 100) == content
                assert cache.statistics().open_files <= 2


async def test_concurrent_threaded_reads_survive_lru_churn(tmp_path: Path) -> None:
    contents = [os.urandom(50_000) for _ in range(5)]
    config = CacheConfig(open_files=1, inline_read_max=1000)
    with Cache(tmp_path, config) as cache:
        chunks = [await fill(cache, content) for content in contents]
        results: dict[int, bytes | None] = {}

        async def read(i: int) -> None:
            results[i] = await cache.read(chunks[i % 5], 0, 50_000)

        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(read, i)
        assert all(results[i] == contents[i % 5] for i in range(20))


async def test_damaged_cache_file_is_dropped(tmp_path: Path) -> None:
    with Cache(tmp_path) as cache:
        chunk = await fill(cache, b"hello world")
    cache_path = Cache(tmp_path).path_of(chunk)
    cache_path.write_bytes(b"hello")  # someone truncated it behind our back
    with Cache(tmp_path) as cache:
        assert await cache.read(chunk, 0, 11) is None
        assert not cache.contains(chunk)
        assert cache.statistics().dropped_blobs == 1


def test_invalid_digest_is_refused(tmp_path: Path) -> None:
    with Cache(tmp_path) as cache, pytest.raises(CacheError, match="invalid digest"):
        cache.path_of(Chunk(1, b"../../etc"))


def test_unusable_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(CacheError, match="preparing"):
        Cache(tmp_path / "file" / "cache")


def test_stale_tmp_files_are_removed_at_start(tmp_path: Path) -> None:
    Cache(tmp_path).close()
    tmp = tmp_path / "tmp"
    hexname = "ab" * 32
    old = time.time() - 3600
    paths = {
        "dead-old": tmp / f"{hexname}.{dead_pid()}.00000001",
        "dead-young": tmp / f"{hexname}.{dead_pid()}.00000002",
        "alive-young": tmp / f"{hexname}.{os.getpid()}.00000003",
        "alive-old": tmp / f"{hexname}.{os.getpid()}.00000004",
        "strange-old": tmp / "leftover",
        "strange-young": tmp / "leftover-young",
        "locked-old": tmp / f"{hexname}.{dead_pid()}.00000005",
    }
    for path in paths.values():
        path.write_bytes(b"partial")
    for name in ("dead-old", "alive-old", "strange-old", "locked-old"):
        os.utime(paths[name], (old, old))
    with open(paths["locked-old"], "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a writer in another process still filling
        with Cache(tmp_path) as cache:
            assert cache.remove_stale_tmp() == 0  # the first pass did the work
    left = {name for name, path in paths.items() if path.exists()}
    assert left == {"alive-young", "strange-young", "locked-old"}


async def test_two_caches_on_one_directory(tmp_path: Path) -> None:
    """Two daemons filling the same blob at once, one starting while the other fills."""
    content = os.urandom(200_000)
    chunk = chunk_of(content)
    with Cache(tmp_path) as first:
        writer_a = first.fill(chunk)
        writer_a.write(content[:100_000])
        with Cache(tmp_path) as second:  # its start-up cleanup must spare A's fill
            assert len(tmp_files(tmp_path)) == 1
            await fill(second, content)
            assert await second.read(chunk, 0, chunk.size) == content
            writer_a.write(content[100_000:])
            await first.commit(writer_a)
            assert await first.read(chunk, 0, chunk.size) == content
            assert await second.read(chunk, 0, chunk.size) == content
    assert blob_files(tmp_path) == [Cache(tmp_path).path_of(chunk)]
    assert tmp_files(tmp_path) == []


async def test_many_concurrent_fills_across_caches(tmp_path: Path) -> None:
    contents = [os.urandom(20_000) for _ in range(8)]
    caches = [Cache(tmp_path), Cache(tmp_path)]
    try:
        async with trio.open_nursery() as nursery:
            for i in range(32):
                nursery.start_soon(fill, caches[i % 2], contents[i % 8])
        for content in contents:
            for cache in caches:
                assert await cache.read(chunk_of(content), 0, 20_000) == content
    finally:
        for cache in caches:
            cache.close()
    assert len(blob_files(tmp_path)) == 8
    assert tmp_files(tmp_path) == []
    assert Cache(tmp_path).usage().blobs == 8
    assert Cache(tmp_path).usage().bytes == 8 * 20_000


async def test_discard(tmp_path: Path) -> None:
    with Cache(tmp_path) as cache:
        chunk = await fill(cache, b"data")
        assert await cache.read(chunk, 0, 4) == b"data"
        assert await cache.discard(chunk)
        assert not await cache.discard(chunk)
        assert await cache.read(chunk, 0, 4) is None


def resident_bytes(path: Path) -> int:
    """How much of ``path`` is in the page cache (util-linux ``fincore``)."""
    result = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES",
                             os.fspath(path)], capture_output=True, text=True, check=True)
    return int(result.stdout.strip())


async def test_warm_reads_cached_blobs_into_memory_and_skips_missing_ones(
    tmp_path: Path,
) -> None:
    """``Cache.warm`` queues the reads of cached blobs (out of the page cache first:
    POSIX_FADV_DONTNEED, after a sync); a blob that is not cached is skipped."""
    with Cache(tmp_path) as cache:
        chunk = await fill(cache, os.urandom(3 << 20))
        path = cache.path_of(chunk)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        if resident_bytes(path) != 0:
            pytest.skip(f"{path}: this file system keeps it in memory anyway")
        await cache.warm([chunk_of(b"not cached"), chunk])
        deadline = time.monotonic() + 10  # (the reads are queued, not waited for)
        while resident_bytes(path) < chunk.size * 0.9 and time.monotonic() < deadline:
            await trio.sleep(0.01)
        assert resident_bytes(path) >= chunk.size * 0.9  # (advice: the kernel may trim)
