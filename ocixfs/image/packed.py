"""The inode table packed into a few flat arrays, and unpacked into a lazy ``Tree``.

``pack(tree)`` writes every inode's entry, its parent, name and link count, every
directory's entries and the tree's totals as about thirty typed arrays (``array`` in
native byte order) plus one table of strings and one of 32-byte digests. ``unpack``
reads them back with one bulk copy per array and a handful of whole-array bounds checks
(``min``/``max`` in C), not per-entry Python work; nodes are then made on first use, each
exactly the node ``Tree.from_manifest`` made (same number, entry, path, parent, link count
and children).

Pure: no disk. The payload carries no checksum and no identity; ``cache.index`` frames it
(magic, versions, manifest digest, BLAKE3 of the payload). ``unpack`` is still written for
hostile bytes: anything out of bounds or inconsistent raises ``FormatError``, and what it
accepts can never make a later ``get`` or ``children`` fail (indices were checked, strings
decode with ``surrogateescape``, parents come before children so no walk loops).

Layout: ``u32 section count``, then per section ``u8 typecode, u8 pad[3], u64 items``,
then the sections' bytes in that order, each padded to 8 bytes. ``PACK_VERSION`` changes
whenever this layout or the meaning of a field does.
"""

from __future__ import annotations

import struct
import threading
from array import array
from collections.abc import Callable, Iterable
from itertools import accumulate
from operator import add, attrgetter, lt
from typing import Any

from ocixfs.errors import FormatError
from ocixfs.image.format import (
    HASH_SIZE,
    MAX_DEVICE_MAJOR,
    MAX_DEVICE_MINOR,
    MAX_TIME_NS,
    MIN_TIME_NS,
    Chunk,
    Entry,
    Kind,
    join_path,
)
from ocixfs.image.tree import ROOT_INO, Node, Tree, TreeTotals

__all__ = ["PACK_VERSION", "pack", "read_columns", "serialize", "unpack"]

PACK_VERSION = 1

_KINDS = tuple(Kind)
_CODES = {kind: code for code, kind in enumerate(_KINDS)}
_DIRECTORY = _CODES[Kind.DIRECTORY]
_NODE_KINDS = bytes(code for kind, code in _CODES.items() if kind is not Kind.HARDLINK)
_NONE = -1
_BILLION = 1_000_000_000
_MAX_ID = (1 << 32) - 1

# Per-inode arrays (one item per inode, in inode order), then the shared tables.
_NODE_FIELDS = (
    ("kind", "B"), ("name", "i"), ("parent", "I"), ("nlink", "I"), ("mode", "i"),
    ("uid", "q"), ("gid", "q"), ("username", "i"), ("groupname", "i"), ("atime", "i"),
    ("btime", "i"), ("ctime", "i"), ("mtime", "i"), ("size", "Q"), ("digest", "i"),
    ("chunk_start", "i"), ("chunk_count", "I"), ("target", "i"), ("major", "i"),
    ("minor", "i"), ("xattr_start", "i"), ("xattr_count", "I"), ("dirent_start", "I"),
    ("dirent_count", "I"),
)
_TABLE_FIELDS = (
    ("chunk_size", "Q"), ("chunk_digest", "I"), ("xattr_name", "I"), ("xattr_value", "I"),
    ("dirent_name", "I"), ("dirent_ino", "I"), ("time_seconds", "q"), ("time_nanos", "I"),
    ("string_ends", "Q"), ("strings", "B"), ("digests", "B"), ("counts", "Q"),
)
_FIELDS = _NODE_FIELDS + _TABLE_FIELDS
_TYPECODES = dict(_FIELDS)
_COUNTS = ("entries", "inodes", "directories", "files", "bytes", "blobs", "blob_bytes")
_HEAD = struct.Struct("<I")
_SECTION = struct.Struct("<B3xQ")


# ---------------------------------------------------------------------------------------
# Packing


