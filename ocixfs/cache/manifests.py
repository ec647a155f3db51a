"""What this host knows of the documents it downloaded from URLs, manifests and the
profiles beside them: for a URL, the digest of what it last sent (or that it had nothing
there) and what identifies that version on the server (``http.Validators``), so that a
later mount of the same URL asks only whether it changed (a 304 answer is a round trip
instead of the whole document) and takes a manifest's tree from the image index
(``cache.index``) by that digest, a profile from the copy kept here. While the version is
fresh (the server's ``Cache-Control: max-age`` or ``Expires``, counted from its last
answer; for a 404 too) it does not even ask. A manifest file is recorded the same way
under its ``file://`` URL, its version the file's identity (``file_version``), so that a
file mounted again unchanged is not even read.

One small JSON file per URL, ``CACHE/manifests/<hex>.json`` (``hex`` = BLAKE3 of the
URL), and for a profile its bytes in ``<hex>.body``, each written atomically; the
``KEEP_RECORDS`` most recently used are kept (a recall touches its record, at most once an
hour); one that cannot be read, is too large, malformed, names another URL or (a body)
does not hash to the recorded digest counts as absent. A server's 304 can only bring back
a document this host accepted from that URL before (and ``--digest`` is checked against
it as against any)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import blake3

from ocixfs.cache.layout import MANIFESTS, TOUCH_INTERVAL
from ocixfs.errors import UnsafePathError
from ocixfs.http import Validators
from ocixfs.image.loading import open_regular, read_limited
from ocixfs.safefs import private_directory, write_atomically

__all__ = ["ABSENT", "KEEP_RECORDS", "KnownDocument", "digest_of", "file_version", "recall",
           "recall_body", "refresh", "remember"]

log = logging.getLogger(__name__)

KEEP_RECORDS = 256
_MAX_RECORD = 8192
_DIGEST_PREFIX = "b3:"
ABSENT = ""


@dataclass(frozen=True, slots=True)
class KnownDocument:
    """What a URL last sent: its digest (``ABSENT``: a 404/410), its version's validators,
    and when the server last said that version was current (POSIX time)."""

    digest: str
    validators: Validators
    checked: float

    def fresh(self) -> bool:
        """Whether that version is still current without asking (``Validators.max_age``
        from ``checked``; never when the clock is before ``checked``)."""
        return 0.0 <= time.time() - self.checked < self.validators.max_age


_RACY_NS = 2_000_000_000


def file_version(path: str) -> Validators | None:
    """What identifies the version of the manifest file at ``path``, as a server's ``ETag``
    would: its device, inode, size, mtime and ctime (a file written or replaced changes
    one of them; ctime cannot be set back). None when it is not a regular file, or was
    modified in the last two seconds: timestamps advance in clock ticks, so a file may be
    written again within the tick it shows and keep all five."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or time.time_ns() - st.st_ctime_ns < _RACY_NS:
        return None
    return Validators(etag=f"file {st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:"
                           f"{st.st_ctime_ns}")


def _record_path(cache_dir: Path, url: str) -> Path:
    return cache_dir / MANIFESTS / f"{blake3.blake3(url.encode()).hexdigest()}.json"


def _body_path(cache_dir: Path, url: str) -> Path:
    return _record_path(cache_dir, url).with_suffix(".body")


def digest_of(body: bytes) -> str:
    """The digest a record names ``body`` by."""
    return _DIGEST_PREFIX + blake3.blake3(body).hexdigest()


def recall(cache_dir: Path, url: str) -> KnownDocument | None:
    """What was recorded for ``url`` (None: nothing usable)."""
    path = _record_path(cache_dir, url)
    try:
        if not path.parent.is_dir():
            return None
        private_directory(path.parent, what="manifest records")
        with open_regular(path) as file:
            record = json.loads(read_limited(file, _MAX_RECORD))
            touched = os.fstat(file.fileno()).st_mtime
        digest, etag, modified = record["digest"], record["etag"], record["last_modified"]
        checked, max_age = record.get("checked", 0.0), record.get("max_age", 0.0)
        if (record["url"] != url or not isinstance(digest, str)
                or digest != ABSENT and not (digest.startswith(_DIGEST_PREFIX)
                                             and len(digest) == 67)
                or not isinstance(etag, str) or not isinstance(modified, str)
                or not all(isinstance(n, float | int) and not isinstance(n, bool)
                           for n in (checked, max_age))):
            return None
        validators = Validators(etag, modified, float(max_age))
        if not (validators or validators.max_age > 0):
            return None
        if time.time() - touched > TOUCH_INTERVAL:  # used: among the last to be trimmed
            with contextlib.suppress(OSError):
                os.utime(path, follow_symlinks=False)
        return KnownDocument(digest, validators, float(checked))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, UnsafePathError):
        return None


def recall_body(cache_dir: Path, url: str, known: KnownDocument, max_bytes: int) -> bytes | None:
    """The body kept for ``url`` (``remember(..., body=)``) if it is what ``known`` names
    and at most ``max_bytes`` long; else None."""
    if known.digest == ABSENT:
        return None
    try:
        with open_regular(_body_path(cache_dir, url)) as file:
            body = read_limited(file, max_bytes)
    except (OSError, ValueError):
        return None
    return body if digest_of(body) == known.digest else None


def remember(cache_dir: Path, url: str, known: KnownDocument, body: bytes | None = None) -> None:
    """Record ``known`` for ``url`` (nothing when it can be neither revalidated nor fresh),
    with ``body`` kept beside it when given (a profile; a manifest's tree is in the index);
    a failure is logged, never raised: the next mount just downloads the document whole."""
    validators = known.validators
    if not (validators or validators.max_age > 0):
        return
    path = _record_path(cache_dir, url)
    record = {"url": url, "digest": known.digest, "etag": validators.etag,
              "last_modified": validators.last_modified, "checked": known.checked,
              "max_age": validators.max_age}
    try:
        private_directory(path.parent, what="manifest records")
        if body is not None:
            write_atomically(_body_path(cache_dir, url), body, mode=0o600)
        write_atomically(path, json.dumps(record).encode(), mode=0o600)
        _trim(path.parent)
    except (OSError, UnsafePathError) as exc:
        log.info("cannot record %s: %s", path, exc)


def refresh(cache_dir: Path, url: str, known: KnownDocument, validators: Validators,
            asked: float) -> None:
    """After a 304 to a request made at ``asked`` with ``known``'s validators: record the
    freshness it gave. Nothing to write when it gave none: the record still revalidates."""
    if validators.max_age > 0:
        remember(cache_dir, url, KnownDocument(known.digest, validators, asked))


def _trim(directory: Path) -> None:
    """Remove the least recently used records (and their bodies) beyond ``KEEP_RECORDS``."""
    found = []
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.endswith(".json") and entry.is_file(follow_symlinks=False):
                found.append((entry.stat(follow_symlinks=False).st_mtime_ns, entry.path))
    found.sort(reverse=True)
    for _, record in found[KEEP_RECORDS:]:
        for path in (record, record.removesuffix(".json") + ".body"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
