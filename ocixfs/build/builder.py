"""Build an OCIX image: a source's file tree → one manifest file + content blobs in a store.

``build_image(source, store=, output=, options=)`` reads the source (see
``ocixfs.build.inputs``), applies its layers (``ocixfs.build.layers``), stores every regular file's
content in the local blob store (``ocixfs.store.writer``) and writes the manifest atomically.

Content flows through ``ContentPipeline``: the reading thread (tar decompression and
parsing, or the directory walk) hands bounded pieces to a thread pool, which hashes them
with BLAKE3, compresses them when asked and writes new blobs. At most ``IN_FLIGHT_BYTES``
of content wait in memory; no layer and no large file is ever held whole. In version 1,
a file larger than ``chunk_size`` is stored as fixed-size chunk blobs (its whole-file hash
stays in the entry); version 0 stores each file as one blob and drops xattrs.

Nothing appears at ``output`` unless the build succeeded, and only once every blob it
names is durable in the store. Blobs written by a failed build stay: they are named by
their content, so they are correct and the next build reuses them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import blake3

from ocixfs.build.inputs import DEFAULT_PLATFORM, DirSource, LayeredSource, open_layer, parse_source
from ocixfs.build.layers import (
    BuildTree,
    ContentSink,
    FileContent,
    PendingContent,
    PendingFile,
    apply_tar_layer,
    open_pending,
    read_rootfs_dir,
)
from ocixfs.errors import BuildError, UsageError
from ocixfs.image.format import (
    LATEST_VERSION,
    SUPPORTED_VERSIONS,
    Chunk,
    Kind,
    Manifest,
    encode,
    manifest_digest,
)
from ocixfs.progress import Progress
from ocixfs.safefs import write_atomically
from ocixfs.store.writer import DEFAULT_ZSTD_LEVEL, BlobStore

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_OPTIONS",
    "BuildOptions",
    "BuildSummary",
    "ContentPipeline",
    "build_image",
]

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 1 << 20
MIN_CHUNK_SIZE = 4 << 10
MAX_CHUNK_SIZE = 1 << 30
IN_FLIGHT_BYTES = 64 << 20
COMPRESSIONS = ("zstd",)
BATCH_FILES = 64
BATCH_BYTES = 1 << 20
# Per queued file, beyond its bytes: keeps a walk of a million tiny files bounded too.
_JOB_OVERHEAD = 4096
_DATA, _PATHS = "data", "paths"


def _default_threads() -> int:
    # More threads than cores: blob writes and source reads wait on the disk, not the CPU.
    return min(32, 2 * (os.cpu_count() or 2))


@dataclass(frozen=True, slots=True, kw_only=True)
class BuildOptions:
    """How to build; the defaults are what ``ocixfs build`` uses."""

    format_version: int = LATEST_VERSION
    chunk_size: int = DEFAULT_CHUNK_SIZE
    compress: str | None = None
    zstd_level: int = DEFAULT_ZSTD_LEVEL
    threads: int | None = None
    """Worker threads for hashing, compression and blob writes (``None``: 2 × cores)."""
    platform: str = DEFAULT_PLATFORM
    progress: bool = True
    """Draw a progress bar on stderr (only ever when stderr is a terminal)."""

    def check(self) -> None:
        """Raise ``UsageError`` for options that cannot work."""
        if self.format_version not in SUPPORTED_VERSIONS:
            known = " or ".join(map(str, SUPPORTED_VERSIONS))
            raise UsageError(f"unsupported format version {self.format_version} ({known})")
        if not MIN_CHUNK_SIZE <= self.chunk_size <= MAX_CHUNK_SIZE:
            raise UsageError(f"chunk size must be between {MIN_CHUNK_SIZE} and "
                             f"{MAX_CHUNK_SIZE} bytes, not {self.chunk_size}")
        if self.compress is not None and self.compress not in COMPRESSIONS:
            raise UsageError(f"unsupported compression {self.compress!r} (zstd)")
        if not 1 <= self.zstd_level <= 22:
            raise UsageError(f"zstd level must be 1..22, not {self.zstd_level}")
        if self.threads is not None and self.threads < 1:
            raise UsageError("threads must be at least 1")


DEFAULT_OPTIONS = BuildOptions()


@dataclass(frozen=True, slots=True, kw_only=True)
class BuildSummary:
    """What a build produced. Blob counts are of distinct blobs."""

    output: Path
    digest: str
    """The manifest's identity, ``b3:<hex>``."""
    format_version: int
    entries: int
    regular_files: int
    """Regular files, each hard-link group once."""
    content_bytes: int
    new_blobs: int
    new_blob_bytes: int
    existing_blobs: int
    existing_blob_bytes: int
    compressed_bytes: int
    """Bytes of ``.zst`` blobs written (0 without compression)."""
    seconds: float

    def to_json(self) -> dict[str, Any]:
        fields = asdict(self)
        fields["output"] = str(self.output)
        return fields


