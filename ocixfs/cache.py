"""The local blob cache: verified blobs on disk, named by their BLAKE3-256 hash.

Layout (shared by every mount and image on the host, and safe for several daemons at
once)::

    CACHE/blobs/<first 2 hex>/<64 hex>    a blob whose hash matched its name, mode 0600
    CACHE/tmp/<hex>.<pid>.<random>        a fill in progress, flock()ed by its writer

Developer note: this runs in one trio thread, where code between two awaits is atomic;
the kept-open descriptor table relies on that, and a descriptor with ``users > 0`` (a read
running in a worker thread) is never closed, because its number could be reused for
another file. Adding an await can break such an invariant: read docs/developer-notes.md
first.

Contract:

- A file appears under ``blobs/`` only by ``rename()`` from ``tmp/`` after its length and
  hash matched (and, by default, after fsync), so a reader never sees unverified or partial
  bytes, and two daemons filling the same blob just replace identical files.
- ``Cache.writer(chunk)`` gives a ``BlobWriter``: ``write()`` hashes while writing (call it
  from a worker thread), ``Cache.commit()`` verifies and renames, ``abort()`` unlinks. Any
  failure leaves nothing under ``blobs/``.
- ``Cache.read()`` serves a cached blob with ``pread`` on a kept-open descriptor (an LRU of
  at most ``open_files``), inline for small reads, in a worker thread for large ones. It
  never touches the network; it returns ``None`` when the blob is not cached.
- At start, ``tmp/`` leftovers are removed when no live writer holds their lock.
- Every ``OSError`` becomes ``CacheError`` (``CacheFullError`` for ENOSPC/EDQUOT) here.

Quota and LRU eviction are not implemented yet; ``usage()`` scans the directory and the
statistics count what this process stored. Evicting is safe by design: an unlinked blob
stays readable through descriptors already open, and a reader that finds a blob gone
simply fetches it again.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import blake3
import trio

from .config import DEFAULT_CACHE_CONFIG, CacheConfig
from .errors import BlobCorrupt, CacheError, CacheFullError
from .format import HASH_SIZE, Chunk

__all__ = [
    "BlobWriter",
    "Cache",
    "CacheStatistics",
    "CacheUsage",
    "default_cache_dir",
]

log = logging.getLogger(__name__)

_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def default_cache_dir() -> Path:
    """``/var/cache/ocixfs`` for root, else ``$XDG_CACHE_HOME/ocixfs`` (``~/.cache/ocixfs``)."""
    if os.geteuid() == 0:
        return Path("/var/cache/ocixfs")
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "ocixfs"


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheStatistics:
    """What this process did to the cache since it opened it."""

    stored_blobs: int
    stored_bytes: int
    dropped_blobs: int
    open_files: int


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheUsage:
    """What the cache directory holds (all processes), from a directory scan."""

    blobs: int
    bytes: int


@contextlib.contextmanager
def _cache_errors(what: str) -> Iterator[None]:
    """The cache's one translation boundary: OSError → CacheError/CacheFullError."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno in _FULL_ERRNOS:
            raise CacheFullError(f"cache full while {what}: {reason}") from exc
        raise CacheError(f"cache: {what}: {reason}") from exc


class _OpenBlob:
    """A kept-open cache file. ``users`` counts reads running in worker threads: the
    descriptor must not be closed (and its number reused) under them."""

    __slots__ = ("close_when_idle", "fd", "users")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.users = 0
        self.close_when_idle = False


class BlobWriter:
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
        with _cache_errors(f"writing blob {self.chunk.hex}"):
            fd = self._open()
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        self._hasher.update(data)
        self.written += len(data)

    def _open(self) -> int:
        if self._fd < 0:
            tmp = self._tmpdir / f"{self.chunk.hex}.{os.getpid()}.{secrets.token_hex(4)}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
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

    def _commit(self) -> None:
        self._verify()
        with _cache_errors(f"storing blob {self.chunk.hex}"):
            fd = self._open()
            if self._fsync:
                os.fsync(fd)
            assert self._tmp is not None
            os.rename(self._tmp, self._final)
            self._tmp = None
            self._close()

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


