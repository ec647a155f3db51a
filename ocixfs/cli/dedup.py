"""``ocixfs dedup IMAGE...``: what a set of images shares, in one table."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ocixfs.tools.compare import Measure, ShareTable

__all__ = ["DESCRIPTION", "HELP", "NAME", "add_arguments", "format_table", "run"]

NAME = "dedup"
HELP = "show the bytes a set of images shares, and what a host storing all of them pays"
DESCRIPTION = """\
For a set of OCIX images (files or http(s) URLs), one table: per image its files, their
size, its content (distinct blob bytes: what fetching all of it costs) and the bytes
unique to it (blobs no other image in the set has); then, over the set, the bytes shared
by all, the distinct bytes (what a host holding every image fetches and stores with
OCIX: each blob once) and the sum of the images' own sizes.

  --store DIR   adds zstd columns: each blob at the size of its .zst sibling in DIR
  --oci SRC     once per image, in order: the OCI layout the image was built from
                (LAYOUT[:REF]); adds what the same images cost as OCI layers
                (compressed layer blobs, each distinct layer digest once)
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", metavar="IMAGE", nargs="+", help="OCIX manifests")
    parser.add_argument("--store", metavar="DIR", type=Path,
                        help="local blob store with .zst blobs: report compressed sizes too")
    parser.add_argument("--oci", action="append", metavar="LAYOUT[:REF]",
                        help="the OCI image each IMAGE was built from, one per IMAGE in order")
    parser.add_argument("--json", action="store_true", help="print one JSON document")


def run(args: argparse.Namespace) -> int:
    from ocixfs.errors import UsageError
    from ocixfs.image.loading import load_image
    from ocixfs.image.tree import Tree
    from ocixfs.tools.compare import (
        blob_sizes,
        compressed_sizes,
        has_compressed_blobs,
        oci_layers,
        share_table,
    )

    if args.oci is not None and len(args.oci) != len(args.images):
        raise UsageError(f"{len(args.oci)} --oci for {len(args.images)} images "
                         "(give one per image, in the same order)")
    manifests = [load_image(image).manifest for image in args.images]
    compressed = None
    missing = 0
    if args.store is not None and has_compressed_blobs(args.store):
        union: dict[bytes, int] = {}
        for manifest in manifests:
            union.update(blob_sizes(Tree.from_manifest(manifest)))
        compressed, missing = compressed_sizes(args.store, union)
    layers = [oci_layers(spec) for spec in args.oci] if args.oci else None
    names = _short_names(args.images)
    table = share_table(names, manifests, compressed=compressed, layers=layers,
                        missing_blobs=missing)
    if args.json:
        document = table.to_json()
        for entry, image in zip(document["images"], args.images, strict=True):
            entry["image"] = image
        print(json.dumps(document, indent=2))
    else:
        print(format_table(table))
    return 0


def _short_names(images: list[str]) -> list[str]:
    """File names when they tell the images apart, else the paths as given."""
    names = [os.path.basename(image.rstrip("/")) or image for image in images]
    return names if len(set(names)) == len(names) else list(images)


def format_table(table: ShareTable) -> str:
    from ocixfs.progress import format_bytes as size

    columns = ["IMAGE", "FILES", "SIZE", "CONTENT", "UNIQUE"]
    measures: list[Measure] = [table.content]
    if table.zstd is not None:
        columns += ["ZSTD", "ZSTD UNIQUE"]
        measures.append(table.zstd)
    if table.oci is not None:
        columns += ["OCI LAYERS", "OCI UNIQUE"]
        measures.append(table.oci)
    rows = []
    for index, name in enumerate(table.names):
        row = [name, str(table.files[index]), size(table.file_bytes[index])]
        for measure in measures:
            row += [size(measure.per_image[index]), size(measure.unique[index])]
        rows.append(row)
    rows.append([])
    for label, attribute in (("sum of images", "summed"), ("shared by all", "shared"),
                             ("stored once", "distinct")):
        row = [label, "", ""]
        for measure in measures:
            row += [size(getattr(measure, attribute)), ""]
        rows.append(row)
    lines = _align([columns, *rows])
    lines += ["", *_conclusions(table)]
    return "\n".join(lines)


def _align(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows if len(row) > i) for i in range(len(rows[0]))]
    out = []
    for row in rows:
        cells = [cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i])
                 for i, cell in enumerate(row)]
        out.append("  ".join(cells).rstrip())
    return out


def _conclusions(table: ShareTable) -> list[str]:
    from ocixfs.progress import format_bytes as size

    content = table.content
    count = len(table.names)
    ratio = content.distinct / content.summed if content.summed else 0.0
    line = (f"A host holding all {count} images fetches and stores {size(content.distinct)} "
            f"with OCIX ({ratio:.0%} of the {size(content.summed)} they add up to)")
    if table.zstd is not None:
        line += f"; {size(table.zstd.distinct)} as zstd blobs"
    lines = [line + "."]
    if table.oci is not None:
        lines.append(f"As OCI layers the same images cost {size(table.oci.distinct)} "
                     f"(each distinct layer once; {size(table.oci.summed)} summed).")
    if table.missing_blobs:
        lines.append(f"Note: {table.missing_blobs} blobs are missing from the store "
                     "(counted at their plain size).")
    return lines
