"""The mount daemon: one trio run that owns the reader, the FUSE session, the control socket
and signal handling, and a start-up protocol that reports readiness to whoever started it.

Life of a mount::

    ocixfs mount ──validate image, build tree──▶ fork ──child: setsid──▶ trio.run(serve)
         ▲                                                  │ pyfuse3.init (mounts)
         └──── "ok" / "error: …" over a pipe ◀── announce ──┤ pyfuse3.main serves
                                                            │ SIGTERM/SIGINT/umount → close

Readiness is only announced after a ``stat`` of the mountpoint, made from a worker thread,
has been answered by this daemon: a command that returns 0 leaves a mount that serves.
Nothing touches the mountpoint from the trio thread between ``pyfuse3.init`` and
``pyfuse3.main`` (that deadlocks; see NOTES).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ocixfs.errors import OcixError, UsageError, leaf_exceptions
from ocixfs.log import only_routine_lines, timestamp_lines
from ocixfs.mount.config import MountConfig

__all__ = ["check_mountpoint", "mount_type", "open_log_file", "run_background", "run_foreground",
           "sd_notify"]

log = logging.getLogger(__name__)

READY_TIMEOUT = 120.0


def check_mountpoint(mountpoint: Path, *, nonempty: bool = False) -> None:
    """Refuse a mountpoint that is missing, not a directory, already mounted, or (unless
    ``nonempty``, the ``-o nonempty`` option) not empty: the mount would hide its files."""
    try:
        is_dir = mountpoint.is_dir()
    except OSError as exc:
        raise UsageError(
            f"{mountpoint}: {exc.strerror}; a dead mount? run 'ocixfs umount {mountpoint}'"
        ) from None
    if not is_dir:
        raise UsageError(f"{mountpoint}: not a directory")
    if os.path.ismount(mountpoint):
        raise UsageError(f"{mountpoint}: already a mountpoint{_mount_owner(mountpoint)}")
    if not nonempty and _has_entries(mountpoint):
        raise UsageError(
            f"{mountpoint}: not empty (the mount would hide its files; -o nonempty to mount anyway)"
        )


def _has_entries(directory: Path) -> bool:
    try:
        with os.scandir(directory) as entries:
            return next(entries, None) is not None
    except OSError as exc:
        raise UsageError(f"{directory}: {exc.strerror}") from None


def _mount_owner(mountpoint: Path) -> str:
    """Who holds a mountpoint, for the refusal message. After a daemon died, the kernel's
    caches still answer ``stat`` on the root, so only the silent control socket tells."""
    from ocixfs.mount.control import request, socket_path

    if not socket_path(mountpoint).exists():
        if mount_type(mountpoint) == "fuse.ocixfs":
            return f" (a stale ocixfs mount; run 'ocixfs umount {mountpoint}' first)"
        return ""
    try:
        pid = request(mountpoint, "pid", timeout=2)["pid"]
    except OcixError:
        return f" whose ocixfs daemon is gone; run 'ocixfs umount {mountpoint}' first"
    return f" (served by ocixfs daemon {pid})"


def mount_type(mountpoint: Path) -> str:
    """The file system type of the topmost mount at ``mountpoint`` ("" if none)."""
    target = os.fsencode(mountpoint).replace(b" ", b"\\040")
    found = b""
    try:
        with open("/proc/self/mounts", "rb") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) > 2 and fields[1] == target:
                    found = fields[2]
    except OSError:
        return ""
    return found.decode(errors="replace")


def wait_for_exit(pid: int, timeout: float) -> bool:
    """Wait until process ``pid`` has exited (gone, or a zombie) or ``timeout`` seconds
    have passed; whether it exited."""
    import time

    deadline = time.monotonic() + timeout
    while not _exited(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


def _exited(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            return stat_file.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return True


# ----------------------------------------------------------------------------------------
# Starting


def run_foreground(config: MountConfig, tree: Any, image_digest: str) -> int:
    """Serve in this process until unmounted; notify systemd when ready."""

    def ready() -> None:
        sd_notify(b"READY=1\nSTATUS=serving " + os.fsencode(config.mountpoint))

    return _serve_and_close(config, tree, image_digest, ready)


def run_background(config: MountConfig, tree: Any, image_digest: str) -> int:
    """Fork a daemon and return once it serves (0) or has failed (1, reason printed).
    The log file is opened first, so a bad one is refused before anything is mounted."""
    log_fd = None if config.log_file is None else open_log_file(config.log_file)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(read_fd)
        os.setsid()
        os.chdir("/")
        status = _daemon_child(config, tree, image_digest, write_fd, log_fd)
        os._exit(status)
    os.close(write_fd)
    if log_fd is not None:
        os.close(log_fd)
    return _wait_for_child(pid, read_fd, config.mountpoint)


def open_log_file(path: Path) -> int:
    """The daemon's log, opened for appending (created 0600), never through a symlink:
    a planted one would have root append to any file. Raises ``UsageError``."""
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
                       | os.O_NOCTTY | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        reason = "a symlink (refused)" if exc.errno == errno.ELOOP else exc.strerror
        raise UsageError(f"log file {path}: {reason}") from None


def _daemon_child(config: MountConfig, tree: Any, image_digest: str, pipe_fd: int,
                  log_fd: int | None) -> int:
    def ready() -> None:
        os.write(pipe_fd, b"ok\n")
        os.close(pipe_fd)
        _detach_stdio(log_fd)

    try:
        return _serve_and_close(config, tree, image_digest, ready)
    except BaseException as exc:
        message = _one_line(exc)
        try:
            os.write(pipe_fd, f"error: {message}\n".encode())
        except OSError:
            log.error("daemon failed: %s", message)
        return 1
    finally:  # a failed start was reported to the caller: its log holds nothing more
        if config.remove_routine_log and config.log_file and only_routine_lines(config.log_file):
            config.log_file.unlink(missing_ok=True)


def _one_line(exc: BaseException) -> str:
    """What the user reads about a failed start: an ``OcixError``'s own message, else the
    exception's type and text."""
    return str(exc) if isinstance(exc, OcixError) else f"{type(exc).__name__}: {exc}"


