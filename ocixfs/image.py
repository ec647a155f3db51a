"""Loading an image: manifest bytes from a local path or an http(s) URL, pinned by digest,
decoded and validated before anything else happens.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .errors import FormatError, UsageError
from .format import DEFAULT_LIMITS, Limits, Manifest, decode, manifest_digest

__all__ = ["LoadedImage", "default_store_for", "is_url", "load_image", "read_manifest_bytes"]


@dataclass(frozen=True, slots=True)
class LoadedImage:
    """A validated image: where it came from, its raw bytes' digest and the manifest."""

    source: str
    digest: str
    manifest: Manifest


def is_url(text: str) -> bool:
    return urlsplit(text).scheme in ("http", "https")


def read_manifest_bytes(
    source: str, *, limits: Limits = DEFAULT_LIMITS, timeout: float = 30.0
) -> bytes:
    """The raw bytes of a manifest, refusing anything larger than ``limits.max_bytes``."""
    if is_url(source):
        return _download(source, limits.max_bytes, timeout)
    path = Path(source)
    try:
        with path.open("rb") as f:
            data = f.read(limits.max_bytes + 1)
    except OSError as exc:
        raise UsageError(f"{source}: {exc.strerror or exc}") from None
    if len(data) > limits.max_bytes:
        raise FormatError(f"{source}: larger than the {limits.max_bytes}-byte manifest limit")
    return data


def _download(url: str, max_bytes: int, timeout: float) -> bytes:
    import httpx

    try:
        with httpx.stream("GET", url, timeout=timeout, follow_redirects=True) as response:
            if response.status_code != 200:
                raise UsageError(f"{url}: HTTP {response.status_code}")
            parts: list[bytes] = []
            total = 0
            for part in response.iter_bytes():
                total += len(part)
                if total > max_bytes:
                    raise FormatError(f"{url}: larger than the {max_bytes}-byte manifest limit")
                parts.append(part)
            return b"".join(parts)
    except httpx.HTTPError as exc:
        raise UsageError(f"{url}: {exc}") from None


def load_image(source: str, *, expected_digest: str | None = None) -> LoadedImage:
    """Read, pin and decode an image; every failure is a one-line ``OcixError``."""
    data = read_manifest_bytes(source)
    digest = manifest_digest(data)
    if expected_digest is not None and not hmac.compare_digest(digest, expected_digest.lower()):
        raise FormatError(f"{source}: digest is {digest}, expected {expected_digest}")
    name = source if is_url(source) else os.path.basename(source) or source
    return LoadedImage(source=source, digest=digest, manifest=decode(data, source=name))


def default_store_for(source: str) -> str | None:
    """The store beside a manifest (``dir/`` of ``dir/image.ocix``) when it looks like one."""
    if is_url(source):
        return source.rsplit("/", 1)[0] + "/"
    parent = Path(source).resolve().parent
    if (parent / "blobs" / "blake3").is_dir():
        return parent.as_uri()
    return None
