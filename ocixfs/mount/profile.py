"""Access profiles: which files a start-up touched, in order, so the next mount can fetch
them before they are asked for.

A profile names paths, not hashes, so one recorded on version N of an image serves
version N+1 too. On the wire it is canonical CBOR::

    {"version": 1, "entries": [[path, ms], ...],      ; ms = first access, ms after mount
     ? "pack": [[digest, size], ...]}                  ; the plan its pack set was made for

sorted by ``ms`` then path. ``pack`` (written by ``ocixfs profile pack`` and ``build
--profile-cmd``) lists the blobs, in order, that the profile's pack set in the store
holds (its name is ``store.pack.pack_set_id`` of them): a mount can ask for that set
before its manifest has even arrived, since every entry is verified by its own hash.
``merge`` combines runs (e.g. from many hosts) keeping each path's earliest time (and no
pack: the merged profile's plan is another). Decoding is bounded like manifests are: a
profile may come from the network (``IMAGE.ocix.profile`` beside a remote manifest), so
it is read in place (``format.CanonicalReader``), the entry count taken from the list's
header and refused before a single entry is built, and only canonical CBOR is accepted. A
profile file is opened without waiting and must be a regular file; a URL's download takes
at most the fetch ``deadline``.

Where profiles live: ``locate_profile`` picks the one a mount plays (``--prefetch``), from
a named file, ``IMAGE.profile`` beside the manifest (``profile_beside``; a URL too), the
host's own recording, ``cached_profile_path`` in the cache directory, which the daemon
writes with ``save_profile`` at unmount, or, when this host never ran the image, the host
profile of a related image (``borrow_profile``: the one whose paths are most often regular
files of this tree). The result says where it came from (``ChosenProfile``). This module
imports nothing heavy: ``ocixfs mount`` uses it before the daemon's modules are loaded.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import cbor2

from ocixfs.cache.layout import PROFILES
from ocixfs.config import DEFAULT_FETCH_CONFIG, FetchConfig
from ocixfs.errors import FormatError, OcixError
from ocixfs.image.format import CanonicalReader, Chunk, Limits, reading
from ocixfs.safefs import write_atomically

if TYPE_CHECKING:
    from ocixfs.image.tree import Tree

__all__ = [
    "PROFILE_VERSION",
    "AccessRecorder",
    "ChosenProfile",
    "Profile",
    "ProfileSource",
    "borrow_profile",
    "cached_profile_path",
    "count_in_tree",
    "decode_profile",
    "encode_profile",
    "locate_profile",
    "merge",
    "profile_beside",
    "read_named_profile",
    "read_profile_file",
    "save_profile",
]

log = logging.getLogger(__name__)

_SUFFIX = ".profile"
_HOST_PROFILE_NAME = re.compile(r"[0-9a-f]{64}\.profile")  # CACHE/profiles/<hex>.profile

PROFILE_VERSION = 1
MAX_PROFILE_BYTES = 64 << 20
MAX_PROFILE_ENTRIES = 2_000_000
MAX_PATH_BYTES = 4096
BORROW_SCAN = 64  # host profiles read when borrowing: the most recently written
BORROW_MAX_BYTES = 1 << 20  # larger host profiles are not read when borrowing
BORROW_TOTAL_BYTES = 8 << 20  # … and no more than this in all: a first mount waits for it
BORROW_MIN_SHARE = 0.5  # a borrowed profile's paths: more than this share are files here


@dataclass(frozen=True, slots=True)
class Profile:
    """Paths in first-access order, with the milliseconds after mount of each access;
    ``pack``: the blobs of the profile's pack set, in order (empty when it names none)."""

    entries: tuple[tuple[str, int], ...]
    pack: tuple[Chunk, ...] = ()

    @property
    def paths(self) -> list[str]:
        return [path for path, _ in self.entries]


ProfileSource = Literal["file", "beside", "host", "borrowed"]


