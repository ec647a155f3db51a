"""The file tree of an image being built: tar layers applied in order, or a directory read.

``BuildTree`` is an in-memory tree of ``Node`` objects; a hard link is the same ``Node``
reachable under several names. ``apply_tar_layer`` applies one uncompressed tar layer the
way ``umoci unpack`` does on disk, so the result matches an unpacked bundle:

- a path in a parent that is a symlink is resolved through it, inside the tree (the root
  is the root: ``..`` and absolute targets never leave it); missing parents are created
  as implicit directories (0755, root);
- a new entry replaces what was at its path, except that a directory over a directory
  only takes the new metadata and keeps its children;
- ``.wh.NAME`` removes NAME, and ``.wh..wh..opq`` everything in its directory, as far as it
  came from lower layers: paths this layer already wrote (and their ancestors) stay;
- a hard link names whatever object its target path holds at that moment (a file from
  this layer or any lower one); a later entry at one of the names leaves the others alone.

``read_rootfs_dir`` fills the tree from a directory with ``lstat`` semantics, grouping hard
links by ``(st_dev, st_ino)``. ``BuildTree.to_entries`` turns the tree into manifest entries:
every hard-link group of regular files becomes one ``regularfile`` at its canonically lowest
path (shorter first, then bytewise) and ``link`` entries naming it.

File contents are not read here: the caller's ``ContentSink`` turns each regular file's
bytes into a ``PendingContent`` (hashing and storing may run in other threads). Errors in a
layer's structure become one-line ``BuildError`` messages naming the layer and the path.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import stat
import tarfile
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from types import MappingProxyType
from typing import IO, Any, Protocol, cast

from ocixfs.errors import BuildError
from ocixfs.image.format import DEFAULT_LIMITS, Chunk, Entry, Kind, Limits, path_sort_key

__all__ = [
    "IGNORED_XATTRS",
    "BuildTree",
    "ContentSink",
    "FileContent",
    "Meta",
    "Node",
    "PendingContent",
    "PendingFile",
    "open_pending",
    "apply_tar_layer",
    "read_rootfs_dir",
]

log = logging.getLogger(__name__)

WHITEOUT_PREFIX = ".wh."
OPAQUE_WHITEOUT = ".wh..wh..opq"
MAX_SYMLINK_HOPS = 255
IMPLICIT_DIR_MODE = 0o755
SYMLINK_MODE = 0o777
# Host-specific attributes that umoci neither packs nor unpacks.
IGNORED_XATTRS = frozenset({"security.selinux", "system.nfs4_acl"})
_XATTR_PAX_PREFIX = "SCHILY.xattr."
_NO_XATTRS: Mapping[str, bytes] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class FileContent:
    """A regular file's content once stored: ``digest`` is ``None`` only for size 0."""

    size: int
    digest: bytes | None
    chunks: tuple[Chunk, ...] | None = None


class PendingContent(Protocol):
    """Content being hashed and stored; ``result()`` waits for it (or raises its error)."""

    def result(self) -> FileContent: ...


