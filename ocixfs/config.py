"""Settings of the data path (cache, fetcher, reader) as small frozen value objects
(``mount.config.MountConfig`` holds them for one mount).

Every field has a module-level default; build variants with ``dataclasses.replace``.
Durations are seconds, sizes are bytes. Nothing here does I/O, and importing it imports
nothing heavy (the mount command reads it before anything else).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import httpx

__all__ = [
    "DEFAULT_CACHE_CONFIG",
    "DEFAULT_FETCH_CONFIG",
    "DEFAULT_READER_CONFIG",
    "PACK_ZSTD_LEVEL",
    "CacheConfig",
    "CacheQuota",
    "FetchConfig",
    "ReaderConfig",
    "default_cache_dir",
]


def _default_threads() -> int:
    return max(2, min(8, 2 * (os.cpu_count() or 1)))


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheQuota:
    """How large the cache may grow: ``size`` bytes when set, else ``share`` of the
    filesystem holding the cache, at most ``cap`` bytes; neither size nor share means no
    limit. The default, min(10 % of the filesystem, 20 GiB), holds the hot sets of several
    large images, never becomes what fills a small root disk, and on a big disk still keeps
    an unattended host from piling up stale blobs.
    """

    size: int | None = None
    share: float | None = 0.10
    cap: int | None = 20 << 30

    def limit(self, filesystem_bytes: int) -> int | None:
        """The limit in bytes on a filesystem of ``filesystem_bytes`` (``None``: unlimited)."""
        if self.size is not None:
            return self.size
        if self.share is None:
            return None
        limit = int(filesystem_bytes * self.share)
        return limit if self.cap is None else min(limit, self.cap)


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheConfig:
    """The local blob cache.

    - ``open_files``: how many cache files stay open (an LRU of file descriptors). An open
      blob is pinned (never evicted), so the LRU also holds at most ``open_share`` of the
      quota's bytes (always at least the most recent blob).
    - ``inline_read_max``: reads up to this size are a plain ``pread`` on the trio thread
      (from the page cache that is ~100 µs for 1 MiB, while a worker-thread hop costs
      ~180 µs here); larger reads go to a worker thread.
    - ``fsync``: fsync each blob before renaming it into place. Without it a power loss
      can leave a blob whose name promises bytes it does not hold.
    - ``stale_tmp_age``: a leftover temporary file is removed at start only when no
      process holds its lock and it is older than this (or its writer's pid is gone).
    - ``quota``: the size limit; a fill that would exceed it first evicts least recently
      used blobs until the cache holds at most ``low_water`` of the limit.
    - ``touch_interval``: a blob's last use (its atime, set by ocixfs) is refreshed at most
      this often per process: the LRU order is exact to within this many seconds.
    - ``rescan_interval``: the shared usage counter is checked against a directory scan
      (in a background thread) at start when its last scan is older than this.
    - ``evict_wait``: how long a fill waits for another process's eviction to finish
      before it stores its blob anyway (over the quota).
    """

    open_files: int = 256
    open_share: float = 0.10
    inline_read_max: int = 1 << 20
    fsync: bool = True
    stale_tmp_age: float = 60.0
    quota: CacheQuota = field(default_factory=CacheQuota)
    low_water: float = 0.90
    touch_interval: float = 60.0
    rescan_interval: float = 3600.0
    evict_wait: float = 5.0


@dataclass(frozen=True, slots=True, kw_only=True)
class FetchConfig:
    """Fetching blobs from the stores (mirrors, tried in order).

    - ``deadline``: how long an on-demand read may wait for the network in total.
    - ``connect_timeout``/``read_timeout``: per socket operation (``read_timeout`` is how
      long a body may stall before the source counts as failed).
    - ``min_rate``: after ``rate_window`` seconds a transfer slower than this (bytes/s) is
      abandoned (``too_slow``); a blob's own fetch may run ``deadline + size / min_rate``
      seconds, so big whole-file blobs can finish on slow links while waiting readers still
      give up at ``deadline``.
    - ``document_deadline``: how long downloading a manifest (``http.download``) may take
      in total, however fast its body trickles; a profile beside it gets at most
      ``deadline`` (it is optional: the mount does not wait longer for it).
    - ``on_demand_slots``/``background_slots``: concurrent fetches of each class; they
      never share slots, so queued background work cannot delay an on-demand fetch.
    - ``rounds``: passes over the source list for transient failures, ``backoff`` apart
      (doubling, jittered).
    - ``failure_memory``: a blob whose fetch just failed fails fast for this long (the
      kernel retries a failed READ at once; the retry must not wait a second deadline).
    - ``source_penalty``: a source that just failed is tried after healthy ones for this long.
    - ``write_batch``: body bytes gathered before one worker-thread hop (hash + write).
    - ``zstd_max_window``: largest zstd window accepted (bounds decoder memory).
    - ``max_redirects``: HTTP redirects followed per request (never https to http).
    - ``ca_file``: PEM certificates trusted in addition to the system's store.
    - ``proxies``: the ordered proxy group (``http://HOST:PORT`` URLs, ``DIRECT`` for none),
      tried in order; empty means the environment's (``HTTP_PROXY``, ``NO_PROXY``, ...).
      A proxy that fails to connect or breaks a transfer is tried after the others for
      ``proxy_down`` seconds (``ocixfs.http.ProxyGroup``).
    - ``auth_file``: credentials for stores, one ``URL bearer TOKEN`` or
      ``URL basic USER:PASSWORD`` per line (netrc is read too); see ``ocixfs.http``.
    - ``credentials``: those credentials once read (``http.load_credentials``); when
      set, no client reads the files again.
    - ``threads``: worker threads for hashing, decompression, fsync and file:// reads.
    - ``pack_patience``: an on-demand read of a blob that a profile pack is bringing waits
      while the pack keeps receiving bytes; after this long without any (or a quarter of
      ``deadline`` in all) it fetches the blob on its own (``fetch.packs``).
    """

    deadline: float = 30.0
    connect_timeout: float = 5.0
    read_timeout: float = 10.0
    min_rate: float = 32 * 1024
    rate_window: float = 10.0
    document_deadline: float = 120.0
    on_demand_slots: int = 16
    background_slots: int = 4
    rounds: int = 2
    backoff: float = 0.2
    failure_memory: float = 5.0
    source_penalty: float = 30.0
    write_batch: int = 1 << 20
    zstd_max_window: int = 1 << 25
    max_redirects: int = 4
    ca_file: str | None = None
    proxies: tuple[str, ...] = ()
    proxy_down: float = 60.0
    auth_file: str | None = None
    credentials: httpx.Auth | None = field(default=None, compare=False, repr=False)
    threads: int = field(default_factory=_default_threads)
    pack_patience: float = 1.0

    def too_slow(self, received: int, elapsed: float) -> bool:
        """The minimum-rate rule every transfer follows: after ``rate_window`` seconds,
        ``received`` bytes in ``elapsed`` seconds must be at least ``min_rate`` per second."""
        return elapsed > self.rate_window and received < self.min_rate * elapsed


@dataclass(frozen=True, slots=True, kw_only=True)
class ReaderConfig:
    """Everything ``open_reader`` needs; ``readahead`` is how many following chunks of a
    chunked file a read queues in the background (0 disables). Sequential reads of 1 MiB
    chunks over local HTTP ran about twice as fast with 4 as with 1, and no faster with 8."""

    cache: CacheConfig = field(default_factory=CacheConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    readahead: int = 4


# Profile packs are made once and fetched by every host's start-up: worth zstd's slow
# levels (python's start-up set: 7.32 MB at the store's level 3, 6.17 MB at 19; decoding
# is as fast). 19 is the highest level without --ultra's larger windows.
PACK_ZSTD_LEVEL = 19

DEFAULT_CACHE_CONFIG = CacheConfig()
DEFAULT_FETCH_CONFIG = FetchConfig()
DEFAULT_READER_CONFIG = ReaderConfig()


def default_cache_dir() -> Path:
    """``/var/cache/ocixfs`` for root, else ``$XDG_CACHE_HOME/ocixfs`` (``~/.cache/ocixfs``)."""
    if os.geteuid() == 0:
        return Path("/var/cache/ocixfs")
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "ocixfs"