@dataclass(frozen=True, slots=True)
class ChosenProfile:
    """The profile a mount plays and where it came from: ``source`` is ``file`` (named
    by ``--prefetch FILE``), ``beside`` (shipped with the image), ``host`` (this host's
    recording of this image) or ``borrowed`` (this host's recording of a related image);
    ``name`` is the file, the image, or the ``b3:`` digest of the image recorded;
    ``in_tree`` how many of its paths are regular files of the mounted tree."""

    profile: Profile
    source: ProfileSource
    name: str
    in_tree: int

    def describe(self) -> str:
        """What was played, in a few words (``ocixfs stats``, the daemon's log)."""
        return {
            "file": f"file {self.name}",
            "beside": f"beside the image ({self.name})",
            "host": f"recorded on this host for {self.name}",
            "borrowed": f"borrowed from {self.name}",
        }[self.source]

    def as_dict(self) -> dict[str, object]:
        """``played_profile`` of ``ocixfs stats --json``."""
        return {"source": self.source, "name": self.name, "description": self.describe(),
                "paths": len(self.profile.entries), "in_tree": self.in_tree}


def encode_profile(profile: Profile) -> bytes:
    ordered = sorted(profile.entries, key=lambda e: (e[1], e[0]))
    body: dict[str, object] = {"version": PROFILE_VERSION,
                               "entries": [[p, ms] for p, ms in ordered]}
    if profile.pack:
        body["pack"] = [[chunk.digest, chunk.size] for chunk in profile.pack]
    return bytes(cbor2.dumps(body, canonical=True))


def decode_profile(data: bytes, *, source: str = "profile") -> Profile:
    """Decode and validate canonical CBOR; any problem is a one-line ``FormatError``.
    Memory is bounded by the entry limit, checked from the list header first."""
    if len(data) > MAX_PROFILE_BYTES:
        raise FormatError(f"{source}: larger than {MAX_PROFILE_BYTES} bytes")
    if not data or data[0] >> 5 != 5:  # a profile is a CBOR map
        raise FormatError(f"{source}: not an ocixfs profile")
    with reading(source):
        version, entries, pack = _ProfileReader(data).profile()
    if version != PROFILE_VERSION or entries is None:
        raise FormatError(f"{source}: not an ocixfs profile (version {PROFILE_VERSION})")
    return Profile(entries, pack)


_PROFILE_LIMITS = Limits(max_depth=4)
DIGEST_SIZE = 32


class _ProfileReader(CanonicalReader):
    def __init__(self, data: bytes) -> None:
        super().__init__(data, _PROFILE_LIMITS)

    def profile(self) -> tuple[int | None, tuple[tuple[str, int], ...] | None,
                               tuple[Chunk, ...]]:
        """``(version, entries, pack)`` as found (version and entries may be missing, pack
        is empty when missing); unknown keys skipped."""
        major, count, pos = self.head(0)
        if major != 5:
            raise self.problem(f"not an ocixfs profile (version {PROFILE_VERSION})", 0)
        version = entries = None
        pack: tuple[Chunk, ...] = ()
        previous = b""
        for _ in range(count):
            previous, start, pos = self.key(pos, previous)
            name = self.utf8(start, pos)
            if name == "entries":
                entries, pos = self.entries(pos)
            elif name == "version":
                version, pos = self.read_uint(pos, "version")
            elif name == "pack":
                pack, pos = self.pack(pos)
            else:
                pos = self.skip(pos, 1)
        if pos != self.end:
            raise self.problem(f"{self.end - pos} bytes after the profile", pos)
        return version, entries, pack

    def pack(self, pos: int) -> tuple[tuple[Chunk, ...], int]:
        """``[[digest, size], ...]``: 32-byte digests, each once, sizes below 2**48."""
        major, count, after = self.head(pos)
        if major != 4 or count > MAX_PROFILE_ENTRIES:
            raise self.problem(f"pack must be a list of at most {MAX_PROFILE_ENTRIES}", pos)
        found: dict[bytes, Chunk] = {}
        for _ in range(count):
            entry_at = after
            major, length, after = self.head(after)
            if major != 4 or length != 2:
                raise self.problem("bad pack entry: not [digest, size]", entry_at)
            major, length, after = self.head(after)
            digest = self.data[after : after + length]
            after += length
            if major != 2 or len(digest) != DIGEST_SIZE or digest in found:
                raise self.problem("bad pack entry: not a 32-byte digest, or one twice",
                                   entry_at)
            size, after = self.read_uint(after, "size")
            if size >= 1 << 48:
                raise self.problem("bad pack entry: size out of range", entry_at)
            found[digest] = Chunk(size, digest)
        return tuple(found.values()), after

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
    return cache_dir / PROFILES / f"{image_digest.removeprefix('b3:')}{_SUFFIX}"


