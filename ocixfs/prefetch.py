"""Prefetching: fetch what a start-up will read before it asks, without ever getting in the
way of what it is asking for right now.

``plan`` turns a profile (paths in first-access order) into the blobs to fetch, in order,
each once; with ``fill_rest`` the rest of the image follows, smallest files first (most
files per byte, and start-ups open many small files). ``Prefetcher.run`` works through the
plan with a bounded number of concurrent fetches at background priority: the reader's
fetcher always serves on-demand reads first, and a blob already being fetched (by a read
or an earlier prefetch) is shared, never fetched twice. Failures are counted and logged,
never raised: a prefetch that fails simply leaves the read to fetch on demand.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import trio

from .config import DEFAULT_FETCH_CONFIG, FetchConfig
from .errors import FormatError, OcixError
from .fetcher import Priority
from .format import Chunk
from .profile import MAX_PROFILE_BYTES, Profile, decode_profile, encode_profile
from .tree import Node, Tree

__all__ = [
    "BackgroundFetcher",
    "PrefetchStats",
    "Prefetcher",
    "cached_profile_path",
    "locate_profile",
    "plan",
    "save_profile",
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
    """Fetch a plan's blobs at background priority, ``concurrency`` at a time."""

    def __init__(self, fetcher: BackgroundFetcher, *, concurrency: int = DEFAULT_CONCURRENCY):
        self._fetcher = fetcher
        self._concurrency = max(1, concurrency)
        self._planned: Sequence[Chunk] = ()
        self._done_blobs = self._done_bytes = self._failed = 0
        self._started = self._finished_at = 0.0
        self._finished = False

    async def run(self, chunks: Sequence[Chunk]) -> None:
        """Fetch every blob of ``chunks`` not already cached; returns when all were tried."""
        self._planned = chunks
        self._started = time.monotonic()
        queue = iter(chunks)
        async with trio.open_nursery() as nursery:
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

    async def _worker(self, queue: Iterable[Chunk]) -> None:
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
        )


# ----------------------------------------------------------------------------------------
# Finding the profile for a mount


def cached_profile_path(cache_dir: Path, image_digest: str) -> Path:
    """Where a host keeps the profile it recorded for an image (keyed by manifest hash)."""
    return cache_dir / "profiles" / f"{image_digest.removeprefix('b3:')}.profile"


def locate_profile(
    mode: str, image: str, cache_dir: Path, image_digest: str, http: FetchConfig | None = None
) -> Profile | None:
    """The profile a mount plays back for ``--prefetch MODE``.

    ``none``: no profile. A file name: that file (an unreadable or invalid one is an
    error). ``auto``/``all``: ``IMAGE.profile`` beside the manifest (also for URLs), else
    the one this host recorded for the image, else none; a broken one is logged and ignored.
    """
    from .image import is_url

    if mode == "none":
        return None
    if mode not in ("auto", "all"):
        return _read_profile(Path(mode), strict=True)
    beside = (
        _fetch_profile_url(image + ".profile", http or DEFAULT_FETCH_CONFIG)
        if is_url(image)
        else _read_profile(Path(image + ".profile"), strict=False)
    )
    return beside or _read_profile(cached_profile_path(cache_dir, image_digest), strict=False)


def _read_profile(path: Path, *, strict: bool) -> Profile | None:
    from .errors import UsageError

    try:
        with path.open("rb") as f:
            data = f.read(MAX_PROFILE_BYTES + 1)
    except FileNotFoundError:
        if strict:
            raise UsageError(f"{path}: no such profile") from None
        return None
    except OSError as exc:
        if strict:
            raise UsageError(f"{path}: {exc.strerror}") from None
        return None
    return _decode_or_warn(data, os.fspath(path), strict=strict)


def _fetch_profile_url(url: str, http: FetchConfig) -> Profile | None:
    from .errors import BlobNotFound
    from .transport import download, redact

    try:
        data = download(url, max_bytes=MAX_PROFILE_BYTES, config=http)
    except BlobNotFound:
        return None
    except OcixError as exc:
        log.warning("%s", exc)
        return None
    return _decode_or_warn(data, redact(url), strict=False)


def _decode_or_warn(data: bytes, source: str, *, strict: bool) -> Profile | None:
    try:
        return decode_profile(data, source=source)
    except FormatError as exc:
        if strict:
            raise
        log.warning("ignoring %s", exc)
        return None


def save_profile(path: Path, profile: Profile) -> None:
    """Write atomically (temp + rename); a failure is logged, never raised."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(encode_profile(profile))
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        log.warning("cannot save profile %s: %s", path, exc.strerror)
