"""``ocixfs inspect IMAGE.ocix``: list a manifest like ``tar tv``, or dump it as JSON.

The whole manifest is decoded and validated first (a bad one gives one line and exit 1).
Listing order is the directory-tree order (``/etc`` before ``/etc/passwd`` before ``/usr``),
not the canonical wire order. Times are shown in UTC. A hardlink shows its target's mode,
owner and time, since it has none of its own, with size 0 as ``tar tv`` does.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ocixfs.image.format import Entry, Limits, Manifest

__all__ = ["DESCRIPTION", "HELP", "NAME", "Summary", "add_arguments", "run", "summarize"]

NAME = "inspect"
HELP = "list the entries of an OCIX manifest (like tar tv), or print them as JSON"
DESCRIPTION = """\
List the entries of an OCIX manifest the way `tar tv` lists an archive:

  -rw-r--r-- root/root      1234 2024-05-01 12:00 /etc/hostname
  lrwxrwxrwx 0/0               0 2024-05-01 12:00 /bin -> usr/bin
  hrwxr-xr-x 0/0               0 2024-05-01 12:00 /usr/bin/perl5.36 link to /usr/bin/perl
  crw-rw-rw- 0/0             1,3 2024-05-01 12:00 /dev/null

then one summary line: entries, regular files, their total bytes, distinct blobs (and
their bytes, i.e. what a store holds once) and chunked files. Owners show the recorded
user/group names when present (never looked up on this host), else the numbers. Times
are UTC. --json prints one JSON document with every entry and the summary instead.

The manifest is validated in full first; a malformed one is refused with a one-line
reason and exit status 1.
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class Summary:
    """Counts over a manifest, as printed after the listing."""

    version: int
    entries: int
    regular_files: int
    total_bytes: int
    distinct_blobs: int
    blob_bytes: int
    chunked_files: int
    hardlinks: int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", metavar="IMAGE.ocix", help="the manifest file")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--summary", action="store_true", help="print only the summary")


def run(args: argparse.Namespace) -> int:
    from ocixfs.image.format import DEFAULT_LIMITS

    manifest = _load(args.image, DEFAULT_LIMITS)
    summary = summarize(manifest)
    if args.json:
        _print_json(manifest, summary, with_entries=not args.summary)
    else:
        if not args.summary:
            _print_listing(manifest)
        print(_summary_line(summary))
    return 0


def _load(path: str, limits: Limits) -> Manifest:
    from ocixfs.errors import FormatError, UsageError
    from ocixfs.image.format import decode
    from ocixfs.image.loading import read_limited

    try:
        with open(path, "rb") as file:
            data = read_limited(file, limits.max_bytes)
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror or exc}") from None
    if len(data) > limits.max_bytes:
        raise FormatError(f"{path}: larger than the limit of {limits.max_bytes} bytes")
    return decode(data, limits=limits, source=path)


def summarize(manifest: Manifest) -> Summary:
    """Entry, file, byte and blob counts of ``manifest``."""
    from ocixfs.image.format import Kind

    regular = [entry for entry in manifest.entries.values() if entry.kind is Kind.REGULAR]
    blobs = {chunk.digest: chunk.size for entry in regular for chunk in entry.blobs}
    return Summary(
        version=manifest.version,
        entries=len(manifest.entries),
        regular_files=len(regular),
        total_bytes=sum(entry.size for entry in regular),
        distinct_blobs=len(blobs),
        blob_bytes=sum(blobs.values()),
        chunked_files=sum(1 for entry in regular if entry.chunks is not None),
        hardlinks=sum(1 for entry in manifest.entries.values() if entry.kind is Kind.HARDLINK),
    )


def _summary_line(summary: Summary) -> str:
    return (
        f"{summary.entries} entries, {summary.regular_files} regular files, "
        f"{summary.total_bytes} bytes, {summary.distinct_blobs} distinct blobs "
        f"({summary.blob_bytes} bytes), {summary.chunked_files} chunked files "
        f"(OCIX version {summary.version})"
    )


