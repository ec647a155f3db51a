"""Comparing images: what changed between two, and what a set of images shares.

Pure functions over decoded manifests (no network); only ``oci_layers`` and
``compressed_sizes`` read local files.

``diff_images(old, new)`` compares every path of two trees (implicit directories and
hardlink names included; a hardlink name is compared as the file it names) and reports
paths added, removed and changed. A change names what differs: ``type``, ``content``
(the whole-file hash), ``target`` (symlinks), ``device``, ``mode``, ``owner``,
``xattrs``, and ``mtime`` only when asked (rebuilt images churn times). It also counts
what a host that has OLD must fetch to run NEW: NEW's distinct blobs that OLD does not
reference, chunk by chunk, so a big file with one changed chunk costs that chunk.

``share_table(names, manifests)`` answers "what would I download and store for these variants":
per image its distinct blob bytes and the bytes unique to it (blobs no other image in the
set references), and over the set the bytes shared by all, the distinct bytes (what a host
holding all of them fetches and stores with OCIX) and the sum of the images' own sizes.
The same columns come for zstd sizes when a store with ``.zst`` siblings is given
(``compressed_sizes``), and for OCI layers (distinct compressed layer blobs, deduplicated
by digest) when each image's OCI source is given (``oci_layers``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ocixfs.errors import BuildError, StoreError, UsageError
from ocixfs.image.format import Kind, Manifest
from ocixfs.image.tree import Node, Tree
from ocixfs.store.layout import BLOB_DIR, ZSTD_SUFFIX, blob_path

if TYPE_CHECKING:
    from ocixfs.build.inputs import Layer

__all__ = [
    "CHANGE_KINDS",
    "Change",
    "ImageDiff",
    "Measure",
    "ShareTable",
    "blob_sizes",
    "compressed_sizes",
    "diff_images",
    "has_compressed_blobs",
    "iter_paths",
    "oci_layers",
    "share_table",
]

K = TypeVar("K")

CHANGE_KINDS = ("type", "content", "target", "device", "mode", "owner", "xattrs", "mtime")


def iter_paths(tree: Tree) -> Iterator[tuple[str, Node]]:
    """Every ``(path, node)`` of a tree, hardlink names and implicit directories included,
    each directory before what it contains."""
    yield "/", tree.root
    stack = [tree.root]
    while stack:
        directory = stack.pop()
        prefix = "" if directory.path == "/" else directory.path
        for name, child in (directory.children or {}).items():
            yield f"{prefix}/{name}", child
            if child.children is not None:
                stack.append(child)


def blob_sizes(tree: Tree) -> dict[bytes, int]:
    """The distinct blobs an image references: digest → size."""
    return {chunk.digest: chunk.size for node in tree.iter_files() for chunk in node.blobs}


# ---- diff ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Change:
    """One path: ``status`` is ``A`` (added), ``D`` (removed) or ``M`` (changed, ``what``
    lists the ``CHANGE_KINDS`` that differ). Sizes are content bytes (``None`` where the
    path does not exist or is not a regular file)."""

    status: str
    path: str
    kind: Kind
    what: tuple[str, ...] = ()
    old_size: int | None = None
    new_size: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "path": self.path, "kind": self.kind.value,
                "what": list(self.what), "old_size": self.old_size, "new_size": self.new_size}


@dataclass(frozen=True, slots=True, kw_only=True)
class ImageDiff:
    """The differences between two trees, each list sorted by path, and the fetch cost."""

    added: list[Change]
    removed: list[Change]
    changed: list[Change]
    old_blobs: int
    old_blob_bytes: int
    new_blobs: int
    new_blob_bytes: int
    fetch_blobs: int
    """NEW's distinct blobs that OLD does not reference."""
    fetch_bytes: int
    """Their total size: what a host holding OLD downloads (before compression) for NEW."""

    def changes(self) -> list[Change]:
        """All changes in one list, sorted by path."""
        return sorted([*self.added, *self.removed, *self.changed], key=lambda c: _path_key(c.path))

    def to_json(self) -> dict[str, Any]:
        return {
            "added": [c.to_json() for c in self.added],
            "removed": [c.to_json() for c in self.removed],
            "changed": [c.to_json() for c in self.changed],
            "old": {"blobs": self.old_blobs, "blob_bytes": self.old_blob_bytes},
            "new": {"blobs": self.new_blobs, "blob_bytes": self.new_blob_bytes},
            "fetch": {"blobs": self.fetch_blobs, "bytes": self.fetch_bytes},
        }


