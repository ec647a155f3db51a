"""OCI registries as image stores: the artifact an image becomes, and the distribution API
calls that push and read it.

An image pushed by ``ocixfs push`` is one OCI image manifest (``MEDIA_MANIFEST``,
``artifactType`` ``ARTIFACT_TYPE``)::

    config     the OCIX manifest bytes                      MEDIA_OCIX
    layers[0]  the blob index: {"version": 1, "b3": [HEX, …]}       MEDIA_INDEX
    layers     the profile (IMAGE.profile), if any           MEDIA_PROFILE
    layers     every blob, as the store holds it: its .zst   MEDIA_BLOB_ZSTD
               form if the store has one, else plain         MEDIA_BLOB
    annotations  {"dev.ocix.image.digest": "b3:…"}

Registries address blobs by sha256 (distribution refuses ``blake3:`` digests), so each
blob layer is the sha256 of the bytes stored, and the blob index gives, in layer order,
the BLAKE3 of each blob layer's decoded content. Every blob is a layer so that a
registry's garbage collector keeps it. The index and the encodings (the media types) are
pinned by the manifest's digest; a reader checks the sha256 of what it receives and then,
as for every store, the BLAKE3 of the decoded content. Registries accept manifests of
4 MiB (``MANIFEST_MAX``, distribution's limit and the OCI distribution spec's minimum):
about 30,000 blobs.

``RegistryClient`` is the blocking client of the command side (and of the daemon's one-off
index load). ``registry_errors`` is this module's one translation boundary: httpx errors
and unusable answers become ``RegistryError`` (``not_found`` when the registry said
"unknown"), one line, without credentials.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any, BinaryIO

import httpx

from ocixfs.config import FetchConfig
from ocixfs.errors import OcixError
from ocixfs.http import DownloadClock, describe, read_document, sync_client
from ocixfs.store.registryauth import SCOPE, RegistryAuth, RegistryError
from ocixfs.store.spec import RegistryStore

__all__ = [
    "ARTIFACT_TYPE",
    "MANIFEST_MAX",
    "Artifact",
    "Descriptor",
    "DigestCheck",
    "RegistryClient",
    "RegistryImage",
    "StoredBlob",
    "api_base",
    "blob_url",
    "encode_artifact",
    "fetch_image",
    "load_blob_table",
    "probe_registry",
    "pull_scope",
    "registry_errors",
    "sha256_digest",
]

MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
ARTIFACT_TYPE = "application/vnd.ocix.image.v1"
MEDIA_OCIX = "application/vnd.ocix.manifest.v1+cbor"
MEDIA_INDEX = "application/vnd.ocix.blob-index.v1+json"
MEDIA_PROFILE = "application/vnd.ocix.profile.v1+cbor"
MEDIA_BLOB = "application/vnd.ocix.blob.v1"
MEDIA_BLOB_ZSTD = "application/vnd.ocix.blob.v1+zstd"
IMAGE_DIGEST_ANNOTATION = "dev.ocix.image.digest"
MANIFEST_MAX = 4 << 20
INDEX_MAX = 64 << 20
SIDE_MAX = 1 << 30  # an OCIX manifest or profile is far smaller (format limits apply after)
_HEX = frozenset("0123456789abcdef")


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class DigestCheck:
    """The sha256 and length of bytes received in pieces, against a descriptor."""

    def __init__(self, digest: str, size: int) -> None:
        self._digest, self._size = digest, size
        self._hash = hashlib.sha256()
        self.received = 0

    def update(self, pieces: Iterable[bytes]) -> None:
        for piece in pieces:
            self._hash.update(piece)

    def count(self, size: int) -> str | None:
        """Count ``size`` more bytes; why they are too many, if they are."""
        self.received += size
        return f"more than the {self._size} bytes indexed" if self.received > self._size else None

    def problem(self) -> str | None:
        """Why the bytes received are not the indexed blob, or None (call after ``update``
        saw every piece)."""
        if self.received != self._size:
            return f"{self.received} bytes instead of the {self._size} indexed"
        if not hmac.compare_digest("sha256:" + self._hash.hexdigest(), self._digest):
            return f"sha256 is not {self._digest} (the registry sent other bytes)"
        return None


@dataclass(frozen=True, slots=True)
class Descriptor:
    """An OCI content descriptor."""

    media_type: str
    digest: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True, slots=True)
class StoredBlob:
    """A blob of the image as the registry holds it: ``blake3`` (hex) of its content,
    ``zstd`` when stored compressed, and the descriptor of the stored bytes."""

    blake3: str
    zstd: bool
    digest: str
    size: int

    @property
    def descriptor(self) -> Descriptor:
        return Descriptor(MEDIA_BLOB_ZSTD if self.zstd else MEDIA_BLOB, self.digest, self.size)


@dataclass(frozen=True, slots=True)
class Artifact:
    """A parsed OCIX artifact manifest (``digest``: the sha256 of its bytes)."""

    digest: str
    image: Descriptor
    index: Descriptor
    profile: Descriptor | None
    blobs: tuple[Descriptor, ...]
    image_digest: str | None


def encode_artifact(
    image: Descriptor, index: Descriptor, profile: Descriptor | None,
    extra: Iterable[Descriptor], blobs: Iterable[StoredBlob], *, image_digest: str,
) -> bytes:
    """The artifact manifest's bytes (compact JSON). ``extra`` layers (profile packs)
    come after the profile and before the blobs; readers skip layer types they do not
    know."""
    side = [index, *([profile] if profile is not None else []), *extra]
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": image.to_json(),
        "layers": [d.to_json() for d in side] + [b.descriptor.to_json() for b in blobs],
        "annotations": {IMAGE_DIGEST_ANNOTATION: image_digest},
    }
    return json.dumps(manifest, separators=(",", ":")).encode()


def encode_index(blobs: Iterable[StoredBlob]) -> bytes:
    return json.dumps({"version": 1, "b3": [b.blake3 for b in blobs]},
                      separators=(",", ":")).encode()


def parse_artifact(raw: bytes, digest: str, label: str) -> Artifact:
    """Validate an artifact manifest. Raises ``RegistryError`` naming ``label``."""
    try:
        document = json.loads(raw)
        if document.get("artifactType") != ARTIFACT_TYPE:
            raise RegistryError(f"{label}: not an ocixfs image (artifactType "
                                f"{str(document.get('artifactType'))[:80]!r})")
        image = _descriptor(document["config"])
        layers = [_descriptor(layer) for layer in document["layers"]]
        annotations = document.get("annotations") or {}
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise RegistryError(f"{label}: not a valid OCI image manifest") from None
    indexes = [d for d in layers if d.media_type == MEDIA_INDEX]
    profiles = [d for d in layers if d.media_type == MEDIA_PROFILE]
    if image.media_type != MEDIA_OCIX or len(indexes) != 1 or len(profiles) > 1:
        raise RegistryError(f"{label}: not a valid ocixfs image manifest")
    image_digest = annotations.get(IMAGE_DIGEST_ANNOTATION)
    return Artifact(
        digest=digest, image=image, index=indexes[0],
        profile=profiles[0] if profiles else None,
        blobs=tuple(d for d in layers if d.media_type in (MEDIA_BLOB, MEDIA_BLOB_ZSTD)),
        image_digest=image_digest if isinstance(image_digest, str) else None,
    )


def _descriptor(value: Any) -> Descriptor:
    media_type, digest, size = value["mediaType"], value["digest"], value["size"]
    if not (isinstance(media_type, str) and isinstance(digest, str) and type(size) is int
            and size >= 0 and digest.startswith("sha256:") and len(digest) == 71
            and _HEX.issuperset(digest[7:])):
        raise ValueError("bad descriptor")
    return Descriptor(media_type, digest, size)


def parse_index(raw: bytes, artifact: Artifact, label: str) -> dict[str, StoredBlob]:
    """The blob table: BLAKE3 hex → where the registry keeps that blob."""
    try:
        hashes = json.loads(raw)["b3"]
        if not isinstance(hashes, list) or len(hashes) != len(artifact.blobs):
            raise ValueError("length")
        table = {}
        for blake3, layer in zip(hashes, artifact.blobs, strict=True):
            if not isinstance(blake3, str) or len(blake3) != 64 or not _HEX.issuperset(blake3):
                raise ValueError("hash")
            zstd = layer.media_type == MEDIA_BLOB_ZSTD
            table[blake3] = StoredBlob(blake3, zstd, layer.digest, layer.size)
    except (ValueError, KeyError, TypeError, RecursionError):
        raise RegistryError(f"{label}: the blob index does not match the manifest") from None
    return table


# --- the distribution API ----------------------------------------------------------------


def api_base(store: RegistryStore) -> str:
    """``SCHEME://HOST/v2/REPO``: plain http for loopback hosts and ``tls_verify=False``,
    https otherwise (Docker Hub's API lives at registry-1.docker.io)."""
    scheme = "http" if store.loopback or not store.tls_verify else "https"
    host = "registry-1.docker.io" if store.host == "docker.io" else store.host
    return f"{scheme}://{host}/v2/{store.repository}"


def blob_url(store: RegistryStore, digest: str) -> str:
    return f"{api_base(store)}/blobs/{digest}"


def pull_scope(store: RegistryStore) -> dict[str, str]:
    """The request extensions of a read (``RegistryAuth`` asks for this scope)."""
    return {SCOPE: f"repository:{store.repository}:pull"}


def _push_scope(store: RegistryStore) -> dict[str, str]:
    return {SCOPE: f"repository:{store.repository}:pull,push"}


@contextlib.contextmanager
def registry_errors(label: str) -> Iterator[None]:
    """The one translation boundary of registry calls: httpx → ``RegistryError``."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise RegistryError(f"{label}: timed out ({type(exc).__name__})") from None
    except (httpx.HTTPError, httpx.StreamError) as exc:
        raise RegistryError(f"{label}: {describe(exc)}") from None


_KNOWN_CODES = {
    "MANIFEST_UNKNOWN": "no such tag or digest",
    "NAME_UNKNOWN": "no such repository",
    "BLOB_UNKNOWN": "no such blob",
}


def _status_error(response: httpx.Response, label: str) -> RegistryError:
    """What an unexpected status means, in a few words (the registry's error code if its
    bounded body has one)."""
    status = response.status_code
    code = _error_code(response)
    if status == 404 or code in _KNOWN_CODES:
        return RegistryError(f"{label}: {_KNOWN_CODES.get(code, 'not found')}", not_found=True)
    if status == 401:
        return RegistryError(f"{label}: authentication required (HTTP 401; no usable login "
                             "in the auth files)")
    if status == 403:
        return RegistryError(f"{label}: access denied (HTTP 403)")
    return RegistryError(f"{label}: HTTP {status}" + (f" {code}" if code else ""))


def _error_code(response: httpx.Response) -> str:
    try:
        raw = b""
        for piece in response.iter_bytes():
            raw += piece
            if len(raw) > 65536:
                return ""
        code = json.loads(raw)["errors"][0]["code"]
    except (ValueError, KeyError, TypeError, IndexError, httpx.HTTPError, httpx.StreamError):
        return ""
    return code if isinstance(code, str) and code.isidentifier() else ""


class RegistryClient:
    """Blocking calls to one repository of a registry. ``auth`` may be shared by several
    clients (threads); use as a context manager."""

    def __init__(
        self, store: RegistryStore, config: FetchConfig, auth: RegistryAuth | None = None
    ) -> None:
        self.store = store
        self.config = config
        self.auth = auth or RegistryAuth(store)
        self._base = api_base(store)
        self._client = sync_client(config, auth=self.auth)

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self._client.close()

    def manifest(self) -> tuple[bytes, str]:
        """The artifact manifest the store's reference names, and its digest (checked
        against the reference when that is a digest, and against the registry's
        ``Docker-Content-Digest``)."""
        label = self.store.label
        raw, headers = self._get(f"{self._base}/manifests/{self.store.reference}", label,
                                 MANIFEST_MAX, accept=MEDIA_MANIFEST)
        digest = sha256_digest(raw)
        claimed = headers.get("docker-content-digest", digest)
        expected = self.store.reference if self.store.pinned else claimed
        if not hmac.compare_digest(digest, expected):
            raise RegistryError(f"{label}: the manifest's digest is {digest}, not {expected}")
        media_type = headers.get("content-type", "").split(";")[0].strip()
        if media_type not in (MEDIA_MANIFEST, ""):
            raise RegistryError(f"{label}: not an ocixfs image (a {media_type[:80]})")
        return raw, digest

    def blob(self, descriptor: Descriptor, max_bytes: int) -> bytes:
        """A small blob whole (at most ``max_bytes``), its sha256 and size checked."""
        label = f"{self.store.label}: blob {descriptor.digest}"
        if descriptor.size > max_bytes:
            raise RegistryError(f"{label}: {descriptor.size} bytes, above the {max_bytes} limit")
        raw, _ = self._get(blob_url(self.store, descriptor.digest), label, descriptor.size)
        check = DigestCheck(descriptor.digest, descriptor.size)
        check.update([raw])
        check.count(len(raw))
        problem = check.problem()
        if problem is not None:
            raise RegistryError(f"{label}: {problem}")
        return raw

    def _get(self, url: str, label: str, max_bytes: int,
             accept: str | None = None) -> tuple[bytes, httpx.Headers]:
        headers = {"Accept-Encoding": "identity", **({"Accept": accept} if accept else {})}
        clock = DownloadClock(self.config, self.config.document_deadline)
        with registry_errors(label), self._client.stream(
            "GET", url, headers=headers, extensions=pull_scope(self.store)
        ) as response:
            if response.status_code != 200:
                raise _status_error(response, label)
            try:
                return read_document(response, label, max_bytes=max_bytes,
                                     clock=clock), response.headers
            except OcixError as exc:
                raise RegistryError(str(exc)) from None

    def has_blob(self, digest: str) -> bool:
        label = f"{self.store.label}: blob {digest}"
        with registry_errors(label):
            response = self._client.head(f"{self._base}/blobs/{digest}",
                                          extensions=_push_scope(self.store))
        if response.status_code in (200, 404):
            return response.status_code == 200
        raise _status_error(response, label)

    def upload(self, descriptor: Descriptor, content: bytes | BinaryIO) -> None:
        """Upload one blob (POST, then one PUT of the whole body) and check the digest
        the registry computed."""
        label = f"{self.store.label}: upload of {descriptor.digest}"
        scope = _push_scope(self.store)
        with registry_errors(label):
            started = self._client.post(f"{self._base}/blobs/uploads/", extensions=scope)
            if started.status_code != 202 or "location" not in started.headers:
                raise _status_error(started, label)
            target = started.url.join(started.headers["location"]).copy_merge_params(
                {"digest": descriptor.digest})
            done = self._client.put(target, content=content, extensions=scope, headers={
                "Content-Type": "application/octet-stream",
                "Content-Length": str(descriptor.size)})
        if done.status_code != 201:
            raise _status_error(done, label)
        self._check_digest(done, descriptor.digest, label)

    def put_manifest(self, raw: bytes) -> str:
        """Store the artifact manifest under the store's reference; its digest."""
        label = self.store.label
        digest = sha256_digest(raw)
        if self.store.pinned and self.store.reference != digest:
            raise RegistryError(f"{label}: the manifest's digest would be {digest}")
        with registry_errors(label):
            response = self._client.put(
                f"{self._base}/manifests/{self.store.reference}", content=raw,
                headers={"Content-Type": MEDIA_MANIFEST}, extensions=_push_scope(self.store))
        if response.status_code != 201:
            raise _status_error(response, label)
        self._check_digest(response, digest, label)
        return digest

    @staticmethod
    def _check_digest(response: httpx.Response, digest: str, label: str) -> None:
        claimed = response.headers.get("docker-content-digest")
        if claimed is not None and not hmac.compare_digest(claimed, digest):
            raise RegistryError(f"{label}: the registry stored {claimed}, not {digest}")