def locate_profile(
    mode: str,
    image: str,
    cache_dir: Path,
    image_digest: str,
    http: FetchConfig | None = None,
    *,
    named: Profile | None = None,
    beside: Callable[[], Profile | None] | None = None,
    tree: Tree,
) -> ChosenProfile | None:
    """The profile a mount plays back for ``--prefetch MODE``, and where it came from.

    ``none``: no profile. A file name: that file (an unreadable or invalid one is an
    error). ``auto``/``all``: ``IMAGE.profile`` beside the manifest (also for URLs), else
    the one this host recorded for the image, else the one ``borrow_profile`` picks for
    ``tree`` (the image's), else none; a broken one is logged and ignored.
    ``named``, when given, is the file's profile (``read_named_profile``, read earlier);
    ``beside``, when given, returns the result of ``profile_beside`` (looked up earlier,
    e.g. while the manifest downloaded) instead of looking again.
    """
    if mode == "none":
        return None
    from ocixfs.http import redact

    if mode not in ("auto", "all"):
        if named is None:
            named = read_named_profile(Path(mode))
        return _chosen(named, "file", os.path.abspath(mode), tree)
    found = beside() if beside is not None else profile_beside(image, http)
    if found is not None:
        return _chosen(found, "beside", redact(image), tree)
    own = _read_profile(cached_profile_path(cache_dir, image_digest), strict=False)
    if own is not None:
        return _chosen(own, "host", image_digest, tree)
    return borrow_profile(cache_dir, tree, image_digest)


def _chosen(profile: Profile, source: ProfileSource, name: str, tree: Tree) -> ChosenProfile:
    return ChosenProfile(profile, source, name, count_in_tree(profile, tree))


def borrow_profile(cache_dir: Path, tree: Tree, image_digest: str) -> ChosenProfile | None:
    """The host profile of the image most like this one, for a first mount of a new image
    version: among the ``BORROW_SCAN`` most recently written host profiles of other images
    (each at most ``BORROW_MAX_BYTES``), those with more than ``BORROW_MIN_SHARE`` of their
    paths regular files of ``tree``; of these the one with the most such paths, the most
    recent on a tie. None when none qualifies (an unrelated image borrows nothing).
    Playing it fetches only the paths the tree has (``prefetch.plan``)."""
    best: tuple[int, Profile, str] | None = None
    for path in _recent_host_profiles(cache_dir / PROFILES, image_digest):
        profile = _read_profile(path, strict=False)
        if profile is None or not profile.entries:
            continue
        present = count_in_tree(profile, tree)
        if present > BORROW_MIN_SHARE * len(profile.entries) and (
                best is None or present > best[0]):
            best = (present, profile, "b3:" + path.name.removesuffix(_SUFFIX))
    if best is None:
        return None
    log.debug("no profile for %s: borrowing the one of %s (%d of its %d paths are here)",
             image_digest, best[2], best[0], len(best[1].entries))
    return ChosenProfile(best[1], "borrowed", best[2], best[0])


