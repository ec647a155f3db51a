"""Build sources: what ``SOURCE`` names, and its layers as uncompressed tar streams.

``parse_source`` understands:

- ``oci:PATH[:REF]``: an OCI image layout (``index.json`` → manifest → layers). REF
  matches the ``org.opencontainers.image.ref.name`` annotation; without it the index must
  list exactly one image. An image index is followed to the manifest for ``platform``
  (default ``linux/amd64``), or to its only manifest.
- ``docker-archive:FILE[:REF]``: a ``docker save``/``podman save`` tar (``manifest.json``
  lists each image's ``Layers``); REF matches one of ``RepoTags``.
- ``tar:FILE``: one root file system tarball (``-`` is stdin).
- ``dir:PATH``: a root file system directory (read by ``ocixfs.build.layers.read_rootfs_dir``).

A PATH may contain ``:``; the longest prefix that exists is the path, the rest the REF.

``open_layer`` yields a layer's uncompressed tar stream. Compression comes from the layer's
media type (OCI and Docker types; an unknown one is an error), or, where an archive has no
media types, from the magic bytes (plain, gzip, zstd). OCI blobs are checked against their
descriptor's digest and size as they are read. Every I/O, JSON and decompression failure
becomes a one-line ``BuildError`` here.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import sys
import tarfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import zstandard

from ocixfs.errors import BuildError

__all__ = [
    "DEFAULT_PLATFORM",
    "LAYER_MEDIA_TYPES",
    "DirSource",
    "Layer",
    "LayeredSource",
    "open_layer",
    "parse_source",
]

DEFAULT_PLATFORM = "linux/amd64"
REF_ANNOTATION = "org.opencontainers.image.ref.name"
MAX_JSON_BYTES = 16 << 20
_READ_SIZE = 1 << 20

# Layer media type → compression ("" means a plain tar).
LAYER_MEDIA_TYPES = {
    "application/vnd.oci.image.layer.v1.tar": "",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar": "",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
}
_INDEX_TYPES = {
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
}
_MANIFEST_TYPES = {
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
}
_MAGIC = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd"}
_UNSUPPORTED_MAGIC = {b"\xfd7zXZ\x00": "xz", b"BZh": "bzip2"}
_DIGEST = re.compile(r"(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})")


@dataclass(frozen=True, slots=True)
class Layer:
    """One layer: ``open`` gives its raw (maybe compressed) bytes."""

    name: str
    """How messages name the layer, e.g. ``layer 2/5 (sha256:1a2b3c4d5e6f)``."""
    open: Callable[[], AbstractContextManager[IO[bytes]]]
    media_type: str | None = None
    """``None`` when the archive format has no media types: sniff the compression."""
    digest: str | None = None
    size: int | None = None


@dataclass(frozen=True, slots=True)
class LayeredSource:
    """A source made of tar layers, applied in order."""

    description: str
    layers: tuple[Layer, ...]


@dataclass(frozen=True, slots=True)
class DirSource:
    """A root file system directory."""

    path: Path


def parse_source(spec: str, *, platform: str = DEFAULT_PLATFORM) -> LayeredSource | DirSource:
    """Resolve ``SOURCE`` to its layers (reading only small metadata files)."""
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise BuildError(f"bad source {spec!r}: expected oci:PATH[:REF], "
                         "docker-archive:FILE[:REF], tar:FILE or dir:PATH")
    if kind == "dir":
        return DirSource(Path(rest))
    if kind == "tar":
        return LayeredSource(spec, (_tar_file_layer(rest),))
    if kind == "oci":
        path, ref = _split_ref(rest)
        return _oci_layout(path, ref, platform)
    if kind == "docker-archive":
        path, ref = _split_ref(rest)
        return _docker_archive(path, ref)
    raise BuildError(f"unknown source type {kind!r} in {spec!r} "
                     "(expected oci, docker-archive, tar or dir)")


@contextmanager
def open_layer(layer: Layer) -> Iterator[IO[bytes]]:
    """The layer's uncompressed tar stream; errors reading it become ``BuildError``."""
    if layer.media_type is not None and layer.media_type not in LAYER_MEDIA_TYPES:
        raise BuildError(f"{layer.name}: unsupported layer media type {layer.media_type}")
    with ExitStack() as stack:
        try:
            raw = stack.enter_context(layer.open())
        except OSError as exc:
            raise BuildError(f"{layer.name}: {_os_reason(exc)}") from exc
        verifier = _VerifyingReader(raw, layer) if layer.digest is not None else None
        compressed = io.BufferedReader(_Guard(verifier or raw, layer.name), _READ_SIZE)
        if layer.media_type is None:
            compression = _sniff(compressed, layer.name)
        else:
            compression = LAYER_MEDIA_TYPES[layer.media_type]
        plain: _Readable = compressed
        if compression == "gzip":
            plain = gzip.GzipFile(fileobj=compressed, mode="rb")
        elif compression == "zstd":
            plain = zstandard.ZstdDecompressor().stream_reader(
                compressed, read_size=_READ_SIZE, read_across_frames=True, closefd=False)
        yield io.BufferedReader(_Guard(plain, layer.name), _READ_SIZE)
        if verifier is not None:
            _Guard(verifier, layer.name).drain()


