"""``ocixfs build SOURCE --store DIR --output IMAGE.ocix``: turn an image into OCIX."""

from __future__ import annotations

import argparse
import json
import re

__all__ = ["DESCRIPTION", "HELP", "NAME", "add_arguments", "parse_size", "run"]

NAME = "build"
HELP = "build an OCIX manifest and its blobs from an OCI image, docker archive, tar or directory"
DESCRIPTION = """\
Build an OCIX image: write every regular file's content into the blob store
(STORE/blobs/blake3/<hex>, each blob once however many images share it) and the
manifest describing the whole tree to --output.

SOURCE is one of:
  oci:PATH[:REF]             an OCI image layout (skopeo, umoci, buildah); REF is the
                             org.opencontainers.image.ref.name of the image
  docker-archive:FILE[:REF]  a `docker save` / `podman save` archive; REF is a RepoTag
  tar:FILE                   a root file system tarball (plain, gzip or zstd; - is stdin)
  dir:PATH                   a root file system directory

Layers are applied in order with OCI whiteouts, as `umoci unpack` would. Version 1
manifests (the default) keep xattrs and split files larger than --chunk-size into
chunk blobs; --format-version 0 writes what the reference tool could have written.
"""

_SIZE = re.compile(r"(\d+)\s*([kmg]?)(i?b)?", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str) -> int:
    """``"1M"``, ``"256KiB"``, ``"65536"`` → bytes (binary units)."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1M, 256K, 65536)")
    return int(match[1]) * _UNITS[match[2].lower()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ocixfs.build.builder import DEFAULT_CHUNK_SIZE
    from ocixfs.build.inputs import DEFAULT_PLATFORM
    from ocixfs.image.format import LATEST_VERSION, SUPPORTED_VERSIONS
    from ocixfs.store.writer import DEFAULT_ZSTD_LEVEL
    from ocixfs.tools.record import DEFAULT_TIMEOUT

    parser.add_argument("source", metavar="SOURCE", help="what to build (see above)")
    parser.add_argument("--store", metavar="DIR", required=True,
                        help="blob store directory (created if missing)")
    parser.add_argument("--output", "-o", metavar="IMAGE.ocix", required=True,
                        help="where to write the manifest (replaced atomically)")
    parser.add_argument("--format-version", type=int, choices=SUPPORTED_VERSIONS,
                        default=LATEST_VERSION,
                        help="manifest format version (default: %(default)s)")
    parser.add_argument("--chunk-size", type=parse_size, default=DEFAULT_CHUNK_SIZE,
                        metavar="SIZE",
                        help="split larger files into chunks of SIZE (version 1; default 1M)")
    parser.add_argument("--compress", choices=("zstd", "none"), default="zstd",
                        help="zstd (the default): also write a .zst copy of every blob, which "
                        "mounts fetch instead (about 40%% of the bytes of a typical root "
                        "filesystem); none: plain blobs only")
    parser.add_argument("--zstd-level", type=int, default=DEFAULT_ZSTD_LEVEL, metavar="N",
                        help="zstd compression level (default: %(default)s)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="worker threads for hashing and writing (default: 2 x cores)")
    parser.add_argument("--platform", default=DEFAULT_PLATFORM, metavar="OS/ARCH",
                        help="which image of a multi-platform index (default: %(default)s)")
    parser.add_argument("--profile-cmd", action="append", default=[], metavar="LINE",
                        help="after the build, run LINE (with the image's /bin/sh -c) inside "
                        "the new image and write what it opened to OUTPUT.profile, which "
                        "mounts play (--prefetch auto); repeatable: the runs are merged. As "
                        "'ocixfs profile record --strict': a failing LINE fails the build "
                        "(the image stays, no profile is written). The profile's files are "
                        "also written to the store as one pack file (as 'ocixfs profile "
                        "pack'), fetched with one request by mounts that play it. Needs root")
    parser.add_argument("--profile-timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help="kill a --profile-cmd still running after SECONDS (default "
                        "%(default)g)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--no-progress", action="store_true", help="never draw a progress bar")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ocixfs.build.builder import BuildOptions, build_image
    from ocixfs.progress import format_bytes

    _check_profile_options(args)
    options = BuildOptions(
        format_version=args.format_version,
        chunk_size=args.chunk_size,
        compress=None if args.compress == "none" else args.compress,
        zstd_level=args.zstd_level,
        threads=args.threads,
        platform=args.platform,
        progress=not args.no_progress,
    )
    summary = build_image(args.source, store=Path(args.store), output=Path(args.output),
                          options=options)
    profile = _record_profile(args)
    if args.json:
        print(json.dumps(summary.to_json() | ({"profile": profile} if profile else {}),
                         indent=2))
        return 0
    rate = summary.content_bytes / summary.seconds if summary.seconds > 0 else 0.0
    lines = [
        f"wrote {summary.output} (version {summary.format_version}, {summary.digest})",
        f"  entries         {summary.entries}",
        f"  regular files   {summary.regular_files}  "
        f"({format_bytes(summary.content_bytes)} of content)",
        f"  new blobs       {summary.new_blobs}  ({format_bytes(summary.new_blob_bytes)})",
        f"  already stored  {summary.existing_blobs}  "
        f"({format_bytes(summary.existing_blob_bytes)})",
    ]
    if summary.compressed_bytes:
        lines.append(f"  zstd written    {format_bytes(summary.compressed_bytes)}")
    lines.append(f"  time            {summary.seconds:.2f} s  ({format_bytes(rate)}/s)")
    if profile:
        lines.append(f"wrote {profile['profile']} ({profile['files']} files)")
        packs = profile.get("packs")
        if isinstance(packs, dict):
            lines.append(f"wrote {len(packs['parts'])} profile pack to the store "
                         f"({packs['blobs']} files, {format_bytes(packs['pack_bytes'])})")
    print("\n".join(lines))
    return 0


def _check_profile_options(args: argparse.Namespace) -> None:
    """The ``--profile-cmd`` mistakes found before the build rather than after it."""
    import os

    from ocixfs.errors import UsageError

    if args.profile_cmd and os.geteuid() != 0:
        raise UsageError("--profile-cmd needs root (it mounts in a private namespace)")
    if not args.profile_timeout > 0:
        raise UsageError("--profile-timeout must be positive")


def _record_profile(args: argparse.Namespace) -> dict[str, object] | None:
    """``--profile-cmd``: record the new image's profile beside it (see
    ``ocixfs profile record``); its summary, or None when no command was given."""
    if not args.profile_cmd:
        return None
    from pathlib import Path

    from ocixfs.cli.profile_record import record_after_build

    return record_after_build(Path(args.output), Path(args.store), args.profile_cmd,
                              args.profile_timeout, output_to_stderr=args.json)
