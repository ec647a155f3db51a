"""``ocixfs cache``: inspect, trim and check the local blob cache."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ocixfs.cache.directory import CacheDirectory
    from ocixfs.image.format import Manifest

NAME = "cache"
HELP = "show, trim (gc) or check (fsck) the local blob cache"
DESCRIPTION = """\
The cache holds verified blobs shared by every mount on the host. Mounts keep it under
their quota (--cache-max-size) themselves, evicting the least recently used blobs; these
commands are for looking at it and for maintenance, and are safe while mounts run: a blob
a mount holds open is never removed (except by fsck, when it is damaged).

  ocixfs cache stats                   blobs, bytes, quota, profiles, leftovers, mounts
  ocixfs cache gc --max-size 5G        evict least recently used blobs down to 5 GiB
  ocixfs cache gc --all-unused [IMAGE ...]
                                       remove every blob that no running mount of this
                                       cache and no IMAGE given here refers to
  ocixfs cache fsck                    re-hash every blob; remove damaged blobs, strays
                                       and leftovers of dead fills (exit 1 if any found)

Sizes: 10G, 500M, 1.5T (powers of 1024) or 20% of the filesystem holding the cache.
"""

CONTROL_TIMEOUT = 10.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--cache-dir", type=Path, metavar="DIR",
                        help="the cache (default /var/cache/ocixfs as root, else "
                        "$XDG_CACHE_HOME/ocixfs)")
    common.add_argument("--json", action="store_true", help="print one JSON document")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    sub.add_parser("stats", parents=[common], help="what the cache holds")
    gc = sub.add_parser("gc", parents=[common], help="remove blobs (never ones in use)")
    how = gc.add_mutually_exclusive_group(required=True)
    how.add_argument("--max-size", metavar="SIZE",
                     help="evict least recently used blobs until at most SIZE remain")
    how.add_argument("--all-unused", action="store_true",
                     help="remove every blob no running mount (and no IMAGE) refers to")
    gc.add_argument("keep", nargs="*", metavar="IMAGE",
                    help="with --all-unused: also keep the blobs of these images (files or URLs)")
    gc.add_argument("--dry-run", action="store_true", help="only report what would go")
    fsck = sub.add_parser("fsck", parents=[common], help="re-hash every blob, remove bad ones")
    fsck.add_argument("--threads", type=int, default=max(1, min(8, os.cpu_count() or 1)),
                      metavar="N", help="blobs hashed at once (default: the CPU count, max 8)")
    fsck.add_argument("--dry-run", action="store_true", help="only report, remove nothing")


def run(args: argparse.Namespace) -> int:
    from ocixfs.cache.directory import CacheDirectory
    from ocixfs.config import default_cache_dir
    from ocixfs.errors import UsageError

    root = Path(os.path.abspath(args.cache_dir or default_cache_dir()))
    if args.action == "gc" and args.keep and not args.all_unused:
        raise UsageError("IMAGE arguments only make sense with --all-unused")
    if not (root / "blobs").is_dir():
        raise UsageError(f"{root}: no ocixfs cache there")
    directory = CacheDirectory(root, create=False)
    try:
        if args.action == "stats":
            return _stats(directory, as_json=args.json)
        if args.action == "gc":
            return _gc(directory, args)
        return _fsck(directory, threads=args.threads, dry_run=args.dry_run, as_json=args.json)
    finally:
        directory.close()


# --- stats -------------------------------------------------------------------------------


def _stats(directory: CacheDirectory, *, as_json: bool) -> int:
    from ocixfs.cache.layout import scan_blobs
    from ocixfs.config import CacheQuota

    scan = scan_blobs(directory.blobs)
    counted = directory.usage.read()
    fs = os.statvfs(directory.root)
    fs_bytes = fs.f_blocks * fs.f_frsize
    profiles = [p for p in directory.profiles.glob("*.profile") if p.is_file()]
    tmp = directory.tmp_leftovers()
    mounts, unanswered = running_mounts(directory.root)
    used = [blob.used for blob in scan.blobs]
    report: dict[str, Any] = {
        "cache_dir": os.fspath(directory.root),
        "blobs": len(scan.blobs),
        "bytes": scan.bytes,
        "counted": {"bytes": counted.bytes, "blobs": counted.blobs,
                    "scanned_at": counted.scanned_at or None, "trusted": counted.trusted},
        "quota": {"default_bytes": CacheQuota().limit(fs_bytes),
                  "low_water": directory.config.low_water},
        "filesystem": {"bytes": fs_bytes, "free_bytes": fs.f_bavail * fs.f_frsize},
        "profiles": {"files": len(profiles), "bytes": sum(p.stat().st_size for p in profiles)},
        "tmp": {"files": tmp.files, "bytes": tmp.bytes, "in_use": tmp.in_use},
        "strays": len(scan.strays),
        "least_recent_use": min(used, default=None),
        "most_recent_use": max(used, default=None),
        "mounts": [{"mountpoint": m.get("mountpoint"), "pid": m.get("pid"),
                    "image": m.get("image")} for m in mounts],
        "unanswered_sockets": unanswered,
    }
    print(json.dumps(report, indent=2, sort_keys=True) if as_json else _format_stats(report))
    return 0


def _format_stats(report: dict[str, Any]) -> str:
    from ocixfs.progress import format_bytes as size

    counted, quota, fs = report["counted"], report["quota"], report["filesystem"]
    scanned = counted["scanned_at"]
    age = f"rescanned {_ago(scanned)}" if scanned else "never rescanned"
    lines = [
        f"cache        {report['cache_dir']}",
        f"blobs        {report['blobs']} ({size(report['bytes'])})",
        f"counted      {size(counted['bytes'])} in {counted['blobs']} blobs ({age}"
        f"{'' if counted['trusted'] else ', to be rescanned'})",
        f"quota        {size(quota['default_bytes'])} by default (10% of the filesystem, at "
        f"most 20 GiB; mounts may set --cache-max-size), evicting to "
        f"{quota['low_water']:.0%}",
        f"filesystem   {size(fs['bytes'])}, {size(fs['free_bytes'])} free",
        f"profiles     {report['profiles']['files']} ({size(report['profiles']['bytes'])})",
        f"tmp          {report['tmp']['files']} files ({size(report['tmp']['bytes'])}), "
        f"{report['tmp']['in_use']} being filled",
        f"strays       {report['strays']}",
    ]
    if report["least_recent_use"] is not None:
        lines.append(f"last use     oldest {_ago(report['least_recent_use'])}, newest "
                     f"{_ago(report['most_recent_use'])}")
    for mount in report["mounts"]:
        lines.append(f"mount        {mount['mountpoint']} (pid {mount['pid']}): {mount['image']}")
    for path in report["unanswered_sockets"]:
        lines.append(f"unanswered   {path}")
    return "\n".join(lines)


def _ago(when: float) -> str:
    seconds = max(0.0, time.time() - when)
    for unit, length in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= length:
            return f"{seconds / length:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"


# --- gc ----------------------------------------------------------------------------------


def _gc(directory: CacheDirectory, args: argparse.Namespace) -> int:
    from ocixfs.cache.sizes import filesystem_size, parse_quota
    from ocixfs.errors import UsageError
    from ocixfs.progress import format_bytes

    keep: set[str] = set()
    if args.all_unused:
        target = 0
        keep = needed_blobs(directory.root, args.keep)
    else:
        limit = parse_quota(args.max_size).limit(filesystem_size(directory.root))
        if limit is None:
            raise UsageError("gc --max-size needs a size, not 'unlimited'")
        target = limit
    result = directory.trim(target, keep=keep, dry_run=args.dry_run)
    tmp_removed = 0 if args.dry_run else directory.remove_stale_tmp()
    report = {
        "dry_run": args.dry_run,
        "kept_for_mounts_and_images": len(keep),
        "removed_blobs": result.evicted_blobs,
        "removed_bytes": result.evicted_bytes,
        "pinned_blobs": result.pinned_blobs,
        "pinned_bytes": result.pinned_bytes,
        "remaining_blobs": result.remaining_blobs,
        "remaining_bytes": result.remaining_bytes,
        "tmp_removed": tmp_removed,
        "seconds": round(result.seconds, 3),
    }
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        verb = "would remove" if args.dry_run else "removed"
        print(f"{verb} {result.evicted_blobs} blobs ({format_bytes(result.evicted_bytes)}); "
              f"{result.remaining_blobs} blobs ({format_bytes(result.remaining_bytes)}) remain, "
              f"{result.pinned_blobs} of them skipped because a mount holds them open")
        if tmp_removed:
            print(f"removed {tmp_removed} leftovers of interrupted fills")
    return 0


def needed_blobs(root: Path, images: list[str]) -> set[str]:
    """Hex names of every blob that a running mount of the cache at ``root``, or one of
    ``images``, refers to. Raises ``UsageError`` when a mount cannot be accounted for."""
    from ocixfs.errors import OcixError, UsageError
    from ocixfs.image.loading import load_image

    keep: set[str] = set()
    given: set[str] = set()
    for image in images:
        loaded = load_image(image)
        given.add(loaded.digest)
        keep |= _manifest_blobs(loaded.manifest)
    mounts, unanswered = running_mounts(root)
    if unanswered:
        raise UsageError(
            f"no answer from {', '.join(unanswered)}: cannot tell which blobs those mounts "
            "need; try again, or unmount them"
        )
    for mount in mounts:
        digest = str(mount.get("image_digest"))
        if digest in given:
            continue
        try:
            loaded = load_image(str(mount.get("image")), expected_digest=digest)
        except OcixError as exc:
            raise UsageError(
                f"cannot read the image mounted at {mount.get('mountpoint')} ({exc}); pass it "
                "as an IMAGE argument to keep its blobs"
            ) from None
        keep |= _manifest_blobs(loaded.manifest)
    return keep


def _manifest_blobs(manifest: Manifest) -> set[str]:
    names: set[str] = set()
    for entry in manifest.entries.values():
        names.update(chunk.hex for chunk in entry.blobs)
        if entry.digest is not None:
            names.add(entry.digest.hex())
    return names


def running_mounts(root: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The stats of every running ocixfs daemon that uses the cache at ``root`` (found by
    their control sockets), and the sockets that took connections but did not answer."""
    from ocixfs.mount.control import ask_every_daemon

    answers, unanswered = ask_every_daemon("stats", timeout=CONTROL_TIMEOUT)
    mounts = [answer for answer in answers
              if _same_directory(str(answer.get("cache_dir", "")), root)]
    return mounts, unanswered


