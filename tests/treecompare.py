"""Compare two directory trees the way a user of a root filesystem would notice."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def walk(root: Path) -> dict[str, os.stat_result]:
    """Every path under ``root`` (relative, "/" for the root) with its lstat."""
    found = {"/": os.lstat(root)}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            found["/" + os.fspath(full.relative_to(root))] = os.lstat(full)
    return found


def xattrs(path: Path) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in names}


def differences(
    source: Path, mounted: Path, *, check_xattrs: bool = True, check_contents: bool = True
) -> list[str]:
    """A list of human-readable differences; empty when the trees match."""
    problems: list[str] = []
    a, b = walk(source), walk(mounted)
    if set(a) != set(b):
        problems.append(f"paths only in source: {sorted(set(a) - set(b))[:10]}")
        problems.append(f"paths only in mount: {sorted(set(b) - set(a))[:10]}")
    groups_a: dict[int, set[str]] = {}
    groups_b: dict[int, set[str]] = {}
    for path in sorted(set(a) & set(b)):
        sa, sb = a[path], b[path]
        for field in ("st_mode", "st_uid", "st_gid"):
            if getattr(sa, field) != getattr(sb, field):
                problems.append(f"{path}: {field} {getattr(sa, field):o} != {getattr(sb, field):o}")
        if not stat.S_ISDIR(sa.st_mode) and sa.st_mtime_ns != sb.st_mtime_ns:
            problems.append(f"{path}: mtime {sa.st_mtime_ns} != {sb.st_mtime_ns}")
        src, mnt = source / path.lstrip("/"), mounted / path.lstrip("/")
        if stat.S_ISREG(sa.st_mode):
            if sa.st_size != sb.st_size:
                problems.append(f"{path}: size {sa.st_size} != {sb.st_size}")
            elif check_contents and src.read_bytes() != mnt.read_bytes():
                problems.append(f"{path}: contents differ")
            if sa.st_nlink > 1:
                groups_a.setdefault(sa.st_ino, set()).add(path)
                groups_b.setdefault(sb.st_ino, set()).add(path)
            if sa.st_nlink != sb.st_nlink:
                problems.append(f"{path}: nlink {sa.st_nlink} != {sb.st_nlink}")
        elif stat.S_ISLNK(sa.st_mode):
            if os.readlink(src) != os.readlink(mnt):
                problems.append(f"{path}: symlink {os.readlink(src)} != {os.readlink(mnt)}")
        elif (stat.S_ISCHR(sa.st_mode) or stat.S_ISBLK(sa.st_mode)) and sa.st_rdev != sb.st_rdev:
            problems.append(f"{path}: rdev {sa.st_rdev} != {sb.st_rdev}")
        if check_xattrs and not stat.S_ISLNK(sa.st_mode) and xattrs(src) != xattrs(mnt):
            problems.append(f"{path}: xattrs {xattrs(src)} != {xattrs(mnt)}")
    if sorted(map(sorted, groups_a.values())) != sorted(map(sorted, groups_b.values())):
        problems.append(f"hardlink groups differ: {groups_a.values()} vs {groups_b.values()}")
    return problems
