"""The local blob cache: verified blobs on disk, named by their BLAKE3-256 hash.

Layout (shared by every mount and image on the host, and safe for several daemons at
once; ``directory`` owns the shared parts: quota, eviction, usage counter)::

    CACHE/blobs/<first 2 hex>/<64 hex>    a blob whose hash matched its name, mode 0600
    CACHE/tmp/<hex>.<pid>.<random>        a fill in progress, flock()ed by its writer
    CACHE/usage, CACHE/evict.lock         the shared usage counter and the evictor's lock
    CACHE/demand.lock                     marks processes with on-demand fetches (``demand``)

Developer note: this runs in one trio thread, where code between two awaits is atomic;
the kept-open descriptor table relies on that, and a descriptor with ``users > 0`` (a read
running in a worker thread) is never closed, because its number could be reused for
another file. Adding an await can break such an invariant: read docs/developer-notes.md
first.

Contract:

- A file appears under ``blobs/`` only by ``link()`` (``rename()`` where the filesystem
  has no hard links) from ``tmp/`` after its length and hash matched (and, by default,
  after fsync), so a reader never sees unverified or partial bytes. ``link`` never
  replaces a blob another daemon published first, which keeps the usage count exact.
- ``Cache.fill(chunk)`` gives a ``CacheFill`` (or ``CacheFullError`` at once when the
  blob's declared size is larger than the whole quota): ``write()`` hashes while writing
  (call it from a worker thread) and refuses bytes beyond the declared size;
  ``Cache.commit()`` verifies, makes room under the quota (evicting least recently used,
  unpinned blobs) and publishes; ``abort()`` unlinks. Any failure leaves nothing under
  ``blobs/``.
- ``Cache.read()`` serves a cached blob with ``pread`` on a kept-open descriptor (an LRU of
  at most ``open_files``), inline for small reads, in a worker thread for large ones. It
  never touches the network; it returns ``None`` when the blob is not cached. Every kept-open
  blob holds a shared ``flock`` (it is pinned: eviction skips it) and has its atime set
  (at most every ``touch_interval``), which is the recency eviction goes by.
- ``Cache.claim_fetch(chunk)`` makes one process on the host the one that fetches a blob
  (an exclusive ``flock`` on ``tmp/<hex>.fetch``, given up with ``FetchClaim.release()``
  or by dying); it returns ``None`` while another process holds the claim, so every
  mount of every image shares one transfer per blob.
- At start, ``tmp/`` leftovers are removed when no live writer holds their lock, and the
  shared usage counter is checked against a scan in a background thread when it is stale.
- Every ``OSError`` becomes ``CacheError`` (``CacheFullError`` for ENOSPC/EDQUOT, or a blob
  larger than the whole quota) here.

Evicting is safe by design: an unlinked blob stays readable through descriptors already
open, and a reader that finds a blob gone simply fetches it again.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import blake3
import trio

from ocixfs.cache.demand import HostDemand
from ocixfs.cache.directory import CacheDirectory
from ocixfs.cache.layout import (
    DEMAND_LOCK,
    NotABlob,
    blob_file,
    cache_errors,
    fetch_claim_file,
    hash_file,
    open_blob,
    scan_blobs,
)
from ocixfs.config import DEFAULT_CACHE_CONFIG, CacheConfig, default_cache_dir
from ocixfs.errors import BlobCorrupt, CacheError
from ocixfs.image.format import HASH_SIZE, Chunk

__all__ = [
    "FetchClaim",
    "CacheFill",
    "Cache",
    "CacheStatistics",
    "CacheUsage",
    "default_cache_dir",
]

log = logging.getLogger(__name__)

_SOUND_FILES_KEPT = 1024

# link() errors meaning "this filesystem has no hard links": publish by rename instead.
_NO_HARDLINKS = frozenset({errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS})


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheStatistics:
    """What this process did to the cache since it opened it, plus the shared total
    (``usage_bytes``, from the counter every process updates) and the quota in bytes
    (``limit``, ``None`` when unlimited)."""

    stored_blobs: int
    stored_bytes: int
    dropped_blobs: int
    open_files: int
    open_bytes: int
    evictions: int
    evicted_blobs: int
    evicted_bytes: int
    usage_bytes: int
    limit: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheUsage:
    """What the cache directory holds (all processes), from a directory scan."""

    blobs: int
    bytes: int


class _OpenBlob:
    """A kept-open cache file. ``users`` counts reads running in worker threads: the
    descriptor must not be closed (and its number reused) under them. ``touched`` is when
    this process last set the file's atime (monotonic clock)."""

    __slots__ = ("close_when_idle", "fd", "mtime_ns", "size", "touched", "users")

    def __init__(self, fd: int, size: int, mtime_ns: int, touched: float) -> None:
        self.fd = fd
        self.size = size
        self.mtime_ns = mtime_ns
        self.touched = touched
        self.users = 0
        self.close_when_idle = False


