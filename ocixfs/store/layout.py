"""Where blobs live in a store: the one module that knows the store's layout.

::

    STORE/blobs/blake3/<64 hex>        a blob: a whole file's content, or one chunk of it
    STORE/blobs/blake3/<64 hex>.zst    optional: one zstd frame of the same bytes
    STORE/ocix-store.json              optional: {"compression": ["zstd"]}
    STORE/packs/<64 hex>.<k>.pack      optional: part k of a profile pack set (``store.pack``)

The same relative names are used under a local directory and under an http(s) base URL;
the layout mirrors the OCI image layout's ``blobs/<alg>/<hex>``. A blob's name is the
BLAKE3-256 hash of its uncompressed bytes, so compression is a property of the store, not
of the image: a reader decompresses, hashes and compares before a byte is used.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ocixfs.errors import StoreError
from ocixfs.image.format import HASH_SIZE
from ocixfs.image.loading import open_regular

__all__ = [
    "BLOB_DIR",
    "PACK_DIR",
    "STORE_CONFIG",
    "STORE_CONFIG_MAX",
    "ZSTD_SUFFIX",
    "advertises_zstd",
    "blob_name",
    "blob_path",
    "looks_like_store",
    "pack_name",
    "pack_path",
    "parse_blob_name",
    "parse_store_config",
    "read_store_config",
]

BLOB_DIR = "blobs/blake3"
STORE_CONFIG = "ocix-store.json"
STORE_CONFIG_MAX = 64 * 1024
ZSTD_SUFFIX = ".zst"
PACK_DIR = "packs"
PACK_SUFFIX = ".pack"


def _hex(digest: bytes | str) -> str:
    if isinstance(digest, bytes):
        if len(digest) != HASH_SIZE:
            raise ValueError(f"a BLAKE3-256 digest has {HASH_SIZE} bytes, not {len(digest)}")
        return digest.hex()
    if len(digest) != 2 * HASH_SIZE or digest.strip("0123456789abcdef"):
        raise ValueError(f"not a lowercase hex BLAKE3-256 digest: {digest!r}")
    return digest


def blob_name(digest: bytes | str, *, zstd: bool = False) -> str:
    """The blob's path relative to a store's root (or base URL): ``blobs/blake3/<hex>``,
    with ``.zst`` for its compressed sibling. ``digest``: 32 raw bytes or 64 lowercase hex."""
    return f"{BLOB_DIR}/{_hex(digest)}{ZSTD_SUFFIX if zstd else ''}"


def parse_blob_name(name: str) -> tuple[str, bool]:
    """``(hex, zstd)`` of a name ``blob_name`` made. Raises ``ValueError`` for another."""
    rest = name.removeprefix(f"{BLOB_DIR}/")
    digest = rest.removesuffix(ZSTD_SUFFIX)
    if rest == name:
        raise ValueError(f"not a blob name: {name!r}")
    return _hex(digest), digest != rest


def blob_path(root: Path, digest: bytes | str, *, zstd: bool = False) -> Path:
    """The blob's path in the local store directory ``root``."""
    return root / blob_name(digest, zstd=zstd)


def pack_name(set_id: bytes, part: int) -> str:
    """Part ``part`` of the pack set ``set_id`` (``store.pack.pack_set_id``: 32 bytes),
    relative to a store's root: ``packs/<hex>.<part>.pack``."""
    if part < 0:
        raise ValueError(f"a pack part is numbered from 0, not {part}")
    return f"{PACK_DIR}/{_hex(set_id)}.{part}{PACK_SUFFIX}"


def pack_path(root: Path, set_id: bytes, part: int) -> Path:
    """Part ``part`` of the pack set ``set_id`` in the local store directory ``root``."""
    return root / pack_name(set_id, part)


def looks_like_store(root: Path) -> bool:
    """Whether the directory ``root`` has a store's blob directory."""
    return (root / BLOB_DIR).is_dir()


def parse_store_config(raw: bytes, where: str) -> dict[str, Any]:
    """``ocix-store.json`` content as a dict. Raises ``StoreError`` naming ``where``."""
    if len(raw) > STORE_CONFIG_MAX:
        raise StoreError(f"{where}: larger than {STORE_CONFIG_MAX} bytes")
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise StoreError(f"{where}: not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise StoreError(f"{where}: expected a JSON object")
    return config


def advertises_zstd(config: Mapping[str, Any]) -> bool:
    """Whether a store's configuration says its blobs have ``.zst`` siblings."""
    compression = config.get("compression", [])
    return isinstance(compression, list) and "zstd" in compression


def read_store_config(root: Path) -> dict[str, Any]:
    """The parsed ``ocix-store.json`` of the local store ``root``; ``{}`` when there is none.
    Raises ``StoreError``."""
    path = root / STORE_CONFIG
    try:
        with open_regular(path) as file:
            raw = file.read(STORE_CONFIG_MAX + 1)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise StoreError(f"{path}: {exc.strerror}") from exc
    return parse_store_config(raw, str(path))
