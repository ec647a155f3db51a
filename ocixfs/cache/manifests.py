"""What this host knows of the manifests it downloaded: for a manifest URL, the digest of
the manifest last received from it and what identifies that version on the server
(``http.Validators``), so that a later mount of the same URL asks only whether it changed
(a 304 answer is a round trip instead of the whole manifest) and loads the tree from the
image index (``cache.index``) by that digest.

One small JSON file per URL, ``CACHE/manifests/<hex>.json`` (``hex`` = BLAKE3 of the
URL), written atomically; one that cannot be read, is too large, malformed or names
another URL counts as absent. A server's 304 can only bring back a manifest this host
accepted from that URL before (and ``--digest`` is checked against it as against any)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import blake3

from ocixfs.cache.layout import MANIFESTS
from ocixfs.errors import UnsafePathError
from ocixfs.http import Validators
from ocixfs.image.loading import open_regular, read_limited
from ocixfs.safefs import private_directory, write_atomically

__all__ = ["KnownManifest", "recall", "remember"]

log = logging.getLogger(__name__)

_MAX_RECORD = 8192
_DIGEST_PREFIX = "b3:"


@dataclass(frozen=True, slots=True)
class KnownManifest:
    """The manifest last downloaded from a URL: its digest, and its version's validators."""

    digest: str
    validators: Validators


def _record_path(cache_dir: Path, url: str) -> Path:
    return cache_dir / MANIFESTS / f"{blake3.blake3(url.encode()).hexdigest()}.json"


def recall(cache_dir: Path, url: str) -> KnownManifest | None:
    """What was recorded for ``url`` (None: nothing usable)."""
    path = _record_path(cache_dir, url)
    try:
        if not path.parent.is_dir():
            return None
        private_directory(path.parent, what="manifest records")
        with open_regular(path) as file:
            record = json.loads(read_limited(file, _MAX_RECORD))
        digest, etag, modified = record["digest"], record["etag"], record["last_modified"]
        if (record["url"] != url or not isinstance(digest, str)
                or not digest.startswith(_DIGEST_PREFIX) or len(digest) != 67
                or not isinstance(etag, str) or not isinstance(modified, str)):
            return None
        validators = Validators(etag, modified)
        return KnownManifest(digest, validators) if validators else None
    except (OSError, ValueError, KeyError, TypeError, UnsafePathError):
        return None


def remember(cache_dir: Path, url: str, known: KnownManifest) -> None:
    """Record ``known`` for ``url`` (nothing without validators); a failure is logged,
    never raised: the next mount just downloads the manifest whole."""
    if not known.validators:
        return
    path = _record_path(cache_dir, url)
    record = {"url": url, "digest": known.digest, "etag": known.validators.etag,
              "last_modified": known.validators.last_modified}
    try:
        private_directory(path.parent, what="manifest records")
        write_atomically(path, json.dumps(record).encode(), mode=0o600)
    except (OSError, UnsafePathError) as exc:
        log.info("cannot record %s: %s", path, exc)
