"""The in-memory inode table of one image, built once from a validated manifest.

``Tree.from_manifest`` turns the manifest's path → entry map into inodes: the root is inode
``ROOT_INO`` (1, FUSE's root), the rest are numbered in manifest order, so the same
manifest always gives the same numbers. Every name of a hardlink group resolves to the one
inode of the regular file it names (its canonical path, the link target), whose ``nlink``
counts all its names. A directory's ``nlink`` is 2 plus its subdirectories. A parent that the
manifest leaves out is an implicit directory: mode 0755, owned by root, with the root
entry's times (0 when the root is implicit too).

Names are the bytes FUSE speaks: a path's components are encoded as UTF-8 with
``surrogateescape`` (what ``os.fsencode`` does on Linux). A directory lists its children
sorted bytewise, so a position in that list is a stable ``readdir`` offset.

A tree can also be unpacked from the host's index of an image (``image.packed``): its
nodes are then made on first use (``Tree.get``, a directory's ``children``), each exactly
as ``from_manifest`` would have made it.

The tree never does I/O and never changes after it is built. It re-checks only what it
relies on (absolute paths with usable names, parents that are directories, hardlinks that
name a regular file) and raises ``FormatError`` otherwise; full validation is ``decode``'s job.
"""

from __future__ import annotations

import gc
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from os import makedev
from types import MappingProxyType
from typing import cast

from ocixfs.errors import FormatError
from ocixfs.image.format import Chunk, Entry, Kind, Manifest

__all__ = ["IMPLICIT_DIR_MODE", "ROOT_INO", "ST_BLKSIZE", "Node", "Tree", "TreeTotals"]

ROOT_INO = 1
"""The root directory's inode number (``pyfuse3.ROOT_INODE``)."""

ST_BLKSIZE = 128 * 1024
"""The preferred I/O size reported in ``st_blksize``: one FUSE read request."""

IMPLICIT_DIR_MODE = 0o755

# Enum member access through the class costs a descriptor call each time (Python 3.11);
# the hot loops compare against these instead.
_REGULAR = Kind.REGULAR
_DIRECTORY = Kind.DIRECTORY
_SYMLINK = Kind.SYMLINK
_HARDLINK = Kind.HARDLINK

_TYPE_BITS = {
    _REGULAR: stat.S_IFREG,
    _DIRECTORY: stat.S_IFDIR,
    _SYMLINK: stat.S_IFLNK,
    Kind.CHARACTER: stat.S_IFCHR,
    Kind.BLOCK: stat.S_IFBLK,
    Kind.FIFO: stat.S_IFIFO,
}

_NO_XATTRS: Mapping[str, bytes] = MappingProxyType({})
_BAD_NAMES = frozenset({"", ".", ".."})


