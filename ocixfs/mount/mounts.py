"""The kernel's mount table and calls: what is mounted at a path (``/proc/self/mounts``),
and ``mount(2)``/``umount2(2)``, which Python 3.11 lacks, with the flags ocixfs uses.
Imports next to nothing."""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MNT_DETACH", "MS_BIND", "MS_MOVE", "MS_NOATIME", "MS_NODEV", "MS_NODIRATIME",
           "MS_NOEXEC", "MS_NOSUID", "MS_PRIVATE", "MS_RDONLY", "MS_REC", "MountEntry",
           "mount", "mount_type", "mounted_at", "mounts_below", "umount"]

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True, slots=True)
class MountEntry:
    """One line of ``/proc/self/mounts``: the source, the file system type and the
    options, as the kernel wrote them (octal escapes kept)."""

    source: bytes
    fstype: str
    options: bytes


def mounted_at(path: Path) -> list[MountEntry]:
    """Every mount at ``path`` (made absolute), the topmost last; empty when none or the
    table cannot be read."""
    target = _escaped(os.path.abspath(path))
    try:
        with open("/proc/self/mounts", "rb") as table:
            return [MountEntry(fields[0], fields[2].decode(errors="replace"), fields[3])
                    for fields in (line.split() for line in table)
                    if len(fields) > 3 and fields[1] == target]
    except OSError:
        return []


def mount_type(path: Path) -> str:
    """The file system type of the topmost mount at ``path`` ("" if none)."""
    found = mounted_at(path)
    return found[-1].fstype if found else ""


def mounts_below(directory: Path) -> list[Path]:
    """Mountpoints under ``directory`` (not itself), the last mounted first."""
    prefix = _escaped(os.fspath(directory)) + b"/"
    found = []
    with open("/proc/self/mounts", "rb") as table:
        for line in table:
            fields = line.split()
            if len(fields) > 1 and fields[1].startswith(prefix):
                found.append(Path(os.fsdecode(fields[1].replace(b"\\040", b" "))))
    return found[::-1]


def mount(source: str, target: Path, fstype: str | None, flags: int,
          data: str | None = None) -> None:
    """``mount(2)``; raises ``OSError`` naming the target."""
    _checked(_libc.mount(os.fsencode(source), os.fsencode(target),
                         fstype.encode() if fstype else None, ctypes.c_ulong(flags),
                         data.encode() if data else None), f"mount {target}")


def umount(target: Path, flags: int = 0) -> None:
    """``umount2(2)``; raises ``OSError`` naming the target."""
    _checked(_libc.umount2(os.fsencode(target), flags), f"unmount {target}")


def _checked(result: int, what: str) -> None:
    if result != 0:
        number = ctypes.get_errno()
        raise OSError(number, f"{what}: {os.strerror(number)}")


def _escaped(path: str) -> bytes:
    return os.fsencode(path).replace(b" ", b"\\040")
