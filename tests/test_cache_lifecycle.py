"""Cache lifecycle: quota and LRU eviction, pins, the shared usage counter, several
processes on one cache, crashes at any point, fsck/gc/stats, and a full disk (at the cache
level here, through real mounts in test_cache_lifecycle_mount.py)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest
import trio

from ocixfs.cache.blobs import Cache
from ocixfs.cache.directory import CacheDirectory
from ocixfs.cache.fsck import check
from ocixfs.cache.layout import USAGE_FILE, scan_blobs
from ocixfs.cache.sizes import parse_quota, parse_size
from ocixfs.config import CacheConfig, CacheQuota, FetchConfig, ReaderConfig
from ocixfs.errors import CacheFullError, UsageError
from ocixfs.image.format import Chunk
from ocixfs.store.spec import parse_stores
from tests.faultserver import Fault, FaultServer, make_store
from tests.mounting import run_ocixfs, wait_for

KiB = 1 << 10
MiB = 1 << 20
REPO = Path(__file__).resolve().parent.parent


def chunk_of(content: bytes) -> Chunk:
    return Chunk(len(content), blake3.blake3(content).digest())


def content(seed: str, size: int) -> bytes:
    return blake3.blake3(seed.encode()).digest(length=size)


async def fill(cache: Cache, data: bytes) -> Chunk:
    chunk = chunk_of(data)
    writer = cache.fill(chunk)
    try:
        await trio.to_thread.run_sync(writer.write, data)
        await cache.commit(writer)
    finally:
        writer.abort()
    return chunk


def quota(size: int, **changes: object) -> CacheConfig:
    return CacheConfig(quota=CacheQuota(size=size), fsync=False, **changes)  # type: ignore[arg-type]


def set_used(cache: Cache, chunk: Chunk, when: float) -> None:
    os.utime(cache.path_of(chunk), (when, when))


def names(root: Path) -> set[str]:
    return {blob.name for blob in scan_blobs(root / "blobs").blobs}


def tmp_files(root: Path) -> list[str]:
    return sorted(os.listdir(root / "tmp"))


# --- sizes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10G", CacheQuota(size=10 << 30)),
        ("500M", CacheQuota(size=500 << 20)),
        ("1.5TiB", CacheQuota(size=int(1.5 * (1 << 40)))),
        ("4096", CacheQuota(size=4096)),
        ("64kb", CacheQuota(size=64 << 10)),
        ("20%", CacheQuota(share=0.2, cap=None)),
        ("100%", CacheQuota(share=1.0, cap=None)),
        ("unlimited", CacheQuota(share=None, cap=None)),
    ],
)
def test_parse_quota(text: str, expected: CacheQuota) -> None:
    assert parse_quota(text) == expected


@pytest.mark.parametrize("text", ["", "G", "-1G", "0", "10X", "0%", "101%", "abc%", "1e3"])
def test_parse_quota_refuses_nonsense(text: str) -> None:
    with pytest.raises(UsageError):
        parse_quota(text)


def test_quota_limits() -> None:
    default = CacheQuota()
    assert default.limit(100 << 30) == 10 << 30  # 10 % of a small disk
    assert default.limit(4 << 40) == 20 << 30  # capped on a big one
    assert parse_quota("20%").limit(1000) == 200
    assert parse_quota("unlimited").limit(1000) is None
    assert parse_size("1k") == 1024


# --- quota and eviction ------------------------------------------------------------------


async def test_fill_over_quota_evicts_least_recently_used_to_low_water(tmp_path: Path) -> None:
    config = quota(100_000)  # evictions start in the background past 95 000 bytes
    with Cache(tmp_path, config, rescan=False) as cache:
        chunks = [await fill(cache, content(f"b{i}", 10_000)) for i in range(9)]
        for age, chunk in enumerate(reversed(chunks)):  # chunks[0] is the least recent
            set_used(cache, chunk, time.time() - 1000 - age)
        assert cache.statistics().usage_bytes == 90_000
        newcomer = await fill(cache, content("new", 19_000))
        # Past the limit, the fill itself evicted just enough: the least recent blob.
        assert chunks[0].hex not in names(tmp_path)
        assert await cache.read(chunks[0], 0, 10) is None  # a reader would fetch it again
        # Then the background eviction went down to the low-water mark (90 %), sparing
        # the newcomer (too recent to go).
        cache.directory.settle()
        assert names(tmp_path) == {c.hex for c in chunks[2:]} | {newcomer.hex}
        stats = cache.statistics()
        assert (stats.evicted_blobs, stats.evicted_bytes) == (2, 20_000)
        assert stats.usage_bytes == 89_000 == cache.usage().bytes


async def test_a_read_makes_a_blob_recent(tmp_path: Path) -> None:
    config = quota(50_000)
    with Cache(tmp_path, config, rescan=False) as cache:
        chunks = [await fill(cache, content(f"r{i}", 10_000)) for i in range(4)]
        for age, chunk in enumerate(reversed(chunks)):
            set_used(cache, chunk, time.time() - 1000 - age)
        assert await cache.read(chunks[0], 0, 5) == content("r0", 10_000)[:5]
    before = os.stat(Cache(tmp_path, config, rescan=False).path_of(chunks[0]))
    assert before.st_atime > time.time() - 60  # the use was recorded, explicitly
    assert before.st_mtime < time.time() - 900  # and the fill time kept
    with Cache(tmp_path, config, rescan=False) as cache:  # nothing held open any more
        await fill(cache, content("new", 10_000))
        cache.directory.settle()
    assert chunks[0].hex in names(tmp_path)
    assert chunks[1].hex not in names(tmp_path)


async def test_blobs_held_open_are_never_evicted(tmp_path: Path) -> None:
    """Two caches on one directory act like two daemons: one holds a blob open while the
    other fills past the quota."""
    unlimited = CacheConfig(quota=CacheQuota(share=None, cap=None), fsync=False)
    with (
        Cache(tmp_path, unlimited, rescan=False) as holder,
        Cache(tmp_path, quota(40_000), rescan=False) as filler,
    ):
        held = await fill(holder, content("held", 10_000))
        set_used(holder, held, time.time() - 5000)  # the least recent of all
        assert await holder.read(held, 0, 4) == content("held", 4)
        for i in range(8):
            await fill(filler, content(f"f{i}", 10_000))
            assert held.hex in names(tmp_path)
            assert await holder.read(held, 0, 10_000) == content("held", 10_000)
        assert filler.usage().bytes <= 40_000
    with Cache(tmp_path, quota(40_000), rescan=False) as filler:  # the holder is gone
        set_used(filler, held, time.time() - 5000)
        for i in range(4):
            await fill(filler, content(f"g{i}", 10_000))
        filler.directory.settle()
        assert held.hex not in names(tmp_path)


async def test_only_pinned_blobs_left_goes_over_quota_instead_of_failing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    unlimited = CacheConfig(quota=CacheQuota(share=None, cap=None), fsync=False)
    with (
        Cache(tmp_path, unlimited, rescan=False) as holder,
        Cache(tmp_path, quota(30_000), rescan=False) as filler,
    ):
        held = [await fill(holder, content(f"h{i}", 10_000)) for i in range(3)]
        for chunk in held:
            assert await holder.read(chunk, 0, 1) is not None
        extra = await fill(filler, content("extra", 10_000))
        filler.directory.settle()  # the background eviction spares the fresh newcomer
        assert names(tmp_path) == {c.hex for c in held} | {extra.hex}
        assert filler.statistics().usage_bytes == 40_000
        assert "over its quota" in caplog.text


async def test_blob_larger_than_quota_is_refused(tmp_path: Path) -> None:
    with Cache(tmp_path, quota(10_000), rescan=False) as cache:
        small = await fill(cache, content("small", 5_000))
        with pytest.raises(CacheFullError, match="larger than the cache quota"):
            await fill(cache, content("big", 20_000))
        assert names(tmp_path) == {small.hex}
        assert tmp_files(tmp_path) == []
        assert cache.statistics().usage_bytes == 5_000


async def test_open_descriptors_are_bounded_by_bytes_too(tmp_path: Path) -> None:
    config = quota(100_000)  # open_share 10 %: 10 000 bytes may stay open (and pinned)
    with Cache(tmp_path, config, rescan=False) as cache:
        chunks = [await fill(cache, content(f"o{i}", 4_000)) for i in range(6)]
        for chunk in chunks:
            assert await cache.read(chunk, 0, 1) is not None
            assert cache.statistics().open_bytes <= 10_000
        assert cache.statistics().open_files == 2
        big = await fill(cache, content("big", 30_000))
        assert await cache.read(big, 0, 1) is not None
        assert cache.statistics().open_files == 1  # the newest always stays open


# --- the shared counter ------------------------------------------------------------------


async def test_counter_is_exact_with_two_caches_filling_the_same_blobs(tmp_path: Path) -> None:
    contents = [content(f"s{i}", 5_000 + i) for i in range(12)]
    unlimited = CacheConfig(quota=CacheQuota(share=None, cap=None), fsync=False)
    caches = [Cache(tmp_path, unlimited, rescan=False) for _ in range(2)]
    try:
        async with trio.open_nursery() as nursery:
            for i in range(48):
                nursery.start_soon(fill, caches[i % 2], contents[i % 12])
        counted = caches[0].directory.usage.read()
        assert (counted.blobs, counted.bytes) == (12, sum(len(c) for c in contents))
    finally:
        for cache in caches:
            cache.close()


async def test_discarding_a_damaged_blob_updates_the_counter(tmp_path: Path) -> None:
    with Cache(tmp_path, rescan=False) as cache:
        chunk = await fill(cache, content("d", 1000))
        await fill(cache, content("e", 500))
    Path(Cache(tmp_path, rescan=False).path_of(chunk)).write_bytes(b"short")
    with Cache(tmp_path, rescan=False) as cache:
        assert await cache.read(chunk, 0, 10) is None
        assert cache.statistics().usage_bytes == 1500 - 5  # what was on disk went away
        rebased = cache.directory.rescan(wait=10)
        assert rebased is not None and rebased.bytes == 500


def _counter(root: Path) -> tuple[int, int, bool]:
    directory = CacheDirectory(root, create=False)
    try:
        counted = directory.usage.read()
        return counted.bytes, counted.blobs, counted.trusted
    finally:
        directory.close()


@pytest.mark.parametrize("damage", ["garbage", "missing", "other-boot", "too-low"])
async def test_a_wrong_counter_is_repaired_by_the_start_up_rescan(
    tmp_path: Path, damage: str
) -> None:
    with Cache(tmp_path, rescan=False) as cache:
        for i in range(5):
            await fill(cache, content(f"c{i}", 3_000))
        assert cache.directory.rescan(wait=10) is not None
    assert _counter(tmp_path) == (15_000, 5, True)
    usage = tmp_path / USAGE_FILE
    record = bytearray(usage.read_bytes())
    if damage == "garbage":
        usage.write_bytes(os.urandom(48))
    elif damage == "missing":
        usage.unlink()
    elif damage == "other-boot":
        record[32:48] = bytes(16)
        record[8:16] = (1).to_bytes(8, "little")  # and a wrong total
        usage.write_bytes(bytes(record))
    else:  # a valid, trusted, recent record that is wrong is only fixed by an eviction
        record[8:16] = (1000).to_bytes(8, "little")
        usage.write_bytes(bytes(record))
    with Cache(tmp_path, quota(1 << 30)) as cache:
        if damage == "too-low":
            assert not cache.directory.needs_rescan()
            assert cache.directory.rescan(wait=10) is not None
        wait_for(lambda: _counter(tmp_path) == (15_000, 5, True), 30, "the rescan")


# --- several processes -------------------------------------------------------------------

FILLER = r"""
import itertools, sys, trio, blake3
from pathlib import Path
from ocixfs.cache.blobs import Cache
from ocixfs.config import CacheConfig, CacheQuota
from ocixfs.image.format import Chunk