def _split_ref(rest: str) -> tuple[Path, str | None]:
    if Path(rest).exists():
        return Path(rest), None
    cut = len(rest)
    while (cut := rest.rfind(":", 0, cut)) > 0:
        if Path(rest[:cut]).exists():
            return Path(rest[:cut]), rest[cut + 1:] or None
    first = rest.partition(":")[0]
    raise BuildError(f"{first}: no such file or directory")


# -- tar files ----------------------------------------------------------------------------


def _tar_file_layer(name: str) -> Layer:
    if name == "-":
        @contextmanager
        def stdin() -> Iterator[IO[bytes]]:
            yield sys.stdin.buffer

        return Layer("stdin", stdin)
    path = Path(name)
    if path.is_dir():
        raise BuildError(f"{path}: is a directory (a root file system directory is dir:PATH)")
    if not path.is_file():
        raise BuildError(f"{path}: no such file")
    return Layer(str(path), _file_opener(path))


def _file_opener(path: Path) -> Callable[[], AbstractContextManager[IO[bytes]]]:
    return lambda: path.open("rb")


def _sniff(stream: io.BufferedReader[Any], name: str) -> str:
    head = stream.peek(8)[:8]
    for magic, method in _MAGIC.items():
        if head.startswith(magic):
            return method
    for magic, method in _UNSUPPORTED_MAGIC.items():
        if head.startswith(magic):
            raise BuildError(f"{name}: {method}-compressed tar archives are not supported")
    return ""


# -- OCI image layouts --------------------------------------------------------------------


def _oci_layout(root: Path, ref: str | None, platform: str) -> LayeredSource:
    if not (root / "oci-layout").is_file():
        raise BuildError(f"{root}: not an OCI image layout (no oci-layout file)")
    index = _load_json(root / "index.json", str(root / "index.json"))
    descriptors = _descriptor_list(index, "manifests", str(root / "index.json"))
    chosen = _pick_by_ref(descriptors, ref, root)
    manifest, where = _follow_to_manifest(root, chosen, platform)
    layers = _descriptor_list(manifest, "layers", where)
    count = len(layers)
    result = []
    for number, descriptor in enumerate(layers, 1):
        digest = _descriptor_digest(descriptor, where)
        media_type = str(descriptor.get("mediaType", ""))
        if media_type not in LAYER_MEDIA_TYPES:
            raise BuildError(f"{where}: layer {number}/{count} ({digest[:19]}): "
                             f"unsupported layer media type {media_type or '(none)'}")
        blob = _blob(root, digest)
        result.append(Layer(
            name=f"layer {number}/{count} ({digest[:19]})",
            open=_file_opener(blob),
            media_type=media_type,
            digest=digest,
            size=_descriptor_size(descriptor, where),
        ))
    label = f"oci:{root}" + (f":{ref}" if ref else "")
    return LayeredSource(label, tuple(result))


