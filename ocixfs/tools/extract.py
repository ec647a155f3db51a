"""Extracting an image: its whole tree written into a plain directory, as ``umoci unpack``
or ``tar -x --same-owner --xattrs`` would leave it.

``extract_image(image, dest, stores=, cache_dir=, options=)`` runs one ``trio.run``:

1. The directory skeleton first (every directory, mode 0700 for now), then symlinks,
   fifos and device nodes with their final metadata. No network needed.
2. Every distinct blob not yet in the host's shared cache goes there through the reader,
   ``jobs`` at a time, at prefetch priority (the fetcher's background slots are sized to
   ``jobs``, so waits have no deadline but each fetch still has the fetcher's own).
3. As soon as all blobs of a regular file are cached, a worker thread (``writers`` of
   them; a run of ready files goes in one thread hop) copies them from the cache files
   into a temporary name (``copy_file_range``, which reflinks where the file system can,
   else plain reads and writes), then sets owner, mode (after the owner: ``chown`` clears
   setuid), xattrs (after both: ``chown`` and writes drop ``security.capability``) and
   times, renames it to its real name and adds its other hardlink names. A file under its
   real name is therefore always complete.
4. Directories get their owner, mode, xattrs and times last, deepest first, so creating
   their children does not bump them.

Owners are set only as root (``ExtractOptions.same_owner``), and skipped where even root
may not set them (``EPERM``, or ``EINVAL`` for ids a user namespace does not map); device
nodes need ``CAP_MKNOD`` and are skipped otherwise; an xattr the destination refuses
(``ENOTSUP``, ``EPERM``: user xattrs on symlinks, ``security.*`` without privilege) is
skipped. Each skip is counted in the summary and logged once per kind.

Failure: the first error stops everything and is raised as one ``OcixError`` line
(``FetchError`` family, ``CacheError``, or ``ExtractError`` for the destination); the
temporary files are removed and ``dest`` is left incomplete (the message says so). The
destination must be absent or an empty directory, on a path only the caller and root can
change (``check_destination``): everything below it is then created by this process
and nobody else can swap a component for a symlink while it works. ``OSError`` about the
destination becomes ``ExtractError`` here and nowhere else.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import shutil
import stat
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio

from ocixfs.cache.blobs import Cache
from ocixfs.cache.layout import open_blob
from ocixfs.config import FetchConfig, ReaderConfig
from ocixfs.errors import CacheError, OcixError, UsageError
from ocixfs.fetch.fetcher import Priority
from ocixfs.fetch.reader import Reader, open_reader
from ocixfs.image.format import Chunk, Kind
from ocixfs.image.loading import LoadedImage
from ocixfs.image.tree import Node, Tree
from ocixfs.progress import Progress
from ocixfs.safefs import trusted_directory, trusted_path
from ocixfs.store.spec import StoreSpec
from ocixfs.tools.compare import iter_paths

__all__ = [
    "DEFAULT_EXTRACT_OPTIONS",
    "DEFAULT_JOBS",
    "ExtractError",
    "ExtractOptions",
    "ExtractSummary",
    "check_destination",
    "extract_image",
]

log = logging.getLogger(__name__)

DEFAULT_JOBS = 16
COPY_PIECE = 1 << 20
BATCH_FILES = 64
BATCH_BYTES = 8 << 20
_GONE_RETRIES = 3
_STAGE_PREFIX = ".ocixfs-extract-"
_SKIPPABLE_XATTR_ERRNOS = frozenset({errno.ENOTSUP, errno.EPERM, errno.EACCES})
_SKIPPABLE_CHOWN_ERRNOS = frozenset({errno.EPERM, errno.EINVAL})
_FALLBACK_COPY_ERRNOS = frozenset({errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})
_DEVICE_TYPES = {Kind.CHARACTER: stat.S_IFCHR, Kind.BLOCK: stat.S_IFBLK}
_SET_ID_BITS = stat.S_ISUID | stat.S_ISGID


class ExtractError(OcixError):
    """The destination directory could not be written."""


def _default_writers() -> int:
    return max(2, min(8, 2 * (os.cpu_count() or 1)))


@dataclass(frozen=True, slots=True, kw_only=True)
class ExtractOptions:
    """How to extract; the defaults are what ``ocixfs extract`` uses.

    - ``jobs``: blobs fetched at once.
    - ``writers``: files copied out of the cache at once (worker threads).
    - ``same_owner``: set owners from the image; ``None`` means "when running as root".
    - ``devices``: create the image's device nodes (root only); off, they are skipped and
      counted.
    - ``setuid``: keep setuid and setgid bits; off, they are cleared (and counted).
    - ``progress``: draw a progress bar on stderr (only ever on a terminal).
    """

    jobs: int = DEFAULT_JOBS
    writers: int = field(default_factory=_default_writers)
    same_owner: bool | None = None
    devices: bool = True
    setuid: bool = True
    progress: bool = True

    def check(self) -> None:
        if self.jobs < 1:
            raise UsageError("--jobs must be at least 1")
        if self.writers < 1:
            raise UsageError("writers must be at least 1")


DEFAULT_EXTRACT_OPTIONS = ExtractOptions()


@dataclass(frozen=True, slots=True, kw_only=True)
class ExtractSummary:
    """What an extraction wrote and where its content came from (blobs are distinct)."""

    dest: Path
    image_digest: str
    entries: int
    """Names written, the root included."""
    directories: int
    files: int
    """Regular files, each hardlink group once."""
    hardlinks: int
    """Extra names of regular files."""
    symlinks: int
    devices: int
    fifos: int
    bytes: int
    """Content bytes written (hardlinked files once)."""
    blobs: int
    blob_bytes: int
    fetched_blobs: int
    fetched_bytes: int
    received_bytes: int
    """Bytes that came over the wire for the fetched blobs (compressed, retries included)."""
    cached_blobs: int
    cached_bytes: int
    """Blobs that were already in the cache."""
    skipped: dict[str, int]
    """What could not be applied here, by kind (``devices``, ``owners``, ``xattrs``)."""
    seconds: float

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["dest"] = os.fspath(self.dest)
        data["seconds"] = round(self.seconds, 3)
        return data


def check_destination(dest: Path) -> Path:
    """``dest`` with its symlinks resolved; raises ``UsageError`` unless it is absent or
    an empty directory, and ``UnsafePathError`` unless it is a ``trusted_path``: owned
    by the caller or root, as is every directory on the way, none of them writable by
    others unless sticky. Otherwise another user could swap the directories extract
    creates for symlinks while it runs and have it write, chmod and chown elsewhere."""
    resolved = trusted_path(dest, what="extract destination")
    try:
        with os.scandir(resolved) as entries:
            if next(entries, None) is not None:
                raise UsageError(f"{dest}: not empty (extract needs an empty or new directory)")
    except FileNotFoundError:
        pass
    except NotADirectoryError:
        raise UsageError(f"{dest}: not a directory") from None
    except OSError as exc:
        raise UsageError(f"{dest}: {exc.strerror}") from None
    return resolved


def extract_image(
    image: LoadedImage,
    dest: Path,
    *,
    stores: Sequence[StoreSpec],
    cache_dir: Path,
    options: ExtractOptions = DEFAULT_EXTRACT_OPTIONS,
) -> ExtractSummary:
    """Write ``image``'s tree into ``dest`` (absent or empty), fetching content from
    ``stores`` through the cache at ``cache_dir``. Raises ``OcixError`` subclasses."""
    options.check()
    check_destination(dest)
    tree = Tree.from_manifest(image.manifest)
    started = time.monotonic()
    with _destination_errors(f"creating {dest}"):
        resolved = trusted_directory(dest, what="extract destination", mode=0o700)
    same_owner = os.geteuid() == 0 if options.same_owner is None else options.same_owner
    plan = _Plan(tree, resolved, same_owner=same_owner, devices=options.devices,
                 setuid=options.setuid)
    total = tree.totals.bytes
    with Progress("extracting", total=total, enabled=None if options.progress else False) as bar:
        extraction = _Extraction(plan, bar, options)
        try:
            statistics = trio.run(extraction.run, stores, cache_dir)
        except UsageError:
            raise
        except OcixError as exc:
            raise type(exc)(f"{exc} ({dest} is incomplete)") from exc
        finally:
            shutil.rmtree(plan.stage, ignore_errors=True)
    totals = tree.totals
    fetched_blobs, fetched_bytes, received = statistics
    return ExtractSummary(
        dest=dest,
        image_digest=image.digest,
        entries=tree.entry_count,
        directories=totals.directories,
        files=totals.files,
        hardlinks=sum(len(names) for _, names in plan.files),
        symlinks=plan.kinds[Kind.SYMLINK],
        devices=plan.kinds[Kind.CHARACTER] + plan.kinds[Kind.BLOCK],
        fifos=plan.kinds[Kind.FIFO],
        bytes=total,
        blobs=totals.blobs,
        blob_bytes=totals.blob_bytes,
        fetched_blobs=fetched_blobs,
        fetched_bytes=fetched_bytes,
        received_bytes=received,
        cached_blobs=totals.blobs - fetched_blobs,
        cached_bytes=totals.blob_bytes - fetched_bytes,
        skipped=dict(plan.skipped),
        seconds=time.monotonic() - started,
    )


@contextlib.contextmanager
def _destination_errors(what: str) -> Iterator[None]:
    """The module's one translation boundary: OSError about the destination → ExtractError."""
    try:
        yield
    except OSError as exc:
        raise ExtractError(f"{what}: {exc.strerror or exc}") from exc