class _Packer:
    """Collects the arrays for ``pack``, one whole column at a time (a comprehension per
    field costs a third of appending field by field); strings, digests and times are
    stored once each."""

    def __init__(self, nodes: list[Node]) -> None:
        self.strings: dict[str | bytes, int] = {}
        self.digests: dict[bytes, int] = {}
        self.times: dict[int, int] = {}
        self.columns: dict[str, array[int]] = {}
        self.extra: dict[str, list[int]] = {}
        self.nodes(nodes)
        self.tables()

    def put(self, name: str, values: Iterable[int]) -> None:
        self.columns[name] = array(_TYPECODES[name], values)

    def nodes(self, nodes: list[Node]) -> None:
        entries = [node.entry for node in nodes]
        string, digest, time = self.strings, self.digests, self.times
        self.put("kind", [_CODES[node.kind] for node in nodes])
        self.put("name", [_NONE, *(string.setdefault(node.path.rpartition("/")[2], len(string))
                                   for node in nodes[1:])])
        self.put("parent", [node.parent.ino for node in nodes])
        self.put("nlink", [node.nlink for node in nodes])
        for name in ("mode", "uid", "gid"):
            self.put(name, [_NONE if value is None else value
                            for value in map(attrgetter(name), entries)])
        for name in ("username", "groupname", "target"):
            self.put(name, [_NONE if text is None else string.setdefault(text, len(string))
                            for text in map(attrgetter(name), entries)])
        for name in ("atime", "btime", "ctime", "mtime"):
            self.put(name, [_NONE if ns is None else time.setdefault(ns, len(time))
                            for ns in map(attrgetter(name), entries)])
        self.put("size", [entry.size for entry in entries])
        self.put("digest", [_NONE if value is None else digest.setdefault(value, len(digest))
                            for value in map(attrgetter("digest"), entries)])
        rdevs = [entry.rdev or (_NONE, _NONE) for entry in entries]
        self.put("major", [rdev[0] for rdev in rdevs])
        self.put("minor", [rdev[1] for rdev in rdevs])
        self.ranges("chunk", [entry.chunks for entry in entries], self.chunk)
        self.ranges("xattr", [None if entry.xattrs is None else tuple(entry.xattrs.items())
                              for entry in entries], self.xattr)
        listings = [node.listing() if node.kind is Kind.DIRECTORY else () for node in nodes]
        self.ranges("dirent", listings, self.dirent, none=0)

    def ranges(self, prefix: str, groups: list[Any], add: Callable[[Any], None],
               none: int = _NONE) -> None:
        """``PREFIX_start``/``PREFIX_count`` per inode, and each group's items added."""
        starts, counts, total = [], [], 0
        for group in groups:
            if group is None:
                starts.append(none)
                counts.append(0)
                continue
            starts.append(total)
            counts.append(len(group))
            total += len(group)
            for item in group:
                add(item)
        self.put(f"{prefix}_start", starts)
        self.put(f"{prefix}_count", counts)

    def chunk(self, chunk: Chunk) -> None:
        self.extra.setdefault("chunk_size", []).append(chunk.size)
        self.extra.setdefault("chunk_digest", []).append(
            self.digests.setdefault(chunk.digest, len(self.digests)))

    def xattr(self, item: tuple[str, bytes]) -> None:
        self.extra.setdefault("xattr_name", []).append(self.strings.setdefault(item[0],
                                                                           len(self.strings)))
        self.extra.setdefault("xattr_value", []).append(self.strings.setdefault(item[1],
                                                                            len(self.strings)))

    def dirent(self, item: tuple[bytes, Node]) -> None:
        name = item[0].decode("utf-8", "surrogateescape")
        self.extra.setdefault("dirent_name", []).append(self.strings.setdefault(name,
                                                                            len(self.strings)))
        self.extra.setdefault("dirent_ino", []).append(item[1].ino)

    def tables(self) -> None:
        for name in ("chunk_size", "chunk_digest", "xattr_name", "xattr_value", "dirent_name",
                     "dirent_ino"):
            self.put(name, self.extra.get(name, []))
        seconds_nanos = [divmod(ns, _BILLION) for ns in self.times]
        self.put("time_seconds", [seconds for seconds, _ in seconds_nanos])
        self.put("time_nanos", [nanos for _, nanos in seconds_nanos])
        raw = [value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")
               for value in self.strings]
        self.put("string_ends", accumulate(map(len, raw)))
        self.columns["strings"] = array("B", b"".join(raw))
        self.columns["digests"] = array("B", b"".join(self.digests))


