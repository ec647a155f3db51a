"""``ocixfs extract IMAGE DIR --store URL``: write an image's whole tree into a directory."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ocixfs.tools.extract import ExtractSummary

__all__ = ["DESCRIPTION", "HELP", "NAME", "add_arguments", "format_summary", "run"]

NAME = "extract"
HELP = "write an image's whole tree into a plain directory (parallel fetches, through the cache)"
DESCRIPTION = """\
Materialize an OCIX image as a plain directory tree: every blob is fetched (JOBS at a
time) into the local cache shared with mounts, verified, and copied out of it; then
directories, files, hardlinks, symlinks, device nodes and fifos are created with their
owners, modes, xattrs (file capabilities included) and times.

DIR must be empty or absent, and it and every directory above it owned by you or root
and not writable by others (unless sticky, like /tmp): another user who could rename
entries there could redirect what extract writes. Owners and device nodes need root; as
another user they are skipped and counted in the summary. By default everything the
image holds is recreated, device nodes and setuid/setgid programs included (as a
container runtime unpacking it would); --no-devices and --no-setuid leave those out when
the tree is for inspection rather than for running. A file appears under its real
name only when it is complete; if anything fails, extract prints one line, exits 1 and
DIR is incomplete.

  ocixfs extract debian.ocix /srv/rootfs --store https://blobs.example.org/store/
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ocixfs.tools.extract import DEFAULT_JOBS

    parser.add_argument("image", metavar="IMAGE", help="manifest file or http(s) URL")
    parser.add_argument("dest", metavar="DIR", type=Path, help="where to write the tree")
    parser.add_argument("--store", action="append", default=[], metavar="URL",
                        help="blob store (http(s)://, file://, or a directory); repeat for "
                        "mirrors (default: the store beside IMAGE)")
    parser.add_argument("--cache-dir", type=Path, metavar="DIR",
                        help="local cache shared by all mounts (default /var/cache/ocixfs as "
                        "root, else ~/.cache/ocixfs)")
    parser.add_argument("--digest", metavar="b3:HEX", help="refuse IMAGE unless it has this digest")
    parser.add_argument("--jobs", "-j", type=int, default=DEFAULT_JOBS, metavar="N",
                        help="blobs fetched at once (default: %(default)s)")
    parser.add_argument("--no-devices", action="store_true",
                        help="do not create the image's device nodes (skipped and counted)")
    parser.add_argument("--no-setuid", action="store_true",
                        help="clear setuid and setgid bits (cleared files are counted)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--no-progress", action="store_true", help="never draw a progress bar")


def run(args: argparse.Namespace) -> int:
    from ocixfs.config import default_cache_dir
    from ocixfs.image.loading import check_digest, load_image
    from ocixfs.store.spec import stores_or_default
    from ocixfs.tools.extract import ExtractOptions, check_destination, extract_image

    digest = check_digest(args.digest) if args.digest is not None else None
    check_destination(args.dest)
    stores = stores_or_default(args.store, args.image)
    image = load_image(args.image, expected_digest=digest)
    options = ExtractOptions(jobs=args.jobs, progress=not args.no_progress,
                             devices=not args.no_devices, setuid=not args.no_setuid)
    with _quiet_fetcher(unless=args.debug):
        summary = extract_image(image, args.dest, stores=stores,
                                cache_dir=args.cache_dir or default_cache_dir(), options=options)
    if args.json:
        print(json.dumps(summary.to_json(), indent=2))
    else:
        print(format_summary(summary, args.image))
    return 0


@contextlib.contextmanager
def _quiet_fetcher(*, unless: bool) -> Iterator[None]:
    """Extract stops at the first blob no store delivered and names every source's reason
    in its one-line error; the fetcher's per-attempt log lines would only repeat that."""
    logger = logging.getLogger("ocixfs.fetch.fetcher")
    level = logger.level
    if not unless:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def format_summary(summary: ExtractSummary, image: str) -> str:
    from ocixfs.progress import format_bytes

    rate = summary.bytes / summary.seconds if summary.seconds > 0 else 0.0
    kinds = [f"{summary.directories} directories", f"{summary.files} files"]
    for count, name in ((summary.hardlinks, "hardlinks"), (summary.symlinks, "symlinks"),
                        (summary.devices, "devices"), (summary.fifos, "fifos")):
        if count:
            kinds.append(f"{count} {name}")
    lines = [
        f"extracted {image} into {summary.dest}",
        f"  entries     {summary.entries}  ({', '.join(kinds)})",
        f"  content     {format_bytes(summary.bytes)} in {summary.blobs} blobs "
        f"({format_bytes(summary.blob_bytes)} distinct)",
        f"  fetched     {summary.fetched_blobs} blobs, {format_bytes(summary.fetched_bytes)}"
        f"  ({format_bytes(summary.received_bytes)} over the wire)",
        f"  from cache  {summary.cached_blobs} blobs, {format_bytes(summary.cached_bytes)}",
        f"  time        {summary.seconds:.2f} s  ({format_bytes(rate)}/s)",
    ]
    if summary.skipped:
        skipped = ", ".join(f"{count} {kind}" for kind, count in sorted(summary.skipped.items()))
        lines.append(f"  skipped     {skipped} (not permitted here)")
    return "\n".join(lines)