class ContentSink(Protocol):
    """Turns file bytes into stored content."""

    def from_stream(self, stream: IO[bytes], size: int) -> PendingContent:
        """Consume exactly ``size`` bytes of ``stream`` before returning."""
        ...

    def from_file(self, file: PendingFile) -> PendingContent:
        """Read the file the walk found (``open_pending``; ``file.size`` is what ``lstat``
        said: a hint)."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Meta:
    """Metadata shared by all names of one object; ``mode`` is ``st_mode & 0o7777``."""

    mode: int
    uid: int = 0
    gid: int = 0
    mtime: int | None = None
    username: str | None = None
    groupname: str | None = None
    xattrs: Mapping[str, bytes] = field(default_factory=lambda: _NO_XATTRS)


IMPLICIT_META = Meta(mode=IMPLICIT_DIR_MODE)


@dataclass(eq=False, slots=True)
class Node:
    """One file system object; directories hold ``children`` (name → node)."""

    kind: Kind
    meta: Meta
    content: PendingContent | None = None
    target: str | None = None
    rdev: tuple[int, int] | None = None
    children: dict[str, Node] | None = None
    implicit: bool = False

    @classmethod
    def directory(cls, meta: Meta = IMPLICIT_META, *, implicit: bool = False) -> Node:
        return cls(Kind.DIRECTORY, meta, children={}, implicit=implicit)


@dataclass(slots=True)
class BuildTree:
    """The tree being built; starts as an implicit root directory.

    ``entries`` counts the names below the root as they come and go, so that a layer is
    refused the moment the tree passes the manifest's entry limit (``limits``), not after
    millions of nodes were built: a 10 MB gzip layer can hold a million empty files."""

    root: Node = field(default_factory=lambda: Node.directory(implicit=True))
    limits: Limits = DEFAULT_LIMITS
    entries: int = 0

    def grow(self, names: int = 1) -> bool:
        """Count ``names`` more entries (negative: fewer); False once past the limit."""
        self.entries += names
        return self.entries <= self.limits.max_entries

    def walk(self) -> Iterator[tuple[str, Node]]:
        """Every ``(absolute path, node)``, parents before children; a hard link per name."""
        pending: list[tuple[str, Node]] = [("/", self.root)]
        while pending:
            path, node = pending.pop()
            yield path, node
            if node.children:
                prefix = path if path == "/" else path + "/"
                pending.extend((prefix + name, child) for name, child in node.children.items())

    def to_entries(self, *, version: int) -> tuple[dict[str, Entry], int]:
        """The manifest entries in canonical order, and how many of them lost their xattrs
        because ``version`` 0 cannot carry any."""
        entries: dict[str, Entry] = {}
        groups: dict[int, tuple[Node, list[str]]] = {}
        for path, node in self.walk():
            if node.kind is not Kind.DIRECTORY:
                groups.setdefault(id(node), (node, []))[1].append(path)
            elif node is not self.root or not node.implicit:
                entries[path] = _entry(node, version)
        for node, paths in groups.values():
            entry = _entry(node, version)
            if node.kind is Kind.REGULAR:
                first, *others = sorted(paths, key=path_sort_key)
                entries[first] = entry
                entries.update((other, Entry(Kind.HARDLINK, target=first)) for other in others)
            else:
                # OCIX hard links name regular files only: other objects are copied.
                entries.update((path, entry) for path in paths)
        dropped = 0
        if version == 0:
            dropped = sum(1 for path, node in self.walk()
                          if node.meta.xattrs and path in entries
                          and entries[path].kind is not Kind.HARDLINK)
        ordered = {path: entries[path] for path in sorted(entries, key=path_sort_key)}
        return ordered, dropped


def _names(node: Node) -> int:
    """How many entries ``node`` stands for: itself and everything below it."""
    count = 0
    pending = [node]
    while pending:
        current = pending.pop()
        count += 1
        if current.children:
            pending.extend(current.children.values())
    return count


def _entry(node: Node, version: int) -> Entry:
    meta = node.meta
    content = node.content.result() if node.content is not None else None
    return Entry(
        node.kind,
        mode=meta.mode,
        uid=meta.uid or None,
        gid=meta.gid or None,
        username=meta.username,
        groupname=meta.groupname,
        mtime=meta.mtime,
        size=content.size if content else 0,
        digest=content.digest if content else None,
        chunks=content.chunks if content and version >= 1 else None,
        target=node.target,
        rdev=node.rdev,
        xattrs=dict(meta.xattrs) if version >= 1 and meta.xattrs else None,
    )


# -- tar layers ---------------------------------------------------------------------------


def apply_tar_layer(tree: BuildTree, stream: IO[bytes], sink: ContentSink, *, name: str) -> None:
    """Apply the uncompressed tar archive ``stream`` to ``tree`` as the next layer."""
    applier = _LayerApplier(tree, sink, name)
    try:
        # tarfile's own stream mode ("r|") copies its whole read buffer on every small
        # read; random-access mode over a forward-only reader reads each member directly.
        with tarfile.open(fileobj=_ForwardReader(stream), mode="r:", encoding="utf-8",
                          errors="surrogateescape") as archive:
            while (member := archive.next()) is not None:
                applier.apply(member, archive)
                cast(Any, archive).members.clear()  # tarfile keeps every header otherwise
    except tarfile.TarError as exc:
        raise BuildError(f"{name}: not a valid tar archive: {exc}") from exc


class _ForwardReader(io.RawIOBase):
    """A read-only stream that can seek forward (by reading), which is all tarfile needs
    to read an archive from a pipe or a decompressor member by member."""

    def __init__(self, inner: IO[bytes]) -> None:
        self._inner = inner
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def read(self, size: int | None = -1) -> bytes:
        data = self._inner.read(-1 if size is None else size)
        self._position += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = offset if whence == io.SEEK_SET else self._position + offset
        if whence not in (io.SEEK_SET, io.SEEK_CUR) or target < self._position:
            raise io.UnsupportedOperation("can only seek forward")
        while self._position < target and self.read(min(target - self._position, 1 << 20)):
            pass
        return self._position


class _LayerApplier:
    def __init__(self, tree: BuildTree, sink: ContentSink, layer: str) -> None:
        self.tree = tree
        self.sink = sink
        self.layer = layer
        # Resolved paths written by this layer, and their ancestors (umoci's "upperPaths").
        self.upper: set[str] = set()

    def fail(self, member: tarfile.TarInfo, problem: str) -> BuildError:
        return BuildError(f"{self.layer}: {member.name}: {problem}")

    def grow(self, member: tarfile.TarInfo, names: int) -> None:
        """Count entries added (or removed); refuse the layer once past the entry limit."""
        if not self.tree.grow(names):
            limit = self.tree.limits.max_entries
            raise self.fail(member, f"the image has more than {limit} entries (the limit)")

    def check_size(self, member: tarfile.TarInfo, path: str, base: str) -> None:
        """The manifest's limits on one entry, checked before it is built."""
        limits = self.tree.limits
        if len(path.encode("utf-8", "surrogateescape")) + 1 > limits.max_path_bytes:
            raise self.fail(member, f"path longer than {limits.max_path_bytes} bytes")
        if len(base.encode("utf-8", "surrogateescape")) > limits.max_name_bytes:
            raise self.fail(member, f"a name longer than {limits.max_name_bytes} bytes")
        if member.isreg() and member.size > limits.max_file_size:
            raise self.fail(member, f"larger than {limits.max_file_size} bytes")
        if member.issym() and len(member.linkname.encode("utf-8", "surrogateescape")) > (
            limits.max_symlink_bytes
        ):
            raise self.fail(member, f"symlink target longer than {limits.max_symlink_bytes} bytes")

    def apply(self, member: tarfile.TarInfo, archive: tarfile.TarFile) -> None:
        parts = self.clean(member, member.name)
        if not parts:
            if not member.isdir():
                raise self.fail(member, "the root can only be a directory")
            self.tree.root.meta = self.meta(member)
            self.tree.root.implicit = False
            return
        *dir_parts, base = parts
        if base.startswith(WHITEOUT_PREFIX):
            self.whiteout(member, dir_parts, base)
            return
        parent, parent_path = self.resolve(member, dir_parts)
        path = f"{parent_path}/{base}" if parent_path else base
        self.check_size(member, path, base)
        assert parent.children is not None
        existing = parent.children.get(base)
        if existing is not None and existing.kind is Kind.DIRECTORY and member.isdir():
            existing.meta = self.meta(member)
            existing.implicit = False
        else:
            replaced = parent.children.pop(base, None)
            self.grow(member, 1 - (_names(replaced) if replaced is not None else 0))
            parent.children[base] = self.new_node(member, archive)
        self.mark_upper(path)

    def new_node(self, member: tarfile.TarInfo, archive: tarfile.TarFile) -> Node:
        if member.islnk():
            return self.hardlink_target(member)
        if member.isreg():
            stream = archive.extractfile(member)
            assert stream is not None
            return Node(Kind.REGULAR, self.meta(member),
                        content=self.sink.from_stream(stream, member.size))
        if member.isdir():
            return Node.directory(self.meta(member))
        if member.issym():
            if not member.linkname:
                raise self.fail(member, "symlink with an empty target")
            return Node(Kind.SYMLINK, self.meta(member, mode=SYMLINK_MODE),
                        target=self.text(member, member.linkname, "symlink target"))
        if member.ischr() or member.isblk():
            kind = Kind.CHARACTER if member.ischr() else Kind.BLOCK
            return Node(kind, self.meta(member), rdev=(member.devmajor, member.devminor))
        if member.isfifo():
            return Node(Kind.FIFO, self.meta(member))
        raise self.fail(member, f"unsupported tar entry type {member.type!r}")

    def hardlink_target(self, member: tarfile.TarInfo) -> Node:
        parts = self.clean(member, member.linkname)
        if not parts:
            raise self.fail(member, "hard link to the root directory")
        found = self.lookup(member, parts[:-1])
        target = found[0].children.get(parts[-1]) if found and found[0].children else None
        if target is None:
            raise self.fail(member, f"hard link to missing file {member.linkname}")
        if target.kind is Kind.DIRECTORY:
            raise self.fail(member, f"hard link to directory {member.linkname}")
        return target

    def whiteout(self, member: tarfile.TarInfo, dir_parts: list[str], base: str) -> None:
        victim = base[len(WHITEOUT_PREFIX):]
        if base != OPAQUE_WHITEOUT and victim in ("", ".", ".."):
            raise self.fail(member, "malformed whiteout")
        found = self.lookup(member, dir_parts)
        if found is None:
            return
        parent, parent_path = found
        assert parent.children is not None
        if base == OPAQUE_WHITEOUT:
            self.purge(parent, parent_path)
            return
        node = parent.children.get(victim)
        if node is None:
            return
        path = f"{parent_path}/{victim}" if parent_path else victim
        if path not in self.upper:
            del parent.children[victim]
            self.tree.grow(-_names(node))
        elif node.kind is Kind.DIRECTORY:
            self.purge(node, path)

    def purge(self, directory: Node, path: str) -> None:
        """Remove what lower layers put under ``directory``; keep this layer's paths."""
        assert directory.children is not None
        prefix = f"{path}/" if path else ""
        for name, child in list(directory.children.items()):
            child_path = prefix + name
            if child_path not in self.upper:
                del directory.children[name]
                self.tree.grow(-_names(child))
            elif child.kind is Kind.DIRECTORY:
                self.purge(child, child_path)

    def mark_upper(self, path: str) -> None:
        while path and path not in self.upper:
            self.upper.add(path)
            path = path.rpartition("/")[0]

    def resolve(self, member: tarfile.TarInfo, parts: list[str]) -> tuple[Node, str]:
        """The directory at ``parts``, following symlinks, creating missing ones."""
        found = self._walk(member, parts, create=True)
        assert found is not None
        return found

    def lookup(self, member: tarfile.TarInfo, parts: list[str]) -> tuple[Node, str] | None:
        """The existing directory at ``parts`` (following symlinks), or ``None``."""
        return self._walk(member, parts, create=False)

    def _walk(self, member: tarfile.TarInfo, parts: list[str],
              *, create: bool) -> tuple[Node, str] | None:
        stack: list[tuple[str, Node]] = []
        pending = deque(parts)
        hops = 0
        while pending:
            name = pending.popleft()
            if name in ("", "."):
                continue
            if name == "..":
                if stack:
                    stack.pop()
                continue
            current = stack[-1][1] if stack else self.tree.root
            assert current.children is not None
            child = current.children.get(name)
            if child is None:
                if not create:
                    return None
                self.grow(member, 1)
                child = current.children[name] = Node.directory(implicit=True)
            elif child.kind is Kind.SYMLINK:
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise self.fail(member, "too many levels of symbolic links")
                target = child.target or ""
                if target.startswith("/"):
                    stack.clear()
                pending.extendleft(reversed(target.split("/")))
                continue
            elif child.kind is not Kind.DIRECTORY:
                if not create:
                    return None
                where = "/".join([n for n, _ in stack] + [name])
                raise self.fail(member, f"parent {where} is not a directory")
            stack.append((name, child))
        if not stack:
            return self.tree.root, ""
        return stack[-1][1], "/".join(n for n, _ in stack)

    def clean(self, member: tarfile.TarInfo, name: str) -> list[str]:
        """``name`` as path components below the root; ``..`` may not climb above it."""
        parts: list[str] = []
        for part in self.text(member, name, "path").split("/"):
            if part in ("", "."):
                continue
            if part == "..":
                if not parts:
                    raise self.fail(member, f"path {name} escapes the root")
                parts.pop()
            else:
                parts.append(part)
        return parts

    def text(self, member: tarfile.TarInfo, value: str, what: str) -> str:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise self.fail(member, f"{what} is not valid UTF-8") from None
        return value

    def meta(self, member: tarfile.TarInfo, *, mode: int | None = None) -> Meta:
        pax = member.pax_headers
        xattrs = {
            key[len(_XATTR_PAX_PREFIX):]: value.encode("utf-8", "surrogateescape")
            for key, value in pax.items()
            if key.startswith(_XATTR_PAX_PREFIX)
            and key[len(_XATTR_PAX_PREFIX):] not in IGNORED_XATTRS
        }
        return Meta(
            mode=member.mode & 0o7777 if mode is None else mode,
            uid=member.uid,
            gid=member.gid,
            mtime=_mtime_ns(member),
            username=member.uname or None,
            groupname=member.gname or None,
            xattrs=MappingProxyType(xattrs) if xattrs else _NO_XATTRS,
        )