def _tree_order(entries: Mapping[str, Entry]) -> list[str]:
    from ocixfs.image.format import split_path

    return sorted(entries, key=split_path)


def _print_listing(manifest: Manifest) -> None:
    entries = manifest.entries
    write = sys.stdout.write
    batch: list[str] = []
    for path in _tree_order(entries):
        batch.append(_listing_line(path, entries[path], entries))
        if len(batch) >= 4096:
            write("\n".join(batch) + "\n")
            batch.clear()
    if batch:
        write("\n".join(batch) + "\n")


def _listing_line(path: str, entry: Entry, entries: Mapping[str, Entry]) -> str:
    from ocixfs.image.format import Kind, mode_string

    shown = entries[entry.target] if entry.kind is Kind.HARDLINK and entry.target else entry
    owner = f"{_owner(shown.username, shown.uid)}/{_owner(shown.groupname, shown.gid)}"
    if entry.kind in (Kind.CHARACTER, Kind.BLOCK) and entry.rdev is not None:
        size = f"{entry.rdev[0]},{entry.rdev[1]}"
    else:
        size = str(entry.size)
    line = (
        f"{mode_string(entry, shown.mode)} {owner:<17} {size:>9} {_minute(shown.mtime)} "
        f"{_printable(path)}"
    )
    if entry.kind is Kind.SYMLINK:
        line += f" -> {_printable(entry.target or '')}"
    elif entry.kind is Kind.HARDLINK:
        line += f" link to {_printable(entry.target or '')}"
    return line


def _owner(name: str | None, number: int | None) -> str:
    return _printable(name) if name else str(number or 0)


def _minute(ns: int | None) -> str:
    from ocixfs.image.format import format_time

    if ns is None:
        return "-" * 16
    return format_time(ns)[:16].replace("T", " ")


def _printable(text: str) -> str:
    """Escape control characters so each entry stays on one line."""
    return text if text.isprintable() else ascii(text)[1:-1]


def _print_json(manifest: Manifest, summary: Summary, *, with_entries: bool) -> None:
    document: dict[str, Any] = {"version": manifest.version}
    if with_entries:
        document["entries"] = list(_json_entries(manifest))
    document["summary"] = {
        name: getattr(summary, name) for name in Summary.__dataclass_fields__ if name != "version"
    }
    json.dump(document, sys.stdout, ensure_ascii=False, indent=None, separators=(",", ":"))
    sys.stdout.write("\n")


def _json_entries(manifest: Manifest) -> Iterable[dict[str, Any]]:
    from ocixfs.image.format import Kind, format_time, mode_string

    entries = manifest.entries
    for path in _tree_order(entries):
        entry = entries[path]
        item: dict[str, Any] = {"path": path, "type": entry.kind.value}
        if entry.kind is Kind.HARDLINK:
            item["target"] = entry.target
            yield item
            continue
        item["mode"] = entry.mode
        item["mode_string"] = mode_string(entry)
        item["uid"] = entry.uid or 0
        item["gid"] = entry.gid or 0
        for name in ("username", "groupname"):
            if getattr(entry, name) is not None:
                item[name] = getattr(entry, name)
        for name in ("atime", "btime", "ctime", "mtime"):
            ns = getattr(entry, name)
            if ns is not None:
                item[name] = format_time(ns)
        if entry.kind is Kind.REGULAR:
            item["size"] = entry.size
            item["b3-256"] = entry.digest.hex() if entry.digest is not None else None
            if entry.chunks is not None:
                item["chunks"] = [{"size": c.size, "b3-256": c.hex} for c in entry.chunks]
        elif entry.kind is Kind.SYMLINK:
            item["target"] = entry.target
        elif entry.rdev is not None:
            item["major"], item["minor"] = entry.rdev
        if entry.xattrs is not None:
            item["xattrs"] = {name: value.hex() for name, value in entry.xattrs.items()}
        yield item
