"""Blob stores, fault servers and fetchers for the tests that fetch over HTTP
(``test_fetcher.py``, ``test_network.py``; ``test_hostile.py`` borrows ``fetching``).

- ``Store(root, chunks)``: a blob store on disk (``blob_store`` writes one with
  ``faultserver.make_store``); unpacks as ``root, chunks = store``.
- ``FaultServers``: starts ``FaultServer``s for one test and stops them all at its end
  (the ``serve`` fixture of ``tests/conftest.py``).
- ``fetching_with(config)``: an async context manager ``fetching(stores, cache_dir,
  config=<that config>, cache_config=DEFAULT_CACHE_CONFIG)`` giving a real ``Fetcher``
  (real HTTP client) and its ``Cache``.
- ``cached(cache, chunk)``: the chunk's bytes in the cache, or None.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import trio

from ocixfs.cache.blobs import Cache
from ocixfs.config import DEFAULT_CACHE_CONFIG, CacheConfig, FetchConfig
from ocixfs.fetch.fetcher import Fetcher
from ocixfs.image.format import Chunk
from ocixfs.store.remote import open_sources
from ocixfs.store.spec import parse_stores
from tests.faultserver import FaultServer, make_store

__all__ = ["FaultServers", "Mirrors", "Store", "blob_store", "cached", "fetching_with"]


class Store(NamedTuple):
    root: Path
    chunks: list[Chunk]


def blob_store(root: Path, contents: Iterable[bytes], *, zstd: bool = False) -> Store:
    return Store(root, make_store(root, contents, zstd=zstd))


Mirrors = tuple[FaultServer, FaultServer]


class FaultServers:
    """``servers(root, **options)`` starts a ``FaultServer(root, **options)``; ``close()``
    stops every one it started (stopping one twice is harmless)."""

    def __init__(self) -> None:
        self._started: list[FaultServer] = []

    def __call__(self, root: Path, **options: Any) -> FaultServer:
        server = FaultServer(root, **options)
        self._started.append(server)
        server.start()
        return server

    def close(self) -> None:
        with contextlib.ExitStack() as stack:
            for server in self._started:
                stack.callback(server.stop)


FetchingFactory = Callable[..., contextlib.AbstractAsyncContextManager[tuple[Fetcher, Cache]]]


def fetching_with(default: FetchConfig) -> FetchingFactory:
    """``fetching(stores, cache_dir, config=default)`` for a test module's usual config."""

    @contextlib.asynccontextmanager
    async def fetching(
        stores: Sequence[str],
        cache_dir: Path,
        config: FetchConfig = default,
        cache_config: CacheConfig = DEFAULT_CACHE_CONFIG,
    ) -> AsyncIterator[tuple[Fetcher, Cache]]:
        limiter = trio.CapacityLimiter(config.threads)
        with Cache(cache_dir, cache_config, limiter=limiter) as cache:
            async with (
                open_sources(parse_stores(stores), config, limiter=limiter) as sources,
                trio.open_nursery() as nursery,
            ):
                try:
                    yield Fetcher(sources, cache, config, nursery=nursery, limiter=limiter), cache
                finally:
                    nursery.cancel_scope.cancel()

    return fetching


async def cached(cache: Cache, chunk: Chunk) -> bytes | None:
    return await cache.read(chunk, 0, chunk.size)
