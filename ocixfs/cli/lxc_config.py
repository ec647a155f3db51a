"""``ocixfs lxc-config``: the LXC configuration for a container whose rootfs is an ocixfs mount.

The container's root is an overlay: the read-only ocixfs mount at LOWER below, a writable
directory UPPER above (``lxc.rootfs.path = overlay:LOWER:UPPER``). Everything the container
writes lands in UPPER; the image is never modified, and only the files the container reads
are fetched. With ``--image`` the config also mounts the image when the container starts
(a ``pre-start`` hook, in the host's mount namespace) and unmounts it when it stops
(``post-stop``); without it, LOWER must already be mounted (fstab, a systemd unit, or
``ocixfs mount``), which lets several containers share one mount.

The printed lines are LXC's ``key = value`` syntax, ready to append to a container's
``config`` or to pass to ``lxc-execute -f`` / ``lxc-start -f``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "COMMON_CONFIG",
    "DESCRIPTION",
    "HELP",
    "NAME",
    "LxcRootfs",
    "add_arguments",
    "render",
    "run",
]

NAME = "lxc-config"
HELP = "print LXC config lines for a container whose rootfs is an ocixfs mount + overlay"
DESCRIPTION = """\
Print the lxc.* lines for a container whose root filesystem is the read-only ocixfs mount
at LOWER with a writable overlay directory UPPER on top. Writes land in UPPER; the image
itself never changes, and only what the container reads is fetched.

With --image, the config mounts the image at LOWER when the container starts and unmounts
it when it stops (LXC hooks). Without it, mount LOWER yourself (fstab, the systemd unit,
'ocixfs mount'); several containers can then share one mount.

example (a system container; LXC keeps its state in /var/lib/lxc/web1):
  mkdir -p /var/lib/lxc/web1/lower /var/lib/lxc/web1/upper
  ocixfs lxc-config /var/lib/lxc/web1/lower /var/lib/lxc/web1/upper --name web1 \\
      --image /srv/images/debian.ocix --store https://blobs.example.org/store/ \\
      --bridge lxcbr0 > /var/lib/lxc/web1/config
  lxc-start -n web1 && lxc-attach -n web1
"""

COMMON_CONFIG = Path("/usr/share/lxc/config/common.conf")


@dataclass(frozen=True, kw_only=True)
class LxcRootfs:
    """What the printed config describes. ``mount_command``/``umount_command`` become hooks."""

    lower: Path
    upper: Path
    name: str | None = None
    bridge: str | None = None
    include: Path | None = None
    mount_command: Sequence[str] | None = None
    umount_command: Sequence[str] | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("lower", metavar="LOWER", type=Path,
                        help="the ocixfs mountpoint (the overlay's read-only lower layer)")
    parser.add_argument("upper", metavar="UPPER", type=Path,
                        help="a directory for the container's writes (its parent must be "
                        "writable too: LXC puts the overlay's work directory there)")
    parser.add_argument("--name", metavar="NAME", help="the container's hostname (lxc.uts.name)")
    parser.add_argument("--image", metavar="IMAGE",
                        help="mount this image at LOWER on start, unmount it on stop")
    parser.add_argument("--store", action="append", default=[], metavar="URL",
                        help="blob store for --image; repeat for mirrors")
    parser.add_argument("--cache-dir", type=Path, metavar="DIR",
                        help="cache for --image (default: the host's shared cache)")
    parser.add_argument("--digest", metavar="b3:HEX", help="pin --image to this digest")
    parser.add_argument("--bridge", metavar="BRIDGE",
                        help="give the container a veth on this bridge (default: loopback only)")
    parser.add_argument("--ocixfs", metavar="COMMAND",
                        help="how the hooks run ocixfs (default: this ocixfs)")


def run(args: argparse.Namespace) -> int:
    from ocixfs.errors import UsageError
    from ocixfs.image.loading import check_digest, is_url
    from ocixfs.store.spec import normalize_store

    lower, upper = _absolute(args.lower), _absolute(args.upper)
    for path in (lower, upper):
        if ":" in os.fspath(path):
            raise UsageError(f"{path}: LXC's overlay syntax cannot hold a ':' in a path")
    if lower == upper:
        raise UsageError("LOWER and UPPER must be different directories")
    if args.image is None and (args.store or args.cache_dir or args.digest):
        raise UsageError("--store, --cache-dir and --digest only apply with --image")
    mount_command = umount_command = None
    if args.image is not None:
        image = args.image if is_url(args.image) else os.path.abspath(args.image)
        ocixfs = shlex.split(args.ocixfs) if args.ocixfs else _this_ocixfs()
        mount_command = [*ocixfs, "mount", image, os.fspath(lower)]
        for store in args.store:
            mount_command += ["--store", normalize_store(store)]
        if args.cache_dir is not None:
            mount_command += ["--cache-dir", os.fspath(_absolute(args.cache_dir))]
        if args.digest is not None:
            mount_command += ["--digest", check_digest(args.digest)]
        umount_command = [*ocixfs, "umount", os.fspath(lower)]
    rootfs = LxcRootfs(
        lower=lower,
        upper=upper,
        name=args.name,
        bridge=args.bridge,
        include=COMMON_CONFIG if COMMON_CONFIG.is_file() else None,
        mount_command=mount_command,
        umount_command=umount_command,
    )
    sys.stdout.write(render(rootfs))
    return 0


def render(rootfs: LxcRootfs) -> str:
    """The config text: comments, then one ``key = value`` line per setting."""
    lines = [
        "# Root filesystem: the read-only ocixfs mount below, a writable overlay on top.",
        f"# Writes land in {rootfs.upper}; the image is never modified.",
    ]
    if rootfs.include is not None:
        lines.append(f"lxc.include = {rootfs.include}")
    if rootfs.name is not None:
        lines.append(f"lxc.uts.name = {rootfs.name}")
    lines += [
        f"lxc.rootfs.path = overlay:{rootfs.lower}:{rootfs.upper}",
        "lxc.mount.auto = proc:mixed sys:mixed cgroup:mixed",
        "lxc.autodev = 1",
    ]
    if rootfs.bridge is None:
        lines.append("lxc.net.0.type = empty")
    else:
        lines += [
            "lxc.net.0.type = veth",
            f"lxc.net.0.link = {rootfs.bridge}",
            "lxc.net.0.flags = up",
        ]
    if rootfs.mount_command is not None and rootfs.umount_command is not None:
        lines += [
            "# Mount the image in the host's namespace before the container starts; unmount",
            "# it after the container stops. Version 1 hooks get no extra arguments.",
            "lxc.hook.version = 1",
            f"lxc.hook.pre-start = {shlex.join(rootfs.mount_command)}",
            f"lxc.hook.post-stop = {shlex.join(rootfs.umount_command)}",
        ]
    return "\n".join(lines) + "\n"


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(path))


def _this_ocixfs() -> list[str]:
    """The command that runs this ocixfs: its console script, else this interpreter."""
    script = Path(sys.argv[0])
    if script.name == "ocixfs" and script.is_file():
        return [os.path.abspath(script)]
    return [sys.executable, "-m", "ocixfs"]
