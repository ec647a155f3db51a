"""Profile packs: the blobs a profiled start-up needs, in its access order, as one or a few
files of the store, each fetched with one plain GET.

A *pack set* is named by what it holds: ``pack_set_id(chunks)`` hashes the blob digests
of a prefetch plan (``mount.prefetch.plan`` of an image and a profile, without the rest of
the image), so a mount that plays the same profile on the same image computes the same
name, and any other combination finds no pack. The set is split into ``n`` parts,
``layout.pack_name(set_id, k)`` for k in 0..n-1; each is::

    header   48 bytes   magic "OCIXPACK", version (u8, 1), part k (u8), parts n (u8),
                        0 (u8), set id (32 bytes), entry count E (u32, big-endian)
    table    E x 42     digest (32 bytes), stored length (u64, big-endian),
                        encoding (u8: 0 = the blob's bytes, 1 = one zstd frame of them),
                        part (u8)
    bodies              the stored bytes of the entries of part k, in table order

Part 0's table lists every entry of the set (so a reader knows, from one header, every
blob the set brings and how many parts to ask for); part k > 0 lists its own entries,
which must be exactly those part 0 gives it. Entries are in the plan's order (first
needed, first sent), dealt to the parts so that each part stays in that order (``deal``).
Nothing in a pack is trusted: a reader checks each header against the plan it expected
(``check_first_header``, ``check_part_header``), and every entry is verified by its own
BLAKE3 hash before a byte of it is used. A pack is never kept whole anywhere: its entries
become ordinary blobs of the cache. A writer publishes part 0 last.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import blake3

from ocixfs.errors import FormatError
from ocixfs.image.format import Chunk

__all__ = [
    "ENTRY",
    "HEADER",
    "MAX_PARTS",
    "PACK_MAGIC",
    "PACK_VERSION",
    "Encoding",
    "PackEntry",
    "PackHeader",
    "check_first_header",
    "check_part_header",
    "deal",
    "encode_header",
    "pack_set_id",
    "parse_entries",
    "parse_header",
    "stored_bound",
]

PACK_MAGIC = b"OCIXPACK"
PACK_VERSION = 1
MAX_PARTS = 64
HEADER = struct.Struct(">8sBBBB32sI")
ENTRY = struct.Struct(">32sQBB")
_SET_DOMAIN = b"ocixfs pack set 1\0"


class Encoding(enum.IntEnum):
    """How an entry's bytes are stored in the pack."""

    NONE = 0
    ZSTD = 1


@dataclass(frozen=True, slots=True)
class PackEntry:
    digest: bytes
    stored: int
    encoding: Encoding
    part: int


@dataclass(frozen=True, slots=True)
class PackHeader:
    """One part's header: which set it belongs to, its number, how many parts the set has,
    and the entries whose bodies follow."""

    set_id: bytes
    part: int
    parts: int
    entries: tuple[PackEntry, ...]


def pack_set_id(chunks: Sequence[Chunk]) -> bytes:
    """The name of the pack set holding ``chunks``, in this order (32 bytes)."""
    hasher = blake3.blake3(_SET_DOMAIN)
    for chunk in chunks:
        hasher.update(chunk.digest)
    return hasher.digest()


def stored_bound(size: int, encoding: Encoding) -> int:
    """The most bytes an entry of a ``size``-byte blob may take in a pack."""
    if encoding is Encoding.NONE:
        return size
    return size + size // 128 + 64 * 1024  # more than zstd needs for incompressible data


def deal(stored_sizes: Sequence[int], parts: int) -> list[int]:
    """The part of each entry: in order, each goes to the part with the fewest stored bytes
    so far (the lowest number on a tie), so every part holds early entries first and all
    parts, fetched at once, deliver in about the plan's order."""
    loads = [0] * max(1, min(parts, MAX_PARTS))
    assigned = []
    for size in stored_sizes:
        part = loads.index(min(loads))
        loads[part] += size
        assigned.append(part)
    return assigned


def encode_header(header: PackHeader) -> bytes:
    """The header and entry table of one part."""
    fixed = HEADER.pack(PACK_MAGIC, PACK_VERSION, header.part, header.parts, 0, header.set_id,
                        len(header.entries))
    table = b"".join(ENTRY.pack(e.digest, e.stored, e.encoding, e.part)
                     for e in header.entries)
    return fixed + table


def parse_header(data: bytes, where: str) -> tuple[bytes, int, int, int]:
    """``(set id, part, parts, entry count)`` from the first ``HEADER.size`` bytes of a
    part. Raises ``FormatError`` naming ``where``."""
    if len(data) != HEADER.size:
        raise FormatError(f"{where}: ends inside its header")
    magic, version, part, parts, reserved, set_id, count = HEADER.unpack(data)
    if magic != PACK_MAGIC:
        raise FormatError(f"{where}: not an ocixfs pack")
    if version != PACK_VERSION or reserved:
        raise FormatError(f"{where}: pack version {version} (this ocixfs reads {PACK_VERSION})")
    if not 0 <= part < parts <= MAX_PARTS:
        raise FormatError(f"{where}: part {part} of {parts}")
    return set_id, part, parts, count


def parse_entries(data: bytes, count: int, where: str) -> tuple[PackEntry, ...]:
    """The entry table (``count * ENTRY.size`` bytes). Raises ``FormatError``."""
    if len(data) != count * ENTRY.size:
        raise FormatError(f"{where}: ends inside its entry table")
    entries = []
    for digest, stored, encoding, part in ENTRY.iter_unpack(data):
        if encoding not in Encoding._value2member_map_:
            raise FormatError(f"{where}: unknown entry encoding {encoding}")
        entries.append(PackEntry(digest, stored, Encoding(encoding), part))
    return tuple(entries)


def check_first_header(header: PackHeader, expected: bytes,
                       planned: Mapping[bytes, Chunk], where: str) -> None:
    """Refuse (``FormatError``) a part 0 that is not of the set ``expected``, or whose
    entries are not blobs of the plan ``planned`` (digest → chunk), each once, stored
    within their bounds, in existing parts."""
    if header.set_id != expected or header.part != 0:
        raise FormatError(f"{where}: holds part {header.part} of another pack set")
    seen: set[bytes] = set()
    for entry in header.entries:
        chunk = planned.get(entry.digest)
        if chunk is None or entry.digest in seen:
            raise FormatError(f"{where}: names a blob the profile does not, or one twice")
        if entry.stored > stored_bound(chunk.size, entry.encoding):
            raise FormatError(f"{where}: blob {chunk.hex} stored in {entry.stored} bytes")
        if entry.part >= header.parts:
            raise FormatError(f"{where}: blob {chunk.hex} in part {entry.part} of "
                              f"{header.parts}")
        seen.add(entry.digest)


def check_part_header(header: PackHeader, first: PackHeader, part: int, where: str) -> None:
    """Refuse (``FormatError``) a part ``part`` > 0 that does not hold exactly the entries
    part 0 (``first``, already checked) gives it."""
    if (header.set_id, header.part, header.parts) != (first.set_id, part, first.parts):
        raise FormatError(f"{where}: holds part {header.part} of another pack set")
    if header.entries != tuple(e for e in first.entries if e.part == part):
        raise FormatError(f"{where}: its entries are not those part 0 lists for it")