def _fsencode(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


def _fsdecode(name: bytes) -> str:
    return name.decode("utf-8", "surrogateescape")


class Node:
    """One inode: its number, its entry, one canonical path and, for a directory, children.

    Attributes: ``ino``; ``kind`` (never ``Kind.HARDLINK``: a hardlink's name leads to the
    node of the file it names); ``entry`` (for an implicit directory, a synthetic one);
    ``path`` (the canonical path, for profiles and log lines); ``parent`` (the root is its
    own parent); ``nlink``; ``children`` (name → node, ``None`` unless a directory; a
    node unpacked from an index fills it on first use through ``unfold``).
    The ``st_*``-like properties derive the stat data from the entry.
    """

    __slots__ = ("ino", "kind", "entry", "path", "parent", "nlink", "_children", "_listing",
                 "unfold")

    ino: int
    kind: Kind
    entry: Entry
    path: str
    parent: Node
    nlink: int
    _children: dict[str, Node] | None
    _listing: tuple[tuple[bytes, Node], ...] | None
    unfold: Callable[[Node], dict[str, Node]] | None

    def __init__(self, ino: int, entry: Entry, path: str, parent: Node | None) -> None:
        self.ino = ino
        self.kind = entry.kind
        self.entry = entry
        self.path = path
        self.parent = self if parent is None else parent
        if entry.kind is _DIRECTORY:
            self.nlink = 2
            self._children = {}
        else:
            self.nlink = 1
            self._children = None
        self._listing = None
        self.unfold = None

    def __repr__(self) -> str:
        return f"<Node {self.ino} {self.kind.name} {self.path!r}>"

    @property
    def children(self) -> dict[str, Node] | None:
        """Name → node for a directory (hardlink names lead to their file's node)."""
        if self.unfold is not None:
            unfold, self.unfold = self.unfold, None
            self._children = unfold(self)
        return self._children

    @property
    def is_dir(self) -> bool:
        return self.kind is _DIRECTORY

    def child(self, name: bytes) -> Node | None:
        """The node called ``name`` in this directory (``.`` and ``..`` included), or None."""
        children = self.children
        if children is None:
            return None
        found = children.get(_fsdecode(name))
        if found is None:
            if name == b".":
                return self
            if name == b"..":
                return self.parent
        return found

    def listing(self) -> tuple[tuple[bytes, Node], ...]:
        """This directory's ``(name, node)`` pairs sorted by name; empty for a non-directory."""
        if self._listing is None:
            children = self.children or {}
            encoded = [(_fsencode(name), node) for name, node in children.items()]
            self._listing = tuple(sorted(encoded, key=lambda item: item[0]))
        return self._listing

    # ---- stat data -------------------------------------------------------------------

    @property
    def mode(self) -> int:
        """``st_mode``: the file type bits plus permission, setuid, setgid and sticky bits."""
        kind, permissions = self.kind, self.entry.mode
        if permissions is None:
            permissions = IMPLICIT_DIR_MODE if kind is _DIRECTORY else 0o644
        if kind is _REGULAR:
            type_bits = stat.S_IFREG
        elif kind is _DIRECTORY:
            type_bits = stat.S_IFDIR
        else:
            type_bits = _TYPE_BITS[kind]
        return type_bits | (permissions & 0o7777)

    @property
    def uid(self) -> int:
        return self.entry.uid or 0

    @property
    def gid(self) -> int:
        return self.entry.gid or 0

    @property
    def size(self) -> int:
        """Bytes of content; for a symlink the length of its encoded target."""
        if self.kind is _REGULAR:
            return self.entry.size
        if self.kind is _SYMLINK:
            return len(self.link_target)
        return 0

    @property
    def blocks(self) -> int:
        """``st_blocks``: 512-byte units."""
        return (self.size + 511) // 512

    @property
    def rdev(self) -> int:
        if self.entry.rdev is None:
            return 0
        major, minor = self.entry.rdev
        return makedev(major, minor)

    @property
    def mtime_ns(self) -> int:
        return self.entry.mtime or 0

    @property
    def atime_ns(self) -> int:
        """The entry's atime, or its mtime when absent."""
        atime = self.entry.atime
        return self.mtime_ns if atime is None else atime

    @property
    def ctime_ns(self) -> int:
        """The entry's ctime, or its mtime when absent."""
        ctime = self.entry.ctime
        return self.mtime_ns if ctime is None else ctime

    # ---- content ---------------------------------------------------------------------

    @property
    def blobs(self) -> tuple[Chunk, ...]:
        """The blobs of a regular file's content, in order; empty for everything else."""
        if self.kind is not _REGULAR:
            return ()
        return self.entry.blobs

    @property
    def link_target(self) -> bytes:
        """A symlink's target as bytes; empty for everything else."""
        target = self.entry.target
        if self.kind is not _SYMLINK or target is None:
            return b""
        return _fsencode(target)

    @property
    def xattrs(self) -> Mapping[str, bytes]:
        return self.entry.xattrs or _NO_XATTRS


@dataclass(frozen=True, slots=True, kw_only=True)
class TreeTotals:
    """Counts over a whole tree; hardlinked files and shared blobs are counted once."""

    entries: int
    """Names in the manifest (including hardlinks) plus implicit directories."""
    inodes: int
    directories: int
    files: int
    bytes: int
    """Sum of regular files' sizes."""
    blobs: int
    """Distinct blobs referenced."""
    blob_bytes: int
    """Sum of the distinct blobs' sizes: what a full fetch downloads, before compression."""


class Tree:
    """An image's inodes; build with ``Tree.from_manifest`` (or ``image.packed.unpack``).
    Immutable once built.

    ``nodes`` holds every inode in order; a lazily unpacked tree holds ``None`` for the
    ones not made yet, ``fill(ino)`` makes one (and files it in ``nodes``), and
    ``find(directory, name)`` looks one name up in a directory not unfolded yet (the
    node, made through ``fill``, or None).
    ``entry_count`` counts names (every hardlink name, each implicit directory).
    """

    def __init__(
        self,
        nodes: list[Node | None],
        *,
        entry_count: int,
        fill: Callable[[int], Node] | None = None,
        find: Callable[[Node, str], Node | None] | None = None,
        totals: TreeTotals | None = None,
    ) -> None:
        self._nodes = nodes
        self._entry_count = entry_count
        self._fill = fill
        self._find = find
        self._totals = totals

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> Tree:
        """Build the inode table; raise ``FormatError`` if the entries cannot form a tree."""
        return _Builder(manifest.entries).build()

    @property
    def root(self) -> Node:
        root = self.get(ROOT_INO)
        assert root is not None  # a tree always has its root
        return root

    @property
    def inode_count(self) -> int:
        return len(self._nodes)

    @property
    def entry_count(self) -> int:
        """Names, counting every hardlink name and each implicit directory."""
        return self._entry_count

    def get(self, ino: int) -> Node | None:
        """The node with inode number ``ino``, or None."""
        if ino < ROOT_INO or ino > len(self._nodes):
            return None
        node = self._nodes[ino - ROOT_INO]
        if node is None and self._fill is not None:
            node = self._fill(ino)
        return node

    def node_by_path(self, path: str) -> Node | None:
        """The node an absolute path names (a hardlink's path gives its target's node);
        None unless ``path`` is canonical and exists. In an unpacked tree a directory not
        unfolded yet is searched (``find``) rather than unfolded: a lookup makes only the
        nodes on its path."""
        node = self.root
        if path == "/":
            return node
        if not path.startswith("/"):
            return None
        find = self._find
        for name in path[1:].split("/"):
            if find is not None and node.unfold is not None:
                found = find(node, name)
                if found is None:
                    return None
                node = found
                continue
            children = node.children
            found = None if children is None else children.get(name)
            if found is None:
                return None
            node = found
        return node

    def path_of(self, ino: int) -> str:
        """The canonical path of inode ``ino``; ``KeyError`` when there is no such inode."""
        node = self.get(ino)
        if node is None:
            raise KeyError(ino)
        return node.path

    def iter_nodes(self) -> Iterator[Node]:
        """Every inode once, in inode order (an unpacked tree makes them all first)."""
        if self._fill is not None:
            for ino in range(ROOT_INO, len(self._nodes) + ROOT_INO):
                self.get(ino)
            self._fill = None
        return iter(cast(list[Node], self._nodes))

    def iter_files(self) -> Iterator[Node]:
        """Every regular file once (hardlink groups once), in inode order."""
        return (node for node in self.iter_nodes() if node.kind is _REGULAR)

    @property
    def totals(self) -> TreeTotals:
        if self._totals is None:
            self._totals = self._count()
        return self._totals

    def _count(self) -> TreeTotals:
        files = directories = size = 0
        blob_sizes: dict[bytes, int] = {}
        for node in self.iter_nodes():
            kind = node.kind
            if kind is _REGULAR:
                entry = node.entry
                files += 1
                size += entry.size
                if entry.chunks is not None:
                    for chunk in entry.chunks:
                        blob_sizes[chunk.digest] = chunk.size
                elif entry.digest is not None:
                    blob_sizes[entry.digest] = entry.size
            elif kind is _DIRECTORY:
                directories += 1
        return TreeTotals(
            entries=self._entry_count,
            inodes=len(self._nodes),
            directories=directories,
            files=files,
            bytes=size,
            blobs=len(blob_sizes),
            blob_bytes=sum(blob_sizes.values()),
        )


class _Builder:
    """One pass over the entries (hardlinks last, since they name other entries).

    The common case (parent already known, a fresh name) is inlined in ``build``; everything
    else (implicit parents, an explicit entry for an implicit directory, errors) goes
    through ``_add``. While building, the root is filed under ``""``, the parent part of
    ``"/name"``, so that no fast-path lookup can find it as the parent of ``"//name"``.
    """

    def __init__(self, entries: Mapping[str, Entry]) -> None:
        self._entries = entries
        root_entry = entries.get("/")
        if root_entry is not None and root_entry.kind is not _DIRECTORY:
            raise FormatError(f"/: the root is a {root_entry.kind.value}, not a directory")
        times = root_entry or Entry(_DIRECTORY)
        self._implicit = Entry(
            _DIRECTORY,
            mode=IMPLICIT_DIR_MODE,
            atime=times.atime,
            ctime=times.ctime,
            mtime=times.mtime,
        )
        root = Node(ROOT_INO, root_entry or self._implicit, "/", None)
        self._nodes = [root]
        self._by_path = {"": root}
        self._implicit_paths: set[str] = set()

    def build(self) -> Tree:
        # The table is hundreds of thousands of long-lived objects created in one go; the
        # cyclic collector would re-scan it over and over while it grows (about half the
        # build time), and there is no garbage to find.
        collecting = gc.isenabled()
        gc.disable()
        try:
            self._add_all()
        finally:
            if collecting:
                gc.enable()
        return Tree(cast(list[Node | None], self._nodes), entry_count=len(self._by_path))

    def _add_all(self) -> None:
        nodes, by_path = self._nodes, self._by_path
        links: list[tuple[str, Entry]] = []
        for path, entry in self._entries.items():
            kind = entry.kind
            if kind is _HARDLINK:
                links.append((path, entry))
                continue
            parent_path, slash, name = path.rpartition("/")
            parent = by_path.get(parent_path)
            if (
                parent is None
                or parent._children is None
                or not slash
                or name in _BAD_NAMES
                or path in by_path
            ):
                self._add(path, entry)
                continue
            node = Node(len(nodes) + ROOT_INO, entry, path, parent)
            nodes.append(node)
            parent._children[name] = node
            if kind is _DIRECTORY:
                parent.nlink += 1
            by_path[path] = node
        for path, entry in links:
            self._link(path, entry)

    def _add(self, path: str, entry: Entry) -> None:
        if path == "/":
            return
        existing = self._by_path.get(path)
        if existing is not None:
            self._replace_implicit(existing, entry)
            return
        parent, name = self._parent_of(path)
        node = Node(len(self._nodes) + ROOT_INO, entry, path, parent)
        self._nodes.append(node)
        self._attach(parent, name, node)
        self._by_path[path] = node

    def _replace_implicit(self, node: Node, entry: Entry) -> None:
        """An entry for a directory that was created earlier as some child's parent."""
        if node.path not in self._implicit_paths:
            raise FormatError(f"{node.path}: appears twice")
        if entry.kind is not _DIRECTORY:
            raise FormatError(f"{node.path}: is a {entry.kind.value} but has entries below it")
        self._implicit_paths.discard(node.path)
        node.entry = entry

    def _link(self, path: str, entry: Entry) -> None:
        target = self._by_path.get(entry.target or "/")
        if target is None or target.kind is not _REGULAR or target.path != entry.target:
            raise FormatError(f"{path}: hardlink to {entry.target!r}, which is not a regular file")
        if path in self._by_path:
            raise FormatError(f"{path}: appears twice")
        parent, name = self._parent_of(path)
        self._attach(parent, name, target)
        self._by_path[path] = target
        target.nlink += 1

    def _parent_of(self, path: str) -> tuple[Node, str]:
        parent_path, _, name = path.rpartition("/")
        if not path.startswith("/") or parent_path.endswith("/") or name in _BAD_NAMES:
            raise FormatError(f"{path!r}: not a canonical absolute path")
        return self._directory(parent_path), name

    def _directory(self, path: str) -> Node:
        """The directory at ``path`` (``""`` is the root), created if absent."""
        node = self._by_path.get(path)
        if node is None:
            parent, name = self._parent_of(path)
            node = Node(len(self._nodes) + ROOT_INO, self._implicit, path, parent)
            self._nodes.append(node)
            self._attach(parent, name, node)
            self._by_path[path] = node
            self._implicit_paths.add(path)
        elif node.children is None:
            raise FormatError(f"{path}: is a {node.kind.value} but has entries below it")
        return node

    @staticmethod
    def _attach(parent: Node, name: str, node: Node) -> None:
        assert parent._children is not None
        parent._children[name] = node
        if node.kind is _DIRECTORY:
            parent.nlink += 1
