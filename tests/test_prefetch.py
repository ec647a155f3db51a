"""Prefetch playback against a real reader over a local store (real cache, real
verification; no FUSE)."""

from __future__ import annotations

from pathlib import Path

import blake3
import pytest
import trio

from ocixfs.fetch.reader import Priority, Reader, open_reader
from ocixfs.image.format import Chunk
from ocixfs.mount.prefetch import Prefetcher
from ocixfs.store.spec import parse_stores
from tests.faultserver import make_store

SMALL = [bytes([i]) * (100 + i) for i in range(2)]
BIG = b"B" * 5000
OTHER = b"other file"


@pytest.fixture
def store(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    make_store(root, [*SMALL, BIG, OTHER])
    return root


def _chunk(data: bytes) -> Chunk:
    return Chunk(len(data), blake3.blake3(data).digest())


def _cached(reader: Reader, contents: list[bytes]) -> list[bool]:
    return [reader.is_cached(_chunk(data)) for data in contents]


async def test_prefetcher_fetches_the_plan_skipping_what_is_cached(
    tmp_path: Path, store: Path
) -> None:
    async with open_reader(parse_stores([store.as_uri()]), tmp_path / "cache") as reader:
        await reader.ensure(_chunk(SMALL[0]), priority=Priority.ON_DEMAND)
        prefetcher = Prefetcher(reader, [_chunk(SMALL[0]), _chunk(SMALL[1]), _chunk(BIG)],
                                concurrency=2)
        assert prefetcher.statistics().planned_blobs == 3  # readable before it runs
        with trio.fail_after(10):
            await prefetcher.run()
        stats = prefetcher.statistics()
        assert stats.finished
        assert (stats.planned_blobs, stats.done_blobs, stats.failed_blobs) == (3, 3, 0)
        assert stats.done_bytes == len(SMALL[0]) + len(SMALL[1]) + len(BIG)
        assert _cached(reader, [SMALL[0], SMALL[1], BIG, OTHER]) == [True, True, True, False]
        assert reader.statistics().as_dict()["blobs_fetched"] == 3  # SMALL[0] only once


async def test_a_missing_blob_is_counted_not_raised(tmp_path: Path, store: Path) -> None:
    async with open_reader(parse_stores([store.as_uri()]), tmp_path / "cache") as reader:
        prefetcher = Prefetcher(reader, [Chunk(3, b"\x07" * 32), _chunk(OTHER)], concurrency=1)
        with trio.fail_after(10):
            await prefetcher.run()
        stats = prefetcher.statistics()
        assert (stats.done_blobs, stats.failed_blobs) == (1, 1)
        assert reader.is_cached(_chunk(OTHER))
