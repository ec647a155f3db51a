"""File content for the FUSE layer: (blobs, offset, size) → verified bytes.

``open_reader(stores, cache_dir, config)`` (an async context manager, inside trio) owns
the cache, the stores' sources and the fetch tasks, and yields a ``Reader``:

- ``await reader.read(blobs, offset, size)`` returns exactly the bytes
  ``[offset, min(offset + size, file size))`` of the file whose content is ``blobs`` (a
  sequence of ``Chunk``: one whole-file blob, a v1 chunk list, or empty for size 0).
  Chunks it touches that are not cached are fetched concurrently, at on-demand priority,
  under one deadline (``FetchConfig.deadline``); then the next ``readahead`` chunks of a
  chunked file are queued in the background. Cached chunks are read from the local file
  without awaiting the network. It raises only ``OcixError`` subclasses (``FetchError``
  family, ``CacheError``).
- ``reader.is_cached(chunk)`` and ``await reader.ensure(chunk, priority=...)`` serve
  prefetching: ``ensure`` puts a blob in the cache without reading it (on-demand priority
  waits at most the deadline; lower priorities wait for their turn, never ahead of an
  on-demand fetch).
- ``reader.packs`` plays profile packs (``fetch.packs.PackPlayer``) into the same cache
  and flights; None for a reader built without one.
- ``reader.statistics()`` is a frozen snapshot (the fetcher's counters nested as ``fetch``)
  with ``as_dict()``, one flat JSON-able level.
"""

from __future__ import annotations

import bisect
import contextlib
import math
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import trio

from ocixfs.cache.blobs import Cache
from ocixfs.config import DEFAULT_READER_CONFIG, ReaderConfig
from ocixfs.errors import CacheError, UsageError
from ocixfs.fetch.fetcher import Fetcher, FetchStatistics, Priority
from ocixfs.fetch.packs import PackPlayer
from ocixfs.image.format import Chunk
from ocixfs.store.remote import open_sources
from ocixfs.store.spec import StoreSpec

__all__ = ["Priority", "Reader", "ReaderStatistics", "open_reader"]

_LAYOUTS_KEPT = 64
_LAYOUT_MIN_CHUNKS = 8


