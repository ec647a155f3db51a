"""Pushing an image to an OCI registry as an OCIX artifact (format: ``store.registry``).

``push_image`` reads the image and its store directory, computes the sha256 of every
blob as the store holds it (its ``.zst`` form if there is one), uploads what the
registry does not have yet (a HEAD first, then POST + PUT, ``threads`` at a time, each
upload's ``Docker-Content-Digest`` checked), then the OCIX manifest, the blob index and
the side files (``IMAGE.profile``), and last the artifact manifest, so a reference never
names an artifact whose blobs are missing. A blob missing from the store fails the push
before anything is uploaded.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ocixfs.config import FetchConfig
from ocixfs.errors import StoreError
from ocixfs.image.format import Chunk
from ocixfs.image.loading import LoadedImage
from ocixfs.progress import Progress
from ocixfs.store.layout import ZSTD_SUFFIX, blob_path
from ocixfs.store.registry import (
    MANIFEST_MAX,
    MEDIA_INDEX,
    MEDIA_OCIX,
    MEDIA_PROFILE,
    Descriptor,
    RegistryClient,
    StoredBlob,
    encode_artifact,
    encode_index,
    sha256_digest,
)
from ocixfs.store.registryauth import RegistryAuth
from ocixfs.store.spec import RegistryStore

__all__ = ["PushSummary", "push_image", "side_files"]

_READ = 1 << 20


@dataclass(frozen=True, slots=True)
class PushSummary:
    """What a push did. ``digest`` is the artifact manifest's (pin with ``REPO@DIGEST``)."""

    reference: str
    pinned: str
    digest: str
    image_digest: str
    blobs: int
    uploaded: int
    uploaded_bytes: int
    skipped: int
    skipped_bytes: int
    manifest_bytes: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


def side_files(image_path: Path) -> list[tuple[Path, str]]:
    """The files beside the image that travel with it, with their layer media type.

    The hook for more side files (profile packs): add their ``(path, media type)`` here;
    readers skip layer types they do not know, so older ocixfs versions still mount."""
    profile = Path(f"{image_path}.profile")
    return [(profile, MEDIA_PROFILE)] if profile.is_file() else []


@dataclass(slots=True)
class _Counts:
    uploaded: int = 0
    uploaded_bytes: int = 0
    skipped: int = 0
    skipped_bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, size: int, *, uploaded: bool) -> None:
        with self.lock:
            if uploaded:
                self.uploaded += 1
                self.uploaded_bytes += size
            else:
                self.skipped += 1
                self.skipped_bytes += size


def push_image(
    image: LoadedImage, image_path: Path, manifest: bytes, blobs: Iterable[Chunk],
    store_dir: Path, target: RegistryStore, config: FetchConfig, *, threads: int = 8,
    progress: bool = True,
) -> PushSummary:
    """Push ``image`` (``manifest``: its bytes, ``blobs``: every blob it references) from
    the store directory ``store_dir`` to ``target``. Raises ``StoreError`` (a blob is not
    in the store, or too many for one OCI manifest: both before any upload) or
    ``RegistryError``."""
    started = time.monotonic()
    files = _stored_files(store_dir, blobs)
    counts = _Counts()
    with _ClientPerThread(target, config) as clients, ThreadPoolExecutor(
        threads, thread_name_prefix="ocixfs-push"
    ) as pool:
        stored = sorted(pool.map(_describe, files.items()), key=lambda blob: blob.blake3)
        sides = _side_blobs(image_path, manifest, stored)
        raw = encode_artifact(*sides.descriptors, stored, image_digest=image.digest)
        if len(raw) > MANIFEST_MAX:
            raise StoreError(
                f"{image_path}: {len(stored)} blobs make a {len(raw)}-byte OCI manifest; "
                f"registries accept {MANIFEST_MAX} bytes (about 30,000 blobs): build with "
                "a larger --chunk-size or fewer files")
        with Progress("pushing", total=sum(b.size for b in stored),
                      enabled=None if progress else False) as bar:
            def send(blob: StoredBlob) -> None:
                _send(clients.get(), blob.descriptor, files[blob.blake3], counts)
                bar.advance(blob.size)

            # the first alone: its challenge fetches the token every later request reuses
            list(map(send, stored[:1]))
            list(pool.map(send, stored[1:]))
        for descriptor, data in sides.contents:  # not counted: the summary counts blobs
            _send(clients.get(), descriptor, data, _Counts())
        digest = clients.get().put_manifest(raw)
    return PushSummary(
        reference=target.label, pinned=f"docker://{target.host}/{target.repository}@{digest}",
        digest=digest, image_digest=image.digest, blobs=len(stored), uploaded=counts.uploaded,
        uploaded_bytes=counts.uploaded_bytes, skipped=counts.skipped,
        skipped_bytes=counts.skipped_bytes, manifest_bytes=len(raw),
        seconds=time.monotonic() - started,
    )


