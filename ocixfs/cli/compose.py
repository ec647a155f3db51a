"""``ocixfs compose OUT.ocix PART...``: one image made of others, at manifest level."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ocixfs.tools.compose import Composition

__all__ = ["DESCRIPTION", "HELP", "NAME", "add_arguments", "format_summary", "run"]

NAME = "compose"
HELP = "compose images without copying: embed one under a path of another, stack them"
DESCRIPTION = """\
Write one manifest made of other images' entries; no blob is read, copied or written,
so the result references only blobs the parts already reference and serves from the same
store(s). PART is IMAGE (a file or an http(s) URL) placed at the root, or IMAGE:/PATH
placed with its root at PATH (parents created when missing). Parts apply in order, like
layers: the first is the base, each later one goes over what the earlier ones made:

  ocixfs compose app.ocix base.ocix python.ocix:/srv/app      embed
  ocixfs compose new.ocix base.ocix fixes.ocix                stack

- a directory over a directory takes the new metadata and keeps the lower contents;
  anything else replaces the same path below (later parts win, path by path);
- OCI whiteouts in later parts delete lower paths: DIR/.wh.NAME removes NAME and all
  below it, DIR/.wh..wh..opq everything lower parts put in DIR (an upper image built
  with `ocixfs build dir:TREE` keeps such empty files). They are not copied. In the base
  they are ordinary files;
- conflicts are errors: a directory against anything else (white the path out in the
  same part to replace it), or replacing/deleting a file that lower hardlinks still name
  (--relink keeps the file under the lowest remaining name instead, as overlayfs would).

Hardlinks, xattrs, owners and times are kept; an embedded image's hardlinks point into
its new place. The result is canonical (the same parts always give the same bytes), is
validated like any manifest, and has the highest version of its parts. OUT is replaced
atomically; on any error nothing is written.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", metavar="OUT.ocix",
                        help="the manifest to write (replaced atomically; not a symlink)")
    parser.add_argument("parts", metavar="PART", nargs="+",
                        help="IMAGE or IMAGE:/PATH, applied in order (the first is the base)")
    parser.add_argument("--store", metavar="DIR",
                        help="check that every blob the result references is in this local "
                             "store (a directory or file:// URL) before writing")
    parser.add_argument("--relink", action="store_true",
                        help="when a part replaces or deletes a file that lower hardlinks "
                             "still name, keep it under the lowest remaining name instead "
                             "of failing")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args: argparse.Namespace) -> int:
    from ocixfs.errors import StoreError
    from ocixfs.http import redact
    from ocixfs.image.loading import is_url, load_image
    from ocixfs.tools.compose import (
        check_output,
        compose,
        missing_blobs,
        parse_part,
        write_atomically,
    )

    output = Path(args.output)
    check_output(output)
    parts = [parse_part(text) for text in args.parts]
    store = _store_dir(args.store) if args.store is not None else None
    loaded = []
    for part in parts:
        image = load_image(part.image)
        name = redact(part.image) if is_url(part.image) else part.image
        loaded.append((part, name, image.digest, image.manifest))
    result = compose(loaded, relink=args.relink)
    if store is not None:
        missing = missing_blobs(result.manifest, store)
        if missing:
            raise StoreError(f"--store {args.store}: {len(missing)} of {result.blobs} blobs "
                             f"referenced are missing (first: {missing[0].hex}); "
                             f"nothing written")
    write_atomically(output, result.data)
    if args.json:
        document = {"output": os.fspath(output), **result.to_json(), "store_checked": args.store}
        print(json.dumps(document, indent=2))
    else:
        print(format_summary(output, result, store_checked=args.store))
    return 0


def _store_dir(text: str) -> Path:
    """The local store directory ``--store`` names (only a local store can be checked
    without a request per blob)."""
    from ocixfs.errors import UsageError
    from ocixfs.store.layout import looks_like_store
    from ocixfs.store.spec import LocalStore, parse_store

    store = parse_store(text, relative=True)
    if not isinstance(store, LocalStore):
        raise UsageError(f"--store {store.label}: only a local store can be checked "
                         "(a directory or file:// URL)")
    if not looks_like_store(store.path):
        raise UsageError(f"--store {text}: not a blob store (no blob directory)")
    return store.path


def format_summary(output: Path, result: Composition, *, store_checked: str | None) -> str:
    from ocixfs.progress import format_bytes

    lines = [
        f"wrote {output} (version {result.manifest.version}, {result.digest})",
        f"  entries   {len(result.manifest.entries)}",
        f"  blobs     {result.blobs}  ({format_bytes(result.blob_bytes)}; none written)",
    ]
    if store_checked is not None:
        lines.append(f"  store     every blob present in {store_checked}")
    for report in result.parts:
        where = "" if report.at == "/" else f" at {report.at}"
        line = (f"  part {report.image}{where}: {report.added} added, "
                f"{report.replaced} replaced, {report.deleted} deleted")
        if report.created:
            line += f", created {', '.join(report.created)}"
        if report.relinked:
            line += f", {report.relinked} hardlink groups relinked"
        lines.append(line)
        if report.unmatched_whiteouts:
            shown = ", ".join(report.unmatched_whiteouts[:5])
            more = len(report.unmatched_whiteouts) - 5
            lines.append(f"    whiteouts that matched nothing: {shown}"
                         + (f" (+{more} more)" if more > 0 else ""))
    return "\n".join(lines)