class Cache:
    """Verified blobs under ``root`` (created if missing, mode 0700).

    Construct it outside or inside trio; ``read``/``commit`` must run inside trio. The
    constructor creates the directories and removes stale temporary files (raising
    ``CacheError`` if it cannot); ``close()`` (or leaving the ``with`` block) closes the
    kept-open descriptors. ``limiter`` bounds the worker threads this cache starts.
    """

    def __init__(
        self,
        root: Path,
        config: CacheConfig = DEFAULT_CACHE_CONFIG,
        *,
        limiter: trio.CapacityLimiter | None = None,
    ) -> None:
        self.root = Path(root)
        self.config = config
        self._blobs = self.root / "blobs"
        self._tmp = self.root / "tmp"
        self._limiter = limiter
        self._open_blobs: OrderedDict[bytes, _OpenBlob] = OrderedDict()
        self._stored_blobs = 0
        self._stored_bytes = 0
        self._dropped_blobs = 0
        with _cache_errors(f"preparing {self.root}"):
            self._prepare()
        self.remove_stale_tmp()

    def _prepare(self) -> None:
        for directory in (self.root, self._blobs, self._tmp):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        for shard in range(256):
            (self._blobs / f"{shard:02x}").mkdir(mode=0o700, exist_ok=True)
        if self.root.stat().st_mode & 0o022:
            log.warning("cache directory %s is writable by others: blobs there are trusted",
                        self.root)

    def __enter__(self) -> Cache:
        return self

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close kept-open files (those in use by a worker thread close when it is done)."""
        while self._open_blobs:
            _, blob = self._open_blobs.popitem(last=False)
            self._retire(blob)

    def path_of(self, chunk: Chunk) -> Path:
        """Where the verified blob lives (derived from the 32-byte digest, never a string)."""
        if len(chunk.digest) != HASH_SIZE:
            raise CacheError(f"cache: invalid digest of {len(chunk.digest)} bytes")
        hexdigest = chunk.digest.hex()
        return self._blobs / hexdigest[:2] / hexdigest

    def contains(self, chunk: Chunk) -> bool:
        """True if the blob is cached (filled by this or any other process). No I/O if open."""
        if chunk.digest in self._open_blobs:
            return True
        return os.path.exists(self.path_of(chunk))

    async def read(self, chunk: Chunk, offset: int, size: int) -> bytes | None:
        """Bytes ``[offset, offset+size)`` of a cached blob (clamped to its end), or ``None``
        if it is not cached. Always a checkpoint; never waits on the network."""
        size = max(0, min(size, chunk.size - offset))
        blob = self._lookup(chunk)
        if blob is None:
            await trio.lowlevel.checkpoint()
            return None
        if size <= self.config.inline_read_max:
            with _cache_errors(f"reading blob {chunk.hex}"):
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
            self.discard(chunk)
            raise CacheError(f"cache: blob {chunk.hex} is shorter than it should be")
        return data

    def _lookup(self, chunk: Chunk) -> _OpenBlob | None:
        blob = self._open_blobs.get(chunk.digest)
        if blob is not None:
            self._open_blobs.move_to_end(chunk.digest)
            return blob
        path = self.path_of(chunk)
        with _cache_errors(f"opening blob {chunk.hex}"):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return None
            try:
                actual = os.fstat(fd).st_size
            except BaseException:
                os.close(fd)
                raise
        if actual != chunk.size:
            os.close(fd)
            log.warning("cache: %s holds %d bytes, expected %d; dropping it",
                        path, actual, chunk.size)
            self.discard(chunk)
            return None
        blob = _OpenBlob(fd)
        self._open_blobs[chunk.digest] = blob
        self._trim_open()
        return blob

    def _trim_open(self) -> None:
        excess = len(self._open_blobs) - max(1, self.config.open_files)
        for digest in list(self._open_blobs)[:excess]:
            blob = self._open_blobs[digest]
            if blob.users == 0:
                del self._open_blobs[digest]
                self._retire(blob)

    def _retire(self, blob: _OpenBlob) -> None:
        if blob.users:
            blob.close_when_idle = True
        elif blob.fd >= 0:
            fd, blob.fd = blob.fd, -1
            os.close(fd)

    def discard(self, chunk: Chunk) -> bool:
        """Remove a blob (bad on disk, or evicted). Open descriptors keep working."""
        blob = self._open_blobs.pop(chunk.digest, None)
        if blob is not None:
            self._retire(blob)
        with _cache_errors(f"removing blob {chunk.hex}"):
            try:
                self.path_of(chunk).unlink()
            except FileNotFoundError:
                return False
        self._dropped_blobs += 1
        return True

    def writer(self, chunk: Chunk) -> BlobWriter:
        """A writer for one fill of ``chunk``; finish with ``commit()`` or ``abort()``."""
        return BlobWriter(chunk, self.path_of(chunk), self._tmp, fsync=self.config.fsync)

    async def commit(
        self, writer: BlobWriter, *, first: Callable[[], object] | None = None
    ) -> None:
        """Verify length and hash, fsync and rename into place, in one worker-thread hop
        that starts with ``first()`` if given (e.g. writing the last bytes; what it raises
        propagates). Raises ``BlobCorrupt`` (nothing stored) or ``CacheError``."""

        def finish() -> None:
            if first is not None:
                first()
            writer._commit()

        await trio.to_thread.run_sync(finish, limiter=self._limiter)
        self._stored_blobs += 1
        self._stored_bytes += writer.chunk.size

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
            entries = list(os.scandir(self._tmp))
        except OSError as exc:
            raise CacheError(f"cache: listing {self._tmp}: {exc.strerror}") from exc
        for entry in entries:
            try:
                removed += self._remove_if_stale(entry.path, entry.name, now)
            except OSError as exc:
                log.debug("cache: leaving %s: %s", entry.path, exc)
        if removed:
            log.info("cache: removed %d unfinished fill(s) from %s", removed, self._tmp)
        return removed

    def _remove_if_stale(self, path: str, name: str, now: float) -> bool:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            young = now - os.fstat(fd).st_mtime < self.config.stale_tmp_age
            if young and _writer_alive(name):
                return False
            os.unlink(path)
            return True
        finally:
            os.close(fd)

    def usage(self) -> CacheUsage:
        """Scan ``blobs/`` (every process's blobs). Blocking; for tools and gc, not reads."""
        count = total = 0
        with _cache_errors(f"scanning {self._blobs}"):
            for shard in os.scandir(self._blobs):
                if not shard.is_dir(follow_symlinks=False):
                    continue
                for entry in os.scandir(shard.path):
                    with contextlib.suppress(FileNotFoundError):
                        total += entry.stat(follow_symlinks=False).st_size
                        count += 1
        return CacheUsage(blobs=count, bytes=total)

    def statistics(self) -> CacheStatistics:
        return CacheStatistics(
            stored_blobs=self._stored_blobs,
            stored_bytes=self._stored_bytes,
            dropped_blobs=self._dropped_blobs,
            open_files=len(self._open_blobs),
        )


def _pread_exact(fd: int, size: int, offset: int, hexdigest: str) -> bytes:
    """``pread`` until ``size`` bytes or end of file (runs in a worker thread)."""
    parts = []
    with _cache_errors(f"reading blob {hexdigest}"):
        while size > 0:
            data = os.pread(fd, size, offset)
            if not data:
                break
            parts.append(data)
            size -= len(data)
            offset += len(data)
    return b"".join(parts)


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
