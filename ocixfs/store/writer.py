"""The local blob store writer: content-addressed files in a store directory (``layout``).

``BlobStore(root)`` adds blobs atomically: the bytes go to a temporary file in the blob
directory, which is renamed to its final name only once complete, so a reader (an HTTP
server, another build) never sees a partial blob under a real name. A blob already present
with the right size is skipped, which is what lets ten builds of one base store the base
once. With compression on, each blob also gets a ``<hex>.zst`` sibling (one zstd frame of
the same content) and ``finish()`` records ``{"compression": ["zstd"]}`` in
``ocix-store.json``. A store that already advertises zstd keeps getting ``.zst`` siblings.

Blobs are not fsynced one by one (that would cost a journal commit per file); ``finish()``
flushes the whole store file system once, before the caller publishes a manifest that names
the blobs. A blob torn by a crash before that is caught by the size check and rewritten.

Thread safety: ``put``/``writer`` may be called from many threads at once; each digest is
claimed by exactly one caller per ``BlobStore``, so counts in ``stats()`` are of distinct
blobs. ``OSError`` becomes ``StoreError`` here and nowhere else.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import secrets
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import blake3
import zstandard

from ocixfs.errors import StoreError
from ocixfs.image.format import Chunk
from ocixfs.safefs import write_atomically
from ocixfs.store.layout import (
    BLOB_DIR,
    STORE_CONFIG,
    ZSTD_SUFFIX,
    advertises_zstd,
    read_store_config,
)

__all__ = [
    "DEFAULT_ZSTD_LEVEL",
    "BlobStore",
    "BlobWriter",
    "StoreStats",
    "store_file",
]

log = logging.getLogger(__name__)

# Level 3 compresses typical root file systems to within a few percent of level 9 at
# several times the speed (scripts/bench_build.py measures it).
DEFAULT_ZSTD_LEVEL = 3
_TMP_PREFIX = ".tmp-"
_BLOB_MODE = 0o644


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreStats:
    """Distinct blobs this ``BlobStore`` was asked to hold, split by whether they were new."""

    new_blobs: int = 0
    new_bytes: int = 0
    existing_blobs: int = 0
    existing_bytes: int = 0
    compressed_bytes: int = 0
    """Bytes of ``.zst`` siblings written by this store object."""


class BlobStore:
    """Writes blobs into the store directory ``root`` (created if missing)."""

    def __init__(self, root: Path, *, compress: bool = False,
                 zstd_level: int = DEFAULT_ZSTD_LEVEL) -> None:
        self.root = Path(root)
        self.blob_dir = self.root / BLOB_DIR
        try:
            self.blob_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create {self.blob_dir}: {exc.strerror}") from exc
        advertised = advertises_zstd(read_store_config(self.root))
        if advertised and not compress:
            log.info("%s advertises zstd: writing .zst blobs too", self.root)
        self.compress = compress or advertised
        self.zstd_level = zstd_level
        # Plain strings, not Path objects: path arithmetic was a tenth of a small-file build.
        self._dir = os.fspath(self.blob_dir)
        self._lock = threading.Lock()
        self._claimed: set[bytes] = set()
        self._counts = dict.fromkeys(
            ("new_blobs", "new_bytes", "existing_blobs", "existing_bytes", "compressed_bytes"), 0)
        self._local = threading.local()

    def stats(self) -> StoreStats:
        with self._lock:
            return StoreStats(**self._counts)

    def put(self, data: bytes | memoryview, digest: bytes | None = None) -> Chunk:
        """Store ``data`` (whose hash is ``digest`` if the caller already knows it)."""
        if digest is None:
            digest = blake3.blake3(data).digest()
        chunk = Chunk(len(data), digest)
        if not self._claim(chunk):
            return chunk
        path = f"{self._dir}/{digest.hex()}"
        try:
            exists = _has_size(path, chunk.size)
            if not exists:
                self._write_new(path, data)
            if self.compress and not _exists(path + ZSTD_SUFFIX):
                packed = self._compressor().compress(data)
                self._write_new(path + ZSTD_SUFFIX, packed)
                self._count(compressed_bytes=len(packed))
        except OSError as exc:
            raise StoreError(f"cannot write blob {path}: {exc.strerror}") from exc
        self._count_blob(chunk, new=not exists)
        return chunk

    def writer(self) -> BlobWriter:
        """A writer for one blob too large to hold in memory; see ``BlobWriter``."""
        return BlobWriter(self)

    def contains(self, digest: bytes, size: int) -> bool:
        """Whether the blob is present with the expected size (and ``.zst`` if compressing)."""
        path = f"{self._dir}/{digest.hex()}"
        return _has_size(path, size) and (not self.compress or _exists(path + ZSTD_SUFFIX))

    def finish(self) -> None:
        """Make every blob written so far durable; record compression in ``ocix-store.json``."""
        try:
            _syncfs(self._dir)
            if self.compress:
                self._write_config()
        except OSError as exc:
            raise StoreError(f"cannot finish store {self.root}: {exc.strerror}") from exc

    # -- internals -------------------------------------------------------------------------

    def _claim(self, chunk: Chunk) -> bool:
        with self._lock:
            if chunk.digest in self._claimed:
                return False
            self._claimed.add(chunk.digest)
            return True

    def _count(self, **increments: int) -> None:
        with self._lock:
            for name, n in increments.items():
                self._counts[name] += n

    def _count_blob(self, chunk: Chunk, *, new: bool) -> None:
        if new:
            self._count(new_blobs=1, new_bytes=chunk.size)
        else:
            self._count(existing_blobs=1, existing_bytes=chunk.size)

    def _compressor(self) -> zstandard.ZstdCompressor:
        # ZstdCompressor objects must not be shared between threads.
        compressor: zstandard.ZstdCompressor | None = getattr(self._local, "zstd", None)
        if compressor is None:
            compressor = zstandard.ZstdCompressor(level=self.zstd_level, write_content_size=True)
            self._local.zstd = compressor
        return compressor

    def _write_new(self, path: str, data: bytes | memoryview) -> None:
        tmp = self._temp_path()
        try:
            fd = _create_fd(tmp)
            try:
                _write_all(fd, data)
            finally:
                os.close(fd)
            os.rename(tmp, path)
        except BaseException:
            _unlink_quietly(tmp)
            raise

    def _temp_path(self) -> str:
        return f"{self._dir}/{_TMP_PREFIX}{secrets.token_hex(8)}"

    def _write_config(self) -> None:
        config = read_store_config(self.root)
        methods = list(config.get("compression", []))
        if "zstd" in methods:
            return
        config["compression"] = [*methods, "zstd"]
        write_atomically(self.root / STORE_CONFIG, json.dumps(config).encode() + b"\n",
                         mode=_BLOB_MODE)


class BlobWriter:
    """Streams one blob to a temporary file, hashing (and compressing) as it goes.

    ``write()`` the content in pieces, then ``commit()`` to name it by its hash, or let the
    context manager ``abort()`` it on error. Not thread safe: one writer, one thread.
    """

    def __init__(self, store: BlobStore) -> None:
        self._store = store
        self._hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
        self._size = 0
        self._raw_tmp = store._temp_path()
        self._zst_tmp: str | None = None
        self._raw: BinaryIO | None = None
        self._zst_file: BinaryIO | None = None
        self._packer: Any = None
        try:
            self._raw = _create(self._raw_tmp)
            if store.compress:
                self._zst_tmp = store._temp_path()
                self._zst_file = _create(self._zst_tmp)
                cctx = zstandard.ZstdCompressor(level=store.zstd_level)
                self._packer = cctx.stream_writer(self._zst_file, closefd=False)
        except OSError as exc:
            self.abort()
            raise StoreError(f"cannot write to {store.blob_dir}: {exc.strerror}") from exc

    def write(self, data: bytes | memoryview) -> None:
        self._hasher.update(data)
        self._size += len(data)
        try:
            assert self._raw is not None, "write() after commit()"
            self._raw.write(data)
            if self._packer is not None:
                self._packer.write(data)
        except OSError as exc:
            raise StoreError(f"cannot write to {self._store.blob_dir}: {exc.strerror}") from exc

    def commit(self) -> Chunk:
        """Finish the blob and move it into place (or drop it if the store has it)."""
        chunk = Chunk(self._size, self._hasher.digest())
        store = self._store
        path = f"{store._dir}/{chunk.hex}"
        try:
            self._close_files()
            claimed = store._claim(chunk)
            exists = not claimed or _has_size(path, chunk.size)
            if claimed and not exists:
                os.rename(self._raw_tmp, path)
            if claimed and self._zst_tmp is not None and not _exists(path + ZSTD_SUFFIX):
                store._count(compressed_bytes=os.stat(self._zst_tmp).st_size)
                os.rename(self._zst_tmp, path + ZSTD_SUFFIX)
        except OSError as exc:
            raise StoreError(f"cannot write blob {path}: {exc.strerror}") from exc
        finally:
            self.abort()
        if claimed:
            store._count_blob(chunk, new=not exists)
        return chunk

    def abort(self) -> None:
        """Close and remove whatever temporary files remain (idempotent)."""
        self._close_files()
        _unlink_quietly(self._raw_tmp)
        if self._zst_tmp is not None:
            _unlink_quietly(self._zst_tmp)

    def _close_files(self) -> None:
        if self._packer is not None:
            packer, self._packer = self._packer, None
            packer.close()
        if self._zst_file is not None:
            self._zst_file.close()
        if self._raw is not None:
            self._raw.close()

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.abort()


def store_file(root: Path, name: str, pieces: Iterable[bytes]) -> int:
    """Write ``pieces`` to ``root/name`` (a layout name, such as a pack part) atomically:
    into a temporary file beside it, renamed only once complete, so a server never sends a
    partial file under the real name; the directory is made if missing, and on failure
    nothing is left. Returns the bytes written. Raises ``StoreError``."""
    path = root / name
    tmp = path.parent / f"{_TMP_PREFIX}{secrets.token_hex(8)}"
    written = 0
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _create_fd(tmp)
    except OSError as exc:
        raise StoreError(f"cannot write {path}: {exc.strerror}") from exc
    try:
        try:
            for piece in pieces:
                _write_all(fd, piece)
                written += len(piece)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException as exc:
        _unlink_quietly(tmp)
        if isinstance(exc, OSError):
            raise StoreError(f"cannot write {path}: {exc.strerror}") from exc
        raise
    return written


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _exists(path: str) -> bool:
    try:
        os.stat(path)
    except FileNotFoundError:
        return False
    return True


def _has_size(path: str, size: int) -> bool:
    try:
        return os.stat(path).st_size == size
    except FileNotFoundError:
        return False


def _unlink_quietly(path: str | Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _create_fd(path: str | Path) -> int:
    """A new file open for writing; mode 0644 less the umask, as blobs are served to others."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _BLOB_MODE)


def _create(path: str | Path) -> BinaryIO:
    return open(_create_fd(path), "wb", closefd=True)


def _syncfs(directory: str) -> None:
    """Flush the file system holding ``directory`` (syncfs(2); os.sync() if unavailable)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        syncfs = getattr(libc, "syncfs", None)
        if syncfs is None:
            os.sync()
        elif syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err) if err else errno.errorcode.get(err, "error"))
    finally:
        os.close(fd)