def build_image(source: str, *, store: Path, output: Path,
                options: BuildOptions = DEFAULT_OPTIONS) -> BuildSummary:
    """Build ``source`` into the manifest ``output`` and blobs in the store at ``store``."""
    options.check()
    started = time.monotonic()
    _check_output(output)
    parsed = parse_source(source, platform=options.platform)
    blobs = BlobStore(store, compress=options.compress == "zstd", zstd_level=options.zstd_level)
    tree = BuildTree()
    with Progress("building", enabled=None if options.progress else False) as progress, \
            ContentPipeline(blobs, options=options, progress=progress) as pipeline:
        _fill_tree(tree, parsed, pipeline, progress)
        pipeline.wait()
    entries, dropped = tree.to_entries(version=options.format_version)
    if dropped:
        log.warning("format version 0 has no xattrs: dropped those of %d entries", dropped)
    data = encode(Manifest(options.format_version, entries))
    blobs.finish()
    _write_output(output, data)
    regular = [e for e in entries.values() if e.kind is Kind.REGULAR]
    stats = blobs.stats()
    return BuildSummary(
        output=output,
        digest=manifest_digest(data),
        format_version=options.format_version,
        entries=len(entries),
        regular_files=len(regular),
        content_bytes=sum(e.size for e in regular),
        new_blobs=stats.new_blobs,
        new_blob_bytes=stats.new_bytes,
        existing_blobs=stats.existing_blobs,
        existing_blob_bytes=stats.existing_bytes,
        compressed_bytes=stats.compressed_bytes,
        seconds=time.monotonic() - started,
    )


def _fill_tree(tree: BuildTree, source: LayeredSource | DirSource, pipeline: ContentPipeline,
               progress: Progress) -> None:
    if isinstance(source, DirSource):
        total = 0
        for item in read_rootfs_dir(tree, source.path):
            item.node.content = pipeline.from_file(item)
            total += item.size
        progress.set_total(total)
        return
    for layer in source.layers:
        progress.set_detail(layer.name)
        with open_layer(layer) as stream:
            apply_tar_layer(tree, stream, pipeline, name=layer.name)


def _check_output(output: Path) -> None:
    """Fail before the work, not after it, when the manifest could not be written."""
    parent = output.parent
    if not parent.is_dir():
        raise BuildError(f"cannot write {output}: {parent} is not a directory")
    if output.is_dir():
        raise BuildError(f"cannot write {output}: it is a directory")


def _write_output(output: Path, data: bytes) -> None:
    try:
        write_atomically(output, data)
    except OSError as exc:
        raise BuildError(f"cannot write {output}: {exc.strerror}") from exc


# -- the content pipeline -----------------------------------------------------------------


