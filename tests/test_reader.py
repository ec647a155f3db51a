"""The reader: (blobs, offset, size) → exact bytes, fetching only what a read touches."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import hypothesis.strategies as st
import pytest
import trio
from hypothesis import given, settings

from ocixfs.config import FetchConfig, ReaderConfig
from ocixfs.errors import FetchError, FetchTimeout, UsageError
from ocixfs.fetch.reader import Priority, open_reader
from ocixfs.image.format import Chunk
from ocixfs.store.spec import parse_stores
from tests.faultserver import Fault, FaultServer, make_store

CHUNK = 4096
FILE = os.urandom(10 * CHUNK - 123)  # ten chunks, the last one short
PIECES = [FILE[i : i + CHUNK] for i in range(0, len(FILE), CHUNK)]
WHOLE = os.urandom(50_000)
FAST = ReaderConfig(
    fetch=FetchConfig(
        deadline=5.0, connect_timeout=1.0, read_timeout=0.5, backoff=0.01, threads=4
    ),
)


@pytest.fixture
def store(tmp_path: Path) -> tuple[Path, tuple[Chunk, ...], tuple[Chunk, ...]]:
    """A store holding FILE as ten chunks and WHOLE as one blob."""
    root = tmp_path / "store"
    chunks = tuple(make_store(root, PIECES))
    (whole,) = make_store(root, [WHOLE])
    return root, chunks, (whole,)


@pytest.fixture
def server(store: tuple[Path, tuple[Chunk, ...], tuple[Chunk, ...]]) -> Iterator[FaultServer]:
    with FaultServer(store[0]) as server:
        yield server


async def wait_until(predicate: object, timeout: float = 10.0) -> None:
    assert callable(predicate)
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


async def test_reads_across_chunk_boundaries(
    tmp_path: Path, store: tuple[Path, tuple[Chunk, ...], tuple[Chunk, ...]], server: FaultServer
) -> None:
    _, chunks, whole = store
    async with open_reader(parse_stores([server.url]), tmp_path / "cache", FAST) as reader:
        cases = [(0, 10), (CHUNK - 5, 10), (CHUNK, CHUNK), (CHUNK - 1, 3 * CHUNK + 2),
                 (0, len(FILE)), (len(FILE) - 7, 100), (len(FILE), 10), (len(FILE) + 5, 1),
                 (123, 0)]
        for offset, size in cases:
            assert await reader.read(chunks, offset, size) == FILE[offset : offset + size]
        assert await reader.read(whole, 49_000, 128 * 1024) == WHOLE[49_000:]
        assert await reader.read((), 0, 4096) == b""


@settings(max_examples=60, deadline=None)
@given(offset=st.integers(0, len(FILE) + 10), size=st.integers(0, len(FILE) + 10))
async def test_any_range_of_a_chunked_file(
    tmp_path_factory: pytest.TempPathFactory, offset: int, size: int
) -> None:
    root = tmp_path_factory.getbasetemp() / "hypothesis-store"
    chunks = tuple(make_store(root, PIECES))
    cache_dir = tmp_path_factory.getbasetemp() / "hypothesis-cache"
    async with open_reader(parse_stores([root.as_uri()]), cache_dir, FAST) as reader:
        assert await reader.read(chunks, offset, size) == FILE[offset : offset + size]


async def test_only_touched_chunks_are_fetched(
    tmp_path: Path, store: tuple[Path, tuple[Chunk, ...], tuple[Chunk, ...]], server: FaultServer
) -> None:
    _, chunks, _ = store
    config = replace(FAST, readahead=2)
    async with open_reader(parse_stores([server.url]), tmp_path / "cache", config) as reader:
        assert await reader.read(chunks, 3 * CHUNK + 10, CHUNK) == FILE[3 * CHUNK + 10 :][:CHUNK]
        # A blob is visible in the cache a moment before its flight is counted as done.
        await wait_until(lambda: reader.statistics().fetch.blobs_fetched >= 4)
        assert reader.is_cached(chunks[5]) and reader.is_cached(chunks[6])
        counts = [server.count(chunk.hex) for chunk in chunks]
        assert counts == [0, 0, 0, 1, 1, 1, 1, 0, 0, 0]  # touched 3-4, read ahead 5-6
        stats = reader.statistics()
        assert (stats.cache_misses, stats.cache_hits, stats.waits) == (2, 0, 1)
        assert stats.fetch.blobs_fetched == 4


async def test_no_readahead(
    tmp_path: Path, store: tuple[Path, tuple[Chunk, ...], tuple[Chunk, ...]], server: FaultServer
) -> None:
    _, chunks, _ = store
    config = replace(FAST, readahead=0)
    async with open_reader(parse_stores([server.url]), tmp_path / "cache", config) as reader:
        await reader.read(chunks, 0, 10)
        await trio.testing.wait_all_tasks_blocked()
        assert [server.count(chunk.hex) for chunk in chunks] == [1] + [0] * 9


async def test_cached_reads_need_no_server(
    tmp_path: Path, store: tuple[Path, tuple[Chunk, ...], tuple[Chunk, ...]], server: FaultServer
) -> None:
    _, chunks, whole = store
    cache_dir = tmp_path / "cache"
    async with open_reader(parse_stores([server.url]), cache_dir, FAST) as reader:
        assert await reader.read(chunks, 0, len(FILE)) == FILE
        assert await reader.read(whole, 0, len(WHOLE)) == WHOLE
    requests = server.count()
    server.stop()
    async with open_reader(parse_stores([server.url]), cache_dir, FAST) as reader:  # a later mount
        assert await reader.read(chunks, 100, 3 * CHUNK) == FILE[100 : 100 + 3 * CHUNK]
        assert await reader.read(whole, 7, 1000) == WHOLE[7:1007]
        assert reader.statistics().cache_misses == 0
    assert server.count() == requests


async def test_offline_uncached_read_fails_then_recovers(
    tmp_path: Path, store: tuple[Path, tuple[Chunk, ...], tuple[Chunk, ...]], server: FaultServer
) -> None:
    _, _, whole = store
    server.stop()
    config = replace(FAST, fetch=replace(FAST.fetch, failure_memory=0.2))
    async with open_reader(parse_stores([server.url]), tmp_path / "cache", config) as reader:
        with trio.fail_after(10), pytest.raises(FetchError):
            await reader.read(whole, 0, 100)
        server.start()
        await trio.sleep(0.3)  # let the failure memory expire
        assert await reader.read(whole, 0, 100) == WHOLE[:100]


async def test_deadline_then_fast_retry(
    tmp_path: Path, store: tuple[Path, tuple[Chunk, ...], tuple[Chunk, ...]], server: FaultServer
) -> None:
    """A stalled store: the read fails at the deadline, the kernel's retry fails at once."""
    _, _, whole = store
    server.fault("*", Fault(stall=60))
    fetch = replace(FAST.fetch, deadline=0.5, read_timeout=30)
    config = replace(FAST, fetch=fetch)
    async with open_reader(parse_stores([server.url]), tmp_path / "cache", config) as reader:
        with trio.fail_after(10), pytest.raises(FetchTimeout):
            await reader.read(whole, 0, 100)
        requests = server.count()
        with trio.fail_after(10), pytest.raises(FetchError):
            await reader.read(whole, 0, 100)
        assert server.count() == requests
        stats = reader.statistics()
        assert stats.fetch.fast_failures == 1
        assert stats.wait_seconds_max >= 0.5
        # once the flight itself has given up, the memory of its failure answers
        await wait_until(lambda: reader.statistics().fetch.in_flight == 0)
        with pytest.raises(FetchError):
            await reader.read(whole, 0, 100)
        assert reader.statistics().fetch.fast_failures == 2
        assert server.count() == requests