@dataclass(frozen=True, slots=True)
class _WrongSize:
    """A cached file opened (and pinned) by ``_lookup`` whose size is not the declared one;
    whoever gets it closes ``fd``."""

    fd: int
    st: os.stat_result


class CacheFill:
    """Fills one cache entry. Not thread-safe: one caller at a time, in order.

    ``write()`` and the verification in ``Cache.commit()`` do blocking I/O and hashing:
    run them in a worker thread. ``write()`` raises ``BlobCorrupt`` as soon as more bytes
    arrive than the blob's size, ``CacheError`` when the disk fails. ``abort()`` is cheap,
    idempotent, and a no-op after a successful commit.
    """

    def __init__(self, chunk: Chunk, final: Path, tmpdir: Path, *, fsync: bool) -> None:
        self.chunk = chunk
        self.written = 0
        self._final = final
        self._tmpdir = tmpdir
        self._fsync = fsync
        self._hasher = blake3.blake3()
        self._fd = -1
        self._tmp: Path | None = None

    def write(self, data: bytes) -> None:
        if self.written + len(data) > self.chunk.size:
            raise BlobCorrupt(f"blob {self.chunk.hex}: more than {self.chunk.size} bytes")
        with cache_errors(f"writing blob {self.chunk.hex}"):
            fd = self._open()
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        self._hasher.update(data)
        self.written += len(data)

    def _open(self) -> int:
        if self._fd < 0:
            tmp = self._tmpdir / f"{self.chunk.hex}.{os.getpid()}.{secrets.token_hex(4)}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
            self._fd, self._tmp = fd, tmp
            # Held until the fd closes; start-up cleanup leaves locked files alone.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return self._fd

    def _verify(self) -> None:
        if self.written != self.chunk.size:
            raise BlobCorrupt(
                f"blob {self.chunk.hex}: {self.written} bytes, expected {self.chunk.size}"
            )
        if self._hasher.digest() != self.chunk.digest:
            raise BlobCorrupt(f"blob {self.chunk.hex}: content does not match its hash")

    def _commit(self, directory: CacheDirectory) -> None:
        self._verify()
        with cache_errors(f"storing blob {self.chunk.hex}"):
            fd = self._open()
            if self._fsync:
                os.fsync(fd)
        with cache_errors(f"storing blob {self.chunk.hex}"):
            directory.publish(self.chunk.size, self._publish)
        self._close()

    def _publish(self) -> bool:
        """Make the verified temp file the blob; False if the blob was already there."""
        tmp = self._tmp
        assert tmp is not None
        try:
            os.link(tmp, self._final)
        except FileExistsError:
            if _is_regular(self._final):
                added = False  # another daemon published it first: keep its (identical) file
            else:  # not a blob (a planted symlink?): the verified file takes the name
                os.replace(tmp, self._final)
                self._tmp = None
                return True
        except OSError as exc:
            if exc.errno not in _NO_HARDLINKS:
                raise
            os.replace(tmp, self._final)
            self._tmp = None
            return True
        else:
            added = True
        with contextlib.suppress(OSError):  # else abort() retries; start-up cleans up
            tmp.unlink()
            self._tmp = None
        return added

    def abort(self) -> None:
        if self._tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                self._tmp.unlink()
            self._tmp = None
        self._close()

    def _close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