def _mtime_ns(member: tarfile.TarInfo) -> int:
    """The mtime in nanoseconds: exact from a PAX record (``"1700000000.123456789"``),
    which tarfile itself only keeps as a float."""
    record = member.pax_headers.get("mtime")
    if record is not None:
        try:
            return int(Decimal(record) * 10**9)
        except (InvalidOperation, ValueError, OverflowError):
            pass
    return int(member.mtime) * 10**9


# -- directories --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PendingFile:
    """A regular file found by ``read_rootfs_dir`` whose content is still to be read:
    ``path`` names it for opening (the last component never followed) and messages,
    ``identity`` is the ``(st_dev, st_ino)`` the walk saw, which the opened file must
    have (``open_pending``)."""

    node: Node
    path: str
    size: int
    identity: tuple[int, int]


def open_pending(file: PendingFile) -> int:
    """A read-only descriptor of exactly the file the walk found. The path is resolved
    again, so a parent directory swapped for a symlink since the walk would lead
    elsewhere: anything but the same inode is refused. Raises ``BuildError``."""
    try:
        fd = os.open(file.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
                     | os.O_NOCTTY)
    except OSError as exc:
        raise BuildError(f"{file.path}: {_changed_or(exc)}") from exc
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != file.identity or not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise BuildError(f"{file.path}: {_CHANGED}")
    return fd


