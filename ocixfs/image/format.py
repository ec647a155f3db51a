"""OCIX manifests: the data model, strict decoding and canonical encoding.

Pure: no disk, no network. ``decode`` treats its input as hostile (size, depth, entry-count
limits; every path, type, hash and hardlink checked) and raises only ``FormatError``, with
one line ``"<source>: <path>: <problem>"``. ``encode`` writes canonical CBOR (RFC 7049
§3.9), so the same tree always gives the same bytes. Version 0 is what the reference tool
``cbormanifest`` writes; version 1 adds ``xattrs`` and chunk lists (see docs/design.md).

Canonical input only. The decoder is a small schema-directed CBOR reader, not cbor2:
cbor2 keeps no encoding details and decodes semantic tags itself, so proving canonical form
with it means re-encoding everything and comparing (for 100,000 entries, 1.5 s on top of
its 0.9 s decode on the development machine, before any validation), and it cannot stop
at an oversized ``files`` header. This reader checks, in the one pass that also builds the
model, that every byte is the one the canonical encoder would have written: shortest-form
integers and lengths, definite lengths, map keys in strictly increasing length-then-bytewise
order (so no duplicates), floats in their shortest exact width, valid UTF-8, no tags except
the OCIX tag at the top and 0/1 on times, nothing after the manifest. So it accepts exactly
the canonical encodings, which the reference tool's encoder (fxamacker/cbor
``CanonicalEncOptions``) guarantees, and ``encode(decode(b)) == b`` for every ``b`` that
``encode`` wrote. For reference files the two can differ only in values, never in
encoding: unknown keys are dropped, and time text that is not UTC RFC3339Nano is normalised
(the model keeps instants, not spellings). The entry count is checked against the limit
from the ``files`` map header, before any entry is decoded.

Times are kept as integer nanoseconds since the epoch and always written as RFC 3339 text
in UTC with Go's RFC3339Nano precision rules (trailing zeros dropped); a manifest written
with a local UTC offset decodes to the same instants and re-encodes with ``Z``. Times must
fall within the years 0001-9999. Decoding also accepts tag 0 text and tag 1 epoch numbers.

Rules beyond the wire shape (all enforced by ``decode`` and ``encode`` alike): paths are
canonical; an existing ancestor of any path is a directory; a hardlink names an existing
regular file that sorts before it (so the target is the lowest of the file's names) and
carries no metadata of its own; device numbers fit Linux (major < 2^12, minor < 2^20);
xattrs and chunk lists need version 1 and are never empty.
"""

from __future__ import annotations

import datetime
import enum
import gc
import re
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from functools import cache, lru_cache
from operator import itemgetter
from typing import Any, cast

from ocixfs.errors import FormatError

__all__ = [
    "DEFAULT_LIMITS",
    "CanonicalReader",
    "HASH_SIZE",
    "LATEST_VERSION",
    "MAX_DEVICE_MAJOR",
    "MAX_DEVICE_MINOR",
    "MAX_TIME_NS",
    "MIN_TIME_NS",
    "OCIX_TAG",
    "SUPPORTED_VERSIONS",
    "Chunk",
    "Entry",
    "FormatError",
    "Kind",
    "Limits",
    "Manifest",
    "check_path",
    "decode",
    "encode",
    "format_time",
    "join_path",
    "manifest_digest",
    "mode_string",
    "parent",
    "parse_time",
    "path_sort_key",
    "reading",
    "split_path",
]

OCIX_TAG = 1868786040
HASH_SIZE = 32
SUPPORTED_VERSIONS = (0, 1)
LATEST_VERSION = 1
MAX_DEVICE_MAJOR = (1 << 12) - 1
MAX_DEVICE_MINOR = (1 << 20) - 1
MIN_TIME_NS = -62135596800 * 10**9  # 0001-01-01T00:00:00Z
MAX_TIME_NS = 253402300800 * 10**9 - 1  # 9999-12-31T23:59:59.999999999Z


class Kind(enum.Enum):
    """The ``type`` of an entry; the value is the wire name (also its content key)."""

    REGULAR = "regularfile"
    DIRECTORY = "directory"
    SYMLINK = "symlink"
    HARDLINK = "link"
    CHARACTER = "character"
    BLOCK = "block"
    FIFO = "fifo"


@dataclass(frozen=True, slots=True)
class Chunk:
    """A blob: ``size`` bytes whose BLAKE3-256 hash is ``digest`` (32 bytes)."""

    size: int
    digest: bytes

    @property
    def hex(self) -> str:
        return self.digest.hex()


@dataclass(frozen=True, slots=True)
class Entry:
    """One manifest entry, mirroring the wire: ``None`` means the key is absent.

    - ``mode``: permission bits including setuid/setgid/sticky (``& 0o7777``); ``None``
      only on hardlinks.
    - ``uid``/``gid``: ``None`` means absent, which means 0.
    - times: integer nanoseconds since the epoch, or ``None``.
    - REGULAR: ``size`` and ``digest`` (``None`` only when size is 0); ``chunks`` is the
      v1 chunk list or ``None``.
    - SYMLINK: ``target`` is the link text. HARDLINK: ``target`` is the absolute path of the
      regular file it names, and every other field is ``None``/default.
    - CHARACTER/BLOCK: ``rdev`` is ``(major, minor)``.
    - ``xattrs``: v1 extended attributes, name → value; ``None`` when absent.
    """

    kind: Kind
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    username: str | None = None
    groupname: str | None = None
    atime: int | None = None
    btime: int | None = None
    ctime: int | None = None
    mtime: int | None = None
    size: int = 0
    digest: bytes | None = None
    chunks: tuple[Chunk, ...] | None = None
    target: str | None = None
    rdev: tuple[int, int] | None = None
    xattrs: Mapping[str, bytes] | None = None

    @property
    def blobs(self) -> tuple[Chunk, ...]:
        """The blobs holding this regular file's content, in order (empty for size 0)."""
        if self.chunks is not None:
            return self.chunks
        if self.size == 0 or self.digest is None:
            return ()
        return (Chunk(self.size, self.digest),)


