"""Access profiles: which files a start-up touched, in order, so the next mount can fetch
them before they are asked for.

A profile names paths, not hashes, so one recorded on version N of an image serves
version N+1 too. On the wire it is canonical CBOR::

    {"version": 1, "entries": [[path, ms], ...]}      ; ms = first access, ms after mount

sorted by ``ms`` then path. ``merge`` combines runs (e.g. from many hosts) keeping each
path's earliest time. Decoding is bounded like manifests are: a profile may come from the
network (``IMAGE.ocix.profile`` beside a remote manifest), so it is read in place
(``format.CanonicalReader``), the entry count taken from the list's header and refused
before a single entry is built, and only canonical CBOR is accepted. A profile file is
opened without waiting and must be a regular file; a URL's download takes at most the
fetch ``deadline``.

Where profiles live: ``locate_profile`` picks the one a mount plays (``--prefetch``), from
a named file, ``IMAGE.profile`` beside the manifest (``profile_beside``; a URL too), or the
host's own recording, ``cached_profile_path`` in the cache directory, which the daemon
writes with ``save_profile`` at unmount. This module imports nothing heavy: ``ocixfs
mount`` uses it before the daemon's modules are loaded.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import cbor2

from ocixfs.cache.layout import PROFILES
from ocixfs.config import DEFAULT_FETCH_CONFIG, FetchConfig
from ocixfs.errors import FormatError, OcixError
from ocixfs.image.format import CanonicalReader, Limits, reading
from ocixfs.safefs import write_atomically

__all__ = [
    "PROFILE_VERSION",
    "AccessRecorder",
    "Profile",
    "cached_profile_path",
    "decode_profile",
    "encode_profile",
    "locate_profile",
    "merge",
    "profile_beside",
    "read_profile_file",
    "save_profile",
]

log = logging.getLogger(__name__)

PROFILE_VERSION = 1
MAX_PROFILE_BYTES = 64 << 20
MAX_PROFILE_ENTRIES = 2_000_000
MAX_PATH_BYTES = 4096


@dataclass(frozen=True, slots=True)
class Profile:
    """Paths in first-access order, with the milliseconds after mount of each access."""

    entries: tuple[tuple[str, int], ...]

    @property
    def paths(self) -> list[str]:
        return [path for path, _ in self.entries]


def encode_profile(profile: Profile) -> bytes:
    ordered = sorted(profile.entries, key=lambda e: (e[1], e[0]))
    body = {"version": PROFILE_VERSION, "entries": [[p, ms] for p, ms in ordered]}
    return bytes(cbor2.dumps(body, canonical=True))


def decode_profile(data: bytes, *, source: str = "profile") -> Profile:
    """Decode and validate canonical CBOR; any problem is a one-line ``FormatError``.
    Memory is bounded by the entry limit, checked from the list header first."""
    if len(data) > MAX_PROFILE_BYTES:
        raise FormatError(f"{source}: larger than {MAX_PROFILE_BYTES} bytes")
    if not data or data[0] >> 5 != 5:  # a profile is a CBOR map
        raise FormatError(f"{source}: not an ocixfs profile")
    with reading(source):
        version, entries = _ProfileReader(data).profile()
    if version != PROFILE_VERSION or entries is None:
        raise FormatError(f"{source}: not an ocixfs profile (version {PROFILE_VERSION})")
    return Profile(entries)


_PROFILE_LIMITS = Limits(max_depth=4)


class _ProfileReader(CanonicalReader):
    def __init__(self, data: bytes) -> None:
        super().__init__(data, _PROFILE_LIMITS)

    def profile(self) -> tuple[int | None, tuple[tuple[str, int], ...] | None]:
        """``(version, entries)`` as found (either may be missing); unknown keys skipped."""
        major, count, pos = self.head(0)
        if major != 5:
            raise self.problem(f"not an ocixfs profile (version {PROFILE_VERSION})", 0)
        version = entries = None
        previous = b""
        for _ in range(count):
            previous, start, pos = self.key(pos, previous)
            name = self.utf8(start, pos)
            if name == "entries":
                entries, pos = self.entries(pos)
            elif name == "version":
                version, pos = self.read_uint(pos, "version")
            else:
                pos = self.skip(pos, 1)
        if pos != self.end:
            raise self.problem(f"{self.end - pos} bytes after the profile", pos)
        return version, entries

    def entries(self, pos: int) -> tuple[tuple[tuple[str, int], ...], int]:
        major, count, after = self.head(pos)
        if major != 4 or count > MAX_PROFILE_ENTRIES:
            raise self.problem(f"entries must be a list of at most {MAX_PROFILE_ENTRIES}", pos)
        found = []
        for _ in range(count):
            entry_at = after
            major, length, after = self.head(after)
            if major != 4 or length != 2:
                raise self.problem("bad entry: not [path, ms]", entry_at)
            start, after = self.text_span(after, "path")
            if after - start > MAX_PATH_BYTES or self.data[start : start + 1] != b"/":
                raise self.problem("bad entry: not an absolute path of at most "
                                   f"{MAX_PATH_BYTES} bytes", entry_at)
            path = self.utf8(start, after)
            ms, after = self.read_uint(after, "access time")
            if ms >= 1 << 48:
                raise self.problem("bad entry: access time out of range", entry_at)
            found.append((path, ms))
        return tuple(found), after


def merge(profiles: Iterable[Profile]) -> Profile:
    """One profile from several runs: every path once, at its earliest access time."""
    earliest: dict[str, int] = {}
    for profile in profiles:
        for path, ms in profile.entries:
            if ms < earliest.get(path, ms + 1):
                earliest[path] = ms
    return Profile(tuple(sorted(earliest.items(), key=lambda e: (e[1], e[0]))))


class AccessRecorder:
    """Notes the first access of each inode since mount; cheap enough for every open.

    Runs on the trio thread only (no locking): code between two awaits is atomic.
    """

    def __init__(self) -> None:
        self._start = time.monotonic()
        self._seen: set[int] = set()
        self._entries: list[tuple[str, int]] = []

    def note_access(self, node_path: str, ino: int) -> None:
        if ino in self._seen:
            return
        self._seen.add(ino)
        self._entries.append((node_path, int((time.monotonic() - self._start) * 1000)))

    def profile(self) -> Profile:
        return Profile(tuple(self._entries))

    def __len__(self) -> int:
        return len(self._entries)


# ----------------------------------------------------------------------------------------
# Finding the profile for a mount


def cached_profile_path(cache_dir: Path, image_digest: str) -> Path:
    """Where a host keeps the profile it recorded for an image (keyed by manifest hash)."""
    return cache_dir / PROFILES / f"{image_digest.removeprefix('b3:')}.profile"


def locate_profile(
    mode: str,
    image: str,
    cache_dir: Path,
    image_digest: str,
    http: FetchConfig | None = None,
    *,
    beside: Callable[[], Profile | None] | None = None,
) -> Profile | None:
    """The profile a mount plays back for ``--prefetch MODE``.

    ``none``: no profile. A file name: that file (an unreadable or invalid one is an
    error). ``auto``/``all``: ``IMAGE.profile`` beside the manifest (also for URLs), else
    the one this host recorded for the image, else none; a broken one is logged and ignored.
    ``beside``, when given, returns the result of ``profile_beside`` (looked up earlier,
    e.g. while the manifest downloaded) instead of looking again.
    """
    if mode == "none":
        return None
    if mode not in ("auto", "all"):
        return _read_profile(Path(mode), strict=True)
    found = beside() if beside is not None else profile_beside(image, http)
    return found or _read_profile(cached_profile_path(cache_dir, image_digest), strict=False)


def profile_beside(image: str, http: FetchConfig | None = None) -> Profile | None:
    """``IMAGE.profile`` next to the manifest (a file, or a URL fetched with ``http``), or
    None when there is none or it is unusable (logged)."""
    from ocixfs.image.loading import is_url

    if is_url(image):
        return _fetch_profile_url(image + ".profile", http or DEFAULT_FETCH_CONFIG)
    return _read_profile(Path(image + ".profile"), strict=False)


def _read_profile(path: Path, *, strict: bool) -> Profile | None:
    from ocixfs.errors import UsageError

    try:
        data = read_profile_file(path)
    except FileNotFoundError:
        if strict:
            raise UsageError(f"{path}: no such profile") from None
        return None
    except OSError as exc:
        if strict:
            raise UsageError(f"{path}: {exc.strerror}") from None
        log.warning("ignoring %s: %s", path, exc.strerror)
        return None
    return _decode_or_warn(data, os.fspath(path), strict=strict)


def read_profile_file(path: Path) -> bytes:
    """The bytes of a profile file (at most ``MAX_PROFILE_BYTES + 1``), never waiting on a
    FIFO or device planted under its name. Raises ``OSError``."""
    from ocixfs.image.loading import open_regular, read_limited

    with open_regular(path) as file:
        return read_limited(file, MAX_PROFILE_BYTES)


def _fetch_profile_url(url: str, http: FetchConfig) -> Profile | None:
    from ocixfs.errors import BlobNotFound
    from ocixfs.http import download, redact

    deadline = min(http.deadline, http.document_deadline)  # optional: never worth more
    try:
        data = download(url, max_bytes=MAX_PROFILE_BYTES, config=http, deadline=deadline)
    except BlobNotFound:
        return None
    except OcixError as exc:
        log.warning("%s", exc)
        return None
    return _decode_or_warn(data, redact(url), strict=False)


def _decode_or_warn(data: bytes, source: str, *, strict: bool) -> Profile | None:
    try:
        return decode_profile(data, source=source)
    except FormatError as exc:
        if strict:
            raise
        log.warning("ignoring %s", exc)
        return None


def save_profile(path: Path, profile: Profile) -> None:
    """Write with ``write_atomically`` (a fresh random temp name, never a planted file or
    symlink; then rename); a failure is logged, never raised. The caller made the
    directory (the cache's ``profiles/`` is made here, inside the checked cache)."""
    try:
        if path.parent.name == PROFILES:
            path.parent.mkdir(mode=0o700, exist_ok=True)
        write_atomically(path, encode_profile(profile))
    except OSError as exc:
        log.warning("cannot save profile %s: %s", path, exc.strerror)