class _BlobGone(Exception):
    """A blob left the cache (evicted by another process) between fetch and copy."""

    def __init__(self, chunk: Chunk) -> None:
        super().__init__(chunk.hex)
        self.chunk = chunk
        self.done = 0
        """How many files of a batch were written before this one."""


_File = tuple[Node, list[str]]
"""A regular file's node and its other (hardlink) names."""


class _Plan:
    """The filesystem side: where each node goes and the blocking calls that put it there.

    Every method runs in a worker thread (or before trio starts)."""

    def __init__(self, tree: Tree, dest: Path, *, same_owner: bool, devices: bool = True,
                 setuid: bool = True) -> None:
        self.tree = tree
        self.dest = dest
        self.same_owner = same_owner
        self.devices = devices
        self.setuid = setuid
        self.stage = dest / self._stage_name(tree)
        self.files: list[_File] = []
        self.directories: list[Node] = []
        self.specials: list[Node] = []
        self.kinds: Counter[Kind] = Counter()
        self.skipped: Counter[str] = Counter()
        self._skip_lock = threading.Lock()
        self._sort(tree)

    def _sort(self, tree: Tree) -> None:
        extra_names: dict[int, list[str]] = {}
        for path, node in iter_paths(tree):
            self.kinds[node.kind] += 1
            if node.kind is Kind.DIRECTORY:
                self.directories.append(node)
            elif node.kind is not Kind.REGULAR:
                self.specials.append(node)
            elif path != node.path:
                extra_names.setdefault(node.ino, []).append(path)
        self.files = [(node, extra_names.get(node.ino, [])) for node in tree.iter_files()]

    @staticmethod
    def _stage_name(tree: Tree) -> str:
        """A fresh name for the temporary directory, not one the image uses."""
        while True:
            name = f"{_STAGE_PREFIX}{secrets.token_hex(6)}"
            if name not in (tree.root.children or {}):
                return name

    def where(self, path: str) -> str:
        return os.path.join(self.dest, path[1:])

    # ---- phase 1: skeleton ---------------------------------------------------------------

    def create_skeleton(self) -> None:
        with _destination_errors(f"creating {self.stage}"):
            self.stage.mkdir(mode=0o700)
        for node in self.directories:
            if node.path != "/":
                with _destination_errors(f"creating {self.where(node.path)}"):
                    os.mkdir(self.where(node.path), 0o700)
        for node in self.specials:
            self._create_special(node)

    def _create_special(self, node: Node) -> None:
        path = self.where(node.path)
        with _destination_errors(f"creating {path}"):
            if node.kind is Kind.SYMLINK:
                os.symlink(node.link_target, path)
            elif node.kind is Kind.FIFO:
                os.mkfifo(path, 0o600)
            elif not self._make_device(node, path):
                return
            self._apply_metadata(node, path)

    def _make_device(self, node: Node, path: str) -> bool:
        if not self.devices:
            self._skip("devices", "device nodes are not created (--no-devices)")
            return False
        try:
            os.mknod(path, 0o600 | _DEVICE_TYPES[node.kind], node.rdev)
        except PermissionError:
            self._skip("devices", f"{path}: cannot create a device node here (needs root)")
            return False
        return True

    # ---- phase 2: regular files ----------------------------------------------------------

    def write_files(self, batch: Sequence[_File], cache: Cache, progress: Progress) -> None:
        """``write_file`` each in order; a ``_BlobGone`` says how many were done."""
        for done, (node, links) in enumerate(batch):
            try:
                self.write_file(node, links, cache, progress)
            except _BlobGone as gone:
                gone.done = done
                raise

    def write_file(self, node: Node, links: Sequence[str], cache: Cache,
                   progress: Progress) -> None:
        """Copy the file's blobs out of the cache under a temporary name, set its metadata,
        move it into place and add its other names. Raises ``_BlobGone``."""
        final = self.where(node.path)
        temp = os.path.join(self.stage, str(node.ino))
        with _destination_errors(f"writing {final}"):
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                for chunk in node.blobs:
                    _copy_blob(cache.path_of(chunk), chunk, fd, progress)
                self._apply_metadata(node, fd)
            except _BlobGone:
                os.unlink(temp)
                raise
            finally:
                os.close(fd)
            os.rename(temp, final)
        for link in links:
            with _destination_errors(f"linking {self.where(link)}"):
                os.link(final, self.where(link))

    # ---- phase 3: directories ------------------------------------------------------------

    def finish_directories(self) -> None:
        with _destination_errors(f"removing {self.stage}"):
            self.stage.rmdir()
        deepest_first = sorted(self.directories, key=lambda n: n.path.count("/"), reverse=True)
        for node in deepest_first:
            path = os.fspath(self.dest) if node.path == "/" else self.where(node.path)
            with _destination_errors(f"setting metadata of {path}"):
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    self._apply_metadata(node, fd)
                finally:
                    os.close(fd)

    # ---- metadata --------------------------------------------------------------------------

    def _apply_metadata(self, node: Node, target: str | int) -> None:
        """Owner, then mode (chown clears setuid), then xattrs (chown clears file
        capabilities), then times. ``target`` is a path (never followed) or an open fd."""
        follow = isinstance(target, int)  # an fd must not be combined with "don't follow"
        if self.same_owner:
            self._set_owner(node, target, follow)
        elif (node.uid, node.gid) != (os.geteuid(), os.getegid()):
            self._skip("owners", "owners are not set (not running as root)")
        if node.kind is not Kind.SYMLINK:
            mode = node.mode & 0o7777
            if not self.setuid and mode & _SET_ID_BITS:
                self._skip("setuid", "setuid and setgid bits are cleared (--no-setuid)")
                mode &= ~_SET_ID_BITS
            os.chmod(target, mode)
        for name, value in node.xattrs.items():
            self._set_xattr(node, target, name, value, follow)
        os.utime(target, ns=(node.atime_ns, node.mtime_ns), follow_symlinks=follow)

    def _set_owner(self, node: Node, target: str | int, follow: bool) -> None:
        try:
            os.chown(target, node.uid, node.gid, follow_symlinks=follow)
        except OSError as exc:  # EINVAL: an id unmapped in this user namespace
            if exc.errno not in _SKIPPABLE_CHOWN_ERRNOS:
                raise
            self._skip("owners", f"{node.path}: owner {node.uid}:{node.gid} not set: "
                       f"{exc.strerror}")

    def _set_xattr(self, node: Node, target: str | int, name: str, value: bytes,
                   follow: bool) -> None:
        try:
            os.setxattr(target, name, value, follow_symlinks=follow)
        except OSError as exc:
            if exc.errno not in _SKIPPABLE_XATTR_ERRNOS:
                raise
            self._skip("xattrs", f"{node.path}: xattr {name} not set: {exc.strerror}")

    def _skip(self, kind: str, message: str) -> None:
        """Count a skipped step; warn on the first of each kind. Writer threads call this."""
        with self._skip_lock:
            first = not self.skipped[kind]
            self.skipped[kind] += 1
        if first:
            log.warning("%s (further %s skipped silently)", message, kind)