@dataclass(frozen=True, slots=True, kw_only=True)
class ReaderStatistics:
    """A snapshot of the data path since the reader opened: the reader's own counters,
    the fetcher's (``fetch``) and a few of the cache's.

    Hits and misses count chunks touched by reads; a wait is a read that needed the
    network (its duration, in seconds). ``as_dict()`` flattens ``fetch`` into the other
    keys (``blobs_fetched``, ``bytes_received_by_source``, ``errors``, ...)."""

    reads: int
    bytes_read: int
    cache_hits: int
    cache_misses: int
    waits: int
    wait_seconds_total: float
    wait_seconds_max: float
    fetch: FetchStatistics
    cache_stored_blobs: int
    cache_stored_bytes: int
    cache_open_files: int

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able values, one flat level (copies of the mappings)."""
        out: dict[str, Any] = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, FetchStatistics):
                out.update(value.as_dict())
            else:
                out[item.name] = value
        return out


class _Layout:
    """Where each chunk of a file starts: ``ends[i]`` is the end offset of chunk ``i``."""

    __slots__ = ("blobs", "ends")

    def __init__(self, blobs: Sequence[Chunk]) -> None:
        self.blobs = blobs
        self.ends: list[int] = []
        total = 0
        for chunk in blobs:
            total += chunk.size
            self.ends.append(total)

    @property
    def size(self) -> int:
        return self.ends[-1] if self.ends else 0

    def pieces(self, offset: int, end: int) -> list[tuple[int, int, int]]:
        """``(chunk index, offset in chunk, length)`` for each non-empty piece of the range."""
        out = []
        index = bisect.bisect_right(self.ends, offset)
        while index < len(self.ends) and offset < end:
            start = self.ends[index] - self.blobs[index].size
            length = min(end, self.ends[index]) - offset
            if length > 0:
                out.append((index, offset - start, length))
            offset += length
            index += 1
        return out


class Reader:
    """Serves file content from ``cache``, fetching misses through ``fetcher``. Use
    ``open_reader`` to get one; the constructor only wires parts (tests build it directly)."""

    def __init__(
        self, cache: Cache, fetcher: Fetcher, config: ReaderConfig = DEFAULT_READER_CONFIG,
        *, packs: PackPlayer | None = None,
    ) -> None:
        self._cache = cache
        self._fetcher = fetcher
        self._config = config
        self.packs = packs
        self._layouts: OrderedDict[int, _Layout] = OrderedDict()
        self._reads = 0
        self._bytes_read = 0
        self._hits = 0
        self._misses = 0
        self._waits = 0
        self._wait_total = 0.0
        self._wait_max = 0.0

    async def read(self, blobs: Sequence[Chunk], offset: int, size: int) -> bytes:
        """Bytes ``[offset, min(offset + size, file size))``; ``b""`` past the end.
        Always a checkpoint. Raises ``FetchError`` family or ``CacheError``."""
        layout = self._layout(blobs)
        end = min(offset + max(size, 0), layout.size)
        pieces = layout.pieces(max(offset, 0), end)
        self._reads += 1
        if not pieces:
            await trio.lowlevel.checkpoint()
            return b""
        touched = [blobs[index] for index, _, _ in pieces]
        missing = [chunk for chunk in touched if not self._cache.contains(chunk)]
        self._misses += len(missing)
        self._hits += len(touched) - len(missing)
        if missing:
            await self._fetch_on_demand(missing)
        self._read_ahead(blobs, pieces[-1][0] + 1)
        parts = [await self._read_piece(blobs[i], lo, n) for i, lo, n in pieces]
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        self._bytes_read += len(data)
        return data

    async def read_for_prefetch(self, blobs: Sequence[Chunk], offset: int, size: int) -> bytes:
        """``read`` for the daemon's own look into a file (the ELF predictor): its chunks
        come at prefetch priority, with no read-ahead, and nothing counts as a program's
        read or wait. Raises like ``read``."""
        layout = self._layout(blobs)
        pieces = layout.pieces(max(offset, 0), min(offset + max(size, 0), layout.size))
        parts = []
        for index, lo, n in pieces:
            await self.ensure(blobs[index], priority=Priority.PREFETCH)
            data = await self._cache.read(blobs[index], lo, n)
            if data is None:
                raise CacheError(f"cache: blob {blobs[index].hex} vanished right after it "
                                 "was fetched")
            parts.append(data)
        await trio.lowlevel.checkpoint()
        return b"".join(parts)

    async def warm(self, chunks: Sequence[Chunk]) -> None:
        """Queue the reads of the cached ones of ``chunks`` into the page cache, in order
        (``Cache.warm``), so that the reads they will get are served from memory."""
        await self._cache.warm(chunks)

    def is_cached(self, chunk: Chunk) -> bool:
        """Whether ``chunk`` is in the local cache (no network)."""
        return self._cache.contains(chunk)

    async def ensure(self, chunk: Chunk, *, priority: Priority = Priority.PREFETCH) -> None:
        """Put ``chunk`` in the cache without reading it. ``ON_DEMAND`` waits at most the
        deadline; other priorities wait until their fetch ran. Raises like ``read``."""
        deadline = math.inf
        if priority is Priority.ON_DEMAND:
            deadline = trio.current_time() + self._config.fetch.deadline
        await self._fetcher.ensure(chunk, priority=priority, deadline=deadline)

    def statistics(self) -> ReaderStatistics:
        cache = self._cache.statistics()
        return ReaderStatistics(
            reads=self._reads,
            bytes_read=self._bytes_read,
            cache_hits=self._hits,
            cache_misses=self._misses,
            waits=self._waits,
            wait_seconds_total=self._wait_total,
            wait_seconds_max=self._wait_max,
            fetch=self._fetcher.statistics(),
            cache_stored_blobs=cache.stored_blobs,
            cache_stored_bytes=cache.stored_bytes,
            cache_open_files=cache.open_files,
        )

    async def _fetch_on_demand(self, chunks: Sequence[Chunk]) -> None:
        started = trio.current_time()
        deadline = started + self._config.fetch.deadline
        try:
            for chunk in chunks:  # start all first, so they download concurrently
                self._fetcher.start(chunk, Priority.ON_DEMAND)
            for chunk in chunks:
                await self._fetcher.ensure(chunk, priority=Priority.ON_DEMAND, deadline=deadline)
        finally:
            waited = trio.current_time() - started
            self._waits += 1
            self._wait_total += waited
            self._wait_max = max(self._wait_max, waited)

    def _read_ahead(self, blobs: Sequence[Chunk], first: int) -> None:
        for chunk in blobs[first : first + self._config.readahead]:
            if chunk.size and not self._fetcher.in_flight(chunk):
                self._fetcher.start(chunk, Priority.READAHEAD)

    async def _read_piece(self, chunk: Chunk, offset: int, size: int) -> bytes:
        data = await self._cache.read(chunk, offset, size)
        if data is None:  # removed since we looked (eviction by another process)
            await self._fetch_on_demand([chunk])
            data = await self._cache.read(chunk, offset, size)
            if data is None:
                raise CacheError(f"cache: blob {chunk.hex} vanished right after it was fetched")
        return data

    def _layout(self, blobs: Sequence[Chunk]) -> _Layout:
        """Chunk offsets, remembered for recently read big chunk lists (keyed by identity;
        the entry holds a reference, so the id cannot be reused while it is kept)."""
        if len(blobs) < _LAYOUT_MIN_CHUNKS:
            return _Layout(blobs)
        layout = self._layouts.get(id(blobs))
        if layout is not None and layout.blobs is blobs:
            self._layouts.move_to_end(id(blobs))
            return layout
        layout = _Layout(blobs)
        self._layouts[id(blobs)] = layout
        if len(self._layouts) > _LAYOUTS_KEPT:
            self._layouts.popitem(last=False)
        return layout


@contextlib.asynccontextmanager
async def open_reader(
    stores: Sequence[StoreSpec], cache_dir: Path, config: ReaderConfig = DEFAULT_READER_CONFIG
) -> AsyncIterator[Reader]:
    """Open the cache, the stores' sources and a nursery for fetch tasks; yield a
    ``Reader``; on exit cancel pending fetches and close everything. Raises ``UsageError``
    when no store is given, ``CacheError`` for an unusable cache."""
    if not stores:
        raise UsageError("no blob store given")
    limiter = trio.CapacityLimiter(config.fetch.threads)
    with Cache(cache_dir, config.cache, limiter=limiter) as cache:
        async with contextlib.AsyncExitStack() as stack:
            sources = await stack.enter_async_context(
                open_sources(stores, config.fetch, limiter=limiter)
            )
            nursery = await stack.enter_async_context(trio.open_nursery())
            stack.callback(nursery.cancel_scope.cancel)
            fetcher = Fetcher(sources, cache, config.fetch, nursery=nursery, limiter=limiter)
            packs = PackPlayer(fetcher, sources, cache, config.fetch, limiter)
            yield Reader(cache, fetcher, config, packs=packs)
