"""The cache directory's layout, its scans and the cache's error boundary.

::

    CACHE/blobs/<2 hex>/<64 hex>    verified blobs; atime = last use (set by ocixfs)
    CACHE/tmp/<hex>.<pid>.<random>  fills in progress, flock()ed by their writer
    CACHE/tmp/<hex>.fetch           a host-wide fetch claim, flock()ed by the fetching process
    CACHE/profiles/<hex>.profile    access profiles recorded on this host
    CACHE/index/<hex>.index         inode tables of images loaded here (``cache.index``)
    CACHE/index/<hex>.<u>.<g>.erofs their EROFS metadata images, per uid/gid shift
    CACHE/manifests/<hex>.json      what identifies the manifests (and profiles beside
                                    them) read here, by URL or file:// (``cache.manifests``)
    CACHE/manifests/<hex>.body      the bytes of such a profile
    CACHE/usage                     the shared usage counter (48 bytes, flock()ed to update)
    CACHE/evict.lock                flock()ed by whoever evicts, removes blobs or rescans
    CACHE/demand.lock               read-locked by each process with on-demand fetches

Every ``OSError`` of the cache becomes ``CacheError`` (``CacheFullError`` for
ENOSPC/EDQUOT) through ``cache_errors``, at the public methods of ``blobs``,
``directory`` and ``fsck``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import blake3

from ocixfs.errors import CacheError, CacheFullError

__all__ = [
    "BLOBS",
    "DEMAND_LOCK",
    "EVICT_LOCK",
    "INDEX",
    "MANIFESTS",
    "PROFILES",
    "TMP",
    "TOUCH_INTERVAL",
    "USAGE_FILE",
    "BlobFile",
    "NotABlob",
    "Scan",
    "blob_file",
    "fetch_claim_file",
    "is_fetch_claim",
    "cache_errors",
    "hash_file",
    "entries",
    "open_blob",
    "remove_unpinned",
    "scan_blobs",
    "Stopped",
]

BLOBS = "blobs"
TMP = "tmp"
PROFILES = "profiles"
INDEX = "index"
MANIFESTS = "manifests"
USAGE_FILE = "usage"
EVICT_LOCK = "evict.lock"
DEMAND_LOCK = "demand.lock"
TOUCH_INTERVAL = 3600.0
"""A file whose mtime records its last use (for trimming) is touched at most this often."""

_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_BLOB_NAME = re.compile(r"[0-9a-f]{64}")
_SHARD_NAME = re.compile(r"[0-9a-f]{2}")
_HASH_READ = 1 << 20


def hash_file(fd: int, progress: Callable[[int], None] | None = None) -> bytes:
    """The BLAKE3 digest of the whole file open at ``fd``, read from its start (blocking:
    call it from a worker thread); ``progress(n)`` is told each ``n`` bytes hashed. Raises
    ``OSError``."""
    hasher = blake3.blake3()
    offset = 0
    while data := os.pread(fd, _HASH_READ, offset):
        hasher.update(data)
        offset += len(data)
        if progress is not None:
            progress(len(data))
    return hasher.digest()


def blob_file(blobs_dir: Path, hexdigest: str) -> Path:
    """Where the blob ``hexdigest`` lives under ``CACHE/blobs``."""
    return blobs_dir / hexdigest[:2] / hexdigest


def fetch_claim_file(tmp_dir: Path, hexdigest: str) -> Path:
    """The lock file whose ``flock`` claims the fetch of ``hexdigest`` for one process."""
    return tmp_dir / f"{hexdigest}.fetch"


def is_fetch_claim(name: str) -> bool:
    """Whether a name in ``CACHE/tmp`` is a fetch claim's lock file."""
    return name.endswith(".fetch")


@contextlib.contextmanager
def cache_errors(what: str) -> Iterator[None]:
    """The cache layer's translation boundary: OSError → CacheError/CacheFullError."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno in _FULL_ERRNOS:
            raise CacheFullError(f"cache full while {what}: {reason}") from exc
        raise CacheError(f"cache: {what}: {reason}") from exc


class NotABlob(CacheError):
    """A name under ``blobs/`` is not a regular file (a planted symlink, say)."""


def open_blob(path: str | Path) -> int:
    """A read-only descriptor of the cached blob at ``path``. Never follows a symlink and
    never opens anything but a regular file (a symlink would serve some other file's
    content as a verified blob). Raises ``FileNotFoundError``, ``NotABlob``, ``OSError``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotABlob(f"cache: {path} is a symlink, not a blob") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotABlob(f"cache: {path} is not a regular file")
    return fd


class BlobFile(NamedTuple):
    """One blob as a scan saw it; ``used`` is its recency, ``max(atime, mtime)``."""

    path: str
    name: str
    size: int
    used: float
    ino: int


@dataclass(slots=True)
class Scan:
    """What ``blobs/`` holds: blobs, and strays (anything that is neither a blob nor a
    shard directory, which only ``check`` removes)."""

    blobs: list[BlobFile]
    strays: list[str]

    @property
    def bytes(self) -> int:
        return sum(blob.size for blob in self.blobs)


class Stopped(Exception):
    """A scan was asked to stop (the cache is closing)."""


def entries(path: str | Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            return list(it)
    except FileNotFoundError:
        return []


def scan_blobs(blobs_dir: Path, *, stop: threading.Event | None = None) -> Scan:
    """Every blob under ``blobs_dir`` with its size and recency (one ``lstat`` each)."""
    scan = Scan([], [])
    for shard in entries(blobs_dir):
        if stop is not None and stop.is_set():
            raise Stopped
        if not (shard.is_dir(follow_symlinks=False) and _SHARD_NAME.fullmatch(shard.name)):
            scan.strays.append(shard.path)
            continue
        for entry in entries(shard.path):
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            name = entry.name
            if stat.S_ISREG(st.st_mode) and _BLOB_NAME.fullmatch(name) and name[:2] == shard.name:
                used = max(st.st_atime, st.st_mtime)
                scan.blobs.append(BlobFile(entry.path, name, st.st_size, used, st.st_ino))
            else:
                scan.strays.append(entry.path)
    return scan


def remove_unpinned(path: str, *, remove: bool = True) -> int | None:
    """Unlink a blob unless a process pins it; the bytes freed, or ``None`` if pinned.
    Raises ``FileNotFoundError`` when it is already gone."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None
        st = os.fstat(fd)
        if st.st_nlink == 0:
            raise FileNotFoundError(errno.ENOENT, "removed meanwhile", path)
        if remove:
            os.unlink(path)
        return st.st_size
    finally:
        os.close(fd)
