"""The pyfuse3 ``Operations`` of a mounted image: thin handlers over a ``Tree`` and a reader.

Everything about names, inodes and attributes comes from the immutable ``Tree``; file
content comes from the ``BlobReader`` passed in (which fetches, verifies and caches). The
class holds no business logic, only FUSE semantics:

- **Errors.** Every request handler goes through ``_request``: a ``FUSEError`` it raises on
  purpose passes through; an ``OcixError`` becomes ``EIO`` plus one rate-limited warning;
  anything else becomes ``EIO`` plus one rate-limited error line naming the exception type
  (any other exception would end ``pyfuse3.main()`` and the mount with it). ``forget`` and
  ``destroy`` never raise at all. Failures are counted by errno and by exception type.
- **Read-only.** Every modifying request, and ``open``/``access`` asking to write, fails with
  ``EROFS``.
- **Caching.** Nothing ever changes, so entries, attributes and negative lookups are cached by
  the kernel for ``FsOptions`` timeouts, and files are opened with ``keep_cache``. The inode
  number doubles as the file handle and the directory handle. Where ``kernelcache`` allows
  it, OPEN and OPENDIR answer ``ENOSYS`` once: the kernel then opens files and directories
  itself (keeping their pages and listings) and hands the inode to READ and READDIRPLUS.
- **Lookup counts.** ``lookup`` and each entry ``readdir_reply`` accepts add one, ``forget``
  subtracts. Nothing is ever deleted, so the counts only feed statistics and debugging.

Caveat: the ``EntryAttributes`` returned are cached per inode and shared between replies
(pyfuse3 copies them into each reply); callers must not modify them.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any, NoReturn, Protocol, TypeVar, cast

import pyfuse3
from pyfuse3 import (
    EntryAttributes,
    FileHandleT,
    FileInfo,
    FileNameT,
    FlagT,
    FUSEError,
    InodeT,
    ModeT,
    ReaddirToken,
    RequestContext,
    SetattrFields,
    StatvfsData,
    XAttrNameT,
)

from ocixfs.errors import OcixError
from ocixfs.image.format import Chunk, Kind
from ocixfs.image.tree import ST_BLKSIZE, Node, Tree
from ocixfs.mount import kernelcache

__all__ = [
    "DEFAULT_FS_OPTIONS",
    "AccessLog",
    "BlobReader",
    "FsOptions",
    "FsStatistics",
    "Operations",
]

log = logging.getLogger(__name__)

_STATFS_BLOCK = 4096
_NAME_MAX = 255
# Flags that would need a writable file; the kernel's ``ro`` mount refuses most of these
# already, this is the same answer when mounted without it.
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_CREAT
# Answers that are part of normal operation, not counted as errors: a missing xattr, and
# OPENDIR declined once the kernel keeps listings (see ``kernelcache``).
_NOT_ERRORS = frozenset({pyfuse3.ENOATTR, errno.ENOSYS})

_DOT_NEXT_ID = 1
_DOTDOT_NEXT_ID = 2
_FIRST_CHILD_NEXT_ID = 3  # offsets 1 and 2 belong to "." and ".." (NFS relies on that)


class BlobReader(Protocol):
    """Serves verified file content (the real one fetches and caches; see ``reader``)."""

    async def read(self, blobs: Sequence[Chunk], offset: int, size: int) -> bytes:
        """Exactly ``size`` bytes at ``offset`` of the content the blobs form, in order.

        The caller keeps ``offset + size`` within the content. May raise any ``OcixError``.
        """
        ...


class AccessLog(Protocol):
    """Told about the first read of each inode (profile recording); must be cheap."""

    def note_access(self, node_path: str, ino: int) -> None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class FsOptions:
    """How long the kernel may cache what it learned; the tree is immutable, so: long."""

    entry_timeout: float = 86400.0
    attr_timeout: float = 86400.0
    negative_timeout: float = 86400.0
    uid_shift: int = 0
    """Added to every owner the tree reports (``-o uidshift``: an unprivileged container's base)."""
    gid_shift: int = 0


DEFAULT_FS_OPTIONS = FsOptions()


@dataclass(frozen=True, slots=True, kw_only=True)
class FsStatistics:
    """A snapshot of the counters of one ``Operations``."""

    lookups: int
    negative_lookups: int
    opens: int
    """OPEN requests; once the kernel opens files itself (``kernelcache``), just the first."""
    files_read: int
    """Distinct files read through this mount."""
    reads: int
    read_bytes: int
    xattr_misses: int
    """``getxattr`` of a name the inode lacks (``ls -l`` asks for ACLs on every file)."""
    listings: int
    """READDIR requests: the kernel asks again only for listings it has not cached."""
    readlinks: int
    """READLINK requests: the same for symlink targets."""
    open_files: int
    """Files open through OPEN now (none while the kernel opens files itself)."""
    known_inodes: int
    """Inodes with a non-zero lookup count (the kernel holds a reference)."""
    errors: Mapping[str, int]
    """Errno name → number of requests answered with it (xattr misses aside)."""
    failures: Mapping[str, int]
    """Exception type → number of requests it turned into ``EIO``."""

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (copies of the mappings)."""
        plain: dict[str, Any] = {}
        for item in fields(self):
            value = getattr(self, item.name)
            plain[item.name] = dict(value) if isinstance(value, Mapping) else value
        return plain


class _Counters:
    __slots__ = (
        "lookups",
        "negative_lookups",
        "opens",
        "reads",
        "read_bytes",
        "xattr_misses",
        "listings",
        "readlinks",
        "errors",
        "failures",
    )

    def __init__(self) -> None:
        self.lookups = 0
        self.negative_lookups = 0
        self.opens = 0
        self.reads = 0
        self.read_bytes = 0
        self.xattr_misses = 0
        self.listings = 0
        self.readlinks = 0
        self.errors: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()


_Handler = TypeVar("_Handler", bound=Callable[..., Coroutine[Any, Any, Any]])


def _request(handler: _Handler) -> _Handler:
    """Let only ``FUSEError`` out of ``handler``; see the module docstring."""
    op = handler.__name__

    @functools.wraps(handler)
    async def guarded(self: Operations, *args: Any, **kwargs: Any) -> Any:
        try:
            return await handler(self, *args, **kwargs)
        except FUSEError as exc:
            if exc.errno not in _NOT_ERRORS:
                self._counters.errors[errno.errorcode.get(exc.errno, str(exc.errno))] += 1
            raise
        except Exception as exc:
            self._failed(op, args, exc)
            self._counters.errors["EIO"] += 1
            raise FUSEError(errno.EIO) from None

    return cast(_Handler, guarded)


def _read_only() -> NoReturn:
    raise FUSEError(errno.EROFS)


def _decode_name(name: bytes) -> str:
    return name.decode("utf-8", "surrogateescape")


def _encode_name(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


class Operations(pyfuse3.Operations):
    """FUSE handlers for one image: names and attributes from ``tree``, bytes from ``reader``.

    ``access_log`` (optional) hears about the first open of every inode. Counters are read
    with ``statistics()``.
    """

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self,
        tree: Tree,
        reader: BlobReader,
        *,
        access_log: AccessLog | None = None,
        options: FsOptions = DEFAULT_FS_OPTIONS,
    ) -> None:
        super().__init__()
        self._tree = tree
        self._reader = reader
        self._access_log = access_log
        self._options = options
        self._counters = _Counters()
        self._lookup_counts: dict[int, int] = {}
        self._open_handles: dict[int, int] = {}
        self._read_once: set[int] = set()
        self._attributes_cache: dict[int, EntryAttributes] = {}
        self._negative = EntryAttributes()
        self._negative.st_ino = 0
        self._negative.entry_timeout = options.negative_timeout

    # ---- names and attributes --------------------------------------------------------

    @_request
    async def lookup(
        self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext
    ) -> EntryAttributes:
        """The entry ``name`` (``.`` and ``..`` included) in directory ``parent_inode``.

        A missing name gives the cached negative entry (``st_ino`` 0). ``ENOENT`` for an
        unknown parent, ``ENOTDIR`` for a parent that is not a directory. Adds one to the
        returned inode's lookup count.
        """
        self._counters.lookups += 1
        node = self._directory(parent_inode).child(name)
        if node is None:
            self._counters.negative_lookups += 1
            return self._negative
        self._remember(node.ino)
        return self._attributes(node)

    @_request
    async def getattr(self, inode: InodeT, ctx: RequestContext) -> EntryAttributes:
        """The attributes of ``inode``; ``ENOENT`` if unknown. No lookup-count change."""
        return self._attributes(self._node(inode))

    async def forget(self, inode_list: Sequence[tuple[InodeT, int]]) -> None:
        """Subtract from lookup counts. Never raises (not even ``FUSEError``)."""
        try:
            for inode, count in inode_list:
                left = self._lookup_counts.get(inode, 0) - count
                if left > 0:
                    self._lookup_counts[inode] = left
                else:
                    self._lookup_counts.pop(inode, None)
        except Exception as exc:
            self._failed("forget", (), exc)

    def destroy(self) -> None:
        """Drop all lookup counts after ``pyfuse3.main()`` returns. Never raises."""
        try:
            if self._lookup_counts:
                log.debug("%d inodes still looked up at unmount", len(self._lookup_counts))
            self._lookup_counts.clear()
        except Exception as exc:
            self._failed("destroy", (), exc)

    @_request
    async def readlink(self, inode: InodeT, ctx: RequestContext) -> FileNameT:
        """A symlink's target; ``EINVAL`` for anything else, ``ENOENT`` if unknown."""
        self._counters.readlinks += 1
        node = self._node(inode)
        if node.kind is not Kind.SYMLINK:
            raise FUSEError(errno.EINVAL)
        return node.link_target

    @_request
    async def access(self, inode: InodeT, mode: ModeT, ctx: RequestContext) -> bool:
        """``EROFS`` when asked for ``W_OK``, otherwise allowed: with ``default_permissions``
        the kernel checks modes itself and never calls this. ``ENOENT`` if unknown."""
        self._node(inode)
        if mode & os.W_OK:
            raise FUSEError(errno.EROFS)
        return True

    @_request
    async def statfs(self, ctx: RequestContext) -> StatvfsData:
        """Sizes of the whole image: blocks of its file bytes and its inodes, none free."""
        totals = self._tree.totals
        stats = StatvfsData()
        stats.f_bsize = stats.f_frsize = _STATFS_BLOCK
        stats.f_blocks = -(-totals.bytes // _STATFS_BLOCK)
        stats.f_bfree = stats.f_bavail = 0
        stats.f_files = totals.inodes
        stats.f_ffree = stats.f_favail = 0
        stats.f_namemax = _NAME_MAX
        return stats

    # ---- directories -----------------------------------------------------------------

    @_request
    async def opendir(self, inode: InodeT, ctx: RequestContext) -> FileHandleT:
        """The directory's inode is its handle. ``ENOENT`` if unknown, ``ENOTDIR``.

        ``ENOSYS`` once ``kernelcache`` passes the inode to ``readdir`` itself: the kernel
        then stops asking and keeps every listing in its cache.
        """
        if kernelcache.listings_cached():
            raise FUSEError(errno.ENOSYS)
        return self._directory(inode).ino

    @_request
    async def readdir(self, fh: FileHandleT, start_id: int, token: ReaddirToken) -> None:
        """``.``, ``..``, then the children sorted by name, from position ``start_id``.

        ``next_id`` is 1 for ``.``, 2 for ``..``, and 3 + index for the children, so a
        listing resumes exactly where the kernel's buffer filled up. Each child that
        ``readdir_reply`` accepts gains one lookup; ``.`` and ``..`` do not.
        """
        self._counters.listings += 1
        directory = self._directory(fh)
        reply = pyfuse3.readdir_reply
        if start_id < _DOT_NEXT_ID and not reply(
            token, b".", self._attributes(directory), _DOT_NEXT_ID
        ):
            return
        if start_id < _DOTDOT_NEXT_ID and not reply(
            token, b"..", self._attributes(directory.parent), _DOTDOT_NEXT_ID
        ):
            return
        listing = directory.listing()
        first = max(start_id - _FIRST_CHILD_NEXT_ID + 1, 0)
        # The hot loop of a first `find`: one iteration per entry, so no method calls
        # beyond the reply itself when the attributes are cached.
        # (Indexing, not a slice: a big directory is resumed many times.)
        cached = self._attributes_cache
        counts = self._lookup_counts
        for index in range(first, len(listing)):
            name, node = listing[index]
            ino = node.ino
            attributes = cached.get(ino)
            if attributes is None:
                attributes = self._attributes(node)
            if not reply(token, name, attributes, index + _FIRST_CHILD_NEXT_ID):
                return
            counts[ino] = counts.get(ino, 0) + 1

    @_request
    async def releasedir(self, fh: FileHandleT) -> None:
        """Nothing to release: directory handles are inode numbers."""

    # ---- files -----------------------------------------------------------------------

    @_request
    async def open(self, inode: InodeT, flags: FlagT, ctx: RequestContext) -> FileInfo:
        """Open for reading with ``keep_cache``; the inode is the handle.

        ``EROFS`` for any write access (or ``O_TRUNC``/``O_CREAT``), ``EISDIR`` for a
        directory, ``ENOENT`` if unknown; else ``ENOSYS`` once ``kernelcache`` passes the
        inode to ``read`` itself: the kernel then opens every file without asking. No
        lookup-count change.
        """
        node = self._node(inode)
        if flags & _WRITE_FLAGS:
            raise FUSEError(errno.EROFS)
        if node.is_dir:
            raise FUSEError(errno.EISDIR)
        self._counters.opens += 1
        if kernelcache.opens_in_kernel():
            raise FUSEError(errno.ENOSYS)
        self._open_handles[node.ino] = self._open_handles.get(node.ino, 0) + 1
        return FileInfo(fh=node.ino, keep_cache=True)

    @_request
    async def read(self, fh: FileHandleT, off: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``off``, short only at end of file (``b""`` past it).

        ``EIO`` when the reader fails (fetch, verification, cache), ``EBADF`` for an unknown
        handle. The first read of each inode is told to the access log.
        """
        node = self._tree.get(fh)
        if node is None:
            raise FUSEError(errno.EBADF)
        self._counters.reads += 1
        if fh not in self._read_once:
            self._read_once.add(fh)
            self._note_access(node)
        end = min(off + size, node.size)
        if off >= end:
            return b""
        data = await self._reader.read(node.blobs, off, end - off)
        if len(data) != end - off:
            raise RuntimeError(f"reader returned {len(data)} bytes, not {end - off}, at {off}")
        self._counters.read_bytes += len(data)
        return data

    @_request
    async def release(self, fh: FileHandleT) -> None:
        """Forget one open of ``fh``."""
        left = self._open_handles.get(fh, 0) - 1
        if left > 0:
            self._open_handles[fh] = left
        else:
            self._open_handles.pop(fh, None)

    # ---- extended attributes ---------------------------------------------------------

    @_request
    async def getxattr(self, inode: InodeT, name: XAttrNameT, ctx: RequestContext) -> bytes:
        """The value of xattr ``name``; ``ENOATTR`` (``ENODATA``) if absent, ``ENOENT``."""
        value = self._node(inode).xattrs.get(_decode_name(name))
        if value is None:
            self._counters.xattr_misses += 1
            raise FUSEError(pyfuse3.ENOATTR)
        return value

    @_request
    async def listxattr(self, inode: InodeT, ctx: RequestContext) -> Sequence[XAttrNameT]:
        """The names of the inode's xattrs; ``ENOENT`` if unknown."""
        return [_encode_name(name) for name in self._node(inode).xattrs]

    # ---- everything that would modify: EROFS -----------------------------------------

    @_request
    async def setattr(
        self,
        inode: InodeT,
        attr: EntryAttributes,
        fields: SetattrFields,
        fh: FileHandleT | None,
        ctx: RequestContext,
    ) -> EntryAttributes:
        """Always ``EROFS``."""
        _read_only()

    @_request
    async def mknod(
        self, parent_inode: InodeT, name: FileNameT, mode: ModeT, rdev: int, ctx: RequestContext
    ) -> EntryAttributes:
        """Always ``EROFS``."""
        _read_only()

    @_request
    async def mkdir(
        self, parent_inode: InodeT, name: FileNameT, mode: ModeT, ctx: RequestContext
    ) -> EntryAttributes:
        """Always ``EROFS``."""
        _read_only()

    @_request
    async def unlink(self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext) -> None:
        """Always ``EROFS``."""
        _read_only()

    @_request
    async def rmdir(self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext) -> None:
        """Always ``EROFS``."""
        _read_only()

    @_request
    async def symlink(
        self, parent_inode: InodeT, name: FileNameT, target: FileNameT, ctx: RequestContext
    ) -> EntryAttributes:
        """Always ``EROFS``."""
        _read_only()

    @_request
    async def rename(
        self,
        parent_inode_old: InodeT,
        name_old: FileNameT,
        parent_inode_new: InodeT,
        name_new: FileNameT,
        flags: FlagT,
        ctx: RequestContext,
    ) -> None:
        """Always ``EROFS``."""
        _read_only()

    @_request
    async def link(
        self, inode: InodeT, new_parent_inode: InodeT, new_name: FileNameT, ctx: RequestContext
    ) -> EntryAttributes:
        """Always ``EROFS``."""
        _read_only()

    @_request
    async def create(
        self,
        parent_inode: InodeT,
        name: FileNameT,
        mode: ModeT,
        flags: FlagT,
        ctx: RequestContext,
    ) -> tuple[FileInfo, EntryAttributes]:
        """Always ``EROFS``."""
        _read_only()

    @_request
    async def write(self, fh: FileHandleT, off: int, buf: bytes) -> int:
        """Always ``EROFS``."""
        _read_only()

    @_request
    async def setxattr(
        self, inode: InodeT, name: XAttrNameT, value: bytes, ctx: RequestContext
    ) -> None:
        """Always ``EROFS``."""
        _read_only()

    @_request
    async def removexattr(self, inode: InodeT, name: XAttrNameT, ctx: RequestContext) -> None:
        """Always ``EROFS``."""
        _read_only()

    # ---- statistics --------------------------------------------------------------------

    def statistics(self) -> FsStatistics:
        counters = self._counters
        return FsStatistics(
            lookups=counters.lookups,
            negative_lookups=counters.negative_lookups,
            opens=counters.opens,
            files_read=len(self._read_once),
            reads=counters.reads,
            read_bytes=counters.read_bytes,
            xattr_misses=counters.xattr_misses,
            listings=counters.listings,
            readlinks=counters.readlinks,
            open_files=sum(self._open_handles.values()),
            known_inodes=len(self._lookup_counts),
            errors=MappingProxyType(dict(counters.errors)),
            failures=MappingProxyType(dict(counters.failures)),
        )

    # ---- helpers ---------------------------------------------------------------------

    def _node(self, inode: int) -> Node:
        node = self._tree.get(inode)
        if node is None:
            raise FUSEError(errno.ENOENT)
        return node

    def _directory(self, inode: int) -> Node:
        node = self._node(inode)
        if not node.is_dir:
            raise FUSEError(errno.ENOTDIR)
        return node

    def _remember(self, inode: int) -> None:
        self._lookup_counts[inode] = self._lookup_counts.get(inode, 0) + 1

    def _attributes(self, node: Node) -> EntryAttributes:
        attributes = self._attributes_cache.get(node.ino)
        if attributes is None:
            attributes = self._attributes_cache[node.ino] = self._make_attributes(node)
        return attributes

    def _make_attributes(self, node: Node) -> EntryAttributes:
        attributes = EntryAttributes()
        attributes.st_ino = node.ino
        attributes.generation = 0
        attributes.entry_timeout = self._options.entry_timeout
        attributes.attr_timeout = self._options.attr_timeout
        attributes.st_mode = node.mode
        attributes.st_nlink = node.nlink
        attributes.st_uid = node.uid + self._options.uid_shift
        attributes.st_gid = node.gid + self._options.gid_shift
        attributes.st_rdev = node.rdev
        attributes.st_size = node.size
        attributes.st_blksize = ST_BLKSIZE
        attributes.st_blocks = node.blocks
        attributes.st_atime_ns = node.atime_ns
        attributes.st_mtime_ns = node.mtime_ns
        attributes.st_ctime_ns = node.ctime_ns
        return attributes

    def _note_access(self, node: Node) -> None:
        """Tell the access log; its failure must not fail the open it merely observes."""
        if self._access_log is None:
            return
        try:
            self._access_log.note_access(node.path, node.ino)
        except Exception as exc:
            self._failed("note_access", (node.ino,), exc)

    def _failed(self, op: str, args: tuple[Any, ...], exc: Exception) -> None:
        """Count and log one failure: one line, rate-limited per operation. Never raises."""
        kind = type(exc).__name__
        self._counters.failures[kind] += 1
        # The template names the operation, so the rate limit (keyed by template) applies
        # per operation: a storm of failing reads cannot hide a failing lookup.
        with contextlib.suppress(Exception):
            subject = self._describe(args)
            if isinstance(exc, OcixError):
                log.warning(f"{op} %s: %s", subject, exc)
            else:
                log.error(f"{op} %s: unexpected %s: %s", subject, kind, exc)
                log.debug("%s traceback", op, exc_info=exc)

    def _describe(self, args: tuple[Any, ...]) -> str:
        """The path of the inode a request is about (its first argument), for log lines."""
        if not args or not isinstance(args[0], int):
            return "-"
        node = self._tree.get(args[0])
        return node.path if node is not None else f"inode {args[0]}"