def diff_images(old: Manifest, new: Manifest, *, times: bool = False) -> ImageDiff:
    """Compare two images path by path; ``times`` also reports mtime-only changes."""
    old_tree, new_tree = Tree.from_manifest(old), Tree.from_manifest(new)
    old_paths, new_paths = dict(iter_paths(old_tree)), dict(iter_paths(new_tree))
    added, removed, changed = [], [], []
    for path, node in new_paths.items():
        before = old_paths.get(path)
        if before is None:
            added.append(Change("A", path, node.kind, new_size=_size(node)))
            continue
        what = _differences(before, node, times=times)
        if what:
            changed.append(Change("M", path, node.kind, what, _size(before), _size(node)))
    for path, node in old_paths.items():
        if path not in new_paths:
            removed.append(Change("D", path, node.kind, old_size=_size(node)))
    old_blobs, new_blobs = blob_sizes(old_tree), blob_sizes(new_tree)
    missing = [size for digest, size in new_blobs.items() if digest not in old_blobs]
    return ImageDiff(
        added=sorted(added, key=lambda c: _path_key(c.path)),
        removed=sorted(removed, key=lambda c: _path_key(c.path)),
        changed=sorted(changed, key=lambda c: _path_key(c.path)),
        old_blobs=len(old_blobs),
        old_blob_bytes=sum(old_blobs.values()),
        new_blobs=len(new_blobs),
        new_blob_bytes=sum(new_blobs.values()),
        fetch_blobs=len(missing),
        fetch_bytes=sum(missing),
    )


def _differences(old: Node, new: Node, *, times: bool) -> tuple[str, ...]:
    if old.kind is not new.kind:
        return ("type",)
    what = []
    if new.kind is Kind.REGULAR and (old.entry.size, old.entry.digest) != (
        new.entry.size, new.entry.digest
    ):
        what.append("content")
    if new.kind is Kind.SYMLINK and old.link_target != new.link_target:
        what.append("target")
    if old.rdev != new.rdev:
        what.append("device")
    if old.mode != new.mode:
        what.append("mode")
    if (old.uid, old.gid) != (new.uid, new.gid):
        what.append("owner")
    if dict(old.xattrs) != dict(new.xattrs):
        what.append("xattrs")
    if times and old.mtime_ns != new.mtime_ns:
        what.append("mtime")
    return tuple(what)


def _size(node: Node) -> int | None:
    return node.size if node.kind is Kind.REGULAR else None


def _path_key(path: str) -> bytes:
    return path.encode("utf-8", "surrogateescape")


# ---- sharing across a set of images ---------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Measure:
    """One way of counting a set of images' bytes (content, zstd, OCI layers): each image
    is a set of named pieces with sizes, and a piece held by several images counts once
    where things are stored once."""

    per_image: tuple[int, ...]
    """Each image's own size (its distinct pieces)."""
    unique: tuple[int, ...]
    """Per image, the bytes of pieces no other image in the set has."""
    shared: int
    """Bytes of the pieces every image has."""
    distinct: int
    """Every piece once: what a host holding all the images fetches and stores."""

    @property
    def summed(self) -> int:
        """The images' sizes added up: what storing them separately costs."""
        return sum(self.per_image)

    @classmethod
    def of(cls, images: Sequence[Mapping[K, int]]) -> Measure:
        holders: dict[K, int] = {}
        union: dict[K, int] = {}
        for pieces in images:
            for name, size in pieces.items():
                holders[name] = holders.get(name, 0) + 1
                union[name] = size
        return cls(
            per_image=tuple(sum(pieces.values()) for pieces in images),
            unique=tuple(sum(s for n, s in pieces.items() if holders[n] == 1)
                         for pieces in images),
            shared=sum(s for n, s in union.items() if holders[n] == len(images)),
            distinct=sum(union.values()),
        )

    def to_json(self) -> dict[str, Any]:
        return {"per_image": list(self.per_image), "unique": list(self.unique),
                "shared": self.shared, "distinct": self.distinct, "summed": self.summed}


