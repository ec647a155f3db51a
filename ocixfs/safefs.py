"""Paths another user on the host could change under us, and writing files safely.

ocixfs often runs as root on hosts shared by many users. Whenever it writes into, or
deletes from, a directory it was given, a user who can rename entries anywhere on the
way there could swap a component for a symlink between two system calls and redirect
root's writes (or ``chmod``, ``unlink``) anywhere. The rules here close that class:

- ``trusted_path``: every existing component of a path (symlinks included, then their
  targets) is owned by root or by the caller, and no directory on the way is writable by
  group or others unless it is sticky (like ``/tmp``, where others cannot rename our
  entries). Then nobody but root and the caller can change what the path names. It
  returns the path with its symlinks resolved, which is what the caller then uses.
- ``trusted_directory``: the same, after creating what is missing (mode 0755 for the
  parents, less the umask; the given mode for the directory itself).
- ``private_directory``: a trusted directory that is also owned by the caller and not
  writable by anyone else; one merely readable by others is tightened to the given mode.
  For the cache and the runtime directory (control sockets, daemon logs).
  ``checked_private_directory`` is the same, returning a ``str``: the host service's
  client, which every root mount starts with, does not import ``pathlib``.
- ``write_atomically``: a user-named output file is written under a random name created
  with ``O_EXCL`` in the same directory (never following a planted symlink), synced, then
  renamed over the target, so the target is whole or untouched.

Everything raises ``UnsafePathError`` (one line, naming the path and the owner or mode
at fault) or ``OSError``; callers translate the latter at their own boundary.
"""

from __future__ import annotations

import os
import stat

from ocixfs.errors import UnsafePathError

TYPE_CHECKING = False  # (not typing's: the service's client imports this module)
if TYPE_CHECKING:
    from pathlib import Path

__all__ = [
    "checked_private_directory",
    "private_directory",
    "trusted_directory",
    "trusted_path",
    "write_atomically",
]

_MAX_SYMLINKS = 40
_PARENT_MODE = 0o755


def trusted_path(path: str | os.PathLike[str], *, what: str) -> Path:
    """``path`` with its symlinks resolved, once every existing component (and symlink)
    on the way is owned by root or the caller and no directory is writable by others
    unless sticky. Components that do not exist yet are returned as given (the caller
    creates them). Raises ``UnsafePathError``; ``what`` names the path in the message."""
    from pathlib import Path

    return Path(_resolve(os.path.abspath(path), what, 0))


def trusted_directory(path: str | os.PathLike[str], *, what: str, mode: int = 0o755) -> Path:
    """``trusted_path``, with the missing directories created (the last with ``mode``,
    parents 0755, both less the umask), and checked again once they exist."""
    from pathlib import Path

    return Path(_trusted_directory(os.fspath(path), what, mode))


def private_directory(path: str | os.PathLike[str], *, what: str, mode: int = 0o700) -> Path:
    """A ``trusted_directory`` owned by the caller and writable by nobody else, created
    with ``mode`` if missing and tightened to it if others may read or enter it."""
    from pathlib import Path

    return Path(checked_private_directory(path, what=what, mode=mode))


def checked_private_directory(path: str | os.PathLike[str], *, what: str,
                              mode: int = 0o700) -> str:
    """``private_directory``, as a ``str``."""
    resolved = _trusted_directory(os.fspath(path), what, mode)
    fd = os.open(resolved, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise UnsafePathError(f"{what} {resolved}: owned by uid {st.st_uid}, not by you "
                                  f"(uid {os.geteuid()})")
        if st.st_mode & 0o022:
            raise UnsafePathError(f"{what} {resolved}: writable by others (mode "
                                  f"{stat.S_IMODE(st.st_mode):04o}); remove it or make it "
                                  f"{mode:04o}")
        if stat.S_IMODE(st.st_mode) & ~mode:
            os.fchmod(fd, mode)
    finally:
        os.close(fd)
    return resolved


def _trusted_directory(path: str, what: str, mode: int) -> str:
    resolved = _resolve(os.path.abspath(path), what, 0)
    missing = []
    candidate = resolved
    while not os.path.lexists(candidate):
        missing.append(candidate)
        candidate = os.path.dirname(candidate)
    for candidate in reversed(missing):
        try:  # noqa: SIM105 (no contextlib: the service's client imports this module)
            os.mkdir(candidate, mode if candidate == resolved else _PARENT_MODE)
        except FileExistsError:
            pass  # checked below, whoever made it
    resolved = _resolve(resolved, what, 0)
    if not os.path.isdir(resolved):
        raise UnsafePathError(f"{what} {resolved}: not a directory")
    return resolved


def _resolve(absolute: str, what: str, hops: int) -> str:
    """Walk ``absolute`` component by component from ``/`` with ``lstat`` (see
    ``trusted_path``); a symlink's target is walked the same way."""
    current = "/"
    _check(current, os.lstat(current), what)
    names = [name for name in absolute.split("/") if name]
    for index, name in enumerate(names):
        candidate = os.path.join(current, name)
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            return os.path.join(candidate, *names[index + 1:])
        _check(candidate, st, what)
        if stat.S_ISLNK(st.st_mode):
            if hops >= _MAX_SYMLINKS:
                raise UnsafePathError(f"{what} {absolute}: too many symlinks")
            target = os.path.normpath(os.path.join(current, os.readlink(candidate)))
            current = _resolve(target, what, hops + 1)
        else:
            current = candidate
    return current


def _check(path: str, st: os.stat_result, what: str) -> None:
    if st.st_uid not in (0, os.geteuid()):
        raise UnsafePathError(f"{what}: {path} is owned by uid {st.st_uid}, neither you nor "
                              "root: another user could redirect what ocixfs writes there")
    if stat.S_ISDIR(st.st_mode) and st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise UnsafePathError(f"{what}: {path} is writable by others (mode "
                              f"{stat.S_IMODE(st.st_mode):04o}) and not sticky")


def write_atomically(path: str | os.PathLike[str], data: bytes | bytearray, *,
                     mode: int = 0o644, sync: bool = True) -> None:
    """Replace the file ``path`` with ``data``: written under a fresh random name beside it
    (``O_EXCL``: a planted file or symlink is never opened), synced (unless not
    ``sync``: for files a reader authenticates anyway), renamed into place, and the
    directory synced. ``path`` itself is never followed: a symlink there is
    replaced, not written through. On failure the temporary file is removed and
    ``path`` is untouched. Raises ``OSError``."""
    target = os.fspath(path)
    directory, name = os.path.split(target)
    import secrets  # here: mount start-up (the service's client) imports this module

    tmp = os.path.join(directory, f".{name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        try:  # noqa: SIM105 (as above)
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if not sync:
        return
    directory_fd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)
