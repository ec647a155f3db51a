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
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ocixfs.errors import OcixError
from ocixfs.mount.mounts import (
    MNT_DETACH,
    MS_BIND,
    MS_MOVE,
    MS_NOATIME,
    MS_NODEV,
    MS_NODIRATIME,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_RDONLY,
    MountEntry,
    mount,
    mounted_at,
    umount,
)
from ocixfs.mount.runtime import mount_id, runtime_dir

__all__ = ["Layers", "is_ocixfs_mount", "is_stacked", "kernel_can_stack", "mount_flags", "stack",
           "unstack"]

log = logging.getLogger(__name__)

_FLAG_BITS = {"noexec": MS_NOEXEC, "noatime": MS_NOATIME, "nodiratime": MS_NODIRATIME}
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
        ``RUNTIME/layers`` is made a bind mount of itself (once per boot) with private
        propagation (at every mount: a namespace made since may have made it shared):
        layers mounted there are never copied into other mount namespaces,
        and the FUSE mount can be moved out of it (``MS_MOVE`` refuses a mount whose
        parent is shared, as ``/run`` is under systemd)."""
        if self.root.exists():  # a daemon of the same pid died while it stacked
            self.remove()
        runtime_dir(create=True)
        base = self.root.parent
        base.mkdir(mode=0o700, exist_ok=True)
        try:
            if not mounted_at(base):
                mount(os.fspath(base), base, None, MS_BIND)
            mount("none", base, None, MS_PRIVATE)
        except OSError as exc:
            log.warning("%s: cannot make it a private mount: %s", base, exc.strerror)
        self.root.mkdir(mode=0o700)
        self.data.mkdir(mode=0o700)
        self.meta.mkdir(mode=0o700)

    def remove(self) -> None:
        """Detach whatever is still mounted on the layers and remove their directories."""
        for path in (self.meta, self.data):
            for _ in mounted_at(path):
                _detach(path)
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
    flags = MS_RDONLY
    if not suid:
        flags |= MS_NOSUID
    if not dev:
        flags |= MS_NODEV
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
    try:
        mount(f"/proc/self/fd/{meta_fd}", layers.meta, "erofs", MS_RDONLY | MS_NODEV | MS_NOSUID)
        mount(source, mountpoint, "overlay", flags,
              f"lowerdir={layers.meta}::{layers.data},metacopy=on,redirect_dir=follow")
    except OSError as exc:
        problem = exc.strerror
    else:
        layers.remove()
        return True
    log.warning("%s: the kernel cannot serve the metadata (%s); FUSE serves it all",
                mountpoint, problem)
    try:
        mount(os.fspath(layers.data), mountpoint, None, MS_MOVE)
    except OSError as exc:
        raise OcixError(f"{mountpoint}: cannot mount: overlay: {problem}; moving the FUSE "
                        f"mount into place: {exc.strerror} (mount with --fuse-only)") from None
    layers.remove()
    return False


def unstack(mountpoint: Path) -> None:
    """Detach the mount at ``mountpoint`` if it is one of ours (stacked, or the FUSE mount
    moved there): a daemon stopping on its own. The FUSE session then ends with it."""
    if is_ocixfs_mount(mountpoint):
        _detach(mountpoint)


def is_ocixfs_mount(mountpoint: Path) -> bool:
    """Whether the topmost mount at ``mountpoint`` is an ocixfs mount (FUSE or stacked)."""
    found = mounted_at(mountpoint)
    return bool(found) and (found[-1].fstype == "fuse.ocixfs" or _is_ours(found[-1]))


def is_stacked(mountpoint: Path) -> bool:
    """Whether the topmost mount at ``mountpoint`` is a stacked ocixfs mount: an overlay
    whose layers were made in this user's runtime directory."""
    found = mounted_at(mountpoint)
    return bool(found) and _is_ours(found[-1])


def _is_ours(entry: MountEntry) -> bool:
    marker = b"lowerdir=" + os.fsencode(runtime_dir() / _LAYERS) + b"/"
    return entry.fstype == "overlay" and marker in entry.options


def _detach(path: Path) -> None:
    """Detach the topmost mount at ``path`` (``MNT_DETACH``); a failure is logged."""
    try:
        umount(path, MNT_DETACH)
    except OSError as exc:
        log.warning("cannot unmount %s: %s", path, exc.strerror)
