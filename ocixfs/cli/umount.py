"""``ocixfs umount``: unmount and wait until the daemon has exited."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

NAME = "umount"
HELP = "unmount an ocixfs mount and wait for its daemon to exit"
DESCRIPTION = """\
Unmount MOUNTPOINT and wait until the daemon that served it has exited, so that a
following 'ocixfs mount' on the same directory, or a service restart, starts clean.

A mount whose daemon has died ("Transport endpoint is not connected") is detached lazily:
processes still holding files open on it get errors, new ones see the empty directory.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path)
    parser.add_argument("-l", "--lazy", action="store_true",
                        help="detach now even if files are in use (they keep working until closed)")
    parser.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                        help="how long to wait for the daemon to exit (default 30)")


def run(args: argparse.Namespace) -> int:
    from ocixfs.errors import OcixError, UsageError
    from ocixfs.mount.control import request
    from ocixfs.mount.daemon import unmount, wait_for_exit

    mountpoint = Path(os.path.abspath(args.mountpoint))
    try:
        pid: int | None = int(request(mountpoint, "pid", timeout=5)["pid"])
    except OcixError:
        pid = None
    if pid is None and not _is_fuse_mount(mountpoint):
        raise UsageError(f"{mountpoint}: not an ocixfs mount")
    unmount(mountpoint, lazy=args.lazy or pid is None)
    if pid is not None and not wait_for_exit(pid, args.timeout):
        raise OcixError(f"{mountpoint}: unmounted, but daemon {pid} has not exited")
    return 0


def _is_fuse_mount(mountpoint: Path) -> bool:
    from ocixfs.mount.mounts import mount_type
    from ocixfs.mount.stacking import is_stacked

    return mount_type(mountpoint).startswith("fuse") or is_stacked(mountpoint)


