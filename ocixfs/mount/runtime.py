"""Where a user's mount daemons and the host service keep their sockets and logs: the
runtime directory (``/run/ocixfs`` as root, else ``$XDG_RUNTIME_DIR/ocixfs`` or
``/tmp/ocixfs-<uid>``), private to the user, and the name each mountpoint's files take in
it. Imports next to nothing: the host service's client starts with it."""

from __future__ import annotations

import os
from pathlib import Path

from ocixfs.safefs import private_directory

__all__ = ["mount_id", "runtime_dir"]


def runtime_dir(*, create: bool = False) -> Path:
    """Where control sockets and daemon logs live for this user, checked as a
    ``private_directory`` (owned by this user, writable by nobody else, tightened to
    0700) whenever it exists, and made so first with ``create``. Raises
    ``UnsafePathError``: a directory another user controls could hold a fake daemon's
    socket or a symlink where the daemon appends its log."""
    if os.geteuid() == 0:
        path = Path("/run/ocixfs")
    else:
        xdg = os.environ.get("XDG_RUNTIME_DIR")
        path = Path(xdg) / "ocixfs" if xdg else Path(f"/tmp/ocixfs-{os.geteuid()}")
    if create or os.path.lexists(path):
        return private_directory(path, what="runtime directory")
    return path


def mount_id(mountpoint: Path) -> str:
    """A short stable name for a mountpoint (its absolute path, hashed)."""
    import hashlib

    return hashlib.sha256(os.fsencode(os.path.abspath(mountpoint))).hexdigest()[:20]
