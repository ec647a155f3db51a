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

import contextlib
import errno
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from ocixfs.errors import OcixError, UsageError, leaf_exceptions
from ocixfs.log import only_routine_lines, timestamp_lines
from ocixfs.mount.config import MountConfig
from ocixfs.mount.startup import ImageLoader, PendingLoad

__all__ = ["check_mountpoint", "open_log_file", "run_background", "run_foreground", "sd_notify",
           "unmount", "wait_for_exit"]

log = logging.getLogger(__name__)

READY_TIMEOUT = 120.0
_PR_SET_PDEATHSIG = 1


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
    from ocixfs.mount.stacking import is_ocixfs_mount

    if not socket_path(mountpoint).exists():
        if is_ocixfs_mount(mountpoint):
            return f" (a stale ocixfs mount; run 'ocixfs umount {mountpoint}' first)"
        return ""
    try:
        pid = request(mountpoint, "pid", timeout=2)["pid"]
    except OcixError:
        return f" whose ocixfs daemon is gone; run 'ocixfs umount {mountpoint}' first"
    return f" (served by ocixfs daemon {pid})"


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


def run_foreground(config: MountConfig, loader: ImageLoader) -> int:
    """Load the image and serve it in this process until unmounted; notify systemd when
    ready."""

    def ready() -> None:
        sd_notify(b"READY=1\nSTATUS=serving " + os.fsencode(config.mountpoint))

    return _serve_and_close(config, loader, ready)


def run_background(config: MountConfig, loader: ImageLoader) -> int:
    """Fork a daemon that loads the image and serves it; return once it serves (0) or
    has failed (its exit status, reason printed; nothing left mounted). The log file is
    opened first, so a bad one is refused before anything is mounted."""
    log_fd = None if config.log_file is None else open_log_file(config.log_file)
    read_fd, write_fd = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(read_fd)
        os.setsid()
        os.chdir("/")
        _die_with_parent(parent, signal.SIGTERM)  # until it serves: a start nobody awaits
        status = _daemon_child(config, loader, write_fd, log_fd)
        os._exit(status)
    os.close(write_fd)
    if log_fd is not None:
        os.close(log_fd)
    return _wait_for_child(pid, read_fd, config.mountpoint)


def open_log_file(path: str | os.PathLike[str]) -> int:
    """The daemon's log, opened for appending (created 0600), never through a symlink:
    a planted one would have root append to any file. Raises ``UsageError``."""
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
                       | os.O_NOCTTY | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        reason = "a symlink (refused)" if exc.errno == errno.ELOOP else exc.strerror
        raise UsageError(f"log file {path}: {reason}") from None


def _daemon_child(config: MountConfig, loader: ImageLoader, pipe_fd: int,
                  log_fd: int | None) -> int:
    def ready() -> None:
        _die_with_parent(0, 0)
        os.write(pipe_fd, b"ok\n")
        os.close(pipe_fd)
        _detach_stdio(log_fd)

    try:
        return _serve_and_close(config, loader, ready)
    except BaseException as exc:
        message = _one_line(exc)
        try:
            os.write(pipe_fd, f"error {_status(exc)}: {message}\n".encode())
        except OSError:
            log.error("daemon failed: %s", message)
        return 1
    finally:  # a failed start was reported to the caller: its log holds nothing more
        if config.remove_routine_log and config.log_file and only_routine_lines(config.log_file):
            config.log_file.unlink(missing_ok=True)


def _die_with_parent(parent: int, signum: int) -> None:
    """Have the kernel send ``signum`` to this process when ``parent``, the process that
    forked it, exits (``signum`` 0: no longer). A daemon whose starter died (a killed
    worker of the host service, an interrupted command) must not mount for nobody."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, ctypes.c_ulong(signum), 0, 0, 0)
    if signum and os.getppid() != parent:  # it died before the prctl
        os.kill(os.getpid(), signum)


def _status(exc: BaseException) -> int:
    """The exit status of the ``mount`` command that started a daemon failing with
    ``exc``: what ``ocixfs`` exits with for it (2 for a usage error, else 1)."""
    return 2 if isinstance(exc, UsageError) else 1


def _one_line(exc: BaseException) -> str:
    """What the user reads about a failed start: an ``OcixError``'s own message, else the
    exception's type and text."""
    return str(exc) if isinstance(exc, OcixError) else f"{type(exc).__name__}: {exc}"


def _wait_for_child(pid: int, read_fd: int, mountpoint: Path) -> int:
    """The daemon's word on its start: 0 once it serves, else its failure's status. Ctrl-C
    (or SIGTERM forwarded by the host service's client) meanwhile stops it."""
    import select

    with os.fdopen(read_fd, "rb") as pipe:
        try:
            ready, _, _ = select.select([pipe], [], [], READY_TIMEOUT)
            line = pipe.readline().decode(errors="replace").strip() if ready else ""
        except BaseException:
            _stop_child(pid, mountpoint)
            raise
    if line == "ok":
        return 0
    status, _, message = line.partition(": ")
    if status in ("error 1", "error 2") and message:
        print(f"ocixfs: {message}", file=sys.stderr)
        os.waitpid(pid, 0)
        return int(status[6:])
    if not ready:
        print(f"ocixfs: {mountpoint}: daemon did not become ready in time", file=sys.stderr)
    else:
        print(f"ocixfs: {mountpoint}: daemon exited during start-up", file=sys.stderr)
    _stop_child(pid, mountpoint)
    return 1


def _stop_child(pid: int, mountpoint: Path) -> None:
    """End a daemon that did not start (SIGTERM) and leave nothing mounted: one killed
    after it mounted but before it could unmount leaves a dead mount, removed here."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    os.waitpid(pid, 0)
    from ocixfs.mount.stacking import Layers, is_ocixfs_mount

    if is_ocixfs_mount(mountpoint):
        with contextlib.suppress(OcixError):
            unmount(mountpoint, lazy=True)
    Layers.of(mountpoint, pid).remove()  # one killed while it stacked


def unmount(mountpoint: Path, *, lazy: bool) -> None:
    """Unmount an ocixfs mount (``fusermount3 -u``, else or when stacked ``umount``;
    ``lazy``: detach it even while busy). Raises ``OcixError`` with the tool's reason."""
    from ocixfs.mount.stacking import is_stacked

    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool is not None and not is_stacked(mountpoint):
        command = [tool, "-u", *(["-z"] if lazy else []), os.fspath(mountpoint)]
    else:
        command = ["umount", *(["-l"] if lazy else []), os.fspath(mountpoint)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        reason = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"
        raise OcixError(f"{mountpoint}: cannot unmount: {reason}")


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


def _serve_and_close(config: MountConfig, loader: ImageLoader, ready: Callable[[], None]) -> int:
    pending = PendingLoad(loader)  # the manifest downloads while trio and the rest import
    import trio

    from ocixfs.mount.session import MountSession

    session = MountSession(config, pending)
    try:
        trio.run(session.serve, ready)
    except BaseExceptionGroup as group:
        leaves = leaf_exceptions(group)
        if len(leaves) == 1 and isinstance(leaves[0], OcixError):
            raise leaves[0] from None  # one line for the user, not a traceback of the group
        raise
    return 0