def _wait_for_child(pid: int, read_fd: int, mountpoint: Path) -> int:
    with os.fdopen(read_fd, "rb") as pipe:
        import select

        ready, _, _ = select.select([pipe], [], [], READY_TIMEOUT)
        line = pipe.readline().decode(errors="replace").strip() if ready else ""
    if line == "ok":
        return 0
    if line.startswith("error: "):
        print(f"ocixfs: {line[7:]}", file=sys.stderr)
    elif not ready:
        print(f"ocixfs: {mountpoint}: daemon did not become ready in time", file=sys.stderr)
        os.kill(pid, signal.SIGTERM)
    else:
        print(f"ocixfs: {mountpoint}: daemon exited during start-up", file=sys.stderr)
    os.waitpid(pid, 0)
    return 1


def _detach_stdio(log_fd: int | None) -> None:
    """stdin and stdout to /dev/null, stderr to the log (``open_log_file``) or nowhere."""
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    if log_fd is not None:
        os.dup2(log_fd, 2)
        os.close(log_fd)
        timestamp_lines()
    else:
        os.dup2(devnull, 2)
    os.close(devnull)


def sd_notify(message: bytes) -> None:
    """Send ``message`` to systemd (``NOTIFY_SOCKET``), if it is listening; never raises."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message, address)
    except OSError as exc:
        log.warning("cannot notify systemd: %s", exc)


# ----------------------------------------------------------------------------------------
# Serving


def _serve_and_close(
    config: MountConfig, tree: Any, image_digest: str, ready: Callable[[], None]
) -> int:
    import trio

    from ocixfs.mount.session import MountSession

    session = MountSession(config, tree, image_digest)
    try:
        trio.run(session.serve, ready)
    except BaseExceptionGroup as group:
        leaves = leaf_exceptions(group)
        if len(leaves) == 1 and isinstance(leaves[0], OcixError):
            raise leaves[0] from None  # one line for the user, not a traceback of the group
        raise
    return 0
