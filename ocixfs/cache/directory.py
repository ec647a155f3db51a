"""The cache directory as several processes share it: the quota, the evictor lock,
least-recently-used eviction and the clean-up of abandoned fills (``layout`` names the
files, ``usage`` keeps the shared counter, ``blobs`` serves reads and fills on top).

Everything here blocks on the file system: call it from worker threads or from tools,
never from the trio thread, except ``SharedUsage.add`` (microseconds, under a lock that
is only ever held for microseconds). It is thread-safe and keeps no table the trio side
depends on.

Rules every process follows (docs/developer-notes.md, "Eviction", explains why):

- A blob is *pinned* while a process holds a shared ``flock`` on it: a daemon takes one
  on each blob it keeps open. Eviction takes an exclusive lock without waiting before it
  unlinks a blob, so it never removes a pinned one.
- Recency is ``max(atime, mtime)``: mtime is when the blob was filled, and daemons set
  atime themselves on use (at most every ``touch_interval``), so relatime or noatime
  mounts do not matter.
- ``usage`` is a running total of the bytes and blobs under ``blobs/``. A fill adds its
  size and then links the blob into place while holding the counter's lock (and takes the
  size back if the link fails), a removal subtracts after it unlinked, so a crash leaves
  the total too high (evicting early), never too low. An eviction rebases it on its own
  scan plus whatever changed meanwhile; a start-up rescan runs when the counter is damaged,
  from another boot (a power loss can lose updates) or older than ``rescan_interval``.
- One process evicts at a time (``evict.lock``), least recently used first, skipping
  pinned blobs. Unlinking is slow on some disks (up to 3 ms a file here), so eviction
  stays off the read path: once a fill takes the total past the *high-water mark* (half
  way between ``low_water`` and the limit) a background thread evicts down to
  ``low_water``, subtracting as it goes. Only a fill that would pass the limit itself
  waits: it evicts just enough for itself if nobody else is evicting, or polls the counter
  for room while someone is, for at most ``evict_wait``, then stores its blob anyway.
- When only pinned blobs are left the fill is stored anyway: the cache then exceeds its
  quota by at most what the mounts hold open. Only a blob larger than the whole quota is
  refused (``CacheFullError``).

Every ``OSError`` becomes ``CacheError`` (``CacheFullError`` for ENOSPC/EDQUOT) at the
public methods (``cache_errors``, shared with ``ocixfs/cache.py``).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import stat
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path

from ocixfs.cache.layout import (
    BLOBS,
    EVICT_LOCK,
    PROFILES,
    TMP,
    USAGE_FILE,
    Stopped,
    cache_errors,
    entries,
    is_fetch_claim,
    remove_unpinned,
    scan_blobs,
)
from ocixfs.cache.sizes import filesystem_size
from ocixfs.cache.usage import Counted, SharedUsage
from ocixfs.config import DEFAULT_CACHE_CONFIG, CacheConfig
from ocixfs.errors import CacheError, CacheFullError, UnsafePathError
from ocixfs.progress import format_bytes
from ocixfs.safefs import private_directory

__all__ = ["CacheDirectory", "EvictResult", "TmpLeftovers"]

log = logging.getLogger(__name__)

OVER_QUOTA_LOG_INTERVAL = 60.0
# The background eviction spares blobs used this recently: one just fetched for a read
# is not taken away before the reader opens it. A fill at the limit spares nothing.
BACKGROUND_SPARES = 10.0
_LOCK_POLL = 0.01


@dataclass(frozen=True, slots=True, kw_only=True)
class EvictResult:
    """One eviction (or trim, or rescan): what the scan saw and what was removed."""

    scanned_blobs: int
    scanned_bytes: int
    evicted_blobs: int
    evicted_bytes: int
    pinned_blobs: int
    pinned_bytes: int
    seconds: float

    @property
    def remaining_bytes(self) -> int:
        return self.scanned_bytes - self.evicted_bytes

    @property
    def remaining_blobs(self) -> int:
        return self.scanned_blobs - self.evicted_blobs


@dataclass(frozen=True, slots=True, kw_only=True)
class TmpLeftovers:
    """Files in ``tmp/``: ``in_use`` are locked by a live writer."""

    files: int
    bytes: int
    in_use: int


class CacheDirectory:
    """The shared parts of one cache directory, for daemons and tools alike.

    ``create=True`` makes the layout (mode 0700); otherwise a directory without
    ``blobs/`` is refused. Either way the cache must be a ``private_directory`` of the
    caller (owned by this user, on a path nobody else can change, writable by nobody
    else) and ``blobs/``, ``tmp/``, ``profiles/`` and the shards real directories of this
    user, never symlinks: whoever can plant a file there could make this process delete,
    overwrite or serve files elsewhere (``UnsafePathError``). ``root`` is the resolved
    path. ``limit`` is the quota in bytes resolved on the filesystem holding the cache
    (``None``: unlimited). Raises ``CacheError``.
    """

    def __init__(
        self, root: Path, config: CacheConfig = DEFAULT_CACHE_CONFIG, *, create: bool = True
    ) -> None:
        self.root = Path(root)
        if not create and not os.path.lexists(self.root / BLOBS):
            raise CacheError(f"{self.root}: not an ocixfs cache (no blobs/ directory)")
        with cache_errors(f"preparing {self.root}"):
            self.root = private_directory(self.root, what="cache directory")
        self.config = config
        self.blobs = self.root / BLOBS
        self.tmp = self.root / TMP
        self.profiles = self.root / PROFILES
        self._stats_lock = threading.Lock()
        self._stop = threading.Event()
        self._evictor: threading.Thread | None = None
        self._over_quota_logged = -OVER_QUOTA_LOG_INTERVAL
        self.evictions = self.evicted_blobs = self.evicted_bytes = 0
        with cache_errors(f"preparing {self.root}"):
            self._prepare(create=create)
            self.limit = config.quota.limit(filesystem_size(self.root))
            self.usage = SharedUsage(self.root / USAGE_FILE)

    def _prepare(self, *, create: bool) -> None:
        """Make (``create``) and check the layout's directories; see the class doc."""
        shards = [self.blobs / f"{shard:02x}" for shard in range(256)]
        for directory in (self.blobs, self.tmp, self.profiles, *shards):
            if create and directory != self.profiles:
                with contextlib.suppress(FileExistsError):
                    directory.mkdir(mode=0o700)
            _check_own_directory(directory)

    def close(self) -> None:
        """Stop a background eviction (it resumes at the next trigger) and close."""
        self._stop.set()
        self.settle()
        self.usage.close()

    def settle(self) -> None:
        """Wait until a background eviction started by this process has finished."""
        with self._stats_lock:
            evictor = self._evictor
        if evictor is not None:
            evictor.join()

    @property
    def high_water(self) -> int | None:
        """Past this many bytes a background eviction starts (``None``: unlimited)."""
        if self.limit is None:
            return None
        return int(self.limit * (1 + self.config.low_water) / 2)

    # --- locking ---

    @contextlib.contextmanager
    def exclusive(self, wait: float) -> Iterator[bool]:
        """Hold ``evict.lock`` (waiting at most ``wait`` seconds); yields whether it is held."""
        with cache_errors("locking the cache for eviction"):
            fd = os.open(self.root / EVICT_LOCK,
                         os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            deadline = time.monotonic() + wait
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    locked = True
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        locked = False
                        break
                    time.sleep(_LOCK_POLL)
            yield locked
        finally:
            os.close(fd)

    # --- fills ---

    def refuse_oversized(self, size: int) -> None:
        """Raise ``CacheFullError`` for a blob of ``size`` bytes that could never fit the
        quota (asked before a fetch, so such a blob is never downloaded)."""
        limit = self.limit
        if limit is not None and size > limit:
            raise CacheFullError(
                f"a blob of {format_bytes(size)} is larger than the cache quota "
                f"({format_bytes(limit)}); raise --cache-max-size"
            )

    def publish(self, size: int, link: Callable[[], bool]) -> bool:
        """Publish a verified blob of ``size`` bytes with ``link()`` (False: it was there
        already) and count it, making room first when it would pass the quota (see the
        module doc). Raises ``CacheFullError`` only for a blob larger than the whole quota
        (a full disk shows up while writing, not here); ``link``'s errors propagate."""
        limit = self.limit
        added = self._publish(size, limit, link)
        if added is not None:
            return added
        assert limit is not None
        self.refuse_oversized(size)
        deadline = time.monotonic() + self.config.evict_wait
        while True:
            with self.exclusive(0.0) as locked:
                if locked:  # nobody is evicting: make just enough room, right now
                    with cache_errors("evicting"):
                        result = self._evict_locked(limit - size)
                    added = self._publish(size, limit, link, trigger=False)
                    if added is None:
                        self._note_over_quota(f"{format_bytes(result.pinned_bytes)} are pinned")
                        added = self._publish(size, None, link, trigger=False)
            if locked:
                assert added is not None
                self._start_background_eviction()
                return added
            added = self._publish(size, limit, link)  # another evictor may have made room
            if added is not None:
                return added
            if time.monotonic() >= deadline:
                self._note_over_quota("another process is still evicting")
                added = self._publish(size, None, link)
                assert added is not None
                return added
            time.sleep(_LOCK_POLL)

    def _publish(
        self, size: int, limit: int | None, link: Callable[[], bool], *, trigger: bool = True
    ) -> bool | None:
        outcome = self.usage.publish(size, limit, link)
        if outcome is None:
            return None
        added, total = outcome
        high = self.high_water
        if trigger and high is not None and total > high:
            self._start_background_eviction()
        return added

    def _start_background_eviction(self) -> None:
        with self._stats_lock:
            if self._stop.is_set() or (self._evictor is not None and self._evictor.is_alive()):
                return
            self._evictor = threading.Thread(
                target=self._evict_in_background, name="ocixfs-cache-evict", daemon=True
            )
            self._evictor.start()

    def _evict_in_background(self) -> None:
        """Runs in its own thread: evict down to ``low_water`` unless another process is
        evicting already. Never raises."""
        assert self.limit is not None
        try:
            with self.exclusive(0.0) as locked:
                if locked:
                    result = self._evict_locked(
                        int(self.limit * self.config.low_water),
                        stop=self._stop,
                        spare_after=time.time() - BACKGROUND_SPARES,
                    )
                    log.info("cache %s: evicted %d blobs (%s) in %.2f s, %s left", self.root,
                             result.evicted_blobs, format_bytes(result.evicted_bytes),
                             result.seconds, format_bytes(result.remaining_bytes))
        except Stopped:
            pass
        except Exception as exc:  # the next trigger tries again
            log.warning("cache %s: eviction failed: %s", self.root, exc)

    def remove_blob(self, path: Path, identity: tuple[int, int] | None = None) -> bool:
        """Unlink one blob now, pinned or not (damaged, or dropped by a reader); False if
        it was not there (or, given ``identity`` = ``(st_dev, st_ino)``, is another file
        now, e.g. a good copy another process published since). Blocks: a worker thread's
        job. It is subtracted from the counter only when no eviction runs (whose rebase
        might subtract it again): otherwise the total stays high, the safe side, until the
        next rebase."""
        with self.exclusive(0.0) as locked, cache_errors(f"removing {path}"):
            try:
                st = os.lstat(path)
                if identity is not None and (st.st_dev, st.st_ino) != identity:
                    return False
                size = st.st_size
                os.unlink(path)
            except FileNotFoundError:
                return False
            if locked:
                self.usage.add(-size, -1)
        return True

    def _note_over_quota(self, why: str) -> None:
        now = time.monotonic()
        if now - self._over_quota_logged >= OVER_QUOTA_LOG_INTERVAL:
            self._over_quota_logged = now
            log.warning("cache %s: over its quota of %s: %s", self.root,
                        format_bytes(self.limit or 0), why)

    # --- eviction ---

    def _evict_locked(
        self,
        target: int | None,
        *,
        keep: Collection[str] = (),
        dry_run: bool = False,
        stop: threading.Event | None = None,
        spare_after: float = math.inf,
    ) -> EvictResult:
        """Rebase the counter on a scan, then remove unpinned blobs, least recently used
        first, until at most ``target`` bytes of the scanned ones remain (``None``: remove
        nothing), sparing names in ``keep`` and blobs used after ``spare_after`` (epoch
        seconds), and subtracting each from the counter as it goes (waiting fills see the
        room at once). The caller holds ``evict.lock``."""
        started = time.monotonic()
        before = self.usage.read()
        scan = scan_blobs(self.blobs, stop=stop)
        if not dry_run:
            self.usage.rebase(scan.bytes, len(scan.blobs), since=before)
        total = scan.bytes
        goal = total if target is None else target
        evicted_blobs = evicted_bytes = pinned_blobs = pinned_bytes = 0
        candidates = sorted(scan.blobs, key=attrgetter("used")) if total > goal else []
        for blob in candidates:
            if total <= goal or (stop is not None and stop.is_set()):
                break
            if blob.used > spare_after:
                break  # sorted: all the rest are as recent
            if blob.name in keep:
                continue
            try:
                freed = remove_unpinned(blob.path, remove=not dry_run)
            except FileNotFoundError:
                continue  # removed by someone else, who subtracted it
            if freed is None:
                pinned_blobs += 1
                pinned_bytes += blob.size
                continue
            if not dry_run:
                self.usage.add(-freed, -1)
            total -= blob.size
            evicted_blobs += 1
            evicted_bytes += blob.size
        if not dry_run:
            with self._stats_lock:
                self.evictions += target is not None
                self.evicted_blobs += evicted_blobs
                self.evicted_bytes += evicted_bytes
        result = EvictResult(
            scanned_blobs=len(scan.blobs),
            scanned_bytes=scan.bytes,
            evicted_blobs=evicted_blobs,
            evicted_bytes=evicted_bytes,
            pinned_blobs=pinned_blobs,
            pinned_bytes=pinned_bytes,
            seconds=time.monotonic() - started,
        )
        if evicted_blobs and not dry_run:
            log.debug("cache %s: evicted %d blobs (%s) in %.2f s, %s left", self.root,
                     evicted_blobs, format_bytes(evicted_bytes), result.seconds,
                     format_bytes(result.remaining_bytes))
        return result

    def trim(
        self, target: int, *, keep: Collection[str] = (), dry_run: bool = False,
        wait: float = 30.0,
    ) -> EvictResult:
        """Evict down to ``target`` bytes (least recently used first, sparing pinned blobs
        and names in ``keep``). Raises ``CacheError`` if another process holds the lock."""
        with self.exclusive(wait) as locked:
            if not locked:
                raise CacheError(f"cache {self.root}: another process is evicting; try again")
            with cache_errors("trimming"):
                return self._evict_locked(target, keep=keep, dry_run=dry_run)

    def needs_rescan(self) -> bool:
        """Whether the counter should be checked against a scan (see the module doc)."""
        with cache_errors("reading the usage counter"):
            counted = self.usage.read()
        return not counted.trusted or time.time() - counted.scanned_at > (
            self.config.rescan_interval
        )

    def rescan(self, *, wait: float = 0.0, stop: threading.Event | None = None) -> Counted | None:
        """Rebase the counter on a scan; ``None`` if another process holds the lock (it
        rebases anyway) or ``stop`` was set."""
        with self.exclusive(wait) as locked:
            if not locked:
                return None
            try:
                with cache_errors("rescanning"):
                    self._evict_locked(None, stop=stop)
                    return self.usage.read()
            except Stopped:
                return None

    def statistics(self) -> tuple[int, int, int]:
        """``(evictions, evicted blobs, evicted bytes)`` done by this process."""
        with self._stats_lock:
            return self.evictions, self.evicted_blobs, self.evicted_bytes

    # --- leftovers ---

    def remove_stale_tmp(self) -> int:
        """Remove leftovers of fills that died; returns how many were removed.

        A file is left alone while any process holds its ``flock`` (its writer is alive
        and filling). An unlocked file is removed once it is older than ``stale_tmp_age``
        or the pid in its name is gone; the age rule protects a writer in the instant
        between creating its file and locking it.
        """
        removed = 0
        now = time.time()
        try:
            leftovers = entries(self.tmp)
        except OSError as exc:
            raise CacheError(f"cache: listing {self.tmp}: {exc.strerror}") from exc
        for entry in leftovers:
            try:
                removed += self._remove_if_stale(entry.path, entry.name, now)
            except OSError as exc:
                log.debug("cache: leaving %s: %s", entry.path, exc)
        if removed:
            log.info("cache: removed %d unfinished fill(s) from %s", removed, self.tmp)
        return removed

    def _remove_if_stale(self, path: str, name: str, now: float) -> bool:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            young = now - os.fstat(fd).st_mtime < self.config.stale_tmp_age
            if young and _writer_alive(name) and not is_fetch_claim(name):
                return False  # (an unlocked fetch claim is no one's: see Cache.claim_fetch)
            os.unlink(path)
            return True
        finally:
            os.close(fd)

    def tmp_leftovers(self) -> TmpLeftovers:
        files = total = in_use = 0
        for entry in entries(self.tmp):
            with contextlib.suppress(OSError):
                total += entry.stat(follow_symlinks=False).st_size
                files += 1
                in_use += _locked_by_someone(entry.path)
        return TmpLeftovers(files=files, bytes=total, in_use=in_use)


def _check_own_directory(path: Path) -> None:
    """Refuse a layout directory that is not a real directory of this user, writable by
    nobody else (a missing one is fine: it is made when needed, or absent from a cache
    that was never used for it)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(f"cache directory: {path} is not a directory (a symlink?)")
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise UnsafePathError(f"cache directory: {path} is owned by uid {st.st_uid} with "
                              f"mode {stat.S_IMODE(st.st_mode):04o}; it must be yours and "
                              "writable by you alone")


def _locked_by_someone(path: str) -> bool:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _writer_alive(name: str) -> bool:
    """Whether the pid in a temp name (``<hex>.<pid>.<random>``) is running. Unknown
    names count as alive, so only the age rule can remove them."""
    parts = name.split(".")
    if len(parts) != 3 or not parts[1].isdigit():
        return True
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True