def _same_directory(reported: str, root: Path) -> bool:
    if not reported:
        return False
    path = os.path.join("/", reported)  # daemons run in "/": a relative path means that
    try:
        return os.path.samefile(path, root)
    except OSError:
        return os.path.realpath(path) == os.path.realpath(root)


# --- fsck --------------------------------------------------------------------------------


def _fsck(directory: CacheDirectory, *, threads: int, dry_run: bool, as_json: bool) -> int:
    from ocixfs.cache.fsck import check
    from ocixfs.cache.index import check_indexes
    from ocixfs.cache.layout import cache_errors, scan_blobs
    from ocixfs.progress import Progress, format_bytes

    total = scan_blobs(directory.blobs).bytes
    with Progress("fsck", total=total) as progress:
        report = check(directory, threads=threads, progress=progress.advance, remove=not dry_run)
    with cache_errors("checking image indexes"):
        indexes = check_indexes(directory.root, remove=not dry_run)
    rate = report.bytes / report.seconds if report.seconds > 0 else 0.0
    problems = len(report.bad) + len(report.strays) + len(indexes.bad)
    if as_json:
        print(json.dumps({
            "blobs": report.blobs, "bytes": report.bytes, "bad": list(report.bad),
            "strays": list(report.strays), "removed": report.removed,
            "tmp_removed": report.tmp_removed, "seconds": round(report.seconds, 3),
            "dry_run": dry_run, "indexes": indexes.good, "bad_indexes": list(indexes.bad),
        }, indent=2, sort_keys=True))
    else:
        for name in report.bad:
            print(f"damaged  {name}")
        for path in report.strays:
            print(f"stray    {path}")
        fate = "kept (--dry-run)" if dry_run else "removed"
        print(f"checked {report.blobs} blobs ({format_bytes(report.bytes)}) in "
              f"{report.seconds:.1f} s ({format_bytes(rate)}/s)")
        print(f"  damaged blobs       {_count_or_none(len(report.bad), fate)}"
              f"{' (a read fetches them again)' if report.bad and not dry_run else ''}")
        print(f"  stray files         {_count_or_none(len(report.strays), fate)}"
              f"{' (not named like a blob, or in the wrong directory)' if report.strays else ''}")
        print(f"  interrupted fills   {_count_or_none(report.tmp_removed, 'removed')}")
        print(f"  bad image indexes   {_count_or_none(len(indexes.bad), fate)}"
              f"{' (the next mount rebuilds them)' if indexes.bad else ''}")
    return 1 if problems else 0


def _count_or_none(count: int, fate: str) -> str:
    return f"{count}, {fate}" if count else "none"
