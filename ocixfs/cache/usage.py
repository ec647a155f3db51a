"""The cache's shared usage counter: the bytes and blobs under ``blobs/``, kept by every
process that fills or removes, in one small file updated under ``flock``.

A fill adds its size and then links the blob while holding the counter's lock (and takes
the size back if the link fails); a removal subtracts after it unlinked. A crash therefore
leaves the total too high (an early eviction), never too low. A rebase sets it from a scan
plus whatever changed meanwhile. Thread-safe; blocks on the file system only for
microseconds.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ocixfs.errors import CacheError

__all__ = ["Counted", "SharedUsage"]

_USAGE = struct.Struct("<4sIqqd16s")  # magic, version, bytes, blobs, scanned_at, boot id
_MAGIC = b"OCXU"
_VERSION = 1


@functools.cache
def _boot_id() -> bytes:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return bytes.fromhex(f.read().strip().replace("-", ""))[:16].ljust(16, b"\0")
    except (OSError, ValueError):
        return bytes(16)


@dataclass(frozen=True, slots=True)
class Counted:
    """The counter's content. ``scanned_at`` is when a scan last rebased it (0: never);
    ``trusted`` is false when it is damaged or was last rebased in another boot."""

    bytes: int
    blobs: int
    scanned_at: float
    trusted: bool


class SharedUsage:
    """The running total in ``CACHE/usage``. Every update is read-modify-write under an
    exclusive ``flock`` of the file (and a thread lock: flock does not exclude threads
    sharing one descriptor)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                           0o600)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                fd, self._fd = self._fd, -1
                os.close(fd)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._lock:
            if self._fd < 0:
                raise CacheError("cache: usage counter used after close")
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _load(self) -> tuple[Counted, bytes]:
        data = os.pread(self._fd, _USAGE.size, 0)
        if len(data) == _USAGE.size:
            magic, version, nbytes, nblobs, scanned_at, boot = _USAGE.unpack(data)
            if magic == _MAGIC and version == _VERSION and nbytes >= 0 and nblobs >= 0:
                trusted = boot == _boot_id() and scanned_at > 0
                return Counted(nbytes, nblobs, scanned_at, trusted), boot
        return Counted(0, 0, 0.0, False), bytes(16)

    def _save(self, nbytes: int, nblobs: int, scanned_at: float, boot: bytes) -> None:
        record = _USAGE.pack(_MAGIC, _VERSION, max(0, nbytes), max(0, nblobs), scanned_at, boot)
        os.pwrite(self._fd, record, 0)

    def read(self) -> Counted:
        with self._locked():
            return self._load()[0]

    def add(self, nbytes: int, nblobs: int) -> None:
        """Add (or with negative numbers, subtract) unconditionally."""
        with self._locked():
            counted, boot = self._load()
            self._save(counted.bytes + nbytes, counted.blobs + nblobs, counted.scanned_at, boot)

    def publish(
        self, nbytes: int, limit: int | None, link: Callable[[], bool]
    ) -> tuple[bool, int] | None:
        """If one more blob of ``nbytes`` stays within ``limit``: count it, then ``link()``
        it into place, taking the count back if ``link`` returns False (it was there
        already) or raises. Returns ``(added, total bytes now)``, or ``None`` when it does
        not fit (nothing done).

        The link happens under the counter's lock, so a rebase (which reads the counter
        before its scan) sees each blob in its scan or in the counter's change, never in
        neither; counting first means a crash can only leave the total too high."""
        with self._locked():
            counted, boot = self._load()
            if limit is not None and counted.bytes + nbytes > limit:
                return None
            self._save(counted.bytes + nbytes, counted.blobs + 1, counted.scanned_at, boot)
            added = False
            try:
                added = link()
            finally:
                if not added:
                    self._save(counted.bytes, counted.blobs, counted.scanned_at, boot)
            return added, counted.bytes + (nbytes if added else 0)

    def rebase(self, nbytes: int, nblobs: int, since: Counted) -> Counted:
        """Set the total from a scan started when the counter read ``since``; updates made
        during the scan are kept (a fill the scan also saw is counted twice: too high,
        which is the safe side, until the next rebase)."""
        with self._locked():
            now = self._load()[0]
            delta_bytes, delta_blobs = now.bytes - since.bytes, now.blobs - since.blobs
            self._save(nbytes + delta_bytes, nblobs + delta_blobs, time.time(), _boot_id())
            return self._load()[0]