@dataclass(frozen=True, slots=True, kw_only=True)
class ShareTable:
    """What a set of images shares. Per image: ``files`` (regular files, hardlinks once),
    ``file_bytes`` (their sizes), ``blobs`` (distinct blobs). ``content`` counts blob
    bytes; ``zstd`` the same blobs at their stored ``.zst`` size; ``oci`` the images'
    compressed OCI layers (by layer digest). ``missing_blobs``: blobs absent from the store
    the zstd sizes came from (counted at their plain size)."""

    names: tuple[str, ...]
    files: tuple[int, ...]
    file_bytes: tuple[int, ...]
    blobs: tuple[int, ...]
    distinct_blobs: int
    content: Measure
    zstd: Measure | None = None
    oci: Measure | None = None
    missing_blobs: int = 0

    def to_json(self) -> dict[str, Any]:
        images = [
            {"name": name, "files": files, "file_bytes": size, "blobs": blobs}
            for name, files, size, blobs in zip(
                self.names, self.files, self.file_bytes, self.blobs, strict=True)
        ]
        return {
            "images": images,
            "distinct_blobs": self.distinct_blobs,
            "content": self.content.to_json(),
            "zstd": self.zstd.to_json() if self.zstd else None,
            "oci": self.oci.to_json() if self.oci else None,
            "missing_blobs": self.missing_blobs,
        }


def share_table(
    names: Sequence[str],
    manifests: Sequence[Manifest],
    *,
    compressed: Mapping[bytes, int] | None = None,
    layers: Sequence[Mapping[str, int]] | None = None,
    missing_blobs: int = 0,
) -> ShareTable:
    """Build the table. ``compressed`` maps each blob digest to its stored (zstd) size;
    ``layers`` gives, per image, its OCI layer digests → compressed sizes."""
    if layers is not None and len(layers) != len(manifests):
        raise UsageError(f"{len(layers)} OCI sources for {len(manifests)} images "
                         "(give one per image, in the same order)")
    trees = [Tree.from_manifest(manifest) for manifest in manifests]
    per_image = [blob_sizes(tree) for tree in trees]
    zstd = None
    if compressed is not None:
        zstd = Measure.of([{d: compressed[d] for d in blobs} for blobs in per_image])
    return ShareTable(
        names=tuple(names),
        files=tuple(tree.totals.files for tree in trees),
        file_bytes=tuple(tree.totals.bytes for tree in trees),
        blobs=tuple(len(blobs) for blobs in per_image),
        distinct_blobs=len({digest for blobs in per_image for digest in blobs}),
        content=Measure.of(per_image),
        zstd=zstd,
        oci=Measure.of(layers) if layers is not None else None,
        missing_blobs=missing_blobs,
    )


# ---- local files: zstd sizes and OCI layers -------------------------------------------------


def compressed_sizes(store: Path, digests: Mapping[bytes, int]) -> tuple[dict[bytes, int], int]:
    """Each blob's stored size in ``store``: its ``.zst`` sibling's size when there is one,
    else its plain size (what a zstd-serving store sends). Returns the sizes and how many
    blobs the store lacks altogether (counted at their plain size)."""
    sizes: dict[bytes, int] = {}
    missing = 0
    for digest, size in digests.items():
        path, packed = blob_path(store, digest), blob_path(store, digest, zstd=True)
        try:
            sizes[digest] = os.stat(packed).st_size
            continue
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StoreError(f"{packed}: {exc.strerror}") from exc
        if not os.path.exists(path):
            missing += 1
        sizes[digest] = size
    return sizes, missing


def has_compressed_blobs(store: Path) -> bool:
    """Whether ``store`` holds any ``.zst`` blob."""
    try:
        with os.scandir(store / BLOB_DIR) as entries:
            return any(entry.name.endswith(ZSTD_SUFFIX) for entry in entries)
    except OSError as exc:
        raise UsageError(f"--store {store}: {exc.strerror}") from None


def oci_layers(spec: str) -> dict[str, int]:
    """The layer blobs of an OCI image: digest → compressed size (from the descriptors,
    else from the blob file). ``spec`` is ``[oci:]LAYOUT[:REF]``."""
    from ocixfs.build.inputs import LayeredSource, parse_source

    if not spec.startswith("oci:"):
        spec = "oci:" + spec
    try:
        source = parse_source(spec)
    except BuildError as exc:
        raise UsageError(f"--oci {spec}: {exc}") from None
    assert isinstance(source, LayeredSource)
    layers: dict[str, int] = {}
    for layer in source.layers:
        assert layer.digest is not None
        layers[layer.digest] = layer.size if layer.size is not None else _stored_size(layer)
    return layers


def _stored_size(layer: Layer) -> int:
    try:
        with layer.open() as blob:
            return blob.seek(0, os.SEEK_END)
    except OSError as exc:
        raise UsageError(f"{layer.name}: {exc.strerror}") from None