class FetchClaim:
    """One process's claim on fetching a blob into this cache (``Cache.claim_fetch``)."""

    def __init__(self, fd: int, path: Path) -> None:
        self._fd = fd
        self._path = path

    @classmethod
    def held_by_no_one(cls) -> FetchClaim:
        """A claim that holds nothing, for a fetch that goes ahead without one."""
        return cls(-1, Path())

    def release(self) -> None:
        """Give the claim up (idempotent). The file is unlinked while still locked, so a
        process that opened it meanwhile finds its lock on a dead file and tries again."""
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        try:
            with contextlib.suppress(OSError):
                if _same_file(fd, self._path):
                    os.unlink(self._path)
        finally:
            os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` (not followed) is still the file open at ``fd``. Raises OSError."""
    held, named = os.fstat(fd), os.lstat(path)
    return (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)


class Cache:
    """Verified blobs under ``root`` (created if missing, mode 0700).

    Construct it outside or inside trio; ``read``/``commit`` must run inside trio. The
    constructor creates the directories, removes stale temporary files (raising
    ``CacheError`` if it cannot) and, when the shared usage counter needs it, starts a
    rescan in a background thread (``rescan=False`` skips that); ``close()`` (or leaving
    the ``with`` block) closes the kept-open descriptors and stops the rescan.
    ``limiter`` bounds the worker threads this cache starts.
    """

    def __init__(
        self,
        root: Path,
        config: CacheConfig = DEFAULT_CACHE_CONFIG,
        *,
        limiter: trio.CapacityLimiter | None = None,
        rescan: bool = True,
    ) -> None:
        self.config = config
        self.directory = CacheDirectory(Path(root), config)
        self.root = self.directory.root
        self._blobs = self.directory.blobs
        self._tmp = self.directory.tmp
        self.demand = HostDemand(self.root / DEMAND_LOCK)
        self._limiter = limiter
        self._open_blobs: OrderedDict[bytes, _OpenBlob] = OrderedDict()
        self._open_bytes = 0
        self._sound_files: dict[bytes, tuple[int, int, int, int]] = {}
        self._open_bytes_max = (
            None if self.limit is None else max(1, int(self.limit * config.open_share))
        )
        self._stored_blobs = 0
        self._stored_bytes = 0
        self._dropped_blobs = 0
        self._stop_rescan = threading.Event()
        self._rescanner: threading.Thread | None = None
        try:
            self.remove_stale_tmp()
            if rescan and self.directory.needs_rescan():
                self._rescanner = threading.Thread(
                    target=self._rescan, name="ocixfs-cache-rescan", daemon=True
                )
                self._rescanner.start()
        except BaseException:
            self.directory.close()
            raise

    @property
    def limit(self) -> int | None:
        """The quota in bytes (``None``: unlimited)."""
        return self.directory.limit

    def _rescan(self) -> None:
        """Runs in its own thread: rebase the shared usage counter on a scan."""
        try:
            counted = self.directory.rescan(stop=self._stop_rescan)
        except Exception as exc:  # a failed rescan only leaves the counter as it was
            log.warning("cache %s: rescan failed: %s", self.root, exc)
            return
        if counted is not None:
            log.debug("cache %s: rescanned: %d blobs, %d bytes", self.root, counted.blobs,
                      counted.bytes)

    def __enter__(self) -> Cache:
        return self

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close kept-open files (those in use by a worker thread close when it is done),
        stop a running rescan and close the usage counter."""
        while self._open_blobs:
            _, blob = self._open_blobs.popitem(last=False)
            self._retire(blob)
        self._open_bytes = 0
        if self._rescanner is not None:
            self._stop_rescan.set()
            self._rescanner.join()
            self._rescanner = None
        self.demand.close()
        self.directory.close()

    def path_of(self, chunk: Chunk) -> Path:
        """Where the verified blob lives (derived from the 32-byte digest, never a string)."""
        if len(chunk.digest) != HASH_SIZE:
            raise CacheError(f"cache: invalid digest of {len(chunk.digest)} bytes")
        hexdigest = chunk.digest.hex()
        return blob_file(self._blobs, hexdigest)

    async def warm(self, chunks: Sequence[Chunk]) -> None:
        """Have the kernel read the cached blobs of ``chunks`` into the page cache, in
        order (``POSIX_FADV_WILLNEED``: the reads are queued, not waited for), from one
        worker thread; blobs not cached are skipped. A start-up whose files are all
        cached then reads them from memory instead of from a cold disk one file at a
        time. Touches none of the cache's tables; never raises."""
        paths = [self.path_of(chunk) for chunk in chunks]
        await trio.to_thread.run_sync(_will_need, paths, limiter=self._limiter)

    def contains(self, chunk: Chunk) -> bool:
        """True if the blob is cached (filled by this or any other process). No I/O if open."""
        if chunk.digest in self._open_blobs:
            return True
        return _is_regular(self.path_of(chunk))

    async def read(self, chunk: Chunk, offset: int, size: int) -> bytes | None:
        """Bytes ``[offset, offset+size)`` of a cached blob (clamped to its end), or ``None``
        if it is not cached. Always a checkpoint; never waits on the network."""
        size = max(0, min(size, chunk.size - offset))
        found = self._lookup(chunk)
        if isinstance(found, _WrongSize):
            await self._settle_wrong_size(chunk, found)  # raises, or the blob is gone
            return None
        blob = found
        if blob is None:
            await trio.lowlevel.checkpoint()
            return None
        if size <= self.config.inline_read_max:
            with cache_errors(f"reading blob {chunk.hex}"):
                data = os.pread(blob.fd, size, offset)
            await trio.lowlevel.checkpoint()
        else:
            blob.users += 1
            try:
                data = await trio.to_thread.run_sync(
                    _pread_exact, blob.fd, size, offset, chunk.hex, limiter=self._limiter
                )
            finally:
                blob.users -= 1
                if blob.close_when_idle:
                    self._retire(blob)
        if len(data) != size:
            await self.discard(chunk)
            raise CacheError(f"cache: blob {chunk.hex} is shorter than it should be")
        return data

    def _lookup(self, chunk: Chunk) -> _OpenBlob | _WrongSize | None:
        """The kept-open blob (opened and pinned now if need be), ``None`` when it is not
        cached, or ``_WrongSize`` (holding the open descriptor) when the file's size is not
        the one ``chunk`` declares. No await: the table is read and written atomically."""
        blob = self._open_blobs.get(chunk.digest)
        if blob is not None:
            self._open_blobs.move_to_end(chunk.digest)
            if time.monotonic() - blob.touched >= self.config.touch_interval:
                self._touch(blob.fd, blob.mtime_ns)
                blob.touched = time.monotonic()
            return blob
        path = self.path_of(chunk)
        with cache_errors(f"opening blob {chunk.hex}"):
            try:
                fd = open_blob(path)
            except FileNotFoundError:
                return None
            except NotABlob as exc:  # not counted as a blob: unlinking it is all there is
                log.warning("cache: %s; dropping it", exc)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                return None
            try:
                st = self._pin(fd)
            except BaseException:
                os.close(fd)
                raise
        if st is None:  # evicted between our open and our lock
            os.close(fd)
            return None
        if st.st_size != chunk.size:
            return _WrongSize(fd, st)
        if time.time() - max(st.st_atime, st.st_mtime) >= self.config.touch_interval:
            self._touch(fd, st.st_mtime_ns)
        blob = _OpenBlob(fd, chunk.size, st.st_mtime_ns, time.monotonic())
        self._open_blobs[chunk.digest] = blob
        self._open_bytes += blob.size
        self._trim_open()
        return blob

    @staticmethod
    def _pin(fd: int) -> os.stat_result | None:
        """Take the shared lock that keeps eviction away; ``None`` if the file was just
        unlinked. If an evictor or a publishing writer holds the lock this instant, the blob
        is used unpinned: its descriptor works even after an unlink."""
        with contextlib.suppress(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        st = os.fstat(fd)
        return None if st.st_nlink == 0 else st

    @staticmethod
    def _touch(fd: int, mtime_ns: int) -> None:
        """Record a use: atime = now (explicitly; relatime/noatime would not), mtime kept."""
        try:
            os.utime(fd, ns=(time.time_ns(), mtime_ns))
        except OSError as exc:
            log.debug("cache: cannot record a use: %s", exc)

    def _trim_open(self) -> None:
        """Close the least recently used idle descriptors beyond ``open_files`` or beyond
        ``open_share`` of the quota in bytes (always keeping the newest one)."""
        limit = max(1, self.config.open_files)
        byte_limit = self._open_bytes_max
        for digest in list(self._open_blobs)[:-1]:
            over_count = len(self._open_blobs) > limit
            over_bytes = byte_limit is not None and self._open_bytes > byte_limit
            if not (over_count or over_bytes):
                break
            blob = self._open_blobs[digest]
            if blob.users == 0:
                del self._open_blobs[digest]
                self._open_bytes -= blob.size
                self._retire(blob)

    def _retire(self, blob: _OpenBlob) -> None:
        if blob.users:
            blob.close_when_idle = True
        elif blob.fd >= 0:
            fd, blob.fd = blob.fd, -1
            os.close(fd)

    async def _settle_wrong_size(self, chunk: Chunk, wrong: _WrongSize) -> None:
        """A cached file whose size is not the one ``chunk`` declares. Its content is
        hashed in a worker thread (once per file: the verdict is remembered): if it matches
        its name, the blob is good and the manifest that declared the size is wrong (one
        image's lie must not cost the others a blob they share): raise ``CacheError``
        and keep it. Otherwise the file is damaged: remove it (the caller refetches)."""
        identity = (wrong.st.st_dev, wrong.st.st_ino, wrong.st.st_size, wrong.st.st_mtime_ns)
        try:
            sound = self._sound_files.get(chunk.digest) == identity
            if not sound:
                digest = await trio.to_thread.run_sync(
                    _hash_file, wrong.fd, chunk.hex, limiter=self._limiter
                )
                sound = digest == chunk.digest
                if sound:
                    if len(self._sound_files) >= _SOUND_FILES_KEPT:
                        self._sound_files.clear()
                    self._sound_files[chunk.digest] = identity
        finally:
            os.close(wrong.fd)
        if sound:
            raise CacheError(
                f"cache: blob {chunk.hex} is {wrong.st.st_size} bytes, not the {chunk.size} "
                "the manifest says: the manifest is wrong (the blob is kept)"
            )
        log.warning("cache: blob %s is damaged (%d bytes, expected %d); dropping it",
                    chunk.hex, wrong.st.st_size, chunk.size)
        await self.discard(chunk, only=wrong.st)

    async def discard(self, chunk: Chunk, *, only: os.stat_result | None = None) -> bool:
        """Remove a blob (bad on disk, or evicted), in a worker thread (removal may wait on
        the disk). ``only``: remove it only if it is still that file. Open descriptors keep
        working. Returns whether a file was removed."""
        blob = self._open_blobs.pop(chunk.digest, None)  # atomically, before the await
        if blob is not None:
            self._open_bytes -= blob.size
            self._retire(blob)
        identity = None if only is None else (only.st_dev, only.st_ino)
        removed = await trio.to_thread.run_sync(
            self.directory.remove_blob, self.path_of(chunk), identity, limiter=self._limiter
        )
        if removed:
            self._dropped_blobs += 1
        return removed

    def refuse_oversized(self, chunk: Chunk) -> None:
        """Raise ``CacheFullError`` if ``chunk`` is larger than the whole quota: fetching it
        would be wasted (and, unchecked, could fill the cache's filesystem)."""
        self.directory.refuse_oversized(chunk.size)

    def fill(self, chunk: Chunk) -> CacheFill:
        """A writer for one fill of ``chunk``; finish with ``commit()`` or ``abort()``.
        Raises ``CacheFullError`` at once for a blob larger than the whole quota; the
        writer refuses more bytes than ``chunk.size``."""
        self.refuse_oversized(chunk)
        return CacheFill(chunk, self.path_of(chunk), self._tmp, fsync=self.config.fsync)

    def claim_fetch(self, chunk: Chunk) -> FetchClaim | None:
        """Claim the fetch of ``chunk`` for this process, or ``None`` while another process
        holds it (then the blob appears in the cache, or the claim is freed, soon: the holder
        is bound by its own deadlines). Quick local I/O only. Raises ``CacheError``."""
        path = fetch_claim_file(self._tmp, chunk.hex)
        with cache_errors(f"claiming the fetch of blob {chunk.hex}"):
            for _ in range(8):  # the file is replaced only when a holder releases it
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
                             | os.O_NONBLOCK, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    if _same_file(fd, path):
                        return FetchClaim(fd, path)
                except BlockingIOError:
                    os.close(fd)
                    return None
                except FileNotFoundError:
                    pass
                os.close(fd)
        raise CacheError(f"cache: the fetch claim of blob {chunk.hex} keeps changing")

    async def commit(
        self, writer: CacheFill, *, first: Callable[[], object] | None = None
    ) -> None:
        """Verify length and hash, fsync, make room under the quota and publish, in one
        worker-thread hop that starts with ``first()`` if given (e.g. writing the last
        bytes; what it raises propagates). Raises ``BlobCorrupt`` (nothing stored),
        ``CacheFullError`` (disk full, or a blob larger than the quota) or ``CacheError``."""
        directory = self.directory

        def finish() -> None:
            if first is not None:
                first()
            writer._commit(directory)

        await trio.to_thread.run_sync(finish, limiter=self._limiter)
        self._stored_blobs += 1
        self._stored_bytes += writer.chunk.size

    def remove_stale_tmp(self) -> int:
        """Remove leftovers of fills that died (see ``CacheDirectory.remove_stale_tmp``)."""
        return self.directory.remove_stale_tmp()

    def usage(self) -> CacheUsage:
        """Scan ``blobs/`` (every process's blobs). Blocking; for tools and gc, not reads."""
        with cache_errors(f"scanning {self._blobs}"):
            scan = scan_blobs(self._blobs)
        return CacheUsage(blobs=len(scan.blobs), bytes=scan.bytes)

    def statistics(self) -> CacheStatistics:
        evictions, evicted_blobs, evicted_bytes = self.directory.statistics()
        with cache_errors("reading the usage counter"):
            counted = self.directory.usage.read()
        return CacheStatistics(
            stored_blobs=self._stored_blobs,
            stored_bytes=self._stored_bytes,
            dropped_blobs=self._dropped_blobs,
            open_files=len(self._open_blobs),
            open_bytes=self._open_bytes,
            evictions=evictions,
            evicted_blobs=evicted_blobs,
            evicted_bytes=evicted_bytes,
            usage_bytes=counted.bytes,
            limit=self.limit,
        )


def _hash_file(fd: int, hexdigest: str) -> bytes:
    """``layout.hash_file`` with the cache's error translation (runs in a worker thread)."""
    with cache_errors(f"reading blob {hexdigest}"):
        return hash_file(fd)


def _pread_exact(fd: int, size: int, offset: int, hexdigest: str) -> bytes:
    """``pread`` until ``size`` bytes or end of file (runs in a worker thread)."""
    parts = []
    with cache_errors(f"reading blob {hexdigest}"):
        while size > 0:
            data = os.pread(fd, size, offset)
            if not data:
                break
            parts.append(data)
            size -= len(data)
            offset += len(data)
    return b"".join(parts)


def _will_need(paths: Sequence[Path]) -> None:
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue  # not cached
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass  # only advice
        finally:
            os.close(fd)


def _is_regular(path: Path) -> bool:
    """Whether ``path`` is a regular file, not followed (a symlink is never a blob)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False