def count_in_tree(profile: Profile, tree: Tree) -> int:
    """How many of the profile's paths are regular files of ``tree`` (what playing it
    can fetch). Not thread-safe: directories of the tree unfold on first use."""
    from ocixfs.image.format import Kind

    count = 0
    for path in profile.paths:
        node = tree.node_by_path(path)
        if node is not None and node.kind is Kind.REGULAR:
            count += 1
    return count


def _recent_host_profiles(directory: Path, image_digest: str) -> list[Path]:
    """The newest ``BORROW_SCAN`` regular files ``<hex>.profile`` of ``directory`` other
    than ``image_digest``'s and not larger than ``BORROW_MAX_BYTES``, newest first, as many
    as fit in ``BORROW_TOTAL_BYTES``."""
    own = cached_profile_path(Path(), image_digest).name
    found: list[tuple[int, str, int]] = []
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.name == own or not _HOST_PROFILE_NAME.fullmatch(entry.name):
                    continue
                info = entry.stat(follow_symlinks=False)
                if stat.S_ISREG(info.st_mode) and info.st_size <= BORROW_MAX_BYTES:
                    found.append((info.st_mtime_ns, entry.name, info.st_size))
    except OSError:
        return []
    found.sort(reverse=True)
    chosen, total = [], 0
    for _, name, size in found[:BORROW_SCAN]:
        total += size
        if total > BORROW_TOTAL_BYTES:
            break
        chosen.append(directory / name)
    return chosen


def profile_beside(image: str, http: FetchConfig | None = None,
                   cache_dir: Path | None = None) -> Profile | None:
    """``IMAGE.profile`` next to the manifest (a file, or a URL fetched with ``http``), or
    None when there is none or it is unusable (logged). With ``cache_dir``, a URL's answer
    is remembered there (``cache.manifests``): asked again only when it is no longer fresh,
    and then only whether it changed."""
    from ocixfs.image.loading import is_url

    if is_url(image):
        return _fetch_profile_url(image + ".profile", http or DEFAULT_FETCH_CONFIG, cache_dir)
    return _read_profile(Path(image + ".profile"), strict=False)


def read_named_profile(path: Path) -> Profile:
    """The profile file ``--prefetch FILE`` names; raises ``UsageError`` (unreadable) or
    ``FormatError`` (not a valid profile)."""
    profile = _read_profile(path, strict=True)
    assert profile is not None  # strict: raised instead
    return profile


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


def _fetch_profile_url(url: str, http: FetchConfig, cache_dir: Path | None) -> Profile | None:
    import time

    from ocixfs.cache.manifests import (
        ABSENT,
        KnownDocument,
        digest_of,
        recall,
        recall_body,
        refresh,
        remember,
    )
    from ocixfs.errors import DocumentAbsent
    from ocixfs.http import Validators, download_if_changed, redact

    known = kept = None
    if cache_dir is not None:
        known = recall(cache_dir, url)
        kept = recall_body(cache_dir, url, known, MAX_PROFILE_BYTES) if known is not None else None
    if known is not None and known.fresh() and (known.digest == ABSENT or kept is not None):
        return None if kept is None else _decode_or_warn(kept, redact(url), strict=False)
    deadline = min(http.deadline, http.document_deadline)  # optional: never worth more
    asked = time.time()
    try:
        data, validators = download_if_changed(
            url, known.validators if known is not None and kept is not None else None,
            max_bytes=MAX_PROFILE_BYTES, config=http, deadline=deadline)
    except DocumentAbsent as exc:
        if cache_dir is not None:
            remember(cache_dir, url, KnownDocument(ABSENT, Validators(max_age=exc.max_age), asked))
        return None
    except OcixError as exc:
        log.warning("%s", exc)
        return None
    if data is None:  # not modified: asked only with the validators of the body kept
        assert cache_dir is not None and known is not None and kept is not None
        refresh(cache_dir, url, known, validators, asked)
        data = kept
    elif cache_dir is not None:
        remember(cache_dir, url, KnownDocument(digest_of(data), validators, asked), data)
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