_CHANGED = "changed while the build read it (replaced, or a parent swapped for a symlink)"


def _changed_or(exc: OSError) -> str:
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        return _CHANGED
    return exc.strerror or str(exc)


def read_rootfs_dir(tree: BuildTree, root: Path) -> Iterator[PendingFile]:
    """Fill ``tree`` from the directory ``root`` (metadata only, nothing followed),
    yielding each regular file as it is found so that its content can be read meanwhile.
    The tree is complete once the iterator is exhausted.

    The walk never resolves a path twice: it holds a descriptor of each directory on the
    way down and reaches children relative to it (``openat`` with ``O_NOFOLLOW``,
    checked against the ``lstat`` of the listing; ``fstatat``, ``readlinkat``; xattrs
    through ``/proc/self/fd``), so a directory that someone swaps for a symlink while
    the build runs is refused (``BuildError``), never read through. Raises
    ``BuildError``."""
    reader = _DirReader()
    try:
        top_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except NotADirectoryError:
        raise BuildError(f"{root}: not a directory") from None
    except OSError as exc:
        raise BuildError(f"{root}: {exc.strerror}") from exc
    pending: list[tuple[int, Iterator[tuple[str, str, os.stat_result, Node]]]] = []
    try:
        top = os.fstat(top_fd)
        tree.root = Node.directory(reader.meta(f"/proc/self/fd/{top_fd}", top, follow=True,
                                                shown=os.fspath(root)))
        pending.append((top_fd, _list(tree, reader, top_fd, os.fspath(root), tree.root, root)))
        while pending:
            yield from reader.files
            reader.files.clear()
            fd, subdirectories = pending[-1]
            found = next(subdirectories, None)
            if found is None:
                os.close(pending.pop()[0])
                continue
            name, path, st, node = found
            child_fd = _open_subdirectory(fd, name, path, st)
            pending.append((child_fd, _list(tree, reader, child_fd, path, node, root)))
    finally:
        for fd, _ in pending:
            os.close(fd)


