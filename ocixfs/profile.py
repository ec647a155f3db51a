"""Access profiles: which files a start-up touched, in order, so the next mount can fetch
them before they are asked for.

A profile names paths, not hashes, so one recorded on version N of an image serves
version N+1 too. On the wire it is canonical CBOR::

    {"version": 1, "entries": [[path, ms], ...]}      ; ms = first access, ms after mount

sorted by ``ms`` then path. ``merge`` combines runs (e.g. from many hosts) keeping each
path's earliest time. Decoding is bounded like manifests are: a profile may come from the
network (``IMAGE.ocix.profile`` beside a remote manifest).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import cbor2

from .errors import FormatError

__all__ = [
    "PROFILE_VERSION",
    "AccessRecorder",
    "Profile",
    "decode_profile",
    "encode_profile",
    "merge",
]

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
    """Decode and validate; any problem is a one-line ``FormatError``."""
    if len(data) > MAX_PROFILE_BYTES:
        raise FormatError(f"{source}: larger than {MAX_PROFILE_BYTES} bytes")
    try:
        body = cbor2.loads(data, max_depth=4, allow_indefinite=False, allow_duplicate_keys=False)
    except Exception as exc:  # cbor2 raises many types on hostile bytes; one boundary here
        raise FormatError(f"{source}: not a profile: {exc}") from None
    if not isinstance(body, Mapping) or body.get("version") != PROFILE_VERSION:
        raise FormatError(f"{source}: not an ocixfs profile (version {PROFILE_VERSION})")
    raw = body.get("entries")
    if not isinstance(raw, Sequence) or len(raw) > MAX_PROFILE_ENTRIES:
        raise FormatError(f"{source}: entries must be a list of at most {MAX_PROFILE_ENTRIES}")
    return Profile(tuple(_entry(item, source) for item in raw))


def _entry(item: object, source: str) -> tuple[str, int]:
    if (
        isinstance(item, Sequence)
        and len(item) == 2
        and isinstance(item[0], str)
        and item[0].startswith("/")
        and len(item[0].encode("utf-8", "surrogateescape")) <= MAX_PATH_BYTES
        and isinstance(item[1], int)
        and not isinstance(item[1], bool)
        and 0 <= item[1] < 1 << 48
    ):
        return item[0], item[1]
    raise FormatError(f"{source}: bad entry {item!r:.80}")


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