class _ClientPerThread:
    """A ``RegistryClient`` for each thread that asks, sharing one ``RegistryAuth`` (so a
    token is fetched once); leaving closes them all."""

    def __init__(self, target: RegistryStore, config: FetchConfig) -> None:
        self._target, self._config = target, config
        self._auth = RegistryAuth(target)
        self._local = threading.local()
        self._made: list[RegistryClient] = []

    def get(self) -> RegistryClient:
        client: RegistryClient | None = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = RegistryClient(self._target, self._config, self._auth)
            self._made.append(client)
        return client

    def __enter__(self) -> _ClientPerThread:
        return self

    def __exit__(self, *_exc: object) -> None:
        for client in self._made:
            client.__exit__()


@dataclass(frozen=True, slots=True)
class _Sides:
    """The artifact's small blobs: the descriptors ``encode_artifact`` takes first
    (manifest, index, profile, extra layers) and each descriptor's bytes."""

    descriptors: tuple[Descriptor, Descriptor, Descriptor | None, list[Descriptor]]
    contents: list[tuple[Descriptor, bytes]]


def _side_blobs(image_path: Path, manifest: bytes, stored: Sequence[StoredBlob]) -> _Sides:
    contents = [(_descriptor(data, media_type), data) for data, media_type in (
        (manifest, MEDIA_OCIX), (encode_index(stored), MEDIA_INDEX),
        *((_read_side(path), media_type) for path, media_type in side_files(image_path)),
    )]
    config, index, *rest = (descriptor for descriptor, _ in contents)
    profile = next((d for d in rest if d.media_type == MEDIA_PROFILE), None)
    extra = [d for d in rest if d.media_type != MEDIA_PROFILE]
    return _Sides((config, index, profile, extra), contents)


def _descriptor(data: bytes, media_type: str) -> Descriptor:
    return Descriptor(media_type, sha256_digest(data), len(data))


def _stored_files(store_dir: Path, blobs: Iterable[Chunk]) -> dict[str, Path]:
    """BLAKE3 hex → the file holding that blob (``.zst`` preferred)."""
    files = {}
    for chunk in blobs:
        for zstd in (True, False):
            path = blob_path(store_dir, chunk.digest, zstd=zstd)
            if path.is_file():
                files[chunk.hex] = path
                break
        else:
            raise StoreError(f"{store_dir}: blob {chunk.hex} is not in the store")
    return files


def _describe(item: tuple[str, Path]) -> StoredBlob:
    blake3, path = item
    digest, size = _sha256_of(path)
    return StoredBlob(blake3, path.name.endswith(ZSTD_SUFFIX), digest, size)


def _sha256_of(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    try:
        with path.open("rb") as file:
            while piece := file.read(_READ):
                digest.update(piece)
                size += len(piece)
    except OSError as exc:
        raise StoreError(f"{path}: {exc.strerror or exc}") from None
    return "sha256:" + digest.hexdigest(), size


def _send(client: RegistryClient, descriptor: Descriptor, source: Path | bytes,
          counts: _Counts) -> None:
    """Upload one blob unless the registry has it already."""
    if client.has_blob(descriptor.digest):
        counts.add(descriptor.size, uploaded=False)
        return
    if isinstance(source, bytes):
        client.upload(descriptor, source)
    else:
        try:
            with source.open("rb") as file:
                client.upload(descriptor, file)
        except OSError as exc:
            raise StoreError(f"{source}: {exc.strerror or exc}") from None
    counts.add(descriptor.size, uploaded=True)


def _read_side(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise StoreError(f"{path}: {exc.strerror or exc}") from None