root, name, count, size, limit = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])

async def main() -> None:
    config = CacheConfig(quota=CacheQuota(size=limit), fsync=False)
    with Cache(Path(root), config) as cache:
        for i in itertools.count() if count < 0 else range(count):
            data = blake3.blake3(f"{name}-{i % 40}".encode()).digest(length=size)
            writer = cache.fill(Chunk(len(data), blake3.blake3(data).digest()))
            try:
                for k in range(0, size, 4096):
                    await trio.to_thread.run_sync(writer.write, data[k:k + 4096])
                await cache.commit(writer)
            finally:
                writer.abort()
            print(i, flush=True)

trio.run(main)
"""


def start_filler(root: Path, name: str, count: int, size: int, limit: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", FILLER, os.fspath(root), name, str(count), str(size), str(limit)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_processes_sharing_a_cache_keep_it_under_quota(tmp_path: Path) -> None:
    limit = 200 * KiB
    fillers = [start_filler(tmp_path, f"p{n}", 40, 20 * KiB, limit) for n in range(3)]
    for filler in fillers:
        _, err = filler.communicate(timeout=120)
        assert filler.returncode == 0, err
    scan = scan_blobs(tmp_path / "blobs")
    assert 0 < scan.bytes <= limit
    directory = CacheDirectory(tmp_path, create=False)
    try:
        assert directory.usage.read().bytes >= scan.bytes  # never below the truth
        rebased = directory.rescan(wait=10)
        assert rebased is not None and rebased.bytes == scan.bytes
        report = check(directory, remove=False)
        assert (report.bad, report.strays) == ((), ())
    finally:
        directory.close()
    assert tmp_files(tmp_path) == []


def test_kill_mid_fill_exposes_nothing_and_next_start_cleans_up(tmp_path: Path) -> None:
    store, cache_dir = tmp_path / "store", tmp_path / "cache"
    data = content("big", 3 * MiB)
    (chunk,) = make_store(store, [data])
    script = (
        "import sys, trio\n"
        "from pathlib import Path\n"
        "from ocixfs.config import FetchConfig, ReaderConfig\n"
        "from ocixfs.image.format import Chunk\n"
        "from ocixfs.fetch.reader import Priority, open_reader\n"
        "from ocixfs.store.spec import parse_stores\n"
        "async def main():\n"
        "    config = ReaderConfig(fetch=FetchConfig(read_timeout=60, deadline=60))\n"
        "    stores = parse_stores([sys.argv[1]])\n"
        "    async with open_reader(stores, Path(sys.argv[2]), config) as reader:\n"
        "        await reader.ensure(Chunk(int(sys.argv[3]), bytes.fromhex(sys.argv[4])),\n"
        "                            priority=Priority.ON_DEMAND)\n"
        "trio.run(main)\n"
    )
    with FaultServer(store) as server:
        server.fault(chunk.hex, Fault(stall_body=60, stall_after=2 * MiB))
        process = subprocess.Popen(
            [sys.executable, "-c", script, server.url, os.fspath(cache_dir), str(chunk.size),
             chunk.hex], cwd=REPO, stderr=subprocess.PIPE,
        )
        try:
            def partial_written() -> bool:
                tmp = cache_dir / "tmp"
                return tmp.is_dir() and any(p.stat().st_size > 0 for p in tmp.iterdir())

            wait_for(partial_written, 60, "a partial fill")

            def fill_name() -> str:
                return next(n for n in tmp_files(cache_dir) if not n.endswith(".fetch"))

            with Cache(cache_dir, rescan=False) as other:  # another daemon, meanwhile
                # its fill and its fetch claim are alive: left alone
                assert tmp_files(cache_dir) == sorted([f"{chunk.hex}.fetch", fill_name()])
                assert not other.contains(chunk)
                assert trio.run(other.read, chunk, 0, 10) is None
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
    assert len(tmp_files(cache_dir)) == 2  # the dead fill and its claim
    with Cache(cache_dir, rescan=False) as cache:
        assert tmp_files(cache_dir) == []
        assert not cache.contains(chunk)
    assert names(cache_dir) == set()


def test_killing_fills_at_random_points_never_leaves_a_bad_cache(tmp_path: Path) -> None:
    """Fills with evictions (a small quota) killed again and again: every start finds
    only verified blobs, no leftovers, and a counter that is never below the truth."""
    rng = random.Random(7)
    limit = 120 * KiB
    for round_ in range(6):
        filler = start_filler(tmp_path, f"k{round_ % 2}", -1, rng.choice([7, 16, 33]) * KiB, limit)
        try:
            assert filler.stdout is not None
            for _ in range(rng.randint(1, 30)):
                assert filler.stdout.readline(), filler.stderr.read() if filler.stderr else ""
        finally:
            filler.send_signal(signal.SIGKILL)
            filler.communicate()
        with Cache(tmp_path, quota(limit), rescan=False) as cache:
            assert tmp_files(tmp_path) == []
            counted = cache.directory.usage.read()
            scan = scan_blobs(tmp_path / "blobs")
            assert counted.bytes >= scan.bytes
            report = check(cache.directory, remove=False)
            assert (report.bad, report.strays) == ((), ())
            assert report.blobs == len(scan.blobs) > 0


# --- a full disk -------------------------------------------------------------------------


@contextlib.contextmanager
def small_filesystem(path: Path, size: str) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                    os.fspath(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", os.fspath(path)], check=False)


async def test_full_disk_fails_only_the_fill_that_needed_space(tmp_path: Path) -> None:
    with small_filesystem(tmp_path / "small", "1m") as small:
        unlimited = CacheConfig(quota=CacheQuota(share=None, cap=None))
        with Cache(small / "cache", unlimited, rescan=False) as cache:
            with pytest.raises(CacheFullError):
                await fill(cache, content("too-big", 2 * MiB))
            assert tmp_files(small / "cache") == []
            chunk = await fill(cache, content("fits", 100 * KiB))
            assert await cache.read(chunk, 0, 100 * KiB) == content("fits", 100 * KiB)
            assert cache.statistics().usage_bytes == 100 * KiB


async def test_reader_reports_full_disk_and_recovers(tmp_path: Path) -> None:
    from ocixfs.fetch.reader import open_reader

    data = content("large", 600 * KiB)
    store = tmp_path / "store"
    (big,) = make_store(store, [data])
    (small_chunk,) = make_store(store, [b"small file\n"])
    config = ReaderConfig(
        cache=CacheConfig(quota=CacheQuota(share=None, cap=None)),
        fetch=FetchConfig(deadline=10, failure_memory=0.0),
    )
    with small_filesystem(tmp_path / "small", "1m") as small:
        ballast = small / "ballast"
        async with open_reader(parse_stores([os.fspath(store)]), small / "cache", config) as reader:
            free = os.statvfs(small).f_bavail * os.statvfs(small).f_frsize
            ballast.write_bytes(bytes(max(0, free - 300 * KiB)))
            with pytest.raises(CacheFullError):
                await reader.read([big], 0, 10)
            assert tmp_files(small / "cache") == []
            assert await reader.read([small_chunk], 0, 100) == b"small file\n"
            ballast.unlink()
            assert await reader.read([big], 100, 1000) == data[100:1100]


# --- the command line --------------------------------------------------------------------


def test_fsck_finds_damaged_blobs_and_strays(tmp_path: Path) -> None:
    with Cache(tmp_path, rescan=False) as cache:
        chunks = [trio.run(fill, cache, content(f"x{i}", 50_000)) for i in range(5)]
        bad = cache.path_of(chunks[2])
    damaged = bytearray(bad.read_bytes())
    damaged[1234] ^= 0x40  # same size: only re-hashing can tell
    bad.write_bytes(bytes(damaged))
    (tmp_path / "blobs" / "ab" / "not-a-blob").write_bytes(b"junk")
    wrong_shard = tmp_path / "blobs" / "00" / chunks[0].hex
    wrong_shard.write_bytes(b"moved")
    result = run_ocixfs("cache", "fsck", "--cache-dir", os.fspath(tmp_path), "--dry-run",
                        "--json", check=False)
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["bad"] == [chunks[2].hex]
    assert len(report["strays"]) == 2 and report["removed"] == 0
    assert bad.exists()
    result = run_ocixfs("cache", "fsck", "--cache-dir", os.fspath(tmp_path), check=False)
    assert result.returncode == 1
    assert f"damaged  {chunks[2].hex}" in result.stdout
    assert "  damaged blobs       1, removed (a read fetches them again)\n" in result.stdout
    assert "  stray files         2, removed (not named like a blob" in result.stdout
    assert not bad.exists() and not wrong_shard.exists()
    assert names(tmp_path) == {c.hex for c in chunks} - {chunks[2].hex}
    assert _counter(tmp_path) == (4 * 50_000, 4, True)
    result = run_ocixfs("cache", "fsck", "--cache-dir", os.fspath(tmp_path))
    assert "  damaged blobs       none\n  stray files         none\n" in result.stdout


def test_gc_max_size_trims_least_recently_used(tmp_path: Path) -> None:
    with Cache(tmp_path, rescan=False) as cache:
        chunks = [trio.run(fill, cache, content(f"g{i}", 100 * KiB)) for i in range(10)]
        for age, chunk in enumerate(reversed(chunks)):
            set_used(cache, chunk, time.time() - 1000 - age)
    args = ["cache", "gc", "--cache-dir", os.fspath(tmp_path), "--max-size", "450K", "--json"]
    dry = json.loads(run_ocixfs(*args, "--dry-run").stdout)
    assert (dry["removed_blobs"], dry["remaining_bytes"]) == (6, 400 * KiB)
    assert len(names(tmp_path)) == 10
    report = json.loads(run_ocixfs(*args).stdout)
    assert report["removed_blobs"] == 6
    assert names(tmp_path) == {c.hex for c in chunks[6:]}
    assert _counter(tmp_path) == (400 * KiB, 4, True)


def test_gc_all_unused_keeps_the_blobs_of_given_images(tmp_path: Path) -> None:
    source = tmp_path / "rootfs"
    (source / "etc").mkdir(parents=True)
    (source / "etc" / "a").write_bytes(content("image-a", 3000))
    (source / "etc" / "b").write_bytes(content("image-b", 5000))
    store = tmp_path / "store"
    image = tmp_path / "image.ocix"
    run_ocixfs("build", f"dir:{source}", "--store", os.fspath(store), "--output",
               os.fspath(image), "--no-progress")
    cache_dir = tmp_path / "cache"
    with Cache(cache_dir, rescan=False) as cache:
        kept = {trio.run(fill, cache, content(f"image-{n}", size)).hex
                for n, size in (("a", 3000), ("b", 5000))}
        other = trio.run(fill, cache, content("unrelated", 4000))
    result = run_ocixfs("cache", "gc", "--cache-dir", os.fspath(cache_dir), "--all-unused",
                        os.fspath(image))
    assert "removed 1 blobs" in result.stdout
    assert names(cache_dir) == kept
    assert other.hex not in names(cache_dir)
    stats = json.loads(run_ocixfs("cache", "stats", "--cache-dir", os.fspath(cache_dir),
                                  "--json").stdout)
    assert (stats["blobs"], stats["bytes"], stats["strays"]) == (2, 8000, 0)
    assert stats["counted"]["bytes"] == 8000


def test_cache_commands_refuse_mistakes_in_one_line(tmp_path: Path) -> None:
    Cache(tmp_path, rescan=False).close()
    for args in (
        ["cache", "stats", "--cache-dir", os.fspath(tmp_path / "nothing")],
        ["cache", "gc", "--cache-dir", os.fspath(tmp_path), "--max-size", "lots"],
        ["cache", "gc", "--cache-dir", os.fspath(tmp_path), "--max-size", "1G", "img"],
    ):
        result = run_ocixfs(*args, check=False)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("ocixfs: ") and result.stderr.count("\n") == 1