class ContentPipeline(ContentSink):
    """Hashes and stores file contents on a thread pool, with bounded memory.

    ``from_stream``/``from_file`` return at once with a ``PendingContent``; ``wait()``
    blocks until every job is done and raises the first error any job had. A job's error
    is also raised by the next ``from_*`` call, so a failing build stops early.
    """

    def __init__(self, store: BlobStore, *, options: BuildOptions,
                 progress: Progress | None = None) -> None:
        self.store = store
        self.chunk_size = options.chunk_size
        self.chunked = options.format_version >= 1
        self.progress = progress
        threads = options.threads or _default_threads()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="ocixfs-build")
        self._budget = _Budget(max(IN_FLIGHT_BYTES, 2 * (self.chunk_size + _JOB_OVERHEAD)))
        self._error: BaseException | None = None
        self._error_lock = threading.Lock()
        self._batches = {_DATA: _Batch(), _PATHS: _Batch()}

    # ContentSink

    def from_stream(self, stream: IO[bytes], size: int) -> PendingContent:
        self._raise_error()
        if size == 0:
            return _EMPTY
        if size <= self.chunk_size:
            return self._batched(_DATA, _read_exactly(stream, size), size)
        if not self.chunked:
            return _Done(self._stream_to_writer(stream, size))
        whole = blake3.blake3()
        chunks = []
        remaining = size
        while remaining:
            data = _read_exactly(stream, min(self.chunk_size, remaining))
            whole.update(data)
            chunks.append(self._submit(len(data) + _JOB_OVERHEAD, self._store_chunk, data))
            remaining -= len(data)
        return _Chunked(size, whole.digest(), chunks)

    def from_file(self, file: PendingFile) -> PendingContent:
        """Content of the file the walk found; ``file.size`` (from ``lstat``) only sizes
        the job."""
        self._raise_error()
        if file.size == 0:
            return _EMPTY
        if file.size <= self.chunk_size:
            return self._batched(_PATHS, file, file.size)
        return self._submit(self.chunk_size, self._store_file, file)

    def wait(self) -> None:
        for kind in (_DATA, _PATHS):
            self._flush(kind)
        self._pool.shutdown(wait=True)
        self._raise_error()

    # batches: small files go to the pool a few dozen at a time, as one job each batch,
    # because a job per small file spent more time in the pool than in the work.

    def _batched(self, kind: str, arg: Any, cost: int) -> PendingContent:
        batch = self._batches[kind]
        item = _InBatch(batch, len(batch.args))
        batch.args.append(arg)
        batch.cost += cost + _JOB_OVERHEAD
        if len(batch.args) >= BATCH_FILES or batch.cost >= BATCH_BYTES:
            self._flush(kind)
        return item

    def _flush(self, kind: str) -> None:
        batch = self._batches[kind]
        if batch.args:
            self._batches[kind] = _Batch()
            job = self._store_whole if kind == _DATA else self._store_file
            batch.future = self._submit(batch.cost, _each(job), batch.args)

    # jobs (worker threads)

    def _store_whole(self, data: bytes) -> FileContent:
        self._advance(len(data))
        if not data:
            return FileContent(0, None)
        chunk = self.store.put(data)
        return FileContent(chunk.size, chunk.digest)

    def _store_chunk(self, data: bytes) -> Chunk:
        chunk = self.store.put(data)
        self._advance(len(data))
        return chunk

    def _store_file(self, file: PendingFile) -> FileContent:
        fd = open_pending(file)
        try:
            # Read what fstat says is there, in exact-size pieces: a 1 MiB read buffer
            # per small file costs an mmap/munmap pair and dominated small-file builds.
            size = os.fstat(fd).st_size
            if size <= self.chunk_size:
                return self._store_whole(_read_fd(fd, size))
            pieces = _pieces(fd, size, self.chunk_size)
            if not self.chunked:
                return self._copy_to_writer(pieces)
            return self._store_chunks(pieces)
        except OSError as exc:
            raise BuildError(f"{file.path}: {exc.strerror}") from exc
        finally:
            os.close(fd)

    def _store_chunks(self, pieces: Iterator[bytes]) -> FileContent:
        whole = blake3.blake3()
        chunks = []
        for data in pieces:
            whole.update(data)
            chunks.append(self._store_chunk(data))
        if len(chunks) <= 1:  # the file shrank while we read it
            return FileContent(chunks[0].size, chunks[0].digest) if chunks else FileContent(0, None)
        return FileContent(sum(c.size for c in chunks), whole.digest(), tuple(chunks))

    def _copy_to_writer(self, pieces: Iterator[bytes]) -> FileContent:
        with self.store.writer() as writer:
            for data in pieces:
                writer.write(data)
                self._advance(len(data))
            chunk = writer.commit()
        return FileContent(chunk.size, chunk.digest if chunk.size else None)

    def _stream_to_writer(self, stream: IO[bytes], size: int) -> FileContent:
        # Version 0 keeps a large file as one blob: stream it through a temporary file.
        with self.store.writer() as writer:
            remaining = size
            while remaining:
                data = _read_exactly(stream, min(self.chunk_size, remaining))
                writer.write(data)
                self._advance(len(data))
                remaining -= len(data)
            chunk = writer.commit()
        return FileContent(chunk.size, chunk.digest)

    # plumbing

    def _submit(self, cost: int, job: Callable[[Any], Any], arg: Any) -> Future[Any]:
        self._budget.acquire(cost)
        try:
            return self._pool.submit(self._run, cost, job, arg)
        except BaseException:
            self._budget.release(cost)
            raise

    def _run(self, cost: int, job: Callable[[Any], Any], arg: Any) -> Any:
        try:
            return job(arg)
        except BaseException as exc:
            with self._error_lock:
                if self._error is None:
                    self._error = exc
            raise
        finally:
            self._budget.release(cost)

    def _raise_error(self) -> None:
        with self._error_lock:
            error = self._error
        if error is not None:
            raise error

    def _advance(self, n: int) -> None:
        if self.progress is not None:
            self.progress.advance(n)

    def __enter__(self) -> ContentPipeline:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._pool.shutdown(wait=True, cancel_futures=exc is not None)