@dataclass(frozen=True, slots=True)
class Manifest:
    """A decoded image: the version and its entries, path → entry, in canonical order."""

    version: int
    entries: Mapping[str, Entry] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Bounds applied while decoding untrusted manifests."""

    max_bytes: int = 1 << 30
    max_entries: int = 4_000_000
    max_depth: int = 16
    max_path_bytes: int = 4096
    max_name_bytes: int = 255
    max_symlink_bytes: int = 4096
    max_xattrs_bytes: int = 64 * 1024
    max_chunks: int = 1 << 20
    max_file_size: int = 1 << 50


DEFAULT_LIMITS = Limits()


# ---------------------------------------------------------------------------------------
# Public helpers


def parent(path: str) -> str:
    """The parent of a canonical path (``"/"`` is its own parent)."""
    return path[: path.rindex("/")] or "/"


def split_path(path: str) -> tuple[str, ...]:
    """The components of a canonical path; ``()`` for the root."""
    return () if path == "/" else tuple(path[1:].split("/"))


def join_path(directory: str, name: str) -> str:
    """The canonical path of ``name`` inside ``directory``."""
    return "/" + name if directory == "/" else f"{directory}/{name}"


def path_sort_key(path: str) -> tuple[int, bytes]:
    """Canonical order of paths (CBOR map-key order): UTF-8 length first, then bytewise.

    A hardlink's target is the lowest of the file's names in this order.
    """
    encoded = path.encode()
    return len(encoded), encoded


def check_path(path: str, limits: Limits = DEFAULT_LIMITS) -> None:
    """Raise ``FormatError`` unless ``path`` is a canonical absolute path within ``limits``."""
    try:
        _check_path(path, limits)
    except _Problem as problem:
        problem.path = path
        raise FormatError(problem.render("path")) from None


def mode_string(entry: Entry, mode: int | None = None) -> str:
    """``ls -l`` style type and permissions, e.g. ``drwxr-xr-x`` or ``-rwsr-xr-t``.

    ``mode`` overrides ``entry.mode`` (a hardlink has none; pass its target's). Hardlinks
    show as ``h`` like ``tar tv``.
    """
    bits = (entry.mode if mode is None else mode) or 0
    return _TYPE_CHARS[entry.kind] + "".join(
        _rwx(bits >> shift, bits & special, mark)
        for shift, special, mark in ((6, 0o4000, "s"), (3, 0o2000, "s"), (0, 0o1000, "t"))
    )


def _rwx(bits: int, special: int, mark: str) -> str:
    execute = bits & 1
    last = (mark if execute else mark.upper()) if special else ("x" if execute else "-")
    return ("r" if bits & 4 else "-") + ("w" if bits & 2 else "-") + last


_TYPE_CHARS = {
    Kind.REGULAR: "-",
    Kind.DIRECTORY: "d",
    Kind.SYMLINK: "l",
    Kind.HARDLINK: "h",
    Kind.CHARACTER: "c",
    Kind.BLOCK: "b",
    Kind.FIFO: "p",
}


def format_time(ns: int) -> str:
    """Nanoseconds since the epoch as Go RFC3339Nano text in UTC (the encoder's form)."""
    if type(ns) is not int or not MIN_TIME_NS <= ns <= MAX_TIME_NS:
        raise FormatError(f"time {_show(ns)} is outside the years 0001-9999")
    seconds, fraction = divmod(ns, 1_000_000_000)
    days, seconds = divmod(seconds, 86400)
    hours, minutes, seconds = seconds // 3600, seconds // 60 % 60, seconds % 60
    text = f"{_date_prefix(days)}{hours:02d}:{minutes:02d}:{seconds:02d}"
    if fraction:
        text += f".{fraction:09d}".rstrip("0")
    return text + "Z"


def parse_time(text: str) -> int:
    """RFC 3339 text (any offset, up to nanosecond precision) as nanoseconds since the epoch."""
    try:
        return _parse_time(text)
    except _Problem as problem:
        raise FormatError(problem.render("time")) from None


_EPOCH_ORDINAL = datetime.date(1970, 1, 1).toordinal()
_RFC3339 = re.compile(
    r"(\d{4}-\d\d-\d\d)[Tt](\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?(?:[Zz]|([+-])(\d\d):(\d\d))",
    re.ASCII,
)


def _parse_time(text: str) -> int:
    match = _RFC3339.fullmatch(text)
    if match is None:
        raise _Problem(f"{_show(text)} is not RFC 3339 time")
    date, hour, minute, second, fraction, sign, offset_hours, offset_minutes = match.groups()
    days = _days_since_epoch(date)
    if days is None:
        raise _Problem(f"{_show(text)} is not a valid date")
    if hour > "23" or minute > "59" or second > "59":
        raise _Problem(f"{_show(text)} is not a valid time of day")
    seconds = days * 86400 + int(hour) * 3600 + int(minute) * 60 + int(second)
    if sign is not None:
        if int(offset_hours) > 23 or int(offset_minutes) > 59:
            raise _Problem(f"{_show(text)} has an invalid UTC offset")
        offset = int(offset_hours) * 3600 + int(offset_minutes) * 60
        seconds -= offset if sign == "+" else -offset
    ns = seconds * 1_000_000_000 + (int(fraction.ljust(9, "0")) if fraction else 0)
    if not MIN_TIME_NS <= ns <= MAX_TIME_NS:
        raise _Problem(f"{_show(text)} is outside the years 0001-9999")
    return ns


@lru_cache(maxsize=4096)
def _days_since_epoch(date: str) -> int | None:
    try:
        day = datetime.date(int(date[:4]), int(date[5:7]), int(date[8:]))
    except ValueError:
        return None
    return day.toordinal() - _EPOCH_ORDINAL


@lru_cache(maxsize=4096)
def _date_prefix(days: int) -> str:
    day = datetime.date.fromordinal(days + _EPOCH_ORDINAL)
    return f"{day.year:04d}-{day.month:02d}-{day.day:02d}T"


def manifest_digest(data: bytes) -> str:
    """The pinning/identity string of manifest bytes: ``b3:<64 hex>``."""
    import blake3

    return "b3:" + blake3.blake3(data).hexdigest()


# ---------------------------------------------------------------------------------------
# Errors


class _Problem(Exception):
    """An internal validation failure, turned into one ``FormatError`` line at the API edge."""

    def __init__(self, message: str, offset: int | None = None, path: object = None) -> None:
        super().__init__(message)
        self.message = message
        self.offset = offset
        self.path = path

    def render(self, source: str) -> str:
        where = "" if self.path is None else f"{_show(self.path)}: "
        at = "" if self.offset is None else f" (at byte {self.offset})"
        return f"{source}: {where}{self.message}{at}"


def _show(value: object, limit: int = 160) -> str:
    """``value`` fit for a one-line message: control characters escaped, long text cut."""
    text = value if isinstance(value, str) else repr(value)
    if not text.isprintable():
        text = ascii(text)[1:-1]
    return text if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------------------------------
# Decoding


def decode(data: bytes, *, limits: Limits = DEFAULT_LIMITS, source: str = "manifest") -> Manifest:
    """Decode and validate a whole manifest; raise ``FormatError`` with a one-line reason.

    ``source`` names the input in messages (``"<source>: <path>: <problem>"``).
    """
    if len(data) > limits.max_bytes:
        raise FormatError(f"{source}: {len(data)} bytes exceed the limit of {limits.max_bytes}")
    return _decode(data, limits, source, fast=True)


def _decode(data: bytes, limits: Limits, source: str, *, fast: bool) -> Manifest:
    """``decode`` once the size is checked; ``fast`` False reads every entry with the
    general reader (the fast path must give the same result or the same error: a test
    compares them)."""
    if not isinstance(data, bytes):
        data = bytes(data)
    # Hundreds of thousands of long-lived objects made in one go: the cyclic collector
    # would re-scan them over and over as they grow (a tenth of the decode), and a
    # decode makes no cycles.
    collecting = gc.isenabled()
    gc.disable()
    try:
        with reading(source):
            reader = _Reader(data, limits, fast=fast)
            version, entries = reader.manifest()
            _check_manifest(version, entries, limits, reader.unchecked)
    finally:
        if collecting:
            gc.enable()
    return Manifest(version, entries)


@contextmanager
def reading(source: str) -> Iterator[None]:
    """Report a ``CanonicalReader`` problem (or runaway nesting) raised inside as one
    ``FormatError`` line naming ``source``."""
    try:
        yield
    except _Problem as problem:
        raise FormatError(problem.render(source)) from None
    except RecursionError:
        raise FormatError(f"{source}: nested too deeply") from None


_HEAD_MINIMUM = (24, 1 << 8, 1 << 16, 1 << 32)
_CONTENT_KEYS = frozenset(kind.value for kind in Kind)
_TRUNCATED = "unexpected end of data"


class CanonicalReader:
    """Items of canonical CBOR read in place, without building objects for what is only
    checked or counted: a container's length comes from its header, so a caller can
    refuse an oversized one before reading a single element. Shared by the manifest
    decoder and other hostile documents (access profiles).

    Methods take the offset of an item and return ``(value, offset after it)``; a problem
    raises an internal exception that ``reading(source)`` turns into one ``FormatError``
    line. ``skip`` nests at most ``limits.max_depth`` deep.
    """

    def __init__(self, data: bytes, limits: Limits = DEFAULT_LIMITS) -> None:
        self.data = data
        self.end = len(data)
        self.limits = limits

    @staticmethod
    def problem(message: str, pos: int | None = None) -> Exception:
        """An error for ``reading`` to report as ``"<source>: <message> (at byte <pos>)"``."""
        return _Problem(message, pos)

    def head(self, pos: int) -> tuple[int, int, int]:
        """``(major type, argument, offset after the head)``; checks shortest form."""
        if pos >= self.end:
            raise _Problem(_TRUNCATED, pos)
        initial = self.data[pos]
        major = initial >> 5
        info = initial & 0x1F
        if info < 24:
            return major, info, pos + 1
        if info > 27:
            if info == 31 and 2 <= major <= 5:
                raise _Problem("indefinite-length item", pos)
            raise _Problem("malformed CBOR (reserved or unexpected break)", pos)
        after = pos + 1 + (1 << (info - 24))
        if after > self.end:
            raise _Problem(_TRUNCATED, pos)
        argument = int.from_bytes(self.data[pos + 1 : after], "big")
        if argument < _HEAD_MINIMUM[info - 24] and major != 7:
            raise _Problem("integer or length not in shortest form", pos)
        return major, argument, after


    def text_span(self, pos: int, what: str) -> tuple[int, int]:
        """Where the text of the text item at ``pos`` starts and ends."""
        initial = self.data[pos] if pos < self.end else 0
        if 0x60 <= initial < 0x78:
            start = pos + 1
            after = start + initial - 0x60
        else:
            major, length, start = self.head(pos)
            if major != 3:
                raise _Problem(f"{what} is not text", pos)
            after = start + length
        if after > self.end:
            raise _Problem(_TRUNCATED, pos)
        return start, after


    def key(self, pos: int, previous: bytes) -> tuple[bytes, int, int]:
        """A text map key that must sort after ``previous``: (encoded key, text start, end)."""
        initial = self.data[pos] if pos < self.end else 0
        if 0x60 <= initial < 0x78 and pos + initial - 0x5F <= self.end:
            start = pos + 1
            after = start + initial - 0x60
        else:
            start, after = self.text_span(pos, "map key")
        encoded = self.data[pos:after]
        if len(encoded) <= len(previous) and (len(encoded) < len(previous) or encoded <= previous):
            raise _key_order_problem(previous, encoded, pos)
        return encoded, start, after


    def utf8(self, start: int, after: int) -> str:
        try:
            return self.data[start:after].decode()
        except UnicodeDecodeError:
            raise _Problem("text is not valid UTF-8", start) from None


    def read_uint(self, pos: int, what: str) -> tuple[int, int]:
        initial = self.data[pos] if pos < self.end else 0xFF
        if initial < 24:
            return initial, pos + 1
        major, value, after = self.head(pos)
        if major != 0:
            raise _Problem(f"{what} is not an unsigned integer", pos)
        return value, after


    def read_text(self, pos: int, what: str) -> tuple[str, int]:
        start, after = self.text_span(pos, what)
        return self.utf8(start, after), after


    def skip(self, pos: int, depth: int) -> int:
        """Check one well-formed canonical item of any shape (an unknown key's value)."""
        if depth > self.limits.max_depth:
            raise _Problem(f"nested deeper than {self.limits.max_depth}", pos)
        major, argument, after = self.head(pos)
        if major <= 1:
            return after
        if major <= 3:
            end = after + argument
            if end > self.end:
                raise _Problem(_TRUNCATED, pos)
            if major == 3:
                self.utf8(after, end)
            return end
        if major == 4:
            for _ in range(argument):
                after = self.skip(after, depth + 1)
            return after
        if major == 5:
            previous = b""
            for _ in range(argument):
                key_at = after
                after = self.skip(after, depth + 1)
                encoded = self.data[key_at:after]
                if len(encoded) <= len(previous) and (
                    len(encoded) < len(previous) or encoded <= previous
                ):
                    raise _key_order_problem(previous, encoded, key_at)
                previous = encoded
                after = self.skip(after, depth + 1)
            return after
        if major == 6:
            raise _Problem(f"tag {argument} is not allowed here", pos)
        info = self.data[pos] & 0x1F
        if info == 24 and argument < 32:
            raise _Problem("malformed CBOR (two-byte simple value below 32)", pos)
        if info >= 25:
            _check_float(info, argument, pos)
        return after



class _Reader(CanonicalReader):
    """One pass over canonical CBOR with the OCIX schema in mind; see the module docstring.

    The common small forms are decoded inline: this loop runs for every item of every entry.
    """

    def __init__(self, data: bytes, limits: Limits, *, fast: bool = True) -> None:
        super().__init__(data, limits)
        self.times: dict[bytes, int] = {}
        self.modes = _ModeCodes()
        self.fast = fast
        self.unchecked: set[str] = set()
        """Paths whose entries the general reader decoded: ``_check_manifest`` checks
        these entries; the fast path checked its own (``fast_entry``)."""

    def manifest(self) -> tuple[int, dict[str, Entry]]:
        major, tag, pos = self.head(0)
        if major != 6 or tag != OCIX_TAG:
            raise _Problem(f"not an OCIX manifest (no tag {OCIX_TAG} at the start)", 0)
        major, count, pos = self.head(pos)
        if major != 5:
            raise _Problem("the tagged item is not a map", 5)
        version: int | None = None
        entries: dict[str, Entry] | None = None
        previous = b""
        for _ in range(count):
            previous, start, pos = self.key(pos, previous)
            name = _TOP_KEYS.get(previous)
            if name == "files":
                entries, pos = self.read_files(pos)
            elif name == "version":
                version, pos = self.read_uint(pos, "version")
            else:
                self.utf8(start, pos)
                pos = self.skip(pos, 2)
        if pos != self.end:
            raise _Problem(f"{self.end - pos} bytes after the manifest", pos)
        if entries is None:
            raise _Problem("no 'files' map")
        if version is None:
            raise _Problem("no 'version'")
        return version, entries

    def read_files(self, pos: int) -> tuple[dict[str, Entry], int]:
        major, count, pos = self.head(pos)
        if major != 5:
            raise _Problem("'files' is not a map", pos)
        if count > self.limits.max_entries:
            raise _Problem(f"{count} entries exceed the limit of {self.limits.max_entries}")
        entries: dict[str, Entry] = {}
        previous = b""
        fast_entry = self.fast_entry if self.fast else _no_entry
        unchecked = self.unchecked
        data, end = self.data, self.end
        for _ in range(count):
            # Inline: a path of 24 to 255 bytes after one that sorts lower (else ``key``).
            after = pos + 2 + (data[pos + 1] if pos + 1 < end else 0)
            encoded = data[pos:after]
            if (after <= end and data[pos] == 0x78 and encoded[1] >= 24
                    and (len(encoded) > len(previous)
                         or (len(encoded) == len(previous) and encoded > previous))):
                previous, start = encoded, pos + 2
            else:
                previous, start, after = self.key(pos, previous)
            path = self.utf8(start, after)
            fast = fast_entry(after)
            if fast is not None:
                entries[path], pos = fast
                continue
            unchecked.add(path)
            try:
                entries[path], pos = self.read_entry(after)
            except _Problem as problem:
                problem.path = path
                raise
        return entries, pos

    def fast_entry(self, pos: int) -> tuple[Entry, int] | None:
        """The entry at ``pos`` and the offset after it when it has the common shape
        (``_FAST_ENTRY``: a directory, a regular file of one blob or a symlink; mode,
        optional ids, owner names of up to 23 bytes and times; no xattrs or chunks) and
        every value passes ``_check_entry``; else None, and the general reader reads it
        (and reports any problem). One regular expression checks the bytes in C: its keys
        are the canonical order, its integers and lengths the shortest forms."""
        match = _FAST_ENTRY.match(self.data, pos)
        if match is None:
            return None
        groups = match.groups()
        head, gid, uid, mode, kind_item, atime, btime, ctime, mtime = groups[:9]
        symlink, username, directory, groupname, regular = groups[9:]
        kind = _KIND_BY_ENCODING[kind_item]
        end = match.end()
        target = digest = None
        size = 0
        if kind is _REGULAR_KIND:
            if regular is None or directory is not None:
                return None
            if regular[0] == 0x82:
                size, digest = _uint_item(regular[1:-34]), regular[-32:]
                if size > self.limits.max_file_size:
                    return None
        elif kind is _DIRECTORY_KIND:
            if directory is None or regular is not None:
                return None
        elif symlink is None:
            return None
        else:
            target, end = self.fast_symlink(symlink, end)
            if target is None:
                return None
        if head[0] - 0xA0 != len(groups) - 1 - groups.count(None):
            return None  # more pairs than the expression knows: the general reader
        if atime is None and btime is None and ctime is None:
            atime_ns = btime_ns = ctime_ns = None
        else:
            atime_ns, btime_ns, ctime_ns = map(self.fast_time, (atime, btime, ctime))
            if atime_ns is False or btime_ns is False or ctime_ns is False:
                return None
        mtime_ns = self.fast_time(mtime)
        if mtime_ns is False:
            return None
        try:
            user = None if username is None else username[1:].decode()
            group = None if groupname is None else groupname[1:].decode()
        except UnicodeDecodeError:
            return None
        return _new_entry(
            kind, self.modes[mode], None if uid is None else _uint_item(uid),
            None if gid is None else _uint_item(gid), user, group, atime_ns, btime_ns,
            ctime_ns, mtime_ns, size, digest, None, target), end

    def fast_symlink(self, head: bytes, pos: int) -> tuple[str | None, int]:
        """A symlink target whose text head ``fast_entry`` matched and whose bytes start
        at ``pos``, if it passes ``_check_symlink``: ``(target, offset after it)``, or
        ``(None, pos)``."""
        after = pos + (head[0] - 0x60 if len(head) == 1 else head[1])
        if after > self.end or after - pos > self.limits.max_symlink_bytes:
            return None, pos
        try:
            target = self.data[pos:after].decode()
        except UnicodeDecodeError:
            return None, pos
        if "\0" in target:
            return None, pos
        return target, after

    def fast_time(self, item: bytes | None) -> int | None | bool:
        """The instant of a time text item (as ``read_time`` reads it; remembered per
        item), None for None, or False if it is not valid RFC 3339 (the general reader
        then reports it)."""
        if item is None:
            return None
        ns = self.times.get(item)
        if ns is not None:
            return ns
        try:
            ns = _parse_time(item[2 if item[0] == 0x78 else 1 :].decode())
        except (UnicodeDecodeError, _Problem):
            return False
        self.times[item] = ns
        return ns

    def read_entry(self, pos: int) -> tuple[Entry, int]:
        initial = self.data[pos] if pos < self.end else 0
        if 0xA0 <= initial < 0xB8:
            count = initial - 0xA0
            pos += 1
        else:
            major, count, pos = self.head(pos)
            if major != 5:
                raise _Problem("entry is not a map", pos)
        fields: dict[str, Any] = {}
        content = None
        previous = b""
        data, end, names, readers, content_keys = (
            self.data, self.end, _ENTRY_KEYS, _ENTRY_READERS, _CONTENT_KEYS
        )
        for _ in range(count):
            # Fast path: a known key (short text) is recognised by its exact encoding.
            after = pos + (data[pos] if pos < end else 0) - 0x5F
            encoded = data[pos:after]
            name = names.get(encoded)
            if name is not None and (
                len(encoded) > len(previous)
                or (len(encoded) == len(previous) and encoded > previous)
            ):
                previous, pos = encoded, after
            else:
                previous, start, pos = self.key(pos, previous)
                name = names.get(previous)
                if name is None:
                    self.utf8(start, pos)
                    pos = self.skip(pos, 4)
                    continue
            if name in content_keys:
                if content is not None:
                    raise _Problem(f"two content keys, '{content}' and '{name}'", pos)
                content = name
            fields[name], pos = readers[name](self, pos, name)
        return _entry_from_fields(fields, content), pos

    def read_type(self, pos: int, what: str) -> tuple[Kind, int]:
        initial = self.data[pos] if pos < self.end else 0
        after = pos + initial - 0x5F  # only right for short text; the lookup checks the rest
        kind = _KIND_BY_ENCODING.get(self.data[pos:after])
        if kind is not None:
            return kind, after
        start, after = self.text_span(pos, what)
        kind = _KIND_BY_ENCODING.get(self.data[pos:after])
        if kind is None:
            raise _Problem(f"unknown type '{_show(self.utf8(start, after))}'", pos)
        return kind, after

    def read_bytes(self, pos: int, what: str) -> tuple[bytes, int]:
        major, length, start = self.head(pos)
        if major != 2:
            raise _Problem(f"{what} is not a byte string", pos)
        after = start + length
        if after > self.end:
            raise _Problem(_TRUNCATED, pos)
        return self.data[start:after], after

    def read_array(self, pos: int, what: str, sizes: Sequence[int]) -> tuple[int, int]:
        major, count, after = self.head(pos)
        if major != 4 or count not in sizes:
            raise _Problem(f"{what} is not {_SHAPES[what]}", pos)
        return count, after

    def read_time(self, pos: int, what: str) -> tuple[int, int]:
        initial = self.data[pos] if pos < self.end else 0
        if not 0x60 <= initial <= 0x7B:
            return self.read_tagged_time(pos, what)
        if initial == 0x78 and pos + 1 < self.end and self.data[pos + 1] >= 24:
            start = pos + 2  # RFC3339Nano text is 20 to 35 bytes long
            after = start + self.data[pos + 1]
            if after > self.end:
                raise _Problem(_TRUNCATED, pos)
        else:
            start, after = self.text_span(pos, what)
        raw = self.data[pos:after]
        ns = self.times.get(raw)
        if ns is None:
            try:
                ns = self.times[raw] = _parse_time(self.utf8(start, after))
            except _Problem as problem:
                raise _Problem(f"{what}: {problem.message}", pos) from None
        return ns, after

    def read_tagged_time(self, pos: int, what: str) -> tuple[int, int]:
        major, tag, after = self.head(pos)
        if major != 6:
            raise _Problem(f"{what} is not RFC 3339 text or a tag 1 epoch time", pos)
        if tag == 0:
            if self.head(after)[0] != 3:
                raise _Problem(f"tag 0 on {what} does not hold text", after)
            return self.read_time(after, what)
        if tag == 1:
            return self.read_epoch(after, what)
        raise _Problem(f"tag {tag} is not allowed on {what}", pos)

    def read_epoch(self, pos: int, what: str) -> tuple[int, int]:
        major, argument, after = self.head(pos)
        if major == 0:
            return argument * 1_000_000_000, after
        if major == 1:
            return (-1 - argument) * 1_000_000_000, after
        info = self.data[pos] & 0x1F
        if major == 7 and info >= 25:
            value = _check_float(info, argument, pos)
            if value != value or value in (float("inf"), float("-inf")):
                raise _Problem(f"{what} is not a finite number", pos)
            numerator, denominator = value.as_integer_ratio()
            # Round half up to the nearest nanosecond, exactly.
            return (numerator * 2_000_000_000 + denominator) // (2 * denominator), after
        raise _Problem(f"tag 1 on {what} does not hold a number", pos)

    def read_mode(self, pos: int, what: str) -> tuple[int, int]:
        after = pos + _MODE_ITEM_SIZE
        mode = self.modes[self.data[pos:after]]
        if mode is None:
            raise _Problem(f"mode is not {_SHAPES['mode']}", pos)
        return mode, after

    def read_xattrs(self, pos: int, what: str) -> tuple[dict[str, bytes], int]:
        major, count, pos = self.head(pos)
        if major != 5:
            raise _Problem("xattrs is not a map of text to bytes", pos)
        xattrs: dict[str, bytes] = {}
        previous = b""
        for _ in range(count):
            previous, start, pos = self.key(pos, previous)
            name = self.utf8(start, pos)
            xattrs[name], pos = self.read_bytes(pos, f"xattr '{_show(name)}'")
        return xattrs, pos

    def read_regular(self, pos: int, what: str) -> tuple[tuple[Any, ...], int]:
        data = self.data
        if data[pos : pos + 1] == b"\x82":  # the common [size, hash], decoded inline
            size, after = self.read_uint(pos + 1, "file size")
            if data[after : after + 2] == _HASH_HEAD and after + 34 <= self.end:
                return (size, data[after + 2 : after + 34], None), after + 34
        count, pos = self.read_array(pos, what, (1, 2, 3))
        size, pos = self.read_uint(pos, "file size")
        digest = chunks = None
        if count >= 2:
            digest, pos = self.read_bytes(pos, "b3-256 hash")
        if count == 3:
            chunks, pos = self.read_chunks(pos)
        return (size, digest, chunks), pos

    def read_chunks(self, pos: int) -> tuple[tuple[Chunk, ...], int]:
        major, count, pos = self.head(pos)
        if major != 4:
            raise _Problem("chunk list is not an array", pos)
        if count > self.limits.max_chunks:
            raise _Problem(f"{count} chunks exceed the limit of {self.limits.max_chunks}")
        chunks = []
        for _ in range(count):
            _, pos = self.read_array(pos, "chunk", (2,))
            size, pos = self.read_uint(pos, "chunk size")
            digest, pos = self.read_bytes(pos, "chunk hash")
            chunks.append(Chunk(size, digest))
        return tuple(chunks), pos

    def read_empty(self, pos: int, what: str) -> tuple[tuple[()], int]:
        return (), self.read_array(pos, what, (0,))[1]

    def read_target(self, pos: int, what: str) -> tuple[str, int]:
        _, pos = self.read_array(pos, what, (1,))
        return self.read_text(pos, f"{what} target")

    def read_device(self, pos: int, what: str) -> tuple[tuple[int, ...], int]:
        # The reference CDDL spells fifo's content key "block", so "block" may hold [].
        count, pos = self.read_array(pos, what, (0, 2) if what == "block" else (2,))
        if count == 0:
            return (), pos
        major, pos = self.read_uint(pos, "device major")
        minor, pos = self.read_uint(pos, "device minor")
        return (major, minor), pos


def _key_order_problem(previous: bytes, encoded: bytes, pos: int) -> _Problem:
    problem = "duplicate map key" if encoded == previous else "map keys not in canonical order"
    return _Problem(problem, pos)


def _check_float(info: int, bits: int, pos: int) -> float:
    """Decode a float and require its shortest exact width (NaN only as f97e00)."""
    width = 1 << (info - 24)
    value: float = struct.unpack(">" + "efd"[info - 25], bits.to_bytes(width, "big"))[0]
    if value != value:
        if info != 25 or bits != 0x7E00:
            raise _Problem("NaN not encoded as f97e00", pos)
        return value
    if info > 25:
        narrower = ">e" if info == 26 else ">f"
        try:
            shorter = struct.unpack(narrower, struct.pack(narrower, value))[0]
        except OverflowError:
            return value
        if shorter == value:
            raise _Problem("float not in shortest form", pos)
    return value


def _entry_from_fields(fields: dict[str, Any], content: str | None) -> Entry:
    kind = fields.pop("type", None)
    if kind is None:
        raise _Problem("no 'type'")
    if content is None:
        raise _Problem(f"type {kind.value} without its '{kind.value}' content")
    if content != kind.value and not (kind is Kind.FIFO and content == "block"):
        raise _Problem(f"'{content}' content does not match type {kind.value}")
    value = fields.pop(content)
    if kind is Kind.REGULAR:
        fields["size"], fields["digest"], fields["chunks"] = value
    elif kind is Kind.SYMLINK or kind is Kind.HARDLINK:
        fields["target"] = value
    elif kind is Kind.CHARACTER or kind is Kind.BLOCK:
        if not value:
            raise _Problem(f"{content} is not {_SHAPES['block']}")
        fields["rdev"] = value
    elif value:
        raise _Problem(f"{content} is not []")
    return _new_entry(kind, **fields)


def _new_entry(
    kind: Kind,
    mode: int | None = None,
    uid: int | None = None,
    gid: int | None = None,
    username: str | None = None,
    groupname: str | None = None,
    atime: int | None = None,
    btime: int | None = None,
    ctime: int | None = None,
    mtime: int | None = None,
    size: int = 0,
    digest: bytes | None = None,
    chunks: tuple[Chunk, ...] | None = None,
    target: str | None = None,
    rdev: tuple[int, int] | None = None,
    xattrs: Mapping[str, bytes] | None = None,
) -> Entry:
    """``Entry(...)`` at a third of the cost: a frozen dataclass's ``__init__`` goes
    through ``object.__setattr__`` for each field, while this fills an ``_EntryLayout``
    (the same slots, plain attribute stores) and makes it an ``Entry``: a class change
    Python allows between classes of one layout. It must list exactly Entry's fields with
    the same defaults (a test checks)."""
    entry = _EntryLayout()
    entry.kind = kind
    entry.mode = mode
    entry.uid = uid
    entry.gid = gid
    entry.username = username
    entry.groupname = groupname
    entry.atime = atime
    entry.btime = btime
    entry.ctime = ctime
    entry.mtime = mtime
    entry.size = size
    entry.digest = digest
    entry.chunks = chunks
    entry.target = target
    entry.rdev = rdev
    entry.xattrs = xattrs
    entry.__class__ = Entry  # type: ignore[assignment]
    return cast(Entry, entry)


class _EntryLayout:
    """``Entry``'s slots, writable: what ``_new_entry`` fills before it becomes an Entry."""

    __slots__ = tuple(item.name for item in dataclass_fields(Entry))
    kind: Kind
    mode: int | None
    uid: int | None
    gid: int | None
    username: str | None
    groupname: str | None
    atime: int | None
    btime: int | None
    ctime: int | None
    mtime: int | None
    size: int
    digest: bytes | None
    chunks: tuple[Chunk, ...] | None
    target: str | None
    rdev: tuple[int, int] | None
    xattrs: Mapping[str, bytes] | None


assert _EntryLayout.__slots__ == Entry.__slots__


_ENTRY_READERS: dict[str, Callable[[_Reader, int, str], tuple[Any, int]]] = {
    "mode": _Reader.read_mode,
    "uid": _Reader.read_uint,
    "gid": _Reader.read_uint,
    "username": _Reader.read_text,
    "groupname": _Reader.read_text,
    "atime": _Reader.read_time,
    "btime": _Reader.read_time,
    "ctime": _Reader.read_time,
    "mtime": _Reader.read_time,
    "type": _Reader.read_type,
    "xattrs": _Reader.read_xattrs,
    "regularfile": _Reader.read_regular,
    "directory": _Reader.read_empty,
    "fifo": _Reader.read_empty,
    "symlink": _Reader.read_target,
    "link": _Reader.read_target,
    "character": _Reader.read_device,
    "block": _Reader.read_device,
}
_SHAPES = {
    "mode": "[[r,w,x],[r,w,x],[r,w,x],setuid,setgid,sticky] of booleans",
    "regularfile": "[size, b3-256, chunks] (hash and chunks optional)",
    "chunk": "[size, b3-256]",
    "directory": "[]",
    "fifo": "[]",
    "symlink": "[target]",
    "link": "[target]",
    "character": "[major, minor]",
    "block": "[major, minor]",
}




def _no_entry(pos: int) -> None:
    """``fast_entry`` when the fast path is off."""
    return None


def _uint_item(item: bytes) -> int:
    """The value of a shortest-form unsigned integer item ``_FAST_UINT`` matched."""
    return item[0] if item[0] < 24 else int.from_bytes(item[1:], "big")


def _fast_text(lengths: range) -> bytes:
    """A text item of one of ``lengths`` (each below 256 bytes), in its shortest form."""
    heads = [(bytes((0x60 + n,)) if n < 24 else bytes((0x78, n)), n) for n in lengths]
    return b"(?:" + b"|".join(re.escape(head) + b".{%d}" % n for head, n in heads) + b")"


def _short_text(text: str) -> bytes:
    """The pattern of a text item of at most 23 bytes (a key, a type)."""
    return re.escape(bytes((0x60 + len(text),)) + text.encode())


def _fast_pair(key: str, value: bytes, *, optional: bool = True) -> bytes:
    """The pattern of one map pair, its value captured."""
    pair = _short_text(key) + b"(" + value + b")"
    return b"(?:" + pair + b")?" if optional else pair


_FAST_UINT32 = rb"[\x00-\x17]|\x18[\x18-\xff]|\x19[\x01-\xff].|\x1a(?!\x00\x00)...."
_FAST_UINT = _FAST_UINT32 + rb"|\x1b(?!\x00\x00\x00\x00)........"
_FAST_TIME = _fast_text(range(20, 36))  # RFC3339Nano text: 20 to 35 bytes
_FAST_NAME = _fast_text(range(24))
_FAST_ENTRY = re.compile(
    b"(?s)([\xa2-\xb7])"  # a map of 2 to 23 pairs, then its keys in canonical order
    + _fast_pair("gid", _FAST_UINT32) + _fast_pair("uid", _FAST_UINT32)
    + _fast_pair("mode", rb"\x86(?:\x83[\xf4\xf5]{3}){3}[\xf4\xf5]{3}", optional=False)
    + _fast_pair("type", b"|".join(_short_text(kind.value) for kind in
                                   (Kind.REGULAR, Kind.DIRECTORY, Kind.SYMLINK)),
                 optional=False)
    + b"".join(_fast_pair(name, _FAST_TIME) for name in ("atime", "btime", "ctime", "mtime"))
    # a symlink's target text follows its head (read by ``fast_symlink``), and ends the
    # entry; else the remaining keys of a directory or a regular file
    + b"(?:" + _short_text("symlink") + rb"\x81([\x61-\x77]|\x78[\x18-\xff])|"
    + _fast_pair("username", _FAST_NAME) + _fast_pair("directory", rb"\x80")
    + _fast_pair("groupname", _FAST_NAME)
    + _fast_pair("regularfile", rb"\x82(?:" + _FAST_UINT + rb")\x58\x20.{32}|\x81\x00")
    + b")"
)
_REGULAR_KIND = Kind.REGULAR
_DIRECTORY_KIND = Kind.DIRECTORY


# ---------------------------------------------------------------------------------------
# Validation of the model (shared by decode and encode)


_MAX_ID = (1 << 32) - 1
_NO_METADATA = (None,) * 10
_METADATA_NAMES = (
    "mode", "uid", "gid", "username", "groupname", "atime", "btime", "ctime", "mtime", "xattrs",
)
# Which of (size, digest, chunks, target, rdev) each kind may carry, as bits 1, 2, 4, 8, 16.
_CONTENT_NAMES = ("size", "digest", "chunks", "target", "rdev")
_ALLOWED_CONTENT = {
    Kind.REGULAR: 1 | 2 | 4,
    Kind.DIRECTORY: 0,
    Kind.SYMLINK: 8,
    Kind.HARDLINK: 8,
    Kind.CHARACTER: 16,
    Kind.BLOCK: 16,
    Kind.FIFO: 0,
}


def _check_manifest(
    version: object, entries: object, limits: Limits, unchecked: set[str] | None = None
) -> None:
    """Check a whole manifest; with ``unchecked``, only the entries of those paths are
    checked (the others were, as they were decoded), every path still is."""
    if type(version) is not int or version not in SUPPORTED_VERSIONS:
        raise _Problem(f"unsupported version {_show(version)}")
    if not isinstance(entries, Mapping):
        raise _Problem("entries is not a mapping")
    if len(entries) > limits.max_entries:
        raise _Problem(f"{len(entries)} entries exceed the limit of {limits.max_entries}")
    for path, entry in entries.items():
        try:
            _check_path(path, limits)
            if unchecked is None or path in unchecked:
                _check_entry(entry, version, limits)
        except _Problem as problem:
            problem.path = path
            raise
    _check_tree(entries)


def _check_path(path: object, limits: Limits) -> None:
    if type(path) is not str:
        raise _Problem("path is not text")
    if path == "/":
        return
    if (
        path[:1] != "/"
        or path[-1] == "/"
        or "//" in path
        or "/./" in path
        or "/../" in path
        or path.endswith(("/.", "/.."))
        or "\0" in path
    ):
        raise _Problem("not a canonical absolute path")
    encoded = path if path.isascii() else _utf8(path)
    if len(encoded) > limits.max_path_bytes:
        raise _Problem(f"path longer than {limits.max_path_bytes} bytes")
    if len(encoded) > limits.max_name_bytes and max(map(len, path.split("/"))) * (
        1 if encoded is path else 4
    ) > limits.max_name_bytes:
        _check_names(path, limits)


def _check_names(path: str, limits: Limits) -> None:
    for name in path.split("/"):
        if len(_utf8(name)) > limits.max_name_bytes:
            raise _Problem(f"a name longer than {limits.max_name_bytes} bytes")


def _utf8(text: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError:
        raise _Problem("text is not valid Unicode (lone surrogate)") from None


def _check_entry(entry: object, version: int, limits: Limits) -> None:
    if type(entry) is not Entry or type(entry.kind) is not Kind:
        raise _Problem("not an Entry")
    kind = entry.kind
    present = (
        (entry.size != 0)
        | (entry.digest is not None) << 1
        | (entry.chunks is not None) << 2
        | (entry.target is not None) << 3
        | (entry.rdev is not None) << 4
    )
    stray = present & ~_ALLOWED_CONTENT[kind]
    if stray:
        name = _CONTENT_NAMES[(stray & -stray).bit_length() - 1]
        raise _Problem(f"a {kind.value} entry cannot have {name}")
    if kind is Kind.HARDLINK:
        _check_hardlink_entry(entry, limits)
        return
    mode = entry.mode
    if type(mode) is not int or not 0 <= mode <= 0o7777:
        raise _Problem("no mode" if mode is None else f"mode {_show(mode)} is not 0..0o7777")
    uid, gid = entry.uid, entry.gid
    if uid is not None and (type(uid) is not int or not 0 <= uid <= _MAX_ID):
        raise _Problem(f"uid {_show(uid)} is not an unsigned 32-bit integer")
    if gid is not None and (type(gid) is not int or not 0 <= gid <= _MAX_ID):
        raise _Problem(f"gid {_show(gid)} is not an unsigned 32-bit integer")
    if entry.username is not None or entry.groupname is not None:
        _check_owner_names(entry)
    for ns in (entry.atime, entry.btime, entry.ctime, entry.mtime):
        if ns is not None and (type(ns) is not int or not MIN_TIME_NS <= ns <= MAX_TIME_NS):
            raise _Problem(f"time {_show(ns)} is not within the years 0001-9999")
    if entry.xattrs is not None:
        _check_xattrs(entry.xattrs, version, limits)
    if kind is Kind.REGULAR:
        _check_regular(entry, version, limits)
    elif kind is Kind.SYMLINK:
        _check_symlink(entry.target, limits)
    elif kind is Kind.CHARACTER or kind is Kind.BLOCK:
        _check_device(entry.rdev)


def _check_hardlink_entry(entry: Entry, limits: Limits) -> None:
    metadata = (entry.mode, entry.uid, entry.gid, entry.username, entry.groupname,
                entry.atime, entry.btime, entry.ctime, entry.mtime, entry.xattrs)
    if metadata != _NO_METADATA:
        name = next(n for n, v in zip(_METADATA_NAMES, metadata, strict=True) if v is not None)
        raise _Problem(f"a hardlink carries no metadata, but this one has {name}")
    try:
        _check_path(entry.target, limits)
    except _Problem as problem:
        raise _Problem(f"hardlink target {_show(entry.target)}: {problem.message}") from None


def _check_owner_names(entry: Entry) -> None:
    for name, text in (("username", entry.username), ("groupname", entry.groupname)):
        if text is not None and (type(text) is not str or len(_utf8(text)) > 255):
            raise _Problem(f"{name} is not text of at most 255 bytes")


def _check_symlink(target: object, limits: Limits) -> None:
    if type(target) is not str or not target or "\0" in target:
        raise _Problem("symlink target is empty, not text, or contains NUL")
    limit = limits.max_symlink_bytes
    if len(target) > limit // 4 and len(_utf8(target)) > limit:
        raise _Problem(f"symlink target longer than {limits.max_symlink_bytes} bytes")


def _check_regular(entry: Entry, version: int, limits: Limits) -> None:
    size, digest = entry.size, entry.digest
    if type(size) is not int or not 0 <= size <= limits.max_file_size:
        raise _Problem(f"file size {_show(size)} is not within 0..{limits.max_file_size}")
    if digest is None:
        if size != 0:
            raise _Problem("no b3-256 hash (only an empty file may omit it)")
    elif type(digest) is not bytes or len(digest) != HASH_SIZE:
        length = len(digest) if isinstance(digest, bytes) else "?"
        raise _Problem(f"b3-256 hash is {length} bytes, not {HASH_SIZE}")
    if entry.chunks is not None:
        _check_chunks(entry.chunks, size, digest, version, limits)


def _check_chunks(
    chunks: object, size: int, digest: bytes | None, version: int, limits: Limits
) -> None:
    if version < 1:
        raise _Problem("chunk lists need version 1")
    if type(chunks) is not tuple or not chunks:
        raise _Problem("chunk list is empty or not a tuple")
    if len(chunks) > limits.max_chunks:
        raise _Problem(f"{len(chunks)} chunks exceed the limit of {limits.max_chunks}")
    if digest is None:
        raise _Problem("a chunked file needs its whole-file hash too")
    total = 0
    for chunk in chunks:
        if (
            type(chunk) is not Chunk
            or type(chunk.size) is not int
            or chunk.size <= 0
            or type(chunk.digest) is not bytes
            or len(chunk.digest) != HASH_SIZE
        ):
            raise _Problem("a chunk is not [size > 0, 32-byte b3-256]")
        total += chunk.size
    if total != size:
        raise _Problem(f"chunk sizes add up to {total}, not the file size {size}")


def _check_device(rdev: object) -> None:
    if (
        type(rdev) is not tuple
        or len(rdev) != 2
        or type(rdev[0]) is not int
        or type(rdev[1]) is not int
        or not 0 <= rdev[0] <= MAX_DEVICE_MAJOR
        or not 0 <= rdev[1] <= MAX_DEVICE_MINOR
    ):
        raise _Problem(
            f"device {_show(rdev)} is not (major <= {MAX_DEVICE_MAJOR}, "
            f"minor <= {MAX_DEVICE_MINOR})"
        )


def _check_xattrs(xattrs: object, version: int, limits: Limits) -> None:
    if version < 1:
        raise _Problem("xattrs need version 1")
    if not isinstance(xattrs, Mapping) or not xattrs:
        raise _Problem("xattrs is empty or not a mapping (omit it instead)")
    total = 0
    for name, value in xattrs.items():
        if type(name) is not str or not name or "\0" in name or len(_utf8(name)) > 255:
            raise _Problem(f"xattr name '{_show(name)}' is not 1-255 bytes of text without NUL")
        if type(value) is not bytes:
            raise _Problem(f"xattr '{_show(name)}' value is not bytes")
        total += len(_utf8(name)) + len(value)
    if total > limits.max_xattrs_bytes:
        raise _Problem(f"xattrs total {total} bytes, over the limit of {limits.max_xattrs_bytes}")


def _check_tree(entries: Mapping[str, Entry]) -> None:
    """Cross-entry rules: ancestors are directories, hardlinks name earlier regular files."""
    root = entries.get("/")
    if root is not None and root.kind is not Kind.DIRECTORY:
        raise _Problem(f"the root is a {root.kind.value}, not a directory", path="/")
    directories = {"/"}
    for path, entry in entries.items():
        ancestor = path[: path.rindex("/")] or "/"
        while ancestor not in directories:
            found = entries.get(ancestor)
            if found is not None and found.kind is not Kind.DIRECTORY:
                problem = f"{_show(ancestor)} is a {found.kind.value}, not a directory"
                raise _Problem(problem, path=path)
            directories.add(ancestor)
            ancestor = ancestor[: ancestor.rindex("/")] or "/"
        if entry.kind is Kind.HARDLINK:
            _check_hardlink(path, entry.target, entries)


def _check_hardlink(path: str, target: object, entries: Mapping[str, Entry]) -> None:
    assert isinstance(target, str)  # _check_entry checked it
    found = entries.get(target)
    if found is None:
        raise _Problem(f"hardlink target {_show(target)} does not exist", path=path)
    if found.kind is not Kind.REGULAR:
        raise _Problem(f"hardlink target {_show(target)} is not a regular file", path=path)
    if path_sort_key(target) >= path_sort_key(path):
        raise _Problem(
            f"hardlink target {_show(target)} must be the file's lowest name in canonical order",
            path=path,
        )


# ---------------------------------------------------------------------------------------
# Encoding


def encode(manifest: Manifest) -> bytes:
    """Encode canonically. Raises ``FormatError`` if the manifest is invalid."""
    try:
        if not isinstance(manifest, Manifest):
            raise _Problem("not a Manifest")
        _check_manifest(manifest.version, manifest.entries, DEFAULT_LIMITS)
        data = _Writer().manifest(manifest)
    except _Problem as problem:
        raise FormatError(problem.render("manifest")) from None
    if len(data) > DEFAULT_LIMITS.max_bytes:
        raise FormatError(
            f"manifest: {len(data)} bytes exceed the limit of {DEFAULT_LIMITS.max_bytes}"
        )
    return data


def _head(major: int, argument: int) -> bytes:
    initial = major << 5
    if argument < 24:
        return bytes((initial | argument,))
    if argument < 1 << 8:
        return bytes((initial | 24, argument))
    if argument < 1 << 16:
        return bytes((initial | 25,)) + argument.to_bytes(2, "big")
    if argument < 1 << 32:
        return bytes((initial | 26,)) + argument.to_bytes(4, "big")
    return bytes((initial | 27,)) + argument.to_bytes(8, "big")


def _text(text: str) -> bytes:
    encoded = text.encode()
    length = len(encoded)
    if length < 24:
        return bytes((0x60 | length,)) + encoded
    if length < 256:
        return bytes((0x78, length)) + encoded
    return _head(3, length) + encoded


_UINTS = tuple(_head(0, n) for n in range(256))
_TAG_HEAD = _head(6, OCIX_TAG)
_KEY = {name: _text(name) for name in (*_ENTRY_READERS, "files", "version")}
_ENTRY_KEYS = {_KEY[name]: name for name in _ENTRY_READERS}
_TOP_KEYS = {_KEY["files"]: "files", _KEY["version"]: "version"}
_TYPE_PAIR = {kind: _KEY["type"] + _text(kind.value) for kind in Kind}
_KIND_BY_ENCODING = {_text(kind.value): kind for kind in Kind}
_HASH_HEAD = _head(2, HASH_SIZE)
_MODE_ITEM_SIZE = 16
# Entry keys in canonical order; _Writer.entry emits them in exactly this order.
_K_GID, _K_UID, _K_FIFO, _K_LINK, _K_MODE, _K_ATIME, _K_BLOCK, _K_BTIME, _K_CTIME = (
    _KEY[name]
    for name in ("gid", "uid", "fifo", "link", "mode", "atime", "block", "btime", "ctime")
)
_K_MTIME, _K_XATTRS, _K_SYMLINK, _K_USERNAME, _K_CHARACTER, _K_DIRECTORY = (
    _KEY[name] for name in ("mtime", "xattrs", "symlink", "username", "character", "directory")
)
_K_GROUPNAME, _K_REGULARFILE = _KEY["groupname"], _KEY["regularfile"]
_FIFO_PAIR = _K_FIFO + b"\x80"
_DIRECTORY_PAIR = _K_DIRECTORY + b"\x80"


_MODE_BITS = (8, 7, 6, 5, 4, 3, 2, 1, 0, 11, 10, 9)  # rwx for u, g, o; then suid, sgid, sticky
_TRUE, _FALSE = 0xF5, 0xF4


class _ModeCodes(dict[bytes, "int | None"]):
    """Canonical 16-byte mode encodings → mode, learned on first sight: an image uses a
    handful of modes, and building the table of all 4096 cost 29 ms per decode."""

    def __missing__(self, encoded: bytes) -> int | None:
        mode = _parse_mode(encoded)
        if mode is not None:  # a wrong encoding ends the decode: never stored
            self[encoded] = mode
        return mode


def _parse_mode(encoded: bytes) -> int | None:
    """The mode of ``[[r,w,x],[r,w,x],[r,w,x],suid,sgid,sticky]`` in canonical CBOR."""
    if len(encoded) != _MODE_ITEM_SIZE or encoded[0] != 0x86:
        return None
    if encoded[1] != 0x83 or encoded[5] != 0x83 or encoded[9] != 0x83:
        return None
    flags = encoded[2:5] + encoded[6:9] + encoded[10:16]
    if not all(flag in (_TRUE, _FALSE) for flag in flags):
        return None
    return sum(1 << bit for bit, flag in zip(_MODE_BITS, flags, strict=True) if flag == _TRUE)


@cache
def _mode_tables() -> tuple[list[bytes], dict[bytes, int]]:
    """Every mode's 16-byte canonical encoding, and the reverse map."""
    encodings = []
    for mode in range(0o10000):
        flags = [bool(mode & 1 << bit) for bit in _MODE_BITS]
        bools = [b"\xf5" if flag else b"\xf4" for flag in flags]
        encodings.append(
            b"\x86" + b"".join(b"\x83" + b"".join(bools[i : i + 3]) for i in (0, 3, 6))
            + b"".join(bools[9:])
        )
    return encodings, {item: mode for mode, item in enumerate(encodings)}


class _Writer:
    """Canonical CBOR for a validated manifest; keys are emitted in canonical order."""

    def __init__(self) -> None:
        self.times: dict[int, bytes] = {}
        self.texts: dict[str, bytes] = {}
        self.modes = [_K_MODE + item for item in _mode_tables()[0]]

    def manifest(self, manifest: Manifest) -> bytes:
        items = sorted(
            ((_text(path), entry) for path, entry in manifest.entries.items()), key=itemgetter(0)
        )
        # One growing buffer: a list of per-item byte strings costs ~5x the output in memory.
        out = bytearray(_TAG_HEAD + b"\xa2" + _KEY["files"] + _head(5, len(items)))
        for key, entry in items:
            out += key
            self.entry(entry, out)
        out += _KEY["version"] + _head(0, manifest.version)
        return bytes(out)

    def time(self, ns: int) -> bytes:
        item = self.times.get(ns)
        if item is None:
            item = self.times[ns] = _text(format_time(ns))
        return item

    def text(self, text: str) -> bytes:
        item = self.texts.get(text)
        if item is None:
            item = self.texts[text] = _text(text)
        return item

    def entry(self, entry: Entry, out: bytearray) -> None:
        kind = entry.kind
        pairs = []
        if entry.gid is not None:
            pairs.append(_K_GID + _uint(entry.gid))
        if entry.uid is not None:
            pairs.append(_K_UID + _uint(entry.uid))
        if kind is Kind.FIFO:
            pairs.append(_FIFO_PAIR)
        elif kind is Kind.HARDLINK:
            pairs.append(_K_LINK + b"\x81" + _text(entry.target or ""))
        if entry.mode is not None:
            pairs.append(self.modes[entry.mode])
        pairs.append(_TYPE_PAIR[kind])
        if entry.atime is not None:
            pairs.append(_K_ATIME + self.time(entry.atime))
        if kind is Kind.BLOCK:
            pairs.append(_K_BLOCK + self.device(entry.rdev))
        if entry.btime is not None:
            pairs.append(_K_BTIME + self.time(entry.btime))
        if entry.ctime is not None:
            pairs.append(_K_CTIME + self.time(entry.ctime))
        if entry.mtime is not None:
            pairs.append(_K_MTIME + self.time(entry.mtime))
        if entry.xattrs is not None:
            pairs.append(_K_XATTRS + self.xattrs(entry.xattrs))
        if kind is Kind.SYMLINK:
            pairs.append(_K_SYMLINK + b"\x81" + _text(entry.target or ""))
        if entry.username is not None:
            pairs.append(_K_USERNAME + self.text(entry.username))
        if kind is Kind.CHARACTER:
            pairs.append(_K_CHARACTER + self.device(entry.rdev))
        elif kind is Kind.DIRECTORY:
            pairs.append(_DIRECTORY_PAIR)
        if entry.groupname is not None:
            pairs.append(_K_GROUPNAME + self.text(entry.groupname))
        if kind is Kind.REGULAR:
            pairs.append(_K_REGULARFILE + self.regular(entry))
        out += _MAP_HEADS[len(pairs)]
        out += b"".join(pairs)

    @staticmethod
    def device(rdev: tuple[int, int] | None) -> bytes:
        assert rdev is not None  # validated
        return b"\x82" + _uint(rdev[0]) + _uint(rdev[1])

    @staticmethod
    def regular(entry: Entry) -> bytes:
        if entry.digest is None:
            return b"\x81" + _uint(entry.size)
        item = _uint(entry.size) + _HASH_HEAD + entry.digest
        if entry.chunks is None:
            return b"\x82" + item
        return b"\x83" + item + _head(4, len(entry.chunks)) + b"".join(
            b"\x82" + _uint(chunk.size) + _HASH_HEAD + chunk.digest for chunk in entry.chunks
        )

    @staticmethod
    def xattrs(xattrs: Mapping[str, bytes]) -> bytes:
        items = sorted((_text(name), value) for name, value in xattrs.items())
        return _head(5, len(items)) + b"".join(
            name + _head(2, len(value)) + value for name, value in items
        )


def _uint(value: int) -> bytes:
    return _UINTS[value] if value < 256 else _head(0, value)


_MAP_HEADS = tuple(_head(5, n) for n in range(24))