def _copy_blob(source: Path, chunk: Chunk, fd: int, progress: Progress) -> None:
    """Append the cached blob at ``source`` to ``fd``."""
    try:
        src = open_blob(source)
    except FileNotFoundError:
        raise _BlobGone(chunk) from None
    except OSError as exc:
        raise CacheError(f"cache: reading blob {chunk.hex}: {exc.strerror}") from exc
    try:
        if os.fstat(src).st_size != chunk.size:
            raise CacheError(f"cache: blob {chunk.hex} has the wrong size")
        remaining = chunk.size
        while remaining:
            try:
                copied = os.copy_file_range(src, fd, remaining)
            except OSError as exc:
                if exc.errno not in _FALLBACK_COPY_ERRNOS:
                    raise
                _copy_plainly(src, fd, remaining, chunk, progress)
                return
            if copied == 0:
                raise CacheError(f"cache: blob {chunk.hex} ended early")
            remaining -= copied
            progress.advance(copied)
    finally:
        os.close(src)


def _copy_plainly(src: int, fd: int, remaining: int, chunk: Chunk, progress: Progress) -> None:
    while remaining:
        data = os.read(src, min(COPY_PIECE, remaining))
        if not data:
            raise CacheError(f"cache: blob {chunk.hex} ended early")
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        remaining -= len(data)
        progress.advance(len(data))