def pack(tree: Tree) -> bytes:
    """The whole tree as packed arrays (every node is made first, if it was lazy)."""
    packer = _Packer(list(tree.iter_nodes()))
    totals = tree.totals
    packer.put("counts", [getattr(totals, name) for name in _COUNTS])
    return serialize(packer.columns)


def serialize(columns_by_name: dict[str, array[int]]) -> bytes:
    """The payload of named columns (``pack``'s last step; ``unpack`` reads it back)."""
    columns = [columns_by_name[name] for name, _ in _FIELDS]
    out = bytearray(_HEAD.pack(len(columns)))
    for column in columns:
        out += _SECTION.pack(ord(column.typecode), len(column))
    _pad(out)
    for column in columns:
        out += column.tobytes()
        _pad(out)
    return bytes(out)


def _pad(out: bytearray) -> None:
    out += bytes(-len(out) % 8)


# ---------------------------------------------------------------------------------------
# Unpacking


def unpack(payload: bytes | memoryview, *, trusted: bool = False) -> Tree:
    """A lazy ``Tree`` from ``pack``'s bytes; ``FormatError`` (one line) if they are not a
    consistent packed tree. ``trusted``: the caller authenticated ``payload`` as the
    output of ``pack`` (``cache.index``), so only its framing is checked, not the bounds
    of every index (the bulk of an unpack's time); never pass it for bytes that could
    come from anywhere else."""
    columns = read_columns(memoryview(payload))
    if not trusted:
        _check(columns)
    return _Unpacked(columns).tree


def read_columns(view: memoryview) -> dict[str, array[int]]:
    """The named columns of a payload, unchecked (``unpack`` checks them)."""
    if len(view) < _HEAD.size:
        raise FormatError("index: truncated")
    (count,) = _HEAD.unpack_from(view)
    if count != len(_FIELDS):
        raise FormatError(f"index: {count} sections, expected {len(_FIELDS)}")
    pos = _HEAD.size
    sections = []
    for _name, code in _FIELDS:
        if pos + _SECTION.size > len(view):
            raise FormatError("index: truncated")
        typecode, items = _SECTION.unpack_from(view, pos)
        if typecode != ord(code):
            raise FormatError("index: a section has the wrong type")
        sections.append(items)
        pos += _SECTION.size
    pos += -pos % 8
    columns = {}
    for (name, code), items in zip(_FIELDS, sections, strict=True):
        column = array(code)
        end = pos + items * column.itemsize
        if end > len(view):
            raise FormatError("index: truncated")
        column.frombytes(view[pos:end])
        columns[name] = column
        pos = end + -end % 8
    if pos != len(view):
        raise FormatError(f"index: {len(view) - pos} bytes after the last section")
    return columns