def _list(
    tree: BuildTree, reader: _DirReader, fd: int, path: str, node: Node, root: Path
) -> Iterator[tuple[str, str, os.stat_result, Node]]:
    """``reader.children``, counting what it added against the entry limit."""
    subdirectories = reader.children(fd, path, node)
    assert node.children is not None
    if not tree.grow(len(node.children)):
        raise BuildError(f"{root}: more than {tree.limits.max_entries} entries (the limit)")
    return subdirectories


def _open_subdirectory(parent_fd: int, name: str, path: str, listed: os.stat_result) -> int:
    """The directory ``name`` under ``parent_fd``, refused unless it is still the one the
    listing saw (not a symlink, same inode)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
                     | os.O_NONBLOCK, dir_fd=parent_fd)
    except OSError as exc:
        raise BuildError(f"{path}: {_changed_or(exc)}") from exc
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (listed.st_dev, listed.st_ino):
        os.close(fd)
        raise BuildError(f"{path}: {_CHANGED}")
    return fd


class _DirReader:
    def __init__(self) -> None:
        self.files: list[PendingFile] = []
        self.inodes: dict[tuple[int, int], Node] = {}
        self.skipped_sockets = 0

    def children(self, fd: int, directory: str, parent: Node
                 ) -> Iterator[tuple[str, str, os.stat_result, Node]]:
        """List the directory open at ``fd`` into ``parent`` (files go to ``files``) and
        yield its subdirectories as ``(name, path, lstat, node)``, in name order."""
        try:
            with os.scandir(fd) as it:
                dirents = sorted(it, key=lambda d: d.name)
        except OSError as exc:
            raise BuildError(f"{directory}: {exc.strerror}") from exc
        subdirectories = []
        for dirent in dirents:
            path = os.path.join(directory, dirent.name)
            try:
                name = _utf8(path, dirent.name)
                st = dirent.stat(follow_symlinks=False)
                node = self.node(fd, dirent.name, path, st)
            except OSError as exc:
                raise BuildError(f"{path}: {_changed_or(exc)}") from exc
            if node is None:
                continue
            assert parent.children is not None
            parent.children[name] = node
            if node.kind is Kind.DIRECTORY:
                subdirectories.append((dirent.name, path, st, node))
        return iter(subdirectories)

    def node(self, fd: int, name: str, path: str, st: os.stat_result) -> Node | None:
        """The node for ``name`` in the directory open at ``fd``, as ``lstat`` saw it."""
        fmt = stat.S_IFMT(st.st_mode)
        at = f"/proc/self/fd/{fd}/{name}"  # the open directory: nothing resolved again
        if fmt == stat.S_IFDIR:
            return Node.directory(self.meta(at, st, shown=path))
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in self.inodes:
            return self.inodes[key]
        if fmt == stat.S_IFREG:
            node = Node(Kind.REGULAR, self.meta(at, st, shown=path))
            self.files.append(PendingFile(node, path, st.st_size, key))
        elif fmt == stat.S_IFLNK:
            target = _utf8(path, os.readlink(name, dir_fd=fd))
            meta = self.meta(at, st, mode=SYMLINK_MODE, shown=path)
            node = Node(Kind.SYMLINK, meta, target=target)
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
            kind = Kind.CHARACTER if fmt == stat.S_IFCHR else Kind.BLOCK
            rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
            node = Node(kind, self.meta(at, st, shown=path), rdev=rdev)
        elif fmt == stat.S_IFIFO:
            node = Node(Kind.FIFO, self.meta(at, st, shown=path))
        else:
            if not self.skipped_sockets:
                log.warning("%s: skipping sockets (OCIX has no socket type)", path)
            self.skipped_sockets += 1
            return None
        if st.st_nlink > 1:
            self.inodes[key] = node
        return node

    def meta(self, at: str, st: os.stat_result, *, mode: int | None = None,
             follow: bool = False, shown: str = "") -> Meta:
        """``at`` is where xattrs are read (a ``/proc/self/fd`` path), ``shown`` the path
        an error names."""
        xattrs = _read_xattrs(at, follow=follow, shown=shown or at)
        return Meta(
            mode=stat.S_IMODE(st.st_mode) if mode is None else mode,
            uid=st.st_uid,
            gid=st.st_gid,
            mtime=st.st_mtime_ns,
            xattrs=MappingProxyType(xattrs) if xattrs else _NO_XATTRS,
        )


def _read_xattrs(path: str, *, follow: bool, shown: str) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=follow)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    xattrs = {}
    for name in names:
        if name in IGNORED_XATTRS:
            continue
        xattrs[_utf8(shown, name)] = os.getxattr(path, name, follow_symlinks=follow)
    return xattrs


def _utf8(path: str, text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BuildError(f"{path!r}: name is not valid UTF-8") from None
    return text