def _pick_by_ref(descriptors: list[dict[str, Any]], ref: str | None,
                 root: Path) -> dict[str, Any]:
    def name(d: dict[str, Any]) -> str | None:
        annotations = d.get("annotations")
        return annotations.get(REF_ANNOTATION) if isinstance(annotations, dict) else None

    if ref is not None:
        matches = [d for d in descriptors if name(d) == ref]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise BuildError(f"{root}: several images are named {ref!r}")
    elif len(descriptors) == 1:
        return descriptors[0]
    known = sorted({n for d in descriptors if (n := name(d))})
    listing = ", ".join(known) if known else "none"
    if ref is not None:
        raise BuildError(f"{root}: no image named {ref!r} (names: {listing})")
    if not descriptors:
        raise BuildError(f"{root}: the layout holds no image")
    raise BuildError(f"{root}: the layout holds {len(descriptors)} images; "
                     f"name one as oci:{root}:REF (names: {listing})")


def _follow_to_manifest(root: Path, descriptor: dict[str, Any],
                        platform: str) -> tuple[dict[str, Any], str]:
    for _depth in range(8):
        digest = _descriptor_digest(descriptor, str(root / "index.json"))
        where = f"{root}: {digest}"
        document = _load_blob_json(root, digest, descriptor)
        media_type = descriptor.get("mediaType") or document.get("mediaType")
        if media_type in _MANIFEST_TYPES or (media_type is None and "layers" in document):
            return document, where
        if media_type not in _INDEX_TYPES and "manifests" not in document:
            raise BuildError(f"{where}: unsupported manifest media type {media_type}")
        descriptor = _pick_platform(_descriptor_list(document, "manifests", where),
                                    platform, where)
    raise BuildError(f"{root}: image indexes nested too deeply")


def _pick_platform(descriptors: list[dict[str, Any]], platform: str,
                   where: str) -> dict[str, Any]:
    want_os, _, rest = platform.partition("/")
    want_arch, _, want_variant = rest.partition("/")

    def matches(d: dict[str, Any]) -> bool:
        p = d.get("platform")
        if not isinstance(p, dict):
            return False
        return (p.get("os") == want_os and p.get("architecture") == want_arch
                and (not want_variant or p.get("variant") == want_variant))

    found = [d for d in descriptors if matches(d)]
    if found:
        return found[0]
    if len(descriptors) == 1:
        return descriptors[0]
    raise BuildError(f"{where}: the image index has no manifest for {platform}")


def _blob(root: Path, digest: str) -> Path:
    algorithm, _, hexdigest = digest.partition(":")
    return root / "blobs" / algorithm / hexdigest


def _load_blob_json(root: Path, digest: str, descriptor: dict[str, Any]) -> dict[str, Any]:
    path = _blob(root, digest)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BuildError(f"{path}: {_os_reason(exc)}") from exc
    algorithm, _, expected = digest.partition(":")
    if hashlib.new(algorithm, data).hexdigest() != expected:
        raise BuildError(f"{path}: content does not match its digest {digest}")
    return _parse_json(data, str(path))


def _descriptor_list(document: dict[str, Any], key: str, where: str) -> list[dict[str, Any]]:
    items = document.get(key)
    if not isinstance(items, list) or not all(isinstance(d, dict) for d in items):
        raise BuildError(f"{where}: {key!r} is missing or not a list of descriptors")
    return items


def _descriptor_digest(descriptor: dict[str, Any], where: str) -> str:
    digest = descriptor.get("digest")
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise BuildError(f"{where}: unsupported or malformed digest {digest!r}")
    return digest


def _descriptor_size(descriptor: dict[str, Any], where: str) -> int | None:
    size = descriptor.get("size")
    if size is None:
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise BuildError(f"{where}: malformed size {size!r}")
    return size


def _load_json(path: Path, where: str) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_JSON_BYTES + 1)
    except OSError as exc:
        raise BuildError(f"{where}: {_os_reason(exc)}") from exc
    return _parse_json(data, where)


