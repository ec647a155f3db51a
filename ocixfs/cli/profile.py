"""``ocixfs profile``: save, show and merge access profiles."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ocixfs.config import PACK_ZSTD_LEVEL

if TYPE_CHECKING:
    from ocixfs.mount.profile import Profile

NAME = "profile"
HELP = "save, show, merge, record or pack access profiles (what a start-up reads, in order)"
DESCRIPTION = """\
An access profile lists the files a workload opened, in first-access order. A mount that
has one fetches those files, many at a time, as soon as it is up (see 'ocixfs mount
--prefetch'). Profiles name paths, not hashes: one recorded on version N of an image
serves version N+1 too.

  ocixfs profile save MOUNTPOINT FILE     what the running mount has seen so far
  ocixfs profile show FILE [--json]       list a profile
  ocixfs profile merge OUT IN [IN ...]    combine runs (e.g. from many hosts), keeping
                                          each path's earliest access
  ocixfs profile record IMAGE -- CMD      run CMD inside IMAGE, privately, and write
                                          IMAGE.profile (see 'profile record --help')
  ocixfs profile pack FILE --image IMAGE --store DIR
                                          put the files FILE names into a few pack files
                                          of the store, fetched one request each
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ocixfs.cli.profile_record import add_record_parser

    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    save = sub.add_parser(
        "save", help="write the running mount's profile to FILE",
        description="Write the access profile of the mount at MOUNTPOINT (the files opened "
        "so far, in first-access order) to FILE, replacing it atomically. Put it beside the "
        "manifest as IMAGE.ocix.profile and every mount of that image prefetches it.")
    save.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT", help="a running ocixfs mount")
    save.add_argument("output", type=Path, metavar="FILE", help="where to write the profile")
    show = sub.add_parser(
        "show", help="list a profile",
        description="List the files of the profile FILE in first-access order, with the "
        "milliseconds after mount at which each was first opened.")
    show.add_argument("profile", type=Path, metavar="FILE", help="a profile file")
    show.add_argument("--json", action="store_true", help="print one JSON document")
    merge = sub.add_parser(
        "merge", help="combine profiles, keeping each path's earliest access",
        description="Combine the profiles IN (runs on many hosts, or of several workloads) "
        "into OUT: every path any of them opened, at its earliest access time.")
    merge.add_argument("output", type=Path, metavar="OUT", help="where to write the result")
    merge.add_argument("inputs", type=Path, nargs="+", metavar="IN", help="profile files")
    add_record_parser(sub)
    _add_pack_arguments(sub)


def _add_pack_arguments(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    pack = sub.add_parser(
        "pack", help="write the profile's files into pack files of a local store",
        description="Write the blobs of the files the profile FILE names, as IMAGE has them, "
        "into the local store DIR as a profile pack set (DIR/packs/<hex>.<k>.pack): the "
        "start-up's working set in access order, in one or a few files. A mount of IMAGE "
        "that plays the same profile (--prefetch) fetches each with one plain GET instead "
        "of one request per file, and still verifies every file by its own hash. FILE is "
        "rewritten to name the set, so that a mount playing it asks for the set at once, "
        "before the manifest has arrived. Serve DIR as before; mounts that find no pack "
        "fetch file by file.")
    pack.add_argument("profile", type=Path, metavar="FILE", help="a profile file")
    pack.add_argument("--image", required=True, metavar="IMAGE.ocix",
                      help="the image the profile is played on (a file or URL)")
    pack.add_argument("--store", required=True, type=Path, metavar="DIR",
                      help="the local store directory holding the image's blobs; the packs "
                      "are written into it (atomically)")
    pack.add_argument("--parts", type=int, default=1, metavar="N",
                      help="split the set into N packs, fetched in parallel (default 1)")
    pack.add_argument("--zstd-level", type=int, default=PACK_ZSTD_LEVEL, metavar="N",
                      help="compress each file at zstd level N, 1-22 (default "
                      f"{PACK_ZSTD_LEVEL}: packs are made once and fetched by every start-up; "
                      "the store's own .zst is used when smaller)")
    pack.add_argument("--json", action="store_true", help="print one JSON document")


def run(args: argparse.Namespace) -> int:
    from ocixfs.mount.profile import Profile, encode_profile, merge

    if args.action == "record":
        from ocixfs.cli.profile_record import run_record

        return run_record(args)
    if args.action == "save":
        from ocixfs.mount.control import request

        answer = request(Path(os.path.abspath(args.mountpoint)), "profile")
        profile = Profile(tuple((str(p), int(ms)) for p, ms in answer["entries"]))
        write_output(args.output, encode_profile(profile))
        print(f"{args.output}: {len(profile.entries)} files")
    elif args.action == "show":
        profile = load_profile_file(args.profile)
        if args.json:
            print(json.dumps({"entries": [[p, ms] for p, ms in profile.entries]}, indent=1))
        else:
            for path, ms in profile.entries:
                print(f"{ms:>8} ms  {path}")
            print(f"{len(profile.entries)} files")
    elif args.action == "pack":
        _pack(args)
    else:
        merged = merge(load_profile_file(path) for path in args.inputs)
        write_output(args.output, encode_profile(merged))
        print(f"{args.output}: {len(merged.entries)} files from {len(args.inputs)} profiles")
    return 0


def _pack(args: argparse.Namespace) -> None:
    from ocixfs.errors import UsageError
    from ocixfs.image.loading import load_image
    from ocixfs.image.tree import Tree
    from ocixfs.mount.profile import encode_profile
    from ocixfs.store.layout import looks_like_store
    from ocixfs.tools.packs import describe, make_packs

    if not looks_like_store(args.store):
        raise UsageError(f"{args.store}: not a local blob store directory")
    profile = load_profile_file(args.profile)
    tree = Tree.from_manifest(load_image(args.image).manifest)
    packed = make_packs(tree, profile, args.store, parts=args.parts, level=args.zstd_level)
    if packed.named_by(profile) != profile:
        write_output(args.profile, encode_profile(packed.named_by(profile)))
    print(json.dumps(packed.as_dict(), indent=1) if args.json else describe(packed, args.store))


def load_profile_file(path: Path) -> Profile:
    from ocixfs.errors import UsageError
    from ocixfs.mount.profile import decode_profile, read_profile_file

    try:
        data = read_profile_file(path)
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror}") from None
    return decode_profile(data, source=os.fspath(path))


def write_output(path: Path, data: bytes) -> None:
    """``safefs.write_atomically``; an ``OSError`` becomes one ``UsageError`` line."""
    from ocixfs.errors import UsageError
    from ocixfs.safefs import write_atomically

    try:
        write_atomically(path, data)
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror}") from None
