"""Prefetching: fetch what a start-up will read before it asks, without ever getting in the
way of what it is asking for right now.

``plan`` turns a profile (paths in first-access order) into the blobs to fetch, in order,
each once; with ``fill_rest`` the rest of the image follows, smallest files first (most
files per byte, and start-ups open many small files). A ``Prefetcher`` works through the
plan with a bounded number of concurrent fetches at background priority: the reader's
fetcher always serves on-demand reads first, and a blob already being fetched (by a read
or an earlier prefetch) is shared, never fetched twice. Failures are counted and logged,
never raised: a prefetch that fails simply leaves the read to fetch on demand.

Given a ``PackPlayer`` and the profile's part of the plan (``packed``), the prefetcher
first plays the store's pack set for it (``fetch.packs``): the workers start once the
set's blobs are registered as in flight, so they wait for the packs to bring those
instead of asking for them one by one, and fetch singly only what no pack brings. With
``playing``, that set is already being played (asked for before the manifest arrived:
``mount.startup``), and the workers just join its flights.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import trio

from ocixfs.errors import OcixError
from ocixfs.fetch.fetcher import Priority
from ocixfs.fetch.packs import PackPlayer
from ocixfs.image.format import Chunk
from ocixfs.image.tree import Node, Tree
from ocixfs.mount.profile import Profile

__all__ = [
    "BackgroundFetcher",
    "PrefetchStats",
    "Prefetcher",
    "plan",
]

log = logging.getLogger(__name__)

DEFAULT_CONCURRENCY = 16


class BackgroundFetcher(Protocol):
    def is_cached(self, chunk: Chunk) -> bool: ...

    async def ensure(self, chunk: Chunk, *, priority: Priority) -> None: ...


@dataclass(frozen=True, slots=True)
class PrefetchStats:
    planned_blobs: int
    planned_bytes: int
    done_blobs: int
    done_bytes: int
    failed_blobs: int
    finished: bool
    seconds: float
    packs: dict[str, int] | None = None

    def as_dict(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in self.__slots__}


def plan(tree: Tree, profile: Profile | None, *, fill_rest: bool) -> list[Chunk]:
    """The blobs to prefetch, in order, each once: profile files first, then (optionally) all."""
    seen: set[bytes] = set()
    ordered: list[Chunk] = []

    def add(nodes: Iterable[Node]) -> None:
        for node in nodes:
            for chunk in node.blobs:
                if chunk.digest not in seen:
                    seen.add(chunk.digest)
                    ordered.append(chunk)

    if profile is not None:
        add(node for path in profile.paths if (node := _regular(tree, path)) is not None)
    if fill_rest:
        add(sorted(tree.iter_files(), key=lambda node: node.size))
    return ordered


def _regular(tree: Tree, path: str) -> Node | None:
    node = tree.node_by_path(path)
    return node if node is not None and node.blobs else None


class Prefetcher:
    """Fetch ``chunks`` (a ``plan``: each blob once) at background priority, in order,
    ``concurrency`` at a time. ``statistics()`` may be read before, during and after
    ``run``."""

    def __init__(
        self,
        fetcher: BackgroundFetcher,
        chunks: Sequence[Chunk],
        *,
        concurrency: int = DEFAULT_CONCURRENCY,
        packs: PackPlayer | None = None,
        packed: Sequence[Chunk] = (),
        playing: bool = False,
    ) -> None:
        self._fetcher = fetcher
        self._planned = chunks
        self._packs = packs if packed else None
        self._packed = packed
        self._playing = playing
        self._concurrency = max(1, concurrency)
        self._done_blobs = self._done_bytes = self._failed = 0
        self._started = self._finished_at = 0.0
        self._finished = False

    async def run(self) -> None:
        """Fetch every planned blob not already cached; returns when all were tried."""
        self._started = time.monotonic()
        queue = iter(self._planned)
        async with trio.open_nursery() as nursery:
            if self._packs is not None and not self._playing:
                await nursery.start(self._packs.play, self._packed)
            for _ in range(self._concurrency):
                nursery.start_soon(self._worker, queue)
        self._finished = True
        self._finished_at = time.monotonic()
        log.debug(
            "prefetch finished: %d blobs, %d bytes in %.1f s (%d failed)",
            self._done_blobs,
            self._done_bytes,
            self._finished_at - self._started,
            self._failed,
        )

    async def _worker(self, queue: Iterator[Chunk]) -> None:
        for chunk in queue:  # shared iterator: each chunk goes to exactly one worker
            if self._fetcher.is_cached(chunk):
                self._count_done(chunk)
                continue
            try:
                await self._fetcher.ensure(chunk, priority=Priority.PREFETCH)
            except OcixError as exc:
                self._failed += 1
                log.warning("prefetch of %s failed: %s", chunk.hex, exc)
            else:
                self._count_done(chunk)

    def _count_done(self, chunk: Chunk) -> None:
        self._done_blobs += 1
        self._done_bytes += chunk.size

    def statistics(self) -> PrefetchStats:
        end = self._finished_at if self._finished else time.monotonic()
        return PrefetchStats(
            planned_blobs=len(self._planned),
            planned_bytes=sum(chunk.size for chunk in self._planned),
            done_blobs=self._done_blobs,
            done_bytes=self._done_bytes,
            failed_blobs=self._failed,
            finished=self._finished,
            seconds=round(end - self._started, 3) if self._started else 0.0,
            packs=self._packs.statistics().as_dict() if self._packs is not None else None,
        )