async def test_ensure_and_is_cached(
    tmp_path: Path, store: tuple[Path, tuple[Chunk, ...], tuple[Chunk, ...]], server: FaultServer
) -> None:
    _, chunks, _ = store
    async with open_reader(parse_stores([server.url]), tmp_path / "cache", FAST) as reader:
        assert not reader.is_cached(chunks[2])
        await reader.ensure(chunks[2], priority=Priority.PREFETCH)
        await reader.ensure(chunks[7], priority=Priority.ON_DEMAND)
        assert reader.is_cached(chunks[2]) and reader.is_cached(chunks[7])
        assert await reader.read(chunks, 2 * CHUNK, CHUNK) == PIECES[2]
        stats = reader.statistics()
        assert (stats.cache_hits, stats.cache_misses, stats.waits) == (1, 0, 0)


async def test_statistics_snapshot(
    tmp_path: Path, store: tuple[Path, tuple[Chunk, ...], tuple[Chunk, ...]], server: FaultServer
) -> None:
    _, _, whole = store
    async with open_reader(parse_stores([server.url]), tmp_path / "cache", FAST) as reader:
        before = reader.statistics()
        await reader.read(whole, 0, 10)
        await reader.read(whole, 10, 10)
        after = reader.statistics().as_dict()
    assert before.reads == 0
    assert after["reads"] == 2
    assert after["bytes_read"] == 20
    assert (after["cache_misses"], after["cache_hits"]) == (1, 1)
    assert after["blobs_fetched"] == 1
    assert after["bytes_fetched"] == len(WHOLE)
    assert after["bytes_received_by_source"] == {server.url: len(WHOLE)}
    assert after["cache_stored_blobs"] == 1
    assert after["waits"] == 1 and after["wait_seconds_total"] > 0
    assert list(after) == [  # flat, in this order: `ocixfs stats --json` and scripts read it
        "reads", "bytes_read", "cache_hits", "cache_misses", "waits", "wait_seconds_total",
        "wait_seconds_max", "blobs_fetched", "bytes_fetched", "blobs_by_source",
        "bytes_received_by_source", "errors", "failed_blobs", "fast_failures",
        "wait_timeouts", "fetched_by_others", "in_flight", "queued", "cache_stored_blobs",
        "cache_stored_bytes", "cache_open_files",
    ]
    assert json.loads(json.dumps(after)) == after


async def test_bad_store_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        parse_stores(["gopher://x"])
    with pytest.raises(UsageError):
        async with open_reader([], tmp_path / "cache", FAST):
            pass
