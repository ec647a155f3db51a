"""The kernel serves a mount's metadata: an overlay of the image's EROFS metadata image
over its FUSE mount.

A stacked mount is three mounts made as one (root only, a kernel with EROFS file-backed
mounts and overlayfs data-only layers, Linux 6.12 or later):

1. the daemon's FUSE mount, made at ``RUNTIME/layers/<id>-<pid>/data``;
2. the image's EROFS metadata image (``image.erofs``, kept by ``cache.index``), mounted
   read-only from the daemon's descriptor of it at ``RUNTIME/layers/<id>-<pid>/meta``;
3. at the mountpoint, a read-only overlay ``lowerdir=META::DATA,metacopy=on,
   redirect_dir=follow``: ``META`` answers every lookup, ``stat``, ``readdir``,
   ``readlink`` and ``getxattr``; a regular file's content is opened in the data-only
   layer ``DATA`` at the path its ``trusted.overlay.redirect`` names.

The layers are made in ``RUNTIME/layers``, a private bind mount of itself (``Layers``).
Once the overlay is mounted, the two layers are detached (``MNT_DETACH``): the overlay
holds its own private clones of them, so the whole stack lives exactly as long as the
overlay. Unmounting the mountpoint (``umount``, ``ocixfs umount``, LXC) releases the
FUSE superblock, which ends the daemon's session; a daemon that stops first (a signal)
detaches the overlay itself (``unstack``). After a daemon died, names, attributes and
listings still answer (the kernel holds them), and reading a file not in the page cache
fails with ``ENOTCONN``.

When there is no metadata image yet (the first mount of an image on this host: its
daemon writes one once it serves), the FUSE mount is made at the mountpoint and serves
everything. If the overlay cannot be made (logged), the FUSE mount is moved to the
mountpoint (``MS_MOVE``) instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ocixfs.errors import OcixError
from ocixfs.mount.runtime import mount_id, runtime_dir

__all__ = ["Layers", "is_stacked", "kernel_can_stack", "mount_flags", "stack", "unstack"]

log = logging.getLogger(__name__)

_MS_RDONLY = 0x1
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_NOEXEC = 0x8
_MS_NOATIME = 0x400
_MS_NODIRATIME = 0x800
_MS_BIND = 0x1000
_MS_MOVE = 0x2000
_MS_PRIVATE = 0x40000
_MNT_DETACH = 0x2
_FLAG_BITS = {"noexec": _MS_NOEXEC, "noatime": _MS_NOATIME, "nodiratime": _MS_NODIRATIME}
_LAYERS = "layers"


@dataclass(frozen=True, slots=True)
class Layers:
    """Where one mount's two lower layers are made before they are stacked."""

    root: Path

    @classmethod
    def of(cls, mountpoint: Path, daemon: int) -> Layers:
        """The layers of the mount at ``mountpoint`` served by process ``daemon``."""
        return cls(runtime_dir() / _LAYERS / f"{mount_id(mountpoint)}-{daemon}")

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def meta(self) -> Path:
        return self.root / "meta"

    def create(self) -> None:
        """Make the two empty directories (private to root), after clearing leftovers.
        ``RUNTIME/layers`` is made a bind mount of itself with private propagation (once
        per boot): layers mounted there are never copied into other mount namespaces,
        and the FUSE mount can be moved out of it (``MS_MOVE`` refuses a mount whose
        parent is shared, as ``/run`` is under systemd)."""
        self.remove()
        runtime_dir(create=True)
        base = self.root.parent
        base.mkdir(mode=0o700, exist_ok=True)
        problem = None
        if not _mounts_at(base):
            problem = _mount(os.fspath(base), base, "", _MS_BIND, "")
        # always: a mount namespace made since may have made it shared (mount --make-rshared)
        problem = problem or _mount("none", base, "", _MS_PRIVATE, "")
        if problem is not None:
            log.warning("%s: cannot make it a private mount: %s", base, problem)
        self.root.mkdir(mode=0o700)
        self.data.mkdir(mode=0o700)
        self.meta.mkdir(mode=0o700)

    def remove(self) -> None:
        """Detach whatever is still mounted on the layers and remove their directories."""
        for path in (self.meta, self.data):
            for _ in range(_mounts_at(path)):
                if not _umount(path, _MNT_DETACH):
                    break
            with contextlib.suppress(OSError):
                path.rmdir()
        with contextlib.suppress(OSError):
            self.root.rmdir()


