"""An EROFS image of a tree's metadata, for the kernel to serve instead of FUSE.

``metadata_image(tree)`` writes a Linux EROFS file system (4 KiB blocks, extended
inodes, no compression) holding every directory, symlink, device node and FIFO of the
tree, and every regular file with its real size but no data: a file's content is one
hole (a chunk-based inode whose only chunk is ``EROFS_NULL_ADDR``), and the file carries
overlayfs's ``trusted.overlay.metacopy`` and ``trusted.overlay.redirect`` xattrs naming
its canonical path. Stacked by ``mount.stacking`` as the metadata layer of a read-only
overlay whose data-only layer is the FUSE mount of the same tree, the kernel answers
``lookup``, ``stat``, ``readdir``, ``readlink`` and ``getxattr`` from this image, and
only a file's content is read through FUSE (found by the redirect). Empty files need
no data layer and carry no overlay xattrs.

Layout: the superblock at byte 1024 of block 0; then the inodes, from byte 4096 (nid
128), in depth-first order of sorted names, each 32-byte aligned: the 64-byte inode,
its inline xattrs, then the chunk map (files) or the inline tail (a directory's last
block, a symlink's target) when that fits in the rest of the inode's block; then the
data blocks of directories and symlinks whose tail is not inline. The first 1024 bytes
are not read by the kernel; ``boot`` fills them (the host's index authenticates the
image there).

Pure: no I/O. Raises ``Unrepresentable`` for what EROFS or overlayfs cannot hold (an
xattr outside the ``user.``/``trusted.``/``security.``/POSIX ACL namespaces, one of
overlayfs's own, a value over 64 KiB − 1, a file over 8 TiB); the mount then serves
everything through FUSE.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from ocixfs.errors import FormatError
from ocixfs.image.format import Kind

if TYPE_CHECKING:
    from ocixfs.image.tree import Node, Tree

__all__ = ["BLOCK_SIZE", "BOOT_SIZE", "Unrepresentable", "metadata_image"]

BLOCK_BITS = 12
BLOCK_SIZE = 1 << BLOCK_BITS
BOOT_SIZE = 1024
"""Bytes at the start of the image the kernel never reads."""

_MAGIC = 0xE0F5E1E2
_FEATURE_INCOMPAT_CHUNKED_FILE = 0x4
_SUPER = struct.Struct("<IIIBBHQQIIII16s16sIHHHBBIQB23x")
_INODE = struct.Struct("<HHHHQIIIIqII16x")  # erofs_inode_extended
_DIRENT = struct.Struct("<QHBx")
_XATTR_HEADER = b"\0" * 12  # erofs_xattr_ibody_header: no name filter, no shared xattrs
_XATTR_ENTRY = struct.Struct("<BBH")
_INODE_SIZE = _INODE.size
_NID_SHIFT = 5
_FIRST_INODE = BLOCK_SIZE  # meta_blkaddr 0: nid = byte offset / 32
_NULL_ADDR = b"\xff\xff\xff\xff"

_FLAT_PLAIN = 0
_FLAT_INLINE = 2
_CHUNK_BASED = 4
_EXTENDED = 1
_MAX_CHUNK_FORMAT = 31  # chunk size = block << format: up to 8 TiB

# xattr name prefix -> EROFS name index; the POSIX ACLs are whole names
_XATTR_PREFIXES = (("user.", 1), ("trusted.", 4), ("security.", 6))
_XATTR_WHOLE = {"system.posix_acl_access": 2, "system.posix_acl_default": 3}
_OVERLAY_PREFIXES = ("trusted.overlay.", "user.overlay.")

_FILE_TYPES = {
    Kind.REGULAR: 1, Kind.DIRECTORY: 2, Kind.CHARACTER: 3, Kind.BLOCK: 4, Kind.FIFO: 5,
    Kind.SYMLINK: 7,
}


class Unrepresentable(FormatError):
    """The tree holds something an EROFS metadata image cannot (module doc)."""


def metadata_image(tree: Tree, *, uid_shift: int = 0, gid_shift: int = 0,
                   boot: bytes = b"") -> bytearray:
    """The EROFS image of ``tree`` (module doc), owners shifted by ``uid_shift`` and
    groups by ``gid_shift``, its first bytes ``boot`` (at most ``BOOT_SIZE``)."""
    if len(boot) > BOOT_SIZE:
        raise ValueError("boot area too large")
    return _Writer(tree, uid_shift, gid_shift).write(boot)


class _Record:
    """One inode's place and bytes, decided in the first pass."""

    __slots__ = ("node", "nid", "xattrs", "layout", "tail", "blocks", "block_count",
                 "block_addr", "size", "listing")

    def __init__(self, node: Node) -> None:
        self.node = node
        self.nid = 0
        self.xattrs = b""
        self.layout = _FLAT_PLAIN
        self.tail = b""
        self.blocks: list[bytes] = []
        self.block_count = 0
        self.block_addr = 0
        self.size = 0
        self.listing: list[list[tuple[bytes, Node]]] = []