class _Extraction:
    """The trio side: fetch tasks fill the cache, writer tasks copy files out of it."""

    def __init__(self, plan: _Plan, progress: Progress, options: ExtractOptions) -> None:
        self._plan = plan
        self._progress = progress
        self._options = options
        self._ready: dict[bytes, trio.Event] = {}
        self._error: OcixError | None = None
        self._limiter = trio.CapacityLimiter(options.writers)

    async def run(self, stores: Sequence[StoreSpec], cache_dir: Path) -> tuple[int, int, int]:
        """Extract; returns (blobs fetched, bytes fetched, bytes received)."""
        config = ReaderConfig(fetch=FetchConfig(background_slots=self._options.jobs),
                              readahead=0)
        with Cache(cache_dir, config.cache) as paths:
            async with open_reader(stores, cache_dir, config) as reader:
                await trio.to_thread.run_sync(self._plan.create_skeleton)
                await self._fill(reader, paths)
                stats = reader.statistics().fetch
        if self._error is not None:
            raise self._error
        await trio.to_thread.run_sync(self._plan.finish_directories)
        received = sum(stats.bytes_received_by_source.values())
        return stats.blobs_fetched, stats.bytes_fetched, received

    async def _fill(self, reader: Reader, paths: Cache) -> None:
        chunks = self._distinct_chunks()
        missing = await trio.to_thread.run_sync(_not_cached, paths, chunks,
                                                limiter=self._limiter)
        for chunk in chunks:
            if chunk.digest not in missing:
                self._ready[chunk.digest].set()
        queue = iter([chunk for chunk in chunks if chunk.digest in missing])
        files = iter(self._plan.files)
        async with trio.open_nursery() as nursery:
            for _ in range(min(self._options.jobs, len(missing))):
                nursery.start_soon(self._guarded, nursery, partial(self._fetch_all, reader, queue))
            for _ in range(self._options.writers):
                nursery.start_soon(self._guarded, nursery,
                                   partial(self._write_all, reader, paths, files))

    def _distinct_chunks(self) -> list[Chunk]:
        ordered = []
        for node, _ in self._plan.files:
            for chunk in node.blobs:
                if chunk.digest not in self._ready:
                    self._ready[chunk.digest] = trio.Event()
                    ordered.append(chunk)
        return ordered

    async def _guarded(self, nursery: trio.Nursery, job: Callable[[], Awaitable[None]]) -> None:
        """Run ``job``; its first ``OcixError`` is kept and stops every other task."""
        try:
            await job()
        except OcixError as exc:
            if self._error is None:
                self._error = exc
            nursery.cancel_scope.cancel()

    async def _fetch_all(self, reader: Reader, chunks: Iterator[Chunk]) -> None:
        for chunk in chunks:  # shared iterator: each chunk goes to one task
            await reader.ensure(chunk, priority=Priority.PREFETCH)
            self._ready[chunk.digest].set()

    async def _write_all(self, reader: Reader, paths: Cache, files: Iterator[_File]) -> None:
        """Take files in order from the shared iterator; write each ready run of them (up to
        ``BATCH_FILES`` or ``BATCH_BYTES``) in one worker-thread hop."""
        pending: _File | None = None
        while True:
            head = pending if pending is not None else next(files, None)
            pending = None
            if head is None:
                return
            for chunk in head[0].blobs:
                await self._ready[chunk.digest].wait()
            batch, size = [head], head[0].size
            while len(batch) < BATCH_FILES and size < BATCH_BYTES:
                item = next(files, None)
                if item is None:
                    break
                if not all(self._ready[chunk.digest].is_set() for chunk in item[0].blobs):
                    pending = item
                    break
                batch.append(item)
                size += item[0].size
            await self._write(reader, paths, batch)

    async def _write(self, reader: Reader, paths: Cache, batch: list[_File]) -> None:
        for _ in range(_GONE_RETRIES):
            try:
                await trio.to_thread.run_sync(self._plan.write_files, batch, paths,
                                              self._progress, limiter=self._limiter)
                return
            except _BlobGone as gone:
                log.info("blob %s left the cache before it was copied; fetching it again",
                         gone.chunk.hex)
                await reader.ensure(gone.chunk, priority=Priority.PREFETCH)
                batch = batch[gone.done:]
        raise CacheError("cache: blobs keep disappearing before they are copied "
                         "(is the cache much smaller than the image?)")


def _not_cached(cache: Cache, chunks: Sequence[Chunk]) -> set[bytes]:
    """The digests of ``chunks`` not in the cache yet (a blocking scan: call in a thread)."""
    return {chunk.digest for chunk in chunks if not cache.contains(chunk)}