@dataclass(slots=True)
class _Batch:
    args: list[Any] = field(default_factory=list)
    cost: int = 0
    future: Future[list[FileContent]] | None = None


@dataclass(frozen=True, slots=True)
class _InBatch:
    batch: _Batch
    index: int

    def result(self) -> FileContent:
        future = self.batch.future
        assert future is not None, "result() before the pipeline's wait()"
        return future.result()[self.index]


def _each(job: Callable[[Any], FileContent]) -> Callable[[list[Any]], list[FileContent]]:
    return lambda args: [job(arg) for arg in args]


@dataclass(frozen=True, slots=True)
class _Done:
    content: FileContent

    def result(self) -> FileContent:
        return self.content


@dataclass(frozen=True, slots=True)
class _Chunked:
    size: int
    digest: bytes
    chunks: list[Future[Chunk]]

    def result(self) -> FileContent:
        return FileContent(self.size, self.digest, tuple(f.result() for f in self.chunks))


_EMPTY = _Done(FileContent(0, None))


class _Budget:
    """A byte budget: ``acquire`` blocks while too much is in flight (one job always fits)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._used = 0
        self._changed = threading.Condition()

    def acquire(self, n: int) -> None:
        with self._changed:
            while self._used and self._used + n > self._limit:
                self._changed.wait()
            self._used += n

    def release(self, n: int) -> None:
        with self._changed:
            self._used -= n
            self._changed.notify_all()


def _read_exactly(stream: IO[bytes], size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise BuildError(f"unexpected end of data ({len(data)} of {size} bytes)")
    return data


def _pieces(fd: int, size: int, piece_size: int) -> Iterator[bytes]:
    """The first ``size`` bytes of ``fd`` in pieces of ``piece_size`` (fewer at EOF)."""
    while size > 0:
        data = _read_fd(fd, min(size, piece_size))
        if not data:
            return
        yield data
        size -= len(data)


def _read_fd(fd: int, size: int) -> bytes:
    """Up to ``size`` bytes; fewer only at end of file (reads may return short)."""
    data = os.read(fd, size)
    if len(data) in (0, size):
        return data
    parts = [data]
    size -= len(data)
    while size and (data := os.read(fd, size)):
        parts.append(data)
        size -= len(data)
    return b"".join(parts)