class _Writer:
    def __init__(self, tree: Tree, uid_shift: int, gid_shift: int) -> None:
        self._tree = tree
        self._uid_shift = uid_shift
        self._gid_shift = gid_shift
        self._records: dict[int, _Record] = {}  # by inode, in depth-first order

    def write(self, boot: bytes) -> bytearray:
        root = self._tree.root
        for node in _depth_first(root):
            if node.ino not in self._records:
                self._records[node.ino] = _Record(node)
        end = self._place_inodes()
        data_start = _round_up(end, BLOCK_SIZE) // BLOCK_SIZE
        block = data_start
        for record in self._records.values():
            if record.block_count:
                record.block_addr = block
                block += record.block_count
        image = bytearray(block * BLOCK_SIZE)
        image[:len(boot)] = boot
        for record in self._records.values():
            self._write_inode(image, record)
        self._write_super(image, root_nid=self._records[root.ino].nid, blocks=block)
        return image

    # ---- first pass: sizes and places ----------------------------------------------

    def _place_inodes(self) -> int:
        position = _FIRST_INODE
        for record in self._records.values():
            node = record.node
            record.xattrs = _xattr_body(node)
            inline = self._prepare_content(record)
            fixed = _INODE_SIZE + len(record.xattrs)
            offset = position % BLOCK_SIZE
            if inline is not None and offset + fixed + len(inline) > BLOCK_SIZE:
                if fixed + len(inline) <= BLOCK_SIZE:
                    position = _round_up(position, BLOCK_SIZE)
                else:
                    inline = None
            self._settle_content(record, inline)
            record.nid = position >> _NID_SHIFT
            position = _round_up(position + fixed + len(record.tail), 32)
        return position

    def _prepare_content(self, record: _Record) -> bytes | None:
        """The content a record could keep inline (None: none), its size set."""
        node = record.node
        kind = node.kind
        if kind is Kind.DIRECTORY:
            record.listing = _dirent_blocks(node)
            last = _block_length(record.listing[-1])
            record.size = (len(record.listing) - 1) * BLOCK_SIZE + last
            return None if last == BLOCK_SIZE else b"\0" * last
        if kind is Kind.SYMLINK:
            target = node.link_target
            record.size = len(target)
            return target
        if kind is Kind.REGULAR:
            record.size = node.size
            if node.size > BLOCK_SIZE << _MAX_CHUNK_FORMAT:
                raise Unrepresentable(f"{node.path}: {node.size} bytes, over EROFS's 8 TiB")
            if node.size:
                record.layout = _CHUNK_BASED
        return None

    def _settle_content(self, record: _Record, inline: bytes | None) -> None:
        """Decide inline or plain for a record's content (``inline`` None: plain)."""
        kind = record.node.kind
        if kind is Kind.REGULAR:
            if record.layout == _CHUNK_BASED:
                record.tail = _NULL_ADDR
            return
        if kind is Kind.DIRECTORY:
            record.layout = _FLAT_INLINE if inline is not None else _FLAT_PLAIN
            record.tail = inline or b""  # zeros of the right length, filled in the second pass
            record.block_count = len(record.listing) - (inline is not None)
            return
        if kind is Kind.SYMLINK:
            if inline is not None:
                record.layout, record.tail = _FLAT_INLINE, inline
            else:
                record.blocks, record.block_count = [record.node.link_target], 1
            return

    # ---- second pass: bytes ----------------------------------------------------------

    def _write_inode(self, image: bytearray, record: _Record) -> None:
        node = record.node
        kind = node.kind
        if kind is Kind.DIRECTORY:
            blocks = [self._dir_block(names, last=index == len(record.listing) - 1)
                      for index, names in enumerate(record.listing)]
            if record.layout == _FLAT_INLINE:
                record.tail = blocks.pop()
            record.blocks = blocks
        if kind is Kind.REGULAR and record.layout == _CHUNK_BASED:
            i_u = max(0, (node.size - 1).bit_length() - BLOCK_BITS)  # one chunk: the file
        elif kind in (Kind.CHARACTER, Kind.BLOCK):
            i_u = _encode_dev(node.entry.rdev or (0, 0))
        else:
            i_u = record.block_addr
        xattr_count = 0 if not record.xattrs else (len(record.xattrs) - 12) // 4 + 1
        mtime_ns = node.mtime_ns
        offset = record.nid << _NID_SHIFT
        _INODE.pack_into(
            image, offset, _EXTENDED | record.layout << 1, xattr_count, node.mode, 0,
            record.size, i_u, node.ino, node.uid + self._uid_shift,
            node.gid + self._gid_shift, mtime_ns // 1_000_000_000, mtime_ns % 1_000_000_000,
            node.nlink)
        offset += _INODE_SIZE
        image[offset:offset + len(record.xattrs)] = record.xattrs
        offset += len(record.xattrs)
        image[offset:offset + len(record.tail)] = record.tail
        address = record.block_addr * BLOCK_SIZE
        for data in record.blocks:
            image[address:address + len(data)] = data
            address += BLOCK_SIZE

    def _dir_block(self, names: list[tuple[bytes, Node]], *, last: bool) -> bytes:
        """One directory block: the dirents, then the names (the last block trimmed)."""
        header = bytearray()
        name_offset = _DIRENT.size * len(names)
        for name, node in names:
            header += _DIRENT.pack(self._records[node.ino].nid, name_offset,
                                   _FILE_TYPES[node.kind])
            name_offset += len(name)
        data = bytes(header) + b"".join(name for name, _ in names)
        return data if last else data.ljust(BLOCK_SIZE, b"\0")

    def _write_super(self, image: bytearray, *, root_nid: int, blocks: int) -> None:
        if root_nid > 0xFFFF:
            raise Unrepresentable("root inode beyond EROFS's 16-bit root nid")
        _SUPER.pack_into(
            image, BOOT_SIZE, _MAGIC, 0, 0, BLOCK_BITS, 0, root_nid, len(self._records), 0, 0,
            blocks, 0, 0, b"\0" * 16, b"ocixfs".ljust(16, b"\0"),
            _FEATURE_INCOMPAT_CHUNKED_FILE, 0, 0, 0, 0, 0, 0, 0, 0)


