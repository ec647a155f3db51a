"""Loading an image: manifest bytes from a local path or an http(s) URL, pinned by digest,
decoded and validated before anything else happens.
"""

from __future__ import annotations

import errno
import hmac
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

from ocixfs.config import DEFAULT_FETCH_CONFIG, FetchConfig
from ocixfs.errors import FormatError, UsageError
from ocixfs.image.format import DEFAULT_LIMITS, Limits, Manifest, decode, manifest_digest

__all__ = [
    "LoadedImage",
    "PinnedBytes",
    "check_digest",
    "decoded",
    "image_from_bytes",
    "is_url",
    "load_image",
    "open_regular",
    "pin",
    "read_limited",
    "read_manifest_bytes",
    "read_pinned",
]


@dataclass(frozen=True, slots=True)
class LoadedImage:
    """A validated image: where it came from, its raw bytes' digest and the manifest."""

    source: str
    digest: str
    manifest: Manifest


_DIGEST = re.compile(r"b3:[0-9a-f]{64}")


def check_digest(text: str) -> str:
    """An image digest as a user typed it (``--digest``), lower-cased; anything but
    ``b3:`` and 64 hex digits is a ``UsageError``."""
    digest = text.strip().lower()
    if _DIGEST.fullmatch(digest) is None:
        raise UsageError(f"--digest {text:.80}: not an image digest (b3: and 64 hex digits)")
    return digest


def is_url(text: str) -> bool:
    return urlsplit(text).scheme in ("http", "https")


def read_manifest_bytes(
    source: str, *, limits: Limits = DEFAULT_LIMITS, http: FetchConfig = DEFAULT_FETCH_CONFIG
) -> bytes:
    """The raw bytes of a manifest, refusing anything larger than ``limits.max_bytes``.
    A URL is fetched with ``http.download`` (system CAs, ``http.ca_file``, credentials,
    bounded size and rate); one with ``user:password@`` in it is a ``UsageError``."""
    if is_url(source):
        from ocixfs.http import download, refuse_credentials

        refuse_credentials(source, "IMAGE")
        return download(source, max_bytes=limits.max_bytes, config=http)
    path = Path(source)
    try:
        with path.open("rb") as f:
            data = read_limited(f, limits.max_bytes)
    except OSError as exc:
        raise UsageError(f"{source}: {exc.strerror or exc}") from None
    if len(data) > limits.max_bytes:
        raise FormatError(f"{source}: larger than the {limits.max_bytes}-byte manifest limit")
    return data


def open_regular(path: str | os.PathLike[str], buffering: int = -1) -> BinaryIO:
    """``path`` opened for reading if it is a regular file; raises ``OSError`` (strerror
    "not a regular file" for anything else). For files found rather than named (a
    profile beside an image, a store's files): opening never waits, so a FIFO or a device
    planted under that name cannot hang the caller, in ``open`` or in a read."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", os.fspath(path))
        return os.fdopen(fd, "rb", buffering=buffering)
    except BaseException:
        os.close(fd)
        raise


def read_limited(file: BinaryIO, limit: int) -> bytes:
    """At most ``limit + 1`` bytes of ``file`` (one more than allowed tells the caller it
    is too big), using memory for what the file holds, not for the limit: a plain
    ``read(limit + 1)`` reserves the whole limit up front (1 GiB for a manifest), which
    fails under an address-space limit even for a tiny file."""
    if stat.S_ISREG(os.fstat(file.fileno()).st_mode):
        size = os.fstat(file.fileno()).st_size
        return file.read(min(size, limit) + 1)
    pieces = []
    total = 0
    while total <= limit:
        piece = file.read(min(1 << 20, limit + 1 - total))
        if not piece:
            break
        pieces.append(piece)
        total += len(piece)
    return b"".join(pieces)


def load_image(
    source: str, *, expected_digest: str | None = None, http: FetchConfig = DEFAULT_FETCH_CONFIG
) -> LoadedImage:
    """Read, pin and decode an image; every failure is a one-line ``OcixError`` (a URL's
    credentials never appear in it)."""
    return decoded(read_pinned(source, expected_digest=expected_digest, http=http))


def image_from_bytes(
    data: bytes, source: str, *, expected_digest: str | None = None
) -> LoadedImage:
    """Pin and decode manifest bytes read from ``source`` (as ``load_image`` does)."""
    return decoded(pin(data, source, expected_digest=expected_digest))


def decoded(pinned: PinnedBytes) -> LoadedImage:
    """The manifest ``pinned`` holds, decoded and validated."""
    return LoadedImage(source=pinned.source, digest=pinned.digest,
                       manifest=decode(pinned.data, source=pinned.name))


@dataclass(frozen=True, slots=True)
class PinnedBytes:
    """A manifest's raw bytes, not decoded yet: ``source`` (as the user named it),
    ``name`` (for messages, no credentials), ``digest`` (``b3:<hex>``, checked against
    the one expected) and ``data``."""

    source: str
    name: str
    digest: str
    data: bytes


def read_pinned(
    source: str, *, expected_digest: str | None = None, http: FetchConfig = DEFAULT_FETCH_CONFIG
) -> PinnedBytes:
    """Read a manifest's bytes and check their digest (``FormatError`` if another one was
    expected); the first half of ``load_image``."""
    if expected_digest is not None:
        expected_digest = check_digest(expected_digest)  # before any download
    return pin(read_manifest_bytes(source, http=http), source, expected_digest=expected_digest)


def pin(data: bytes, source: str, *, expected_digest: str | None = None) -> PinnedBytes:
    """Manifest bytes read from ``source`` with their digest, checked against
    ``expected_digest`` (``FormatError`` if it differs)."""
    from ocixfs.http import redact

    if expected_digest is not None:
        expected_digest = check_digest(expected_digest)
    digest = manifest_digest(data)
    shown = redact(source)
    if expected_digest is not None and not hmac.compare_digest(digest, expected_digest):
        raise FormatError(f"{shown}: digest is {digest}, expected {expected_digest}")
    name = shown if is_url(source) else os.path.basename(source) or source
    return PinnedBytes(source=source, name=name, digest=digest, data=data)
