"""Making profile packs (``ocixfs profile pack``): the blobs a profile's start-up reads,
from a local store, written back into it as one pack set (``store.pack``) that a mount
playing the same profile on the same image fetches with one GET per part.

The set holds ``mount.prefetch.plan(tree, profile)`` (the profile's files, in access
order, each blob once). Each entry is stored compressed at ``PACK_ZSTD_LEVEL`` (or as
the blob's ``.zst`` sibling when the store has a smaller one) when that helps, else as it
is; every blob is read from the store and checked against its hash first (a damaged or
missing one is an error: a pack never carries bytes that do not verify). Parts are written with
``store.writer.store_file`` (atomic), part 0, which names the others, last. The entries
are held in memory while the parts are written: a start-up's working set, not an image.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import blake3
import zstandard

from ocixfs.config import PACK_ZSTD_LEVEL
from ocixfs.errors import StoreError, UsageError
from ocixfs.image.format import Chunk
from ocixfs.image.loading import open_regular
from ocixfs.image.tree import Tree
from ocixfs.mount.prefetch import plan
from ocixfs.mount.profile import Profile
from ocixfs.store.layout import blob_path, pack_name
from ocixfs.store.pack import (
    MAX_PARTS,
    Encoding,
    PackEntry,
    PackHeader,
    deal,
    encode_header,
    pack_set_id,
)
from ocixfs.store.writer import store_file

__all__ = ["PackSet", "describe", "make_packs"]


@dataclass(frozen=True, slots=True)
class PackPart:
    name: str
    blobs: int
    bytes: int


@dataclass(frozen=True, slots=True)
class PackSet:
    """What ``make_packs`` wrote: the set's name (hex), the blobs and their content bytes,
    each part (its name in the store, its blobs, its size), and the plan it holds (the
    blobs the set is named by, in order: what a profile that names the set lists)."""

    set_id: str
    blobs: int
    content_bytes: int
    parts: tuple[PackPart, ...]
    plan: tuple[Chunk, ...]

    def named_by(self, profile: Profile) -> Profile:
        """``profile`` naming this set (its ``pack``), so that a mount can ask for the set
        before its manifest arrives."""
        return replace(profile, pack=self.plan)

    def as_dict(self) -> dict[str, Any]:
        return {
            "set_id": self.set_id,
            "blobs": self.blobs,
            "content_bytes": self.content_bytes,
            "pack_bytes": sum(part.bytes for part in self.parts),
            "parts": [{"name": p.name, "blobs": p.blobs, "bytes": p.bytes} for p in self.parts],
        }


def make_packs(tree: Tree, profile: Profile, store: Path, *, parts: int = 1,
               level: int = PACK_ZSTD_LEVEL) -> PackSet:
    """Write the pack set of ``profile`` played on ``tree`` into the local store ``store``,
    in at most ``parts`` parts, each blob compressed at zstd ``level`` (in worker threads,
    one per CPU) unless the store's ``.zst`` is smaller. Raises ``UsageError`` (nothing to
    pack, bad ``parts`` or ``level``) or ``StoreError`` (a blob missing or damaged in the
    store, a failed write)."""
    if not 1 <= parts <= MAX_PARTS:
        raise UsageError(f"--parts must be between 1 and {MAX_PARTS}")
    if not 1 <= level <= zstandard.MAX_COMPRESSION_LEVEL:
        raise UsageError(f"--zstd-level must be between 1 and {zstandard.MAX_COMPRESSION_LEVEL}")
    chunks = plan(tree, profile, fill_rest=False)
    if not chunks:
        raise UsageError("the profile names no regular file of the image: nothing to pack")
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        bodies = list(pool.map(partial(_stored, store, level=level), chunks))
    dealt = deal([len(body) for body, _ in bodies], parts)
    count = max(dealt) + 1
    set_id = pack_set_id(chunks)
    entries = tuple(PackEntry(chunk.digest, len(body), encoding, part)
                    for chunk, (body, encoding), part in zip(chunks, bodies, dealt, strict=True))
    written = []
    for part in reversed(range(count)):  # part 0 names the others: it goes last
        own = [index for index, dealt_to in enumerate(dealt) if dealt_to == part]
        listed = entries if part == 0 else tuple(entries[index] for index in own)
        header = encode_header(PackHeader(set_id, part, count, listed))
        name = pack_name(set_id, part)
        size = store_file(store, name, [header, *(bodies[index][0] for index in own)])
        written.append(PackPart(name, len(own), size))
    return PackSet(set_id.hex(), len(chunks), sum(chunk.size for chunk in chunks),
                   tuple(reversed(written)), tuple(chunks))


def _stored(store: Path, chunk: Chunk, *, level: int) -> tuple[bytes, Encoding]:
    """The bytes an entry stores for ``chunk``, and how: the smallest of the blob, its
    ``.zst`` in the store, and the blob compressed at ``level``; checked against its
    hash."""
    plain = _read_blob(store, chunk, zstd=False)
    if plain is None:
        raise StoreError(f"{store}: blob {chunk.hex} is not in the store")
    if len(plain) != chunk.size or blake3.blake3(plain).digest() != chunk.digest:
        raise StoreError(f"{store}: blob {chunk.hex} is damaged (its content does not match "
                         "its name)")
    packed = zstandard.ZstdCompressor(level=level).compress(plain)
    stored = _read_blob(store, chunk, zstd=True)
    if stored is not None and len(stored) < len(packed) and _unpacks_to(stored, plain):
        packed = stored
    if len(packed) < len(plain):
        return packed, Encoding.ZSTD
    return plain, Encoding.NONE


def _read_blob(store: Path, chunk: Chunk, *, zstd: bool) -> bytes | None:
    path = blob_path(store, chunk.digest, zstd=zstd)
    try:
        with open_regular(path) as file:
            return file.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreError(f"{path}: {exc.strerror}") from None


def _unpacks_to(packed: bytes, plain: bytes) -> bool:
    """Whether ``packed`` is one zstd frame of exactly ``plain``."""
    try:
        decompressor = zstandard.ZstdDecompressor()
        return decompressor.decompress(packed, max_output_size=len(plain) + 1) == plain
    except zstandard.ZstdError:
        return False


def describe(packed: PackSet, store: Path) -> str:
    """A few lines for a person: the set, its parts and their sizes."""
    from ocixfs.progress import format_bytes

    total = sum(part.bytes for part in packed.parts)
    lines = [f"pack set {packed.set_id}: {packed.blobs} blobs, "
             f"{format_bytes(packed.content_bytes)} of content in {format_bytes(total)}"]
    lines += [f"  {os.path.join(store, part.name)}  {part.blobs} blobs, "
              f"{format_bytes(part.bytes)}" for part in packed.parts]
    return "\n".join(lines)
