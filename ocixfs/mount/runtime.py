"""Where a user's mount daemons and the host service keep their sockets and logs: the
runtime directory (``/run/ocixfs`` as root, else ``$XDG_RUNTIME_DIR/ocixfs`` or
``/tmp/ocixfs-<uid>``), private to the user, and the name each mountpoint's files take in
it. Imports next to nothing: the host service's client starts with it."""

from __future__ import annotations

import os

from ocixfs.safefs import checked_private_directory

TYPE_CHECKING = False  # (not typing's: the service's client imports this module)
if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["mount_id", "runtime_dir", "runtime_dir_name"]


def runtime_dir(*, create: bool = False) -> Path:
    """Where control sockets and daemon logs live for this user, checked as a
    ``private_directory`` (owned by this user, writable by nobody else, tightened to
    0700) whenever it exists, and made so first with ``create``. Raises
    ``UnsafePathError``: a directory another user controls could hold a fake daemon's
    socket or a symlink where the daemon appends its log."""
    from pathlib import Path

    return Path(runtime_dir_name(create=create))


def runtime_dir_name(*, create: bool = False) -> str:
    """``runtime_dir``, as a ``str``."""
    if os.geteuid() == 0:
        path = "/run/ocixfs"
    else:
        xdg = os.environ.get("XDG_RUNTIME_DIR")
        path = os.path.join(xdg, "ocixfs") if xdg else f"/tmp/ocixfs-{os.geteuid()}"
    if create or os.path.lexists(path):
        return checked_private_directory(path, what="runtime directory")
    return path


def mount_id(mountpoint: Path) -> str:
    """A short stable name for a mountpoint (its absolute path, hashed)."""
    import hashlib

    return hashlib.sha256(os.fsencode(os.path.abspath(mountpoint))).hexdigest()[:20]