def load_artifact(client: RegistryClient) -> Artifact:
    raw, digest = client.manifest()
    return parse_artifact(raw, digest, client.store.label)


def load_blob_table(
    store: RegistryStore, config: FetchConfig, auth: RegistryAuth | None = None
) -> dict[str, StoredBlob]:
    """Where the artifact ``store`` names keeps each blob (blocking; the daemon runs it in
    a worker thread once). Raises ``RegistryError``."""
    with RegistryClient(store, config, auth) as client:
        artifact = load_artifact(client)
        raw = client.blob(artifact.index, INDEX_MAX)
    return parse_index(raw, artifact, store.label)


@dataclass(frozen=True, slots=True)
class RegistryImage:
    """An image read from a registry: ``store`` pinned to the artifact's digest, the OCIX
    manifest bytes (sha256 checked; the caller decodes and pins them) and the profile's
    bytes if the artifact has one."""

    store: RegistryStore
    manifest: bytes
    profile: bytes | None


def fetch_image(store: RegistryStore, config: FetchConfig, max_manifest: int,
                max_profile: int) -> RegistryImage:
    """The image ``store`` names. Raises ``RegistryError``."""
    with RegistryClient(store, config) as client:
        artifact = load_artifact(client)
        manifest = client.blob(artifact.image, max_manifest)
        profile = None
        if artifact.profile is not None:
            profile = client.blob(artifact.profile, max_profile)
    return RegistryImage(replace(store, reference=artifact.digest), manifest, profile)


def probe_registry(store: RegistryStore, config: FetchConfig) -> str | None:
    """None when the artifact ``store`` names can be read, else why not (a few words)."""
    try:
        with RegistryClient(store, config) as client:
            load_artifact(client)
    except RegistryError as exc:
        return str(exc).removeprefix(f"{store.label}: ")
    return None