def _depth_first(root: Node) -> Iterator[Node]:
    """Every node reachable from ``root``, parents before children, names sorted."""
    stack = [root]
    while stack:
        node = stack.pop()
        yield node
        if node.kind is Kind.DIRECTORY:
            stack.extend(child for _, child in reversed(node.listing()))


def _dirent_blocks(directory: Node) -> list[list[tuple[bytes, Node]]]:
    """A directory's ``(name, node)`` pairs, ``.`` and ``..`` included, sorted bytewise and
    split into blocks of at most ``BLOCK_SIZE`` bytes of dirents and names."""
    entries = sorted([(b".", directory), (b"..", directory.parent), *directory.listing()],
                     key=lambda item: item[0])
    blocks: list[list[tuple[bytes, Node]]] = [[]]
    used = 0
    for name, node in entries:
        need = _DIRENT.size + len(name)
        if used + need > BLOCK_SIZE:
            blocks.append([])
            used = 0
        blocks[-1].append((name, node))
        used += need
    return blocks


def _block_length(names: list[tuple[bytes, Node]]) -> int:
    return sum(_DIRENT.size + len(name) for name, _ in names)


def _xattr_body(node: Node) -> bytes:
    """A node's inline xattrs (header and entries), or empty when it has none."""
    entries = [_xattr_entry(name, value) for name, value in _image_xattrs(node.xattrs)]
    if node.kind is Kind.REGULAR and node.size:
        entries.append(_xattr_entry("trusted.overlay.metacopy", b""))
        entries.append(_xattr_entry("trusted.overlay.redirect",
                                    node.path.encode("utf-8", "surrogateescape")))
    if not entries:
        return b""
    return _XATTR_HEADER + b"".join(_pad4(entry) for entry in entries)


def _image_xattrs(xattrs: Mapping[str, bytes]) -> list[tuple[str, bytes]]:
    """The manifest's xattrs, sorted by name; overlayfs's own cannot be among them."""
    for name in xattrs:
        if name.startswith(_OVERLAY_PREFIXES):
            raise Unrepresentable(f"xattr {name!r} is overlayfs's own")
    return sorted(xattrs.items())


def _xattr_entry(name: str, value: bytes) -> bytes:
    index = _XATTR_WHOLE.get(name)
    suffix = b""
    if index is None:
        for prefix, prefix_index in _XATTR_PREFIXES:
            if name.startswith(prefix):
                index, suffix = prefix_index, name[len(prefix):].encode("utf-8",
                                                                       "surrogateescape")
                break
        else:
            raise Unrepresentable(f"xattr {name!r}: a namespace EROFS does not hold")
    if len(suffix) > 255 or len(value) > 0xFFFF:
        raise Unrepresentable(f"xattr {name!r}: name or value too long for EROFS")
    return _XATTR_ENTRY.pack(len(suffix), index, len(value)) + suffix + value


def _pad4(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def _encode_dev(rdev: tuple[int, int]) -> int:
    """Linux's ``new_encode_dev`` of ``(major, minor)``."""
    major, minor = rdev
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)

