"""The exceptions ocixfs raises, and where each family comes from.

::

    OcixError                    base of everything ocixfs raises on purpose
    ├── FormatError              a manifest (or profile) is malformed or violates a limit
    ├── BuildError               a build source is unusable (bad layer, escaping path, ...)
    ├── StoreError               a blob store could not be written or read locally
    ├── CacheError               the local cache could not store or serve a blob
    │   └── CacheFullError       ... because the disk or the quota is full
    ├── UnsafePathError          a path another user could change under us was refused
    ├── FetchError               no source delivered a verified blob (HTTP, file://)
    │   ├── BlobNotFound         every source answered "not there"
    │   │   └── DocumentAbsent   a manifest or profile URL answered 404/410
    │   ├── BlobCorrupt          a source delivered bytes whose hash did not match
    │   └── FetchTimeout         the overall deadline passed
    └── UsageError               the user asked for something impossible (bad option, ...)

Lower-level errors (httpx, OSError, cbor2) are translated into these at exactly one place
per layer: the fetcher for the network, the format decoder for CBOR. The FUSE layer maps
every ``OcixError`` (and anything unexpected) to ``EIO``; the command line prints the
message as one line and exits non-zero.
"""

from __future__ import annotations

__all__ = [
    "BlobCorrupt",
    "BlobNotFound",
    "BuildError",
    "CacheError",
    "CacheFullError",
    "DocumentAbsent",
    "FetchError",
    "FetchTimeout",
    "FormatError",
    "OcixError",
    "StoreError",
    "UnsafePathError",
    "UsageError",
    "leaf_exceptions",
]


class OcixError(Exception):
    """Base class: a failure ocixfs understands and can explain in one line."""


class FormatError(OcixError):
    """A manifest or profile is not valid OCIX (or exceeds a safety limit)."""


class BuildError(OcixError):
    """A build source cannot be turned into an image."""


class StoreError(OcixError):
    """A blob store could not be read or written."""


class CacheError(OcixError):
    """The local cache could not store or serve a blob."""


class CacheFullError(CacheError):
    """No space (disk or quota) to store a blob."""


class UnsafePathError(OcixError):
    """A directory or file that another user on the host could change while ocixfs, maybe
    as root, works in it (owned by someone else, writable by others, a planted symlink)."""


class FetchError(OcixError):
    """No source delivered a verified copy of a blob."""


class BlobNotFound(FetchError):
    """Every source said the blob does not exist."""


class DocumentAbsent(BlobNotFound):
    """A server said the document at a URL is not there (404/410); ``max_age`` is how many
    seconds that answer stays current (RFC 9111, as ``http.Validators.max_age``)."""

    def __init__(self, message: str, max_age: float = 0.0) -> None:
        super().__init__(message)
        self.max_age = max_age


class BlobCorrupt(FetchError):
    """A source delivered bytes whose BLAKE3 hash did not match the name."""


class FetchTimeout(FetchError):
    """The overall deadline for a blob passed."""


class UsageError(OcixError):
    """The command line asked for something that cannot be done."""


def leaf_exceptions(exc: BaseException) -> list[BaseException]:
    """The exceptions inside ``exc``, exception groups (trio wraps what a nursery raises)
    flattened, in order; ``[exc]`` for a plain exception."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaf_exceptions(inner)]
    return [exc]
