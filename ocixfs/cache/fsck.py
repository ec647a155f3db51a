"""``ocixfs cache fsck``: re-hash every blob, remove damaged ones and strays."""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ocixfs.cache.directory import CacheDirectory
from ocixfs.cache.layout import BlobFile, cache_errors, hash_file, scan_blobs
from ocixfs.errors import CacheError

__all__ = ["CheckReport", "check"]

log = logging.getLogger(__name__)



@dataclass(frozen=True, slots=True, kw_only=True)
class CheckReport:
    """``check`` results: blobs hashed, bad ones (wrong content, or unreadable), strays
    (files that are not blobs), how many of those were removed, and stale fills removed."""

    blobs: int
    bytes: int
    bad: tuple[str, ...]
    strays: tuple[str, ...]
    removed: int
    tmp_removed: int
    seconds: float


def _verify(blob: BlobFile, progress: Callable[[int], None] | None) -> bool:
    """Whether the file still holds the content its name promises (gone counts as good)."""
    try:
        fd = os.open(blob.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        if os.fstat(fd).st_ino != blob.ino:
            return True  # replaced since the scan: a fresh, verified fill
        return hash_file(fd, progress) == bytes.fromhex(blob.name)
    except OSError:
        return False
    finally:
        os.close(fd)


def check(
    directory: CacheDirectory,
    *,
    threads: int = 4,
    progress: Callable[[int], None] | None = None,
    remove: bool = True,
) -> CheckReport:
    """Re-hash every blob (``threads`` at a time; ``progress(n)`` is called from those
    threads with bytes hashed) and, if ``remove``, delete bad blobs and strays (even
    pinned ones: a daemon holding one keeps its descriptor), clean stale fills, and rebase
    the usage counter. Raises ``CacheError``."""
    started = time.monotonic()
    with cache_errors("scanning"):
        scan = scan_blobs(directory.blobs)
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="ocixfs-fsck") as pool:
        verdicts = list(pool.map(lambda blob: _verify(blob, progress), scan.blobs))
    bad = [blob for blob, good in zip(scan.blobs, verdicts, strict=True) if not good]
    removed = tmp_removed = 0
    if remove:
        with directory.exclusive(wait=60.0) as locked:
            if not locked:
                raise CacheError(f"cache {directory.root}: another process is evicting")
            with cache_errors("removing bad blobs"):
                removed = _remove_bad(directory, bad) + _remove_strays(scan.strays)
                directory._evict_locked(None)  # rebase the counter
        tmp_removed = directory.remove_stale_tmp()
    return CheckReport(
        blobs=len(scan.blobs),
        bytes=scan.bytes,
        bad=tuple(blob.name for blob in bad),
        strays=tuple(scan.strays),
        removed=removed,
        tmp_removed=tmp_removed,
        seconds=time.monotonic() - started,
    )


def _remove_bad(directory: CacheDirectory, bad: list[BlobFile]) -> int:
    removed = 0
    for blob in bad:
        try:
            if os.lstat(blob.path).st_ino != blob.ino:
                continue  # replaced by a new fill since it was hashed
            os.unlink(blob.path)
        except FileNotFoundError:
            continue
        log.warning("cache: removed damaged blob %s", blob.name)
        directory.usage.add(-blob.size, -1)
        removed += 1
    return removed


def _remove_strays(strays: list[str]) -> int:
    removed = 0
    for path in strays:
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        except FileNotFoundError:
            continue
        log.warning("cache: removed stray %s", path)
        removed += 1
    return removed
