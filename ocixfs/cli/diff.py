"""``ocixfs diff OLD NEW``: what changed between two images, and what NEW costs a host
that already has OLD."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ocixfs.tools.compare import Change, ImageDiff

__all__ = ["DEFAULT_LIMIT", "DESCRIPTION", "HELP", "NAME", "add_arguments", "format_diff", "run"]

NAME = "diff"
HELP = "show what changed between two images and the bytes a host with OLD fetches for NEW"
DESCRIPTION = """\
Compare two OCIX images path by path (manifests only; nothing is fetched):

  A  PATH     added in NEW
  D  PATH     removed from NEW
  M  PATH     changed: type, content, target (symlinks), device, mode, owner, xattrs
              (and mtime with --times)

and count what a host that has OLD must fetch to run NEW: NEW's distinct blobs that OLD
does not reference. Large files are stored as chunks, so a big file with one changed
chunk costs one chunk. IMAGE may be a file or an http(s) URL.
"""

DEFAULT_LIMIT = 50


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("old", metavar="OLD", help="the image a host already has")
    parser.add_argument("new", metavar="NEW", help="the image it will run")
    parser.add_argument("--all", action="store_true",
                        help=f"list every change (default: the first {DEFAULT_LIMIT})")
    parser.add_argument("--times", action="store_true", help="also report mtime changes")
    parser.add_argument("--json", action="store_true", help="print one JSON document")


def run(args: argparse.Namespace) -> int:
    from ocixfs.image.loading import load_image
    from ocixfs.tools.compare import diff_images

    old, new = load_image(args.old), load_image(args.new)
    result = diff_images(old.manifest, new.manifest, times=args.times)
    if args.json:
        document = {"old": {"image": args.old, "digest": old.digest},
                    "new": {"image": args.new, "digest": new.digest}}
        data = result.to_json()
        for side in ("old", "new"):
            document[side].update(data.pop(side))
        print(json.dumps({**document, **data}, indent=2))
    else:
        print(format_diff(result, limit=None if args.all else DEFAULT_LIMIT))
    return 0


def format_diff(result: ImageDiff, *, limit: int | None) -> str:
    """The listing (at most ``limit`` lines of changes) and the summary."""
    from ocixfs.progress import format_bytes

    changes = result.changes()
    shown = changes if limit is None else changes[:limit]
    width = min(60, max((len(c.path) for c in shown), default=0))
    lines = [f"{c.status}  {c.path:<{width}}  {_describe(c)}".rstrip() for c in shown]
    if len(changes) > len(shown):
        lines.append(f"... and {len(changes) - len(shown)} more (--all lists every change)")
    if lines:
        lines.append("")
    share = result.fetch_bytes / result.new_blob_bytes if result.new_blob_bytes else 0.0
    lines.append(f"{len(result.added)} added, {len(result.removed)} removed, "
                 f"{len(result.changed)} changed")
    lines.append(f"NEW references {result.new_blobs} blobs, "
                 f"{format_bytes(result.new_blob_bytes)}; a host that has OLD fetches "
                 f"{result.fetch_blobs} blobs, {format_bytes(result.fetch_bytes)} "
                 f"({share:.1%})")
    return "\n".join(lines)


def _describe(change: Change) -> str:
    from ocixfs.image.format import Kind
    from ocixfs.progress import format_bytes

    if change.status == "M":
        text = ", ".join(change.what)
        if "content" in change.what and change.old_size is not None:
            text += f"  {format_bytes(change.old_size)} -> {format_bytes(change.new_size or 0)}"
        return text
    size = change.new_size if change.status == "A" else change.old_size
    if change.kind is Kind.REGULAR:
        return format_bytes(size or 0)
    return str(change.kind.value)