def _check(c: dict[str, array[int]]) -> None:
    """Bounds of every index and value, whole arrays at a time; see the module doc."""
    inodes = len(c["kind"])
    strings = len(c["string_ends"])
    _require(inodes >= 1 and all(len(c[name]) == inodes for name, _ in _NODE_FIELDS),
             "per-inode arrays differ in length")
    _require(len(c["counts"]) == len(_COUNTS) and c["counts"][1] == inodes, "bad totals")
    _require(c["kind"][0] == _DIRECTORY and c["parent"][0] == ROOT_INO, "bad root")
    _require(not c["kind"].tobytes().translate(None, _NODE_KINDS), "bad kind")
    # Parents come before their children: walks up the tree always end at the root.
    _require(all(map(lt, c["parent"][1:], range(ROOT_INO + 1, inodes + ROOT_INO)))
             and min(c["parent"]) >= ROOT_INO, "a parent after its child")
    _require(c["name"][0] == _NONE and _within(c["name"][1:], 0, strings), "bad name")
    for name in ("username", "groupname", "target"):
        _require(_within(c[name], _NONE, strings), f"bad {name}")
    _require(_within(c["xattr_name"], 0, strings) and _within(c["xattr_value"], 0, strings),
             "bad xattr")
    _require(_within(c["dirent_name"], 0, strings), "bad directory entry name")
    _require(_within(c["dirent_ino"], ROOT_INO, inodes + ROOT_INO), "bad directory entry")
    _require(_within(c["string_ends"], 0, len(c["strings"]) + 1), "bad string table")
    digests, remainder = divmod(len(c["digests"]), HASH_SIZE)
    _require(remainder == 0 and _within(c["digest"], _NONE, digests)
             and _within(c["chunk_digest"], 0, digests), "bad digest")
    times = len(c["time_seconds"])
    _require(len(c["time_nanos"]) == times and _within(c["time_nanos"], 0, _BILLION)
             and _within(c["time_seconds"], MIN_TIME_NS // _BILLION, MAX_TIME_NS // _BILLION + 1),
             "bad time table")
    for name in ("atime", "btime", "ctime", "mtime"):
        _require(_within(c[name], _NONE, times), f"bad {name}")
    _require(_within(c["mode"], _NONE, 0o10000), "bad mode")
    _require(_within(c["uid"], _NONE, _MAX_ID + 1) and _within(c["gid"], _NONE, _MAX_ID + 1),
             "bad owner")
    _require(_within(c["major"], _NONE, MAX_DEVICE_MAJOR + 1)
             and _within(c["minor"], _NONE, MAX_DEVICE_MINOR + 1), "bad device")
    _require(len(c["chunk_digest"]) == len(c["chunk_size"]), "bad chunk table")
    _require(len(c["xattr_value"]) == len(c["xattr_name"]), "bad xattr table")
    _require(len(c["dirent_ino"]) == len(c["dirent_name"]), "bad directory table")
    _check_ranges(c["chunk_start"], c["chunk_count"], len(c["chunk_size"]), "chunk")
    _check_ranges(c["xattr_start"], c["xattr_count"], len(c["xattr_name"]), "xattr")
    _check_ranges(c["dirent_start"], c["dirent_count"], len(c["dirent_ino"]), "directory")


def _within(values: array[int], low: int, end: int) -> bool:
    """Every value in ``low <= v < end`` (an empty array passes)."""
    return not values or (min(values) >= low and max(values) < end)


def _check_ranges(starts: array[int], counts: array[int], size: int, what: str) -> None:
    """Every ``[start, start + count)`` lies within a table of ``size`` items (a start of
    -1 means none, with a count of 0)."""
    ends = array("q", map(add, starts, counts))
    _require(_within(starts, _NONE, size + 1) and _within(ends, _NONE, size + 1),
             f"bad {what} ranges")


def _require(condition: bool, problem: str) -> None:
    if not condition:
        raise FormatError(f"index: {problem}")


class _Unpacked:
    """Makes nodes from the checked arrays on first use; see ``Tree`` (``fill``)."""

    def __init__(self, columns: dict[str, array[int]]) -> None:
        self.c = columns
        self.lock = threading.Lock()
        counts = columns["counts"]
        self.nodes: list[Node | None] = [None] * len(columns["kind"])
        self.tree = Tree(
            self.nodes,
            entry_count=counts[0],
            fill=self.node,
            find=self.find,
            totals=TreeTotals(**dict(zip(_COUNTS, counts, strict=True))),
        )
        ends = columns["string_ends"]
        self.strings = columns["strings"].tobytes()
        self.starts = array("Q", [0]) + ends[:-1]
        self.ends = ends
        self.digests = columns["digests"].tobytes()

    def text(self, index: int) -> str:
        return self.raw(index).decode("utf-8", "surrogateescape")

    def raw(self, index: int) -> bytes:
        return self.strings[self.starts[index] : self.ends[index]]

    def node(self, ino: int) -> Node:
        """The node ``ino``, made (with any ancestor not made yet) and filed. Under a lock:
        the daemon's thread and a worker thread (``stats`` walks the whole tree) may both
        ask, and each inode must have exactly one node."""
        with self.lock:
            pending = []
            index = ino - ROOT_INO
            while self.nodes[index] is None:
                pending.append(index)
                if index == 0:
                    break
                index = self.c["parent"][index] - ROOT_INO
            for index in reversed(pending):
                self.nodes[index] = self.make(index)
            node = self.nodes[ino - ROOT_INO]
        assert node is not None
        return node

    def make(self, index: int) -> Node:
        c = self.c
        entry = self.entry(index)
        if index == 0:
            node = Node(ROOT_INO, entry, "/", None)
        else:
            parent = self.nodes[c["parent"][index] - ROOT_INO]
            assert parent is not None  # made first by ``node``
            path = join_path(parent.path, self.text(c["name"][index]))
            node = Node(index + ROOT_INO, entry, path, parent)
        node.nlink = c["nlink"][index]
        if c["kind"][index] == _DIRECTORY:
            node.unfold = self.children
        return node

    def children(self, directory: Node) -> dict[str, Node]:
        c, get = self.c, self.tree.get
        start = c["dirent_start"][directory.ino - ROOT_INO]
        end = start + c["dirent_count"][directory.ino - ROOT_INO]
        found: dict[str, Node] = {}
        for name, ino in zip(c["dirent_name"][start:end], c["dirent_ino"][start:end], strict=True):
            child = get(ino)
            assert child is not None  # checked: within the table
            found[self.text(name)] = child
        return found

    def find(self, directory: Node, name: str) -> Node | None:
        """The child ``name`` of ``directory``, by binary search in its entries (sorted
        by encoded name, as ``pack`` wrote them), making no other node; None if absent."""
        try:
            key = name.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            return None
        c = self.c
        names = c["dirent_name"]
        low = c["dirent_start"][directory.ino - ROOT_INO]
        end = high = low + c["dirent_count"][directory.ino - ROOT_INO]
        while low < high:
            middle = (low + high) // 2
            if self.raw(names[middle]) < key:
                low = middle + 1
            else:
                high = middle
        if low == end or self.raw(names[low]) != key:
            return None
        return self.tree.get(c["dirent_ino"][low])

    def entry(self, index: int) -> Entry:
        c = self.c
        kind = _KINDS[c["kind"][index]]
        rdev = None if c["major"][index] == _NONE else (c["major"][index], c["minor"][index])
        return Entry(
            kind,
            mode=_optional(c["mode"][index]),
            uid=_optional(c["uid"][index]),
            gid=_optional(c["gid"][index]),
            username=self.optional_text(c["username"][index]),
            groupname=self.optional_text(c["groupname"][index]),
            atime=self.time(c["atime"][index]),
            btime=self.time(c["btime"][index]),
            ctime=self.time(c["ctime"][index]),
            mtime=self.time(c["mtime"][index]),
            size=c["size"][index],
            digest=self.digest(c["digest"][index]),
            chunks=self.chunks(index),
            target=self.optional_text(c["target"][index]),
            rdev=rdev,
            xattrs=self.xattrs(index),
        )

    def optional_text(self, index: int) -> str | None:
        return None if index == _NONE else self.text(index)

    def time(self, index: int) -> int | None:
        if index == _NONE:
            return None
        return self.c["time_seconds"][index] * _BILLION + self.c["time_nanos"][index]

    def digest(self, index: int) -> bytes | None:
        if index == _NONE:
            return None
        return self.digests[index * HASH_SIZE : (index + 1) * HASH_SIZE]

    def chunks(self, index: int) -> tuple[Chunk, ...] | None:
        start = self.c["chunk_start"][index]
        if start == _NONE:
            return None
        end = start + self.c["chunk_count"][index]
        sizes, digests = self.c["chunk_size"][start:end], self.c["chunk_digest"][start:end]
        return tuple(Chunk(size, self.digests[d * HASH_SIZE : (d + 1) * HASH_SIZE])
                     for size, d in zip(sizes, digests, strict=True))

    def xattrs(self, index: int) -> dict[str, bytes] | None:
        start = self.c["xattr_start"][index]
        if start == _NONE:
            return None
        end = start + self.c["xattr_count"][index]
        names, values = self.c["xattr_name"][start:end], self.c["xattr_value"][start:end]
        return {self.text(name): self.raw(value) for name, value in zip(names, values, strict=True)}


def _optional(value: int) -> int | None:
    return None if value == _NONE else value