def kernel_can_stack() -> bool:
    """Whether this kernel has EROFS and overlayfs (loaded or loadable) and is recent
    enough for file-backed EROFS and data-only overlay layers (6.12)."""
    release = os.uname().release.split(".")
    try:
        if (int(release[0]), int(release[1].split("-")[0])) < (6, 12):
            return False
    except (IndexError, ValueError):
        return False
    try:
        with open("/proc/filesystems", encoding="ascii") as listed:
            known = {line.split()[-1] for line in listed if line.strip()}
    except OSError:
        return False
    modules = Path("/lib/modules") / os.uname().release / "kernel" / "fs"
    return all(name in known or (modules / name).is_dir() for name in ("erofs", "overlay"))


def mount_flags(kernel_flags: frozenset[str], *, suid: bool, dev: bool) -> int:
    """The overlay's ``MS_*`` flags: read-only, and what the FUSE mount would have had."""
    flags = _MS_RDONLY
    if not suid:
        flags |= _MS_NOSUID
    if not dev:
        flags |= _MS_NODEV
    for name in kernel_flags:
        flags |= _FLAG_BITS.get(name, 0)
    return flags


def stack(layers: Layers, meta_fd: int, mountpoint: Path, *, source: str,
          flags: int) -> bool:
    """Mount the metadata image (``meta_fd``) and the overlay (module doc), then detach
    the layers. Blocking: the overlay's first lookups are served by the FUSE mount, so
    this runs in a worker thread, never in the trio thread. On a failure (logged), the
    FUSE mount is moved to the mountpoint instead; returns whether the overlay was made.
    Raises ``OcixError`` if even that fails (the daemon then ends, unmounting it)."""
    problem = _mount(f"/proc/self/fd/{meta_fd}", layers.meta, "erofs",
                     _MS_RDONLY | _MS_NODEV | _MS_NOSUID, "")
    if problem is None:
        options = f"lowerdir={layers.meta}::{layers.data},metacopy=on,redirect_dir=follow"
        problem = _mount(source, mountpoint, "overlay", flags, options)
    if problem is None:
        layers.remove()
        return True
    log.warning("%s: the kernel cannot serve the metadata (%s); FUSE serves it all",
                mountpoint, problem)
    moved = _mount(os.fspath(layers.data), mountpoint, "", _MS_MOVE, "")
    if moved is not None:
        raise OcixError(f"{mountpoint}: cannot mount: overlay: {problem}; moving the FUSE "
                        f"mount into place: {moved} (mount with --fuse-only)")
    layers.remove()
    return False


def unstack(mountpoint: Path) -> None:
    """Detach the mount at ``mountpoint`` if it is one of ours (stacked, or the FUSE mount
    moved there): a daemon stopping on its own. The FUSE session then ends with it."""
    lines = _mount_lines(mountpoint)
    if is_stacked(mountpoint) or (lines and lines[-1][2] == b"fuse.ocixfs"):
        _umount(mountpoint, _MNT_DETACH)


def is_stacked(mountpoint: Path) -> bool:
    """Whether the topmost mount at ``mountpoint`` is a stacked ocixfs mount: an overlay
    whose layers were made in this user's runtime directory."""
    marker = b"lowerdir=" + os.fsencode(runtime_dir() / _LAYERS) + b"/"
    found = _mount_lines(mountpoint)
    return bool(found) and found[-1][2] == b"overlay" and marker in found[-1][3]


def _mounts_at(path: Path) -> int:
    """How many mounts are stacked at ``path`` (``os.path.ismount`` misses a bind mount
    of a directory of the same file system)."""
    return len(_mount_lines(path))


def _mount_lines(path: Path) -> list[list[bytes]]:
    """The fields of each ``/proc/self/mounts`` line mounted at ``path``, in order."""
    target = os.fsencode(os.path.abspath(path)).replace(b" ", b"\\040")
    try:
        with open("/proc/self/mounts", "rb") as mounts:
            return [fields for fields in (line.split() for line in mounts)
                    if len(fields) > 3 and fields[1] == target]
    except OSError:
        return []


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _mount(source: str, target: Path, fstype: str, flags: int, options: str) -> str | None:
    """``mount(2)``; None on success, else the reason."""
    result = _libc().mount(os.fsencode(source), os.fsencode(target),
                           fstype.encode() or None, ctypes.c_ulong(flags),
                           options.encode() or None)
    if result == 0:
        return None
    return os.strerror(ctypes.get_errno())


def _umount(target: Path, flags: int) -> bool:
    """``umount2(2)``; whether it succeeded (failures logged)."""
    if _libc().umount2(os.fsencode(target), flags) == 0:
        return True
    log.warning("cannot unmount %s: %s", target, os.strerror(ctypes.get_errno()))
    return False