def _parse_json(data: bytes, where: str) -> dict[str, Any]:
    if len(data) > MAX_JSON_BYTES:
        raise BuildError(f"{where}: larger than {MAX_JSON_BYTES} bytes")
    try:
        document = json.loads(data)
    except ValueError as exc:
        raise BuildError(f"{where}: not valid JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise BuildError(f"{where}: expected a JSON object")
    return document


# -- docker archives ----------------------------------------------------------------------


def _docker_archive(path: Path, ref: str | None) -> LayeredSource:
    where = f"{path}: manifest.json"
    try:
        with tarfile.open(path, "r:*") as archive:
            member = archive.extractfile("manifest.json")
            if member is None:
                raise KeyError("manifest.json")
            raw = member.read(MAX_JSON_BYTES + 1)
            names = set(archive.getnames())
    except KeyError:
        raise BuildError(f"{path}: not a docker archive (no manifest.json)") from None
    except (OSError, tarfile.TarError, EOFError, zlib.error) as exc:
        raise BuildError(f"{path}: not a readable tar archive: {_os_reason(exc)}") from exc
    try:
        images = json.loads(raw)
    except ValueError as exc:
        raise BuildError(f"{where}: not valid JSON: {exc}") from exc
    if not isinstance(images, list) or not all(isinstance(i, dict) for i in images):
        raise BuildError(f"{where}: expected a list of images")
    image = _pick_docker_image(images, ref, path)
    layer_names = image.get("Layers")
    if not isinstance(layer_names, list) or not all(isinstance(n, str) for n in layer_names):
        raise BuildError(f"{where}: 'Layers' is missing or not a list of names")
    count = len(layer_names)
    layers = []
    for number, name in enumerate(layer_names, 1):
        if name not in names:
            raise BuildError(f"{path}: layer {name} listed in manifest.json is missing")
        layers.append(Layer(f"layer {number}/{count} ({name})", _archive_member(path, name)))
    label = f"docker-archive:{path}" + (f":{ref}" if ref else "")
    return LayeredSource(label, tuple(layers))


def _pick_docker_image(images: list[dict[str, Any]], ref: str | None,
                       path: Path) -> dict[str, Any]:
    if ref is None:
        if len(images) == 1:
            return images[0]
        raise BuildError(f"{path}: the archive holds {len(images)} images; "
                         f"name one as docker-archive:{path}:REF")
    tags = [t for i in images for t in i.get("RepoTags") or []]
    for image in images:
        if ref in (image.get("RepoTags") or []):
            return image
    raise BuildError(f"{path}: no image tagged {ref!r} (tags: {', '.join(tags) or 'none'})")


def _archive_member(path: Path, name: str) -> Callable[[], AbstractContextManager[IO[bytes]]]:
    @contextmanager
    def open_member() -> Iterator[IO[bytes]]:
        with tarfile.open(path, "r:*") as archive:
            member = archive.extractfile(name)
            if member is None:
                raise BuildError(f"{path}: layer {name} is not a file")
            yield member

    return open_member


# -- stream wrappers ----------------------------------------------------------------------


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class _VerifyingReader(io.RawIOBase):
    """Hashes what passes through; ``verify()`` checks digest and size at the end."""

    def __init__(self, raw: IO[bytes], layer: Layer) -> None:
        self._raw = raw
        self._layer = layer
        assert layer.digest is not None
        self._algorithm, _, self._expected = layer.digest.partition(":")
        self._hash = hashlib.new(self._algorithm)
        self._size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._raw.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self._hash.update(data)
        self._size += n
        if n == 0:
            self.verify()
        return n

    def verify(self) -> None:
        layer = self._layer
        if layer.size is not None and self._size != layer.size:
            raise BuildError(f"{layer.name}: blob has {self._size} bytes, "
                             f"its descriptor says {layer.size}")
        if self._hash.hexdigest() != self._expected:
            raise BuildError(f"{layer.name}: blob content does not match its digest")


class _Guard(io.RawIOBase):
    """Reads from ``inner``, turning I/O and decompression errors into ``BuildError``."""

    def __init__(self, inner: _Readable, name: str) -> None:
        self._inner = inner
        self._name = name

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            data = self._inner.read(len(buffer))
        except (OSError, EOFError, zlib.error, zstandard.ZstdError) as exc:
            raise BuildError(f"{self._name}: {_os_reason(exc)}") from exc
        n = len(data)
        buffer[:n] = data
        return n

    def drain(self) -> None:
        """Read to the end (so that a verifying reader below sees every byte)."""
        buffer = bytearray(_READ_SIZE)
        while self.readinto(buffer):
            pass


def _os_reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc) or type(exc).__name__
    if isinstance(exc, EOFError):
        return f"truncated ({text})"
    return text
